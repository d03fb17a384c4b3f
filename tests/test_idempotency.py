"""Idempotent sends (SPEC §16): `send`/`reply --idempotency-key KEY` (MCP
`idempotency_key`) store a message once per agent and key within 24 h, in one clone
(however many processes race), through the daemon and MCP, and across clones, which
converge on the smallest message id after a sync and after a rebuild."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from conftest import (MSG_ID_RE, THRUM_CMD, assert_alive, git, make_team, read_log,
                      sync_all, thrum, wait_older_than, wait_until)


@pytest.fixture
def team(modal_team):
    """Tests on one clone run twice: pure CLI and with a daemon (SPEC §1); the daemon
    must survive each test (checked by the fixture, and by the daemon tests themselves)."""
    return modal_team


@pytest.fixture
def one(tmp_path):
    """The standard team, pure CLI only (for tests whose daemon variant adds nothing)."""
    return make_team(tmp_path)


def creates(log: Path, author: str, key=None) -> list:
    """The message.create events of `author` in the log (with idempotency `key`)."""
    return [e for e in read_log(log / "messages" / f"{author}.jsonl")
            if e["type"] == "message.create"
            and (key is None or e.get("idempotency_key") == key)]


def log_bytes(log: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(log.rglob("*.jsonl"))}


def ids(doc) -> list:
    return [m["message_id"] for m in doc["messages"]]


# --------------------------------------------------------------------------- one clone

def test_a_second_send_with_the_key_stores_nothing_and_answers_the_first(team):
    t = team.t
    first = team.send("alice", "deploy 42 done", "--to", "bob", "--idempotency-key",
                      "deploy-42")
    assert first["duplicate"] is False and first["idempotency_key"] == "deploy-42"
    [ev] = creates(team.log, "alice")
    assert ev["message_id"] == first["message_id"] and ev["idempotency_key"] == "deploy-42"

    again = t.ok("send", "deploy 42 done", "--to", "bob", "--idempotency-key", "deploy-42",
                 name="alice")
    assert f"Already sent: {first['message_id']}" in again.out, again.describe()
    assert "same idempotency key; nothing stored again" in again.out, again.describe()
    assert "To: @bob" in again.out and not again.err, again.describe()

    doc = team.send("alice", "deploy 42 done", "--to", "bob", "--idempotency-key",
                    "deploy-42")
    assert doc["duplicate"] is True and doc["message_id"] == first["message_id"]
    assert doc["recipients"] == ["bob"] and doc["created_at"] == first["created_at"]
    assert doc["audiences"] == first["audiences"] and doc["warnings"] == []

    # Another body under the same key: still nothing stored, and a warning says so.
    r = t("send", "deploy 43 done", "--to", "bob,carol", "--idempotency-key", "deploy-42",
          "--json", name="alice")
    assert r.code == 0 and r.json["duplicate"] is True, r.describe()
    assert r.json["message_id"] == first["message_id"]
    assert "body and recipients differ" in r.err and first["message_id"] in r.err, \
        r.describe()

    assert len(creates(team.log, "alice")) == 1
    inbox = team.inbox("bob")
    assert ids(inbox) == [first["message_id"]] and inbox["total"] == 1
    assert team.inbox("carol")["total"] == 0
    sent = t.json("sent", name="alice")
    assert ids(sent) == [first["message_id"]] and sent["total"] == 1
    # A send without a key is never a duplicate.
    plain = team.send("alice", "deploy 42 done", "--to", "bob")
    assert plain["duplicate"] is False and plain["message_id"] != first["message_id"]


def test_keys_are_per_agent_and_shared_by_sends_and_replies(team):
    t = team.t
    a = team.send("alice", "from alice", "--to", "carol", "--idempotency-key", "k 1")
    b = team.send("bob", "from bob", "--to", "carol", "--idempotency-key", "k 1")
    assert not a["duplicate"] and not b["duplicate"] and a["message_id"] != b["message_id"]
    assert set(ids(team.inbox("carol"))) == {a["message_id"], b["message_id"]}

    # A reply of alice's with the key of her send answers the send (one key space).
    r = t("reply", b["message_id"], "a reply", "--idempotency-key", "k 1", "--json",
          name="alice")
    assert r.code == 0 and r.json["duplicate"] is True, r.describe()
    assert r.json["message_id"] == a["message_id"]
    assert "reply_to differ" in r.err, r.describe()
    assert len(creates(team.log, "alice")) == 1
    # ...and stored nothing at all, not even the parent's read mark.
    assert not (team.log / "receipts" / "alice.jsonl").exists()


def test_a_reply_with_a_key_is_stored_once(team):
    t = team.t
    parent = team.seed("alice", "review pls", to=["bob", "carol"])["message_id"]
    first = t.json("reply", parent, "on it", "--idempotency-key", "ack-1", name="bob")
    assert first["duplicate"] is False and first["reply_to"] == parent
    assert first["thread_id"] and sorted(first["recipients"]) == ["alice", "carol"]
    again = t.ok("reply", parent[:14], "on it", "--idempotency-key", "ack-1", name="bob")
    assert f"Already sent: {first['message_id']}" in again.out, again.describe()
    doc = t.json("reply", parent, "on it", "--idempotency-key", "ack-1", name="bob")
    assert doc["duplicate"] is True and doc["message_id"] == first["message_id"]
    assert doc["thread_id"] == first["thread_id"] and doc["reply_to"] == parent

    [ev] = creates(team.log, "bob")
    assert ev["idempotency_key"] == "ack-1" and ev["reply_to"] == parent
    assert ids(team.inbox("alice")) == [first["message_id"]]
    thread = t.json("inbox", "--thread", parent, name="carol")
    assert sorted(ids(thread)) == sorted([parent, first["message_id"]])
    got = team.get("alice", first["message_id"])
    assert got["idempotency_key"] == "ack-1" and got["duplicates"] == []


BAD_KEYS = {"empty": "", "129 characters": "k" * 129, "non-ASCII": "caf\u00e9",
            "a tab": "a\tb", "a newline": "a\nb", "DEL": "a\x7f", "an escape": "\x1b[31m"}


@pytest.mark.parametrize("key", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_bad_keys_are_usage_errors_that_store_nothing(one, key):
    team = one
    t = team.t
    parent = team.seed("alice", "hello", to=["bob"])["message_id"]
    before = log_bytes(team.log)
    r = t("send", "hi", "--to", "bob", "--idempotency-key", key, name="alice")
    assert r.code == 2 and len(r.error_lines) == 1, r.describe()
    assert "invalid idempotency key" in r.err and "printable ASCII" in r.err, r.describe()
    assert "Traceback" not in r.err
    r = t("reply", parent, "ok", "--idempotency-key", key, "--json", name="bob")
    assert r.code == 2 and r.json["error"]["exit_code"] == 2, r.describe()
    assert "invalid idempotency key" in r.json["error"]["message"]
    r = t("send", "--to", "bob", "--idempotency-key", key, "--stdin", input="hi\n",
          name="alice")
    assert r.code == 2, r.describe()
    assert log_bytes(team.log) == before


def test_keys_at_the_limits_are_accepted(one):
    team = one
    for key in ("k" * 128, " ", "-starts-with-a-dash", "~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}"):
        doc = team.send("alice", "x", "--to", "bob", "--idempotency-key", key)
        assert doc["duplicate"] is False and doc["idempotency_key"] == key
        again = team.send("alice", "x", "--to", "bob", "--idempotency-key", key)
        assert again["duplicate"] is True and again["message_id"] == doc["message_id"]
    assert len(creates(team.log, "alice")) == 4


def test_the_key_names_a_message_for_24_hours(team):
    """A key used more than 24 h ago names nothing any more: a send with it is stored,
    and then that newer message is the one the key names (rebuild included)."""
    old = thrum._UlidGen()(int((thrum.time.time() - 25 * 3600) * 1000))
    ev = thrum.make_event("message.create", "o_TEST", message_id="msg_" + old,
                          agent_id="alice", session_id=None,
                          body={"format": "markdown", "content": "yesterday"},
                          recipients=["bob"], audiences=[{"type": "agent", "value": "bob"}],
                          scopes=[], refs=[], idempotency_key="nightly")
    ev["timestamp"] = thrum.now_ts(thrum.time.time() - 25 * 3600)
    (team.log / "messages").mkdir(exist_ok=True)
    with open(team.log / "messages" / "alice.jsonl", "ab") as f:  # as a sync would
        f.write(thrum.encode_event(ev))
    new = team.send("alice", "today", "--to", "bob", "--idempotency-key", "nightly")
    assert new["duplicate"] is False and new["message_id"] != ev["message_id"]
    again = team.send("alice", "today", "--to", "bob", "--idempotency-key", "nightly")
    assert again["duplicate"] is True and again["message_id"] == new["message_id"]
    expect = sorted([ev["message_id"], new["message_id"]])
    assert sorted(ids(team.t.json("inbox", name="bob"))) == expect
    team.t.ok("rebuild")
    assert sorted(ids(team.t.json("inbox", name="bob"))) == expect
    assert len(creates(team.log, "alice", "nightly")) == 2


#: The flock syscall, by machine (for /proc/<pid>/task/<tid>/syscall).
_FLOCK = {"x86_64": "73", "aarch64": "32"}


def blocked_in_flock(pids) -> int:
    """How many threads of these processes wait in flock() right now."""
    n = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                call = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
            except OSError:
                continue
            n += bool(call) and call[0] == _FLOCK.get(os.uname().machine)
    return n


def test_concurrent_sends_with_one_key_store_one_message(team, procs):
    """Eight senders with one key at once. The test holds the lock every append takes on
    alice's log file, so a sender that looked for the key and found nothing stops right
    before its append; the lock goes only once all eight wait in flock(). Unless the look
    and the append are under one lock, every one of them stores the message."""
    n = 8
    team.seed("alice", "earlier", to=["bob"])  # (alice's log file exists)
    fd = os.open(team.log / "messages" / "alice.jsonl", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        ps = [procs.popen([*THRUM_CMD, "send", "the race", "--to", "bob",
                           "--idempotency-key", "race-1", "--json"], cwd=str(team.path),
                          env=dict(team.env, THRUM_NAME="alice"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) for _ in range(n)]
        pids = [p.pid for p in ps] + ([team.daemon.pid] if team.daemon else [])
        wait_until(lambda: blocked_in_flock(pids) >= n, 30,
                   f"{n} senders to wait for a lock")
    finally:
        os.close(fd)
    docs = []
    for p in ps:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        docs.append(json.loads(out))
    assert len({d["message_id"] for d in docs}) == 1, docs
    assert sorted(d["duplicate"] for d in docs) == [False] + [True] * (n - 1)
    assert len(creates(team.log, "alice", "race-1")) == 1
    assert [m["body"]["content"] for m in team.inbox("bob")["messages"]] == \
        ["the race", "earlier"]
    if team.daemon is not None:
        assert_alive(team.daemon)


def test_through_the_daemon(tmp_path, procs):
    """With a daemon, sends go through it (it writes the event); duplicates are answered
    the same way, the daemon stays up, and direct (no-daemon) sends agree with it."""
    team = make_team(tmp_path)
    d = procs.daemon(team.path, team.env)
    first = team.send("alice", "via daemon", "--to", "bob", "--idempotency-key", "d1")
    again = team.send("alice", "via daemon", "--to", "bob", "--idempotency-key", "d1")
    assert again["duplicate"] is True and again["message_id"] == first["message_id"]
    [ev] = creates(team.log, "alice")
    assert ev["origin"] == (team.path / ".thrum" / "origin").read_text().strip()
    # The same key in process (no daemon in the way) is the same key.
    assert team.api("send", {"content": "via daemon", "to": ["bob"],
                             "idempotency_key": "d1"}, name="alice")["message_id"] \
        == first["message_id"]
    r = team.t("send", "x", "--to", "bob", "--idempotency-key", "", name="alice")
    assert r.code == 2, r.describe()
    assert len(creates(team.log, "alice")) == 1
    assert_alive(d)


@pytest.mark.parametrize("mode", ["cli", "daemon"])
def test_a_keyed_send_whose_index_update_fails_is_safe_to_repeat(tmp_path, procs, mode):
    """The event reached the log, the index update failed: exit 1, "stored as msg_...,
    do not send it again", never "retry"; the hint says the same key is safe, and the
    same command then answers that message and stores nothing."""
    team = make_team(tmp_path)
    t = team.t
    t.ok("config", "set", "index.lock_wait", "500ms")
    d = procs.daemon(team.path, team.env) if mode == "daemon" else None
    db = sqlite3.connect(str(team.path / ".thrum" / "var" / "index.db"), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # another process holds the index's write lock
        r = t("send", "release 7", "--to", "bob", "--idempotency-key", "rel-7", name="alice")
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert r.code == 1, r.describe()
    assert "stored as msg_" in r.err and "do not send it again" in r.err, r.describe()
    assert "retry" not in r.err.lower(), r.describe()
    assert "same idempotency key is safe" in r.err, r.describe()
    mid = MSG_ID_RE.search(r.err).group(0)
    doc = team.send("alice", "release 7", "--to", "bob", "--idempotency-key", "rel-7")
    assert doc["duplicate"] is True and doc["message_id"] == mid
    assert len(creates(team.log, "alice")) == 1
    assert ids(team.inbox("bob")) == [mid]
    if d is not None:
        assert_alive(d)


def test_a_sender_waiting_for_the_key_sees_a_message_stored_but_not_indexed(one, procs):
    """Two senders with one key: the first appends but cannot update the index (exit 1,
    stored); the second, which waited for the key meanwhile, reads the log before it
    looks, so it answers the stored message instead of storing a second one."""
    team, t = one, one.t
    t.ok("config", "set", "index.lock_wait", "2s")
    team.seed("alice", "earlier", to=["bob"])  # (alice's log file exists)
    db = sqlite3.connect(str(team.path / ".thrum" / "var" / "index.db"), isolation_level=None)
    fd = os.open(team.log / "messages" / "alice.jsonl", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # senders stop right before their append
        db.execute("BEGIN IMMEDIATE")  # ...and then cannot update the index
        ps = [procs.popen([*THRUM_CMD, "send", "once", "--to", "bob", "--idempotency-key",
                           "k", "--json"], cwd=str(team.path),
                          env=dict(team.env, THRUM_NAME="alice"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) for _ in range(2)]
        wait_until(lambda: blocked_in_flock([p.pid for p in ps]) >= 2, 30,
                   "both senders to wait for a lock")
        os.close(fd)
        fd = None
        first = wait_until(lambda: next((p for p in ps if p.poll() is not None), None), 30,
                           "the first sender to give up on the index")
    finally:
        if fd is not None:
            os.close(fd)
        db.execute("ROLLBACK")
        db.close()
    second = ps[1] if first is ps[0] else ps[0]
    out, err = first.communicate(timeout=30)
    assert first.returncode == 1 and b"do not send it again" in err, err.decode()
    mid = MSG_ID_RE.search(err.decode()).group(0)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["duplicate"] is True and doc["message_id"] == mid
    assert len(creates(team.log, "alice", "k")) == 1


# --------------------------------------------------------------------------- MCP

def sdk(team, name):
    env = {k: team.env[k] for k in ("PATH", "HOME", "XDG_CONFIG_HOME", "LC_ALL", "TZ")
           if k in team.env}
    params = StdioServerParameters(command=THRUM_CMD[0], args=[*THRUM_CMD[1:], "mcp", "serve"],
                                   cwd=str(team.path), env=dict(env, THRUM_NAME=name))
    return Client(params)


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def test_mcp_send_message_and_reply_message_take_the_key(team):
    out = {}

    async def main():
        async with sdk(team, "alice") as alice, sdk(team, "bob") as bob:
            tools = {t.name: t for t in (await alice.list_tools()).tools}
            out["schemas"] = [tools[n].input_schema["properties"]["idempotency_key"]["type"]
                              for n in ("send_message", "reply_message")]
            args = {"to": "@bob", "content": "build 9 green", "idempotency_key": "ci-9"}
            out["sent"] = await alice.call_tool("send_message", args)
            out["again"] = await alice.call_tool("send_message", args)
            mid = out["sent"].structured_content["message_id"]
            reply = {"message_id": mid, "content": "thanks", "idempotency_key": "ty-9"}
            out["reply"] = await bob.call_tool("reply_message", reply)
            out["reply_again"] = await bob.call_tool("reply_message", reply)
            out["bad"] = await alice.call_tool("send_message", dict(args, idempotency_key=""))
            out["bad_reply"] = await bob.call_tool("reply_message",
                                                   dict(reply, idempotency_key="x" * 129))
    anyio.run(main)

    assert out["schemas"] == ["string", "string"]
    sent, again = out["sent"].structured_content, out["again"].structured_content
    assert not out["again"].is_error and sent["duplicate"] is False
    assert again["duplicate"] is True and again["message_id"] == sent["message_id"]
    assert "Already sent: " + sent["message_id"] in text(out["again"])
    rep, rep2 = out["reply"].structured_content, out["reply_again"].structured_content
    assert rep["duplicate"] is False and rep["reply_to"] == sent["message_id"]
    assert rep2["duplicate"] is True and rep2["message_id"] == rep["message_id"]
    for bad in (out["bad"], out["bad_reply"]):
        assert bad.is_error and "invalid idempotency key" in text(bad), text(bad)
    assert len(creates(team.log, "alice")) == 1 and len(creates(team.log, "bob")) == 1
    assert ids(team.inbox("alice")) == [rep["message_id"]]


# --------------------------------------------------------------------------- two clones

def views(c, loser, winner) -> dict:
    """What every reader of clone `c` sees of the message with two copies."""
    bob = c.json("inbox", "--limit", "100", name="bob")
    carol_unread = c.json("inbox", "--unread", name="carol")
    every = c.json("inbox", "--all", "--limit", "100", name="alice")  # (marks nothing:
    sent = c.json("sent", name="alice")        # alice is not a recipient)
    got = c.json("message", "get", loser, name="alice")
    waited = c.run("wait", "--unread", "--timeout", "0", "--json", name="carol")
    team = {m["agent_id"]: (m["total"], m["unread"])
            for m in c.json("team", "--all", name="carol")["members"]}
    human = c.ok("message", "get", loser[:16], name="alice").out
    return {"bob": ids(bob), "bob_read": [m["is_read"] for m in bob["messages"]],
            "carol_unread": (ids(carol_unread), carol_unread["total"]),
            "all": ids(every), "sent": (ids(sent), sent["total"]),
            "get": (got["message"]["message_id"], got.get("requested_id"),
                    got["message"]["duplicates"], got["message"]["idempotency_key"]),
            "human_note": f"{loser} is a hidden duplicate of {winner}" in human,
            "wait": (waited.code, [m["message_id"] for m in waited.json["messages"]]),
            "team": (team["bob"], team["carol"]),
            "status": c.json("status", name="carol")["inbox"]}


def index_matches_log(c) -> bool:
    """doctor's comparison of the live index with a projection of the whole log."""
    checks = {x["name"]: x for x in c.run("doctor", "--json").json["checks"]}
    assert checks["index"]["ok"], checks["index"]
    return checks["index"]["detail"] == "matches the log"


