"""wait (SPEC §7, §14 "wait", "wait details")."""

from __future__ import annotations

import json
import time

import pytest

from conftest import (TS_RE, Team, assert_error, bare_remote, blocked, clone, git, make_env,
                      make_repo, wait_older_than)


@pytest.fixture
def team(modal_team):
    """Every test here runs twice: in pure-CLI mode and with a daemon (SPEC §1)."""
    return modal_team


def blocks(team, w, n=1):
    """Wait until the background wait `w` blocks (in the daemon, or polling the store)."""
    blocked(w, team.path, team.daemon is not None, n)


def test_wait_timeout(team):
    start = time.monotonic()
    r = team.t("wait", "--timeout", "1s", name="bob")
    elapsed = time.monotonic() - start
    assert r.code == 1, r.describe()
    assert r.out.strip() == "NO_MESSAGES_TIMEOUT"
    assert 0.9 <= elapsed < 15
    r = team.t("wait", "--timeout", "500ms", "--json", name="bob")
    assert r.code == 1, r.describe()
    assert r.json == {"status": "timeout", "messages": []}


def test_wait_wakes_on_message(team, procs):
    w = procs.wait(team, "bob", "--timeout", "20s")
    blocks(team, w)
    sent = team.send("alice", "wake up bob", "--to", "bob")
    w.finish()
    assert w.code == 0, (w.out, w.err)
    assert w.elapsed < 15
    lines = w.out.splitlines()
    assert lines[0] == "MESSAGES_RECEIVED"
    assert "---" in lines
    assert "FROM: @alice" in lines
    assert f"ID: {sent['message_id']}" in lines
    assert "CONTENT: wake up bob" in lines
    assert any(ln.startswith("TIMESTAMP: ") for ln in lines)
    assert lines[-1] == "---"
    # wait marks nothing read
    assert team.unread_ids("bob") == [sent["message_id"]]


def test_wait_json_received(team, procs):
    w = procs.wait(team, "bob", "--timeout", "20s", "--json")
    blocks(team, w)
    sent = team.send("alice", "json wake", "--to", "bob", "--scope", "module:api")
    w.finish()
    assert w.code == 0, (w.out, w.err)
    doc = json.loads(w.out)
    assert doc["status"] == "received"
    [m] = doc["messages"]
    assert m["message_id"] == sent["message_id"] and m["agent_id"] == "alice"
    assert m["body"]["content"] == "json wake" and TS_RE.match(m["created_at"])
    assert m["is_read"] is False


def test_wait_ignores_others_and_own_messages(team, procs):
    w = procs.wait(team, "bob", "--timeout", "20s", "--json")
    blocks(team, w)
    team.send("alice", "for carol only", "--to", "carol")
    team.send("bob", "bob to alice", "--to", "alice")
    team.send("bob", "bob to reviewers", "--to", "reviewer")  # bob is excluded from his fan-out
    # a message to oneself by name is allowed (an agent name is that agent, SPEC §5), and
    # never wakes one's own wait (SPEC §7: messages to me, not written by me)
    assert team.send("bob", "note to self", "--to", "bob")["recipients"] == ["bob"]
    assert w.running(), "a message bob should not be woken by woke him"
    # the first message that should wake bob does, and it is the only one returned
    wake = team.send("carol", "for bob", "--to", "bob")
    w.finish()
    assert w.code == 0, (w.out, w.err)
    assert [m["message_id"] for m in json.loads(w.out)["messages"]] == [wake["message_id"]]


def test_wait_after_returns_older_messages(team):
    sent = team.seed("alice", "from the past", to=["bob"])
    wait_older_than(sent)
    r = team.t("wait", "--timeout", "0", name="bob")
    assert r.code == 1 and r.out.strip() == "NO_MESSAGES_TIMEOUT", r.describe()
    r = team.t("wait", "--after=-30s", "--timeout", "0", "--json", name="bob")
    assert [m["message_id"] for m in r.json["messages"]] == [sent["message_id"]]
    # SPEC §7: each message wakes an agent's waits once; --unread still returns it
    r = team.t("wait", "--after", "-30s", "--timeout", "0", name="bob")
    assert r.code == 1 and r.out.strip() == "NO_MESSAGES_TIMEOUT", r.describe()
    r = team.t("wait", "--unread", "--timeout", "0", name="bob")
    assert r.code == 0 and f"ID: {sent['message_id']}" in r.out.splitlines(), r.describe()
    assert team.unread_ids("bob") == [sent["message_id"]]


def test_wait_after_timestamp(team):
    sent = team.seed("alice", "stamped", to=["bob"])
    r = team.t("wait", "--after", "2000-01-01T00:00:00.000000Z", "--timeout", "0", name="bob")
    assert r.code == 0, r.describe()
    assert sent["message_id"] in r.out


def test_wait_unread_returns_at_once(team):
    old = team.seed("alice", "old but unread", to=["bob"])
    wait_older_than(old)
    start = time.monotonic()
    r = team.t("wait", "--unread", "--timeout", "30s", name="bob")
    assert r.code == 0, r.describe()
    assert time.monotonic() - start < 10
    assert f"ID: {old['message_id']}" in r.out
    # still unread afterwards; once read, --unread waits like a plain wait
    assert team.unread_ids("bob") == [old["message_id"]]
    team.t.ok("inbox", name="bob")
    r = team.t("wait", "--unread", "--timeout", "1s", name="bob")
    assert r.code == 1 and r.out.strip() == "NO_MESSAGES_TIMEOUT", r.describe()


