"""Git sync (SPEC §2, §3, §8, §14 "Sync exits", "Sync commits complete lines only").

Real git, real bare remotes, several clones, no mocks. Every clone shares one private HOME
(from conftest's `env` fixture) whose git config has no user identity: thrum must commit with
its own identity. The remote's `main` branch gets one commit first and clones are made with
`git clone`, like real users' repositories.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time

import pytest

from conftest import (THRUM_CMD, TS_RE, Clone, Runner, assert_error, bare_remote, clone,
                      commit_all, git, ls_remote, make_repo, run_thrum, sync_all, thrum)

T = 120  # timeout for every subprocess


# --------------------------------------------------------------------------- helpers

def remote_files(remote, env, ref="a-sync") -> dict:
    """{path: bytes} of every file on the remote branch."""
    names = git("ls-tree", "-r", "-z", "--name-only", ref, cwd=remote, env=env).split("\0")
    out = {}
    for n in names:
        if n:
            p = subprocess.run(["git", "show", f"{ref}:{n}"], cwd=str(remote), env=env,
                               capture_output=True, timeout=T)
            assert p.returncode == 0, p.stderr
            out[n] = p.stdout
    return out


def remote_event_ids(remote, env) -> list:
    ids = []
    for name, data in remote_files(remote, env).items():
        if name.endswith(".jsonl"):
            ids += [json.loads(l)["event_id"] for l in data.split(b"\n") if l.strip()]
    return sorted(ids)


def assert_linear(remote, env, ref="a-sync"):
    merges = git("log", "--merges", "--format=%H", ref, cwd=remote, env=env)
    assert merges.strip() == "", f"merge commits on the remote {ref}:\n{merges}"
    total = git("rev-list", "--count", ref, cwd=remote, env=env).strip()
    first = git("rev-list", "--first-parent", "--count", ref, cwd=remote, env=env).strip()
    assert total == first, f"{ref} is not a linear chain: {total} commits, {first} first-parent"


def assert_no_dups(c: Clone):
    ids = c.event_ids()
    assert len(ids) == len(set(ids)), f"{c}: duplicated events " \
        f"{sorted({i for i in ids if ids.count(i) > 1})}"


def assert_complete_lines(data: bytes, what: str):
    if not data:
        return
    assert data.endswith(b"\n"), f"{what} does not end with a newline: ...{data[-80:]!r}"
    for i, line in enumerate(data.split(b"\n")[:-1]):
        ev = json.loads(line)  # raises on a partial line
        assert isinstance(ev, dict) and "event_id" in ev, f"{what}:{i + 1}: {line[:120]!r}"


def strip_perspective(doc):
    """Drop the per-reader fields (`is_read`) everywhere in a JSON document."""
    if isinstance(doc, dict):
        return {k: strip_perspective(v) for k, v in doc.items() if k != "is_read"}
    if isinstance(doc, list):
        return [strip_perspective(v) for v in doc]
    return doc


def msg_ids(doc) -> list:
    return [m["message_id"] for m in doc["messages"]]


def bob_unread(c: Clone) -> set:
    """bob's unread messages (listing them marks nothing read)."""
    return set(msg_ids(c.json("inbox", "--all", "--unread", "--limit", "100", name="bob")))


# --------------------------------------------------------------------------- convergence