def two_clones(net):
    """Clones A and B of one remote; alice, bob, carol and dave registered in A, known to
    B, which has no identities of its own (so THRUM_NAME picks those registered from A's
    worktree, as helper processes do)."""
    a = net.clone("A")
    a.register("alice", "implementer", "auth")
    a.register("bob", "reviewer", "api")
    a.register("carol", "reviewer", "db")
    a.register("dave", "observer", "ops")  # reads with --all, marking nothing of theirs
    a.synced()
    b = net.clone("B")
    b.api("init")  # (adopts the registrations)
    return a, b


def test_two_clones_that_both_stored_a_key_converge_on_the_smallest_id(net):
    """alice sends with one key in clone A and, before any sync, in clone B; bob reads
    B's copy. After syncing, both clones show only the smaller id everywhere (inboxes,
    --all, sent, counts, wait, team), read by bob; the other id stands for it; a
    rebuild agrees, and both copies stay in the log."""
    a, b = two_clones(net)
    key = ["--to", "bob,carol", "--idempotency-key", "deploy-2026-11-24"]
    in_a = a.send("alice", "deployed v42", *key)
    in_b = b.send("alice", "deployed v42", *key)
    assert not in_a["duplicate"] and not in_b["duplicate"]
    assert in_a["message_id"] != in_b["message_id"]
    winner, loser = sorted([in_a["message_id"], in_b["message_id"]])
    assert b.json("inbox", name="bob")["messages"][0]["message_id"] == in_b["message_id"]

    wait_older_than(in_b, 2.5)  # so each copy reaches the other clone late (SPEC §7)
    before_sync = thrum.now_ts()
    a.sync()
    b.sync()
    a.sync()
    for c in (a, b):  # B's copy reached carol's inbox before the sync: the message is
        # not new to B when the smaller id arrives (a listener hears of it once)
        r = c.run("wait", "--after", before_sync, "--timeout", "0", "--json", name="carol")
        assert r.code == 1 and r.json == {"status": "timeout", "messages": []}, r.describe()
    expected = {
        "bob": [winner], "bob_read": [True], "carol_unread": ([winner], 1),
        "all": [winner], "sent": ([winner], 1),
        "get": (winner, loser, [loser], "deploy-2026-11-24"), "human_note": True,
        "wait": (0, [winner]), "team": ((1, 0), (1, 1)), "status": {"total": 1, "unread": 1}}
    for c in (a, b):
        assert views(c, loser, winner) == expected, c
        assert len(creates(c.log, "alice", "deploy-2026-11-24")) == 2  # the log keeps both
        again = c.send("alice", "deployed v42", *key)
        assert again["duplicate"] is True and again["message_id"] == winner
        assert index_matches_log(c)
    for c in (a, b):
        c.ok("rebuild")
        assert views(c, loser, winner) == expected, c
    # The other id stands for the message everyone sees, in every command.
    assert a.json("message", "read", loser, name="carol") == \
        {"marked_count": 1, "message_ids": [winner]}
    assert a.json("reply", loser, "thanks", name="bob")["reply_to"] == winner


