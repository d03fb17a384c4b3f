"""Regression tests for hostile or damaged input: crafted remote branches, malformed
log lines, closed streams, terminal control characters. Each step breaks one thing."""
import json
import os
import subprocess

from conftest import THRUM_CMD, assert_error, git, log_dir, make_repo, run_thrum


def test_symlinks_on_the_remote_branch_are_never_followed(pair, tmp_path):
    net, a, b = pair
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET\n")
    target = tmp_path / "target.txt"
    target.write_text("original\n")
    # An attacker pushes symlinks into the a-sync branch with plain git.
    atk = tmp_path / "atk"
    git("clone", "-q", "-b", "a-sync", str(net.remote), str(atk), cwd=tmp_path, env=net.env)
    (atk / "messages").mkdir(exist_ok=True)
    os.symlink(secret, atk / "agents" / "leak.jsonl")
    os.symlink(target, atk / "messages" / "mallory.jsonl")
    git("add", "-A", cwd=atk, env=net.env)
    git("-c", "user.name=m", "-c", "user.email=m@m", "commit", "-qm", "x", cwd=atk, env=net.env)
    git("push", "-q", "origin", "a-sync", cwd=atk, env=net.env)
    # A fresh clone checks them out; another clone merges them.
    victim = net.clone("victim")
    victim.quickstart("vic", "tester", "qa")
    victim.ok("sync", "force")
    a.ok("sync", "force")
    # Then the attacker puts a regular file where the victim has a symlink checked out.
    git("fetch", "-q", "origin", "a-sync", cwd=atk, env=net.env)
    git("reset", "-q", "--hard", "FETCH_HEAD", cwd=atk, env=net.env)
    (atk / "messages").mkdir(exist_ok=True)
    if (atk / "messages" / "mallory.jsonl").is_symlink():
        os.unlink(atk / "messages" / "mallory.jsonl")
    (atk / "messages" / "mallory.jsonl").write_text('PWNED {"event_id":"evt_x"}\n')
    git("add", "-A", cwd=atk, env=net.env)
    git("-c", "user.name=m", "-c", "user.email=m@m", "commit", "-qm", "y", cwd=atk, env=net.env)
    git("push", "-q", "origin", "a-sync", cwd=atk, env=net.env)
    victim.ok("sync", "force")
    assert target.read_text() == "original\n", "sync appended through a symlink"
    assert secret.read_text() == "TOP SECRET\n"
    shown = git("show", "a-sync:agents/leak.jsonl", cwd=net.remote, env=net.env, check=False)
    assert "TOP SECRET" not in shown, "sync committed a symlink target's contents"
    # Nothing outside the log layout is committed, e.g. identities under the worktree.
    files = git("ls-tree", "-r", "--name-only", "a-sync", cwd=net.remote, env=net.env).split()
    assert not [f for f in files if f.startswith(".thrum")]


def _append(path, line):
    with open(path, "ab") as f:
        f.write(line if isinstance(line, bytes) else line.encode())


def test_malformed_events_are_skipped_the_same_way_in_any_batch(team):
    t, log = team.t, team.log / "messages" / "alice.jsonl"
    team.seed("alice", "real", to=["bob"])
    base = {"v": 1, "type": "message.create", "timestamp": "2026-01-01T00:00:00.000000Z",
            "origin": "o", "agent_id": "alice", "recipients": ["bob"],
            "audiences": [{"type": "agent", "value": "bob"}], "scopes": [], "refs": []}
    good = dict(base, event_id="evt_good", message_id="msg_01GOOD0000000000000000000A",
                body={"format": "markdown", "content": "extra field ok"}, meta={"x": 1})
    _append(log, json.dumps(good) + "\n")
    before = t.json("inbox", "--unread", name="bob")["total"]
    bad_lines = [
        dict(base, event_id="evt_b1", body={"content": "no id"}),                # no message_id
        dict(base, event_id="evt_b2", message_id="msg_B2", recipients=[1, 2],
             body={"content": "x"}),
        dict(base, event_id="evt_b3", message_id="msg_B3", refs=[{"type": "mention"}],
             body={"content": "x"}),
        dict(base, event_id="evt_b4", message_id="msg_B4", agent_id=None, body={"content": "x"}),
        {"v": 1, "type": "agent.update", "event_id": "evt_b5", "timestamp": base["timestamp"],
         "agent_id": "bob", "task": 123},
        {"v": 1, "type": "agent.session.start", "event_id": "evt_b6", "session_id": "ses_x",
         "timestamp": base["timestamp"], "agent_id": "bob", "pid": 10 ** 20},
    ]
    for ev in bad_lines:
        _append(log, json.dumps(ev) + "\n")
    _append(log, b'{"v":1,"type":"message.create","structured":NaN}\n')
    for cmd in (["inbox", "--all", "--unread"], ["sent"], ["team", "--all"], ["overview"], ["prime"],
                ["agent", "list", "--context"]):
        r = t(*cmd, "--json", name="bob")
        assert r.code == 0, r.describe()
    after = t.json("inbox", "--unread", name="bob")["total"]
    assert after == before
    docs = [t.json(*c, name="bob") for c in (["inbox", "--all", "--unread"], ["team", "--all"])]
    for f in team.path.joinpath(".thrum", "var").glob("index.db*"):
        f.unlink()
    again = [t.json(*c, name="bob") for c in (["inbox", "--all", "--unread"], ["team", "--all"])]
    assert docs == again