def test_two_clones_converge_exactly_once(pair):
    net, a, b = pair
    # both sides know both agents after the first syncs
    for c in (a, b):
        names = {m["agent_id"] for m in c.json("team", "--all", name=c is a and "alice" or "bob")
                 ["members"]}
        assert names == {"alice", "bob"}, (c, names)

    # messages, edits, deletes, reads and registrations on both sides
    # (written in process: what is under test is how the syncs carry them)
    m1 = a.seed("alice", "from A one", to=["bob"])["message_id"]
    m2 = a.seed("alice", "from A two (to be deleted)", to=["bob"])["message_id"]
    m3 = b.seed("bob", "from B one", to=["alice"])["message_id"]
    m4 = b.seed("bob", "from B two", to=["alice"])["message_id"]
    a.api("message_edit", {"message_id": m1, "content": "from A one (edited)"}, name="alice")
    a.api("message_delete", {"message_id": m2, "force": True, "reason": "oops"}, name="alice")
    b.api("message_edit", {"message_id": m3, "content": "from B one (edited)"}, name="bob")
    a.register("carol", "reviewer", "db")       # registration on A
    b.register("dave", "tester", "qa")           # registration on B
    sync_all(a, b)

    # cross-side operations on messages that came from the other clone
    b.ok("message", "get", m1, name="bob")        # bob reads alice's message (receipt on B)
    a.ok("message", "read", m3, name="alice")     # alice reads bob's message (receipt on A)
    m5 = a.seed("carol", "carol to dave", to=["dave"], structured={"k": [1, 2]})
    m5 = m5["message_id"]
    b.ok("message", "edit", m4, "from B two (edited)", name="bob")
    sync_all(a, b)

    for c in (a, b):
        assert_no_dups(c)
    assert a.event_ids() == b.event_ids()
    assert remote_event_ids(net.remote, net.env) == a.event_ids()
    types = {e["type"] for e in a.events()}
    assert {"agent.register", "message.create", "message.edit", "message.delete",
            "message.receipt"} <= types

    # repeated syncs add nothing: no line, no commit
    counts = (len(a.lines()), len(b.lines()))
    tip = ls_remote(net.remote, net.env)
    for c in (a, b, a, b):
        r = c.sync()
        assert r["pulled"] == 0 and r["pushed"] is False, r
    assert (len(a.lines()), len(b.lines())) == counts
    assert ls_remote(net.remote, net.env) == tip
    assert a.event_ids() == b.event_ids()
    assert_linear(net.remote, net.env)

    # every event exists in exactly one file line per clone
    for c in (a, b):
        assert len(c.lines()) == len(set(c.event_ids())) == len(a.event_ids())

    # the JSON views agree on both sides (team first: inbox and get mark rows read)
    team_a = a.json("team", "--all", name="alice")
    team_b = b.json("team", "--all", name="bob")
    assert team_a == team_b
    assert {m["agent_id"] for m in team_a["members"]} == {"alice", "bob", "carol", "dave"}

    def views():
        ia = a.json("inbox", "--all", "--limit", "100", name="alice")
        ib = b.json("inbox", "--all", "--limit", "100", name="bob")
        ga = {mid: a.json("message", "get", mid, name="alice")["message"]
              for mid in (m1, m2, m3, m4, m5)}
        gb = {mid: b.json("message", "get", mid, name="bob")["message"]
              for mid in (m1, m2, m3, m4, m5)}
        return ia, ib, ga, gb

    inbox_a, inbox_b, get_a, get_b = views()
    assert msg_ids(inbox_a) == msg_ids(inbox_b)
    assert set(msg_ids(inbox_a)) == {m1, m3, m4, m5}
    assert m2 not in msg_ids(inbox_a)
    assert inbox_a["total"] == inbox_b["total"] == 4
    assert strip_perspective(inbox_a["messages"]) == strip_perspective(inbox_b["messages"])
    for mid in (m1, m2, m3, m4, m5):  # receipts made by the calls above are not synced yet
        assert strip_perspective({k: v for k, v in get_a[mid].items() if k != "receipts"}) == \
            strip_perspective({k: v for k, v in get_b[mid].items() if k != "receipts"}), mid
    # once the reads those calls made are synced, every field agrees
    sync_all(a, b)
    inbox_a, inbox_b, get_a, get_b = views()
    assert strip_perspective(inbox_a["messages"]) == strip_perspective(inbox_b["messages"])
    for mid in (m1, m2, m3, m4, m5):
        assert strip_perspective(get_a[mid]) == strip_perspective(get_b[mid]), mid
    assert a.json("team", "--all", name="alice") == b.json("team", "--all", name="bob")
    g1 = a.json("message", "get", m1, name="alice")["message"]
    assert g1["body"]["content"] == "from A one (edited)" and g1["version"] == 1
    assert [e["content"] for e in g1["edits"]] == ["from A one (edited)"]
    assert b.json("message", "get", m2, name="bob")["message"]["deleted"] is True
    assert b.json("message", "get", m3, name="bob")["message"]["body"]["content"] == \
        "from B one (edited)"
    g5 = b.json("message", "get", m5, name="bob")["message"]
    assert g5["body"]["structured"] == {"k": [1, 2]}

    # read receipts crossed over: the authors see them in `sent`
    sent_a = a.json("sent", "--limit", "100", name="alice")
    rec = {m["message_id"]: m["receipts"] for m in sent_a["messages"]}
    assert [r["agent_id"] for r in rec[m1]] == ["bob"] and rec[m1][0]["read_at"]
    sent_b = b.json("sent", "--limit", "100", name="bob")
    rec = {m["message_id"]: m["receipts"] for m in sent_b["messages"]}
    assert rec[m3][0]["agent_id"] == "alice" and rec[m3][0]["read_at"]

    # after the reads above are synced too, the views (team unread counts) agree again
    sync_all(a, b)
    assert a.event_ids() == b.event_ids()
    assert a.json("team", "--all", name="alice") == b.json("team", "--all", name="bob")
    ua = a.json("inbox", "--all", "--limit", "100", name="carol")
    ub = b.json("inbox", "--all", "--limit", "100", name="dave")
    assert strip_perspective(ua["messages"]) == strip_perspective(ub["messages"])


def test_fresh_clone_sees_full_history_on_first_command(pair):
    net, a, b = pair
    m1 = a.seed("alice", "history one", to=["bob"])["message_id"]
    m2 = b.seed("bob", "history two", to=["alice"])["message_id"]
    sync_all(a, b)
    tip = ls_remote(net.remote, net.env)

    c = net.clone("C")
    r = c.json("init")
    assert r.get("adopted_remote") is True, r
    assert c.rev("refs/heads/a-sync") == tip          # adopted, not a new root
    assert c.event_ids() == a.event_ids()
    team = c.json("team", "--all", name=None)
    assert {m["agent_id"] for m in team["members"]} == {"alice", "bob"}

    # a clone made before a-sync existed upstream: init fetches and adopts it
    late = net.tmp / "E"
    assert late.exists()
    e = Clone(late, net.env)
    assert e.rev("refs/remotes/origin/a-sync") == ""
    assert e.json("init").get("adopted_remote") is True
    assert e.rev("refs/heads/a-sync") == tip
    assert e.event_ids() == a.event_ids()

    # quickstart as the very first command in another fresh clone
    d = net.clone("D")
    d.quickstart("dora", "observer", "docs")
    inbox = d.json("inbox", "--all", "--limit", "100", name="dora")
    assert set(msg_ids(inbox)) == {m1, m2}
    # and its first sync publishes on top of the adopted history: linear, nothing lost
    d.sync()
    assert_linear(net.remote, net.env)
    assert git("merge-base", "--is-ancestor", tip, "a-sync", cwd=net.remote, env=net.env,
               check=False) == ""
    a.sync()
    assert "dora" in {m["agent_id"] for m in a.json("team", "--all", name="alice")["members"]}