def test_wait_scope_filters(team, procs):
    w = procs.wait(team, "bob", "--scope", "module:api", "--timeout", "15s")
    blocks(team, w)
    team.send("alice", "unscoped", "--to", "bob")
    team.send("alice", "other scope", "--to", "bob", "--scope", "module:db")
    assert w.running(), "a message outside the scope woke the wait"
    scoped = team.send("alice", "scoped", "--to", "bob", "--scope", "module:api")
    w.finish()
    assert w.code == 0, (w.out, w.err)
    assert f"ID: {scoped['message_id']}" in w.out
    assert "CONTENT: unscoped" not in w.out and "CONTENT: other scope" not in w.out
    r = team.t("wait", "--scope", "module:db", "--after", "-60s", "--timeout", "0", "--json",
               name="bob")
    assert r.code == 0, r.describe()
    assert [m["body"]["content"] for m in r.json["messages"]] == ["other scope"]
    assert_error(team.t("wait", "--scope", "nocolon", "--timeout", "0", name="bob"), 2)


# --------------------------------------------------------------------------- SPEC §7 (rewritten)

LISTENER = ("wait", "--after", "-15s", "--json")


def test_listener_loop_gets_each_message_once(team):
    """The seed's loop `wait --timeout 8m --after -15s --json`, re-armed at once, is told
    about a message once, including one sent while no wait was running."""
    first = team.send("alice", "one", "--to", "bob")
    r = team.t(*LISTENER, "--timeout", "5s", name="bob")
    assert r.code == 0, r.describe()
    assert [m["message_id"] for m in r.json["messages"]] == [first["message_id"]]
    r = team.t(*LISTENER, "--timeout", "500ms", name="bob")
    assert r.code == 1 and r.json == {"status": "timeout", "messages": []}, r.describe()
    between = [team.send("alice", "two", "--to", "bob"), team.send("carol", "three", "--to", "bob")]
    r = team.t(*LISTENER, "--timeout", "5s", name="bob")
    assert r.code == 0, r.describe()
    assert sorted(m["message_id"] for m in r.json["messages"]) == \
        sorted(s["message_id"] for s in between)
    r = team.t(*LISTENER, "--timeout", "500ms", name="bob")
    assert r.code == 1, r.describe()
    # another agent's record is its own: carol still gets what was sent to her
    to_carol = team.send("alice", "for carol", "--to", "carol")
    r = team.t(*LISTENER, "--timeout", "5s", name="carol")
    assert [m["message_id"] for m in r.json["messages"]] == [to_carol["message_id"]]
    # nothing was marked read, and the record survives an index rebuild
    assert len(team.unread_ids("bob")) == 3
    for p in (team.path / ".thrum" / "var").glob("index.db*"):
        p.unlink()
    r = team.t(*LISTENER, "--timeout", "500ms", name="bob")
    assert r.code == 1, r.describe()


def test_listener_loop_in_the_background_misses_nothing(team, procs):
    got, sent = [], []
    for i in range(3):
        if i == 1:  # one sent while no wait runs, before the next one starts
            sent.append(team.send("alice", "gap %d" % i, "--to", "bob")["message_id"])
            w = procs.wait(team, "bob", *LISTENER[1:], "--timeout", "20s")
        else:
            w = procs.wait(team, "bob", *LISTENER[1:], "--timeout", "20s")
            blocks(team, w)
            sent.append(team.send("alice", "live %d" % i, "--to", "bob")["message_id"])
        w.finish()
        assert w.code == 0, (w.out, w.err)
        got += [m["message_id"] for m in json.loads(w.out)["messages"]]
    assert got == sent


def test_a_message_that_arrives_by_sync_wakes_a_waiter(tmp_path, procs):
    env = make_env(tmp_path / "home")
    remote = bare_remote(tmp_path / "remote.git", env)
    a = make_repo(tmp_path / "a", env=env)
    git("remote", "add", "origin", str(remote), cwd=a, env=env)
    git("push", "-q", "origin", "main", cwd=a, env=env)
    ta = Team(a, env)
    ta.register("bob", "reviewer", "api")
    ta.api("sync_force")
    b = clone(remote, tmp_path / "b", env)
    tb = Team(b, env)
    tb.register("alice", "implementer", "auth")
    sent = tb.seed("alice", "written before the wait began", to=["bob"])
    tb.api("sync_force")
    # The message is now older than the wait's start point (one second of lookback), and
    # more than two seconds old when the sync brings it in: thrum counts a message as
    # arriving late (at the sync, not at its creation) only past that age. (Pulled in
    # sooner, it is missed: a product bug reported with this change.)
    wait_older_than(sent, 2.05)
    w = procs.wait(ta, "bob", "--timeout", "20s", "--json")
    # Either the wait's own look at the remote (no daemon: SPEC §7) or this sync pulls it
    # in, whichever comes first: it is new to this store either way.
    ta.t.ok("sync", "force")
    w.finish()
    assert w.code == 0, (w.out, w.err)
    assert [m["message_id"] for m in json.loads(w.out)["messages"]] == [sent["message_id"]]
    # its arrival is recorded: a rebuilt index does not forget it, nor make it new twice
    for p in (a / ".thrum" / "var").glob("index.db*"):
        p.unlink()
    r = ta.t("wait", "--after", "-30s", "--timeout", "0", name="bob")
    assert r.code == 1, r.describe()  # delivered already
    r = ta.t("wait", "--unread", "--timeout", "0", "--json", name="bob")
    assert [m["message_id"] for m in r.json["messages"]] == [sent["message_id"]]
