"""Delivery you can count on (SPEC §7, §11): gap-proof lookback waits, claimed only when
handed over, "new" by arrival in this store whatever the sender's clock, and waits that
hear other clones with no daemon anywhere. Both modes wherever the behaviour applies."""

from __future__ import annotations

import json
import random
import shlex
import shutil
import subprocess
import time

import pytest

from conftest import (THRUM_CMD, blocked, git, pid_alive, run_thrum, wait_older_than,
                      wait_until)


@pytest.fixture
def team(modal_team):
    return modal_team


def blocks(team, w, n=1):
    blocked(w, team.path, team.daemon is not None, n)


def waited(r):
    """The message ids a `wait --json` result returned."""
    assert r.code in (0, 1), r.describe()
    return [m["message_id"] for m in r.json["messages"]]


def lookback(team, who, after="-500ms", timeout="3s"):
    return waited(team.t("wait", "--after", after, "--timeout", timeout, "--json", name=who))


# --------------------------------------------------------------------------- gap-proof

@pytest.mark.parametrize("ended", ["result", "timeout", "kill"])
def test_a_lookback_wait_reaches_back_over_a_gap_longer_than_its_after(team, procs, ended):
    """The listener loop with `--after -500ms` (the seed's -15s, scaled down): whatever
    ended the previous wait, a message sent in a gap longer than the lookback is
    returned by the next wait, once."""
    first = team.seed("alice", "before", to=["bob"])
    if ended == "result":
        assert lookback(team, "bob", after="-1m") == [first["message_id"]]
    elif ended == "timeout":
        team.api("message_read", {"all": True}, name="bob")
        wait_older_than(first, 0.7)
        assert lookback(team, "bob", timeout="0") == []  # ended by its timeout
    else:
        assert lookback(team, "bob", after="-1m") == [first["message_id"]]
        w = procs.thrum(team.path, team.env, "wait", "--after", "-500ms", "--timeout", "30s",
                        name="bob")
        blocks(team, w)
        procs.kill9(w.p.pid)
    sent = team.seed("alice", "in the gap", to=["bob"])
    wait_older_than(sent, 1.2)  # longer ago than the wait's own --after -500ms
    assert lookback(team, "bob") == [sent["message_id"]]
    assert lookback(team, "bob", timeout="0") == []  # exactly once


def test_a_wait_without_after_still_starts_now(team):
    team.api("message_read", {"all": True}, name="bob")
    assert lookback(team, "bob", timeout="0") == []
    sent = team.seed("alice", "old news", to=["bob"])
    wait_older_than(sent, 1.2)
    r = team.t("wait", "--timeout", "0", "--json", name="bob")
    assert waited(r) == []


def test_a_lookback_leaves_out_what_was_read_in_the_gap(team):
    assert lookback(team, "bob", timeout="0") == []
    read = team.seed("alice", "read meanwhile", to=["bob"])
    unread = team.seed("alice", "not read", to=["bob"])
    team.api("message_read", {"message_ids": [read["message_id"]]}, name="bob")
    wait_older_than(unread, 1.2)
    assert lookback(team, "bob") == [unread["message_id"]]


# --------------------------------------------------------------------------- hand-over

