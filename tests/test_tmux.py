"""tmux-launched agents and nudges (SPEC §12), on a private tmux server (its own socket,
TMUX_TMPDIR in a temp dir): never the user's default server. The server is killed in the
`procs` teardown, with every other background process of the test.

Negative checks ("nothing is typed") wait a short time: the nudger logs no decision yet
that a test could wait for. Where a positive event can stand in, it does (a later message's
nudge, which comes after anything an earlier one would have caused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import (THRUM_PY, api, assert_alive, assert_error, bare_remote, clone, make_env,
                      make_repo, make_team, run_thrum, wait_until)

NUDGE = "New message from @alice -- run `thrum inbox --unread`"
#: (A nudger may press Enter again when the pane showed no sign of the first; it logs
#: "nudged pane ..." after the last one, so the tests wait for that line: a stray Enter
#: would show up as an empty line in a reader's log.)

READER = """\
import sys
with open(sys.argv[1], "a", buffering=1) as log:
    for line in sys.stdin:
        log.write(line)
"""


class Tmux:
    """A private tmux server for one test."""

    def __init__(self, base: Path):
        self.dir = base / "tmux"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = str(self.dir / "server.sock")

    def env(self, env) -> dict:
        return dict(env, THRUM_TMUX_SOCKET=self.sock, TMUX_TMPDIR=str(self.dir))

    def __call__(self, *args, check=True) -> str:
        p = subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"], "TMUX_TMPDIR": str(self.dir)})
        if check:
            assert p.returncode == 0, (args, p.stderr)
        return p.stdout if check else p

    def alive(self, session) -> bool:
        return self("has-session", "-t", "=" + session, check=False).returncode == 0

    def kill(self):
        self("kill-server", check=False)


@pytest.fixture
def tmux(tmp_path, procs):
    t = Tmux(tmp_path)
    procs.on_teardown(t.kill)
    return t


@pytest.fixture
def tteam(tmp_path, tmux):
    """The standard team (alice, bob, carol registered in the repo), with the private
    tmux server in its environment."""
    team = make_team(tmp_path)
    team.env = tmux.env(team.env)
    team.t.env = team.env
    (tmp_path / "reader.py").write_text(READER)
    team.reader = str(tmp_path / "reader.py")
    return team


def start_reader(team, session, name, log, *extra):
    """`tmux create` for `name` with a pane that logs every line it reads."""
    r = team.t.json("tmux", "create", session, "--name", name, "--role", "worker",
                    "--module", "m", *extra, "--force", "--command", sys.executable,
                    team.reader, str(log))
    wait_until(lambda: team_pane_ready(team, r["pane"]), 20, "the pane's reader")
    return r


def team_pane_ready(team, pane) -> bool:
    p = subprocess.run(["tmux", "-S", team.env["THRUM_TMUX_SOCKET"], "display-message", "-p",
                        "-t", pane, "#{pane_current_command}"], capture_output=True, text=True)
    return p.returncode == 0 and "python" in p.stdout


def nudge_log(team) -> str:
    """What the nudgers of a store without a daemon decided (.thrum/var/nudge/nudge.log)."""
    p = team.path / ".thrum" / "var" / "nudge" / "nudge.log"
    return p.read_text() if p.exists() else ""


def lines(path: Path) -> list:
    return path.read_text().splitlines() if path.exists() else []


# --------------------------------------------------------------------------- create

def test_create_registers_first_and_scrubs_the_environment(tmp_path, tmux):
    env = make_env(tmp_path / "home")
    repo = make_repo(tmp_path / "repo", env=env)
    env = tmux.env(dict(env, THRUM_ROLE="leaked", THRUM_SYNC_INTERVAL="9s",
                        THRUM_NAME="someone"))
    out = tmp_path / "pane"
    out.mkdir()
    script = (f"env > {out}/env.txt; {sys.executable} {THRUM_PY} whoami --json > "
              f"{out}/who.tmp && mv {out}/who.tmp {out}/who.json; exec sleep 600")
    r = run_thrum(["tmux", "create", "w1", "--name", "dave", "--role", "tester", "--module",
                   "qa", "--json", "--command", "sh", "-c", script], repo, env)
    assert r.code == 0, r.describe()
    res = r.json
    assert res["session"] == "w1" and res["agent_id"] == "dave" and res["registered"] is True
    assert res["pane"].startswith("%") and res["socket"] == tmux.sock
    who = json.loads(wait_until(lambda: (out / "who.json").exists() and
                                (out / "who.json").read_text(), 20, "whoami in the pane"))
    assert who["agent_id"] == "dave" and who["tmux_session"] == "w1"
    assert who["session_id"]  # registered and in a session before the pane's command ran
    pane_env = dict(ln.split("=", 1) for ln in (out / "env.txt").read_text().splitlines()
                    if "=" in ln)
    assert pane_env["THRUM_NAME"] == "dave"
    assert [k for k in pane_env if k.startswith("THRUM_")] == ["THRUM_NAME"]
    # the identity records session, pane and socket; the pane's process is the pid
    ident = json.loads((repo / ".thrum" / "identities" / "dave.json").read_text())
    assert (ident["tmux_session"], ident["tmux_pane"], ident["tmux_socket"]) == (
        "w1", res["pane"], tmux.sock)
    pane_pid = int(tmux("display-message", "-p", "-t", res["pane"], "#{pane_pid}").strip())
    me = run_thrum(["whoami", "--json"], repo, dict(env, THRUM_NAME="dave")).json
    assert me["pid"] == pane_pid == res["pid"] and me["tmux_pane"] == res["pane"]
    human = run_thrum(["whoami"], repo, dict(env, THRUM_NAME="dave"))
    assert "Tmux:     w1" in human.out
    team = run_thrum(["team", "--json"], repo, env).json["members"]
    assert [m["tmux"]["session"] for m in team if m["agent_id"] == "dave"] == ["w1"]
    st = run_thrum(["status"], repo, dict(env, THRUM_NAME="dave"))
    assert "Tmux:    w1" in st.out


def test_the_command_is_taken_word_for_word(tteam, tmux, tmp_path):
    """After --command every word is the pane's (only thrum's --json is taken out), and
    `--command --` passes even that."""
    out = tmp_path / "args.txt"
    script = f'printf "%s|" "$@" > {out}.tmp && mv {out}.tmp {out}; exec sleep 600'
    r = tteam.t.json("tmux", "create", "w1", "--name", "dave", "--role", "r", "--module",
                     "m", "--command", "sh", "-c", script, "sh", "--name", "x", "--timeout",
                     "5", "-q", "--verbose")
    assert r["command"][-6:] == ["--name", "x", "--timeout", "5", "-q", "--verbose"]
    got = wait_until(lambda: out.exists() and out.read_text(), 20, "the pane's arguments")
    assert got == "--name|x|--timeout|5|-q|--verbose|"
    out.unlink()
    r = tteam.t("tmux", "create", "w2", "--name", "erin", "--role", "r", "--module", "m",
                "--command", "--", "sh", "-c", script, "sh", "--json")
    assert r.code == 0 and not r.out.lstrip().startswith("{"), r.describe()
    assert wait_until(lambda: out.exists() and out.read_text(), 20, "the args") == "--json|"


def test_refusals_and_rollback(tteam, tmux, tmp_path):
    t = tteam.t
    assert_error(t("tmux", "create", "a:b", "--name", "x1", "--role", "r", "--module", "m"),
                 2, "invalid tmux session name")
    assert_error(t("tmux", "create", "s1", "--name", "x1", "--role", "r", "--module", "m",
                   "--cwd", str(tmp_path / "nope")), 2, "not a directory")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert_error(t("tmux", "create", "s1", "--name", "x1", "--role", "r", "--module", "m",
                   "--cwd", str(plain)), 2, "not in a git repository")
    assert_error(t("tmux", "create", "s1", "--name", "x1", "--role", "r", "--module", "m",
                   "--command", "no-such-program-xyz"), 2, "command not found")
    assert_error(t("tmux", "create", "s1", "--name", "Bad Name", "--role", "r", "--module",
                   "m"), 2)
    names = lambda: [m["agent_id"] for m in t.json("team", "--all")["members"]]  # noqa: E731
    assert "x1" not in names() and not tmux.alive("s1")
    # a command that exits at once: exit 1, and the new agent is rolled back
    r = t("tmux", "create", "s2", "--name", "x2", "--role", "r", "--module", "m",
          "--command", "false")
    assert_error(r, 1, "exited as soon as it started")
    assert "x2" not in names() and not tmux.alive("s2")
    assert not (tteam.path / ".thrum" / "identities" / "x2.json").exists()
    # what exists is refused (5) unless --force
    start_reader(tteam, "s3", "x3", tmp_path / "x3.log")
    assert_error(t("tmux", "create", "s3", "--name", "x4", "--role", "r", "--module", "m",
                   "--command", "sleep", "100"), 5, "already exists")
    assert_error(t("tmux", "create", "s4", "--name", "bob", "--role", "r", "--module", "m",
                   "--command", "sleep", "100"), 5, "already registered")
    assert not tmux.alive("s4")
    r = t.json("tmux", "create", "s4", "--name", "bob", "--role", "reviewer", "--module",
               "api", "--force", "--command", "sleep", "100")
    assert r["registered"] is False and tmux.alive("s4")
    # a missing name is a usage error
    assert_error(t("tmux", "create", "s5"), 2)


def test_kill_is_exact_and_ends_the_agents_session(tteam, tmux, tmp_path):
    t = tteam.t
    foo = t.json("tmux", "create", "foo", "--name", "fooer", "--role", "r", "--module", "m",
                 "--command", "sleep", "600")
    t.json("tmux", "create", "foo-bar", "--name", "foobarer", "--role", "r", "--module",
           "m", "--command", "sleep", "600")
    listed = t.json("tmux", "list")["agents"]
    assert {(a["agent_id"], a["session"], a["alive"]) for a in listed} == {
        ("fooer", "foo", True), ("foobarer", "foo-bar", True)}
    assert_error(t("tmux", "kill", "fo"), 4, "no tmux session fo")
    assert tmux.alive("foo") and tmux.alive("foo-bar")
    r = t.json("tmux", "kill", "foo")
    assert r["killed"] is True and r["agents"] == ["fooer"] and r["ended"] == [
        foo["session_id"]]
    assert not tmux.alive("foo") and tmux.alive("foo-bar")
    who = t.json("whoami", name="fooer")
    assert who["session_id"] is None and who["tmux_session"] is None
    assert [a["agent_id"] for a in t.json("tmux", "list")["agents"]] == ["foobarer"]
    r = t.json("tmux", "kill", "--name", "foobarer")
    assert r["session"] == "foo-bar" and not tmux.alive("foo-bar")
    human = t("tmux", "list")
    assert human.code == 0 and "No agents with a tmux session" in human.out


# --------------------------------------------------------------------------- nudges

def test_one_nudge_per_message_and_per_burst_never_the_senders_pane(tteam, tmux, tmp_path):
    bob_log, alice_log = tmp_path / "bob.log", tmp_path / "alice.log"
    bob = start_reader(tteam, "w-bob", "bob", bob_log)
    start_reader(tteam, "w-alice", "alice", alice_log)
    # never the sender's own pane: a send made from inside bob's pane does not nudge bob's
    # pane. The next message's nudge shows it: had carol's been queued, it would come
    # first or join that one ("2 new messages from @carol, @alice").
    r = run_thrum(["send", "from inside", "--to", "@bob", "--json"], tteam.path,
                  dict(tteam.env, THRUM_NAME="carol", TMUX_PANE=bob["pane"],
                       TMUX=tmux.sock + ",1,0"))
    assert r.code == 0, r.describe()
    assert "%s not nudged: sent from that agent's own pane %s" % (
        r.json["message_id"], bob["pane"]) in nudge_log(tteam)  # said before send returned
    sent = tteam.send("alice", "please review", "--to", "@bob")
    wait_until(lambda: "@bob: nudged pane %s: 1 message(s)" % bob["pane"] in
               nudge_log(tteam), 20, "the nudge in bob's pane (every Enter typed)")
    assert lines(bob_log) == [NUDGE]
    # the bodies stay in the inbox, still unread
    assert tteam.unread_ids("bob") == [sent["message_id"], r.json["message_id"]]
    # a burst of 20 gives one nudge (and the first one was typed and submitted once: a
    # second copy of it, or a stray Enter, would come before this one)
    with ThreadPoolExecutor(4) as pool:
        for res in pool.map(lambda i: tteam.t("send", f"part {i}", "--to", "@bob", "-q",
                                              name="alice"), range(20)):
            assert res.code == 0, res.describe()
    wait_until(lambda: "@bob: nudged pane %s: 20 message(s)" % bob["pane"] in
               nudge_log(tteam), 30, "the burst's nudge (every Enter typed)")
    assert lines(bob_log) == [NUDGE, "20 new messages from @alice -- run `thrum inbox "
                                     "--unread`"]
    # and nothing was ever typed into the sender's (alice's) pane
    assert lines(alice_log) == []


def test_copy_mode_defers_the_nudge(tteam, tmux, tmp_path):
    log = tmp_path / "bob.log"
    bob = start_reader(tteam, "w-bob", "bob", log)
    tmux("copy-mode", "-t", bob["pane"])
    tteam.send("alice", "while you scroll", "--to", "@bob")
    # nothing is typed into a pane in copy mode: the nudger says it deferred
    wait_until(lambda: "@bob: pane %s is in copy mode; nudge deferred" % bob["pane"] in
               nudge_log(tteam), 20, "the nudger deferring the nudge")
    assert lines(log) == []
    assert tmux("display-message", "-p", "-t", bob["pane"], "#{pane_in_mode}").strip() == "1"
    tmux("send-keys", "-t", bob["pane"], "-X", "cancel")
    wait_until(lambda: "@bob: nudged pane %s: 1 message(s)" % bob["pane"] in
               nudge_log(tteam), 20, "the deferred nudge (every Enter typed)")
    assert lines(log) == [NUDGE]


def test_a_dialog_on_screen_defers_the_nudge(tteam, tmux, tmp_path):
    """A pane that asks the user to choose is never typed into; once answered (the
    program clears its screen), the nudge comes."""
    log = tmp_path / "bob.log"
    dialog = tmp_path / "dialog.py"
    dialog.write_text(
        "import sys\n"
        "print('Do you want to proceed?')\nprint(' \u276f 1. Yes')\nprint('   2. No')\n"
        "sys.stdout.flush()\n"
        "sys.stdin.readline()\n"
        "sys.stdout.write('\\033[2J\\033[3J\\033[H'); sys.stdout.flush()\n"
        "with open(sys.argv[1], 'a', buffering=1) as log:\n"
        "    for line in sys.stdin:\n"
        "        log.write(line)\n")
    r = tteam.t.json("tmux", "create", "w-bob", "--name", "bob", "--role", "reviewer",
                     "--module", "api", "--force", "--command", sys.executable, str(dialog),
                     str(log))
    wait_until(lambda: "proceed" in tmux("capture-pane", "-p", "-t", r["pane"]), 20,
               "the dialog")
    tteam.send("alice", "are you there?", "--to", "@bob")
    # a nudge never answers a dialog: the nudger says it deferred
    wait_until(lambda: "@bob: pane %s shows a dialog; nudge deferred" % r["pane"] in
               nudge_log(tteam), 20, "the nudger deferring the nudge")
    assert lines(log) == []
    assert "proceed" in tmux("capture-pane", "-p", "-t", r["pane"])
    tmux("send-keys", "-t", r["pane"], "1", "Enter")  # the user answers it
    wait_until(lambda: "@bob: nudged pane %s: 1 message(s)" % r["pane"] in nudge_log(tteam),
               20, "the deferred nudge (every Enter typed)")
    assert lines(log) == [NUDGE]


def test_without_tmux_send_is_unchanged_and_tmux_commands_fail(tteam, tmux, tmp_path):
    log = tmp_path / "bob.log"
    start_reader(tteam, "w-bob", "bob", log)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "sh", "env"):
        src = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(src)
    env = dict(tteam.env, PATH=str(bin_dir))
    with_tmux = run_thrum(["send", "one", "--to", "@bob"], tteam.path,
                          dict(tteam.env, THRUM_NAME="alice"))
    without = run_thrum(["send", "two", "--to", "@bob"], tteam.path,
                        dict(env, THRUM_NAME="alice"))
    assert without.code == 0 and without.err == ""
    assert without.out.replace("two", "X").split("msg_")[0] == \
        with_tmux.out.replace("one", "X").split("msg_")[0]
    for args in (["tmux", "list"], ["tmux", "kill", "w-bob"],
                 ["tmux", "create", "s9", "--name", "z9", "--role", "r", "--module", "m"]):
        r = run_thrum(args, tteam.path, env)
        assert_error(r, 1, "tmux is not installed")
        assert len(r.err.strip().splitlines()) == 1, r.describe()
    assert "z9" not in [m["agent_id"] for m in tteam.t.json("team", "--all")["members"]]


def test_daemon_nudges_a_synced_message_and_ends_a_dead_panes_session(tmp_path, tmux, procs):
    env = tmux.env(make_env(tmp_path / "home"))
    (tmp_path / "reader.py").write_text(READER)
    remote = bare_remote(tmp_path / "remote.git", env)
    a = clone(remote, tmp_path / "a", env)
    b = clone(remote, tmp_path / "b", env)
    log = tmp_path / "bob.log"
    api("init", {}, a, env)
    r = run_thrum(["tmux", "create", "w-bob", "--name", "bob", "--role", "reviewer",
                   "--module", "api", "--json", "--command", sys.executable,
                   str(tmp_path / "reader.py"), str(log)], a, env)
    assert r.code == 0, r.describe()
    pane = r.json["pane"]
    # (set-up in process: both clones share the log, alice is registered in B)
    api("sync_force", {}, a, env)
    api("init", {}, b, env)
    api("sync_force", {}, b, env)
    api("quickstart", {"name": "alice", "role": "impl", "module": "auth"}, b, env)
    daemon = procs.daemon(a, dict(env, THRUM_SYNC_INTERVAL="1s"))
    sent = run_thrum(["send", "from the other clone", "--to", "@bob", "--json"], b,
                     dict(env, THRUM_NAME="alice"))  # (B never types into A's panes)
    assert sent.code == 0, sent.describe()
    assert run_thrum(["sync", "force"], b, env).code == 0
    wait_until(lambda: lines(log), 30, "the daemon's nudge for the synced message")
    assert lines(log) == [NUDGE]
    # the pane dies: the daemon ends bob's session within a few seconds
    tmux("kill-pane", "-t", pane)
    bob = dict(env, THRUM_NAME="bob")
    wait_until(lambda: run_thrum(["whoami", "--json"], a, bob).json["session_id"] is None,
               20, "the daemon to end bob's session")
    listed = run_thrum(["tmux", "list", "--json"], a, env).json["agents"]
    assert [(x["agent_id"], x["alive"]) for x in listed] == [("bob", False)]
    assert_alive(daemon)