def test_two_clones_that_both_stored_a_keyed_reply_converge_on_one_thread(net):
    """bob answers alice's message with one key in both clones before a sync; each
    reply starts a thread of its own. After the sync both clones show one reply, and the
    parent and that reply share its thread; a rebuild agrees."""
    a, b = two_clones(net)
    parent = a.seed("alice", "which port?", to=["bob", "carol"])["message_id"]
    a.synced()
    b.synced()
    in_a = a.json("reply", parent, "8080", "--idempotency-key", "port-answer", name="bob")
    in_b = b.json("reply", parent, "8080", "--idempotency-key", "port-answer", name="bob")
    assert in_a["thread_id"] != in_b["thread_id"]
    winner = min([in_a, in_b], key=lambda r: r["message_id"])
    loser = max([in_a, in_b], key=lambda r: r["message_id"])
    sync_all(a, b)

    def thread_view(c):
        alice = c.json("inbox", "--unread", name="alice")
        thread = c.json("inbox", "--all", "--thread", parent, name="dave")
        return {"alice": ids(alice), "carol": c.json("inbox", "--unread", name="carol")["total"],
                "parent": c.json("message", "get", parent, name="bob")["message"]["thread_id"],
                "thread": sorted(ids(thread)),
                "thread_of_other_id": c.json("inbox", "--thread", loser["message_id"],
                                             "--all", name="dave")["total"]}
    expected = {"alice": [winner["message_id"]], "carol": 2, "parent": winner["thread_id"],
                "thread": sorted([parent, winner["message_id"]]), "thread_of_other_id": 2}
    for c in (a, b):
        assert thread_view(c) == expected, c
        assert index_matches_log(c)
        c.ok("rebuild")
        assert thread_view(c) == expected, c


