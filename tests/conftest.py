"""Black-box test harness for thrum.py.

Every test runs the real program (`THRUM_CMD`: `python -m thrum` from this checkout, compiled
once; test_packaging and test_durability also run `python thrum.py`) in a temporary git
repository with a deterministic environment: no inherited `GIT_*`/`THRUM_*` variables, a
private `HOME` whose git config forbids guessing an identity (`user.useConfigOnly`), so thrum
has to work with no git user configured, `TZ=UTC`, `LC_ALL=C.UTF-8`, `NO_COLOR=1`.

What a test CHECKS goes through the CLI (or the front end it is about: MCP, the daemon's
socket, tmux). Set-up that is not under test (registering a team, seeding messages, syncing
clones) may go through the module in process: `thrum` below is the one copy of thrum.py the
test session imports, and `api(op, params, cwd, env, name)` runs `thrum.call()` with the
test's own environment (never os.environ or os.getcwd) and a store opened and closed for
that call.

Every background process (a blocking `wait`, a daemon, an MCP server, a plain command) is
started through the `procs` fixture (class `Procs`), whose teardown always stops it.

Waits wait for the event they are about (`wait_until`): `blocked()` for a background
`thrum wait`, `wait_older_than()` for a message's age, a daemon's own `daemon_status`.

Helpers exported for the test modules (no test module imports another one):
    thrum, THRUM_CMD, THRUM_PY, make_env, make_repo, git, bare_remote, clone, run_thrum, api,
    Result, Runner, Team, make_team (fixtures team, cli_team, modal_team), Clone, net, pair,
    sync_all, ls_remote, read_log, log_dir, all_log_files, assert_error, ids_in, wait_until,
    wait_older_than, Procs/procs, Background, blocked, DaemonHandle, assert_alive,
    McpSession, daemon helpers (var_dir, pid_file, daemon_log, pid_alive, rpc, waiting, ...)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
THRUM_PY = str(REPO_ROOT / "thrum.py")

# The module under test, imported once for the whole session (in-process set-up, the
# service-layer tests and the encoder properties share it): never a second copy under
# another name.
sys.path.insert(0, str(REPO_ROOT))
import thrum  # noqa: E402

assert os.path.realpath(thrum.__file__) == os.path.realpath(THRUM_PY), \
    f"`import thrum` found {thrum.__file__}, not this checkout's {THRUM_PY}"


def _thrum_cmd() -> list:
    """How run_thrum starts thrum: `python -m thrum` from this checkout, which imports the
    bytecode compiled here once per session (a script is compiled on every start, ~0.2 s
    for 8,000 lines: most of the suite's time). Tests of the copied-script path run
    `python thrum.py` themselves (test_packaging)."""
    import py_compile
    try:
        py_compile.compile(THRUM_PY, doraise=True)
    except (OSError, py_compile.PyCompileError):  # pragma: no cover - read-only checkout
        return [sys.executable, THRUM_PY]
    return [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "sys.argv[0] = sys.argv.pop(1); import runpy; runpy.run_module('thrum', "
            "run_name='__main__', alter_sys=True)", str(REPO_ROOT), THRUM_PY]


THRUM_CMD = _thrum_cmd()

#: Crockford base32 ULID after a prefix.
ULID = r"[0-9A-HJKMNP-TV-Z]{26}"
MSG_ID_RE = re.compile(r"msg_" + ULID)
THR_ID_RE = re.compile(r"^thr_" + ULID + r"$")
SES_ID_RE = re.compile(r"^ses_" + ULID + r"$")
EVT_ID_RE = re.compile(r"^evt_" + ULID + r"$")
#: Event timestamp format (SPEC §3): fixed width, microseconds, Z.
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

#: Fixed identity and dates for the commits the *tests* make (never exported to thrum).
_TEST_COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+0000",
    "GIT_COMMITTER_NAME": "Test Committer",
    "GIT_COMMITTER_EMAIL": "committer@example.com",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+0000",
}

_DROP = ("XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME",
         "XDG_CONFIG_DIRS", "TMUX", "TMUX_PANE", "PYTHONSTARTUP", "PYTHONINSPECT",
         "VIRTUAL_ENV_PROMPT")


# --------------------------------------------------------------------------- environment

def make_env(home: Path) -> dict:
    """A deterministic environment for subprocesses, with HOME = `home` (created)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "THRUM_")) and k not in _DROP}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        TZ="UTC",
        LC_ALL="C.UTF-8",
        NO_COLOR="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONIOENCODING="utf-8",
    )
    gitconfig = home / ".gitconfig"
    if not gitconfig.exists():
        # No identity at all, and git may not guess one from the user name and host name:
        # thrum must pass its own identity for its commits (SPEC §2).
        gitconfig.write_text(
            "[user]\n\tuseConfigOnly = true\n"
            "[init]\n\tdefaultBranch = main\n"
            "[advice]\n\tdetachedHead = false\n"
        )
    return env


