"""The daemon (SPEC §7, §9, §14 "Daemon exits", "Dead agents", "Index files", "Sessions").

Black-box: real `thrum daemon ...` processes, real Unix sockets, real git remotes, no mocks.
Clients are the CLI and, where the wire itself is tested, the standard library's
`multiprocessing.connection.Client` (the protocol the daemon speaks: JSON frames, HMAC
handshake with the key in `.thrum/var/daemon.key`).

Every test synchronises on observable events with deadlines (the daemon's own
`daemon_status` reply says how many waits it is serving), stops every daemon it started in
the `procs` fixture's teardown (by pid, never by name), and checks that a daemon that is
supposed to survive the test is still the same live process at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (THRUM_CMD, DaemonHandle, Runner, api, assert_alive, ask, blocked, connect,
                      daemon_log, git, log_dir, ls_remote, make_env, make_repo, pid_alive,
                      pid_file, rpc, run_thrum, var_dir, wait_until, waiting)

T = 60  # timeout of every CLI call


# --------------------------------------------------------------------------- helpers

def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def daemon_run_processes(store_root) -> list:
    """Pids of `thrum.py ... daemon run` processes whose command line names `store_root`."""
    roots = {str(store_root), os.path.realpath(store_root)}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode("utf-8", "replace") for a in argv if a]
        if any(a.endswith("thrum.py") for a in args) and "daemon" in args and "run" in args \
                and roots & set(args) and pid_alive(int(d.name)):
            found.append(int(d.name))
    return found


def proc_counts(pid) -> tuple:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


# --------------------------------------------------------------------------- 1. lifecycle

def test_lifecycle_and_exit_codes(team, procs):
    t = team.t
    procs.track_store(team.path, team.env)
    r = t("daemon", "status", "--json")
    assert r.code == 1, r.describe()
    assert r.json["running"] is False
    r = t("daemon", "status")
    assert r.code == 1 and r.out.strip(), r.describe()

    r = t.ok("daemon", "start", "--json", timeout=T)
    doc = r.json
    pid = doc["pid"]
    procs.track_pid(pid)
    assert doc["running"] is True and doc["started"] is True, doc
    assert isinstance(pid, int) and pid > 0 and pid_alive(pid), doc
    assert doc["started_at"] and doc["socket"], doc

    st = t("daemon", "status", "--json")
    assert st.code == 0, st.describe()
    st = st.json
    assert st["running"] is True and st["pid"] == pid, st
    sock = st["socket"]
    assert os.path.isabs(sock) and stat.S_ISSOCK(os.stat(sock).st_mode), st
    assert mode(sock) == 0o600, oct(mode(sock))
    assert st["started_at"] == doc["started_at"]
    assert pid_file(team.path) == {"pid": pid, "socket": sock, "started_at": st["started_at"]}
    r = t("daemon", "status")
    assert r.code == 0 and str(pid) in r.out, r.describe()

    # a second start reports the running one
    r = t("daemon", "start", timeout=T)
    assert r.code == 0, r.describe()
    assert "already running" in r.out and str(pid) in r.out, r.describe()
    r = t.ok("daemon", "start", "--json", timeout=T)
    assert r.json["pid"] == pid and r.json["started"] is False, r.json
    assert pid_alive(pid)

    r = t("daemon", "stop", timeout=T)
    assert r.code == 0 and "daemon stopped" in r.out, r.describe()
    wait_until(lambda: not pid_alive(pid), 10, "the stopped daemon to exit")
    assert not os.path.exists(sock), "stop left the socket behind"
    assert not (var_dir(team.path) / "daemon.pid").exists()
    r = t("daemon", "status", "--json")
    assert r.code == 1 and r.json["running"] is False, r.describe()
    r = t("daemon", "stop", timeout=T)
    assert r.code == 0 and "no daemon was running" in r.out, r.describe()


def test_restart_gives_a_new_daemon(team, procs):
    h = procs.daemon(team.path, team.env)
    r = team.t("daemon", "restart", "--json", timeout=T)
    assert r.code == 0, r.describe()
    new = r.json["pid"]
    procs.track_pid(new)
    assert new != h.pid and pid_alive(new), r.json
    wait_until(lambda: not pid_alive(h.pid), 10, "the old daemon to exit")
    assert team.t.json("daemon", "status")["pid"] == new


def test_start_detaches_from_the_callers_pipes(team, procs):
    """The detached daemon holds none of the caller's pipes: reading the starter's stdout
    and stderr to EOF returns as soon as `daemon start` exits."""
    procs.track_store(team.path, team.env)
    p = procs.popen([*THRUM_CMD, "daemon", "start", "--json"],
                      cwd=str(team.path), env=team.env, stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=30)  # EOF on both pipes, or this times out
    except subprocess.TimeoutExpired:
        pytest.fail("`daemon start` (or the daemon it left behind) kept the caller's pipes open")
    assert p.returncode == 0, err
    pid = json.loads(out)["pid"]
    procs.track_pid(pid)
    assert pid_alive(pid)
    own = {os.readlink(f"/proc/{pid}/fd/{n}") for n in (0, 1, 2)}
    assert not any(x.startswith("pipe:") for x in own), own
    assert os.path.realpath(var_dir(team.path) / "daemon.log") in own, own


# --------------------------------------------------------------------------- 2. kill -9

def test_kill9_mid_burst_loses_nothing(team, procs):
    import threading
    h = procs.daemon(team.path, team.env)
    results = []  # (index, Result)

    def burst():
        for i in range(30):
            results.append((i, run_thrum(["send", f"burst {i}", "--to", "bob", "--json"],
                                         team.path, team.env, name="alice", timeout=T)))

    th = threading.Thread(target=burst, daemon=True)
    th.start()
    wait_until(lambda: len(results) >= 8, 60, "8 sends before the kill")
    procs.kill9(h.pid)
    th.join(120)
    assert not th.is_alive()
    assert len(results) == 30

    sent = {}
    for i, r in results:
        assert r.code == 0, r.describe()
        sent[r.json["message_id"]] = f"burst {i}"
    doc = team.t.json("inbox", "--all", "--limit", "200", name="bob")
    have = {m["message_id"]: m["body"]["content"] for m in doc["messages"]}
    missing = set(sent) - set(have)
    assert not missing, f"messages lost by kill -9: {sorted(missing)}"
    bodies = sorted(v for v in have.values() if v.startswith("burst "))
    dups = sorted({b for b in bodies if bodies.count(b) > 1})
    assert not dups, f"a send interrupted by the kill was stored twice: {dups}"

    # restart: stale socket and pid file are cleaned up
    h2 = procs.daemon(team.path, team.env)
    assert h2.pid != h.pid
    r = team.t("doctor", timeout=T)
    assert r.code == 0, r.describe()
    # messaging works through the new daemon
    m = team.send("alice", "after restart", "--to", "bob")
    assert m["message_id"] in [x["message_id"] for x in team.inbox("bob", "--limit", "200")
                               ["messages"]]
    assert_alive(h2)


# --------------------------------------------------------------------------- 3. stale pid file

def test_pid_file_naming_an_unrelated_live_process(team, procs):
    procs.track_store(team.path, team.env)
    fake = procs.popen(["sleep", "60"])
    var = var_dir(team.path)
    var.mkdir(parents=True, exist_ok=True)
    stale_sock = var / "thrum.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale_sock))  # a socket file nobody listens on, as a crash leaves it
    s.close()
    (var / "daemon.pid").write_text(json.dumps(
        {"pid": fake.pid, "socket": str(stale_sock), "started_at": "2024-01-01T00:00:00.000000Z"}))

    r = team.t("daemon", "status", "--json")
    assert r.code == 1 and r.json["running"] is False, r.describe()
    # commands work directly, promptly
    t0 = time.monotonic()
    team.send("alice", "while the pid file lies", "--to", "bob")
    assert time.monotonic() - t0 < 10
    r = team.t("daemon", "stop", timeout=T)
    assert r.code == 0 and "no daemon was running" in r.out, r.describe()
    assert fake.poll() is None, "daemon stop signalled the unrelated process"

    (var / "daemon.pid").write_text(json.dumps(
        {"pid": fake.pid, "socket": str(stale_sock), "started_at": "2024-01-01T00:00:00.000000Z"}))
    h = procs.daemon(team.path, team.env)
    assert h.pid != fake.pid
    assert fake.poll() is None, "daemon start disturbed the unrelated process"
    assert pid_file(team.path)["pid"] == h.pid
    assert team.t.json("daemon", "status")["pid"] == h.pid
    assert [m["body"]["content"] for m in team.inbox("bob")["messages"]] == \
        ["while the pid file lies"]
    assert_alive(h)
    h.stop()
    assert fake.poll() is None, "daemon stop disturbed the unrelated process"


# --------------------------------------------------------------------------- 4. racing starts

@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_starts_give_one_daemon(team, procs, n):
    procs.track_store(team.path, team.env)
    ps = [procs.popen([*THRUM_CMD, "daemon", "start", "--json"],
                        cwd=str(team.path), env=team.env, stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]
    docs = []
    for p in ps:
        out, err = p.communicate(timeout=T)
        assert p.returncode == 0, (out, err)
        docs.append(json.loads(out))
    pids = {d["pid"] for d in docs}
    for pid in pids:
        procs.track_pid(pid)
    assert len(pids) == 1, f"the starts report different daemons: {docs}"
    [pid] = pids
    assert sum(d["started"] for d in docs) == 1, docs  # the one that spawned the winner
    # losers of the lock race exit; exactly one `daemon run` stays for this store
    wait_until(lambda: len(daemon_run_processes(team.path)) <= 1, 15,
               "the losing `daemon run` processes to exit")
    assert daemon_run_processes(team.path) == [pid], daemon_log(team.path)
    st = team.t.json("daemon", "status")
    assert st["pid"] == pid
    assert os.path.exists(st["socket"]), "the socket of the running daemon was removed"
    # and it serves (socket and pid file intact after the race)
    team.send("alice", "after the race", "--to", "bob")
    assert waiting(team.path) == 0
    assert_alive(DaemonHandle(team.path, team.env, pid))


def flock_held_by(lock: Path, pid: int) -> bool:
    """Whether `pid` holds a flock on `lock`, read from /proc/locks (taking the lock to
    find out would disturb a daemon that is just starting)."""
    try:
        ino = os.stat(lock).st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[4] == str(pid) and \
                    parts[5].endswith(f":{ino}"):
                return True
    return False


def test_start_while_a_daemon_is_coming_up_reports_it(team, procs):
    """`daemon start` while another daemon holds the lock but does not answer yet (caught
    between taking the lock and writing daemon.pid, frozen with SIGSTOP): the start
    returns once the socket answers and reports that daemon's pid, never `pid None`."""
    procs.track_store(team.path, team.env)
    lock = var_dir(team.path) / "daemon.lock"
    for _ in range(8):
        p = procs.popen([*THRUM_CMD, "daemon", "run"], cwd=str(team.path),
                          env=team.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        procs.track_pid(p.pid)
        deadline = time.monotonic() + 20
        while not flock_held_by(lock, p.pid) and p.poll() is None and \
                time.monotonic() < deadline:
            pass  # a tight loop: the window is a few tens of milliseconds
        os.kill(p.pid, signal.SIGSTOP)
        if not (var_dir(team.path) / "daemon.pid").exists():
            break
        os.kill(p.pid, signal.SIGCONT)  # too late: it is up already; try again
        run_thrum(["daemon", "stop"], team.path, team.env, timeout=T)
        p.wait(10)
    else:
        pytest.skip("could not catch a daemon between its lock and its pid file")
    try:
        b = procs.thrum(team.path, team.env, "daemon", "start", "--json", name=None)
        time.sleep(0.5)  # the starter must wait for the frozen daemon to answer
    finally:
        os.kill(p.pid, signal.SIGCONT)
    b.finish(timeout=30)
    assert b.code == 0, (b.out, b.err)
    doc = json.loads(b.out)
    assert doc["pid"] == p.pid and doc["socket"], \
        f"`daemon start` returned before the running daemon answered: {doc}"
    assert team.t.json("daemon", "status")["pid"] == p.pid


# --------------------------------------------------------------------------- 5. long paths

@pytest.fixture
def short_tmp():
    """A directory with a short path (tmp_path can be too long for a socket inside it)."""
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="thr-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("runtime", ["none", "private", "public", "private-but-long"])
def test_long_repo_path_uses_a_short_socket(tmp_path, short_tmp, procs, runtime):
    """`none`: no XDG_RUNTIME_DIR; `public`: one that is not private (0755), so not used;
    `private-but-long`: a private one too long to hold a socket name (must still work)."""
    pad = 150 - len(str(tmp_path)) - len("/") - len("/repo")
    assert pad > 0
    base = tmp_path / ("x" * pad)
    env = make_env(tmp_path / "home")
    repo = make_repo(base / "repo", env=env)
    assert len(str(repo)) == 150
    if runtime != "none":
        rt = short_tmp / "run" if runtime != "private-but-long" else tmp_path / ("r" * 90)
        rt.mkdir()
        rt.chmod(0o755 if runtime == "public" else 0o700)
        env["XDG_RUNTIME_DIR"] = str(rt)
    t = Runner(repo, env)
    api("init", {}, repo, env)
    for name, role in (("alice", "implementer"), ("bob", "reviewer")):
        api("quickstart", {"name": name, "role": role, "module": "m"}, repo, env, name)
    assert len(str(var_dir(repo) / "thrum.sock")) > 100

    h = procs.daemon(repo, env)
    info = pid_file(repo)
    sock = info["socket"]
    assert info["pid"] == h.pid
    assert os.path.isabs(sock) and len(os.fsencode(sock)) <= 107, sock
    assert not sock.startswith(str(var_dir(repo))), sock
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and mode(sock) == 0o600, sock
    parent = os.path.dirname(sock)
    if runtime == "private":
        assert parent == env["XDG_RUNTIME_DIR"], sock
    elif runtime == "private-but-long":
        assert mode(parent) == 0o700 and os.stat(parent).st_uid == os.getuid()
    else:
        assert parent == f"/tmp/thrum-{os.getuid()}", sock
        assert mode(parent) == 0o700 and os.stat(parent).st_uid == os.getuid()
    assert t.json("daemon", "status")["socket"] == sock

    # messaging goes through it (a wait blocked in the daemon, woken by a send)
    w = procs.thrum(repo, env, "wait", "--timeout", "20s", "--json", name="bob")
    blocked(w, repo, daemon=True)
    m = t.json("send", "long path hello", "--to", "bob", name="alice")
    w.finish()
    assert w.code == 0 and m["message_id"] in w.out, (w.out, w.err)
    r = rpc(repo, "inbox", {}, (repo, env, "bob"))
    assert r["ok"] and [x["message_id"] for x in r["result"]["messages"]] == \
        [m["message_id"]], r
    doc = t.json("inbox", "--all", name="bob")
    assert [x["message_id"] for x in doc["messages"]] == [m["message_id"]]
    assert_alive(h)

    h.stop()
    assert not os.path.exists(sock), "stop left the short socket behind"
    wait_until(lambda: not pid_alive(h.pid), 10, "the stopped daemon to exit")
    assert run_thrum(["daemon", "status"], repo, env).code == 1


# --------------------------------------------------------------------------- 6. wrong key

def test_wrong_key_is_refused_and_the_daemon_carries_on(team, procs):
    from multiprocessing import AuthenticationError
    h = procs.daemon(team.path, team.env)
    for bad in (b"wrong", b"0" * 64, (var_dir(team.path) / "daemon.key").read_bytes()[:-3]):
        with pytest.raises(AuthenticationError):
            connect(team.path, authkey=bad)
    # a client that connects and never speaks does not block anyone
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(pid_file(team.path)["socket"])
    try:
        t0 = time.monotonic()
        r = rpc(team.path, "whoami", {}, (team.path, team.env, "alice"))
        assert r["ok"] and r["result"]["agent_id"] == "alice", r
        assert time.monotonic() - t0 < 3
        r = team.t("daemon", "status", "--json")
        assert r.code == 0 and r.json["pid"] == h.pid, r.describe()
        m = team.send("alice", "after a bad client", "--to", "bob")
        assert [x["message_id"] for x in team.inbox("bob")["messages"]] == [m["message_id"]]
    finally:
        silent.close()
    # the wire: errors come back as error objects with exit codes
    r = rpc(team.path, "message_get", {"message_id": "msg_00000000000000000000000000"},
            (team.path, team.env, "alice"))
    assert r["ok"] is False and isinstance(r["error"]["exit_code"], int) and \
        r["error"]["exit_code"] != 0 and r["error"]["message"], r
    r = rpc(team.path, "no_such_op", {}, (team.path, team.env, "alice"))
    assert r["ok"] is False and r["error"]["message"], r
    conn = connect(team.path)
    try:
        conn.send_bytes(b"this is not json")
        r = json.loads(conn.recv_bytes())
        assert r["ok"] is False, r
    finally:
        conn.close()
    assert "refused a client" in daemon_log(team.path)
    assert_alive(h)


# --------------------------------------------------------------------------- 7. permissions

def test_runtime_file_permissions(team, procs):
    h = procs.daemon(team.path, team.env)
    var = var_dir(team.path)
    assert mode(var) == 0o700, oct(mode(var))
    for name in ("daemon.key", "daemon.pid", "daemon.lock", "daemon.log"):
        assert mode(var / name) == 0o600, f"{name}: {oct(mode(var / name))}"
    sock = pid_file(team.path)["socket"]
    assert sock == str(var / "thrum.sock")
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and mode(sock) == 0o600, oct(mode(sock))
    key = (var / "daemon.key").read_bytes().strip()
    assert len(key) >= 32, "the key is too short to be a secret"
    assert_alive(h)


def test_permissions_are_private_even_with_a_loose_umask(tmp_path, procs):
    env = make_env(tmp_path / "home")
    repo = make_repo(tmp_path / "repo", env=env)
    api("init", {}, repo, env)
    old = os.umask(0)
    try:
        h = procs.daemon(repo, env)  # the daemon inherits umask 0
    finally:
        os.umask(old)
    var = var_dir(repo)
    assert mode(var) == 0o700
    for name in ("daemon.key", "daemon.pid", "daemon.lock", "daemon.log"):
        assert mode(var / name) == 0o600, f"{name}: {oct(mode(var / name))}"
    assert mode(pid_file(repo)["socket"]) == 0o600
    assert_alive(h)


# --------------------------------------------------------------------------- 8. killed mid-wait

def test_wait_survives_the_daemon_being_killed(team, procs):
    h = procs.daemon(team.path, team.env)
    w = procs.thrum(team.path, team.env, "wait", "--timeout", "30s", "--json", name="bob")
    blocked(w, team.path, daemon=True)
    procs.kill9(h.pid)
    time.sleep(0.3)
    assert w.running(), f"the wait returned when the daemon died: {w.p.communicate()}"
    sent = team.send("alice", "after the crash", "--to", "bob")  # directly now
    w.finish(timeout=30)
    assert w.code == 0, (w.out, w.err)
    doc = json.loads(w.out)
    assert doc["status"] == "received"
    assert [m["message_id"] for m in doc["messages"]] == [sent["message_id"]]
    assert w.ended - w.started < 25


def test_wait_survives_a_clean_stop(team, procs):
    h = procs.daemon(team.path, team.env)
    w = procs.thrum(team.path, team.env, "wait", "--timeout", "30s", name="bob")
    blocked(w, team.path, daemon=True)
    h.stop()
    wait_until(lambda: not pid_alive(h.pid), 10, "the stopped daemon to exit")
    assert w.running(), f"the wait returned when the daemon stopped: {w.p.communicate()}"
    sent = team.send("alice", "after the stop", "--to", "bob")
    w.finish(timeout=30)
    assert w.code == 0 and f"ID: {sent['message_id']}" in w.out, (w.out, w.err)


def test_wait_timeout_through_the_daemon(team, procs):
    h = procs.daemon(team.path, team.env)
    w = procs.thrum(team.path, team.env, "wait", "--timeout", "1s", "--json", name="bob")
    blocked(w, team.path, daemon=True)
    w.finish(timeout=20)
    assert w.code == 1 and json.loads(w.out) == {"status": "timeout", "messages": []}, w.out
    assert 1.0 <= w.ended - w.started < 11
    wait_until(lambda: waiting(team.path) == 0, 5, "the daemon to forget the finished wait")
    assert_alive(h)


def test_killed_waiter_does_not_leak_a_wait(team, procs):
    """A client that disappears mid-wait: the daemon stops counting it (at the latest when
    its timeout passes), keeps serving, and other waiters are woken as usual."""
    h = procs.daemon(team.path, team.env)
    w1 = procs.thrum(team.path, team.env, "wait", "--timeout", "3s", name="bob")
    blocked(w1, team.path, daemon=True)
    w1.kill()
    wait_until(lambda: waiting(team.path) == 0, 15, "the daemon to drop the killed wait")
    w2 = procs.thrum(team.path, team.env, "wait", "--timeout", "20s", "--json", name="carol")
    blocked(w2, team.path, daemon=True)
    sent = team.send("alice", "carol?", "--to", "carol")
    w2.finish()
    assert w2.code == 0 and sent["message_id"] in w2.out, (w2.out, w2.err)
    wait_until(lambda: waiting(team.path) == 0, 5, "the daemon to forget the finished wait")
    assert_alive(h)


def test_killed_wait_does_not_swallow_the_next_message(team, procs):
    """SPEC §7: the listener loop gets every message exactly once. An agent's wait killed
    mid-way (a tool timeout, Ctrl-C) must not leave a wait behind in the daemon that
    takes the next message as delivered: the agent's next wait has to return it."""
    h = procs.daemon(team.path, team.env)
    w = procs.thrum(team.path, team.env, "wait", "--timeout", "60s", name="bob")
    blocked(w, team.path, daemon=True)
    w.kill()
    sent = team.send("alice", "while bob was between waits", "--to", "bob")
    r = team.t("wait", "--after", "-15s", "--timeout", "5s", "--json", name="bob")
    assert r.code == 0, "the message sent while bob's killed wait lingered in the daemon " \
        f"never reached his next wait:\n{r.describe()}"
    assert [m["message_id"] for m in r.json["messages"]] == [sent["message_id"]]
    assert_alive(h)


# --------------------------------------------------------------------------- 9. SIGTERM

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_foreground_run_stops_cleanly_on_signal(team, procs, sig):
    procs.track_store(team.path, team.env)
    p = procs.popen([*THRUM_CMD, "daemon", "run"], cwd=str(team.path),
                      env=team.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    procs.track_pid(p.pid)

    def up():
        r = run_thrum(["daemon", "status", "--json"], team.path, team.env)
        return r.code == 0 and r.json["pid"] == p.pid and waiting(team.path) == 0

    wait_until(up, 20, "the foreground daemon to answer")
    sock = pid_file(team.path)["socket"]
    team.send("alice", "through the foreground daemon", "--to", "bob")
    assert p.poll() is None
    p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`daemon run` did not exit within 10s of {sig!r}")
    assert p.returncode == 0, (p.returncode, out, err)
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
    assert not os.path.exists(sock), "socket left behind"
    assert not (var_dir(team.path) / "daemon.pid").exists(), "daemon.pid left behind"
    r = team.t("daemon", "status", "--json")
    assert r.code == 1 and r.json["running"] is False, r.describe()
    # and a new one starts at once (the lock is free)
    h = procs.daemon(team.path, team.env)
    assert_alive(h)


def test_second_foreground_run_does_not_disturb_the_first(team, procs):
    h = procs.daemon(team.path, team.env)
    sock = pid_file(team.path)["socket"]
    r = team.t("daemon", "run", timeout=30)
    assert r.code == 0 and "already running" in r.out and str(h.pid) in r.out, r.describe()
    assert os.path.exists(sock) and pid_file(team.path)["pid"] == h.pid
    assert rpc(team.path, "daemon_status")["result"]["pid"] == h.pid
    assert_alive(h)


# --------------------------------------------------------------------------- 10. no leaks

@pytest.mark.slow
def test_many_rpcs_leak_no_fds_or_threads(team, procs):
    from multiprocessing import AuthenticationError
    h = procs.daemon(team.path, team.env)
    team.send("alice", "something to list", "--to", "bob")
    who_a = (team.path, team.env, "alice")
    who_b = (team.path, team.env, "bob")
    # Warm up for a while: lazy index connections of the background loops (the session
    # check first runs after ~3 s) and caches are then in place before the baseline.
    up = time.monotonic()
    while time.monotonic() - up < 4.5:
        assert rpc(team.path, "whoami", {}, who_a)["ok"]
        assert rpc(team.path, "inbox", {"unread": True}, who_b)["ok"]
        time.sleep(0.02)
    time.sleep(0.3)
    fds0, threads0 = proc_counts(h.pid)

    t0 = time.monotonic()
    for i in range(1000):
        if i % 50 == 7:
            with pytest.raises(AuthenticationError):
                connect(team.path, authkey=b"not the key")
            continue
        if i % 10 == 3:
            r = rpc(team.path, "inbox", {"unread": True}, who_b)
        elif i % 100 == 5:
            r = rpc(team.path, "message_get", {"message_id": "msg_nope"}, who_a)
            assert r["ok"] is False
            continue
        else:
            r = rpc(team.path, "whoami", {}, who_a)
        assert r["ok"], r
    # and one connection with many requests
    conn = connect(team.path)
    try:
        for _ in range(200):
            assert ask(conn, "whoami", {}, who_a)["ok"]
    finally:
        conn.close()
    elapsed = time.monotonic() - t0
    print(f"1,200 RPCs in {elapsed:.1f}s ({elapsed / 1.2:.2f} ms each)")

    def settled():
        fds, threads = proc_counts(h.pid)
        return fds <= fds0 + 3 and threads <= threads0 + 2

    deadline = time.monotonic() + 10
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.1)
    fds, threads = proc_counts(h.pid)
    assert fds <= fds0 + 3, f"fds grew from {fds0} to {fds}: " + \
        repr(sorted(os.readlink(f"/proc/{h.pid}/fd/{n}") for n in os.listdir(f"/proc/{h.pid}/fd")))
    assert threads <= threads0 + 2, f"threads grew from {threads0} to {threads}"
    assert_alive(h)


# --------------------------------------------------------------------------- 11. direct writes

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(n >> (5 * i)) & 31] for i in reversed(range(26)))