def test_a_retry_with_autosync_pushes_what_the_first_attempt_could_not(net):
    """A CI job sends with THRUM_AUTOSYNC=1 and a key; the push fails (exit 1, the
    message stored locally). The job's retry stores nothing, pushes, and exits 0."""
    ci = net.clone("ci")
    ci.register("ci", "pipeline", "build")
    ci.register("alice", "implementer", "auth")
    ci.synced()
    auto = {"THRUM_NAME": "ci", "THRUM_AUTOSYNC": "1"}
    args = ["send", "build 77 passed", "--to", "alice", "--idempotency-key", "build-77",
            "--json"]
    ci.git("remote", "set-url", "origin", "/nonexistent/remote")
    r = ci.run(*args, extra_env=auto)
    assert r.code == 1 and "THRUM_AUTOSYNC failed" in r.err, r.describe()
    mid = r.json["message_id"]
    ci.git("remote", "set-url", "origin", str(net.remote))
    r = ci.run(*args, extra_env=auto)
    assert r.code == 0 and r.json["duplicate"] is True and r.json["message_id"] == mid, \
        r.describe()
    on_remote = git("show", "a-sync:messages/ci.jsonl", cwd=net.remote, env=net.env)
    assert on_remote.count(mid) == 1


# --------------------------------------------------------------------------- the projection