def git(*args, cwd, env, check=True, input=None) -> str:
    """Run git (never through a shell); return stdout. Raises AssertionError on failure."""
    p = subprocess.run(["git", *map(str, args)], cwd=str(cwd), env=env, input=input,
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"git {' '.join(map(str, args))} failed ({p.returncode}):\n"
                             f"{p.stdout}\n{p.stderr}")
    return p.stdout


def make_repo(path, commit=True, env=None) -> Path:
    """`git init -q -b main` at `path`, plus one commit (README) unless commit=False."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if env is None:
        env = make_env(path.parent / (path.name + "-home"))
    git("init", "-q", "-b", "main", cwd=path, env=env)
    if commit:
        (path / "README").write_text("test repository\n")
        git("add", "README", cwd=path, env=env)
        cenv = {**env, **_TEST_COMMIT_ENV}
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "initial",
            cwd=path, env=cenv)
    return path


def commit_all(path, env, message="change") -> None:
    """Commit everything in the work tree of `path` with the fixed test identity."""
    git("add", "-A", cwd=path, env=env)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message,
        cwd=path, env={**env, **_TEST_COMMIT_ENV})


def bare_remote(path, env) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", "-b", "main", cwd=path, env=env)
    return path


def clone(remote, path, env) -> Path:
    path = Path(path)
    git("clone", "-q", str(remote), str(path), cwd=Path(path).parent, env=env)
    return path


# --------------------------------------------------------------------------- running thrum

@dataclass
class Result:
    args: list
    code: int
    out: str
    err: str
    raw_out: bytes = field(default=b"", repr=False)

    def describe(self) -> str:
        return (f"`thrum {' '.join(map(str, self.args))}` exited {self.code}\n"
                f"--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}")

    @property
    def json(self):
        try:
            return json.loads(self.out)
        except ValueError as e:
            pytest.fail(f"stdout is not exactly one JSON document ({e}):\n{self.describe()}")

    @property
    def error_lines(self) -> list:
        return [ln for ln in self.err.splitlines() if ln.startswith("thrum: error: ")]


def run_thrum(args, cwd, env, input=None, name=None, timeout=60, extra_env=None) -> Result:
    """Run `python thrum.py ARGS`. `name` sets THRUM_NAME; `input` may be str or bytes."""
    env = dict(env)
    if name is not None:
        env["THRUM_NAME"] = name
    if extra_env:
        for k, v in extra_env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
    if isinstance(input, str):
        input = input.encode("utf-8")
    args = [str(a) for a in args]
    try:
        p = subprocess.run([*THRUM_CMD, *args], cwd=str(cwd), env=env,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL,
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`thrum {' '.join(args)}` did not finish within {timeout}s\n"
                    f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}")
    r = Result(args, p.returncode, p.stdout.decode("utf-8", "replace"),
               p.stderr.decode("utf-8", "replace"), p.stdout)
    if "Traceback (most recent call last)" in r.err or "Traceback (most recent call last)" in r.out:
        pytest.fail(f"thrum printed a traceback:\n{r.describe()}")
    return r


def assert_error(r: Result, code: int, *fragments: str) -> Result:
    """Exit `code`, a `thrum: error: ...` line on stderr, each fragment in stderr (any case)."""
    assert r.code == code, f"expected exit {code}\n{r.describe()}"
    assert r.error_lines, f"expected a 'thrum: error: ...' line on stderr\n{r.describe()}"
    low = r.err.lower()
    for frag in fragments:
        assert frag.lower() in low, f"expected {frag!r} in stderr\n{r.describe()}"
    return r


def wait_until(pred, timeout, what, interval=0.05):
    """Poll `pred` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(interval)