def test_local_history_published_on_first_sync(tmp_path, env):
    repo = make_repo(tmp_path / "solo", env=env)
    c = Clone(repo, env)
    c.register("alice", "implementer", "auth")
    c.register("bob", "reviewer", "api")
    mids = [c.seed("alice", f"local {i}", to=["bob"])["message_id"] for i in range(3)]
    r = c.sync()
    assert r["state"] == "no-remote" and r["remote"] is None

    remote = bare_remote(tmp_path / "later.git", env)
    c.git("remote", "add", "origin", str(remote))
    assert ls_remote(remote, env) == ""
    r = c.sync()
    assert r["pushed"] is True and r["state"] == "synced", r
    assert ls_remote(remote, env) == c.rev("refs/heads/a-sync") != ""
    assert remote_event_ids(remote, env) == c.event_ids()

    other = Clone(clone(remote, tmp_path / "other", env), env)
    other.ok("init")
    assert other.event_ids() == c.event_ids()
    other.quickstart("zed", "observer", "docs")
    assert set(msg_ids(other.json("inbox", "--all", "--limit", "100", name="zed"))) == set(mids)


def test_unrelated_histories_are_unioned(net):
    a, b = net.clone("A"), net.clone("B")
    # both initialise before anyone pushed: two independent orphan roots
    a.ok("init")
    b.ok("init")
    root_a, root_b = a.rev("refs/heads/a-sync"), b.rev("refs/heads/a-sync")
    assert root_a and root_b
    a.register("alice", "implementer", "auth")
    a.register("bob", "reviewer", "api")
    b.register("carol", "tester", "qa")
    b.register("dave", "writer", "docs")
    ma = [a.seed("alice", f"A{i}", to=["bob"])["message_id"] for i in range(3)]
    mb = [b.seed("carol", f"B{i}", to=["dave"])["message_id"] for i in range(3)]
    ids_a, ids_b = set(a.event_ids()), set(b.event_ids())

    a.sync()
    b.sync()
    a.sync()
    for c in (a, b):
        assert_no_dups(c)
        assert set(c.event_ids()) == ids_a | ids_b
    assert a.event_ids() == b.event_ids() == remote_event_ids(net.remote, net.env)
    assert_linear(net.remote, net.env)
    for c, who in ((a, "bob"), (b, "dave")):
        got = set(msg_ids(c.json("inbox", "--all", "--limit", "100", name=who)))
        assert got == set(ma) | set(mb), c
    team = {m["agent_id"] for m in b.json("team", "--all", name="carol")["members"]}
    assert team == {"alice", "bob", "carol", "dave"}