def _projection(batches) -> dict:
    """Project `batches` of events, one transaction each (as catch-ups read chunks), into
    a fresh in-memory index; the rows every reader's answer comes from (arrived_at, a
    local stamp, aside)."""
    idx = thrum.Index(":memory:", None)
    idx.db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        idx.db.executescript(thrum._SCHEMA)
        for batch in batches:
            idx.db.execute("BEGIN")
            idx.apply(batch)
            idx.db.execute("COMMIT")
        # A parent takes its thread from a reply everyone sees, never from a hidden copy.
        assert idx.db.execute(
            "SELECT p.message_id FROM messages p WHERE p.thread0 IS NULL AND p.thread_id IS "
            "NOT NULL AND NOT EXISTS (SELECT 1 FROM messages r WHERE r.reply_to = "
            "p.message_id AND r.thread0 = p.thread_id AND r.dup_of IS NULL)").fetchall() == []
        return {
            "messages": idx.db.execute("SELECT message_id, dup_of, thread_id, deleted FROM "
                                       "messages ORDER BY 1").fetchall(),
            "deliveries": idx.db.execute(
                "SELECT d.agent_id, m.message_id, d.read_at, d.deleted FROM deliveries d "
                "JOIN messages m ON m.rid = d.rid ORDER BY 1, 2").fetchall()}
    finally:
        idx.db.close()