def wait_older_than(msg, seconds=1.0):
    """Wait until the message `msg` (a send result) was created more than `seconds` ago,
    by the clock that stamped its created_at (a plain wait looks back one second)."""
    from datetime import datetime, timezone
    created = datetime.strptime(msg["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc).timestamp()
    time.sleep(max(0.0, created + seconds + 0.05 - time.time()))


def api(op, params, cwd, env, name=None):
    """Set-up that is not under test, in process: `thrum.call(op, params)` for a caller in
    `cwd` with the test's environment `env` (THRUM_NAME=`name` when given). The store is
    opened for this call only and closed again; errors raise thrum.ThrumError."""
    e = dict(env)
    if name is not None:
        e["THRUM_NAME"] = name
    return thrum.call(op, dict(params or {}), thrum.Caller(str(cwd), e))


class Runner:
    """`t(*args, name=None, input=None)` runs thrum in a fixed directory and environment."""

    def __init__(self, cwd, env):
        self.cwd = Path(cwd)
        self.env = env

    def __call__(self, *args, name=None, input=None, cwd=None, timeout=60, extra_env=None):
        return run_thrum(list(args), cwd or self.cwd, self.env, input=input, name=name,
                         timeout=timeout, extra_env=extra_env)

    def ok(self, *args, **kw) -> Result:
        r = self(*args, **kw)
        assert r.code == 0, f"expected exit 0\n{r.describe()}"
        return r

    def fail(self, code, *args, fragments=(), **kw) -> Result:
        return assert_error(self(*args, **kw), code, *fragments)

    def json(self, *args, **kw):
        """Run with --json, require exit 0, return the parsed document."""
        return self.ok(*args, "--json", **kw).json


def log_dir(repo: Path) -> Path:
    """Where the event log lives for a repo initialised inside git."""
    return Path(repo) / ".git" / "thrum-sync" / "a-sync"


def all_log_files(root: Path) -> list:
    root = Path(root)
    files = []
    for sub in ("agents", "messages", "receipts"):
        d = root / sub
        if d.is_dir():
            files += sorted(d.glob("*.jsonl"))
    if (root / "groups.jsonl").exists():
        files.append(root / "groups.jsonl")
    return files


def read_log(path: Path, strict=True) -> list:
    """Parse a JSONL log file; with strict, every line must be a complete valid event."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if strict and data:
        assert data.endswith(b"\n"), f"{path} does not end with a newline: ...{data[-80:]!r}"
    events = []
    for i, line in enumerate(data.split(b"\n")):
        if not line:
            continue
        try:
            ev = json.loads(line.decode("utf-8"))
        except ValueError:
            if strict:
                raise AssertionError(f"{path}:{i + 1} is not JSON: {line[:200]!r}")
            continue
        if strict:
            assert isinstance(ev, dict), f"{path}:{i + 1} is not an object"
            for k in ("v", "event_id", "type", "timestamp", "origin"):
                assert k in ev, f"{path}:{i + 1} lacks envelope field {k!r}: {ev}"
        events.append(ev)
    return events


def ids_in(text: str) -> list:
    return MSG_ID_RE.findall(text)


class Team:
    """A repo with agents registered in the same worktree; `t(..., name=...)` runs thrum.
    `api`, `register` and `seed` are in-process set-up; `send`, `inbox`, ... use the CLI."""

    def __init__(self, path, env):
        self.path = Path(path)
        self.env = env
        self.t = Runner(self.path, env)
        self.daemon = None

    @property
    def log(self) -> Path:
        return log_dir(self.path)

    # in-process set-up (not under test)
    def api(self, op, params=None, name=None, cwd=None):
        return api(op, params, cwd or self.path, self.env, name)

    def register(self, name, role, module, cwd=None, **params):
        """Register `name` (in-process quickstart: init if needed, register, session)."""
        return self.api("quickstart", dict(name=name, role=role, module=module, **params),
                        name=name, cwd=cwd)

    def seed(self, frm, body, **params) -> dict:
        """Store a message in process (`to=[...]`, `scopes=[...]`, ...): the send result."""
        return self.api("send", dict(content=body, **params), name=frm)

    # through the CLI
    def send(self, frm, body, *args, **kw) -> dict:
        """Send as `frm` with --json; return the result document."""
        return self.t.json("send", body, *args, name=frm, **kw)

    def inbox(self, who, *args) -> dict:
        return self.t.json("inbox", *args, name=who)

    def unread_ids(self, who) -> list:
        doc = self.t.json("inbox", "--unread", "--limit", "100", name=who)
        return [m["message_id"] for m in doc["messages"]]

    def get(self, who, msg_id) -> dict:
        return self.t.json("message", "get", msg_id, name=who)["message"]

    def quickstart(self, name, role, module, cwd=None, *extra):
        return self.t.ok("quickstart", "--name", name, "--role", role, "--module", module,
                         *extra, name=name, cwd=cwd)


#: The standard team: alice implements auth, bob and carol review.
TEAM = (("alice", "implementer", "auth"), ("bob", "reviewer", "api"), ("carol", "reviewer", "db"))


def make_team(base: Path, members=TEAM, cli=False) -> Team:
    """A repo at `base/repo` (HOME `base/home`) with `members` registered. The set-up runs
    in process unless `cli` (init and one quickstart per member through the CLI: the tests
    of init and quickstart themselves keep that path)."""
    env = make_env(Path(base) / "home")
    repo = make_repo(Path(base) / "repo", env=env)
    team = Team(repo, env)
    if cli:
        team.t.ok("init")
        for name, role, module in members:
            team.quickstart(name, role, module)
    else:
        team.api("init")
        for name, role, module in members:
            team.register(name, role, module)
    return team


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def env(tmp_path) -> dict:
    return make_env(tmp_path / "home")


@pytest.fixture
def repo(tmp_path, env) -> Path:
    """A fresh git repo with one commit, initialised by `thrum init`."""
    path = make_repo(tmp_path / "repo", env=env)
    r = run_thrum(["init"], path, env)
    assert r.code == 0, r.describe()
    return path


@pytest.fixture
def team(tmp_path) -> Team:
    return make_team(tmp_path)


@pytest.fixture
def cli_team(tmp_path) -> Team:
    """The standard team, set up through the CLI (init + one quickstart per member)."""
    return make_team(tmp_path, cli=True)


@pytest.fixture
def t(team) -> Runner:
    return team.t


# --------------------------------------------------------------------------- clones

class Clone:
    """One clone of a shared remote, with a thrum runner bound to it."""

    T = 120  # timeout of every CLI call

    def __init__(self, path, env):
        self.path = Path(path)
        self.env = env
        self.t = Runner(self.path, env)

    def __repr__(self):
        return f"Clone({self.path.name})"

    # in-process set-up (not under test)
    def api(self, op, params=None, name=None):
        return api(op, params, self.path, self.env, name)

    def register(self, name, role, module, **params):
        return self.api("quickstart", dict(name=name, role=role, module=module, **params),
                        name=name)

    def seed(self, frm, body, **params) -> dict:
        return self.api("send", dict(content=body, **params), name=frm)

    def synced(self) -> dict:
        """One sync cycle in process (set-up); raises thrum.ThrumError when it fails."""
        return self.api("sync_force")

    # through the CLI
    def run(self, *args, **kw):
        kw.setdefault("timeout", self.T)
        return self.t(*args, **kw)

    def ok(self, *args, **kw):
        kw.setdefault("timeout", self.T)
        return self.t.ok(*args, **kw)

    def json(self, *args, **kw):
        kw.setdefault("timeout", self.T)
        return self.t.json(*args, **kw)

    def quickstart(self, name, role, module, **kw):
        return self.ok("quickstart", "--name", name, "--role", role, "--module", module,
                       name=name, **kw)

    def send(self, frm, body, *args, **kw) -> dict:
        return self.json("send", body, *args, name=frm, **kw)

    def sync(self, **kw) -> dict:
        return self.json("sync", "force", **kw)

    def status(self, **kw) -> dict:
        return self.json("sync", "status", **kw)

    # git
    def git(self, *args, check=True):
        return git(*args, cwd=self.path, env=self.env, check=check)

    def rev(self, ref):
        return self.git("rev-parse", "--verify", "-q", ref + "^{commit}", check=False).strip()

    @property
    def log(self) -> Path:
        return log_dir(self.path)

    def lines(self) -> list:
        """Every non-empty line of every `.jsonl` file of the sync worktree."""
        return log_lines(self.log)

    def event_ids(self) -> list:
        return sorted(json.loads(ln)["event_id"] for ln in self.lines())

    def events(self) -> list:
        return [json.loads(ln) for ln in self.lines()]


def log_lines(root: Path) -> list:
    out = []
    for f in sorted(Path(root).rglob("*.jsonl")):
        data = f.read_bytes()
        out += [ln for ln in data.split(b"\n") if ln.strip()]
    return out


def sync_all(*clones, rounds=2):
    """`sync force` through the CLI in every clone, `rounds` times."""
    for _ in range(rounds):
        for c in clones:
            c.sync()


def ls_remote(remote, env, ref="refs/heads/a-sync") -> str:
    out = git("ls-remote", str(remote), ref, cwd=remote, env=env)
    return out.split()[0] if out.strip() else ""


class Net:
    """A bare remote whose `main` has one commit, and a factory of fresh clones."""

    def __init__(self, remote, env, tmp):
        self.remote, self.env, self.tmp = remote, env, tmp

    def clone(self, name) -> Clone:
        return Clone(clone(self.remote, self.tmp / name, self.env), self.env)


@pytest.fixture
def net(tmp_path, env) -> Net:
    remote = bare_remote(tmp_path / "remote.git", env)
    seed = make_repo(tmp_path / "seed", env=env)
    git("remote", "add", "origin", str(remote), cwd=seed, env=env)
    git("push", "-q", "origin", "main", cwd=seed, env=env)
    return Net(remote, env, tmp_path)


@pytest.fixture
def pair(net):
    """Clones A (alice) and B (bob) that have synced each other's registrations (and E,
    a plain clone made before the remote had a-sync). Set up in process."""
    a, b = net.clone("A"), net.clone("B")
    net.clone("E")
    a.register("alice", "implementer", "auth")
    a.synced()
    b.register("bob", "reviewer", "api")
    b.synced()
    a.synced()
    return net, a, b


# --------------------------------------------------------------------------- daemons

def var_dir(path) -> Path:
    return Path(path) / ".thrum" / "var"


def pid_file(path) -> dict:
    return json.loads((var_dir(path) / "daemon.pid").read_text())


def daemon_log(path) -> str:
    log = var_dir(path) / "daemon.log"
    return log.read_text(errors="replace") if log.exists() else "(no daemon.log)"


def pid_alive(pid) -> bool:
    """A live process (not gone, not a zombie waiting to be reaped)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = data.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def is_thrum_daemon(pid) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"thrum.py") for a in args) and b"daemon" in args