@pytest.mark.slow
def test_concurrent_syncs_lose_and_duplicate_nothing(net, procs):
    names = ["w0", "w1", "w2", "w3"]
    clones = [net.clone(f"C{i}") for i in range(4)]
    for c, n in zip(clones, names):
        c.register(n, "worker", "mod" + n)
    for _ in range(2):
        for c in clones:
            c.synced()
    for c, n in zip(clones, names):
        assert {m["agent_id"] for m in c.json("team", "--all", name=n)["members"]} == set(names)

    per, rounds = 10, 3
    sent = []
    for rnd in range(rounds):
        # every clone writes (in process: the syncs are under test), then all four sync
        # at the same moment
        for c, n in zip(clones, names):
            sent += [c.seed(n, f"{n} round {rnd} msg {j}", broadcast=True)["message_id"]
                     for j in range(per)]
        ps = [procs.popen([*THRUM_CMD, "sync", "force", "--json"],
                          cwd=str(c.path), env=c.env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for c in clones]
        for c, p in zip(clones, ps):
            out, err = p.communicate(timeout=T)
            assert p.returncode == 0, (f"{c}: concurrent sync force exited {p.returncode}\n"
                                       f"{out.decode()}\n{err.decode()}")
            assert b"Traceback" not in err, err.decode()

    for c in clones:
        c.sync()
    total = per * rounds * len(clones)
    assert len(set(sent)) == total
    ref = remote_event_ids(net.remote, net.env)
    for c, n in zip(clones, names):
        assert_no_dups(c)
        assert c.event_ids() == ref, c
        creates = [e["message_id"] for e in c.events() if e["type"] == "message.create"]
        assert len(creates) == len(set(creates)) == total
        assert set(creates) == set(sent)
        doc = c.json("inbox", "--all", "--limit", "1", name=n)
        assert doc["total"] == total, (c, doc["total"])
    assert_linear(net.remote, net.env)


# --------------------------------------------------------------------------- many clones

def git_calls(stderr: str) -> list:
    """The git subcommands a thrum process ran, in order, from its THRUM_DEBUG trace
    (`thrum: debug: git ARGS -> EXIT (T ms)`; options before the subcommand skipped)."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("thrum: debug: git "):
            words = line[len("thrum: debug: git "):].rsplit(" -> ", 1)[0].split()
            out.append(next((w for w in words if not w.startswith("-")), "?"))
    return out


def test_a_sync_with_nothing_to_do_runs_at_most_six_git_processes(pair):
    """SPEC §8 "Many clones": a cycle with nothing to merge runs at most 6 git processes
    (the whole `sync force`, its status included), only one of them talks to the remote,
    and none commits or re-reads the log."""
    net, a, b = pair
    a.seed("alice", "settled", to=["bob"])
    sync_all(a, b)
    tip = ls_remote(net.remote, net.env)
    for c in (a, b):
        r = c.run("sync", "force", "--json", extra_env={"THRUM_DEBUG": "1"})
        assert r.code == 0, r.describe()
        calls = git_calls(r.err)
        assert 1 <= len(calls) <= 6, calls
        assert [x for x in calls if x in ("fetch", "push", "ls-remote")] == ["fetch"], calls
        assert not set(calls) & {"hash-object", "commit-tree", "mktree", "update-ref",
                                 "status", "rev-list"}, calls
        doc = r.json
        assert (doc["pulled"], doc["committed"], doc["pushed"], doc["state"]) == \
            (0, False, False, "synced"), doc
    assert ls_remote(net.remote, net.env) == tip


def test_a_rejected_push_costs_one_fetch_one_merge_one_push(pair):
    """SPEC §8: when another clone pushes between our fetch and our push, the retry is one
    fetch, one merge of what that clone pushed and one push: our commit is made again on
    the new tip from the trees, so no log file is read into git again (no hash-object)
    and there is no second full cycle. The race is made with a pre-receive hook on the
    remote that, once, moves a-sync to another clone's commit just before our push lands."""
    net, a, b = pair
    # B's racing commit: one message of bob's on the current tip, parked on a side branch
    theirs = b.seed("bob", "B pushed first", to=["alice"])["message_id"]
    commit_all(b.log, b.env, "another clone's sync")
    b.git("push", "-q", "origin", "a-sync:refs/heads/racer")
    hook = net.remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\ncat >/dev/null\nif [ -e racing ]; then\n  rm -f racing\n"
                    "  unset GIT_QUARANTINE_PATH\n"
                    "  git update-ref refs/heads/a-sync \"$(git rev-parse refs/heads/racer)\"\n"
                    "fi\nexit 0\n")
    hook.chmod(0o755)
    (net.remote / "racing").touch()

    ours = a.seed("alice", "A pushed second", to=["bob"])["message_id"]
    r = a.run("sync", "force", "--json", extra_env={"THRUM_DEBUG": "1"})
    assert r.code == 0, r.describe()
    assert not (net.remote / "racing").exists(), "the hook did not race the push"
    doc = r.json
    assert (doc["pushed"], doc["attempts"], doc["rejected"]) == (True, 2, 1), doc
    calls = git_calls(r.err)
    first_push = calls.index("push")
    retry = calls[first_push + 1:calls.index("push", first_push + 1) + 1]
    # fetch, history check, the racer's files, merge, tree, commit, push
    assert retry.count("fetch") == 1 and retry[-1] == "push", retry
    assert retry.count("cat-file") == 1, retry  # the merge reads the racer's blobs once
    assert "hash-object" not in retry, f"the log was read again: {retry}"
    assert len(retry) <= 7, retry
    assert calls[:first_push].count("fetch") == 1  # one fetch before, one after

    for c in (a, b):
        c.sync()
    for c in (a, b):
        assert_no_dups(c)
        assert c.event_ids() == remote_event_ids(net.remote, net.env), c
    assert ours in msg_ids(b.json("inbox", "--unread", name="bob"))
    assert theirs in msg_ids(a.json("inbox", "--unread", name="alice"))
    assert_linear(net.remote, net.env)


def test_clones_that_wrote_lately_take_distinct_push_slots(pair):
    """A daemon pushes in its own slot among the clones that wrote in the last hour (the
    origins of the log files' last events, so every clone holding the same log agrees):
    the two clones of a pair get slots 0 and 1 of 2, a clone that wrote nothing yet
    makes a third."""
    net, a, b = pair
    c = net.clone("C")
    c.ok("init")
    sync_all(a, b, c, rounds=1)

    def slot(x):
        store = thrum.Store(thrum.locate(str(x.path)), x.env)
        try:
            return thrum.SyncEngine(store).push_slot()
        finally:
            store.close()
    assert sorted([slot(a), slot(b)]) == [(0, 2), (1, 2)]
    assert slot(c)[1] == 3  # it counts itself (its first push), the others do not yet


def test_groups_written_in_two_clones_converge_without_commit_noise(pair):
    """groups.jsonl is the one file several clones write: each clone holds its lines in
    the order they arrived. Once both clones hold both groups, syncs commit and push
    nothing (no reorder commits going back and forth)."""
    net, a, b = pair
    a.api("group_create", {"name": "ga"}, name="alice")
    b.api("group_create", {"name": "gb"}, name="bob")
    sync_all(a, b)
    tip = ls_remote(net.remote, net.env)
    for _ in range(2):
        for c in (a, b):
            r = c.sync()
            assert (r["committed"], r["pushed"], r["state"]) == (False, False, "synced"), r
    assert ls_remote(net.remote, net.env) == tip
    for c, who in ((a, "alice"), (b, "bob")):
        names = {g["group"] for g in c.json("group", "list", name=who)["groups"]}
        assert {"ga", "gb"} <= names


# --------------------------------------------------------------------------- CI one-liner

def test_ci_job_autosync_broadcast_reaches_other_clone(net):
    dev = net.clone("dev")
    dev.register("alice", "implementer", "auth")
    dev.synced()
    before = ls_remote(net.remote, net.env)

    ci = net.clone("ci")
    ci.ok("quickstart", "--name", "ci", "--role", "pipeline", "--module", "build")
    r = run_thrum(["send", "build 123 passed", "--broadcast", "--structured",
                   '{"build":123,"status":"passed"}', "--json"], ci.path, net.env,
                  timeout=T, extra_env={"THRUM_NAME": "ci", "THRUM_AUTOSYNC": "1"})
    assert r.code == 0, r.describe()
    sent = r.json
    assert sent["recipients"] == ["alice"]
    mid = sent["message_id"]
    # pushed without an explicit sync
    after = ls_remote(net.remote, net.env)
    assert after and after != before
    assert mid.encode() in remote_files(net.remote, net.env).get("messages/ci.jsonl", b"")
    assert_linear(net.remote, net.env)

    dev.sync()
    inbox = dev.json("inbox", "--unread", name="alice")
    assert msg_ids(inbox) == [mid]
    msg = dev.json("message", "get", mid, name="alice")["message"]
    assert msg["agent_id"] == "ci"
    assert msg["body"]["content"] == "build 123 passed"
    assert msg["body"]["structured"] == {"build": 123, "status": "passed"}


