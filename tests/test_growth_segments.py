"""Segmented writer files (SPEC §17, §19; issue 20 "Segments").

A writer's log file is split by size: `<name>.jsonl` (segment 0, what every earlier store
has), then `<name>--0001.jsonl`, ... each started once the previous one holds
SEGMENT_BYTES. So a sync commit after one message stores one bounded blob, whatever the
history; and the previous version (tests/fixtures/thrum_prev.py, made by
tests/fixtures/make_prev.sh from git) reads, merges and keeps every segment, because their
flat names are names it already accepts.

Old-layout stores are generated here at test time by the previous version itself (its CLI
for init/register/sync, its own `call("send")` in one process for the bulk of a history).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from conftest import api, assert_error, git, log_dir, read_log, run_thrum, thrum

SEG = thrum.SEGMENT_BYTES
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PREV_PY = FIXTURES / "thrum_prev.py"


def _prev_cmd() -> list:
    """The previous version, compiled once (like conftest's THRUM_CMD)."""
    import py_compile
    try:
        py_compile.compile(str(PREV_PY), doraise=True)
    except (OSError, py_compile.PyCompileError):  # pragma: no cover - read-only checkout
        return [sys.executable, str(PREV_PY)]
    return [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "sys.argv[0] = sys.argv.pop(1); import runpy; runpy.run_module('thrum_prev', "
            "run_name='__main__', alter_sys=True)", str(FIXTURES), str(PREV_PY)]


PREV_CMD = _prev_cmd()

#: Many sends by the previous version in ONE process (its own Service through `call`).
_PREV_BULK = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import thrum_prev as t
cwd, frm, to, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
caller = t.Caller(cwd, dict(os.environ, THRUM_NAME=frm))
ids = [t.call("send", {"content": "old %s %d: %s" % (frm, i, "o" * 1000), "to": [to]},
              caller)["message_id"] for i in range(n)]
print(json.dumps(ids))
"""


def prev(args, cwd, env, name=None):
    """Run the previous version's CLI; it must succeed."""
    e = dict(env, **({"THRUM_NAME": name} if name else {}))
    p = subprocess.run([*PREV_CMD, *map(str, args)], cwd=str(cwd), env=e,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, \
        f"previous thrum {args} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def prev_bulk(cwd, env, frm, to, n) -> list:
    """n sends frm -> to by the previous version (bodies of ~1 KB); their message ids."""
    p = subprocess.run([sys.executable, "-c", _PREV_BULK, str(FIXTURES), str(cwd), frm, to,
                        str(n)], cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def bulk(cwd, env, frm, to, n) -> list:
    """n sends frm -> to by this version, in process (set-up)."""
    return [api("send", {"content": "new %s %d: %s" % (frm, i, "n" * 1000), "to": [to]},
                cwd, env, name=frm)["message_id"] for i in range(n)]


def files_of(root, sub, name) -> list:
    """A writer's files in `sub`, in segment order (names as this version makes them)."""
    return [Path(root) / rel for _, rel in thrum.EventLog(str(root), "").segments(sub, name)]


def inbox_ids(cwd, env, name) -> list:
    """Every message of the store (`inbox --all`), newest first, through this version."""
    r = run_thrum(["inbox", "--all", "--json", "--limit", "1000"], cwd, env, name=name)
    assert r.code == 0, r.describe()
    return [m["message_id"] for m in r.json["messages"]]


def new_objects(cwd, env, old, new) -> dict:
    """{type: bytes} of the objects `new` reaches and `old` does not (uncompressed)."""
    shas = [ln.split()[0] for ln in git("rev-list", "--objects", f"{old}..{new}", cwd=cwd,
                                        env=env).splitlines() if ln.strip()]
    out = {"blob": 0, "tree": 0, "commit": 0}
    for ln in git("cat-file", "--batch-check", cwd=cwd, env=env,
                  input="\n".join(shas) + "\n").splitlines():
        _, kind, size = ln.split()
        out[kind] += int(size)
    return out


# --------------------------------------------------------------------------- names


def test_segment_names_are_log_files_and_reserved_for_registration(repo, env):
    ok = thrum.log_relpath_ok
    assert ok("messages/alice.jsonl") and ok("messages/alice--0001.jsonl")
    assert ok("receipts/bob--12345.jsonl") and ok("agents/a_b-c--0002.jsonl")
    # a name of 64 characters has segments too (the previous version cannot see them)
    long = "l" * 64
    assert ok(f"messages/{long}--0001.jsonl") and not thrum.name_ok(f"{long}--0001")
    for bad in ("messages/--0001.jsonl", "messages/Alice--0001.jsonl", "messages/a--0001.txt",
                f"messages/{long}x--0001.jsonl", "other/a--0001.jsonl", "messages/a/b.jsonl",
                f"messages/{long}--01.jsonl"):
        assert not ok(bad), bad
    assert thrum.segment_relpath("messages", "alice", 0) == "messages/alice.jsonl"
    assert thrum.segment_relpath("messages", "alice", 7) == "messages/alice--0007.jsonl"
    assert thrum.segment_relpath("agents", "a", 12345) == "agents/a--12345.jsonl"
    assert thrum.split_segment("alice--0007") == ("alice", 7)
    assert thrum.split_segment("alice") == ("alice", 0)

    run_thrum(["init"], repo, env)
    for args in (["quickstart", "--name", "worker--0001", "--role", "r", "--module", "m"],
                 ["agent", "register", "--name", "w--7", "--role", "r", "--module", "m"]):
        r = assert_error(run_thrum(args, repo, env), 2, "reserved")
        assert len(r.err.strip().splitlines()) == 1, r.err
    assert not (repo / ".thrum" / "identities" / "worker--0001.json").exists()
    assert not list(log_dir(repo).rglob("*--*"))
    # names that merely contain '--' are fine
    run_thrum(["quickstart", "--name", "a--b", "--role", "r", "--module", "m"], repo, env,
              name="a--b")


# --------------------------------------------------------------------------- appends


def _fill_to(log, root, name, size_at_least):
    """Append ~1.4 KB message events as `name` (one append each) until its message files
    hold `size_at_least` bytes; returns the event ids written."""
    ids, total = [], 0
    while total < size_at_least:
        ev = thrum.make_event("message.create", "o_test", message_id=thrum.new_id("msg_"),
                              agent_id=name, session_id=None,
                              body={"format": "plain", "content": "x" * 1300},
                              recipients=["bob"], audiences=[{"type": "agent",
                                                              "value": "bob"}],
                              scopes=[], refs=[])
        log.append([ev])
        ids.append(ev["event_id"])
        total = sum(p.stat().st_size for p in files_of(root, "messages", name))
    return ids


def test_appends_rotate_at_segment_bytes_and_racing_appenders_agree(tmp_path):
    root = tmp_path / "log"
    log = thrum.EventLog(str(root), str(tmp_path / "torn"))
    ids = _fill_to(log, root, "alice", 2 * SEG + 3000)
    segs = files_of(root, "messages", "alice")
    assert [p.name for p in segs] == ["alice.jsonl", "alice--0001.jsonl", "alice--0002.jsonl"]
    for p in segs[:-1]:  # full once it holds SEGMENT_BYTES: at most one line more
        assert SEG <= p.stat().st_size < SEG + 2000
    # the order of events in the writer's segments is the order of the appends
    assert [e["event_id"] for p in segs for e in read_log(p)] == ids

    # a torn tail in the full latest segment is cut (and saved) before moving on
    last = segs[-1]
    with open(last, "ab") as f:
        f.write(b"x" * (SEG - last.stat().st_size) + b'\n{"torn')  # full + a torn line
    before = last.read_bytes()
    log.append([thrum.make_event("agent.update", "o_test", agent_id="alice", intent="i")])
    assert not (root / "messages" / "alice--0003.jsonl").exists()  # agents/ is its own
    _fill_to(log, root, "alice", sum(p.stat().st_size for p in segs) + 1)
    assert last.read_bytes() == before[:before.rfind(b"\n") + 1]
    assert list((tmp_path / "torn").glob("messages__alice--0002.jsonl.*.torn"))
    assert (root / "messages" / "alice--0003.jsonl").exists()

    # appenders racing over a full segment all move on to the same next one
    race = tmp_path / "race"
    rlog = thrum.EventLog(str(race), str(tmp_path / "torn2"))
    _fill_to(rlog, race, "bob", SEG - 1500)
    written, errors = [], []

    def writer(k):
        try:
            for i in range(40):
                ev = thrum.make_event("message.create", "o_%d" % k,
                                      message_id=thrum.new_id("msg_"), agent_id="bob",
                                      session_id=None, body={"content": "y" * 300},
                                      recipients=["alice"])
                thrum.EventLog(str(race), str(tmp_path / "torn2")).append([ev])
                written.append(ev["event_id"])
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    segs = files_of(race, "messages", "bob")
    assert [p.name for p in segs] == ["bob.jsonl", "bob--0001.jsonl"]
    got = [e["event_id"] for p in segs for e in read_log(p)]
    assert sorted(got[-160:]) == sorted(written) and len(set(got)) == len(got)
    assert SEG <= segs[0].stat().st_size < SEG + 2 * 400


def test_quick_listings_stat_sealed_segments_only_after_a_merge_or_a_while(tmp_path):
    """A sealed segment (full, with a later one of its writer) is only ever merged into by
    a sync: quick listings (the index's catch-up, the signatures waits poll) take its stat
    from the last full listing until this log merged something or SEALED_FOR passed."""
    root = tmp_path / "log"
    log = thrum.EventLog(str(root), str(tmp_path / "torn"))
    _fill_to(log, root, "alice", 2 * SEG + 3000)
    sealed, _, latest = files_of(root, "messages", "alice")
    size = {rel: st.st_size for rel, _, st in log.files(quick=True)}  # a full listing
    with open(sealed, "ab") as f:  # what another process's merge would do
        f.write(b'{"v":1}\n')
    with open(latest, "ab") as f:
        f.write(b'{"v":1}\n')
    quick = {rel: st.st_size for rel, _, st in log.files(quick=True)}
    rel_s, rel_l = "messages/" + sealed.name, "messages/" + latest.name
    assert quick[rel_s] == size[rel_s] and quick[rel_l] == size[rel_l] + 8
    assert {rel: st.st_size for rel, _, st in log.files()}[rel_s] == size[rel_s] + 8
    log.files(quick=True)
    log.merged += 1  # a merge in this process: the next quick listing is a full one
    assert {rel: st.st_size for rel, _, st in log.files(quick=True)}[rel_s] == size[rel_s] + 8
    with open(sealed, "ab") as f:
        f.write(b'{"v":1}\n')
    log.SEALED_FOR = 0.0  # (the window has passed)
    assert {rel: st.st_size for rel, _, st in log.files(quick=True)}[rel_s] == size[rel_s] + 16


# --------------------------------------------------------------------------- the bound


def test_a_commit_after_one_message_adds_at_most_256_kib(repo, env):
    """A history of more than 256 KiB in one writer (so one file would exceed the bound
    by itself), its latest segment nearly full: `send` + `sync force` adds <= 256 KiB."""
    run_thrum(["init"], repo, env)
    for name, role in (("alice", "implementer"), ("bob", "reviewer")):
        api("quickstart", {"name": name, "role": role, "module": "m"}, repo, env, name=name)
    root = log_dir(repo)
    log = thrum.EventLog(str(root), str(repo / ".thrum" / "var" / "torn"))
    _fill_to(log, root, "alice", 256 * 1024 + 1)
    while not SEG - 2000 <= files_of(root, "messages", "alice")[-1].stat().st_size < SEG:
        log.append([thrum.make_event("message.create", "o_test",
                                     message_id=thrum.new_id("msg_"), agent_id="alice",
                                     session_id=None, body={"content": "z" * 1300},
                                     recipients=["bob"])])
    segs = files_of(root, "messages", "alice")
    history = sum(p.stat().st_size for p in segs)
    assert len(segs) >= 3 and history > 256 * 1024
    assert run_thrum(["sync", "force", "-q"], repo, env, name="alice").code == 0
    old = git("rev-parse", "refs/heads/a-sync", cwd=repo, env=env).strip()
    r = run_thrum(["send", "one more", "--to", "@bob", "--json"], repo, env, name="alice")
    assert r.code == 0, r.describe()
    assert run_thrum(["sync", "force", "-q"], repo, env, name="alice").code == 0
    new = git("rev-parse", "refs/heads/a-sync", cwd=repo, env=env).strip()
    assert new != old
    added = new_objects(repo, env, old, new)
    assert sum(added.values()) <= 256 * 1024, added
    assert SEG - 2000 < added["blob"] < SEG + 2000, added  # the latest segment, nothing else
    assert r.json["message_id"] in files_of(root, "messages", "alice")[-1].read_text()
    tree = git("ls-tree", "-r", "--name-only", new, cwd=repo, env=env).split()
    assert {"messages/" + p.name for p in segs} <= set(tree)
    # a rebuild projects the segments' lines together: the same index as the catch-ups
    total = run_thrum(["inbox", "--all", "--json"], repo, env, name="bob").json["total"]
    assert run_thrum(["rebuild"], repo, env).code == 0
    assert run_thrum(["inbox", "--all", "--json"], repo, env, name="bob").json["total"] == total
    checks = run_thrum(["doctor", "--json"], repo, env, name="bob").json["checks"]
    assert [c for c in checks if c["name"] == "index"][0]["ok"], checks


# --------------------------------------------------------------------------- interop


def test_an_old_layout_store_is_read_and_extended(repo, env):
    """A store written by the previous version (alice's one file already past
    SEGMENT_BYTES) is read as it is; new messages go to alice--0001.jsonl, and the old file
    stays byte for byte what it was."""
    prev(["init"], repo, env)
    for name, role in (("alice", "implementer"), ("bob", "reviewer")):
        prev(["quickstart", "--name", name, "--role", role, "--module", "m"], repo, env,
             name=name)
    old_ids = prev_bulk(repo, env, "alice", "bob", SEG // 1000 + 10)
    prev(["sync", "force"], repo, env, name="alice")
    root = log_dir(repo)
    old_file = root / "messages" / "alice.jsonl"
    assert old_file.stat().st_size > SEG
    assert [p.name for p in (root / "messages").iterdir()] == ["alice.jsonl"]
    before = old_file.read_bytes()

    assert inbox_ids(repo, env, "bob") == old_ids[::-1]
    r = run_thrum(["send", "first in the new layout", "--to", "@bob", "--json"], repo, env,
                  name="alice")
    assert r.code == 0, r.describe()
    mid = r.json["message_id"]
    assert old_file.read_bytes() == before
    seg1 = root / "messages" / "alice--0001.jsonl"
    assert [e.get("message_id") for e in read_log(seg1)] == [mid]
    assert inbox_ids(repo, env, "bob") == [mid] + old_ids[::-1]
    assert run_thrum(["rebuild"], repo, env).code == 0
    assert inbox_ids(repo, env, "bob") == [mid] + old_ids[::-1]
    assert run_thrum(["sync", "force", "-q"], repo, env, name="alice").code == 0
    tree = git("ls-tree", "-r", "--name-only", "refs/heads/a-sync", cwd=repo, env=env).split()
    assert {"messages/alice.jsonl", "messages/alice--0001.jsonl"} <= set(tree)
    doctor = run_thrum(["doctor", "--json"], repo, env, name="alice")
    bad = [c for c in doctor.json["checks"] if not c["ok"] and c["name"].startswith(
        ("log", "index", "sync worktree"))]
    assert not bad, bad


def test_old_and_new_clones_exchange_messages_through_one_remote(net):
    """Clone A runs the previous version, clone B this one; B's writer file has grown into
    a second segment. Every message reaches the other side once; A's pushes keep B's
    segments on the remote's tip; a fresh clone on this version sees everything."""
    env = net.env
    a, b = net.clone("A"), net.clone("B")
    prev(["init"], a.path, env)
    prev(["quickstart", "--name", "alice", "--role", "implementer", "--module", "m"],
         a.path, env, name="alice")
    prev(["sync", "force"], a.path, env, name="alice")
    b.quickstart("bob", "reviewer", "m")
    b.sync()
    prev(["sync", "force"], a.path, env, name="alice")

    from_b = bulk(b.path, env, "bob", "alice", SEG // 1000 + 10)
    segs = files_of(b.log, "messages", "bob")
    assert [p.name for p in segs] == ["bob.jsonl", "bob--0001.jsonl"]
    from_b.append(b.send("bob", "after the rotation", "--to", "@alice")["message_id"])
    assert from_b[-1] in segs[-1].read_text()
    from_a = prev_bulk(a.path, env, "alice", "bob", SEG // 1000 + 10)

    b.sync()
    prev(["sync", "force"], a.path, env, name="alice")  # merges B's segments, pushes A's
    tip = git("ls-tree", "-r", "--name-only", "refs/heads/a-sync", cwd=net.remote,
              env=env).split()
    assert {"messages/bob.jsonl", "messages/bob--0001.jsonl", "messages/alice.jsonl"} <= \
        set(tip)
    b.sync()
    # A (previous version) writes again after holding B's segments: still on the tip
    from_a += prev_bulk(a.path, env, "alice", "bob", 2)
    prev(["sync", "force"], a.path, env, name="alice")
    b.sync()
    tip = git("ls-tree", "-r", "--name-only", "refs/heads/a-sync", cwd=net.remote,
              env=env).split()
    assert {"messages/bob.jsonl", "messages/bob--0001.jsonl"} <= set(tip)

    a_inbox = json.loads(prev(["inbox", "--all", "--json", "--limit", "1000"], a.path, env,
                              name="alice"))["messages"]
    assert sorted(m["message_id"] for m in a_inbox) == sorted(from_a + from_b)
    assert sorted(inbox_ids(b.path, env, "bob")) == sorted(from_a + from_b)
    # no event lost or duplicated: after a round (the inboxes wrote session events), both
    # clones hold the same lines, once each; a fresh clone on this version gets them all
    b.sync()
    prev(["sync", "force"], a.path, env, name="alice")
    b.sync()
    c = net.clone("C")
    c.quickstart("carol", "tester", "m")
    for clone in (a, b, c):
        ids = [json.loads(ln)["event_id"] for ln in clone.lines()]
        assert len(ids) == len(set(ids)), clone
    ev_b = set(b.event_ids())
    assert set(a.event_ids()) == ev_b and set(c.event_ids()) >= ev_b
    assert files_of(c.log, "messages", "bob") == [c.log / "messages" / p.name for p in segs]
    checks = c.json("doctor", "--json", name="carol")["checks"]
    assert [x for x in checks if x["name"] == "index"][0]["ok"]


def test_an_old_clone_cannot_see_the_later_segments_of_a_name_over_58_characters(net):
    """`<name>--0001` is longer than the 64 characters the previous version accepts when
    the name has more than 58: an old clone ignores that segment (and its commits leave
    it out of the tip); the next commit of a clone on this version puts it back."""
    env = net.env
    a, b = net.clone("A"), net.clone("B")
    long = "w" * 60
    prev(["init"], a.path, env)
    prev(["quickstart", "--name", "alice", "--role", "implementer", "--module", "m"],
         a.path, env, name="alice")
    prev(["sync", "force"], a.path, env, name="alice")
    b.quickstart(long, "reviewer", "m")
    sent = bulk(b.path, env, long, "alice", SEG // 1000 + 10)
    segs = files_of(b.log, "messages", long)
    assert [p.name for p in segs] == [long + ".jsonl", long + "--0001.jsonl"]
    late = [m for m in sent if m in segs[1].read_text()]
    assert late
    b.sync()
    prev(["sync", "force"], a.path, env, name="alice")
    prev(["send", "from the old clone", "--to", "@" + long], a.path, env, name="alice")
    prev(["sync", "force"], a.path, env, name="alice")
    seen = {m["message_id"] for m in json.loads(prev(
        ["inbox", "--all", "--json", "--limit", "1000"], a.path, env, name="alice"))["messages"]}
    assert set(sent) - set(late) <= seen and not seen & set(late)
    tip = set(git("ls-tree", "-r", "--name-only", "refs/heads/a-sync", cwd=net.remote,
                  env=env).split())
    assert "messages/%s.jsonl" % long in tip and "messages/%s--0001.jsonl" % long not in tip
    b.sync()
    tip = set(git("ls-tree", "-r", "--name-only", "refs/heads/a-sync", cwd=net.remote,
                  env=env).split())
    assert "messages/%s--0001.jsonl" % long in tip
    c = net.clone("C")
    c.quickstart("carol", "tester", "m")
    assert set(b.event_ids()) <= set(c.event_ids())