def holds_open(pid, name) -> bool:
    """Whether process `pid` has a file whose name is `name` open (/proc/<pid>/fd)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.path.basename(os.readlink(f"/proc/{pid}/fd/{fd}")) == name:
                return True
        except OSError:
            continue
    return False


#: clock_nanosleep, the syscall of time.sleep(), by machine (for /proc/<pid>/syscall).
_NANOSLEEP = {"x86_64": "230", "aarch64": "115"}


def in_sleep(pid) -> bool:
    """Whether process `pid` is blocked in time.sleep() right now (the kernel's wait
    channel, or the syscall it is in)."""
    try:
        if "nanosleep" in Path(f"/proc/{pid}/wchan").read_text():
            return True
        call = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return bool(call) and call[0] == _NANOSLEEP.get(os.uname().machine)


def caller_dict(path, env, name=None) -> dict:
    e = dict(env)
    if name is not None:
        e["THRUM_NAME"] = name
    return {"cwd": str(path), "env": e, "agent": None}


def connect(path, authkey=None, sock=None):
    """A stdlib multiprocessing.connection.Client of the store's daemon."""
    from multiprocessing.connection import Client
    if authkey is None:
        authkey = (var_dir(path) / "daemon.key").read_bytes().strip()
    return Client(sock or pid_file(path)["socket"], family="AF_UNIX", authkey=authkey)