# --------------------------------------------------------------------------- local states

def test_no_remote_is_a_normal_state(tmp_path, env):
    repo = make_repo(tmp_path / "solo", env=env)
    c = Clone(repo, env)
    c.register("alice", "implementer", "auth")
    c.register("bob", "reviewer", "api")
    mid = c.seed("alice", "no remote here", to=["bob"])["message_id"]
    r = c.run("sync", "force", "--json")
    assert r.code == 0, r.describe()
    doc = r.json
    assert doc["local_only"] is False and doc["remote"] is None
    assert doc["state"] == "no-remote"
    # the cycle still commits the log locally
    shown = c.git("show", "a-sync:messages/alice.jsonl")
    assert mid in shown
    st = c.status()
    assert st["remote"] is None and st["state"] == "no-remote"
    assert c.ok("sync", "force").code == 0  # human output too


def test_init_local_never_fetches_or_pushes(net):
    c = net.clone("L")  # cloned before the remote had a-sync
    other = net.clone("X")
    other.register("xena", "implementer", "auth")
    other.synced()
    remote_tip = ls_remote(net.remote, net.env)
    assert remote_tip

    c.ok("init", "--local")
    c.register("alice", "implementer", "auth")
    c.register("bob", "reviewer", "api")
    c.seed("alice", "stay local", to=["bob"])
    r = c.run("sync", "force", "--json")
    assert r.code == 0, r.describe()
    doc = r.json
    assert doc["local_only"] is True and doc["state"] == "local-only"
    assert doc["pushed"] is False
    assert ls_remote(net.remote, net.env) == remote_tip           # never pushed
    assert c.rev("refs/remotes/origin/a-sync") == ""              # never fetched
    assert "xena" not in {e.get("agent_id") for e in c.events()}
    assert c.rev("refs/heads/a-sync")  # but committed locally
    assert "stay local" in c.git("show", "a-sync:messages/alice.jsonl")
    st = c.status()
    assert st["state"] == "local-only" and st["local_only"] is True
    assert ls_remote(net.remote, net.env) == remote_tip


def test_sync_outside_git_is_an_error(tmp_path, env):
    d = tmp_path / "plain"
    d.mkdir()
    t = Runner(d, env)
    t.ok("init")
    r = t("sync", "force", timeout=T)
    assert_error(r, 1, "git")
    r = t("sync", "force", "--json", timeout=T)
    assert r.code == 1 and r.json["error"]["exit_code"] == 1


# --------------------------------------------------------------------------- errors

def test_unreachable_remote_then_recovery(pair):
    net, a, b = pair
    a.git("remote", "set-url", "origin", "/nonexistent/path")
    local_before = a.rev("refs/heads/a-sync")
    mids = [a.seed("alice", f"offline {i}", to=["bob"])["message_id"] for i in range(2)]

    r = a.run("sync", "force")
    assert_error(r, 1)
    assert "origin" in r.err and "nonexistent" in r.err, r.describe()
    r = a.run("sync", "force", "--json")
    assert r.code == 1 and r.json["error"]["exit_code"] == 1
    st = a.status()
    assert st["last_error"], st
    assert st["state"] == "error"
    # the local branch got a commit holding the messages
    tip = a.rev("refs/heads/a-sync")
    assert tip and tip != local_before
    shown = a.git("show", "a-sync:messages/alice.jsonl")
    for m in mids:
        assert m in shown
    # nothing reached the remote
    assert all(m.encode() not in v for v in remote_files(net.remote, net.env).values()
               for m in mids)

    a.git("remote", "set-url", "origin", str(net.remote))
    r = a.sync()
    assert r["state"] == "synced" and r["last_error"] is None, r
    st = a.status()
    assert st["state"] == "synced" and st["last_error"] is None
    b.sync()
    got = msg_ids(b.json("inbox", "--unread", name="bob"))
    assert set(got) == set(mids)
    assert a.event_ids() == b.event_ids()


def test_push_rejected_by_remote_hook_then_recovery(pair):
    """A remote that refuses every push (a pre-receive hook): retries end with exit 1 and the
    remote's reason; nothing is lost and a later sync succeeds."""
    net, a, b = pair
    hook = net.remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'a-sync is frozen for maintenance' >&2\nexit 1\n")
    hook.chmod(0o755)
    tip = ls_remote(net.remote, net.env)
    mid = a.seed("alice", "while the remote refuses", to=["bob"])["message_id"]
    started = time.monotonic()
    r = a.run("sync", "force")
    assert_error(r, 1)
    assert time.monotonic() - started < 60
    assert ls_remote(net.remote, net.env) == tip
    st = a.status()
    assert st["last_error"] and st["state"] == "error", st
    assert mid in (a.log / "messages" / "alice.jsonl").read_text()

    hook.unlink()
    r = a.sync()
    assert r["pushed"] is True and r["last_error"] is None, r
    b.sync()
    assert msg_ids(b.json("inbox", "--unread", name="bob")) == [mid]