def test_two_corrupt_lines_never_join_into_an_event(team):
    t, log = team.t, team.log / "messages" / "alice.jsonl"
    team.seed("alice", "real", to=["carol"])
    first = ('{"v":1,"event_id":"evt_ghost","type":"message.create","timestamp":'
             '"2026-01-01T00:00:00.000000Z","origin":"o","message_id":"msg_01GHOST000000000000'
             '0000000","agent_id":"alice","body":{"content":"ghost"},"recipients":["bob"')
    _append(log, first + "\n")
    assert t.json("inbox", "--unread", name="bob")["total"] == 0
    _append(log, '"carol"],"audiences":[],"scopes":[],"refs":[]}\n')  # would join as one
    assert t.json("inbox", "--unread", name="bob")["total"] == 0
    for f in team.path.joinpath(".thrum", "var").glob("index.db*"):
        f.unlink()
    assert t.json("inbox", "--unread", name="bob")["total"] == 0


def test_a_replaced_log_file_is_read_again(team):
    t = team.t
    team.seed("alice", "one", to=["bob"])
    git("worktree", "remove", "--force", str(team.log), cwd=team.path, env=team.env)
    team.send("alice", "two", "--to", "bob")  # a new file with the same tail bytes
    got = {m["body"]["content"] for m in t.json("inbox", "--all", name="bob")["messages"]}
    assert "two" in got


def test_streams_and_terminal_output(team):
    t = team.t
    r = run_thrum(["send", "--stdin", "--to", "bob"], team.path, team.env, name="alice",
                  extra_env=None)
    # stdin is /dev/null in the harness: an empty body, refused
    assert_error(r, 2)
    team.seed("alice", "hi\x1b[2Jthere\rX", to=["bob"])
    r = t.ok("inbox", "--unread", name="bob")
    assert "\x1b" not in r.out and "\r" not in r.out and "\\x1b[2J" in r.out
    r = t("send", "x", "--to", "a\nthrum: error: fake", name="alice")
    assert_error(r, 2)
    assert len(r.error_lines) == 1 and "fake" in r.error_lines[0]
    doc = t("--json", "inbox", "--help", name="bob")
    assert doc.code == 0 and "usage" in doc.json["help"]
    assert_error(t("--json"), 2)
    assert "error" in t("--json").json


def test_autosync_failure_joins_the_result_document(tmp_path, env):
    repo = make_repo(tmp_path / "r", env=env)
    git("remote", "add", "origin", str(tmp_path / "missing.git"), cwd=repo, env=env)
    assert run_thrum(["quickstart", "--name", "ci", "--role", "pipeline", "--module", "b"],
                     repo, env, name="ci").code == 0
    r = run_thrum(["send", "done", "--broadcast", "--json"], repo, env, name="ci",
                  extra_env={"THRUM_AUTOSYNC": "1"})
    assert r.code == 1
    doc = r.json
    assert doc["message_id"].startswith("msg_") and doc["error"]["exit_code"] == 1
    assert "THRUM_AUTOSYNC" in r.err
    lines = (log_dir(repo) / "messages" / "ci.jsonl").read_text().splitlines()
    assert len(lines) == 1, "the message is stored even though its sync failed"


def test_refusals_store_nothing(tmp_path, env):
    repo = make_repo(tmp_path / "r", env=env)
    assert run_thrum(["init"], repo, env).code == 0
    r = run_thrum(["quickstart", "--name", "carol", "--role", "impl", "--module", "m",
                   "--intent", "a\nb"], repo, env, name="carol")
    assert_error(r, 2)
    assert not (log_dir(repo) / "agents" / "carol.jsonl").exists()
    assert not (repo / ".thrum" / "identities" / "carol.json").exists()
    assert_error(run_thrum(["session", "start", "--pid", str(10 ** 20)], repo, env), 2)


def test_agents_starting_at_once_in_a_fresh_repo_all_register(tmp_path, env, procs):
    repo = make_repo(tmp_path / "r", env=env)
    names = ["a1", "b2", "c3", "d4", "e5"]
    ps = [procs.popen([*THRUM_CMD, "quickstart", "--name", n, "--role", "r" + n, "--module",
                       "m", "-q"], cwd=repo, env=dict(env, THRUM_NAME=n),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in names]
    for p in ps:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert b"warning" not in err, err.decode()
    assert run_thrum(["rebuild"], repo, env).code == 0
    team = run_thrum(["team", "--all", "--json"], repo, env, name="a1").json
    assert sorted(m["agent_id"] for m in team["members"]) == names
    assert (log_dir(repo) / ".git").is_file(), "the sync worktree is a real git worktree"
