"""`thrum purge` and retention (SPEC §17): preview and confirm, threads kept whole, bad
horizons, a purge that syncs (every clone drops the same messages and the files that held
nothing else, a rebuild and a stale clone bring nothing back), the daemon's way in and
`retention.days`.

Old messages are written straight into the log the way `thrum send` writes them (the
event shape of bench/benchlib.py write_messages), with past timestamps and ULIDs whose
time matches, and the index catches up at the next command.
"""

from __future__ import annotations

import json
import time

from conftest import (assert_alive, assert_error, git, log_dir, make_team, read_log,
                      thrum, var_dir, wait_until)

DAY = 86400.0


def write_old(repo, author, to, n, days):
    """n message.create events `author` -> `to`, `days` old (ULID times match). Returns
    their ids."""
    origin = (repo / ".thrum" / "origin").read_text().strip()
    gen = thrum._UlidGen()  # (one per call: ULIDs are monotonic within a generator)
    t0 = time.time() - days * DAY
    ids, lines = [], []
    for i in range(n):
        t = t0 + i
        ms = int(t * 1000)
        mid = "msg_" + gen(ms)
        ids.append(mid)
        lines.append(json.dumps({
            "v": 1, "event_id": "evt_" + gen(ms), "type": "message.create",
            "timestamp": thrum.now_ts(t), "origin": origin, "message_id": mid,
            "agent_id": author, "session_id": None,
            "body": {"format": "markdown", "content": "old %s %d" % (author, i)},
            "recipients": [to], "audiences": [{"type": "agent", "value": to}],
            "scopes": [], "refs": []}, separators=(",", ":")))
    path = log_dir(repo) / "messages" / (author + ".jsonl")
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    return ids


def contents(c, who):
    return sorted(m["body"]["content"] for m in c.json("inbox", "--all", name=who)["messages"])


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.jsonl")}


def tip_files(c, ref="refs/remotes/origin/a-sync"):
    return set(c.git("ls-tree", "-r", "--name-only", ref).split())


def test_preview_then_confirm_keeps_threads_whole_and_rebuild_agrees(tmp_path):
    team = make_team(tmp_path)
    t = team.t
    a = write_old(team.path, "alice", "bob", 3, 5)
    write_old(team.path, "carol", "bob", 2, 5)
    t.json("inbox", name="bob")  # bob reads them all: 5 receipts of old messages
    t.json("reply", a[0], "a new reply", name="bob")  # keeps a[0]'s thread whole
    t.json("send", "fresh", "--to", "bob", name="alice")
    t.ok("sync", "force", name="bob")  # (no remote: a local commit holds every file)
    before = snapshot(team.log)

    doc = t.json("purge", "--before", "2d", name="bob")
    assert doc["confirmed"] is False and doc["files_removed"] == []
    assert doc["agents"] == [{"agent": "alice", "messages": 2, "receipts": 0},
                             {"agent": "bob", "messages": 0, "receipts": 4},
                             {"agent": "carol", "messages": 2, "receipts": 0}]
    assert (doc["messages"], doc["receipts"], doc["threads_kept"]) == (4, 4, 1)
    human = t.ok("purge", "--before", "2d", name="bob").out
    assert "@carol: 2 messages, 0 receipts" in human and "--confirm" in human
    assert snapshot(team.log) == before  # a preview changes nothing

    done = t.json("purge", "--before", "2d", "--confirm", name="bob")
    assert done["confirmed"] is True and done["by"] == "bob"
    assert (done["messages"], done["receipts"], done["threads_kept"]) == (4, 4, 1)
    assert done["files_removed"] == ["messages/carol.jsonl"]
    assert not (team.log / "messages" / "carol.jsonl").exists()
    purge = [e for e in read_log(team.log / "agents" / "bob.jsonl") if e["type"] == "log.purge"]
    assert len(purge) == 1 and purge[0]["keep"] == [a[0]] and purge[0]["by"] == "bob"
    kept = ["a new reply", "fresh", "old alice 0"]
    assert contents(t, "bob") == kept
    assert_error(t("message", "get", a[1], name="bob"), 4)
    assert t.json("purge", "--before", "2d", name="bob")["messages"] == 0
    assert "index: matches the log" in t.ok("doctor", name="bob").out  # and nothing "lost"
    t.ok("sync", "force", name="bob")
    tree = git("ls-tree", "-r", "--name-only", "a-sync", cwd=team.path, env=team.env).split()
    assert "messages/alice.jsonl" in tree and "messages/carol.jsonl" not in tree
    t.ok("rebuild", name="bob")
    assert contents(t, "bob") == kept
    for f in var_dir(team.path).glob("index.db*"):
        f.unlink()
    assert contents(t, "bob") == kept
    # carol writes again: a new file of the old name is read from its start
    t.json("send", "back", "--to", "bob", name="carol")
    assert contents(t, "bob") == sorted(kept + ["back"])