def test_push_rejection_reports_the_remote_reason(pair):
    """A push refused by the remote (not a race) is reported with the remote's reason, not as
    contention ("the remote moved")."""
    net, a, b = pair
    hook = net.remote / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'a-sync is frozen for maintenance' >&2\nexit 1\n")
    hook.chmod(0o755)
    a.seed("alice", "refused", to=["bob"])
    r = a.run("sync", "force")
    assert_error(r, 1)
    low = r.err.lower()
    assert "refused the push" in low and "pre-receive hook declined" in low, r.describe()
    assert "remote moved" not in low, r.describe()


# --------------------------------------------------------------------------- damage

def _commit_unpushed(a: Clone, remote):
    """Make a local commit on a-sync that the remote does not have (remote offline)."""
    a.git("remote", "set-url", "origin", "/nonexistent/path")
    assert a.run("sync", "force").code == 1
    a.git("remote", "set-url", "origin", str(remote))


def test_damage_sync_worktree_deleted(pair):
    net, a, b = pair
    m1 = a.seed("alice", "committed but unpushed", to=["bob"])["message_id"]
    _commit_unpushed(a, net.remote)
    before = set(a.event_ids())
    shutil.rmtree(a.log)
    # a send after the damage must survive as well
    m2 = a.send("alice", "sent after the worktree vanished", "--to", "bob")["message_id"]
    a.sync()
    assert (a.log / ".git").is_file()
    wts = a.git("worktree", "list", "--porcelain")
    assert str(a.log.resolve()) in wts or str(a.log) in wts
    assert before <= set(a.event_ids())
    assert_no_dups(a)
    b.sync()
    assert bob_unread(b) >= {m1, m2}
    assert a.event_ids() == b.event_ids() == remote_event_ids(net.remote, net.env)
    a.sync()  # healthy again: nothing new
    assert a.event_ids() == b.event_ids()


def test_damage_worktree_registration_pruned(pair):
    net, a, b = pair
    mids = [a.seed("alice", f"before prune {i}", to=["bob"])["message_id"] for i in range(2)]
    before = set(a.event_ids())
    wtdir = a.path / ".git" / "worktrees"
    regs = [p for p in wtdir.iterdir() if p.name.startswith("a-sync")]
    assert regs, list(wtdir.iterdir())
    for p in regs:
        shutil.rmtree(p)
    a.git("worktree", "prune")
    mids.append(a.send("alice", "after prune", "--to", "bob")["message_id"])
    a.sync()
    assert before <= set(a.event_ids())
    assert_no_dups(a)
    assert a.git("-C", str(a.log), "rev-parse", "--abbrev-ref", "HEAD").strip() == "a-sync"
    b.sync()
    assert bob_unread(b) == set(mids)
    assert a.event_ids() == b.event_ids() == remote_event_ids(net.remote, net.env)


def _rm_index(c: Clone):
    for p in (c.path / ".thrum" / "var").glob("index.db*"):
        p.unlink()


def test_damage_index_deleted_between_sends_and_syncs(pair):
    net, a, b = pair
    m1 = a.send("alice", "one", "--to", "bob")["message_id"]
    _rm_index(a)
    m2 = b.send("bob", "two", "--to", "alice")["message_id"]
    a.sync()
    _rm_index(a)
    _rm_index(b)
    b.sync()
    a.ok("message", "edit", m1, "one (edited)", name="alice")
    _rm_index(a)
    sync_all(a, b)
    _rm_index(b)

    # settle read state first (inbox --all marks rows read), then compare answers
    a.json("inbox", "--all", "--limit", "100", name="alice")
    b.json("inbox", "--all", "--limit", "100", name="bob")
    sync_all(a, b)
    assert a.event_ids() == b.event_ids()
    _rm_index(a)
    _rm_index(b)
    views = {}
    for c, who in ((a, "alice"), (b, "bob")):
        views[c] = (c.json("team", "--all", name=who),
                    strip_perspective(c.json("inbox", "--all", "--limit", "100",
                                             name=who)["messages"]))
        _rm_index(c)
        again = (c.json("team", "--all", name=who),
                 strip_perspective(c.json("inbox", "--all", "--limit", "100",
                                          name=who)["messages"]))
        assert again == views[c], c
    assert views[a] == views[b]
    assert {m1, m2} == {m["message_id"] for m in views[a][1]}
    got = b.json("message", "get", m1, name="bob")["message"]
    assert got["body"]["content"] == "one (edited)"


def test_damage_torn_local_line_never_committed(pair):
    net, a, b = pair
    m1 = a.seed("alice", "synced first", to=["bob"])["message_id"]
    a.sync()
    m2 = a.seed("alice", "pending when the tear happens", to=["bob"])["message_id"]
    f = a.log / "messages" / "alice.jsonl"
    with open(f, "ab") as fh:
        fh.write(b'{"v":1,"event_id":"evt_TORNTORNTORN","type":"message.cre')
    # a brand-new file holding only a torn line
    (a.log / "messages" / "ghost.jsonl").write_bytes(b'{"v":1,"event_id":"evt_GHOST",')
    r = a.run("sync", "force", "--json")
    assert r.code == 0, r.describe()

    files = remote_files(net.remote, net.env)
    for name, data in files.items():
        if name.endswith(".jsonl"):
            assert_complete_lines(data, f"remote a-sync:{name}")
    assert b"TORNTORN" not in files["messages/alice.jsonl"]
    assert b"GHOST" not in files.get("messages/ghost.jsonl", b"")
    for m in (m1, m2):
        assert m.encode() in files["messages/alice.jsonl"]
    # the local commit never holds the torn bytes either
    local = subprocess.run(["git", "show", "a-sync:messages/alice.jsonl"], cwd=str(a.path),
                           env=a.env, capture_output=True, timeout=T).stdout
    assert_complete_lines(local, "local a-sync:messages/alice.jsonl")

    m3 = a.send("alice", "after the tear", "--to", "bob")["message_id"]
    a.sync()
    b.sync()
    assert bob_unread(b) == {m1, m2, m3}
    files = remote_files(net.remote, net.env)
    for name, data in files.items():
        if name.endswith(".jsonl"):
            assert_complete_lines(data, f"remote a-sync:{name}")