def append_message_by_hand(team, frm, to, content) -> str:
    """Append a message.create event to the log with plain file I/O (as a `git pull` of the
    sync branch by another tool, or a process that cannot reach the daemon, would)."""
    sid = team.t.json("whoami", name=frm)["session_id"]
    mid = "msg_" + ulid()
    now = time.time()
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%06dZ" % (now % 1 * 1e6)
    ev = {"v": 1, "event_id": "evt_" + ulid(), "type": "message.create", "timestamp": ts,
          "origin": "o_" + ulid(), "message_id": mid, "agent_id": frm, "session_id": sid,
          "body": {"format": "markdown", "content": content}, "recipients": [to],
          "audiences": [{"type": "agent", "value": to}], "scopes": [], "refs": []}
    fd = os.open(log_dir(team.path) / "messages" / f"{frm}.jsonl",
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(ev, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)
    return mid


@pytest.mark.parametrize("how", ["THRUM_SYNC_INTERVAL=60s", "THRUM_SYNC_WAIT_INTERVAL=5s",
                                 "by-hand"])
def test_direct_write_wakes_a_daemon_wait(team, procs, how):
    h = procs.daemon(team.path, team.env)
    team.send("alice", "an older message", "--to", "carol")  # messages/alice.jsonl exists
    w = procs.thrum(team.path, team.env, "wait", "--timeout", "30s", "--json", name="bob")
    blocked(w, team.path, daemon=True)
    if how == "by-hand":
        mid = append_message_by_hand(team, "alice", "bob", "appended by hand")
    else:
        k, v = how.split("=")
        r = team.t("send", "written directly", "--to", "bob", "--json", name="alice",
                   extra_env={k: v})
        assert r.code == 0, r.describe()
        mid = r.json["message_id"]
    sent_at = time.monotonic()
    w.finish(timeout=30)
    assert w.code == 0, (w.out, w.err)
    doc = json.loads(w.out)
    assert [m["message_id"] for m in doc["messages"]] == [mid]
    delay = w.ended - sent_at
    print(f"direct write ({how}) woke the daemon wait after {delay:.2f}s")
    assert delay < 5, f"the daemon took {delay:.1f}s to notice a direct write"
    # the daemon's answers include it too
    assert mid in [m["message_id"] for m in team.inbox("bob")["messages"]]
    assert_alive(h)


# --------------------------------------------------------------------------- 12. dead agents

def test_sessions_of_dead_processes_are_ended(team, procs):
    h = procs.daemon(team.path, team.env)
    t = team.t
    doomed = procs.popen(["sleep", "120"])
    lasting = procs.popen(["sleep", "120"])
    sa = t.json("session", "start", "--pid", str(doomed.pid), name="alice")
    sc = t.json("session", "start", "--pid", str(lasting.pid), name="carol")
    bob_sid = t.json("whoami", name="bob")["session_id"]
    assert bob_sid and t.json("whoami", name="alice")["session_id"] == sa["session_id"]

    doomed.kill()
    doomed.wait()  # reaped: the pid is gone
    killed = time.monotonic()

    def alice_ended():
        return t.json("whoami", name="alice")["session_id"] is None

    wait_until(alice_ended, 15, "the daemon to end alice's session", interval=0.25)
    print(f"session ended {time.monotonic() - killed:.1f}s after its process died")
    team_doc = t.json("team", name="bob")
    for m in team_doc["members"]:
        if m["agent_id"] == "alice":
            assert m["session_id"] is None and m["status"] != "active", m
    everyone = {m["agent_id"]: m for m in t.json("team", "--all", name="bob")["members"]}
    assert everyone["alice"]["session_id"] is None, everyone["alice"]
    # the CLI-only agent (no pid) and the agent whose process lives keep their sessions
    assert t.json("whoami", name="bob")["session_id"] == bob_sid
    assert t.json("whoami", name="carol")["session_id"] == sc["session_id"]
    assert "carol" in [m["agent_id"] for m in team_doc["members"]]
    [ended] = [x for x in t.json("session", "list", "--agent", "alice", name="bob")["sessions"]
               if x["session_id"] == sa["session_id"]]
    assert ended["ended_at"] and ended["status"] != "active", ended
    # the same answers directly (the end is an event in the log, not daemon memory)
    direct = t.json("whoami", name="alice", extra_env={"THRUM_SYNC_INTERVAL": "60s"})
    assert direct["session_id"] is None
    assert lasting.poll() is None
    assert_alive(h)


def test_pure_cli_never_ends_sessions(team, procs):
    """Without a daemon nothing is reaped, even when the recorded process died."""
    p = procs.popen(["sleep", "60"])
    s = team.t.json("session", "start", "--pid", str(p.pid), name="alice")
    p.kill()
    p.wait()
    for _ in range(3):
        team.t.ok("team", name="bob")
        team.t.ok("inbox", name="alice")
    assert team.t.json("whoami", name="alice")["session_id"] == s["session_id"]


# --------------------------------------------------------------------------- 13. index

def test_deleted_index_is_rebuilt_by_the_daemon(team, procs):
    h = procs.daemon(team.path, team.env)
    m1 = team.send("alice", "before the deletion", "--to", "bob")
    assert [x["message_id"] for x in team.inbox("bob")["messages"]] == [m1["message_id"]]
    var = var_dir(team.path)
    assert (var / "index.db").exists()
    for f in var.glob("index.db*"):
        f.unlink()
    assert not (var / "index.db").exists()
    t0 = time.monotonic()
    wait_until(lambda: (var / "index.db").exists(), 10, "the daemon to rebuild index.db")
    print(f"index.db rebuilt after {time.monotonic() - t0:.2f}s")
    doc = team.inbox("bob")
    assert [x["message_id"] for x in doc["messages"]] == [m1["message_id"]]
    assert doc["messages"][0]["is_read"] is True, "the read receipt was lost by the rebuild"
    m2 = team.send("alice", "after the deletion", "--to", "bob")
    via_daemon = team.inbox("bob", "--all")
    direct = team.t.json("inbox", "--all", name="bob",
                         extra_env={"THRUM_SYNC_INTERVAL": "60s"})
    ids = [x["message_id"] for x in via_daemon["messages"]]
    assert ids == [m2["message_id"], m1["message_id"]]
    assert [x["message_id"] for x in direct["messages"]] == ids
    # once more, the rebuilt index is watched too
    for f in var.glob("index.db*"):
        f.unlink()
    wait_until(lambda: (var / "index.db").exists(), 10, "a second rebuild")
    assert [x["message_id"] for x in team.inbox("bob", "--all")["messages"]] == ids
    r = team.t("doctor", timeout=T)
    assert r.code == 0, r.describe()
    assert_alive(h)


# --------------------------------------------------------------------------- 14/15. sync

def remote_tip(remote, env) -> str:
    return ls_remote(remote, env)


@pytest.mark.slow
def test_two_clones_with_daemons_talk_in_seconds(net, procs):
    a, b = net.clone("A"), net.clone("B")
    a.register("alice", "implementer", "auth")
    a.synced()
    b.register("bob", "reviewer", "api")
    b.synced()
    a.synced()
    # While an agent waits, its daemon checks the remote every sync.wait_interval (5s by
    # default); the mechanism is the same with 1s, set in the stores' config so that the
    # CLI and the daemons agree on it.
    assert a.ok("config", "get", "sync.wait_interval").out.strip() == "5s"
    for c in (a, b):
        c.api("config_set", {"key": "sync.wait_interval", "value": "1s"})
    ha = procs.daemon(a.path, net.env)
    hb = procs.daemon(b.path, net.env)

    w = procs.thrum(b.path, net.env, "wait", "--timeout", "40s", "--json", name="bob")
    blocked(w, b.path, daemon=True)
    t0 = time.monotonic()
    sent = a.json("send", "across the remote", "--to", "bob", name="alice")
    w.finish(timeout=60)
    delay = w.ended - t0
    print(f"clone A -> clone B through two daemons: {delay:.1f}s")
    assert w.code == 0, f"no message within the wait ({delay:.1f}s): {w.out} {w.err}\n" \
        f"A:\n{daemon_log(a.path)}\nB:\n{daemon_log(b.path)}"
    doc = json.loads(w.out)
    assert [m["message_id"] for m in doc["messages"]] == [sent["message_id"]]
    assert delay < 40

    # and back: bob replies, alice waits on A
    w2 = procs.thrum(a.path, net.env, "wait", "--timeout", "40s", "--json", name="alice")
    blocked(w2, a.path, daemon=True)
    t1 = time.monotonic()
    rep = b.json("reply", sent["message_id"], "got it", name="bob")
    w2.finish(timeout=60)
    print(f"clone B -> clone A: {w2.ended - t1:.1f}s")
    assert w2.code == 0, (w2.out, w2.err)
    assert rep["message_id"] in w2.out
    assert_alive(ha)
    assert_alive(hb)


@pytest.mark.slow
def test_push_is_debounced(net, procs):
    """A burst of local writes through the daemon becomes one push, about 2 s later."""
    a = net.clone("A")
    for name, role in (("alice", "implementer"), ("bob", "reviewer")):
        a.register(name, role, "m")
    a.synced()
    tip0 = remote_tip(net.remote, net.env)
    h = procs.daemon(a.path, net.env)
    for i in range(5):
        a.json("send", f"burst {i}", "--to", "bob", name="alice")
    t0 = time.monotonic()
    wait_until(lambda: remote_tip(net.remote, net.env) != tip0, 20, "the debounced push",
               interval=0.2)
    print(f"pushed {time.monotonic() - t0:.1f}s after the burst")
    new = git("rev-list", "--count", f"{tip0}..a-sync", cwd=net.remote, env=net.env).strip()
    assert new == "1", f"the burst became {new} commits on the remote"
    assert_alive(h)


@pytest.mark.slow
def test_idle_daemon_makes_no_commits(net, procs):
    """An idle daemon's interval fetches commit, push and write nothing. The interval is
    set short here so three fetches happen in seconds (the 60 s default and the schedule's
    rules are covered by tests/test_schedule.py)."""
    a = net.clone("A").path
    ta = Runner(a, net.env)
    ta.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth",
          name="alice")
    ta.ok("sync", "force", timeout=T)
    ta.ok("config", "set", "sync.interval", "1s")
    state = a / ".thrum" / "var" / "sync.json"
    local0 = git("rev-parse", "a-sync", cwd=a, env=net.env).strip()
    remote0 = remote_tip(net.remote, net.env)
    assert local0 and remote0
    logs0 = {p: p.read_bytes() for p in log_dir(a).rglob("*.jsonl")}

    def last_sync():
        return json.loads(state.read_text()).get("last_sync_at") if state.exists() else None
    h = procs.daemon(a, net.env)
    seen = {last_sync()}
    for _ in range(3):  # three interval fetches by the daemon, each a full sync cycle
        wait_until(lambda: last_sync() not in seen and seen.add(last_sync()) is None, 30,
                   "an interval fetch of the daemon (sync.json last_sync_at)")
        assert pid_alive(h.pid), daemon_log(a)
    assert remote_tip(net.remote, net.env) == remote0, "the idle daemon pushed"
    assert git("rev-parse", "a-sync", cwd=a, env=net.env).strip() == local0, \
        "the idle daemon committed:\n" + git("log", "--stat", f"{local0}..a-sync", cwd=a,
                                              env=net.env)
    assert {p: p.read_bytes() for p in log_dir(a).rglob("*.jsonl")} == logs0, \
        "the idle daemon wrote events"
    assert "sync failed" not in daemon_log(a), daemon_log(a)
    assert_alive(h)