def test_bad_horizons_store_nothing(team):
    t = team.t
    write_old(team.path, "alice", "bob", 1, 5)
    t.json("inbox", name="bob")
    before = snapshot(team.log)
    for bad, said in (("2999-01-01", "in the future"), ("tomorrow", "invalid horizon"),
                      ("", "invalid horizon"), ("30", "invalid horizon"),
                      ("2026-13-01", "invalid horizon"), ("0d", "more than 0"),
                      ("9999-12-31T23:59:59.000000Z", "in the future")):
        r = t("purge", "--before", bad, "--confirm", name="bob")
        assert_error(r, 2, said)
        assert len(r.err.strip().splitlines()) <= 2, r.describe()  # the error (+ a hint)
    assert_error(t("purge", name="bob"), 2, "--before")
    assert snapshot(team.log) == before
    # a full timestamp and a date are horizons too
    assert t.json("purge", "--before", thrum.now_ts(time.time() - DAY),
                  name="bob")["messages"] == 1
    assert t.json("purge", "--before", "2000-01-01", name="bob")["messages"] == 0


def test_purge_syncs_and_no_clone_brings_it_back(net):
    a, b, s = net.clone("A"), net.clone("B"), net.clone("S")
    a.register("alice", "implementer", "auth")
    a.register("carol", "reviewer", "db")
    b.register("bob", "reviewer", "api")
    s.register("dave", "tester", "ci")
    a.synced()
    b.synced()
    old = write_old(a.path, "alice", "bob", 2, 5)
    write_old(a.path, "carol", "bob", 2, 5)
    a.synced()
    b.synced()
    b.json("reply", old[0], "still discussing", name="bob")
    b.synced()
    a.synced()
    s.synced()  # S holds the old lines, then writes nothing
    saved = (s.log / "messages" / "carol.jsonl").read_bytes()
    kept = ["old alice 0", "still discussing"]

    done = a.json("purge", "--before", "1d", "--confirm", name="alice")
    assert (done["messages"], done["threads_kept"], done["pushed"]) == (3, 1, True)
    assert done["files_removed"] == ["messages/carol.jsonl"]
    assert "messages/carol.jsonl" not in tip_files(a)

    b.sync()
    assert contents(b, "bob") == kept
    assert not (b.log / "messages" / "carol.jsonl").exists()
    s.sync()  # the stale clone
    assert not (s.log / "messages" / "carol.jsonl").exists()
    assert contents(s, "dave") == kept
    # a copy of the old file put back into a worktree (a restored backup) comes back nowhere
    (b.log / "messages" / "carol.jsonl").write_bytes(saved)
    assert contents(b, "bob") == kept
    b.sync()
    a.sync()
    assert not (b.log / "messages" / "carol.jsonl").exists()
    for c in (a, b, s):
        assert "messages/carol.jsonl" not in tip_files(c, "refs/heads/a-sync") | tip_files(c)
    assert contents(a, "alice") == kept
    # a fresh clone after it all, and a rebuild, agree
    f = net.clone("F")
    f.register("erin", "tester", "ci")
    assert contents(f, "erin") == kept
    f.ok("rebuild", name="erin")
    assert contents(f, "erin") == kept
    assert "index: matches the log" in b.ok("doctor", name="bob").out


def test_purge_through_the_daemon_and_retention_days(tmp_path, procs):
    team = make_team(tmp_path)
    t = team.t
    for bad in ("0", "-3", "two", "1.5"):
        assert_error(t("config", "set", "retention.days", bad), 2, "retention.days")
    write_old(team.path, "alice", "bob", 2, 5)
    write_old(team.path, "carol", "bob", 1, 10)
    t.json("send", "fresh", "--to", "bob", name="alice")
    d = procs.daemon(team.path, team.env)

    done = t.json("purge", "--before", "7d", "--confirm", name="bob")
    assert (done["messages"], done["files_removed"]) == (1, ["messages/carol.jsonl"])
    assert contents(t, "bob") == ["fresh", "old alice 0", "old alice 1"]

    assert t.json("config", "set", "retention.days", "3")["value"] == 3
    wait_until(lambda: contents(t, "bob") == ["fresh"], 30, "the daemon's daily purge")
    purges = [e for e in read_log(team.log / "agents" / "daemon.jsonl")
              if e["type"] == "log.purge"]
    assert len(purges) == 1 and purges[0]["by"] == "daemon"
    assert json.loads((var_dir(team.path) / "retention.json").read_text())["days"] == 3
    assert "index: matches the log" in t.ok("doctor", name="bob").out
    assert t("config", "get", "retention.days").out.strip() == "3"
    t.ok("config", "set", "retention.days", "none")
    assert t("config", "get", "retention.days").out.strip() == "none"
    assert_alive(d)