def ask(conn, op, params=None, who=None) -> dict:
    """One request/reply on an open connection. `who` = (path, env, name) for the caller."""
    req = {"op": op, "params": params or {}}
    if who is not None:
        req["caller"] = caller_dict(*who)
    conn.send_bytes(json.dumps(req).encode("utf-8"))
    return json.loads(conn.recv_bytes())


def rpc(path, op, params=None, who=None) -> dict:
    conn = connect(path)
    try:
        return ask(conn, op, params, who)
    finally:
        conn.close()


def waiting(path) -> int:
    """How many waits the daemon is serving right now (its own daemon_status reply)."""
    try:
        r = rpc(path, "daemon_status")
    except (OSError, EOFError):
        return -1
    assert r["ok"], r
    return r["result"]["waiting"]


def blocked(w, path, daemon, n=1, timeout=15):
    """Wait until the background `thrum wait` `w` blocks: served by the store's daemon
    (which then serves at least `n` waits, by its own `daemon_status`), or, without a
    daemon, polling the store itself: its process holds the index open and sleeps between
    two looks at the message files (so its first look is done). Fails if `w` returned."""
    def check():
        if not w.running():
            w.finish()
            pytest.fail(f"`{w.describe()}` returned early ({w.code}):\n{w.out}\n{w.err}")
        if daemon:
            return waiting(path) >= n
        return holds_open(w.p.pid, "index.db") and in_sleep(w.p.pid)
    wait_until(check, timeout, f"`{w.describe()}` to block")