def _status(path) -> dict:
    r = rpc(path, "daemon_status")
    assert r["ok"], r
    return r["result"]


def _has_message(c, msg_id) -> bool:
    return any(msg_id.encode() in f.read_bytes() for f in (c.log / "messages").glob("*.jsonl"))


@pytest.mark.slow
def test_an_agent_that_ran_a_command_hears_other_clones_within_seconds(net, procs):
    """SPEC §9: an agent that ran a command in the last 10 minutes (no wait needed) keeps
    its daemon's remote check at sync.wait_interval, so a message from another clone
    arrives in seconds, not at the next sync.interval (60 s). A daemon whose agents did
    nothing yet does not check (an idle clone asks the remote once a minute)."""
    a, b = net.clone("A"), net.clone("B")
    a.register("alice", "implementer", "auth")
    a.synced()
    b.register("bob", "reviewer", "api")
    b.synced()
    a.synced()
    for c in (a, b):  # the mechanism is the same with the 5s default
        c.api("config_set", {"key": "sync.wait_interval", "value": "1s"})
    ha = procs.daemon(a.path, net.env)
    hb = procs.daemon(b.path, net.env)
    st = _status(b.path)
    assert st["active"] is False and st["remote"]["ls-remote"] == 0, st

    b.json("inbox", name="bob")  # a command served by B's daemon: bob is active now
    assert _status(b.path)["active"] is True
    sent = a.json("send", "while you work", "--to", "bob", name="alice")
    wait_until(lambda: _has_message(b, sent["message_id"]), 30,
               "B's daemon to fetch alice's message (bob ran a command, no wait)")
    # the cheap check saw the tip move, then a cycle fetched (counted when it ends)
    st = wait_until(lambda: (lambda s: s["remote"]["fetch"] >= 1 and s)(_status(b.path)), 30,
                    "B's cycle to end")
    assert st["remote"]["ls-remote"] >= 1, st
    assert sent["message_id"] in [m["message_id"] for m in
                                  b.json("inbox", "--unread", name="bob")["messages"]]
    assert_alive(ha)
    assert_alive(hb)


