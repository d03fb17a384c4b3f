"""Durability guarantees (SPEC §1, §3, §13, §14): concurrent writers, kill -9, index
rebuilds, corrupt and torn lines, the single file running alone."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import THRUM_PY, all_log_files, ids_in, make_env, make_repo, read_log, thrum


def all_ids(team, who="bob"):
    doc = team.t.json("inbox", "--all", "--unread", "--limit", "100", name=who)
    got = [m["message_id"] for m in doc["messages"]]
    for page in range(2, doc["total_pages"] + 1):
        more = team.t.json("inbox", "--all", "--unread", "--limit", "100", "--page", str(page),
                           name=who)
        got += [m["message_id"] for m in more["messages"]]
    return got, doc["total"]


def check_every_line(team):
    for f in all_log_files(team.log):
        read_log(f)  # strict: complete, parseable lines with the envelope


@pytest.mark.slow
def test_concurrent_writers(team):
    per, procs = 25, 8
    senders = ["alice", "carol"] * (procs // 2)

    def worker(i):
        out = []
        for j in range(per):
            r = team.t("send", f"w{i}-{j}", "--to", "bob", "--json", name=senders[i])
            assert r.code == 0, r.describe()
            out.append(r.json["message_id"])
        return out

    with ThreadPoolExecutor(procs) as pool:
        sent = [m for chunk in pool.map(worker, range(procs)) for m in chunk]
    assert len(set(sent)) == per * procs
    got, total = all_ids(team)
    assert total == per * procs
    assert len(got) == len(set(got)) == per * procs
    assert set(got) == set(sent)
    check_every_line(team)
    creates = [e for f in all_log_files(team.log) for e in read_log(f)
               if e["type"] == "message.create"]
    assert len(creates) == per * procs
    assert len({e["event_id"] for f in all_log_files(team.log) for e in read_log(f)}) == \
        sum(len(read_log(f)) for f in all_log_files(team.log))
    bob = team.t.json("inbox", "--unread", "--limit", "1", name="bob")
    assert bob["total"] == per * procs and bob["unread"] == per * procs


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_message(team, procs):
    """Sender loops are SIGKILLed (the loop and the thrum process in it) at random moments;
    every message id a sender printed must be present afterwards."""
    rng = random.Random(int(os.environ.get("THRUM_TEST_SEED", "0")) or None)
    loop = (f'i=0; while :; do i=$((i+1)); "{sys.executable}" "{THRUM_PY}" send "k$$-$i" '
            f'--to bob --json || true; done')
    acked = []
    for _round in range(4):
        loops = []
        for k in range(6):
            env = dict(team.env, THRUM_NAME="alice" if k % 2 else "carol")
            p = procs.popen(["bash", "-c", loop], group=True, cwd=str(team.path), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
            loops.append((p, rng.uniform(0.2, 1.5)))
        t0 = time.monotonic()
        for p, delay in sorted(loops, key=lambda x: x[1]):
            time.sleep(max(0.0, t0 + delay - time.monotonic()))
            os.killpg(p.pid, signal.SIGKILL)
        for p, _ in loops:
            out, err = p.communicate(timeout=30)
            acked += ids_in(out.decode("utf-8", "replace"))
            assert b"Traceback" not in err, err.decode()
    got, _total = all_ids(team)
    print(f"{len(acked)} acknowledged, {len(got)} stored")
    missing = set(acked) - set(got)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"
    # the store still works, and doctor can repair whatever a kill tore: a kill may or may
    # not have torn a line, so look first; doctor must then find exactly that (SPEC §14:
    # exit 1 when it found problems it did not fix, 0 when all is well)
    torn = [f.name for f in all_log_files(team.log)
            if f.read_bytes() and not f.read_bytes().endswith(b"\n")]
    r = team.t("doctor", name="alice")
    if torn:
        assert r.code == 1 and all(n in r.out for n in torn), r.describe()
    else:
        assert r.code == 0 and "All good" in r.out, r.describe()
    r = team.t("doctor", "--fix", name="alice")
    assert r.code == 0, r.describe()
    assert team.t("doctor", name="alice").code == 0
    check_every_line(team)
    after = team.send("alice", "after the massacre", "--to", "bob")
    got2, _ = all_ids(team)
    assert after["message_id"] in got2 and set(acked) <= set(got2)
    if len(acked) == 0:
        pytest.fail("no sender ever acknowledged a message: the test proved nothing")


def _snapshot(team, msg_ids):
    t = team.t
    snap = {
        "inbox --all (alice)": t.json("inbox", "--all", "--limit", "100", name="alice"),
        "inbox --all (bob)": t.json("inbox", "--all", "--limit", "100", name="bob"),
        "inbox (carol)": t.json("inbox", "--unread", name="carol"),
        "sent (alice)": t.json("sent", name="alice"),
        "sent (bob)": t.json("sent", name="bob"),
        "team --all": t.json("team", "--all", name="alice"),
        "group list": t.json("group", "list", name="alice"),
        "group info": t.json("group", "info", "devs", name="alice"),
    }
    for m in msg_ids:
        snap[f"message get {m}"] = t.json("message", "get", m, name="alice")
    return snap


def test_index_rebuild_gives_identical_answers(team):
    # every kind of event, written in process (the rebuild is under test, not the writes)
    api = team.api
    m1 = team.seed("alice", "first", to=["bob"], scopes=["module:auth"], refs=["bd:bd-1"],
                   structured={"k": [1, 2]})
    m2 = team.seed("alice", "to reviewers", to=["reviewer"])
    r1 = api("reply", {"message_id": m1["message_id"], "content": "bob replies"}, name="bob")
    m3 = team.seed("carol", "broadcast", broadcast=True)
    api("message_edit", {"message_id": m1["message_id"], "content": "first (edited)"},
        name="alice")
    api("message_delete", {"message_id": m2["message_id"], "force": True}, name="alice")
    api("message_read", {"message_ids": [m3["message_id"]]}, name="alice")
    api("group_create", {"name": "devs", "description": "d"}, name="alice")
    api("group_add", {"name": "devs", "members": ["@bob", "role:reviewer"]}, name="alice")
    api("session_set_intent", {"text": "rebuilding"}, name="alice")
    api("session_set_task", {"text": "bd-7"}, name="alice")
    api("session_end", {}, name="carol")
    ids = [m1["message_id"], m2["message_id"], r1["message_id"], m3["message_id"]]
    # what the snapshot's reads mark read, marked first (so that the snapshots compare)
    for who in ("alice", "bob"):
        api("inbox", {"all": True, "limit": 100}, name=who)
    for m in ids:
        api("message_get", {"message_id": m}, name="alice")
    before = _snapshot(team, ids)
    var = team.path / ".thrum" / "var"
    for victims in (("index.db", "index.db-wal", "index.db-shm"), ("index.db",),
                    ("index.db-wal",), ("index.db-shm",)):
        assert (var / "index.db").exists()
        for v in victims:
            (var / v).unlink(missing_ok=True)
        after = _snapshot(team, ids)
        for key in before:
            assert after[key] == before[key], f"{key} differs after deleting {victims}"
    # the rebuilt index is also correct for new writes
    new = team.send("alice", "after rebuild", "--to", "bob")
    assert team.unread_ids("bob") == [new["message_id"]]  # the snapshots read the rest


def test_corrupt_line_is_skipped(team):
    t = team.t
    sent = [team.seed("alice", f"m{i}", to=["bob"])["message_id"] for i in range(3)]
    log = team.log / "messages" / "alice.jsonl"
    lines = log.read_bytes().split(b"\n")
    assert len(lines) == 4 and lines[-1] == b""
    lines[1] = b'{"this is": not json at all'
    lines.insert(2, b'{"v": 1}')
    lines.insert(2, b"\xff\xfe garbage")
    log.write_bytes(b"\n".join(lines))
    for f in (team.path / ".thrum" / "var").glob("index.db*"):
        f.unlink()
    r = t("inbox", "--json", name="bob")
    assert r.code == 0, r.describe()
    assert r.err.strip(), "a corrupt line deserves a warning on stderr"
    got = [m["message_id"] for m in r.json["messages"]]
    assert got == [sent[2], sent[0]]
    # the corrupt lines stay; new appends still work
    new = team.send("alice", "after corruption", "--to", "bob")
    data = log.read_bytes()
    assert b'{"this is": not json at all\n' in data and data.endswith(b"\n")
    assert new["message_id"] in data.decode("utf-8", "replace")
    assert t.json("inbox", "--unread", name="bob")["messages"][0]["message_id"] == new["message_id"]


def test_torn_last_line_repaired_on_next_append(team):
    t = team.t
    first = team.seed("alice", "whole", to=["bob"])
    log = team.log / "messages" / "alice.jsonl"
    torn = b'{"v": 1, "event_id": "evt_01TORN", "type": "message.cre'
    with open(log, "ab") as f:
        f.write(torn)
    r = t("inbox", "--unread", "--json", name="bob")
    assert r.code == 0, r.describe()
    assert [m["message_id"] for m in r.json["messages"]] == [first["message_id"]]
    assert "alice.jsonl" in r.err, "a torn line is skipped with a warning"
    second = team.send("alice", "after tear", "--to", "bob")
    events = read_log(log)  # strict: the torn tail is gone, every line complete
    assert [e["message_id"] for e in events if e["type"] == "message.create"] == \
        [first["message_id"], second["message_id"]]
    assert torn not in log.read_bytes()
    saved = [p for p in (team.path / ".thrum" / "var" / "torn").rglob("*") if p.is_file()]
    assert any(torn in p.read_bytes() for p in saved), saved
    assert t.json("inbox", "--unread", name="bob")["total"] == 2


def test_duplicate_event_lines_apply_once(team):
    sent = team.seed("alice", "once", to=["bob"])
    log = team.log / "messages" / "alice.jsonl"
    line = log.read_bytes()
    log.write_bytes(line + line)  # same event_id twice (e.g. after a union merge)
    for f in (team.path / ".thrum" / "var").glob("index.db*"):
        f.unlink()
    doc = team.t.json("inbox", "--unread", name="bob")
    assert [m["message_id"] for m in doc["messages"]] == [sent["message_id"]]
    assert doc["total"] == 1


@pytest.mark.parametrize("in_git", [False, True], ids=["plain-dir", "git-repo"])
def test_single_file_runs_alone(tmp_path, in_git):
    env = make_env(tmp_path / "home")
    solo = tmp_path / "solo"
    solo.mkdir()
    shutil.copy2(THRUM_PY, solo / "thrum.py")
    work = tmp_path / "work"
    if in_git:
        make_repo(work, env=env)
    else:
        work.mkdir()

    def run(*args, name=None):
        e = dict(env)
        if name:
            e["THRUM_NAME"] = name
        p = subprocess.run([sys.executable, "-I", "-S", str(solo / "thrum.py"), *args],
                           cwd=str(work), env=e, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        assert p.returncode == 0, f"{args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
        assert "Traceback" not in p.stderr
        return p.stdout

    run("--help")
    run("init")
    run("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", name="alice")
    run("quickstart", "--name", "bob", "--role", "reviewer", "--module", "api", name="bob")
    out = run("send", "solo hello", "--to", "bob", "--json", name="alice")
    mid = json.loads(out)["message_id"]
    doc = json.loads(run("inbox", "--json", name="bob"))
    assert [m["message_id"] for m in doc["messages"]] == [mid]
    assert "solo hello" in run("inbox", name="bob")
    assert sorted(os.listdir(solo)) == ["thrum.py"], "running the file must not litter its dir"


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _ulid() -> str:
    n = (int(time.time() * 1000) << 80) | random.getrandbits(80)
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in range(25, -1, -1))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".%06dZ" % (
        int(time.time() * 1e6) % 1_000_000)


def _append(path, event):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(json.dumps(event).encode() + b"\n")


def test_events_arriving_before_their_message_wait_for_it(team):
    """A receipt and an edit written before the message they refer to (as after a sync that
    brought them in that order) are applied once the message arrives (SPEC §3)."""
    seed = team.seed("alice", "seed", to=["bob"])
    team.t.ok("inbox", name="bob")
    proto = read_log(team.log / "messages" / "alice.jsonl")[-1]
    mid = "msg_" + _ulid()
    env = {"v": 1, "origin": proto["origin"]}
    _append(team.log / "receipts" / "carol.jsonl",
            {**env, "event_id": "evt_" + _ulid(), "type": "message.receipt", "timestamp": _now(),
             "message_id": mid, "agent_id": "carol"})
    _append(team.log / "messages" / "alice.jsonl",
            {**env, "event_id": "evt_" + _ulid(), "type": "message.edit", "timestamp": _now(),
             "message_id": mid, "agent_id": "alice",
             "body": {"format": "markdown", "content": "edited early"}})
    # the index has seen the orphans; now the message itself arrives
    assert team.t.json("inbox", "--unread", name="carol")["total"] == 0
    time.sleep(0.01)
    create = {**env, "event_id": "evt_" + _ulid(), "type": "message.create", "timestamp": _now(),
              "message_id": mid, "agent_id": "alice", "session_id": proto["session_id"],
              "body": {"format": "markdown", "content": "original"},
              "recipients": ["bob", "carol"],
              "audiences": [{"type": "agent", "value": "bob"}, {"type": "agent", "value": "carol"}],
              "scopes": [], "refs": []}
    _append(team.log / "messages" / "alice.jsonl", create)  # after its own edit
    bob = team.t.json("inbox", "--unread", name="bob")
    assert [m["message_id"] for m in bob["messages"]] == [mid]
    assert bob["messages"][0]["body"]["content"] == "edited early"
    assert team.t.json("inbox", "--unread", name="carol")["messages"] == []  # carol read it
    # and a rebuild from the log alone agrees
    for f in (team.path / ".thrum" / "var").glob("index.db*"):
        f.unlink()
    again = team.t.json("inbox", "--unread", name="bob")
    assert [m["message_id"] for m in again["messages"]] == [mid]
    assert again["messages"][0]["body"]["content"] == "edited early"
    assert team.t.json("inbox", "--unread", name="carol")["messages"] == []
    assert seed["message_id"] not in [m["message_id"] for m in again["messages"]]


# --------------------------------------------------------------------------- the index's own form

def test_the_index_orders_timestamps_as_their_text_and_prints_them_back():
    """Creation and arrival times are integers in the index (_ts_key): well-formed ones
    order exactly as their text and SQL prints them back; other text orders before or
    after all of them."""
    import sqlite3
    rnd = random.Random(9)
    good = ["%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
        rnd.choice([0, 1, 1969, 1970, 2026, 2027, 9999]), rnd.randint(0, 12),
        rnd.randint(0, 31), rnd.randint(0, 23), rnd.randint(0, 59), rnd.randint(0, 60),
        rnd.choice([0, 1, 999999, rnd.randint(0, 999999)])) for _ in range(3000)]
    good += [thrum.now_ts(), thrum.now_ts(0)]
    assert sorted(good) == sorted(good, key=thrum._ts_key)
    db = sqlite3.connect(":memory:")
    sql = "SELECT " + thrum._ts_sql("?1")
    assert all(db.execute(sql, (thrum._ts_key(x),)).fetchone()[0] == x for x in good[:300])
    for odd in ("", "-1", "2026-12-07T18:36:17Z", "2026-13-01T00:00:00.000000Z", "zzz",
                "2026-12-07T18:36:17.2940951Z", "2026-12-07t18:36:17.294095Z"):
        assert thrum._ts_exact(odd) is None
        keys = [thrum._ts_key(x) for x in good]
        before = odd < "0000-00-00T00:00:00.000000Z"  # (the smallest well-formed text)
        assert thrum._ts_key(odd) < min(keys) if before else thrum._ts_key(odd) > max(keys)


def _creates(n, origin="o_T", at=None, session="ses_T"):
    """n direct messages alice -> bob, shaped as `thrum send` writes them."""
    base = time.time() - 3600 if at is None else at
    gen = thrum._UlidGen()
    body = "bench message %d: " + "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2
    out = []
    for i in range(n):
        t = base + i * 0.002
        out.append({"v": 1, "event_id": "evt_" + gen(int(t * 1000)), "type": "message.create",
                    "timestamp": thrum.now_ts(t), "origin": origin,
                    "message_id": "msg_" + gen(int(t * 1000)), "agent_id": "alice",
                    "session_id": session, "body": {"format": "markdown", "content": body % i},
                    "recipients": ["bob"], "audiences": [{"type": "agent", "value": "bob"}]})
    return out


def test_a_message_costs_the_index_less_than_500_bytes():
    """SPEC §17: at most 500 bytes per message of the benchmark's bodies (the full-text
    tables included, once there are some); what the empty schema takes is left out."""
    import sqlite3
    idx = thrum.Index(":memory:", None)
    idx.db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        idx.db.executescript(thrum._SCHEMA)
        empty = idx.db.execute("PRAGMA page_count").fetchone()[0]
        n = 4000
        idx.db.execute("BEGIN")
        idx.apply(_creates(n))
        idx.db.execute("COMMIT")
        pages = idx.db.execute("PRAGMA page_count").fetchone()[0] - empty
        size = pages * idx.db.execute("PRAGMA page_size").fetchone()[0]
        assert idx.inbox_counts("bob") == {"total": n, "unread": n}
        assert size / n < 500, "%.0f bytes per message" % (size / n)
    finally:
        idx.db.close()


def test_a_rebuild_keeps_the_arrival_of_a_block_that_came_late(tmp_path):
    """Lines appended with old timestamps (a sync's merge) arrive now: one line of the
    arrivals record stands for the block, and a rebuild gives them the same arrival while
    the file holds the same bytes there; a block that also held known messages records
    its new ones one by one."""
    root, var = tmp_path / "log", tmp_path / "var"
    (root / "messages").mkdir(parents=True)
    path = root / "messages" / "alice.jsonl"
    record = thrum.ArrivalRecord(str(var / "arrivals.jsonl"))
    idx = thrum.Index(str(var / "index.db"), thrum.EventLog(str(root), str(var / "torn")),
                      record)
    since = thrum.now_ts(time.time() - 60)

    def new_ids():
        return {r["message_id"] for r in idx.unread_arrived("bob", since)}
    try:
        idx.catch_up()  # (an index exists before the lines come)
        old = _creates(50)
        path.write_bytes(b"".join((thrum._dumps(e) + "\n").encode() for e in old))
        idx.catch_up()
        assert len(new_ids()) == 50
        lines = (var / "arrivals.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["end"] == path.stat().st_size
        idx.rebuild()
        assert len(new_ids()) == 50
        # rewritten (another order, a new file) with 5 new late ones: the file is read
        # again, its block holds known messages, so the 5 are recorded one by one
        late = _creates(5, at=time.time() - 1800)
        data = b"".join((thrum._dumps(e) + "\n").encode() for e in old[::-1] + late)
        tmp = root / "messages" / "alice.new"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        idx.catch_up()
        lines = (var / "arrivals.jsonl").read_text().splitlines()
        assert sorted(json.loads(x).get("id") for x in lines[1:]) == \
            sorted(e["message_id"] for e in late)
        assert len(new_ids()) == 55  # (the index keeps the arrivals it had)
        idx.rebuild()  # the range's bytes changed: those 50 fall back to their creation
        assert new_ids() == {e["message_id"] for e in late}
    finally:
        idx.close()