def test_damage_torn_line_on_remote_branch(pair):
    net, a, b = pair
    m1 = a.seed("alice", "real message", to=["bob"])["message_id"]
    sync_all(a, b)

    # a third clone publishes, with plain git, a file whose last line is torn
    c = net.clone("C")
    c.ok("init")
    wt = c.log
    src = wt / "messages" / "alice.jsonl"
    lines = [l for l in src.read_bytes().split(b"\n") if l]
    create = next(json.loads(l) for l in lines if json.loads(l)["type"] == "message.create")
    crafted = dict(create)
    crafted["event_id"] = "evt_01HZZZZZZZZZZZZZZZZZZZZZZZ"
    crafted["message_id"] = "msg_01HZZZZZZZZZZZZZZZZZZZZZZZ"
    crafted["body"] = dict(create["body"], content="crafted complete line")
    with open(src, "ab") as fh:
        fh.write(json.dumps(crafted, separators=(",", ":")).encode() + b"\n")
        fh.write(b'{"v":1,"event_id":"evt_TORNREMOTE","type":"message.create","mess')
    commit_all(wt, c.env, "torn on purpose")
    git("push", "-q", "origin", "a-sync", cwd=c.path, env=c.env)
    assert not remote_files(net.remote, net.env)["messages/alice.jsonl"].endswith(b"\n")

    for x in (a, b):
        r = x.run("sync", "force", "--json")
        assert r.code == 0, r.describe()
    for x in (a, b):
        ids = x.event_ids()
        assert crafted["event_id"] in ids
        assert all("TORNREMOTE" not in i for i in ids)
        assert_no_dups(x)
        data = (x.log / "messages" / "alice.jsonl").read_bytes()
        assert_complete_lines(data, f"{x}: messages/alice.jsonl")
    assert bob_unread(b) == {m1, crafted["message_id"]}
    # the remote is whole again after the clones' syncs, and the torn clone recovers too
    data = remote_files(net.remote, net.env)["messages/alice.jsonl"]
    assert_complete_lines(data, "remote a-sync:messages/alice.jsonl")
    r = c.run("sync", "force", "--json")
    assert r.code == 0, r.describe()
    sync_all(a, b)
    assert a.event_ids() == b.event_ids() == c.event_ids()
    assert_linear(net.remote, net.env)


# --------------------------------------------------------------------------- user repo

def _user_state(c: Clone) -> dict:
    idx = c.path / ".git" / "index"
    st = {"index": hashlib.sha256(idx.read_bytes()).hexdigest(),
          "index_mtime": idx.stat().st_mtime_ns}
    st["HEAD"] = c.git("rev-parse", "HEAD")
    st["symref"] = c.git("symbolic-ref", "HEAD")
    st["status"] = c.git("--no-optional-locks", "status", "--porcelain",
                         "--untracked-files=all")
    st["branches"] = c.git("for-each-ref", "--format=%(refname) %(objectname)",
                           "refs/heads/main", "refs/tags", "refs/stash")
    st["files"] = {str(p.relative_to(c.path)): p.read_bytes() for p in c.path.rglob("*")
                   if p.is_file() and ".git" not in p.parts and ".thrum" not in p.parts}
    return st


def test_user_repository_state_untouched(net):
    c = net.clone("U")
    # a user mid-work: a staged change, an unstaged change, an untracked file
    (c.path / "staged.txt").write_text("staged\n")
    c.git("add", "staged.txt")
    (c.path / "README").write_text("modified but not staged\n")
    (c.path / "untracked.txt").write_text("untracked\n")
    # hooks that would fail or leave traces if thrum ran them
    hooks = c.path / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    for h in ("pre-commit", "commit-msg", "pre-push", "post-checkout", "post-commit",
              "reference-transaction"):
        p = hooks / h
        p.write_text(f"#!/bin/sh\necho {h} >> \"$(git rev-parse --git-common-dir)/../HOOK_RAN\"\n"
                     "exit 1\n")
        p.chmod(0o755)
    before = _user_state(c)

    c.ok("init")
    c.quickstart("alice", "implementer", "auth")
    c.quickstart("bob", "reviewer", "api")
    c.send("alice", "hello", "--to", "bob")
    r = c.run("sync", "force", "--json")
    assert r.code == 0, r.describe()
    assert r.json["pushed"] is True
    c.ok("sync", "status")
    d = c.run("doctor")
    assert d.code == 0 and "All good" in d.out, d.describe()

    after = _user_state(c)
    assert not (c.path / "HOOK_RAN").exists(), (c.path / "HOOK_RAN").read_text()
    for k in before:
        assert after[k] == before[k], f"{k} changed:\n{before[k]!r}\n->\n{after[k]!r}"
    assert ".thrum" in (c.path / ".git" / "info" / "exclude").read_text()
    assert not (c.path / ".gitignore").exists()
    # thrum committed with its own identity (none is configured for git here)
    author = git("log", "-1", "--format=%an <%ae>", "a-sync", cwd=net.remote, env=net.env)
    assert author.strip() and author.strip() != "<>"