def test_a_wait_whose_stdout_is_closed_claims_nothing(team):
    sent = team.seed("alice", "for a closed stdout", to=["bob"])
    env = dict(team.env, THRUM_NAME="bob")
    cmd = " ".join(map(shlex.quote, THRUM_CMD))
    p = subprocess.run(["bash", "-c", cmd + " wait --after -1m --timeout 10s >&-"],
                       cwd=team.path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "cannot write the output" in p.stderr, p.stderr
    assert lookback(team, "bob", after="-1m") == [sent["message_id"]]


def test_a_wait_into_a_broken_pipe_claims_nothing(team):
    sent = team.seed("alice", "for a pipe that closed", to=["bob"])
    env = dict(team.env, THRUM_NAME="bob")
    cmd = " ".join(map(shlex.quote, THRUM_CMD))
    # the reader is gone before thrum writes: EPIPE
    p = subprocess.run(["bash", "-c", cmd + " wait --after -1m --timeout 10s"
                        " | (exec 0<&-; exec true)"], cwd=team.path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert lookback(team, "bob", after="-1m") == [sent["message_id"]]


def test_mcp_waits_cancelled_around_sends_deliver_every_message_once(team, procs):
    """Cancel a wait_for_message at random moments just before, at and after a send:
    each message is returned by exactly one wait (the cancelled ones claim nothing)."""
    s = procs.mcp(team.path, dict(team.env, THRUM_NAME="bob"))
    s.initialize()
    rng = random.Random(7)
    sent, got, rids = [], [], []
    for i in range(12):  # (the sleeps place the send and the cancel; they sync nothing)
        rid = s.send("tools/call", {"name": "wait_for_message", "arguments": {"timeout": 5}})
        rids.append(rid)
        time.sleep(rng.uniform(0, 0.05))  # the moment of the send, relative to the call
        sent.append(team.seed("alice", "m%d" % i, to=["bob"])["message_id"])
        time.sleep(rng.choice([0, 0.001, 0.005, 0.02, 0.1]))
        s.notify("notifications/cancelled", {"requestId": rid})
    while True:  # the final sweep, through the same front end
        r = s.call("wait_for_message", {"timeout": 1})
        ids = [m["message_id"] for m in r["structuredContent"]["messages"]]
        if not ids:
            break
        got += ids
    for rid in rids:  # what the cancelled calls answered before their cancel came
        r = s.replies.get(json.dumps(rid))
        if r is not None:
            got += [m["message_id"] for m in r["result"]["structuredContent"]["messages"]]
    assert sorted(got) == sorted(sent), "lost or doubled: %s" % (
        set(sent) ^ set(got) or [g for g in got if got.count(g) > 1])
    s.close()


# --------------------------------------------------------------------------- clocks

faketime = pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime")


def send_from_the_past(team, body):
    env = dict(team.env, THRUM_NAME="alice")
    p = subprocess.run(["faketime", "-f", "-1h", *THRUM_CMD, "send", body, "--to", "@bob",
                        "--json"], cwd=team.path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    if team.daemon is None:  # (through a daemon, the daemon's clock stamps it)
        assert doc["created_at"] < time.strftime("%Y-%m-%dT%H:%M",
                                                 time.gmtime(time.time() - 3000))
    return doc["message_id"]


@faketime
def test_a_sender_an_hour_behind_wakes_a_blocked_wait(team, procs):
    w = procs.wait(team, "bob", "--timeout", "20s", "--json")
    blocks(team, w)
    mid = send_from_the_past(team, "from the past")
    w.finish()
    assert w.code == 0 and [m["message_id"] for m in json.loads(w.out)["messages"]] == [mid]


@faketime
def test_a_sender_an_hour_behind_is_new_for_a_lookback_and_the_hooks(team):
    mid = send_from_the_past(team, "late by the clock")
    r = run_thrum(["hook", "stop", "--agent", "bob"], team.path, team.env,
                  input=json.dumps({"cwd": str(team.path), "hook_event_name": "Stop",
                                    "stop_hook_active": False}))
    assert r.code == 0 and '"decision": "block"' in r.out, r.describe()
    assert "1 new message from @alice" in r.out, r.describe()
    mid2 = send_from_the_past(team, "late again")
    assert lookback(team, "bob", after="-15s") == [mid2]


# --------------------------------------------------------------------------- across clones

def test_a_blocked_wait_hears_another_clone_with_no_daemon(net, procs):
    a, b = net.clone("a"), net.clone("b")
    a.register("alice", "lead", "core")
    a.synced()
    b.register("bob", "reviewer", "api")
    b.synced()
    a.synced()
    env = dict(b.env, THRUM_SYNC_WAIT_INTERVAL="1s")
    w = procs.thrum(b.path, env, "wait", "--timeout", "30s", "--json", name="bob")
    blocked(w, b.path, False)
    sent = a.send("alice", "across the remote", "--to", "@bob",
                  extra_env={"THRUM_AUTOSYNC": "1"})
    w.finish(timeout=40)
    assert w.code == 0, w.err
    assert [m["message_id"] for m in json.loads(w.out)["messages"]] == [sent["message_id"]]
    assert w.elapsed < 25


def test_a_hanging_remote_does_not_stretch_a_wait(tmp_path, env):
    from conftest import make_repo
    repo = make_repo(tmp_path / "r", env=env)
    r = run_thrum(["quickstart", "--name", "bob", "--role", "r", "--module", "m"], repo, env)
    assert r.code == 0, r.describe()
    git("remote", "add", "origin", "ext::sleep 1000", cwd=repo, env=env)  # it never answers
    git("config", "protocol.ext.allow", "always", cwd=repo, env=env)
    t0 = time.monotonic()
    r = run_thrum(["wait", "--timeout", "3s"], repo, env, timeout=30)
    took = time.monotonic() - t0
    assert r.code == 1 and r.out.strip() == "NO_MESSAGES_TIMEOUT", r.describe()
    assert took < 8, "a 3 s wait took %.1f s" % took
    assert len([ln for ln in r.err.splitlines() if ln.startswith("thrum: ")]) <= 1
    leftover = subprocess.run(["pgrep", "-f", "sleep 1000"], capture_output=True, text=True)
    assert not [p for p in leftover.stdout.split() if pid_alive(int(p))]


def test_an_mcp_wait_the_client_gave_up_on_claims_nothing(team, procs):
    """A client that cut a wait at its own timeout without a cancel (as some do) and
    calls again: the new wait gets the message, the abandoned one never answers."""
    s = procs.mcp(team.path, dict(team.env, THRUM_NAME="bob",
                                  THRUM_MCP_PROGRESS_INTERVAL="0.2"))
    s.initialize()
    old = s.send("tools/call", {"name": "wait_for_message", "arguments": {"timeout": 60}})
    if team.daemon:  # (the server reads calls in order: the first is in flight anyway)
        from conftest import waiting
        wait_until(lambda: waiting(team.path) == 1, 20, "the first wait in the daemon")
    new = s.send("tools/call", {"name": "wait_for_message", "arguments": {"timeout": 20},
                                "_meta": {"progressToken": "new"}})
    # the server has read the new call (its progress comes) before the message is sent:
    # a message that came first would rightly go to the old call, as nothing said it ended
    wait_until(lambda: [n for n in s.notes_of("notifications/progress")
                        if n["params"]["progressToken"] == "new"], 20, "the new call's progress")
    sent = team.seed("alice", "for the live wait", to=["bob"])
    got = s.reply(new)["result"]["structuredContent"]
    assert [m["message_id"] for m in got["messages"]] == [sent["message_id"]]
    assert json.dumps(old) not in s.replies
    s.close()