def test_duplicates_do_not_depend_on_the_order_events_arrive_in():
    """Keyed messages of two agents over three days (windows that close and reopen, ids
    from clocks that are off), replies, receipts of copies (some before their message), a
    delete: projected in one batch, or shuffled into small batches with events repeated,
    the rows are the same."""
    import random
    rnd = random.Random(16)
    hour, t0 = 3600.0, 1_790_000_000.0
    events, creates = [], []

    def gen(ms):  # (a generator of its own for each id: never held monotonic)
        return thrum._UlidGen()(ms)

    def ev(etype, at, **fields):
        e = thrum.make_event(etype, "o_T", **fields)
        e["timestamp"] = thrum.now_ts(at)
        events.append(e)
        return e
    for author in ("alice", "bob"):
        for key in ("nightly", "deploy"):
            for h in sorted(rnd.sample([0, 0.5, 1, 20, 23.9, 24.5, 26, 47, 49, 60], 7)):
                at = t0 + h * hour + rnd.random()
                parent = rnd.choice(creates)["message_id"] if creates and \
                    rnd.random() < 0.3 else None
                skew = rnd.choice([0, 0, 0, -30 * hour, 30 * hour])  # a clock that is off
                fields = dict(message_id="msg_" + gen(int((at + skew) * 1000)), agent_id=author,
                              session_id=None, body={"format": "markdown", "content": key},
                              recipients=["carol", "dave"],
                              audiences=[{"type": "agent", "value": "carol"}],
                              scopes=[], refs=[], idempotency_key=key)
                if parent:
                    fields.update(reply_to=parent, thread_id="thr_" + gen(int(at * 1000)))
                creates.append(ev("message.create", at, **fields))
    for c in creates:
        for reader in ("carol", "dave"):
            if rnd.random() < 0.4:
                ev("message.receipt", t0 + rnd.random() * 80 * hour,
                   message_id=c["message_id"], agent_id=reader)
    gone = rnd.choice(creates)
    ev("message.delete", t0 + 90 * hour, message_id=gone["message_id"],
       agent_id=gone["agent_id"])

    whole = _projection([events])
    dups = [m for m in whole["messages"] if m[1]]
    assert 4 <= len(dups) < len(creates) - 4, whole["messages"]  # the windows matter
    hidden = {m[0] for m in dups}
    assert all(d[3] == 1 for d in whole["deliveries"] if d[1] in hidden)
    for _ in range(25):
        shuffled = events + rnd.sample(events, len(events) // 4)  # some read twice
        rnd.shuffle(shuffled)
        cuts = sorted(rnd.sample(range(1, len(shuffled)), rnd.randint(1, 12)))
        batches = [shuffled[i:j] for i, j in zip([0] + cuts, cuts + [len(shuffled)])]
        assert _projection(batches) == whole

    # A kept message loses its copy to one that arrives later: W at 0 h, its copy D at
    # 10 h (read by carol); then X, stamped 30 h but with an id from a clock 25 h behind
    # (so W < X < D), is kept and D becomes X's copy: W is read by nobody again.
    events.clear()
    w, d, x = [ev("message.create", t0 + h * hour, message_id="msg_" + gen(int(
        (t0 + (h if h < 30 else 5) * hour) * 1000)), agent_id="erin", session_id=None,
        body={"format": "markdown", "content": "x"}, recipients=["carol"], audiences=[],
        scopes=[], refs=[], idempotency_key="skew") for h in (0, 10, 30)]
    assert w["message_id"] < x["message_id"] < d["message_id"]
    read = ev("message.receipt", t0 + 11 * hour, message_id=d["message_id"], agent_id="carol")
    whole = _projection([events])
    assert [m[:2] for m in whole["messages"] if m[0] in (w["message_id"], d["message_id"],
            x["message_id"])] == [(w["message_id"], None), (x["message_id"], None),
                                  (d["message_id"], x["message_id"])]
    assert _projection([[w, d, read], [x]]) == whole