def test_a_purge_read_before_or_after_its_messages_leaves_the_same_rows(tmp_path):
    """The projection in process (the order of events is what is under test): threads,
    idempotency-key duplicates, edits, deletes and receipts, waiting or not, come out the
    same whether the purge is read first, last, in between or in one batch with them."""
    import random
    now = time.time()
    gen = thrum._UlidGen()
    events = []

    def ev(etype, t, **fields):
        e = {"v": 1, "event_id": "evt_" + gen(int(t * 1000)), "type": etype,
             "timestamp": thrum.now_ts(t), "origin": "o_test", **fields}
        events.append(e)
        return e

    def msg(author, to, t, **fields):
        mid = "msg_" + thrum._UlidGen()(int(t * 1000))
        ev("message.create", t, message_id=mid, agent_id=author, session_id=None,
           body={"format": "markdown", "content": mid}, recipients=[to],
           audiences=[{"type": "agent", "value": to}], scopes=[],
           refs=[{"type": "ref", "value": "x"}], **fields)
        return mid

    old, new, horizon = now - 5 * DAY, now - 3600, now - DAY
    m1 = msg("alice", "bob", old)
    m2 = msg("bob", "alice", old + 1, reply_to=m1, thread_id="thr_1")
    msg("alice", "bob", new, reply_to=m2, thread_id="thr_1")  # keeps thr_1 whole
    m4 = msg("alice", "bob", old + 2)
    msg("bob", "alice", old + 3, reply_to=m4, thread_id="thr_2")  # all old: goes
    m6 = msg("alice", "bob", old + 4)
    msg("bob", "alice", new + 1, reply_to=m6, thread_id="thr_3")  # the purger missed it
    m9 = msg("alice", "bob", old + 6)  # kept, but its only reply goes: no thread then
    msg("bob", "alice", old + 7, reply_to=m9, thread_id="thr_4")
    k1 = msg("alice", "bob", old + 5, idempotency_key="k")
    msg("alice", "bob", old + 3600, idempotency_key="k")
    k3 = msg("alice", "bob", horizon - 3600, idempotency_key="j")
    k4 = msg("alice", "bob", horizon + 3600, idempotency_key="j")  # a copy of k3, then not
    ev("message.edit", new, message_id=m4, agent_id="alice",
       body={"format": "markdown", "content": "edited"})
    ev("message.delete", new, message_id=m1, agent_id="alice")
    for mid in (m1, m4, k1, k3, k4):
        ev("message.receipt", new, message_id=mid, agent_id="bob")
    never = "msg_" + thrum._UlidGen()(int(old * 1000))  # a receipt whose create never came
    ev("message.receipt", new, message_id=never, agent_id="bob")
    purge = {"v": 1, "event_id": "evt_" + gen(), "type": "log.purge",
             "timestamp": thrum.now_ts(now), "origin": "o_test", "by": "carol",
             "before": thrum.now_ts(horizon), "keep": [m1, m2, m9]}

    def project(batches):
        idx = thrum.Index(str(tmp_path / "unused.db"), None)
        idx.db = thrum.sqlite3.connect(":memory:", isolation_level=None)
        idx.db.executescript(thrum._SCHEMA)
        idx.building = True  # (arrival = creation: the same in every run)
        for batch in batches:
            idx.apply(batch)
        out = {t: sorted(idx.db.execute("SELECT * FROM %s" % t).fetchall(), key=repr)
               for t in ("messages", "deliveries", "tags", "receipts", "edits", "deletes",
                         "purges")}
        out["by id"] = {r[0]: r[1:] for r in idx.db.execute(
            "SELECT message_id, thread_id, dup_of FROM messages")}
        out["read"] = {r[0] for r in idx.db.execute("SELECT message_id FROM receipts")}
        idx.db.close()
        return out

    want = project([[purge] + events])
    gone = set(project([events])["by id"]) - set(want["by id"])
    assert len(gone) == 7 and k4 not in gone and m1 not in gone and m6 in gone
    assert not want["read"] & (gone | {never})
    assert want["by id"][k4] == (None, None)  # k4 is no copy once k3 is gone
    assert want["by id"][m9] == (None, None)  # nor is m9 in a thread once its reply is
    rng = random.Random(20)
    for batches in ([events, [purge]], [[purge], events], [events[:9], [purge], events[9:]]):
        assert project(batches) == want
    for _ in range(3):
        shuffled = events + [purge]
        rng.shuffle(shuffled)
        assert project([[e] for e in shuffled]) == want