class DaemonHandle:
    """A daemon of the store at `path`; `alive()` says (through `thrum daemon status`)
    whether the same process still runs (the CLI's silent fallback must never hide a
    crash). Made by `Procs.daemon`, which also stops it."""

    def __init__(self, path, env, pid):
        self.path, self.env, self.pid = Path(path), env, pid

    def alive(self) -> bool:
        r = run_thrum(["daemon", "status", "--json"], self.path, self.env)
        return r.code == 0 and r.json.get("running") is True and r.json.get("pid") == self.pid

    def answers(self) -> bool:
        """The same process still runs and answers `daemon_status` on its socket (the
        check of the tests that are not about the daemon's CLI: no process to start)."""
        try:
            r = rpc(self.path, "daemon_status")
        except (OSError, EOFError, ValueError):
            return False
        return r.get("ok") is True and r["result"].get("pid") == self.pid and \
            pid_alive(self.pid)

    def stop(self):
        r = run_thrum(["daemon", "stop"], self.path, self.env, timeout=60)
        assert r.code == 0, r.describe()


def assert_alive(h: DaemonHandle):
    assert h.alive(), f"daemon {h.pid} died during the test:\n{daemon_log(h.path)}"


# --------------------------------------------------------------------------- background

class Background:
    """A command running in the background (a blocking `thrum wait`, `daemon run`, ...):
    `finish()` collects its exit code and output and sets `ended` and `elapsed`. Started
    by `Procs`, which kills it at the end of the test if it still runs."""

    def __init__(self, argv, cwd, env, label=None):
        self.argv = [str(a) for a in argv]
        self.label = label or " ".join(self.argv)
        self.p = subprocess.Popen(self.argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.started = time.monotonic()
        self.code = None

    def describe(self) -> str:
        return self.label

    def running(self) -> bool:
        return self.p.poll() is None

    def finish(self, timeout=20):
        if self.code is not None:
            return self
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            pytest.fail(f"`{self.label}` did not return within {timeout}s\n"
                        f"{out.decode()}\n{err.decode()}")
        self.ended = time.monotonic()
        self.elapsed = self.ended - self.started
        self.code, self.out, self.err = self.p.returncode, out.decode(), err.decode()
        assert "Traceback" not in self.err, self.err
        return self

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        try:
            self.p.communicate(timeout=10)
        except (ValueError, OSError, subprocess.TimeoutExpired):  # closed or stuck
            pass


class McpSession:
    """`thrum mcp serve` on pipes, spoken to raw. Every stdout line is checked to be one
    JSON-RPC 2.0 frame; replies are matched by id, notifications collected in order.
    Started by `Procs.mcp`."""

    INIT = {"protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"}}

    def __init__(self, cwd, env, *args):
        self.p = subprocess.Popen([*THRUM_CMD, "mcp", "serve", *args],
                                  cwd=str(cwd), env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.all = []            # every frame, in order
        self.bad = []            # stdout lines that are not a JSON-RPC frame
        self.replies = {}
        self.notes = []
        self._lock = threading.Lock()
        self._next = 1000
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            try:
                text = line.decode("utf-8")
                assert text.endswith("\n") and "\n" not in text[:-1]
                msg = json.loads(text)
            except (ValueError, AssertionError):
                self.bad.append(line)
                continue
            items = msg if isinstance(msg, list) else [msg]
            with self._lock:
                self.all.append(msg)
                for m in items:
                    if not isinstance(m, dict) or m.get("jsonrpc") != "2.0":
                        self.bad.append(line)
                    elif "id" in m and ("result" in m) != ("error" in m):
                        self.replies[json.dumps(m["id"])] = m
                    elif "method" in m and "id" not in m:
                        self.notes.append(m)
                    else:
                        self.bad.append(line)

    def write(self, obj):
        data = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        if isinstance(data, str):
            data = data.encode()
        self.p.stdin.write(data + b"\n")
        self.p.stdin.flush()

    def send(self, method, params=None, rid=None):
        if rid is None:
            self._next += 1
            rid = self._next
        msg = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.write(msg)
        return rid

    def notify(self, method, params=None):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.write(msg)

    def reply(self, rid, timeout=20):
        key = json.dumps(rid)
        return wait_until(lambda: self.replies.get(key), timeout, f"the reply to {rid!r}")

    def request(self, method, params=None, timeout=20):
        return self.reply(self.send(method, params), timeout)

    def call(self, tool, args=None, meta=None, timeout=20):
        params = {"name": tool, "arguments": args or {}}
        if meta:
            params["_meta"] = meta
        r = self.request("tools/call", params, timeout)
        assert "result" in r, r
        return r["result"]

    def initialize(self):
        r = self.request("initialize", self.INIT)
        self.notify("notifications/initialized")
        return r["result"]

    def notes_of(self, method):
        with self._lock:
            return [n for n in self.notes if n["method"] == method]

    def close(self, timeout=5):
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._reader.join(timeout)
        err = self.p.stderr.read().decode("utf-8", "replace")
        self.p.stderr.close()
        assert "Traceback" not in err, err
        assert not self.bad, f"non-frame lines on stdout: {self.bad!r}"
        return err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            try:
                f.close()
            except (OSError, ValueError):
                pass


class Procs:
    """The one registry of the background processes of a test: thrum commands (a
    blocking `wait`), daemons, MCP servers and plain commands. Teardown always stops them:
    background commands and MCP servers are killed, the daemon of every store a test
    touched is stopped (SIGTERM, then SIGKILL), and so is every daemon pid it recorded
    (checked to still be a thrum daemon first: never a recycled, unrelated pid)."""

    def __init__(self):
        self._bgs = []       # Background, McpSession, Popen
        self._groups = []    # Popen leading a process group of its own
        self._stores = []    # (path, env) whose daemon goes at the end
        self._pids = set()   # daemon pids
        self._cleanups = []

    # starting things
    def thrum(self, cwd, env, *args, name=None) -> Background:
        """`thrum ARGS` in the background (THRUM_NAME=`name` when given)."""
        env = dict(env)
        if name is not None:
            env["THRUM_NAME"] = name
        b = Background([*THRUM_CMD, *args], cwd, env,
                       label="thrum " + " ".join(map(str, args)))
        self._bgs.append(b)
        return b

    def wait(self, team, name, *args) -> Background:
        """`thrum wait ARGS` as `name` in the background, for a Team or Clone."""
        return self.thrum(team.path, team.env, "wait", *args, name=name)

    def popen(self, argv, group=False, **kw) -> subprocess.Popen:
        """Any other process (subprocess.Popen arguments). `group`: in a new session,
        and the whole process group is killed at the end (a shell loop and its children)."""
        if group:
            kw["start_new_session"] = True
            self._groups.append(subprocess.Popen(argv, **kw))
            return self._groups[-1]
        p = subprocess.Popen(argv, **kw)
        self._bgs.append(p)
        return p

    def mcp(self, cwd, env, *args) -> McpSession:
        s = McpSession(cwd, env, *args)
        self._bgs.append(s)
        return s

    def daemon(self, path, env) -> DaemonHandle:
        """`thrum daemon start` for the store at `path`; stopped at the end of the test."""
        self.track_store(path, env)
        r = run_thrum(["daemon", "start", "--json"], path, env, timeout=60)
        assert r.code == 0, r.describe()
        pid = r.json["pid"]
        assert isinstance(pid, int) and pid > 0, r.describe()
        self._pids.add(pid)
        return DaemonHandle(path, env, pid)

    def track_store(self, path, env):
        """Stop whatever daemon runs for this store at the end (tests that start one by
        other means: `daemon run`, racing starts, restart)."""
        self._stores.append((Path(path), env))

    def track_pid(self, pid):
        self._pids.add(pid)

    def on_teardown(self, fn):
        """Run `fn()` at the end of the test, after the processes are stopped."""
        self._cleanups.append(fn)

    def kill9(self, pid):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 10, f"process {pid} to die after SIGKILL")

    # the end
    def _stop_daemon(self, pid):
        if not (pid_alive(pid) and is_thrum_daemon(pid)):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid) and is_thrum_daemon(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def teardown(self):
        errors = []
        for p in self._groups:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:  # gone already
                pass
            try:
                p.communicate(timeout=10)
            except Exception as e:  # noqa: BLE001 - keep tearing down
                errors.append(e)
        for b in self._bgs:
            try:
                if isinstance(b, subprocess.Popen):
                    if b.poll() is None:
                        b.kill()
                    if b.stdin is not None and b.stdin.closed:  # the test closed it
                        b.stdin = None
                    b.communicate(timeout=10)
                else:
                    b.kill()
            except Exception as e:  # noqa: BLE001 - keep tearing down
                errors.append(e)
        for path, env in self._stores:
            try:
                pid = thrum.DaemonFiles(str(var_dir(path)), env).info()["pid"]
            except Exception:  # noqa: BLE001 - no store, no daemon
                pid = None
            if pid:
                self._pids.add(pid)
        for pid in self._pids:
            self._stop_daemon(pid)
        for fn in self._cleanups:
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.teardown()


# --------------------------------------------------------------------------- both modes

@pytest.fixture(params=["cli", "daemon"])
def mode(request):
    """Run a test in pure-CLI mode and again with a daemon (SPEC §1: same results)."""
    return request.param


@pytest.fixture
def modal_team(tmp_path, mode, procs):
    """The standard team, without and with a daemon; a daemon must survive the test."""
    team = make_team(tmp_path)
    team.mode = mode
    team.daemon = procs.daemon(team.path, team.env) if mode == "daemon" else None
    yield team
    if team.daemon is not None:
        assert team.daemon.answers(), "the daemon died during the test:\n" + \
            daemon_log(team.path)