@pytest.mark.slow
def test_clones_with_daemons_writing_at_once_lose_and_duplicate_nothing(net, procs):
    """Four clones, a daemon each, every agent sending at the same moment: the daemons'
    pushes contend for the one branch; every clone ends with every message exactly once,
    and the remote history stays linear."""
    import threading
    names = ["w0", "w1", "w2", "w3"]
    clones = [net.clone(f"C{i}") for i in range(len(names))]
    for c, n in zip(clones, names):
        c.register(n, "worker", "mod" + n)
        c.synced()
    for c in clones:
        c.synced()
        c.api("config_set", {"key": "sync.wait_interval", "value": "1s"})
    handles = [procs.daemon(c.path, net.env) for c in clones]
    sent, errors, go = [], [], threading.Event()

    def send(c, n):
        go.wait()
        for j in range(3):
            r = c.run("send", f"{n} says {j}", "--broadcast", "--json", name=n)
            if r.code != 0:
                errors.append(r.describe())
            else:
                sent.append(r.json["message_id"])
    threads = [threading.Thread(target=send, args=(c, n)) for c, n in zip(clones, names)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert len(set(sent)) == 12

    def everywhere():
        return all(_has_message(c, m) for c in clones for m in sent)
    wait_until(everywhere, 60, "every clone to hold every message (daemons only)", 0.2)
    for c in clones:  # a last look after the daemons settle: nothing twice
        creates = [e["message_id"] for e in c.events() if e["type"] == "message.create"]
        assert sorted(m for m in creates if m in sent) == sorted(sent), c
        ids = c.event_ids()
        assert len(ids) == len(set(ids)), f"{c}: duplicated events"
    merges = git("log", "--merges", "--format=%H", "a-sync", cwd=net.remote, env=net.env)
    assert not merges.strip()
    pushes = sum(_status(c.path)["remote"]["push"] for c in clones)
    assert pushes >= len(clones)
    for h in handles:
        assert_alive(h)