# --------------------------------------------------------------------------- linked worktrees

def test_linked_worktrees_share_store_and_sync_worktree(net):
    a = net.clone("A")
    a.quickstart("alice", "implementer", "auth")
    a.git("worktree", "add", "-q", str(net.tmp / "wt2"))
    wt2 = Clone(net.tmp / "wt2", net.env)
    wt2.quickstart("bob", "reviewer", "api")
    assert not (wt2.path / ".thrum" / "config.toml").exists()
    # identity files are always per worktree (SPEC §2)
    assert (wt2.path / ".thrum" / "identities" / "bob.json").exists()
    assert not (a.path / ".thrum" / "identities" / "bob.json").exists()

    mid = a.send("alice", "to the linked worktree", "--to", "bob")["message_id"]
    assert msg_ids(wt2.json("inbox", "--unread", name="bob")) == [mid]
    got = wt2.json("message", "get", mid, name="bob")["message"]
    assert got["body"]["content"] == "to the linked worktree"
    reply = wt2.json("reply", mid, "got it", name="bob")["message_id"]

    syncs = [l for l in a.git("worktree", "list", "--porcelain").splitlines()
             if l.startswith("worktree ") and "thrum-sync" in l]
    assert len(syncs) == 1, syncs
    assert not list((net.tmp / "wt2").glob(".git/thrum-sync"))  # .git is a file there

    r = wt2.sync()
    assert r["pushed"] is True, r
    assert ls_remote(net.remote, net.env) == a.rev("refs/heads/a-sync")
    assert wt2.status()["state"] == "synced"
    assert a.status()["state"] == "synced"  # the same store: one sync state

    b = net.clone("B")
    b.quickstart("carol", "observer", "docs")
    ids = set(msg_ids(b.json("inbox", "--all", "--limit", "100", name="carol")))
    assert ids == {mid, reply}
    syncs = [l for l in a.git("worktree", "list", "--porcelain").splitlines()
             if l.startswith("worktree ") and "thrum-sync" in l]
    assert len(syncs) == 1, syncs


# --------------------------------------------------------------------------- context sync

def _context_seen_by_bob(b: Clone):
    doc = b.json("context", "show", "--agent", "alice", name="bob")
    return doc["content"]


def test_context_sync_publishes_saved_context(pair):
    net, a, b = pair
    text = "## notes\nworking on the token refresh\nnext: tests\n"
    a.ok("context", "save", name="alice", input=text)
    saved = a.json("context", "show", name="alice")["content"]
    assert "working on the token refresh" in saved
    r = a.run("context", "sync", "--json", name="alice")
    assert r.code == 0, r.describe()
    assert r.json["pushed"] is True, r.json
    b.sync()
    assert _context_seen_by_bob(b) == saved
    # a fresh clone sees it too
    c = net.clone("C")
    c.quickstart("carol", "observer", "docs")
    assert c.json("context", "show", "--agent", "alice", name="carol")["content"] == saved


def test_context_sync_update_reaches_clone_with_older_copy(pair):
    """A second `context save` + `context sync` replaces what other clones already saw, and
    their later syncs do not bring the old version back."""
    net, a, b = pair
    a.ok("context", "save", name="alice", input="version one\n")
    a.ok("context", "sync", name="alice")
    b.sync()
    assert _context_seen_by_bob(b).startswith("version one")

    a.ok("context", "save", name="alice", input="version two\n")
    a.ok("context", "sync", name="alice")
    b.sync()
    assert _context_seen_by_bob(b).startswith("version two")
    sync_all(a, b)
    assert _context_seen_by_bob(b).startswith("version two")
    assert a.json("context", "show", name="alice")["content"].startswith("version two")
    c = net.clone("C")
    c.quickstart("carol", "observer", "docs")
    got = c.json("context", "show", "--agent", "alice", name="carol")["content"]
    assert got.startswith("version two")


# --------------------------------------------------------------------------- status fields

def test_sync_status_fields_and_states(pair):
    net, a, b = pair
    keys = {"remote", "branch", "local_only", "last_sync_at", "last_error", "ahead",
            "behind", "state"}
    st = a.status()
    assert keys <= set(st)
    assert st["remote"] == "origin" and st["branch"] == "a-sync"
    assert st["local_only"] is False and st["last_error"] is None
    assert TS_RE.match(st["last_sync_at"]), st
    assert st["ahead"] == 0 and st["behind"] == 0 and st["state"] == "synced"
    forced = a.sync()
    assert keys <= set(forced)

    # a pending local change: ahead
    a.seed("alice", "pending", to=["bob"])
    st = a.status()
    assert st["ahead"] >= 1 and st["state"] == "ahead", st

    # the remote moved and A fetched (plain git): behind + ahead = diverged
    b.seed("bob", "remote side", to=["alice"])
    b.sync()
    a.git("fetch", "-q", "origin")
    st = a.status()
    assert st["behind"] >= 1 and st["state"] == "diverged", st
    a.sync()
    st = a.status()
    assert (st["ahead"], st["behind"], st["state"]) == (0, 0, "synced"), st

    # human output
    out = a.ok("sync", "status").out
    assert "synced" in out and "origin" in out

    # a fresh clone that never synced
    c = net.clone("C")
    c.ok("init")
    st = c.status()
    assert keys <= set(st)
    assert st["last_sync_at"] is None and st["state"] == "never", st
