"""Black-box test harness for thrum.py.

Every test runs the real program (`[sys.executable, THRUM_PY, ...]`) in a temporary git
repository with a deterministic environment: no inherited `GIT_*`/`THRUM_*` variables, a
private `HOME` whose git config forbids guessing an identity (`user.useConfigOnly`), so thrum
has to work with no git user configured, `TZ=UTC`, `LC_ALL=C.UTF-8`, `NO_COLOR=1`.

Helpers exported for the test modules:
    THRUM_PY, make_env, make_repo, git, bare_remote, clone, run_thrum, Result, Runner, Team,
    make_team, read_log, log_dir, all_log_files, assert_error, ids_in, MSG_ID_RE
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
THRUM_PY = str(REPO_ROOT / "thrum.py")


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


def pytest_configure(config):
    if not Path(THRUM_PY).is_file():  # pragma: no cover - only before thrum.py exists
        print(f"NOTE: {THRUM_PY} does not exist yet; thrum tests will fail.", file=sys.stderr)


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


class BackgroundThrum:
    """A thrum command running in the background (e.g. a blocking `wait`): `finish()`
    collects its exit code and output and sets `ended` and `elapsed`."""

    def __init__(self, cwd, env, name, *args):
        env = dict(env)
        if name is not None:
            env["THRUM_NAME"] = name
        self.args = [str(a) for a in args]
        self.p = subprocess.Popen([sys.executable, THRUM_PY, *self.args], cwd=str(cwd),
                                  env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.started = time.monotonic()

    def running(self) -> bool:
        return self.p.poll() is None

    def finish(self, timeout=20):
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            pytest.fail(f"`thrum {' '.join(self.args)}` did not return within {timeout}s\n"
                        f"{out.decode()}\n{err.decode()}")
        self.ended = time.monotonic()
        self.elapsed = self.ended - self.started
        self.code, self.out, self.err = self.p.returncode, out.decode(), err.decode()
        assert "Traceback" not in self.err, self.err
        return self

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


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
    """A repo with agents registered in the same worktree; `t(..., name=...)` runs thrum."""

    def __init__(self, path, env):
        self.path = Path(path)
        self.env = env
        self.t = Runner(self.path, env)

    @property
    def log(self) -> Path:
        return log_dir(self.path)

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


def make_team(base: Path, members=TEAM) -> Team:
    env = make_env(Path(base) / "home")
    repo = make_repo(Path(base) / "repo", env=env)
    team = Team(repo, env)
    team.t.ok("init")
    for name, role, module in members:
        team.quickstart(name, role, module)
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
def t(team) -> Runner:
    return team.t


# --------------------------------------------------------------------------- both modes

class DaemonHandle:
    """A daemon started with `thrum daemon start` for a store; `alive()` says whether the
    same process still runs (the CLI's silent fallback must never hide a crash)."""

    def __init__(self, path, env):
        self.path, self.env = Path(path), env
        r = run_thrum(["daemon", "start", "--json"], path, env, timeout=60)
        assert r.code == 0, r.describe()
        self.pid = r.json["pid"]
        assert isinstance(self.pid, int) and self.pid > 0, r.describe()

    def alive(self) -> bool:
        r = run_thrum(["daemon", "status", "--json"], self.path, self.env)
        return r.code == 0 and r.json.get("running") is True and r.json.get("pid") == self.pid

    def stop(self):
        run_thrum(["daemon", "stop"], self.path, self.env, timeout=60)


@pytest.fixture(params=["cli", "daemon"])
def mode(request):
    """Run a test in pure-CLI mode and again with a daemon (SPEC §1: same results)."""
    return request.param


@pytest.fixture
def modal_team(tmp_path, mode):
    team = make_team(tmp_path)
    team.mode = mode
    team.daemon = DaemonHandle(team.path, team.env) if mode == "daemon" else None
    yield team
    if team.daemon is not None:
        alive = team.daemon.alive()
        log = (team.path / ".thrum" / "var" / "daemon.log")
        team.daemon.stop()
        assert alive, "the daemon died during the test:\n" + (
            log.read_text(errors="replace") if log.exists() else "(no daemon.log)")
