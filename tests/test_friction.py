"""The first hour: what a newcomer meets following the README and the coordination page.
The README tour runs as written; ids as the lists show them work everywhere; hints point
the right way; slow work says what it does on a terminal and nothing in a pipe; text is
never broken inside a word; doctor finds stale identities; refs show; `--body-file -`."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (REPO_ROOT, THRUM_CMD, THRUM_PY, assert_error, bare_remote, git,
                      ls_remote, make_env, make_repo, pid_alive, pid_file, thrum, var_dir,
                      wait_until)


# --------------------------------------------------------------------------- helpers

def thrum_on_path(tmp_path) -> Path:
    """A bin dir whose `thrum` runs this checkout (as `thrum install` would)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "thrum"
    exe.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(
        "'%s'" % a.replace("'", "'\\''") for a in THRUM_CMD))
    exe.chmod(0o755)
    return bindir


def run_tty(args, cwd, env, cols=80, name=None, timeout=60):
    """Run thrum with stdout and stderr on a pseudo-terminal of `cols` columns; return
    (exit code, everything it wrote, as text)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    env = dict(env, **({"THRUM_NAME": name} if name else {}))
    p = subprocess.Popen([*THRUM_CMD, *map(str, args)], cwd=str(cwd), env=env,
                         stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = p.wait(timeout=timeout)
    return code, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def readme_tour() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("## A short tour")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    return block.group(1)


# --------------------------------------------------------------------------- README tour

def test_readme_tour_runs_as_written_in_a_fresh_repo(tmp_path):
    """Pasted in order into a fresh `git init`, every command of the tour succeeds."""
    env = make_env(tmp_path / "home")
    repo = tmp_path / "fresh"
    repo.mkdir()
    git("init", "-q", cwd=repo, env=env)  # no commit at all: a truly fresh repository
    env["PATH"] = "%s:%s" % (thrum_on_path(tmp_path), env["PATH"])
    script = "set -euo pipefail\nset -x\n" + readme_tour()
    p = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, "the README tour failed:\n%s\n%s" % (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    # what the tour shows did happen
    assert "Reply sent:" in p.stdout and "To: @alice" in p.stdout
    assert "refs: bd:bd-123" in p.stdout        # the ref is visible in the human inbox
    assert "daemon stopped" in p.stdout
    inbox = json.loads(subprocess.run(
        ["thrum", "inbox", "--json"], cwd=repo, env=dict(env, THRUM_NAME="alice"),
        capture_output=True, text=True, check=True).stdout)
    assert [m["body"]["content"] for m in inbox["messages"]] == ["done, see commit abc123"]
    bob = json.loads(subprocess.run(
        ["thrum", "inbox", "--json", "--all"], cwd=repo, env=dict(env, THRUM_NAME="bob"),
        capture_output=True, text=True, check=True).stdout)
    assert bob["total"] == 4  # three from alice (role, direct, broadcast) and the reply


def test_readme_first_screen_keeps_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    first = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    cmds = [ln for ln in first.splitlines() if ln.strip() and not ln.startswith("#")]
    assert [c.split("#")[0].split() for c in cmds] == [
        ["python3", "thrum.py", "demo"], ["bash", ".ci/run"]]


# --------------------------------------------------------------------------- short ids

def test_ids_as_the_lists_show_them_are_unique_and_accepted(team, monkeypatch):
    """Messages sent within the same second (even the same millisecond) share their first
    8-10 ULID characters: the lists show each id as long as this store needs, and every
    command takes what they show."""
    frozen = time.time()
    monkeypatch.setattr(thrum.time, "time", lambda: frozen)  # one millisecond for all
    sent = [team.seed("alice", "burst %d" % i, to=["bob"]) for i in range(4)]
    monkeypatch.undo()
    sent.append(team.seed("alice", "later", to=["bob"]))
    assert len({m["message_id"][:12] for m in sent}) < len(sent)  # 8 chars are ambiguous
    full = {m["message_id"] for m in sent}
    piped = team.t.ok("inbox", "--unread", "--limit", "20", name="bob").out
    assert set(re.findall(r"^[●○] (msg_\w+)", piped, re.M)) == full  # piped: full ids
    code, out = run_tty(["inbox", "--unread", "--limit", "20"], team.path, team.env,
                        cols=100, name="bob")
    assert code == 0, out
    shown = re.findall(r"^[●○] (msg_\w+)", out, re.M)
    assert len(shown) == 5 and len(set(shown)) == 5
    assert any(len(short) < 30 for short in shown)  # the terminal gets short ones
    for short in shown:
        assert len(short) >= 4 + 12 and len(short) < 30 or short in full
        matches = [f for f in full if f.startswith(short)]
        assert len(matches) == 1, (short, matches)
        got = team.t.json("message", "get", short, name="bob")["message"]
        assert got["message_id"] == matches[0]
        assert got["short_id"] == short
    # the same forms in --json and for reply
    doc = team.t.json("inbox", "--limit", "20", name="bob")
    assert sorted(m["short_id"] for m in doc["messages"]) == sorted(shown)
    r = team.t.json("reply", shown[-1], "got it", name="bob")
    assert r["recipients"] == ["alice"]
    # an 8-character prefix of the burst is ambiguous: exit 2 naming the matches
    r = team.t.fail(2, "message", "get", sent[0]["message_id"][4:12], name="bob",
                    fragments=["ambiguous"])
    assert sent[0]["message_id"] in r.err


# --------------------------------------------------------------------------- hints

def test_unknown_recipient_from_another_clone_hints_at_sync(net):
    a, b = net.clone("a"), net.clone("b")
    a.register("alice", "lead", "core")
    a.synced()
    b.register("impl1", "implementer", "auth")
    b.synced()
    r = a.run("send", "hi", "--to", "@impl1", name="alice")
    assert_error(r, 2, "unknown recipient: @impl1", "thrum sync force")
    a.ok("sync", "force")
    assert a.send("alice", "hi", "--to", "@impl1")["recipients"] == ["impl1"]


def test_unknown_recipient_without_a_remote_does_not_mention_sync(team):
    r = team.t.fail(2, "send", "hi", "--to", "@nobody", name="alice",
                    fragments=["unknown recipient: @nobody", "thrum team --all"])
    assert "sync force" not in r.err


def test_a_remote_not_named_origin_gets_a_hint(tmp_path, env):
    remote = bare_remote(tmp_path / "up.git", env)
    repo = make_repo(tmp_path / "w", env=env)
    git("remote", "add", "upstream", str(remote), cwd=repo, env=env)
    t = lambda *a, **k: thrum_run(repo, env, *a, **k)  # noqa: E731
    assert t("quickstart", "--name", "a", "--role", "r", "--module", "m").code == 0
    st = t("sync", "status").out
    assert "no remote named 'origin'" in st and "thrum config set sync.remote upstream" in st
    doc = json.loads(t("sync", "status", "--json").out)
    assert doc["remote"] is None and doc["remote_missing"] == {"name": "origin",
                                                               "remotes": ["upstream"]}
    assert t("config", "set", "sync.remote", "upstream").code == 0
    assert t("sync", "force").code == 0
    assert ls_remote(remote, env)


def thrum_run(cwd, env, *args, name=None):
    from conftest import run_thrum
    return run_thrum(list(args), cwd, env, name=name)


def test_sync_status_after_a_failure_says_when_it_failed_and_when_it_last_worked(net):
    a = net.clone("a")
    a.register("alice", "lead", "core")
    a.ok("sync", "force")
    moved = net.remote.with_name("moved.git")
    net.remote.rename(moved)
    try:
        assert a.run("sync", "force").code == 1
        st = a.ok("sync", "status").out
        assert "State:   error" in st
        assert "Last sync: failed just now" in st and "Last good sync: just now" in st
        assert "Last error: sync failed: cannot fetch" in st
        assert "error, last good sync" in a.ok("status", name="alice").out
    finally:
        moved.rename(net.remote)
    a.ok("sync", "force")
    st = a.ok("sync", "status").out
    assert "failed" not in st and "Last sync: just now" in st


# --------------------------------------------------------------------------- progress

def test_sync_force_says_what_it_does_on_a_terminal_only(net):
    a = net.clone("a")
    a.register("alice", "lead", "core")
    code, text = run_tty(["sync", "force"], a.path, a.env)
    assert code == 0, text
    assert "thrum: fetching a-sync from origin…" in text
    assert "thrum: pushing a-sync to origin…" in text
    assert "\r\x1b[K" in text  # the status line is wiped before the result
    # piped: stderr stays empty
    r = a.run("sync", "force")
    assert r.code == 0 and r.err == "", r.describe()


def test_ci_run_says_what_it_is_doing():
    text = (REPO_ROOT / ".ci" / "run").read_text()
    before_pip = text[:text.index("pip install")]
    before_pytest = text[:text.index("python -m pytest")]
    assert re.search(r'echo "ci: installing .*' + r'" >&2', before_pip)
    assert re.search(r'echo "ci: running the test suite.*" >&2', before_pytest)


def test_every_subcommand_help_has_a_description(t):
    for args in (["sync", "force"], ["sync", "status"], ["session", "end"],
                 ["daemon", "start"], ["message", "get"], ["agent", "register"]):
        out = t.ok(*args, "--help").out
        usage, rest = out.split("\n\n", 1)
        assert not rest.startswith("options:"), "`thrum %s --help` has no description" % (
            " ".join(args))
    assert "fetch and merge" in t.ok("sync", "force", "--help").out


# --------------------------------------------------------------------------- session end

def test_session_end_pushes_so_other_clones_see_the_agent_go(net):
    a, b = net.clone("a"), net.clone("b")
    a.register("alice", "lead", "core")
    a.synced()
    b.ok("init")
    assert [m["agent_id"] for m in b.json("team")["members"]] == ["alice"]
    r = a.ok("session", "end", name="alice")
    assert "(pushed)" in r.out and r.err == ""
    b.ok("sync", "force")
    assert b.json("team")["members"] == []


def test_session_end_with_an_unreachable_remote_warns_and_keeps_the_end(net):
    a = net.clone("a")
    a.register("alice", "lead", "core")
    a.synced()
    moved = net.remote.with_name("gone.git")
    net.remote.rename(moved)
    try:
        r = a.run("session", "end", "--json", name="alice")
        assert r.code == 0, r.describe()
        assert "thrum: warning: not pushed:" in r.err and "thrum sync force" in r.err
        assert r.json["pushed"] is False
    finally:
        moved.rename(net.remote)
    assert a.json("team")["members"] == []


def test_session_end_without_a_remote_says_nothing_of_pushing(team):
    r = team.t.ok("session", "end", "--json", name="alice")
    assert r.json["pushed"] is None and r.err == ""


# --------------------------------------------------------------------------- wrapping

LONG_PATH = "tests/test-rate-limiter-burst-handling-with-a-very-long-name.py"


def test_piped_output_is_never_wrapped_or_cut(team):
    body = "Please look at %s and %s before the release " % (LONG_PATH, LONG_PATH) * 3
    team.seed("alice", body.strip(), to=["bob"], refs=["bd:bd-123"])
    team.api("session_set_intent", {"text": "A rather long intent " * 6}, name="alice")
    out = team.t.ok("inbox", "--unread", name="bob").out
    assert body.strip() in out.splitlines()[1]  # the whole body on one line
    prime = team.t.ok("prime", name="bob").out
    assert any(body.strip() in ln for ln in prime.splitlines())
    assert ("A rather long intent " * 6).strip() in team.t.ok("team", name="bob").out


def test_terminal_output_wraps_at_spaces_only(team):
    body = "Please look at %s and then %s before the release, thanks" % (LONG_PATH, LONG_PATH)
    team.seed("alice", body, to=["bob"])
    team.seed("carol", "x" * 200, to=["bob"])
    code, text = run_tty(["inbox", "--unread"], team.path, team.env, cols=60, name="bob")
    assert code == 0, text
    lines = text.splitlines()
    for ln in lines:
        assert len(ln) <= 60 or " " not in ln.strip(), "a wrappable line is too wide: %r" % ln
    assert any(ln.strip() == LONG_PATH or LONG_PATH in ln for ln in lines)
    assert not any(ln.rstrip().endswith("-") for ln in lines), "broke at a hyphen"
    assert ("  " + "x" * 200) in lines  # one word longer than the terminal: left whole


def test_human_output_fits_the_terminal(team):
    """On an 80-column terminal nothing that can wrap at a space goes past the edge."""
    team.send("alice", "word " * 80, "--to", "bob", "--scope", "module:auth")
    team.t.ok("session", "set-intent", "A rather long intent " * 6, name="alice")
    for args in (["inbox", "--unread"], ["team"], ["status"], ["overview"], ["sent"]):
        code, text = run_tty(args, team.path, team.env, cols=80,
                             name="bob" if args[0] != "sent" else "alice")
        assert code == 0, text
        wide = [ln for ln in text.splitlines() if len(ln) > 80]
        assert not wide, f"`thrum {' '.join(args)}` has lines over 80 columns: {wide[:2]}"


# --------------------------------------------------------------------------- doctor

def test_doctor_reports_and_removes_a_stale_identity(tmp_path, env):
    repo = make_repo(tmp_path / "main", env=env)
    other = tmp_path / "other"
    git("worktree", "add", "-q", str(other), cwd=repo, env=env)
    t = lambda *a, **k: thrum_run(k.pop("cwd", repo), env, *a, **k)  # noqa: E731
    assert t("quickstart", "--name", "dave", "--role", "r", "--module", "m").code == 0
    assert t("quickstart", "--name", "erin", "--role", "r", "--module", "m").code == 0
    # another worktree takes the name: this worktree's dave.json speaks for nobody now
    assert t("quickstart", "--name", "dave", "--role", "r", "--module", "m", "--force",
             cwd=other).code == 0
    assert_error(t("whoami"), 3, "several identities")
    r = t("doctor")
    assert r.code == 1 and "identity @dave: stale" in r.out and "--fix" in r.out, r.out
    r = t("doctor", "--fix")
    assert r.code == 0 and "removed" in r.out, r.out
    assert not (repo / ".thrum" / "identities" / "dave.json").exists()
    assert (other / ".thrum" / "identities" / "dave.json").exists()
    assert t("whoami", "--field", "agent_id").out.strip() == "erin"  # no THRUM_NAME needed
    assert t("doctor").code == 0


def test_doctor_reports_the_identity_of_a_deleted_agent(team):
    (team.path / ".thrum" / "identities" / "zed.json").write_text(json.dumps({
        "agent_id": "zed", "role": "r", "module": "m", "worktree": str(team.path),
        "session_id": None}))
    r = team.t("doctor")
    assert r.code == 1 and "identity @zed: stale" in r.out and "deleted" in r.out, r.out
    assert team.t("doctor", "--fix").code == 0
    assert not (team.path / ".thrum" / "identities" / "zed.json").exists()


# --------------------------------------------------------------------------- refs, who-has

def test_refs_and_scopes_show_in_the_human_inbox(team):
    team.send("alice", "see the ticket", "--to", "@bob", "--ref", "bd:123", "--ref",
              "pr:7", "--scope", "module:auth")
    out = team.t.ok("inbox", name="bob").out
    assert "refs: bd:123, pr:7" in out and "scopes: module:auth" in out


def test_who_has_in_a_shared_worktree_lists_active_agents_once(team):
    (team.path / "src.py").write_text("x = 1\n")
    git("add", "src.py", cwd=team.path, env=team.env)
    team.api("session_end", name="carol")  # registered here, but not working now
    doc = team.t.json("who-has", "src.py")
    assert sorted(a["agent_id"] for a in doc["agents"]) == ["alice", "bob"]
    assert all(a["shared"] for a in doc["agents"])
    out = team.t.ok("who-has", "src.py").out.strip().splitlines()
    assert len(out) == 1 and "@alice, @bob are editing src.py" in out[0]
    assert "share one worktree" in out[0]


# --------------------------------------------------------------------------- body file

def test_body_file_dash_reads_standard_input(team):
    r = team.t.json("send", "--to", "@bob", "--body-file", "-", name="alice",
                    input="from stdin\n")
    assert team.get("bob", r["message_id"])["body"]["content"] == "from stdin"
    (team.path / "-").write_text("from a file named dash")
    r = team.t.json("send", "--to", "@bob", "--body-file", "./-", name="alice")
    assert team.get("bob", r["message_id"])["body"]["content"] == "from a file named dash"
    team.t.fail(2, "send", "--to", "@bob", "--body-file", "-", "--stdin", name="alice",
                input="x", fragments=["ambiguous"])
