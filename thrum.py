#!/usr/bin/env python3
"""thrum: persistent, git-backed messaging for AI coding agents.

Agents working in parallel (worktrees, containers, CI jobs, tmux panes, other
machines) message each other by name, role or group, read an inbox that
survives restarts, block until a message arrives, see who works on what, and
sync it all through an ordinary git remote: no server.

Run it any of three ways, with identical behaviour:

    python3 thrum.py send "hi" --to @bob     # the file copied alone into a repo
    python3 -m thrum inbox                   # as a module
    thrum wait --timeout 5m                  # the installed console script

Requires Python >= 3.11 and git (for sync). Standard library only; the optional
packages `platformdirs` and `tomli-w` are used when importable.

Stable API: the command line and its `--json` output, the event log format on
the `a-sync` branch (see docs/architecture.md), and the `Service` class, whose
methods take and return plain data (the CLI, daemon and MCP front ends all call
it). Everything prefixed with `_` is private.
"""

__version__ = "0.1.0"

import fcntl
import json
import os
import re
import sqlite3
import stat
import sys
import threading
import time

# Run as a script the module is `__main__`; alias it so `import thrum` (e.g. from
# a helper process or a test) gets this same module instead of loading a copy.
if __name__ == "__main__":
    sys.modules.setdefault("thrum", sys.modules[__name__])


# === 1. Constants & errors ====================================================

SCHEMA_VERSION = 10         #: index schema; an older index.db is rebuilt


EVENT_VERSION = 1           #: the `v` field of every event


THRUM_DIR = ".thrum"


DEFAULT_BRANCH = "a-sync"


RESERVED_NAMES = frozenset("daemon system thrum all broadcast everyone".split())


BODY_FORMATS = ("markdown", "plain", "json")


MAX_TIMEOUT = 24 * 3600.0


#: How long an idempotency key names the message first sent with it (SPEC §16).
KEY_WINDOW = 24 * 3600.0


#: Exit codes (SPEC §6).
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_SETUP, EXIT_NOT_FOUND, EXIT_REFUSED = range(6)


EXIT_INTERRUPTED = 130


_NAME_MATCH = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z").match


def name_ok(name):
    """Agent, role and group names: ^[a-z0-9][a-z0-9_-]{0,63}$ (also used per projected
    event, hence the compiled pattern)."""
    return type(name) is str and _NAME_MATCH(name) is not None


class ThrumError(Exception):
    """A failure the user should see as one line; carries an exit code and a hint."""

    exit_code = EXIT_FAIL

    def __init__(self, message, hint=None, exit_code=None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ThrumError):
    """Bad flags, names, recipients, formats or bodies (exit 2)."""
    exit_code = EXIT_USAGE


class NotSetUpError(ThrumError):
    """No store, or no (or an ambiguous) identity (exit 3)."""
    exit_code = EXIT_NOT_SETUP


class NotFoundError(ThrumError):
    """An id, agent or group that does not exist (exit 4)."""
    exit_code = EXIT_NOT_FOUND


class RefusedError(ThrumError):
    """Not the author, needs --force, name taken (exit 5)."""
    exit_code = EXIT_REFUSED


def git_reason(stderr):
    """The line of git's stderr that says what went wrong."""
    lines = [l.strip() for l in (stderr or "").splitlines() if l.strip()]
    for l in lines:
        for prefix in ("fatal:", "error:"):
            if l.lower().startswith(prefix):
                return l[len(prefix):].strip()
    return lines[-1] if lines else "no output"


class MissingBodyError(UsageError):
    """An operation that takes a body was called without one."""


class OutputError(ThrumError):
    """Standard output could not be written (closed, disk full, broken pipe)."""

    def __init__(self, err):
        reason = "standard output is closed" if isinstance(err, ValueError) or \
            getattr(err, "errno", None) == 9 else (err.strerror or str(err))
        super().__init__("cannot write the output: %s" % reason)
        self.broken_pipe = isinstance(err, BrokenPipeError)


class GitMissingError(ThrumError):
    """git is not installed or not on PATH (exit 1)."""


class GitError(ThrumError):
    """A git command failed (exit 1)."""

    def __init__(self, args, code, stderr):
        super().__init__("git %s failed (exit %s): %s" % (" ".join(args[:2]), code,
                                                          git_reason(stderr)))
        self.git_args, self.returncode, self.stderr = args, code, stderr


class Progress:
    """What a long operation is doing (fetching, pushing, waiting for a daemon), as one
    line on stderr that each step rewrites and that is wiped before anything else is
    written. Off unless the CLI switches it on, which it does only when stderr is a
    terminal: pipes, logs, hooks, the daemon and MCP never see it."""

    def __init__(self):
        self.stream = None   # set by enable(): a terminal
        self.shown = False

    def enable(self, stream):
        self.stream = stream

    def step(self, text):
        if self.stream is None or threading.current_thread() is not threading.main_thread():
            return
        try:
            self.stream.write("\r\x1b[Kthrum: %s…" % text)
            self.stream.flush()
            self.shown = True
        except (OSError, ValueError):
            self.stream = None

    def clear(self):
        if self.shown:
            self.shown = False
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except (OSError, ValueError):
                self.stream = None


PROGRESS = Progress()


def _warn(msg):
    """Warnings go to stderr, never stdout (stdout may be a JSON document)."""
    PROGRESS.clear()
    try:
        sys.stderr.write("thrum: warning: %s\n" % msg)
    except (OSError, ValueError):  # pragma: no cover - closed stderr
        pass


def error_payload(exc):
    """The one shape every front end reports an error in: {message, exit_code, hint}
    (the CLI's stderr line and --json error, an RPC error reply, an MCP isError
    result). Anything that is not a ThrumError is a bug or an environment failure:
    exit code 1 with a one-line message (the caller logs the traceback)."""
    if isinstance(exc, ThrumError):
        return {"message": exc.message, "exit_code": exc.exit_code, "hint": exc.hint}
    if isinstance(exc, KeyboardInterrupt):
        return {"message": "interrupted", "exit_code": EXIT_INTERRUPTED, "hint": None}
    if isinstance(exc, OSError):  # the environment refused: permissions, a dir for a file
        where = "%s: " % exc.filename if exc.filename else ""
        return {"message": "%s%s" % (where, exc.strerror or exc), "exit_code": EXIT_FAIL,
                "hint": "check the file's type and permissions; 'thrum doctor' can help"}
    return {"message": "internal error: %s: %s" % (type(exc).__name__, exc),
            "exit_code": EXIT_FAIL,
            "hint": "re-run with --debug for the traceback, and please report it"}


def _valid_pid(v):
    """A plausible process id, else None (a bad pid never breaks projection)."""
    return v if type(v) is int and 0 < v < 2 ** 31 else None


class AfterWriteError(ThrumError):
    """The operation's write is stored, but the per-call sync after it failed
    (THRUM_AUTOSYNC). Carries the operation's `result`."""

    def __init__(self, error, result):
        super().__init__("saved locally, but THRUM_AUTOSYNC failed: " + error.message,
                         hint=error.hint)
        self.error, self.result = error, result


class WaitAbandoned(Exception):
    """A wait whose waiter went away (a daemon shutting down, a client that closed
    its connection, a cancelled MCP call): it returns nothing and claims nothing."""


# === 2. Paths, files and locks ================================================
#
# Discovery never runs git: the send path must stay free of git processes, so
# `.git` files and `commondir` pointers are parsed directly.

def _read_text(path, default=None, errors="strict"):
    try:
        with open(path, encoding="utf-8", errors=errors) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return default
    except UnicodeDecodeError:
        raise ThrumError("%s is not UTF-8 text" % path,
                         hint="fix or remove the file (thrum doctor --fix repairs the index "
                              "and log)")


def git_dirs(root):
    """Return (git_dir, common_dir) for the worktree at `root`, or None.

    Handles a main checkout (`.git` directory) and linked worktrees or
    submodules (`.git` file holding `gitdir: ...`, plus a `commondir` file).
    """
    dot = os.path.join(root, ".git")
    if os.path.isdir(dot):
        return dot, dot
    text = _read_text(dot)
    if not text or not text.startswith("gitdir:"):
        return None
    gitdir = text[len("gitdir:"):].strip()
    gitdir = os.path.normpath(os.path.join(root, gitdir))
    common = _read_text(os.path.join(gitdir, "commondir"))
    if common:
        common = os.path.normpath(os.path.join(gitdir, common.strip()))
    else:
        common = gitdir
    return gitdir, common


def _is_store(thrum_dir):
    """A full store (not just a worktree's identities) has config.toml."""
    return os.path.isfile(os.path.join(thrum_dir, "config.toml"))


def _looks_bare(d):
    return (os.path.isfile(os.path.join(d, "HEAD")) and os.path.isdir(os.path.join(d, "objects"))
            and os.path.isdir(os.path.join(d, "refs")) and _is_bare(d))


def _is_bare(common_dir):
    """True for a bare repository (its config says core.bare = true)."""
    text = _read_text(os.path.join(common_dir, "config"), "", errors="replace")
    return re.search(r"^\s*bare\s*=\s*true\s*$", text, re.M | re.I) is not None


def _main_checkout(common_dir):
    """The main checkout of a clone, or None for a bare repository."""
    if os.path.basename(common_dir) == ".git":
        return os.path.dirname(common_dir)
    return None


class Location:
    """Where things live for one invocation.

    worktree   the directory whose `.thrum/identities` holds this worktree's agents
    store      the `.thrum` directory with config, context, var/ (None: not initialised)
    git_common the clone's git common dir (None outside git)
    """

    def __init__(self, worktree, store, git_common):
        self.worktree = worktree
        self.store = store
        self.git_common = git_common

    @property
    def identities(self):
        return os.path.join(self.worktree, THRUM_DIR, "identities")

    @property
    def var(self):
        return os.path.join(self.store, "var")

    @property
    def store_root(self):
        """The directory holding the store (the main checkout's top level)."""
        return os.path.dirname(self.store)

    def log_dir(self, branch=DEFAULT_BRANCH):
        """The event log: the sync worktree in git, `.thrum/log/` outside it."""
        store_git = git_dirs(self.store_root)
        common = store_git[1] if store_git else self.git_common
        if common:
            return os.path.join(common, "thrum-sync", branch)
        return os.path.join(self.store, "log")

    def __repr__(self):  # pragma: no cover - debugging aid
        return "Location(%r, %r, %r)" % (self.worktree, self.store, self.git_common)


def locate(start):
    """Find the worktree and store for a directory.

    Walks up to the first directory holding `.thrum/` or `.git`. A `.thrum/redirect`
    points at another store; a linked worktree with no store of its own uses
    the main checkout's. Never raises for "not initialised": `store` is None.
    """
    start = os.path.abspath(start)
    if not os.path.isdir(start):
        raise UsageError("--repo %s is not a directory" % start)
    d = start
    while True:
        tdir = os.path.join(d, THRUM_DIR)
        has_thrum = os.path.isdir(tdir)
        gd = git_dirs(d)
        if gd is None and not has_thrum and _looks_bare(d):
            return Location(d, None, d)  # a bare repository: init refuses it
        if has_thrum or gd or os.path.exists(os.path.join(d, ".git")):
            common = gd[1] if gd else None
            redirect = _read_text(os.path.join(tdir, "redirect")) if has_thrum else None
            if redirect and redirect.strip():
                target = redirect.strip()
                if not os.path.isabs(target) or not _is_store(target):
                    raise NotSetUpError(
                        "%s/redirect points at %s, which is not an initialised thrum store"
                        % (tdir, target), hint="run 'thrum setup' in this worktree, "
                        "or 'thrum init' in the main checkout")
                return Location(d, target, common)
            if has_thrum and _is_store(tdir):
                return Location(d, tdir, common)
            if common:
                main = _main_checkout(common)
                if main and os.path.normpath(main) != os.path.normpath(d):
                    mstore = os.path.join(main, THRUM_DIR)
                    if _is_store(mstore):
                        return Location(d, mstore, common)
            return Location(d, None, common)
        parent = os.path.dirname(d)
        if parent == d:
            return Location(start, None, None)
        d = parent


def head_branch(worktree):
    """The checked-out branch of a worktree, read from HEAD (no git process)."""
    gd = git_dirs(worktree)
    head = _read_text(os.path.join(gd[0], "HEAD"), "") if gd else ""
    head = head.strip()
    return head[len("ref: refs/heads/"):] if head.startswith("ref: refs/heads/") else None


def _safe_name_path(directory, name, suffix):
    """Path of `<directory>/<name><suffix>`; `name` must already be validated."""
    if not name_ok(name):
        raise UsageError("invalid name %r" % name)
    return os.path.join(directory, name + suffix)


def _user_config_dir(env):
    """<user config dir>/thrum for the environment `env`. On Linux that is the XDG
    rule, which is also what platformdirs answers there, so the ~10 ms import is
    spent only elsewhere."""
    if not sys.platform.startswith("linux"):
        try:
            import platformdirs  # optional
            return platformdirs.user_config_dir("thrum", appauthor=False)
        except ImportError:
            pass
    home = env.get("HOME") or os.path.expanduser("~")
    base = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(base, "thrum")


def _write_file_atomic(path, data, mode=0o644):
    """Write bytes/str to `path` via a temp file and rename (never half-written)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = "%s.tmp.%d.%d" % (path, os.getpid(), time.monotonic_ns())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


#: Open flags that never follow a symlink in the last path component.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def own_path(path, what, private=False):
    """Refuse a part of the store (`.thrum`, `.thrum/var`, a runtime file) that is a
    symlink or belongs to another user: it could lead thrum's writes (keys, sockets, the
    index) anywhere. git refuses repositories owned by others for the same reason.
    private: a directory of ours with group or other permissions is made 0700. Returns
    the lstat result, or None when the path does not exist."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        raise ThrumError("%s (%s) is a symbolic link; thrum does not follow links there"
                         % (path, what), hint="replace it with a real %s of your own" % (
                             "directory" if what != "file" else "file"))
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise ThrumError("%s (%s) belongs to another user (uid %d); thrum will not use it"
                         % (path, what, st.st_uid),
                         hint="use a store of your own, or ask its owner")
    if private and stat.S_ISDIR(st.st_mode) and st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError:  # a read-only store still answers
            pass
    return st


def flock(fd, shared=False, wait=True):
    """Take an flock on an open descriptor (released by unlock() or by closing it).
    With wait=False, returns False at once when another holder conflicts."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) |
                    (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def unlock(fd):
    fcntl.flock(fd, fcntl.LOCK_UN)


class FileLock:
    """An flock on a lock file (created 0600), as a context manager: the one way thrum
    takes a lock file (log files are locked through their own descriptors, `flock()`).

    `acquire(wait=False)` tries once; `acquire(timeout=S)` keeps trying for S seconds;
    `held()` asks whether another process holds it (without creating the file)."""

    def __init__(self, path, shared=False):
        self.path, self.shared, self.fd = path, shared, None

    def acquire(self, wait=True, timeout=None, step=0.02):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW, 0o600)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not flock(fd, self.shared, wait and deadline is None):
                if deadline is None or time.monotonic() > deadline:
                    os.close(fd)
                    return False
                time.sleep(step)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None

    def held(self):
        """True when another process holds the lock exclusively (a missing file: no)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            return not flock(fd, shared=True, wait=False)
        except OSError:
            return False
        finally:
            os.close(fd)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


#: Longest AF_UNIX path we bind (the kernel's limit is 107 bytes plus a NUL).
_SOCK_MAX = 100


class DaemonFiles:
    """Where a store's daemon keeps its runtime files (all private to the user)."""

    def __init__(self, var, env):
        self.var = var
        self.lock = os.path.join(var, "daemon.lock")
        self.pid = os.path.join(var, "daemon.pid")
        self.key = os.path.join(var, "daemon.key")
        self.log = os.path.join(var, "daemon.log")
        self.default_socket = os.path.join(var, "thrum.sock")
        self.env = env

    def socket_path(self):
        """`var/thrum.sock`, or a short private path in the user runtime dir when that
        is too long for AF_UNIX (the path in use is recorded in daemon.pid)."""
        path = os.path.abspath(self.default_socket)
        if len(os.fsencode(path)) <= _SOCK_MAX:
            return path
        import hashlib
        name = "thrum-%s.sock" % hashlib.sha256(
            os.fsencode(os.path.realpath(self.var))).hexdigest()[:20]
        base = self.env.get("XDG_RUNTIME_DIR") or ""
        if base and _private_dir(base) and \
                len(os.fsencode(os.path.join(os.path.abspath(base), name))) <= _SOCK_MAX:
            return os.path.join(os.path.abspath(base), name)
        base = os.path.join("/tmp", "thrum-%d" % os.getuid())
        _make_private_dir(base)
        return os.path.join(base, name)

    def running(self):
        """True when a daemon holds the lock (a stale or recycled pid never counts)."""
        return FileLock(self.lock).held()

    def info(self):
        """{running, pid, socket, started_at} (pid etc. only while one runs)."""
        if not self.running():
            return {"running": False, "pid": None, "socket": None, "started_at": None}
        data = {}
        try:
            data = json.loads(_read_text(self.pid) or "{}")
        except (ValueError, ThrumError):
            pass
        if not isinstance(data, dict):
            data = {}
        return {"running": True, "pid": _valid_pid(data.get("pid")),
                "socket": data.get("socket") if isinstance(data.get("socket"), str) else None,
                "started_at": data.get("started_at")}

    def clean(self):
        """Remove the pid file and socket a killed daemon left (only when none runs)."""
        if self.running():
            return
        sock = None
        try:
            sock = json.loads(_read_text(self.pid) or "{}").get("socket")
        except (ValueError, ThrumError, AttributeError):
            pass
        for path in (self.pid, self.default_socket, sock):
            if isinstance(path, str):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def read_key(self):
        try:
            with os.fdopen(os.open(self.key, os.O_RDONLY | O_NOFOLLOW), "rb") as f:
                key = f.read().strip()
        except OSError:
            return None
        return key or None


def _private_dir(path):
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _make_private_dir(path):
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not _private_dir(path):
        raise ThrumError("%s is not a private directory of this user (0700)" % path,
                         hint="remove it, or set XDG_RUNTIME_DIR to a private directory")


# === 3. IDs & time ============================================================

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_ULID_CHARS = frozenset(_CROCKFORD)

#: ULID characters the human views show of a message id at least: the 10 of the time
#: and 2 of the random part (more where this store needs them to be unique)
SHORT_ID = 12


class _UlidGen:
    """ULIDs: 48-bit ms timestamp + 80 random bits, monotonic within a process."""

    def __init__(self):
        self.last_ms = -1
        self.last_rand = 0
        self._lock = threading.Lock()  # threads share one monotonic sequence

    def __call__(self, now_ms=None):
        with self._lock:
            return self._next(int(time.time() * 1000) if now_ms is None else now_ms)

    def _next(self, ms):
        if ms <= self.last_ms:
            ms = self.last_ms
            rand = self.last_rand + 1
            if rand >= 1 << 80:  # pragma: no cover - 2^80 ids in one ms
                ms += 1
                rand = int.from_bytes(os.urandom(10), "big")
        else:
            rand = int.from_bytes(os.urandom(10), "big")
        self.last_ms, self.last_rand = ms, rand
        n = (ms << 80) | rand
        out = []
        for _ in range(26):
            out.append(_CROCKFORD[n & 31])
            n >>= 5
        return "".join(reversed(out))


ulid = _UlidGen()


def new_id(prefix):
    return prefix + ulid()


def is_ulid(s):
    """True for a 26-character Crockford base32 ULID."""
    return len(s) == 26 and set(s) <= _ULID_CHARS and s[0] in "01234567"


def now_ts(t=None):
    """UTC timestamp in the fixed-width event format YYYY-MM-DDTHH:MM:SS.ffffffZ."""
    if t is None:
        t = time.time()
    secs = int(t)
    micros = int(round((t - secs) * 1e6))
    if micros >= 1000000:
        secs, micros = secs + 1, micros - 1000000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + ".%06dZ" % micros


def parse_ts(s):
    """Parse a UTC timestamp (event format or ISO 8601 with Z/offset) to epoch seconds."""
    import datetime
    txt = s.strip()
    if txt.endswith("Z") or txt.endswith("z"):
        txt = txt[:-1] + "+00:00"
    try:
        dt = datetime.datetime.fromisoformat(txt)
    except ValueError:
        raise ValueError("not a timestamp: %r" % s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


#: Timestamps the index orders by (a message's creation and arrival) are integers: the
#: fields of the event format YYYY-MM-DDTHH:MM:SS.ffffffZ in a mixed radix, so they
#: order as the text does and SQL prints them back (_ts_sql). Weights of the fields:
_TS_W = (13 * 32 * 24 * 60 * 61 * 1000000, 32 * 24 * 60 * 61 * 1000000,
         24 * 60 * 61 * 1000000, 60 * 61 * 1000000, 61 * 1000000, 1000000)
_TS_RANGE = (10000, 13, 32, 24, 60, 61)  # each field below these (months 0-12, ...)
#: Text that is not in the event format orders before or after all of it.
_TS_LOW, _TS_HIGH = -1, 1 << 62
_TS_FLOOR = "0000-00-00T00:00:00.000000Z"
_TS_SECONDS = {}  # "YYYY-MM-DDTHH:MM:SS" -> its weight, or None (a cache)
_TS_SEC_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\Z")


def _ts_exact(s):
    """The integer of a timestamp in the event format, or None when it is not one."""
    head = s[:19]
    try:
        base = _TS_SECONDS[head]
    except KeyError:
        m = _TS_SEC_RE.match(head)
        base = None
        if m:
            parts = [int(x) for x in m.groups()]
            if all(p < r for p, r in zip(parts, _TS_RANGE)):
                base = sum(p * w for p, w in zip(parts, _TS_W))
        if len(_TS_SECONDS) > 100000:
            _TS_SECONDS.clear()
        _TS_SECONDS[head] = base
    if base is None or len(s) != 27 or s[19] != "." or s[26] != "Z":
        return None
    frac = s[20:26]
    return base + int(frac) if frac.isdigit() and frac.isascii() else None


def _ts_key(s):
    """A timestamp as the index orders it: _ts_exact, or for text in another format
    _TS_LOW or _TS_HIGH (before or after every event-format timestamp, as it compares
    with the earliest one)."""
    k = _ts_exact(s)
    if k is None:
        return _TS_LOW if s < _TS_FLOOR else _TS_HIGH
    return k


def _ts_sql(col):
    """SQL that prints the integer `col` (_ts_exact) as the timestamp's text."""
    parts = ["%s / %d" % (col, _TS_W[0])] + [
        "%s / %d %% %d" % (col, w, r) for w, r in zip(_TS_W[1:], _TS_RANGE[1:])]
    return "printf('%%04d-%%02d-%%02dT%%02d:%%02d:%%02d.%%06dZ', %s, %s %% 1000000)" % (
        ", ".join(parts), col)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
                   "w": 604800.0}


def parse_duration(text):
    """Parse `30s`, `8m`, `1h30m`, `1.5h`, `250ms`, `2d`, `2w` or bare seconds (`45`, `-15s`).

    Returns seconds (float, may be negative). Raises ValueError.
    """
    import re
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if re.fullmatch(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", s):
        return sign * float(s)
    try:
        return _parse_units(s, sign)
    except ValueError:
        raise ValueError("invalid duration %r (use e.g. 30s, 8m, 1h30m, 1.5h, 250ms)"
                         % text) from None


def _parse_units(s, sign):
    import re
    parts = re.findall(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h|d|w)", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise ValueError(s)
    return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_duration(secs):
    """Compact duration text: 90 -> '1m30s', 0.25 -> '250ms', 86400 -> '1d'."""
    if secs < 1 and secs != int(secs):
        return "%dms" % round(secs * 1000)
    secs = int(round(secs))
    if secs == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            out += "%d%s" % (secs // size, unit)
            secs %= size
    return out


def relative_time(ts, now=None):
    """'just now', '5m ago', '3h ago', '2d ago', else 'Jan 02'."""
    if not ts:
        return "never"
    try:
        t = parse_ts(ts)
    except ValueError:
        return ts
    delta = (time.time() if now is None else now) - t
    if delta < 60:
        return "just now"
    if delta < 3600:
        return "%dm ago" % (delta // 60)
    if delta < 86400:
        return "%dh ago" % (delta // 3600)
    if delta < 7 * 86400:
        return "%dd ago" % (delta // 86400)
    return time.strftime("%b %d", time.gmtime(t))


# === 4. Config ================================================================
#
# Layers: defaults < user file < repo `.thrum/config.toml` < THRUM_* env < flags.

def _parse_bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false, got %r" % v)


def _ascii_int(text):
    """int() of ASCII digits only (int() alone takes '١' as 1)."""
    s = str(text).strip()
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise ValueError("expected a whole number, got %r" % text)
    return int(s)


def _parse_positive_int(v):
    if isinstance(v, bool):
        raise ValueError("expected a whole number")
    n = v if isinstance(v, int) else _ascii_int(v)
    if n <= 0:
        raise ValueError("must be greater than 0")
    return n


def _parse_days(v):
    """A number of days, or none/off (nothing: retention.days keeps everything)."""
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "off")):
        return None
    try:
        n = _parse_positive_int(v)
    except ValueError as e:
        raise ValueError("%s (or none to keep everything)" % e) from None
    if n > 36500:
        raise ValueError("must be at most 36500 (100 years), or none to keep everything")
    return n


def _parse_duration_value(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        secs = float(v)
    else:
        secs = parse_duration(str(v))
    if not 0.001 <= secs <= 100 * 365 * 86400:  # also refuses inf and nan
        raise ValueError("must be between 1ms and 100 years")
    return format_duration(secs)


_REF_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z", re.ASCII).match


def _parse_remote(v):
    """A configured remote's name (`origin`), never a path or URL."""
    s = str(v).strip()
    if not _REF_PART(s) or ".." in s or s.endswith((".", ".lock")) or len(s) > 100:
        raise ValueError("expected the name of a git remote such as 'origin' (see "
                         "'git remote'), not a path or URL")
    return s


def _parse_branch(v):
    """A short branch name (`a-sync`, `team/log`), not a full ref such as refs/heads/x."""
    s = str(v).strip()
    parts = s.split("/")
    if (not all(_REF_PART(p) and not p.endswith((".", ".lock")) for p in parts)
            or ".." in s or parts[0] in ("refs", "heads", "remotes", "HEAD")
            or len(s) > 100):
        raise ValueError("expected a short branch name such as 'a-sync' (not a full ref "
                         "like refs/heads/x)")
    return s


#: key -> (default, parser). `config set` validates with the parser.
CONFIG_KEYS = {
    "sync.remote": ("origin", _parse_remote),
    "sync.branch": (DEFAULT_BRANCH, _parse_branch),
    "sync.interval": ("60s", _parse_duration_value),
    "sync.wait_interval": ("5s", _parse_duration_value),
    "sync.local_only": (False, _parse_bool),
    "sync.timeout": ("30s", _parse_duration_value),
    "messages.max_body_bytes": (1048576, _parse_positive_int),
    "daemon.autostart": (False, _parse_bool),
    "agents.stale_after": ("30d", _parse_duration_value),
    "mcp.progress_interval": ("15s", _parse_duration_value),
    "index.lock_wait": ("30s", _parse_duration_value),
    "retention.days": (None, _parse_days),
}


def _env_var_for(key):
    return "THRUM_" + key.replace(".", "_").upper()


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _load_toml(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if b"=" not in data:
        return {}  # only comments: skip importing tomllib (start-up time)
    import tomllib
    try:
        return _flatten(tomllib.loads(data.decode("utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ThrumError("cannot parse %s: %s" % (path, e),
                         hint="fix or delete the file, then retry")


def _toml_key(k):
    if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k):
        return k
    return json.dumps(k, ensure_ascii=False)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return json.dumps(v, ensure_ascii=False)  # TOML basic strings accept this form
    if hasattr(v, "isoformat"):
        return v.isoformat()  # TOML dates and times
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError("cannot write %r to TOML" % (v,))


def _dump_toml(flat):
    """Serialise a flat {section.key: scalar} dict as TOML."""
    nested = {}
    for key in sorted(flat):
        section, _, name = key.rpartition(".")
        nested.setdefault(section, {})[name] = flat[key]
    try:
        import tomli_w  # optional
        return "# thrum repository configuration (see `thrum config show`)\n" + \
            tomli_w.dumps(nested)
    except (ImportError, TypeError, ValueError):
        pass
    lines = ["# thrum repository configuration (see `thrum config show`)"]
    for section in sorted(nested):
        lines.append("")
        lines.append("[%s]" % ".".join(_toml_key(p) for p in section.split(".")))
        for name, v in nested[section].items():
            lines.append("%s = %s" % (_toml_key(name), _toml_value(v)))
    return "\n".join(lines) + "\n"


class Config:
    """Layered configuration, validated once."""

    def __init__(self, store, env, overrides=None):
        self.store = store
        self.env = env
        self.overrides = overrides or {}
        self._values = None
        self._sources = {}

    @property
    def repo_file(self):
        return os.path.join(self.store, "config.toml") if self.store else None

    @property
    def user_file(self):
        return os.path.join(_user_config_dir(self.env), "config.toml")

    def _stamp(self):
        out = []
        for path in (self.repo_file, self.user_file):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            out.append(st and (st.st_ino, st.st_size, st.st_mtime_ns))
        return out

    def changed(self):
        """True when a config file changed since it was read (long-lived holders re-read
        them)."""
        return self._values is not None and self._stamp() != self._loaded

    def _load(self):
        self._loaded = self._stamp()
        vals, srcs = {}, {}
        for key, (default, _) in CONFIG_KEYS.items():
            vals[key], srcs[key] = default, "default"
        try:
            layers = [("user", _load_toml(self.user_file))]
        except (OSError, ThrumError) as e:  # optional: never a reason to stop
            _warn("skipping the user config %s: %s" % (
                self.user_file, getattr(e, "strerror", None) or getattr(e, "message", e)))
            layers = []
        if self.repo_file:
            layers.append(("repo", _load_toml(self.repo_file)))
        layers.append(("env", {k: self.env[_env_var_for(k)] for k in CONFIG_KEYS
                               if self.env.get(_env_var_for(k)) not in (None, "")}))
        layers.append(("flag", self.overrides))
        for source, layer in layers:
            for key, raw in layer.items():
                if key not in CONFIG_KEYS:
                    if source != "user":
                        _warn("ignoring unknown config key %r (%s)" % (key, source))
                    continue
                try:
                    vals[key] = CONFIG_KEYS[key][1](raw)
                except (ValueError, TypeError) as e:
                    raise UsageError("bad value for %s from %s: %s" % (key, source, e))
                srcs[key] = source
        self._values, self._sources = vals, srcs

    def get(self, key):
        if self._values is None:
            self._load()
        return self._values[key]

    def source(self, key):
        if self._values is None:
            self._load()
        return self._sources[key]

    def items(self):
        if self._values is None:
            self._load()
        return [(k, self._values[k], self._sources[k]) for k in CONFIG_KEYS]

    def set(self, key, raw):
        """Validate and write one key to the repo config file."""
        if key not in CONFIG_KEYS:
            raise UsageError("unknown config key %r" % key,
                             hint="known keys: " + ", ".join(CONFIG_KEYS))
        try:
            value = CONFIG_KEYS[key][1](raw)
        except (ValueError, TypeError) as e:
            raise UsageError("bad value for %s: %s" % (key, e))
        flat = _load_toml(self.repo_file)
        flat[key] = value
        if value is None:  # (a default of none: no line)
            del flat[key]
        _write_file_atomic(self.repo_file, _dump_toml(flat))
        self._values = None
        return value


# === 5. Event log & event checks ==============================================
#
# The log is the truth: JSONL files, one event per line, per writer (agents/<name>,
# messages/<name>, receipts/<name>) plus the shared groups.jsonl. Appends hold an
# exclusive flock and write whole lines. A writer's file is split by size into
# segments with flat names (SPEC §17): <name>.jsonl (segment 0, what every store
# started with), then <name>--0001.jsonl, <name>--0002.jsonl, ...; a writer appends
# to its latest segment and starts the next once that one holds SEGMENT_BYTES. So a
# sync commit after one message stores one bounded blob, not the whole history.

LOG_DIRS = ("agents", "messages", "receipts")


GROUPS_FILE = "groups.jsonl"


#: A writer's segment is full at this size (see docs/architecture.md, "Segments"): a
#: commit after one message then adds at most ~2 segments (its messages and agents
#: files) plus trees, <= 256 KiB at a 100,000-message history (SPEC §19).
SEGMENT_BYTES = 96 << 10


def segment_relpath(sub, name, n):
    """The path of writer `name`'s segment `n` in `sub` (agents, messages, receipts)."""
    return "%s/%s.jsonl" % (sub, name) if n == 0 else "%s/%s--%04d.jsonl" % (sub, name, n)


def _segment_stem(stem):
    """(writer, n) when `stem` is `<name>--<n>`, segment n of a valid writer name (4 to 9
    digits, zero padded), else None. Agent names ending in `--<digits>` are reserved for
    this (_check_name). No regex: it runs for every file of a listing."""
    i = stem.rfind("--")
    if i > 0:
        digits = stem[i + 2:]
        if 4 <= len(digits) <= 9 and digits.isascii() and digits.isdigit() \
                and _NAME_MATCH(stem[:i]):
            return stem[:i], int(digits)
    return None


def split_segment(stem):
    """(writer, segment number) of a log file's name without `.jsonl`, or None."""
    return _segment_stem(stem) or ((stem, 0) if name_ok(stem) else None)


#: Appends never follow a symlink.
_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | O_NOFOLLOW


def log_relpath_ok(rel):
    """Only these paths are log files: agents|messages|receipts/<name>.jsonl, their
    segments <name>--<digits>.jsonl, and groups.jsonl.

    Sync reads, merges and commits nothing else, so a crafted remote branch cannot
    make thrum touch other paths."""
    if rel == GROUPS_FILE:
        return True
    parts = rel.split("/")
    return (len(parts) == 2 and parts[0] in LOG_DIRS and parts[1].endswith(".jsonl")
            and (name_ok(parts[1][:-6]) or _segment_stem(parts[1][:-6]) is not None))


def _event_writer(ev):
    """The agent whose file an event belongs in."""
    t = ev["type"]
    if t == "agent.delete":
        return ev.get("by") or ev["agent_id"]
    return ev.get("agent_id") or ev.get("by")


def event_relpath(ev):
    """Where an event is stored, relative to the log root: groups.jsonl, or its writer's
    file as segment 0 names it (EventLog.append writes the writer's latest segment)."""
    t = ev["type"]
    if t.startswith("group."):
        return GROUPS_FILE
    writer = _event_writer(ev)
    if not name_ok(writer):
        raise UsageError("invalid writer %r for %s event" % (writer, t))
    if t == "message.receipt":
        return "receipts/%s.jsonl" % writer
    if t.startswith("message."):
        return "messages/%s.jsonl" % writer
    return "agents/%s.jsonl" % writer


def make_event(etype, origin, **fields):
    """A new event with the SPEC §3 envelope."""
    ev = {"v": EVENT_VERSION, "event_id": new_id("evt_"), "type": etype,
          "timestamp": now_ts(), "origin": origin}
    ev.update(fields)
    return ev


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


#: The one encoder of log lines: no NaN/Infinity (strict readers skip them).
_ENCODE_STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                  allow_nan=False).encode


def _dumps(obj):
    return "[]" if obj == [] else _ENCODE(obj)


def encode_event(ev):
    """The log line (bytes, newline-terminated) of one event.

    Every append goes through here, so nothing reaches the log that a strict
    reader would skip: the line must encode (no NaN/Infinity, no lone surrogates,
    no integers too long to read back), read back equal to the event, and pass
    the same checks as projection. Raises UsageError (nothing is written).
    """
    try:
        line = _ENCODE_STRICT(ev)
        data = line.encode("utf-8")
        back = json.loads(data, parse_constant=_no_constant)
    except (ValueError, TypeError, RecursionError, UnicodeError) as e:
        raise UsageError("cannot store this %s event: %s" % (ev.get("type"), _short_reason(e)),
                         hint="numbers must be finite and text valid Unicode")
    if back != ev or not isinstance(back, dict):
        raise UsageError("cannot store this %s event: it does not read back unchanged"
                         % ev.get("type"))
    problem = _event_problem(back)
    if problem:
        raise UsageError("cannot store this %s event: %s" % (ev.get("type"), problem))
    return data + b"\n"


def _short_reason(e):
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, UnicodeError):
        return "text is not valid Unicode (a lone surrogate?)"
    text = str(e)
    if "Out of range float" in text or "not JSON compliant" in text:
        return "a number is not finite (NaN or Infinity)"
    return text[:120]


def check_json_value(obj, what="structured data"):
    """Refuse a JSON value the log could not hold: non-finite numbers, lone
    surrogates, integers too long, nesting deeper than 100. Returns obj."""
    try:
        _ENCODE_STRICT(obj).encode("utf-8")
    except (ValueError, TypeError, RecursionError, UnicodeError) as e:
        raise UsageError("invalid %s: %s" % (what, _short_reason(e)))
    if _json_depth(obj) > 100:
        raise UsageError("invalid %s: nested more than 100 levels deep" % what)
    return obj


def _json_depth(obj, depth=0):
    if depth > 100:
        return depth
    if isinstance(obj, dict):
        return max([_json_depth(v, depth + 1) for v in obj.values()] or [depth + 1])
    if isinstance(obj, list):
        return max([_json_depth(v, depth + 1) for v in obj] or [depth + 1])
    return depth


def _plain(s):
    """True when a str needs no JSON escaping (names, tag values)."""
    return s.isascii() and s.isprintable() and '"' not in s and "\\" not in s


def _dumps_names(names):
    """JSON of a list of names; a fast path for the index build (falls back)."""
    try:
        s = '","'.join(names)
        if _plain(s):
            return '["' + s + '"]' if names else "[]"
    except TypeError:
        pass
    return _dumps(names)


def _dumps_tags(tags):
    """JSON of a list of {type, value} objects, with the same fast path."""
    parts = []
    try:
        for t in tags:
            ty, va = t["type"], t["value"]
            if len(t) != 2 or not _plain(ty + va):
                return _dumps(tags)
            parts.append('{"type":"%s","value":"%s"}' % (ty, va))
    except (TypeError, KeyError, AttributeError):
        return _dumps(tags)
    return "[" + ",".join(parts) + "]"


def _sealed_segments(files):
    """{relpath: stat} of the sealed segments among `files` (EventLog.files() rows, whose
    names are checked already): those holding SEGMENT_BYTES with a later segment of the
    same writer present."""
    segs, latest = [], {}
    for rel, _, st in files:
        j = rel.rfind("--")
        digits = rel[j + 2:-6] if j > 0 else ""
        if 4 <= len(digits) <= 9 and digits.isascii() and digits.isdigit():  # (_segment_stem)
            key, n = rel[:j], int(digits)
        else:
            key, n = rel[:-6], 0
        segs.append((key, n, rel, st))
        if n > latest.get(key, -1):
            latest[key] = n
    return {rel: st for key, n, rel, st in segs
            if n < latest[key] and st.st_size >= SEGMENT_BYTES}


class EventLog:
    """Append-only JSONL files under `root`; torn tails are saved to `torn_dir`."""

    #: A quick listing (files(quick=True)) reuses the last full listing for at most this
    #: many seconds.
    SEALED_FOR = 1.0

    def __init__(self, root, torn_dir):
        self.root = root
        self.torn_dir = torn_dir
        #: Bumped by a sync merge that appends to a file here (any file, sealed or not).
        self.merged = 0
        #: The last full listing: (when, merged, {sub: (directory's stat key, its rows)},
        #: then {relpath: stat} of the sealed segments, worked out when first needed).
        self._last = None

    def files(self, quick=False):
        """[(relpath, abspath, stat)] of every log file present.

        `quick` (the index's catch-up, the change signatures polled by waits and the
        daemon): a sealed segment, full and followed by a later one of its writer, is
        never appended to, only merged into by a sync. While the last full listing is
        recent (SEALED_FOR) and no merge happened here since, a quick listing takes the
        sealed segments' stats from it, and a directory whose own stat is unchanged (no
        file added or removed) is not read again: a store of hundreds of segments costs
        a stat of its few live files. Another process's merge into a sealed segment
        shows within SEALED_FOR."""
        now, merged, last = time.monotonic(), self.merged, self._last
        fresh = quick and last and last[1] == merged and now - last[0] < self.SEALED_FOR
        if fresh:
            if len(last) < 4:
                last = self._last = last + (_sealed_segments(
                    [row for _, rows in last[2].values() for row in rows]),)
            sealed = last[3]
        out, dirs = [], {}
        for sub in LOG_DIRS:
            d = os.path.join(self.root, sub)
            try:
                dst = os.stat(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            key = (dst.st_ino, dst.st_mtime_ns, dst.st_ctime_ns)
            if fresh and last[2].get(sub, (None,))[0] == key:
                for rel, path, st in last[2][sub][1]:
                    if rel not in sealed:
                        try:
                            st = os.lstat(path)
                        except FileNotFoundError:
                            continue
                        if not stat.S_ISREG(st.st_mode):
                            continue
                    out.append((rel, path, st))
                continue
            rows = dirs[sub] = (key, [])
            try:
                it = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    # Regular files only: a symlink (say, from a crafted remote branch)
                    # is never read or appended to. (The name test is log_relpath_ok's,
                    # inlined: a store has hundreds of segments.)
                    name = e.name
                    rel = sub + "/" + name
                    st = sealed.get(rel) if fresh else None
                    if st is not None:
                        rows[1].append((rel, e.path, st))
                    elif name.endswith(".jsonl") and (_NAME_MATCH(name[:-6]) or _segment_stem(
                            name[:-6])) and e.is_file(follow_symlinks=False):
                        rows[1].append((rel, e.path, e.stat(follow_symlinks=False)))
            out += rows[1]
        g = os.path.join(self.root, GROUPS_FILE)
        try:
            st = os.lstat(g)
            if stat.S_ISREG(st.st_mode):
                out.append((GROUPS_FILE, g, st))
        except FileNotFoundError:
            pass
        if not fresh:  # a full listing
            self._last = (now, merged, dirs)
        return out

    def _names(self, sub):
        """The log files' names in `sub` as the last full listing saw them, if the
        directory is unchanged since (no file added or removed), else None."""
        last = self._last
        if not last or sub not in last[2]:
            return None
        try:
            dst = os.stat(os.path.join(self.root, sub))
        except OSError:
            return None
        if (dst.st_ino, dst.st_mtime_ns, dst.st_ctime_ns) != last[2][sub][0]:
            return None
        return [rel[len(sub) + 1:] for rel, _, _ in last[2][sub][1]]

    def append(self, events):
        """Append events, grouped per file; each file gets one write under flock (into
        the writer's latest segment)."""
        by_file = {}
        for ev in events:
            by_file.setdefault(event_relpath(ev), []).append(ev)
        # Encode everything before writing anything.
        datas = {rel: b"".join(encode_event(e) for e in evs) for rel, evs in by_file.items()}
        for rel, data in datas.items():
            self._append_bytes(rel, data)

    def segments(self, sub, name, names=None):
        """[(n, relpath)] of writer `name`'s segments in `sub` present now, in order (of
        `names`, when given: the directory's file names)."""
        if names is None:
            try:
                names = os.listdir(os.path.join(self.root, sub))
            except (FileNotFoundError, NotADirectoryError):
                return []
        out, base, prefix, cut = [], name + ".jsonl", name + "--", len(name) + 2
        for fn in names:
            if fn == base:
                out.append((0, sub + "/" + fn))
            elif fn.startswith(prefix) and fn.endswith(".jsonl"):
                digits = fn[cut:-6]  # as _segment_stem, for names with this prefix
                if 4 <= len(digits) <= 9 and digits.isascii() and digits.isdigit() \
                        and int(digits):
                    out.append((int(digits), sub + "/" + fn))
        return sorted(out)

    def _append_bytes(self, rel, data):
        """Write `data` at the end of `rel` (groups.jsonl) or of the latest segment of the
        writer whose segment 0 `rel` names: the highest-numbered one present, or the next
        once that one holds SEGMENT_BYTES. Decided under the segment's flock, so appenders
        racing over a full segment all move on to the same next one."""
        seg = None
        if rel != GROUPS_FILE:
            sub, stem = rel[:-6].split("/", 1)
            have = self.segments(sub, stem, self._names(sub))
            seg = have[-1][0] if have else 0
            rel = segment_relpath(sub, stem, seg)
        while True:
            path = os.path.join(self.root, rel)
            try:  # (never a file drop_dead_files removed meanwhile)
                fd = open_for_append(path)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = open_for_append(path)
            try:
                self.repair_tail(fd, rel)
                if seg is not None and os.fstat(fd).st_size >= SEGMENT_BYTES:
                    seg += 1  # full: the next segment (closing releases this lock)
                    rel = segment_relpath(sub, stem, seg)
                    continue
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                return
            finally:
                os.close(fd)  # closing releases the flock

    def repair_tail(self, fd, rel):
        """Cut an incomplete last line (a crash mid-write), saving it under torn/."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        # Find the last newline, reading backwards in chunks (lines may be long).
        pos, cut = size, 0
        while pos > 0:
            start = max(0, pos - 65536)
            chunk = os.pread(fd, pos - start, start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                cut = start + i + 1
                break
            pos = start
        torn = os.pread(fd, size - cut, cut)
        self._save_torn(rel, torn)
        os.ftruncate(fd, cut)
        _warn("%s: cut an incomplete last line (%d bytes, saved under %s)"
              % (rel, len(torn), self.torn_dir))

    def _save_torn(self, rel, data):
        os.makedirs(self.torn_dir, exist_ok=True)
        name = "%s.%s.torn" % (rel.replace("/", "__"), new_id(""))
        _write_file_atomic(os.path.join(self.torn_dir, name), data, 0o600)

    def torn_files(self):
        """[(relpath, incomplete_bytes)] for files whose last line is incomplete."""
        out = []
        for rel, path, st in self.files():
            if st.st_size == 0:
                continue
            with open(path, "rb") as f:
                f.seek(st.st_size - 1)
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    out.append((rel, len(data) - (data.rfind(b"\n") + 1)))
        return out

    def repair(self):
        """Cut every torn tail now (doctor --fix). Returns the files repaired."""
        fixed = []
        for rel, _ in self.torn_files():
            fd = os.open(os.path.join(self.root, rel), _APPEND_FLAGS)
            try:
                flock(fd)
                self.repair_tail(fd, rel)
            finally:
                os.close(fd)
            fixed.append(rel)
        return fixed


def _is_torn(f):
    """True when a file's incomplete tail is not a write in progress: appenders hold
    an exclusive flock while writing, so a free lock means a crash left it."""
    try:
        if not flock(f.fileno(), shared=True, wait=False):
            return False
        unlock(f.fileno())
    except OSError:
        return False
    return True


def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


def parse_lines(data, rel, warn=True):
    """Parse complete JSONL lines from bytes. Returns (events, bad_count).

    Corrupt lines (bad JSON, not an event) are skipped with a warning; they
    never stop reading.
    """
    if not data:
        return [], 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    events, bad = [], 0
    lines = [l for l in lines if l.strip()]
    try:  # fast path: the whole chunk at once, if no line can have joined another
        parsed = None
        if all(l[:1] == b"{" and l.rstrip()[-1:] == b"}" for l in lines):
            parsed = json.loads(b"[" + b",".join(lines) + b"]", parse_constant=_no_constant)
            if len(parsed) != len(lines):
                parsed = None
    except (ValueError, UnicodeDecodeError, RecursionError):
        parsed = None
    if parsed is None:
        parsed = []
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line, parse_constant=_no_constant))
            except (ValueError, UnicodeDecodeError, RecursionError):
                bad += 1
                if warn:
                    _warn("%s: skipping corrupt line (%d bytes): %r"
                          % (rel, len(line), line[:60]))
    if b"\\ud" in data or b"\\uD" in data:  # lone surrogates cannot be stored: corrupt
        ok = []
        for ev in parsed:
            try:
                _ENCODE(ev).encode("utf-8")
                ok.append(ev)
            except (UnicodeEncodeError, TypeError, ValueError):
                bad += 1
                if warn:
                    _warn("%s: skipping a line with invalid Unicode" % rel)
        parsed = ok
    for ev in parsed:
        if (isinstance(ev, dict) and isinstance(ev.get("type"), str)
                and isinstance(ev.get("event_id"), str)
                and isinstance(ev.get("timestamp"), str)):
            events.append(ev)
        else:
            bad += 1
            if warn:
                _warn("%s: skipping a line that is not a thrum event: %.60s"
                      % (rel, _dumps(ev)))
    return events, bad


def _opt_str(ev, *fields):
    for f in fields:
        v = ev.get(f)
        if v is not None and type(v) is not str:
            return f
    return None


def _tag_list_ok(v):
    if v is None:
        return True
    if type(v) is not list:
        return False
    for t in v:
        if type(t) is not dict or type(t.get("type")) is not str \
                or type(t.get("value")) is not str:
            return False
    return True


def _body_ok(b):
    return (type(b) is dict and type(b.get("content")) is str
            and (b.get("format") is None or type(b.get("format")) is str)
            and (b.get("structured") is None or type(b.get("structured")) is dict))


def _event_problem(ev):
    """Why an event cannot be projected (None when it can).

    Every event is checked the same way whatever batch it arrives in, so the
    index never depends on how the log was read. Fields that become file
    names or SQL values must have the right types; agent names must be valid.
    """
    t = ev["type"]
    if t == "message.create":  # the bulk of every log: the same rules, inlined
        g = ev.get
        aid, body = g("agent_id"), g("body")
        if type(g("message_id")) is not str or type(aid) is not str \
                or _NAME_MATCH(aid) is None:
            return "needs message_id and a valid agent_id"
        if type(body) is not dict or not _body_ok(body):
            return "needs a body {format, content, structured: object}"
        for f in ("origin", "session_id", "reply_to", "thread_id", "idempotency_key"):
            v = g(f)
            if v is not None and type(v) is not str:
                return "%s must be text" % f
        r = g("recipients")
        if r:
            if type(r) is not list:
                return "recipients must be agent names"
            for x in r:
                if type(x) is not str or _NAME_MATCH(x) is None:
                    return "recipients must be agent names"
        for f in ("audiences", "scopes", "refs"):
            v = g(f)
            if v and not _tag_list_ok(v):
                return "%s must be [{type, value}] with text" % f
        return None
    bad = _opt_str(ev, "origin")
    if bad:
        return "%s must be text" % bad
    if t.startswith("message."):
        if type(ev.get("message_id")) is not str or not name_ok(ev.get("agent_id")):
            return "needs message_id and a valid agent_id"
        if t == "message.edit":  # (message.create is checked above)
            if not _body_ok(ev.get("body")):
                return "needs a body {format, content, structured: object}"
        elif t == "message.delete":
            if _opt_str(ev, "reason"):
                return "reason must be text"
    elif t.startswith("agent."):
        if not name_ok(ev.get("agent_id")):
            return "needs a valid agent_id"
        if t.startswith("agent.session.") and type(ev.get("session_id")) is not str:
            return "needs session_id"
        bad = _opt_str(ev, "role", "module", "display", "worktree", "hostname", "reason",
                       "intent", "task", "status", "branch", "context")
        if bad:
            return "%s must be text" % bad
        if ev.get("by") is not None and not name_ok(ev.get("by")):
            return "by must be an agent name"
        files = ev.get("files")
        if files is not None and (type(files) is not list or not all(
                type(f) is dict and type(f.get("path")) is str and
                (f.get("status") is None or type(f.get("status")) is str) for f in files)):
            return "files must be [{path, status}]"
        tm = ev.get("tmux")
        if tm is not None and (type(tm) is not dict or not all(
                type(v) is str for v in tm.values()) or type(tm.get("session")) is not str):
            return "tmux must be {session, pane, socket, host} (text)"
    elif t.startswith("group."):
        if not name_ok(ev.get("group")):
            return "needs a valid group name"
        bad = _opt_str(ev, "group_id", "description")
        if bad:
            return "%s must be text" % bad
        if ev.get("by") is not None and not name_ok(ev.get("by")):
            return "by must be an agent name"
        if t.startswith("group.member.") and not (
                ev.get("member_type") in ("agent", "role") and name_ok(ev.get("member"))):
            return "needs member_type agent|role and a valid member"
    elif t == PURGE_EVENT:
        if not name_ok(ev.get("by")):
            return "by must be an agent name"
        try:
            purge_bound(ev.get("before"))
        except (ValueError, TypeError, OverflowError):
            return "before must be a timestamp (YYYY-MM-DDTHH:MM:SS.ffffffZ)"
        keep = ev.get("keep")
        if keep is not None and (type(keep) is not list or
                                 not all(type(k) is str for k in keep)):
            return "keep must be a list of message ids"
        if _opt_str(ev, "reason"):
            return "reason must be text"
    return None


# -- retention (SPEC §17): log.purge events and what they make dead -------------------
#
# A purge is an event `{"type": "log.purge", "by", "before", "keep": [message ids]}` in
# the purger's agents/ file. What it removes is a function of the event alone, so every
# clone's merge, commit and index agree without asking anything else: a message is
# purged by P when the ULID time of its id is before P.before and P.keep does not hold
# it (an id that is not a ULID: its create's timestamp is before P.before); an event is
# dead when it is a message.create/edit/delete/receipt of a purged message (of a
# non-ULID id only the create is dead).

PURGE_EVENT = "log.purge"

_FIXED_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z\Z").match
_MSG_ULID = re.compile(r"msg_[0-7][0-9A-HJKMNP-TV-Z]{25}\Z").match
_DEAD_TYPES = frozenset(("message.create", "message.edit", "message.delete",
                         "message.receipt"))


def purge_bound(before):
    """The smallest `msg_` id a purge at `before` (event timestamp) keeps by time: ULID
    ids compare as their times do, so `id < bound` is "created before". Raises
    ValueError for a timestamp that is not in the fixed-width format."""
    if type(before) is not str or not _FIXED_TS(before):
        raise ValueError("not a timestamp: %r" % (before,))
    import calendar
    secs = calendar.timegm(time.strptime(before[:19], "%Y-%m-%dT%H:%M:%S"))
    ms = max(0, -(-(secs * 1000000 + int(before[20:26])) // 1000))  # ULID ms < before
    out = []
    for _ in range(10):
        out.append(_CROCKFORD[ms & 31])
        ms >>= 5
    return "msg_" + "".join(reversed(out))


class PurgeSet:
    """The purges of a log (log.purge events) and the rule of what they make dead."""

    def __init__(self, events=()):
        self.purges = {}  # event_id -> (bound, before, keep)
        self._order = []
        for ev in events:
            self.add(ev)

    def add(self, ev):
        """Add a purge event (checked: `_event_problem`). True when it is new."""
        if ev["event_id"] in self.purges:
            return False
        self.purges[ev["event_id"]] = (purge_bound(ev["before"]), ev["before"],
                                       frozenset(ev.get("keep") or ()))
        self._order = sorted(self.purges.values(), reverse=True)  # latest horizon first
        return True

    def __bool__(self):
        return bool(self.purges)

    @property
    def signature(self):
        return frozenset(self.purges)

    def is_purged(self, mid, created=None):
        """Is message `mid` purged? (`created`: its create's timestamp, which decides
        for an id that is not a ULID; without it such an id is never purged.)"""
        if _MSG_ULID(mid):
            for bound, _, keep in self._order:
                if mid >= bound:
                    return False  # (the horizons that follow are earlier still)
                if mid not in keep:
                    return True
            return False
        if type(created) is not str:
            return False
        return any(created < before and mid not in keep for _, before, keep in self._order)

    def is_dead(self, ev):
        """Is this event dead (a message event of a purged message)?"""
        t = ev.get("type")
        if t not in _DEAD_TYPES or not self.purges or type(ev.get("message_id")) is not str:
            return False
        return self.is_purged(ev["message_id"],
                              ev.get("timestamp") if t == "message.create" else None)

    def line_dead(self, line):
        """is_dead of one log line (bytes); a corrupt line is not dead. Lines with one
        `"message_id":"` and one `"type":"message.` are read without parsing."""
        if not self.purges or b'"type":"message.' not in line:
            return False
        i = line.find(b'"message_id":"msg_')
        if i >= 0 and line.count(b'"message_id":"') == 1 and \
                line.count(b'"type":"message.') == 1 and any(
                    b'"type":"%s"' % t.encode() in line for t in _DEAD_TYPES):
            mid = line[i + 14:line.find(b'"', i + 14)].decode("ascii", "replace")
            if _MSG_ULID(mid):
                return self.is_purged(mid)
        try:
            ev = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return False
        return isinstance(ev, dict) and self.is_dead(ev)

    def live(self, data):
        """The lines of `data` (bytes of complete lines) that are not dead."""
        if not self.purges or not data:
            return data
        lines = data.split(b"\n")
        kept = [l for l in lines[:-1] if not self.line_dead(l)]
        return b"\n".join(kept) + b"\n" if kept else b""

    def all_dead(self, data):
        """Whether `data` holds complete lines and every one of them is dead."""
        lines = [l for l in data[:data.rfind(b"\n") + 1].split(b"\n") if l.strip()]
        return bool(lines) and self.line_dead(lines[-1]) and all(map(self.line_dead, lines))


#: What this process learnt of the log's purges: per agents/ file how far it was read
#: and the purges found; the last PurgeSet made; files known not to be all dead.
_PURGE_CACHE = {"scan": {}, "set": None, "live": {}}


def log_purges(log):
    """The PurgeSet of the log.purge events in `log`'s agents/ files (the purger's file).
    A file is read once, then only what was appended to it."""
    found = []
    scan = _PURGE_CACHE["scan"]
    for rel, path, st in log.files():
        if not rel.startswith("agents/"):
            continue
        ino, start, evs = scan.get(path) or (None, 0, ())
        if ino != st.st_ino or start > st.st_size:
            ino, start, evs = st.st_ino, 0, ()
        if start < st.st_size:
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(st.st_size - start)
            except OSError:
                data = b""
            data = data[:data.rfind(b"\n") + 1]
            if b"log.purge" in data:
                evs = tuple(evs) + tuple(e for e in parse_lines(data, rel, warn=False)[0]
                                         if e["type"] == PURGE_EVENT
                                         and _event_problem(e) is None)
            scan[path] = (ino, start + len(data), evs)
        found += evs
    last = _PURGE_CACHE["set"]
    if last is None or last.signature != frozenset(e["event_id"] for e in found):
        last = _PURGE_CACHE["set"] = PurgeSet(found)
    return last


def drop_dead_files(log, purges):
    """Remove the message and receipt files of `log` whose complete lines are all dead
    (SPEC §17: only whole files leave; agents/ and groups.jsonl never do). Each is
    checked and removed under its flock (appenders never write to a removed file:
    open_for_append). Returns the relpaths removed."""
    if not purges:
        return []
    live, out = _PURGE_CACHE["live"], []
    for rel, path, st in log.files():
        key = (st.st_ino, st.st_size, st.st_mtime_ns, purges.signature)
        if not rel.startswith(("messages/", "receipts/")) or live.get(path) == key:
            continue
        try:
            fd = os.open(path, os.O_RDWR | O_NOFOLLOW)
        except OSError:
            continue
        try:
            flock(fd)
            st = os.fstat(fd)
            tail = os.pread(fd, min(st.st_size, 65536), max(0, st.st_size - 65536))
            end = tail.rfind(b"\n")
            start = tail.rfind(b"\n", 0, max(end, 0)) + 1
            if end < 0 or not start and len(tail) < st.st_size or \
                    purges.line_dead(tail[start:end]):  # (the newest line first)
                if st.st_nlink and purges.all_dead(os.pread(fd, st.st_size, 0)):
                    os.unlink(path)
                    out.append(rel)
                    continue
            live[path] = key
        finally:
            os.close(fd)
    return out


def without_dead(files, purges, root, read_blobs):
    """{path: (blob sha, size)} of a commit less its message and receipt files that are
    not under `root` (the worktree dropped them) and whose blobs hold only dead lines:
    whole files leave the tip. `read_blobs(shas)` -> {sha: bytes}; answers are kept per
    blob and set of purges, so a cycle reads a blob once."""
    if not purges:
        return files
    dead = _PURGE_CACHE.setdefault("dead", {})
    if len(dead) > 4096:
        dead.clear()
    maybe = {p: (purges.signature, s) for p, (s, _) in files.items()
             if p.startswith(("messages/", "receipts/")) and
             not os.path.lexists(os.path.join(root, p))}
    todo = sorted({k[1] for k in maybe.values() if k not in dead})
    for sha, data in (read_blobs(todo) if todo else {}).items():
        dead[(purges.signature, sha)] = purges.all_dead(data)
    return {p: v for p, v in files.items() if not (p in maybe and dead.get(maybe[p]))}


def open_for_append(path):
    """An append descriptor of `path` holding its exclusive flock, never one of a file
    removed meanwhile (drop_dead_files removes files under that lock)."""
    while True:
        fd = os.open(path, _APPEND_FLAGS, 0o644)
        try:
            flock(fd)
            if os.fstat(fd).st_nlink:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


# -- local records under .thrum/var/ (not synced; they survive a rebuild) -----------------

class LocalRecord:
    """A small record of ids under `.thrum/var/` (JSONL lines {"id", "at"}): local
    state that is not synced and survives an index rebuild. Entries older than `keep`
    seconds are forgotten; the file is compacted when it is mostly old entries.
    Changes hold an exclusive flock on `<path>.lock`."""

    def __init__(self, path, keep=86400.0):
        self.path = path
        self.keep = keep

    def _cutoff(self):
        return now_ts(time.time() - self.keep)

    def _read(self):
        """({id: at}, lines, [the other entries: objects without an id])."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return {}, 0, []
        out, n, other = {}, 0, []
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            n += 1
            try:
                d = json.loads(line)
                if "id" in d:
                    out[d["id"]] = d["at"]
                elif type(d) is dict:
                    other.append(d)
            except (ValueError, KeyError, TypeError):
                continue  # a torn or damaged line only forgets that entry
        return out, n, other

    def _keep_other(self, other, cutoff):
        """Which entries without an id a compaction keeps (a subclass's own kinds)."""
        return []

    def load(self):
        """{id: at} of the entries still kept."""
        cutoff = self._cutoff()
        return {k: v for k, v in self._read()[0].items() if isinstance(v, str) and v >= cutoff}

    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return FileLock(self.path + ".lock")

    def add(self, ids, at=None, only_new=False):
        """Record ids (at `at`, default now). With only_new, ids already kept are
        skipped. Returns the ids recorded now. A store that cannot be written (read-only)
        records nothing and returns them all, with a warning."""
        try:
            return self._add(ids, at, only_new)
        except OSError as e:
            _warn("cannot record in %s (%s): it is not kept" % (self.path, e.strerror or e))
            return list(dict.fromkeys(ids))

    def present(self, ids):
        """The ids of `ids` the record holds (an old entry not compacted away yet counts):
        a text search of the file, no parsing, for hot paths with few candidates."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return set()
        return {i for i in ids if ('"%s"' % i).encode("utf-8") in data}

    def _add(self, ids, at, only_new):
        with self._locked():
            if only_new and self._fast_add_ok():
                have = self.present(ids)
                new = [i for i in dict.fromkeys(ids) if i not in have]
                if new:
                    self._append(new, at or now_ts())
                return new
            entries, lines, other = self._read()
            cutoff = self._cutoff()
            kept = {k: v for k, v in entries.items() if isinstance(v, str) and v >= cutoff}
            new = [i for i in dict.fromkeys(ids) if not (only_new and i in kept)]
            at = at or now_ts()
            if new:
                kept.update((i, at) for i in new)
                if lines > 1000 and lines > 2 * len(kept):  # mostly forgotten: compact
                    _write_file_atomic(self.path, "".join(
                        _ENCODE(d) + "\n" for d in [{"id": k, "at": v} for k, v in
                                                    kept.items()] +
                        self._keep_other(other, cutoff)), 0o600)
                else:
                    self._append(new, at)
            return new

    def _append(self, ids, at, entries=()):
        data = "".join(_ENCODE(d) + "\n" for d in [{"id": i, "at": at} for i in ids] +
                       list(entries))
        afd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW, 0o600)
        try:
            os.write(afd, data.encode("utf-8"))
        finally:
            os.close(afd)

    def _fast_add_ok(self):
        """Whether an add may skip parsing the file: it is small, or its oldest entry is
        still kept (so nothing is due to be forgotten and compacted yet)."""
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
                big = os.fstat(f.fileno()).st_size > 64 * 1024
        except FileNotFoundError:
            return True
        if not big:
            return False  # small: parsing is cheap, and compaction stays exact
        try:
            return json.loads(first)["at"] >= self._cutoff()
        except (ValueError, KeyError, TypeError):
            return False


class ArrivalRecord(LocalRecord):
    """`var/arrivals.jsonl`: when messages that came late (a sync pulled them in, or a
    clock is off) reached this store, so that a rebuild gives them the same arrival
    (SPEC §7). Besides `{id, at}` lines, one `{file, start, end, crc, at}` line stands
    for every message in that byte range of a log file: a block of new lines read at
    once (the usual case, so one line however many messages a sync brought). A rebuild
    uses it while the file still holds the same bytes there (crc32)."""

    def _keep_other(self, other, cutoff):
        return [d for d in other if isinstance(d.get("at"), str) and d["at"] >= cutoff]

    def add_range(self, rel, start, end, crc, at):
        try:
            with self._locked():
                self._append((), at, [{"file": rel, "start": start, "end": end, "crc": crc,
                                       "at": at}])
        except OSError as e:
            _warn("cannot record in %s (%s): it is not kept" % (self.path, e.strerror or e))

    def known(self, paths):
        """What a rebuild takes: ({message id: at}, {file: [(start, end, at)]} of the
        ranges whose bytes that log file (`paths`: {file: path}) still holds)."""
        import zlib
        entries, _, other = self._read()
        cutoff, ranges = self._cutoff(), {}
        for d in self._keep_other(other, cutoff):
            try:
                start, end = int(d["start"]), int(d["end"])
                with open(paths[d["file"]], "rb") as f:
                    f.seek(start)
                    if end <= start or zlib.crc32(f.read(end - start)) != d["crc"]:
                        continue
            except (KeyError, TypeError, ValueError, OSError):
                continue
            ranges.setdefault(d["file"], []).append((start, end, d["at"]))
        for v in ranges.values():
            v.sort()
        return {k: v for k, v in entries.items() if isinstance(v, str) and v >= cutoff}, \
            ranges


class Claims:
    """Hand-over-safe claims on an agent's messages (SPEC §7 "claimed only when handed
    over"), in front of a delivered-once LocalRecord.

    A wait that found messages first *holds* them: `hold()` writes their ids to a hold
    file (`<record>.holds/<token>`) and keeps an flock on it, so no other wait of the
    agent takes them. Once the front end has handed them over (the CLI wrote and flushed
    its output, the MCP server wrote the result frame) `commit()` records them as
    delivered; if it could not (a closed stdout, a cancel, a client gone), `release()`
    frees them. A hold whose process died (kill -9) loses its flock and is free again;
    one a daemon keeps for a client that never came back expires after HOLD_MAX s. Any
    process may commit or release a hold by its token (the CLI commits what its
    daemon held)."""

    HOLD_MAX = 60.0
    _open = {}  # token -> descriptor holding the flock, in this process
    _open_lock = threading.Lock()

    def __init__(self, record):
        self.record = record
        self.dir = record.path[:-len(".jsonl")] + ".holds"

    def _path(self, token):
        if not isinstance(token, str) or not re.match(r"[0-9a-f-]{8,64}\Z", token):
            raise UsageError("invalid claim token")
        return os.path.join(self.dir, token)

    def held(self):
        """Ids held by live holds (stale ones are removed on the way)."""
        out = set()
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for name in names:
            path = os.path.join(self.dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                stale = flock(fd, wait=False) or time.time() - st.st_mtime > self.HOLD_MAX
                if stale:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    continue
                out.update(os.read(fd, 1 << 20).decode("utf-8", "replace").split())
            finally:
                os.close(fd)
        return out

    def hold(self, ids):
        """Hold those of `ids` that are neither delivered nor held. Returns (token,
        held ids); token None when there was nothing left to hold."""
        with self.record._locked():
            taken = set(self.record.present(ids)) | self.held()
            fresh = [i for i in dict.fromkeys(ids) if i not in taken]
            if not fresh:
                return None, []
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            token = "%d-%s" % (os.getpid(), os.urandom(8).hex())
            fd = os.open(self._path(token), os.O_RDWR | os.O_CREAT | os.O_EXCL | O_NOFOLLOW,
                         0o600)
            flock(fd)
            os.write(fd, "\n".join(fresh).encode("utf-8"))
        with self._open_lock:
            self._open[token] = fd
        return token, fresh

    def commit(self, token):
        """The held messages were handed over: record them as delivered."""
        path = self._path(token)
        try:
            with open(path, "rb") as f:
                ids = f.read().decode("utf-8", "replace").split()
        except FileNotFoundError:
            ids = []
        if ids:
            self.record.add(ids, only_new=True)
        self.release(token)
        return ids

    def release(self, token):
        """Free a hold (its messages go to the next wait)."""
        try:
            os.unlink(self._path(token))
        except FileNotFoundError:
            pass
        with self._open_lock:
            fd = self._open.pop(token, None)
        if fd is not None:
            os.close(fd)

    @classmethod
    def reap(cls):
        """Close this process's descriptors of holds that were committed or released
        elsewhere, or expired (the daemon runs this now and then)."""
        with cls._open_lock:
            items = list(cls._open.items())
        for token, fd in items:
            try:
                st = os.fstat(fd)
                done = st.st_nlink == 0 or time.time() - st.st_mtime > cls.HOLD_MAX
            except OSError:
                done = True
            if done:
                with cls._open_lock:
                    cls._open.pop(token, None)
                try:
                    os.close(fd)
                except OSError:
                    pass


def holds_signature(var):
    """What the agents' holds look like now (each `<agent>.holds` directory's mtime):
    a hold released (a closed stdout, a cancel) changes it, and the waits that skipped
    the held messages look again."""
    out = []
    try:
        with os.scandir(os.path.join(var, "delivered")) as it:
            for e in it:
                if e.name.endswith(".holds"):
                    out.append((e.name, e.stat(follow_symlinks=False).st_mtime_ns))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out


def _delivered_record(var, agent, record="delivered"):
    """The delivered-once record of `agent` (`record`: "delivered" for waits and hooks,
    "pushed" for the MCP channel)."""
    if record not in ("delivered", "pushed", "watched"):
        raise UsageError("invalid record %r" % (record,))
    return LocalRecord(_safe_name_path(os.path.join(var, record), agent, ".jsonl"))


def _wait_cursor_path(var, agent, record="delivered"):
    """Where the end of `agent`'s previous wait (for `record`) is kept: a timestamp."""
    return _safe_name_path(os.path.join(var, record), agent, ".waited")


def _set_wait_cursor(path, ts):
    try:
        old = (_read_text(path) or "").strip()
        if ts > old:  # concurrent waits: the latest end wins
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            _write_file_atomic(path, ts + "\n", 0o600)
    except OSError:
        pass  # a read-only store: the next wait reaches further back, losing nothing


def settle_claim(var, claim, handed):
    """Settle what a wait held (`claim`, from its result): handed over, the messages count
    as delivered and the agent's next wait starts where this one looked; not handed
    over, they go to the next wait. Returns the ids now delivered."""
    if not isinstance(claim, dict):
        return []
    me, record = claim.get("agent"), claim.get("record", "delivered")
    if not isinstance(me, str) or not name_ok(me):
        raise UsageError("invalid claim")
    claims = Claims(_delivered_record(var, me, record))
    if not handed:
        claims.release(claim.get("token"))
        return []
    ids = claims.commit(claim.get("token"))
    if isinstance(claim.get("cursor"), str):
        _set_wait_cursor(_wait_cursor_path(var, me, record), claim["cursor"])
    return ids


#: SQLite's result codes for a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB): the only
#: errors that make thrum rebuild the index. Too many open files, a full disk, an I/O
#: error or a lock (CANTOPEN, FULL, IOERR, BUSY) fail the request and change nothing.


# === 6. Index: the projection of the log ======================================
#
# SQLite (WAL) cache of the log. Every projection is order-independent: source
# tables (edits, deletes, receipts, register/delete keys) are keyed so that
# applying the same events in any order, any number of times, gives the same
# rows; derived columns are recomputed from them. So the index after any
# interleaving of writes and syncs equals a rebuild from the log alone.

# -- the words of a message body (search, SPEC §17) ------------------------------------
# One definition, used by the SQLite FTS5 index (section 6), the scan that replaces it
# when the interpreter's SQLite has no FTS5, and the query parser and snippets (section
# 7), so both backends agree by construction. A word is a maximal run of letters, digits
# (str.isalnum) and combining marks (category M*); everything else separates words,
# `_` included. Words are compared case-folded (str.casefold) after NFC normalisation,
# with no stemming. FTS5 splits what it is given with its `ascii` tokenizer (ASCII
# letters and digits and every non-ASCII character are word characters; it folds A-Z):
# on ASCII text that gives exactly these words, so ASCII text goes in as it is; other
# text goes in as its folded words joined by spaces. Changing this definition changes
# the index: bump SCHEMA_VERSION.

_SEARCH_PATTERNS = {"word": r"[^\W_]+", "word_or_other": r"([^\W_]+)|([^\x00-\x7f\w])",
                    "query": r'"([^"]*)(?:"|$)(\*?)|([^\s"]+)'}
_SEARCH_RE = {}


def _search_re(name):
    """A compiled _SEARCH_PATTERNS entry (compiled on first use: start-up stays lean)."""
    r = _SEARCH_RE.get(name)
    if r is None:
        r = _SEARCH_RE[name] = re.compile(_SEARCH_PATTERNS[name])
    return r


def search_words(text):
    """(text, [(start, end)]): the words of a body, as spans of the text it returns (the
    NFC form of `text`; `text` itself when it is ASCII)."""
    if text.isascii():
        return text, [m.span() for m in _search_re("word").finditer(text)]
    import unicodedata
    text = unicodedata.normalize("NFC", text)
    spans = []
    for m in _search_re("word_or_other").finditer(text):
        s, e = m.span()
        if m.group(2) is not None and unicodedata.category(m.group(2))[0] != "M":
            continue  # non-ASCII punctuation, symbols, spaces: a separator
        if spans and spans[-1][1] == s:
            spans[-1] = (spans[-1][0], e)  # a mark joins the word it touches
        else:
            spans.append((s, e))
    return text, spans


def folded_words(text):
    """The case-folded words of `text`, in order."""
    if text.isascii():
        return _search_re("word").findall(text.lower())
    text, spans = search_words(text)
    return [text[s:e].casefold() for s, e in spans]


def _fts_words(text):
    """What the FTS5 index is given for a body (see above)."""
    text = text or ""
    return text if text.isascii() else " ".join(folded_words(text))


_SCHEMA_TABLES = """
CREATE TABLE files(path TEXT PRIMARY KEY, ino INTEGER, size INTEGER, mtime_ns INTEGER,
                   offset INTEGER, tail BLOB, lines INTEGER);
-- rid: the key the other tables use for a message (an integer is much smaller than the
-- id's text). ts: created_at as an order-preserving integer (_ts_key); created_at holds
-- the text only when it is not in the event format (readers use _CREATED). arrived: when
-- it reached this store (_ts_key of it). ses: its session_id (in names). Defaults are
-- not stored: format0 NULL is
-- markdown, audiences NULL is one agent audience per recipient, scopes/refs NULL is [].
CREATE TABLE messages(
  rid INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, agent_id TEXT, ses INTEGER,
  ts INTEGER, created_at TEXT, arrived INTEGER, format0 TEXT, content0 TEXT,
  structured0 TEXT, recipients TEXT, audiences TEXT, scopes TEXT, refs TEXT, reply_to TEXT,
  thread0 TEXT,
  -- the latest edit (NULL until edited; readers coalesce with the *0 columns)
  format TEXT, content TEXT, structured TEXT, updated_at TEXT, version INTEGER DEFAULT 0,
  deleted INTEGER DEFAULT 0, deleted_at TEXT, delete_reason TEXT, thread_id TEXT,
  -- the idempotency key it was sent with (SPEC 16), and the message it duplicates
  idem_key TEXT, dup_of TEXT);
-- (agent, key) -> its messages, and the (few) duplicates: with the tables, since a
-- build needs them as it goes
CREATE INDEX messages_idem ON messages(agent_id, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX messages_dup ON messages(dup_of) WHERE dup_of IS NOT NULL;
-- One row per recipient, in each agent's inbox order (ts, rid: the message's). deleted:
-- hidden (the message is deleted, or a duplicate by idempotency key). arrived: NULL (the
-- message's), or earlier when a duplicate of it reached this agent first.
CREATE TABLE deliveries(agent_id TEXT, ts INTEGER, rid INTEGER, read_at TEXT,
                        deleted INTEGER DEFAULT 0, arrived INTEGER,
                        PRIMARY KEY(agent_id, ts, rid)) WITHOUT ROWID;
-- audiences (only those that are not one per recipient), scopes and refs
CREATE TABLE tags(rid INTEGER, kind TEXT, type TEXT, value TEXT,
                  PRIMARY KEY(rid, kind, type, value)) WITHOUT ROWID;
CREATE TABLE receipts(message_id TEXT, agent_id TEXT, read_at TEXT,
                      PRIMARY KEY(message_id, agent_id)) WITHOUT ROWID;
CREATE TABLE edits(event_id TEXT PRIMARY KEY, message_id TEXT, agent_id TEXT, ts TEXT,
                   format TEXT, content TEXT, structured TEXT);
CREATE TABLE deletes(event_id TEXT PRIMARY KEY, message_id TEXT, agent_id TEXT, ts TEXT,
                     reason TEXT);
CREATE TABLE agents(agent_id TEXT PRIMARY KEY, role TEXT, module TEXT, display TEXT,
                    worktree TEXT, hostname TEXT, origin TEXT, registered_at TEXT,
                    reg_key TEXT, del_key TEXT, deleted_by TEXT, takeover INTEGER);
CREATE TABLE agent_fields(agent_id TEXT, field TEXT, value TEXT, key TEXT,
                          PRIMARY KEY(agent_id, field)) WITHOUT ROWID;
CREATE TABLE seen(agent_id TEXT PRIMARY KEY, ts TEXT);
-- text that many rows share (session ids), stored once
CREATE TABLE names(nid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE sessions(session_id TEXT PRIMARY KEY, agent_id TEXT, started_at TEXT,
                      ended_at TEXT, end_reason TEXT, pid INTEGER);
CREATE TABLE groups(name TEXT PRIMARY KEY, group_id TEXT, description TEXT,
                    created_by TEXT, created_at TEXT, create_key TEXT, delete_key TEXT);
CREATE TABLE group_members(name TEXT, member_type TEXT, member TEXT, add_key TEXT,
                           remove_key TEXT, added_by TEXT, added_at TEXT,
                           PRIMARY KEY(name, member_type, member)) WITHOUT ROWID;
-- log.purge events (SPEC §17): what they purge is never projected
CREATE TABLE purges(event_id TEXT PRIMARY KEY, by TEXT, before TEXT, keep TEXT, ts TEXT);
"""


#: Secondary indexes: created after a bulk build, which is faster. Which query needs
#: each: docs/architecture.md ("The index").
_SCHEMA_INDEXES = """
CREATE INDEX messages_author ON messages(agent_id, ts);
CREATE INDEX messages_created ON messages(ts);
CREATE INDEX messages_arrived ON messages(arrived);
CREATE INDEX messages_reply ON messages(reply_to) WHERE reply_to IS NOT NULL;
CREATE INDEX messages_thread ON messages(thread_id) WHERE thread_id IS NOT NULL;
CREATE INDEX deliveries_unread ON deliveries(agent_id, deleted, read_at)
  WHERE read_at IS NULL AND deleted = 0;
CREATE INDEX deliveries_hidden ON deliveries(agent_id, deleted) WHERE deleted != 0;
CREATE INDEX deliveries_msg ON deliveries(rid);
CREATE INDEX edits_msg ON edits(message_id);
CREATE INDEX deletes_msg ON deletes(message_id);
CREATE INDEX sessions_agent ON sessions(agent_id);
"""


_SCHEMA = _SCHEMA_TABLES + _SCHEMA_INDEXES


#: The search index (SPEC §17), when this SQLite has FTS5: contentless, so it holds only
#: the words' postings, never a copy of a body (the text stays in `messages`). A row's
#: rowid is its message's rowid, its one column the message's current text as
#: _fts_words() gives it (the latest edit, over the original); deleted messages and
#: duplicates stay in it and are left out by the queries, like everywhere else.
_FTS_SCHEMA = ("CREATE VIRTUAL TABLE messages_fts USING fts5(words, content='', "
               "tokenize='ascii', detail='full')")

_FTS5 = []  # [whether this interpreter's SQLite has FTS5], once known


def fts5_available():
    """Whether this interpreter's SQLite can make FTS5 tables (asked once)."""
    if not _FTS5:
        db = sqlite3.connect(":memory:")
        try:
            db.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
            _FTS5.append(True)
        except sqlite3.Error:
            _FTS5.append(False)
        finally:
            db.close()
    return _FTS5[0]


def _index_version():
    """The user_version an index built here has: SCHEMA_VERSION, or with a flag when it
    was built without the search index (no FTS5), so that an interpreter whose SQLite
    differs rebuilds it instead of writing to a table it cannot maintain."""
    return SCHEMA_VERSION if fts5_available() else SCHEMA_VERSION | 0x10000


#: Fields an agent.update may carry (work context); latest value wins per field.
AGENT_FIELDS = ("intent", "task", "status", "branch", "files", "context", "tmux")


#: An agent counts as registered when its latest register beats its latest delete.
ACTIVE_AGENT_SQL = "reg_key IS NOT NULL AND (del_key IS NULL OR reg_key > del_key)"


def _key(ev):
    """Total order of events: timestamp then event id (both fixed width)."""
    return ev["timestamp"] + "|" + ev["event_id"]


#: A message's created_at (m: messages).
_CREATED = "coalesce(m.created_at, %s)" % _ts_sql("m.ts")

#: A receipt (?1 message id, ?2 reader, ?3 when) marks the delivery read.
_READ_SQL = ("UPDATE deliveries SET read_at = ?3 WHERE agent_id = ?2 AND (ts, rid) = "
             "(SELECT ts, rid FROM messages WHERE message_id = ?1) AND "
             "(read_at IS NULL OR read_at > ?3)")


def _key_window_end(ts):
    """When an idempotency key used at `ts` (event format) stops naming that message:
    24 h later, in the same fixed-width format (so text comparison orders it). An
    unreadable timestamp gives a window that never ends (deterministic all the same)."""
    try:
        return now_ts(parse_ts(ts) + KEY_WINDOW)
    except (ValueError, OverflowError, OSError):
        return "~"


def _json_or_none(v):
    return None if v is None else _dumps(v)


def _count_lines(f):
    """Complete lines in an open binary file."""
    f.seek(0)
    n = 0
    for block in iter(lambda: f.read(1 << 20), b""):
        n += block.count(b"\n")
    return n


def _file_ino(path):
    try:
        return os.stat(path).st_ino
    except OSError:
        return None



_SQLITE_DAMAGED = (11, 26)


def _sqlite_corrupt(err):
    code = getattr(err, "sqlite_errorcode", None)
    if code is None:  # no code: only the damaged-file messages count
        text = str(err).lower()
        return "malformed" in text or "not a database" in text
    return code & 0xff in _SQLITE_DAMAGED


def _sqlite_reason(err):
    """SQLite's message, with what the errno behind it says when that helps."""
    text = str(err)
    if getattr(err, "sqlite_errorcode", 0) & 0xff == 14:  # CANTOPEN: often EMFILE
        import errno
        try:
            os.close(os.dup(0))
        except OSError as e:
            if e.errno == errno.EMFILE:
                return text + " (too many open files)"
    return text


class _LogRewritten(Exception):
    """A log file no longer starts with the bytes the index read from it."""


class SearchIndexing:
    """Keeps the search index (`messages_fts`, when `fts`) in step with `messages`: a
    message's row there always holds the words of its current text. Mixed into
    Projection, whose `db` it writes, inside the projection's transaction."""

    fts = False  # this index has messages_fts (set when it is opened or built)

    @staticmethod
    def _fts_create(db):
        """Create the search index in a new database when this SQLite can."""
        if fts5_available():
            db.execute(_FTS_SCHEMA)
            return True
        return False

    def _fts_fill(self):
        """Index every message (a full build, after its messages are in): ASCII texts
        (as many characters as bytes) as they are, in SQL, the others through
        _fts_words()."""
        if not self.fts:
            return
        text = "coalesce(content, content0, '')"
        ascii_sql = "length(%s) = length(CAST(%s AS BLOB))" % (text, text)
        self.db.execute("INSERT INTO messages_fts(rowid, words) SELECT rowid, %s FROM "
                        "messages WHERE %s" % (text, ascii_sql))
        self.db.executemany("INSERT INTO messages_fts(rowid, words) VALUES (?,?)",
                            [(rid, _fts_words(t)) for rid, t in self.db.execute(
                                "SELECT rowid, %s FROM messages WHERE NOT (%s)"
                                % (text, ascii_sql)).fetchall()])

    def _fts_max(self):
        """The largest message rowid now (new messages get larger ones)."""
        return self.db.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]

    def _fts_add_since(self, rowid):
        """Index the messages inserted after `rowid` was the largest."""
        self.db.executemany(
            "INSERT INTO messages_fts(rowid, words) VALUES (?,?)",
            [(rid, _fts_words(text)) for rid, text in self.db.execute(
                "SELECT rowid, coalesce(content, content0) FROM messages WHERE rowid > ?",
                (rowid,))])

    def _fts_change(self, rowid, old, new):
        """A message's current text went from `old` to `new`."""
        if old == new:
            return
        self.db.execute("INSERT INTO messages_fts(messages_fts, rowid, words) VALUES "
                        "('delete', ?, ?)", (rowid, _fts_words(old)))
        self.db.execute("INSERT INTO messages_fts(rowid, words) VALUES (?,?)",
                        (rowid, _fts_words(new)))

    def _fts_remove(self, message_ids):
        """Take messages out of the search index. Call it BEFORE their rows leave
        `messages` (a purge): it needs their current text."""
        if not self.fts:
            return
        ids = list(message_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self.db.execute(
                "SELECT rowid, coalesce(content, content0) FROM messages WHERE message_id "
                "IN (%s)" % ",".join("?" * len(chunk)), chunk).fetchall()
            self.db.executemany("INSERT INTO messages_fts(messages_fts, rowid, words) "
                                "VALUES ('delete', ?, ?)",
                                [(rid, _fts_words(text)) for rid, text in rows])


class PurgeProjection(SearchIndexing):
    """The index's side of retention (SPEC §17), a base of Projection: the purges it has
    read (table `purges`), and what applying a new one forgets. Projection.apply skips
    dead events, so a purge read before or after its messages leaves the same rows."""

    def _purge_set(self, events):
        """(the PurgeSet of the index with the purges among `events` added, the ones
        new to the index: to apply)."""
        db, fresh = self.db, []
        for e in events:
            if e["type"] == PURGE_EVENT and _event_problem(e) is None and db.execute(
                    "INSERT OR IGNORE INTO purges VALUES (?,?,?,?,?)",
                    (e["event_id"], e["by"], e["before"], _dumps(e.get("keep") or []),
                     e["timestamp"])).rowcount:
                fresh.append(e)
        sig = tuple(db.execute("SELECT count(*), max(event_id) FROM purges").fetchone())
        if self._purges is None or self._purges[0] != sig:
            self._purges = (sig, PurgeSet(
                {"event_id": i, "before": b, "keep": json.loads(k)} for i, b, k in
                db.execute("SELECT event_id, before, keep FROM purges")))
        return self._purges[1], fresh

    def _apply_purges(self, purges, fresh):
        """Purges new to the index: forget the messages they purge and what hangs on
        them (deliveries, tags; for ULID ids also edits, deletes and receipts, waiting or
        not), then work out again the threads and idempotency keys (SPEC §16) they were
        part of: the rows a projection that never read the dead events has."""
        db = self.db
        bound, before = max(purge_bound(e["before"]) for e in fresh), max(
            e["before"] for e in fresh)
        gone = {m: 1 if _MSG_ULID(m) else 0 for m, c in db.execute(
            "SELECT m.message_id, %s FROM messages m WHERE m.message_id < ? OR m.ts < ?"
            % _CREATED, (bound, _ts_key(before))) if purges.is_purged(m, c)}
        for table in ("edits", "deletes", "receipts"):
            gone.update((m, 1) for (m,) in db.execute(
                "SELECT DISTINCT message_id FROM %s WHERE message_id < ?" % table, (bound,))
                if purges.is_purged(m))
        if not gone:
            return
        db.execute("CREATE TEMP TABLE IF NOT EXISTS purged(message_id TEXT PRIMARY KEY, "
                   "whole INTEGER)")
        db.execute("DELETE FROM purged")
        db.executemany("INSERT INTO purged VALUES (?,?)", gone.items())
        parents = {r[0] for r in db.execute(
            "SELECT reply_to FROM messages WHERE reply_to IS NOT NULL AND message_id IN "
            "(SELECT message_id FROM purged)")}
        keys = db.execute("SELECT DISTINCT agent_id, idem_key FROM messages WHERE idem_key "
                          "IS NOT NULL AND message_id IN (SELECT message_id FROM purged)"
                          ).fetchall()
        # (the search index forgets them too, before their rows go)
        self._fts_remove(gone)
        for table in ("deliveries", "tags"):
            db.execute("DELETE FROM %s WHERE rid IN (SELECT m.rid FROM purged p JOIN "
                       "messages m ON m.message_id = p.message_id)" % table)
        db.execute("DELETE FROM messages WHERE message_id IN (SELECT message_id FROM purged)")
        for table in ("edits", "deletes", "receipts"):
            db.execute("DELETE FROM %s WHERE message_id IN (SELECT message_id FROM purged "
                       "WHERE whole = 1)" % table)
        touched = set(parents)
        if keys:  # the messages sent with those keys: read state and duplicates again
            db.execute("UPDATE messages SET dup_of = NULL WHERE dup_of IN "
                       "(SELECT message_id FROM purged)")
            same = [r[0] for aid, key in keys for r in db.execute(
                "SELECT message_id FROM messages WHERE agent_id = ? AND idem_key = ?",
                (aid, key))]
            db.executemany(
                "UPDATE deliveries SET read_at = (SELECT r.read_at FROM receipts r WHERE "
                "r.message_id = ?1 AND r.agent_id = deliveries.agent_id) "
                "WHERE rid = (SELECT rid FROM messages WHERE message_id = ?1)",
                [(m,) for m in same])
            touched |= set(same) | self._apply_keys({tuple(k) for k in keys})
        self._refresh(touched)

    def _apply_keys(self, keys):
        """Duplicates by idempotency key (SPEC §16), for the (agent, key) pairs of new
        creates. Of one agent's messages with one key, in message-id order, the first is
        kept, and each later one created less than 24 h after the last kept one is a
        duplicate of it (`dup_of`): hidden everywhere (its deliveries count as deleted),
        while the kept one reads as read by anyone who read a copy and as arrived when
        its first copy arrived, so a listener hears of it once. A pure function of the
        group's rows, recomputed whole when the group gains a member: so two clones that
        both stored the key converge on the smallest id, and a rebuild agrees. Returns
        the messages to refresh (those that became or stopped being duplicates, and the
        parents of replies among them)."""
        db = self.db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS fresh_keys(agent_id TEXT, key TEXT, "
                   "PRIMARY KEY(agent_id, key))")
        db.execute("DELETE FROM fresh_keys")
        db.executemany("INSERT INTO fresh_keys VALUES (?,?)", keys)
        groups = {}
        for aid, key, mid, ts, dup, parent in db.execute(
                "SELECT m.agent_id, m.idem_key, m.message_id, %s, m.dup_of, m.reply_to "
                "FROM fresh_keys f JOIN messages m ON m.agent_id = f.agent_id AND "
                "m.idem_key = f.key ORDER BY 1, 2, 3" % _CREATED):
            groups.setdefault((aid, key), []).append((mid, ts, dup, parent))
        touched = set()
        for members in groups.values():
            if len(members) < 2:
                continue  # a key used once: nothing to hide
            kept = []  # [message id, [its duplicates], the end of its window]
            had = {old for _, _, old, _ in members if old}  # kept ones that had copies
            for mid, ts, old, parent in members:
                if kept and ts < kept[-1][2]:
                    new = kept[-1][0]
                    kept[-1][1].append(mid)
                else:
                    new = None
                    kept.append([mid, [], _key_window_end(ts)])
                if new != old:
                    db.execute("UPDATE messages SET dup_of = ? WHERE message_id = ?",
                               (new, mid))
                    touched.add(mid)  # (its deliveries are hidden or shown again)
                    if parent:
                        touched.add(parent)  # (its thread may come from another reply)
            # Read state: a kept message's from its own receipts and its copies', any
            # other's from its own. (A key reused daily keeps many messages without
            # copies, whose own read state the create's projection already set.)
            for mid, dups, _ in kept:
                todo = [(mid, [mid] + dups)] if dups or mid in had else []
                for one, copies in todo + [(d, [d]) for d in dups if d in had]:
                    marks = ",".join("?" * len(copies))
                    db.execute(
                        "UPDATE deliveries SET read_at = (SELECT min(r.read_at) FROM "
                        "receipts r WHERE r.agent_id = deliveries.agent_id AND "
                        "r.message_id IN (%s)) WHERE rid = (SELECT rid FROM messages "
                        "WHERE message_id = ?)" % marks, copies + [one])
                if dups:  # each recipient's first arrival of a copy, when earlier
                    marks = ",".join("?" * len(dups))
                    ts, rid, arrived = db.execute("SELECT ts, rid, arrived FROM messages "
                                                  "WHERE message_id = ?", (mid,)).fetchone()
                    db.executemany(
                        "UPDATE deliveries SET arrived = ?1 WHERE agent_id = ?2 AND ts = ?3 "
                        "AND rid = ?4 AND ?1 < coalesce(arrived, ?5)",
                        [(first, agent, ts, rid, arrived) for agent, first in db.execute(
                            "SELECT x.agent_id, min(coalesce(x.arrived, xm.arrived)) FROM "
                            "messages xm JOIN deliveries x ON x.rid = xm.rid WHERE "
                            "xm.message_id IN (%s) GROUP BY x.agent_id" % marks, dups)])
        return touched

    def forget_files(self, rels):
        """Forget what was read of log files that were removed (drop_dead_files), so a
        file of that name written later is read from its start, not taken for a rewrite
        (which would need a rebuild)."""
        if rels:
            self.open()
            self.db.executemany("DELETE FROM files WHERE path = ?", [(r,) for r in rels])


def _range_pieces(ranges, rel, start, data):
    """Projection._pieces in a build: `data` (read from `rel` at offset `start`) split
    where the recorded arrival ranges [(start, end, at)] begin and end."""
    out, pos = [], 0
    for a, b, at in ranges:
        lo, hi = max(a - start, pos), min(b - start, len(data))
        if hi <= lo:
            continue
        if lo > pos:
            out.append((data[pos:lo], (rel, start + pos, None, None)))
        out.append((data[lo:hi], (rel, start + lo, None, at)))
        pos = hi
    if pos < len(data):
        out.append((data[pos:], (rel, start + pos, None, None)))
    return out


class Projection(PurgeProjection):
    """The SQLite projection of the log at `path` (queries: Index, section 7)."""

    def __init__(self, path, log, arrivals=None, lock_wait=30.0):
        self.path = path
        self.log = log
        self.arrivals = arrivals  # LocalRecord of late arrivals (None: not recorded)
        self.lock_wait = lock_wait  # seconds to wait for another process's write lock
        self._known = None
        self._purges = None  # ((count, last id) of the purges table, its PurgeSet)
        self._local = threading.local()  # one SQLite connection per thread
        self.built = 0       # events read by the last full build
        self.building = False
        self.file_mtime = None  # while applying a file's lines: its mtime (arrivals)
        # ...and which lines: (file, start offset, bytes, arrival of the recorded range
        # they are in, in a build)
        self._block = None
        self._ranges = None  # in a build: {file: [(start, end, at)]} (ArrivalRecord)
        self.memory = False  # the store is read-only: the index lives in memory

    # -- opening, schema, rebuild --------------------------------------------
    @property
    def db(self):
        """This thread's connection (None until open)."""
        return getattr(self._local, "db", None)

    @db.setter
    def db(self, conn):
        self._local.db = conn
        self._local.ino = _file_ino(self.path) if conn is not None and not self.memory \
            else None

    def open(self):
        if self.db is not None:
            if self.memory or self._local.ino == _file_ino(self.path):
                return self
            # index.db was replaced (a rebuild by another process) or deleted: reopen,
            # which rebuilds a missing one.
            self.close()
        if self.memory:
            db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            db.executescript(_SCHEMA)
            self.fts = self._fts_create(db)
            self.db = db
            return self
        for attempt in (1, 2):
            try:
                self._connect()
                return self
            except (sqlite3.DatabaseError, PermissionError) as e:
                if self._unwritable(e):
                    return self._open_in_memory(e)
                if isinstance(e, PermissionError):
                    raise
                if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                    raise ThrumError("the index is locked by another process: %s" % e)
                if not _sqlite_corrupt(e):  # EMFILE, ENOSPC, EIO: this request fails
                    raise ThrumError("cannot open the index %s: %s" % (
                        self.path, _sqlite_reason(e)), hint="nothing was changed; if it "
                        "persists, check open files, disk space and 'thrum doctor'")
                if attempt == 2:
                    raise ThrumError("cannot open the index %s: %s" % (self.path, e),
                                     hint="run 'thrum doctor --fix'")
                _warn("index %s is unreadable (%s); rebuilding it from the log"
                      % (self.path, e))
                self._remove_files()
        return self  # pragma: no cover

    def _unwritable(self, err):
        """True when the index cannot be written here (a read-only store)."""
        text = str(err).lower()
        return (isinstance(err, PermissionError) or "readonly" in text or "read-only" in text
                or ("unable to open" in text and not os.access(os.path.dirname(self.path),
                                                               os.W_OK)))

    def _open_in_memory(self, err):
        """A read-only store still answers: project the log into memory instead."""
        _warn("the index %s cannot be written (%s); reading the log directly"
              % (self.path, err))
        self.close()
        self.memory = True
        return self.open()

    def _connect(self):
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        st = own_path(self.path, "file")
        if st is not None and st.st_mode & 0o077:  # private, like the rest of var/
            try:
                os.chmod(self.path, 0o600)
            except OSError:  # a read-only store still answers
                pass
        fresh = st is None
        db = sqlite3.connect(self.path, timeout=self.lock_wait, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=%d" % int(self.lock_wait * 1000))
            ver = db.execute("PRAGMA user_version").fetchone()[0]
            if ver != _index_version():
                if not fresh and ver != 0:
                    _warn("index schema %s is not %s; rebuilding it from the log"
                          % (ver, _index_version()))
                db.close()
                self._create()
                db = sqlite3.connect(self.path, timeout=self.lock_wait,
                                     isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA busy_timeout=%d" % int(self.lock_wait * 1000))
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
        self.fts = fts5_available()  # (the version says it has the search index)
        self.db = db

    def _create(self):
        """Build a new index from the whole log, under an exclusive lock.

        The new file is built beside the old one with journaling off and the
        secondary indexes added after the bulk insert, then renamed into place
        (so a crash mid-build leaves no half-built index) and switched to WAL.
        """
        with FileLock(self.path + ".lock"):
            if os.path.exists(self.path):
                try:
                    db = sqlite3.connect(self.path, timeout=self.lock_wait,
                                         isolation_level=None)
                    ok = db.execute("PRAGMA user_version").fetchone()[0] == \
                        _index_version()
                    db.close()
                    if ok:
                        return  # another process created it meanwhile
                except sqlite3.DatabaseError as e:
                    if not _sqlite_corrupt(e):  # only a damaged file is replaced
                        raise

                self._remove_files()
            tmp = self.path + ".new"
            for suffix in ("", "-wal", "-shm", "-journal"):
                if os.path.exists(tmp + suffix):
                    os.unlink(tmp + suffix)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o600))
            db = sqlite3.connect(tmp, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=OFF")
                db.execute("PRAGMA synchronous=OFF")
                db.execute("PRAGMA cache_size=-262144")  # 256 MiB while building
                db.executescript(_SCHEMA_TABLES)
                builder = type(self)(tmp, self.log, self.arrivals)
                builder.db = db
                builder.building = True
                self.built = builder.catch_up()
                builder.fts = self._fts_create(db)
                builder._fts_fill()
                db.executescript(_SCHEMA_INDEXES)
                db.execute("PRAGMA user_version=%d" % _index_version())
                db.execute("PRAGMA journal_mode=WAL")
            finally:
                db.close()
            os.replace(tmp, self.path)

    def _remove_files(self):
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    def rebuild(self):
        """Throw the index away and project the whole log again. Returns the events read."""
        self.close()
        if not self.memory:
            self._remove_files()
        self.open()
        return self.built + self.catch_up()

    # -- catching up with the log --------------------------------------------
    def catch_up(self):
        """Project whatever the log gained since the last call. Cheap when idle.

        Returns the number of events read. Files are read from their recorded
        offset; a file whose bytes before that offset changed (rewritten by a
        sync merge) is read again from the start, which is safe because every
        projection is idempotent.
        """
        self.open()
        files = self.log.files(quick=True)
        try:  # (what the files table says, read again only when the index changed)
            db, seen = self.db, getattr(self._local, "files_seen", None)
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if seen is not None and seen[0] is db and seen[1] == version:
                known = seen[2]
            else:
                known = {r[0]: r[1:] for r in db.execute(
                    "SELECT path, ino, size, mtime_ns FROM files")}
        except sqlite3.DatabaseError as e:
            if _sqlite_corrupt(e):
                return self._recover(e)
            raise ThrumError("the index cannot be read: %s" % _sqlite_reason(e),
                             hint="retry; if it persists, check disk space and run "
                                  "'thrum doctor --fix'")
        changed = [f for f in files
                   if known.get(f[0]) != (f[2].st_ino, f[2].st_size, f[2].st_mtime_ns)]
        if not changed:
            self._local.files_seen = (db, version, known)
            return 0
        self._local.files_seen = None
        try:
            return self._catch_up_locked(changed)
        except _LogRewritten as e:
            return self._rebuild_for("%s shrank or was replaced" % e.args[0])
        except sqlite3.DatabaseError as e:  # busy, disk full, I/O: not corruption
            if _sqlite_corrupt(e):
                return self._recover(e)
            if not self.memory and self._unwritable(e):
                self._open_in_memory(e)
                return self.catch_up()
            raise ThrumError("the index cannot be updated: %s" % _sqlite_reason(e),
                             hint="retry; if it persists, check disk space and run "
                                  "'thrum doctor --fix'")

    def _rebuild_for(self, reason):
        """The log lost lines the index holds: only a rebuild forgets them."""
        _warn("%s; rebuilding the index from the log" % reason)
        return self.rebuild()

    def _recover(self, err):
        if self.building:  # a fresh build that fails is not retried from within
            raise ThrumError("cannot build the index %s: %s" % (self.path, err))
        _warn("index %s is damaged (%s); rebuilding it from the log" % (self.path, err))
        self.close()
        self._remove_files()
        self.open()
        return self.built + self.catch_up()

    #: Bytes read and projected per step (bounds memory on big logs).
    CHUNK = 8 << 20

    def _catch_up_locked(self, changed):
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        total, pending = 0, []  # a build's lines of no recorded arrival, from many files
        try:
            for rel, path, _ in changed:
                row = db.execute("SELECT ino, size, mtime_ns, offset, tail, lines FROM "
                                 "files WHERE path = ?", (rel,)).fetchone()
                try:
                    f = open(path, "rb")
                except FileNotFoundError:
                    continue
                with f:
                    st = os.fstat(f.fileno())
                    if row and row[:3] == (st.st_ino, st.st_size, st.st_mtime_ns):
                        continue  # another process caught up meanwhile
                    offset = lines = 0
                    # Same file (inode), not shorter, same bytes before the offset:
                    # continue from there. Otherwise the file was replaced or
                    # rewritten: read it again (projection is idempotent), unless it
                    # now holds fewer lines, which only a rebuild can forget.
                    if row:
                        tail = row[4] or b""
                        same = row[0] == st.st_ino and row[3] <= st.st_size
                        if same:
                            f.seek(row[3] - len(tail))
                            same = f.read(len(tail)) == tail
                        if same:
                            offset, lines = row[3], row[5] or 0
                        elif _count_lines(f) < (row[5] or 0):
                            raise _LogRewritten(rel)
                    f.seek(offset)
                    left = st.st_size - offset
                    carry = b""
                    while left > 0:
                        block = f.read(min(self.CHUNK, left))
                        if not block:
                            break
                        left -= len(block)
                        data = carry + block
                        end = data.rfind(b"\n") + 1  # consume complete lines only
                        carry = data[end:]
                        lines += data.count(b"\n", 0, end)
                        self.file_mtime = st.st_mtime_ns / 1e9
                        try:
                            for piece, self._block in self._pieces(rel, offset, data[:end]):
                                evs, _ = parse_lines(piece, rel)
                                total += len(evs)
                                if self.building and self._block[3] is None:
                                    pending += evs  # projected together: each step costs
                                    evs = pending if len(pending) > 20000 else ()
                                self.apply(evs)  # more than its lines (segments are small)
                                if evs is pending:
                                    pending = []
                        finally:
                            self.file_mtime = self._block = None
                        offset += end
                    if carry and _is_torn(f):
                        _warn("%s: skipping an incomplete last line (%d bytes; it is cut "
                              "off at the next append)" % (rel, len(carry)))
                    f.seek(max(0, offset - 64))
                    tail = f.read(offset - max(0, offset - 64))
                db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?)",
                           (rel, st.st_ino, st.st_size, st.st_mtime_ns, offset, tail, lines))
            self.apply(pending)
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        return total

    # -- projection ----------------------------------------------------------
    def apply(self, events):
        """Project events (any order, duplicates allowed) inside the open transaction.

        Each event is checked (`_event_problem`) and skipped with a warning when
        malformed, the same way in every batch, so a rebuild gives the same index.
        """
        if not events:
            return
        db = self.db
        purges, fresh = self._purge_set(events)
        creates, edits, deletes, receipts = [], [], [], []
        seen = {}
        for ev in events:
            t = ev["type"]
            problem = _event_problem(ev)
            if problem:
                _warn("skipping malformed %s event %s: %s" % (t, ev.get("event_id"), problem))
                continue
            if purges and purges.is_dead(ev):
                continue  # purged (SPEC §17): as if it had never been written
            try:
                writer = _event_writer(ev)
                if writer:
                    k = ev["timestamp"]
                    if seen.get(writer, "") < k:
                        seen[writer] = k
                if t == "message.create":
                    creates.append(ev)
                elif t == "message.edit":
                    edits.append(ev)
                elif t == "message.delete":
                    deletes.append(ev)
                elif t == "message.receipt":
                    receipts.append(ev)
                elif t.startswith("agent."):
                    self._apply_agent(ev)
                elif t.startswith("group."):
                    self._apply_group(ev)
                # unknown types are ignored (a newer writer's events)
            except (KeyError, TypeError, AttributeError, sqlite3.InterfaceError,
                    sqlite3.ProgrammingError) as e:
                _warn("skipping malformed %s event %s (%s)" % (t, ev.get("event_id"), e))
        touched = set()
        if creates:
            touched |= self._apply_creates(creates)
        if edits:
            db.executemany(
                "INSERT OR IGNORE INTO edits VALUES (?,?,?,?,?,?,?)",
                [(e["event_id"], e["message_id"], e["agent_id"], e["timestamp"],
                  (e.get("body") or {}).get("format"), (e.get("body") or {}).get("content"),
                  _json_or_none((e.get("body") or {}).get("structured")))
                 for e in edits if isinstance(e.get("body"), dict)])
            touched.update(e["message_id"] for e in edits)
        if deletes:
            db.executemany("INSERT OR IGNORE INTO deletes VALUES (?,?,?,?,?)",
                           [(e["event_id"], e["message_id"], e["agent_id"],
                             e["timestamp"], e.get("reason")) for e in deletes])
            touched.update(e["message_id"] for e in deletes)
        if receipts:
            rows = [(e["message_id"], e["agent_id"], e["timestamp"]) for e in receipts]
            db.executemany(
                "INSERT INTO receipts VALUES (?,?,?) ON CONFLICT(message_id, agent_id) "
                "DO UPDATE SET read_at = min(read_at, excluded.read_at)", rows)
            db.executemany(_READ_SQL, rows)
            # ...and reading a duplicate (SPEC §16) reads the message it duplicates
            dups = dict(db.execute("SELECT message_id, dup_of FROM messages WHERE dup_of "
                                   "IS NOT NULL"))  # (rare: two clones raced on a key)
            if dups:
                db.executemany(_READ_SQL, [(dups[m], a, ts) for m, a, ts in rows
                                           if m in dups])
        if touched:
            self._refresh(touched)
        if fresh:
            self._apply_purges(purges, fresh)
        db.executemany(
            "INSERT INTO seen VALUES (?,?) ON CONFLICT(agent_id) "
            "DO UPDATE SET ts = max(ts, excluded.ts)", list(seen.items()))

    def _pieces(self, rel, start, data):
        """Split complete lines read from `rel` at offset `start` where the recorded
        arrival ranges begin and end (a build), as [(bytes, self._block)]."""
        if not self.building:
            return [(data, (rel, start, data, None))]
        self._arrivals_known()
        return _range_pieces(self._ranges.get(rel, ()), rel, start, data)

    def _apply_creates(self, creates):
        db = self.db
        msgs, keys, rows = [], set(), []
        add_msg = msgs.append
        # When each message reached this store (SPEC §7: "new" for a wait, a hook or a
        # nudge means arrived after the start point, whatever the sender's clock said).
        # The arrival is the kernel's modification time of the log file the line was
        # read from (appended by a send here, or by a sync's merge), not this process's
        # clock: a sender whose clock is wrong (faketime, a skewed machine) still
        # stamps its message with the true time. When an arrival is more than 2 s away
        # from the creation time (a sync pulled it in, or a clock is off), the block of
        # lines is remembered in var/arrivals.jsonl (ArrivalRecord), so a rebuild, which
        # takes the arrival from that record or else the creation time, never makes old
        # messages new again (or new ones old).
        blk = self._block
        if self.building:
            known, range_at = self._arrivals_known(), blk[3] if blk else None
            range_k = range_at and _ts_key(range_at)
        else:
            t = self.file_mtime if self.file_mtime is not None else time.time()
            now = now_ts(t)
            arrived = _ts_key(now)
            early, late_before, late = now_ts(t + 2.0), now_ts(t - 2.0), []
        for e in creates:
            g = e.get
            body = g("body")
            mid, author, ts = e["message_id"], e["agent_id"], e["timestamp"]
            created = _ts_exact(ts)
            if self.building:
                at = known.get(mid) if known else None
                if range_at is not None and (at is None or range_at < at):
                    arrived = range_k
                else:
                    arrived = _ts_key(at) if at else \
                        _ts_key(ts) if created is None else created
            elif ts < late_before or ts > early:
                late.append(mid)
            st = body.get("structured")
            fmt = body.get("format") or "markdown"
            recips, auds, scopes, refs = (g("recipients") or (), g("audiences") or (),
                                          g("scopes") or (), g("refs") or ())
            thread, key = g("thread_id"), g("idempotency_key")
            if key is not None:
                keys.add((author, key))
            # audiences that say "each recipient, by name" are not stored (NULL), nor
            # tagged: the deliveries answer for them
            named = len(auds) == len(recips)
            for a, r in zip(auds, recips) if named else ():
                if a.get("type") != "agent" or a.get("value") != r or len(a) != 2:
                    named = False
                    break
            add_msg((mid, author, g("session_id"),
                     _ts_key(ts) if created is None else created,
                     ts if created is None else None, arrived,
                     None if fmt == "markdown" else fmt, body["content"],
                     None if st is None else _dumps(st),
                     _dumps_names(recips) if recips else "[]",
                     None if named else _dumps_tags(auds) if auds else "[]",
                     _dumps_tags(scopes) if scopes else None,
                     _dumps_tags(refs) if refs else None,
                     g("reply_to"), thread, thread, key))
            rows.append((mid, recips, () if named else auds, scopes, refs))
        ses = {m[2] for m in msgs if m[2] is not None}
        if ses:
            db.executemany("INSERT OR IGNORE INTO names(name) VALUES (?)", [(x,) for x in ses])
            ses = {x: db.execute("SELECT nid FROM names WHERE name = ?", (x,)).fetchone()[0]
                   for x in ses}
            msgs = [m[:2] + (ses.get(m[2]),) + m[3:] for m in msgs]
        db.execute("CREATE TEMP TABLE IF NOT EXISTS fresh(message_id TEXT PRIMARY KEY)")
        db.execute("DELETE FROM fresh")
        db.executemany("INSERT OR IGNORE INTO fresh VALUES (?)",
                       [(e["message_id"],) for e in creates])
        record = not self.building and late and self.arrivals is not None
        if record:  # (only what is new here is recorded)
            had = {r[0] for r in db.execute("SELECT f.message_id FROM fresh f JOIN messages "
                                            "m ON m.message_id = f.message_id")}
        indexed = self._fts_max() if self.fts and not self.building else None
        db.executemany(
            "INSERT OR IGNORE INTO messages(message_id, agent_id, ses, ts, created_at, "
            "arrived, format0, content0, structured0, recipients, audiences, scopes, refs, "
            "reply_to, thread0, thread_id, idem_key) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", msgs)
        if indexed is not None:
            self._fts_add_since(indexed)
        rids = {mid: (ts, rid) for mid, ts, rid in db.execute(
            "SELECT f.message_id, m.ts, m.rid FROM fresh f JOIN messages m "
            "ON m.message_id = f.message_id")}
        dels, tags = [], []
        for mid, recips, auds, scopes, refs in rows:
            ts, rid = rids[mid]
            dels += [(r, ts, rid) for r in recips]
            for kind, items in (("aud", auds), ("scope", scopes), ("ref", refs)):
                tags += [(rid, kind, it["type"], it["value"]) for it in items]
        db.executemany("INSERT OR IGNORE INTO deliveries(agent_id, ts, rid) VALUES (?,?,?)",
                       dels)
        db.executemany("INSERT OR IGNORE INTO tags VALUES (?,?,?,?)", tags)
        if record:
            new = [m for m in late if m not in had]
            if new and not had and blk is not None:  # a block of new lines: one entry
                import zlib
                self.arrivals.add_range(blk[0], blk[1], blk[1] + len(blk[2]),
                                        zlib.crc32(blk[2]), now)
            elif new:
                self.arrivals.add(new, now)
        # Events that arrived before their message wait in the source tables:
        # pick them up now. Replies also give their parent a thread id.
        reads = db.execute(
            "SELECT r.read_at, r.agent_id, m.ts, m.rid FROM fresh f JOIN receipts r ON "
            "r.message_id = f.message_id JOIN messages m ON m.message_id = f.message_id"
        ).fetchall()
        if reads:
            db.executemany("UPDATE deliveries SET read_at = ? WHERE agent_id = ? AND ts = ? "
                           "AND rid = ?", reads)
        touched = {r[0] for r in db.execute(
            "SELECT message_id FROM fresh WHERE message_id IN (SELECT message_id FROM edits) "
            "OR message_id IN (SELECT message_id FROM deletes) "
            "OR message_id IN (SELECT reply_to FROM messages WHERE reply_to IS NOT NULL)")}
        touched.update(e["reply_to"] for e in creates if e.get("reply_to"))
        if keys:
            touched |= self._apply_keys(keys)
        return touched

    def _refresh(self, ids):
        """Recompute the derived columns of messages from the source tables."""
        db = self.db
        for mid in ids:
            row = db.execute("SELECT agent_id, format0, thread0, dup_of, rid, "
                             "coalesce(content, content0), content0 FROM messages "
                             "WHERE message_id = ?", (mid,)).fetchone()
            if row is None:
                continue  # its create has not arrived yet; it will refresh then
            author, fmt0, thread, dup, rid, text_was, content0 = row
            edits = db.execute(
                "SELECT ts, format, content, structured FROM edits WHERE message_id = ? "
                "AND agent_id = ? ORDER BY ts, event_id", (mid, author)).fetchall()
            updated_at = fmt = content = structured = None
            if edits:
                updated_at, fmt, content, structured = edits[-1]
                fmt = fmt or fmt0
            dele = db.execute("SELECT ts, reason FROM deletes WHERE message_id = ? AND "
                              "agent_id = ? ORDER BY ts, event_id LIMIT 1",
                              (mid, author)).fetchone()
            if thread is None:
                r = db.execute("SELECT thread0 FROM messages WHERE reply_to = ? AND thread0 "
                               "IS NOT NULL AND dup_of IS NULL ORDER BY ts, "
                               "message_id LIMIT 1", (mid,)).fetchone()
                thread = r[0] if r else None
            db.execute("UPDATE messages SET format = ?, content = ?, structured = ?, "
                       "updated_at = ?, version = ?, deleted = ?, deleted_at = ?, "
                       "delete_reason = ?, thread_id = ? WHERE message_id = ?",
                       (fmt, content, structured, updated_at, len(edits), 1 if dele else 0,
                        dele[0] if dele else None, dele[1] if dele else None, thread, mid))
            db.execute("UPDATE deliveries SET deleted = ? WHERE rid = ?",
                       (1 if dele or dup else 0, rid))
            if self.fts and not self.building:
                self._fts_change(rid, text_was, content0 if content is None else content)

    def _apply_agent(self, ev):
        db, t, aid, k = self.db, ev["type"], ev["agent_id"], _key(ev)
        if t == "agent.register":
            db.execute(
                "INSERT INTO agents(agent_id, role, module, display, worktree, hostname, "
                "origin, registered_at, reg_key, takeover) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(agent_id) DO UPDATE SET role = excluded.role, "
                "module = excluded.module, display = excluded.display, "
                "worktree = excluded.worktree, hostname = excluded.hostname, "
                "origin = excluded.origin, registered_at = excluded.registered_at, "
                "reg_key = excluded.reg_key, takeover = excluded.takeover "
                "WHERE agents.reg_key IS NULL OR excluded.reg_key > agents.reg_key",
                (aid, ev.get("role"), ev.get("module"), ev.get("display"),
                 ev.get("worktree"), ev.get("hostname"), ev.get("origin"),
                 ev["timestamp"], k, 1 if ev.get("takeover") is True else 0))
        elif t == "agent.delete":
            db.execute(
                "INSERT INTO agents(agent_id, del_key, deleted_by) VALUES (?,?,?) "
                "ON CONFLICT(agent_id) DO UPDATE SET del_key = excluded.del_key, "
                "deleted_by = excluded.deleted_by "
                "WHERE agents.del_key IS NULL OR excluded.del_key > agents.del_key",
                (aid, k, ev.get("by")))
        elif t == "agent.update":
            rows = [(aid, f, _dumps(ev[f]), k) for f in AGENT_FIELDS if f in ev]
            db.executemany(
                "INSERT INTO agent_fields VALUES (?,?,?,?) ON CONFLICT(agent_id, field) "
                "DO UPDATE SET value = excluded.value, key = excluded.key "
                "WHERE excluded.key > agent_fields.key", rows)
        elif t == "agent.session.start":
            db.execute(
                "INSERT INTO sessions(session_id, agent_id, started_at, pid) VALUES (?,?,?,?) "
                "ON CONFLICT(session_id) DO UPDATE SET agent_id = excluded.agent_id, "
                "started_at = excluded.started_at, pid = excluded.pid",
                (ev["session_id"], aid, ev["timestamp"], _valid_pid(ev.get("pid"))))
        elif t == "agent.session.end":
            db.execute(
                "INSERT INTO sessions(session_id, agent_id, ended_at, end_reason) "
                "VALUES (?,?,?,?) ON CONFLICT(session_id) DO UPDATE SET "
                "ended_at = excluded.ended_at, end_reason = excluded.end_reason "
                "WHERE sessions.ended_at IS NULL OR excluded.ended_at < sessions.ended_at",
                (ev["session_id"], aid, ev["timestamp"], ev.get("reason")))

    def _apply_group(self, ev):
        db, t, name, k = self.db, ev["type"], ev["group"], _key(ev)
        if t == "group.create":
            db.execute(
                "INSERT INTO groups(name, group_id, description, created_by, created_at, "
                "create_key) VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "group_id = excluded.group_id, description = excluded.description, "
                "created_by = excluded.created_by, created_at = excluded.created_at, "
                "create_key = excluded.create_key "
                "WHERE groups.create_key IS NULL OR excluded.create_key > groups.create_key",
                (name, ev.get("group_id"), ev.get("description"), ev.get("by"),
                 ev["timestamp"], k))
        elif t == "group.delete":
            db.execute(
                "INSERT INTO groups(name, delete_key) VALUES (?,?) ON CONFLICT(name) "
                "DO UPDATE SET delete_key = excluded.delete_key WHERE "
                "groups.delete_key IS NULL OR excluded.delete_key > groups.delete_key",
                (name, k))
        elif t == "group.member.add":
            db.execute(
                "INSERT INTO group_members(name, member_type, member, add_key, added_by, "
                "added_at) VALUES (?,?,?,?,?,?) ON CONFLICT(name, member_type, member) "
                "DO UPDATE SET add_key = excluded.add_key, added_by = excluded.added_by, "
                "added_at = excluded.added_at WHERE group_members.add_key IS NULL OR "
                "excluded.add_key > group_members.add_key",
                (name, ev["member_type"], ev["member"], k, ev.get("by"), ev["timestamp"]))
        elif t == "group.member.remove":
            db.execute(
                "INSERT INTO group_members(name, member_type, member, remove_key) "
                "VALUES (?,?,?,?) ON CONFLICT(name, member_type, member) DO UPDATE SET "
                "remove_key = excluded.remove_key WHERE group_members.remove_key IS NULL "
                "OR excluded.remove_key > group_members.remove_key",
                (name, ev["member_type"], ev["member"], k))

    def _arrivals_known(self):
        """{message id: arrival} of the record (and self._ranges, its block entries)."""
        if self._known is None:
            if self.arrivals is None:
                self._known, self._ranges = {}, {}
            elif isinstance(self.arrivals, ArrivalRecord):
                self._known, self._ranges = self.arrivals.known(
                    {rel: path for rel, path, _ in self.log.files()})
            else:
                self._known, self._ranges = self.arrivals.load(), {}
        return self._known


# === 7. Index: named queries ==================================================
#
# Every read of the index outside this section goes through a named query here, and
# rows come back with names (sqlite3.Row, or dicts for messages), so the meaning of a
# column stays next to the schema that gives it.

#: The columns of a message as readers see it: the latest edit over the original
#: (message_dict fills in what the index does not store: audiences, scopes, refs).
_MSG_COLS = (
    "m.message_id AS message_id, m.thread_id AS thread_id, m.reply_to AS reply_to, "
    "m.agent_id AS agent_id, m.recipients AS recipients, m.audiences AS audiences, "
    "coalesce(m.format, m.format0, 'markdown') AS format, "
    "coalesce(m.content, m.content0) AS content, "
    "CASE WHEN m.version > 0 THEN m.structured ELSE m.structured0 END AS structured, "
    "m.scopes AS scopes, m.refs AS refs, " + _CREATED + " AS created_at, "
    "m.updated_at AS updated_at, m.deleted AS deleted, m.version AS version, "
    "(SELECT name FROM names WHERE nid = m.ses) AS session_id")

#: A delivery joined with its message (the rows of inboxes and waits)...
_DELIVERED = "deliveries d JOIN messages m ON m.rid = d.rid"
#: ...those unread and not deleted, from their index (the planner would walk the primary
#: key: every delivery of the agent; the WHERE must say d.read_at IS NULL AND d.deleted = 0)
_UNREAD_D = "deliveries d INDEXED BY deliveries_unread"
_UNREAD = _UNREAD_D + " JOIN messages m ON m.rid = d.rid"
#: ...the other way round, for a few messages (by id, or arrived lately): each row of
#: messages m finds its deliveries d to `agent` by the primary key.
_TO_AGENT = "messages m CROSS JOIN deliveries d ON d.agent_id = ? AND d.ts = m.ts AND " \
            "d.rid = m.rid"
#: When a delivery reached this store (a duplicate's recipient may have had a copy first)
_ARRIVED = "coalesce(d.arrived, m.arrived)"
#: ...as text: an arrival at the creation time is the creation time's text
_ARRIVED_AT = "CASE WHEN %s = m.ts THEN %s ELSE %s END" % (_ARRIVED, _CREATED,
                                                          _ts_sql(_ARRIVED))

#: A group that exists (its latest create beats its latest delete)...
_ACTIVE_GROUP_SQL = "create_key IS NOT NULL AND (delete_key IS NULL OR create_key > delete_key)"
#: ...and a member that is in it (added after its latest removal and the group's delete).
_ACTIVE_MEMBER_SQL = ("gm.add_key IS NOT NULL AND (gm.remove_key IS NULL OR "
                      "gm.add_key > gm.remove_key) AND (g.delete_key IS NULL OR "
                      "gm.add_key > g.delete_key)")


def _named(recipients):
    """The audiences of a message sent to each recipient by name (not stored)."""
    return [{"type": "agent", "value": r} for r in recipients]


def message_dict(row, is_read):
    """A message row (_MSG_COLS) as the SPEC §6 message object."""
    st, aud, recipients = row["structured"], row["audiences"], json.loads(row["recipients"])
    return {"message_id": row["message_id"], "thread_id": row["thread_id"],
            "reply_to": row["reply_to"], "agent_id": row["agent_id"],
            "recipients": recipients,
            "audiences": json.loads(aud) if aud is not None else _named(recipients),
            "body": {"format": row["format"], "content": row["content"],
                     "structured": json.loads(st) if st else None},
            "scopes": json.loads(row["scopes"] or "[]"),
            "refs": json.loads(row["refs"] or "[]"),
            "created_at": row["created_at"], "updated_at": row["updated_at"],
            "deleted": bool(row["deleted"]), "version": row["version"],
            "session_id": row["session_id"], "is_read": bool(is_read)}


def _scope_filter(tag, where, params):
    """Add `only messages with this scope tag` to a query's WHERE parts."""
    if tag:
        where.append("EXISTS (SELECT 1 FROM tags t WHERE t.rid = m.rid "
                     "AND t.kind = 'scope' AND t.type = ? AND t.value = ?)")
        params += [tag["type"], tag["value"]]


#: Messages to an agent, or through a role or group of that name (`sent --to`, `search --to`).
_TO_SQL = ("(EXISTS (SELECT 1 FROM deliveries x WHERE x.rid = m.rid AND x.agent_id = ?) "
           "OR EXISTS (SELECT 1 FROM tags t WHERE t.rid = m.rid AND t.kind = 'aud' AND "
           "t.value = ?))")


class SearchQuery:
    """A `thrum search` query (SPEC §17): terms that must all match, in any order. A term
    is a word, a `"quoted phrase"` (its words next to each other, in order), or either
    with `*` at its end (its last word is a prefix). A word with punctuation inside
    (`auth-token`, `v1.2`) is the phrase of its words. Words as search_words() defines
    them, case-folded; AND/OR/NOT are plain words. `terms`: [(words, prefix)]."""

    MAX_TERMS = 32

    def __init__(self, text):
        self.text = text
        self.terms = []
        for m in _search_re("query").finditer(text):
            if m.group(3) is not None:
                raw, prefix = m.group(3), m.group(3).endswith("*")
            else:
                raw = m.group(1)
                prefix = m.group(2) == "*" or raw.rstrip().endswith("*")
            words = tuple(folded_words(raw))
            if words:
                self.terms.append((words, prefix))
        if not self.terms:
            raise UsageError("the search query %r has no words to look for" % text,
                             hint='search for words, a "phrase" or a prefix*')
        if len(self.terms) > self.MAX_TERMS:
            raise UsageError("the search query has more than %d terms" % self.MAX_TERMS)
        # every word of every term is in a matching ASCII text (lower-cased) as it is
        self.needles = {w for words, _ in self.terms for w in words}

    def fts(self):
        """The query as an FTS5 MATCH expression (quoted, so nothing is an operator)."""
        return " ".join('"%s"%s' % (" ".join(words), "*" if prefix else "")
                        for words, prefix in self.terms)

    def might_match(self, text):
        """False when `text` cannot match (a cheap test of ASCII texts)."""
        if not text.isascii():
            return True
        low = text.lower()
        return all(n in low for n in self.needles)

    @staticmethod
    def _at(words, i, term, prefix):
        last = len(term) - 1
        for k in range(last):
            if words[i + k] != term[k]:
                return False
        return words[i + last].startswith(term[last]) if prefix else \
            words[i + last] == term[last]

    def positions(self, words, term, prefix):
        """Where one term starts in `words` (folded)."""
        return [i for i in range(len(words) - len(term) + 1)
                if self._at(words, i, term, prefix)]

    def hits(self, words):
        """Per term, where it starts in `words`; None unless every term is there."""
        out = []
        for term, prefix in self.terms:
            found = self.positions(words, term, prefix)
            if not found:
                return None
            out.append(found)
        return out


def bm25(freqs, length, idfs, avgdl):
    """FTS5's bm25() for one row, computed the way SQLite computes it (k1 1.2, b 0.75,
    the same operations in the same order), so the scan ranks exactly as FTS5 does.
    `freqs`: the number of places each term matches, `length`: the row's words."""
    k1, b = 1.2, 0.75
    score = 0.0
    for f, idf in zip(freqs, idfs):
        score += idf * ((f * (k1 + 1.0)) / (f + k1 * (1 - b + b * length / avgdl)))
    return -1.0 * score


def bm25_idf(rows, hit):
    """FTS5's inverse document frequency of a term in `hit` of `rows` rows."""
    import math
    idf = math.log((rows - hit + 0.5) / (hit + 0.5))
    return 1e-6 if idf <= 0.0 else idf


#: A search counts its matches up to this many (`total`; `capped` when there are more).
#: Up to SEARCH_DIRECT_MAX index matches it looks each up; with more it walks the
#: messages newest first and stops early.
SEARCH_COUNT_MAX, SEARCH_DIRECT_MAX = 1000, 5000

#: Around the first match, the snippet of a search result: characters before it, and
#: at most this many characters in all; its matches are between these marks.
SNIPPET_BEFORE, SNIPPET_WIDTH, SNIPPET_MARKS = 30, 100, ("«", "»")


def search_snippet(text, query):
    """One line of `text` around the first place `query` matches, the matching words
    between SNIPPET_MARKS (« » in the text itself become ‹ ›), white space collapsed, an
    ellipsis where it was cut."""
    text, spans = search_words(text or "")
    words = [text[s:e].casefold() for s, e in spans]
    marked = set()
    for term, prefix in query.terms:
        for i in query.positions(words, term, prefix):
            marked.update(range(i, i + len(term)))
    if not spans:
        return ""
    first = min(marked) if marked else 0
    j = first
    while j > 0 and (spans[first][0] - spans[j - 1][0] <= SNIPPET_BEFORE or
                     len(text) - spans[j - 1][0] <= SNIPPET_WIDTH):  # (fill the width)
        j -= 1
    start = spans[j][0] if j else 0
    end = len(text)
    if end - start > SNIPPET_WIDTH:
        end = max([e for _, e in spans if e <= start + SNIPPET_WIDTH] + [spans[first][1]])

    def plain(piece):
        return re.sub(r"\s+", " ", piece).replace("«", "‹").replace("»", "›")
    out, pos, i = [], start, j
    while i < len(spans) and spans[i][1] <= end:
        if i in marked:
            k = i
            while k + 1 < len(spans) and k + 1 in marked and spans[k + 1][1] <= end:
                k += 1
            out += [plain(text[pos:spans[i][0]]), SNIPPET_MARKS[0],
                    plain(text[spans[i][0]:spans[k][1]]), SNIPPET_MARKS[1]]
            pos, i = spans[k][1], k + 1
        else:
            i += 1
    out.append(plain(text[pos:end]))
    line = "".join(out).strip()
    return ("…" if text[:start].strip() else "") + line + \
        ("…" if text[end:].strip() else "")


class Index(Projection):
    """The index: the projection (section 6) plus the named queries every reader uses."""

    def rows(self, sql, params=()):
        """All rows of a query, as sqlite3.Row (by name)."""
        cur = (self.db or self.open().db).cursor()
        cur.row_factory = sqlite3.Row
        try:
            return cur.execute(sql, params).fetchall()
        finally:
            cur.close()

    def row(self, sql, params=()):
        """The first row of a query (sqlite3.Row), or None."""
        found = self.rows(sql + " LIMIT 1", params)
        return found[0] if found else None

    def value(self, sql, params=()):
        """The single value of a one-column, one-row query (None without a row)."""
        r = (self.db or self.open().db).execute(sql, params).fetchone()
        return r[0] if r else None

    # -- agents ----------------------------------------------------------------------
    def agent(self, name):
        """A registered agent: agent_id, role, module, display, worktree, hostname,
        origin, registered_at, takeover; None when unknown or deleted."""
        return self.row("SELECT agent_id, role, module, display, worktree, hostname, origin, "
                        "registered_at, takeover FROM agents WHERE agent_id = ? AND "
                        + ACTIVE_AGENT_SQL, (name,))

    def agent_roles(self):
        """{agent: role} of every registered agent."""
        return {r["agent_id"]: r["role"] for r in self.rows(
            "SELECT agent_id, role FROM agents WHERE " + ACTIVE_AGENT_SQL)}

    def local_agents(self, host, origin):
        """Agents registered from this clone on this host: [Row(agent_id, worktree)]."""
        return self.rows("SELECT agent_id, worktree FROM agents WHERE %s AND hostname = ? "
                         "AND origin = ?" % ACTIVE_AGENT_SQL, (host, origin))

    def agent_fields(self, agent_id):
        """{field: value} of an agent's work context (agent.update, latest per field)."""
        return {r["field"]: json.loads(r["value"]) for r in self.rows(
            "SELECT field, value FROM agent_fields WHERE agent_id = ?", (agent_id,))}

    def agent_field(self, agent_id, field):
        """(value, set_at) of one work-context field, or None when never set."""
        r = self.row("SELECT value, key FROM agent_fields WHERE agent_id = ? AND field = ?",
                     (agent_id, field))
        return (json.loads(r["value"]), r["key"].split("|")[0]) if r else None

    def field_of_all(self, field):
        """{agent: value} of one field for every agent that has it."""
        return {r["agent_id"]: json.loads(r["value"]) for r in self.rows(
            "SELECT agent_id, value FROM agent_fields WHERE field = ?", (field,))}

    def team(self):
        """Every registered agent with what `team` shows, by name: agent_id, role, module,
        display, worktree, hostname, registered_at, last_seen_at, session_id,
        session_started_at, total, unread, fields ({field: value}), context_at (when its
        branch or files were last published)."""
        counts = {r["agent_id"]: r for r in self.rows(
            "SELECT agent_id, count(*) AS total, sum(read_at IS NULL) AS unread FROM "
            "deliveries WHERE deleted = 0 GROUP BY agent_id")}
        fields, context_at = {}, {}
        for r in self.rows("SELECT agent_id, field, value, key FROM agent_fields"):
            aid = r["agent_id"]
            fields.setdefault(aid, {})[r["field"]] = json.loads(r["value"])
            if r["field"] in ("branch", "files") and r["key"]:
                context_at[aid] = max(context_at.get(aid, ""), r["key"].split("|")[0])
        seen = {r["agent_id"]: r["ts"] for r in self.rows("SELECT agent_id, ts FROM seen")}
        sessions = {r["agent_id"]: r for r in self.rows(
            "SELECT agent_id, session_id, max(started_at) AS started_at FROM sessions WHERE "
            "ended_at IS NULL AND started_at IS NOT NULL GROUP BY agent_id")}
        out = []
        for a in self.rows("SELECT agent_id, role, module, display, worktree, hostname, "
                           "registered_at FROM agents WHERE " + ACTIVE_AGENT_SQL +
                           " ORDER BY agent_id"):
            aid = a["agent_id"]
            ses, n = sessions.get(aid), counts.get(aid)
            out.append(dict(a, last_seen_at=seen.get(aid) or a["registered_at"],
                            session_id=ses["session_id"] if ses else None,
                            session_started_at=ses["started_at"] if ses else None,
                            total=n["total"] if n else 0,
                            unread=(n["unread"] or 0) if n else 0,
                            fields=fields.get(aid, {}), context_at=context_at.get(aid)))
        return out

    # -- sessions --------------------------------------------------------------------
    def open_session(self, agent_id, session_id=None):
        """An agent's open session (the newest, or `session_id`): session_id,
        started_at, pid; None when there is none."""
        if session_id is not None:
            return self.row("SELECT session_id, started_at, pid FROM sessions WHERE "
                            "session_id = ? AND agent_id = ? AND ended_at IS NULL",
                            (session_id, agent_id))
        return self.row("SELECT session_id, started_at, pid FROM sessions WHERE "
                        "agent_id = ? AND ended_at IS NULL AND started_at IS NOT NULL "
                        "ORDER BY started_at DESC", (agent_id,))

    def open_session_ids(self, agent_id):
        """Every open session of an agent (a new one supersedes them all)."""
        return [r["session_id"] for r in self.rows(
            "SELECT session_id FROM sessions WHERE agent_id = ? AND ended_at IS NULL "
            "AND started_at IS NOT NULL", (agent_id,))]

    def sessions(self, agent_id, active=False):
        """An agent's sessions, newest first: session_id, agent_id, started_at, ended_at,
        end_reason."""
        return self.rows("SELECT session_id, agent_id, started_at, ended_at, end_reason FROM "
                         "sessions WHERE agent_id = ?" +
                         (" AND ended_at IS NULL" if active else "") +
                         " ORDER BY started_at DESC", (agent_id,))

    def sessions_with_pid(self, host, origin):
        """Open sessions with a recorded long-lived process, of agents registered from
        this clone on this host: session_id, agent_id, pid."""
        return self.rows("SELECT s.session_id, s.agent_id, s.pid FROM sessions s JOIN agents "
                         "a ON a.agent_id = s.agent_id WHERE s.ended_at IS NULL AND "
                         "s.started_at IS NOT NULL AND s.pid IS NOT NULL AND a.hostname = ? "
                         "AND a.origin = ?", (host, origin))

    # -- groups ----------------------------------------------------------------------
    def group_names(self):
        return {r["name"] for r in self.rows(
            "SELECT name FROM groups WHERE " + _ACTIVE_GROUP_SQL)}

    def group(self, name):
        """A group that exists: name, group_id, description, created_by, created_at."""
        return self.row("SELECT name, group_id, description, created_by, created_at FROM "
                        "groups WHERE name = ? AND " + _ACTIVE_GROUP_SQL, (name,))

    def groups(self):
        return self.rows("SELECT name, group_id, description, created_by, created_at FROM "
                         "groups WHERE " + _ACTIVE_GROUP_SQL + " ORDER BY name")

    def group_members(self, name):
        """A group's current members: member_type (agent|role), member, added_by,
        added_at."""
        return self.rows("SELECT gm.member_type, gm.member, gm.added_by, gm.added_at FROM "
                         "group_members gm JOIN groups g ON g.name = gm.name WHERE "
                         "gm.name = ? AND " + _ACTIVE_MEMBER_SQL +
                         " ORDER BY gm.member_type, gm.member", (name,))

    # -- messages --------------------------------------------------------------------
    def message_ids(self, prefix, limit):
        """Message ids starting with `prefix`, in order, at most `limit`."""
        return [r["message_id"] for r in self.rows(
            "SELECT message_id FROM messages WHERE message_id >= ? AND message_id < ? "
            "ORDER BY message_id LIMIT ?", (prefix, prefix + "~", limit))]

    def short_ids(self, msgs):
        """Give each message dict its `short_id`: the shortest prefix of its id that no
        other message in this store shares, and at least SHORT_ID ULID characters
        (the first 10 are the time, so two characters of the random part), as git
        abbreviates hashes. Any id argument accepts it (SPEC §14). Returns `msgs`."""
        for m in msgs:
            mid = m["message_id"]
            n = SHORT_ID
            for sql in ("SELECT max(message_id) FROM messages WHERE message_id < ?",
                        "SELECT min(message_id) FROM messages WHERE message_id > ?"):
                other = self.value(sql, (mid,))
                if other:
                    same = next((i for i, (a, b) in enumerate(zip(mid[4:], other[4:]))
                                 if a != b), 26)
                    n = max(n, same + 1)
            m["short_id"] = mid[:4 + n]
        return msgs

    def message(self, mid):
        """A message row (_MSG_COLS plus deleted_at, delete_reason, idempotency_key and
        duplicate_of: the message it duplicates, SPEC §16), or None."""
        return self.row("SELECT %s, m.deleted_at AS deleted_at, m.delete_reason AS "
                        "delete_reason, m.idem_key AS idempotency_key, m.dup_of AS "
                        "duplicate_of FROM messages m WHERE m.message_id = ?" % _MSG_COLS,
                        (mid,))

    def duplicate_of(self, mid):
        """The message that `mid` duplicates (same author and idempotency key), or None."""
        return self.value("SELECT dup_of FROM messages WHERE message_id = ?", (mid,))

    def duplicates(self, mid, agent_id, key):
        """The hidden duplicates of message `mid` (by `agent_id`, sent with `key`)."""
        return [r["message_id"] for r in self.rows(
            "SELECT message_id FROM messages WHERE dup_of = ? AND agent_id = ? AND "
            "idem_key = ? ORDER BY message_id", (mid, agent_id, key))]

    def sent_with_key(self, agent_id, key, since):
        """The message an agent sent with idempotency `key` that the key still names: the
        newest one that is not a duplicate, if created after `since`. message_id,
        thread_id, reply_to, created_at, recipients, audiences, and the body it was sent
        with (format0, content0, structured0), deleted; or None."""
        r = self.row("SELECT m.message_id AS message_id, m.thread_id AS thread_id, "
                     "m.reply_to AS reply_to, %s AS created_at, m.recipients AS recipients, "
                     "m.audiences AS audiences, coalesce(m.format0, 'markdown') AS format0, "
                     "m.content0 AS content0, m.structured0 AS structured0, "
                     "m.deleted AS deleted FROM messages m WHERE m.agent_id = ? AND "
                     "m.idem_key = ? AND m.dup_of IS NULL ORDER BY m.message_id DESC"
                     % _CREATED, (agent_id, key))
        if r is None or r["created_at"] <= since:
            return None
        r = dict(r)
        if r["audiences"] is None:
            r["audiences"] = _dumps(_named(json.loads(r["recipients"])))
        return r

    def thread_exists(self, thread_id):
        return self.value("SELECT 1 FROM messages WHERE thread_id = ?", (thread_id,)) \
            is not None

    def edits(self, mid, author):
        """The author's edits of a message, oldest first: edited_at, content."""
        return self.rows("SELECT ts AS edited_at, content FROM edits WHERE message_id = ? AND "
                         "agent_id = ? ORDER BY ts, event_id", (mid, author))

    def receipts(self, mid):
        """{recipient: read_at or None} of a message."""
        return {r["agent_id"]: r["read_at"] for r in self.rows(
            "SELECT d.agent_id, d.read_at FROM messages m CROSS JOIN deliveries d "
            "ON d.rid = m.rid WHERE m.message_id = ?", (mid,))}

    def delivery(self, mid, agent_id):
        """A message's delivery to one agent (read_at), or None when not addressed."""
        return self.row("SELECT d.read_at FROM %s WHERE m.message_id = ?" % _TO_AGENT,
                        (agent_id, mid))

    def unread_among(self, agent_id, mids):
        """The ids of `mids` addressed to the agent and still unread."""
        out = []
        for i in range(0, len(mids), 500):
            chunk = list(mids[i:i + 500])
            out += [r["message_id"] for r in self.rows(
                "SELECT m.message_id FROM %s WHERE d.read_at IS NULL AND m.message_id "
                "IN (%s)" % (_TO_AGENT, ",".join("?" * len(chunk))), [agent_id] + chunk)]
        return out

    def unread_ids(self, agent_id):
        return [r["message_id"] for r in self.rows(
            "SELECT m.message_id FROM %s WHERE d.agent_id = ? AND d.read_at IS NULL "
            "AND d.deleted = 0" % _UNREAD, (agent_id,))]

    def inbox_counts(self, agent_id, total=True):
        """{total, unread} of an agent's inbox (`total` False: unread only). Each is a
        count of index entries (no row is read): the agent's deliveries (the primary key's
        range) less the hidden ones (deliveries_hidden, nearly empty), and its range of
        deliveries_unread."""
        out = {}
        if total:
            out["total"] = self.value(
                "SELECT count(*) FROM deliveries WHERE agent_id = ?", (agent_id,)) - \
                self.value("SELECT count(*) FROM deliveries INDEXED BY deliveries_hidden "
                           "WHERE agent_id = ? AND deleted != 0", (agent_id,))
        out["unread"] = self.value("SELECT count(*) FROM %s WHERE d.agent_id = ? AND "
                                   "d.deleted = 0 AND d.read_at IS NULL" % _UNREAD_D,
                                   (agent_id,))
        return out

    def unread_messages(self, agent_id, newest_first=False, limit=-1):
        """An agent's unread messages as message dicts (prime, briefings)."""
        order = "DESC" if newest_first else "ASC"
        return self.short_ids([message_dict(r, False) for r in self.rows(
            "SELECT %s FROM %s WHERE d.agent_id = ? AND d.deleted = 0 AND d.read_at IS NULL "
            "ORDER BY d.ts %s, m.message_id %s LIMIT ?" % (_MSG_COLS, _UNREAD, order, order),
            (agent_id, limit))])

    def inbox(self, agent_id, role, unread=False, mentions=False, tags=(), sender=None,
              thread=None, all=False, limit=10, offset=0, oldest=False):
        """One page of an inbox (SPEC §6, §14). `tags`: [(kind, {type, value})] filters;
        `sender`: an author; `thread`: a thread id (or a root message id). Returns
        {total, unread, rows: [(message dict, addressed to me)]}, `unread` counted without
        the `unread` filter."""
        # Without filters on the message, the counts need no join with messages, and the
        # page query walks the primary key of deliveries (agent_id, ts, rid) in order.
        where, params = [], [agent_id]
        if all:
            frm = ("messages m LEFT JOIN deliveries d ON d.agent_id = ? AND d.ts = m.ts "
                   "AND d.rid = m.rid")
            count_frm, rid = frm, "m.rid"
            where.append("m.deleted = 0 AND m.dup_of IS NULL")
            order = "m.ts %s, m.message_id %s"
            unread_sql = "d.read_at IS NULL AND d.agent_id IS NOT NULL"
        else:
            frm = _DELIVERED
            count_frm, rid = "deliveries d", "d.rid"
            where += ["d.agent_id = ?", "d.deleted = 0"]
            order = "d.ts %s, m.message_id %s"
            unread_sql = "d.read_at IS NULL"  # a range of the index deliveries_unread
        if mentions:
            # by name: an audience tag, or (audiences not stored) as a recipient
            where.append("(EXISTS (SELECT 1 FROM tags t WHERE t.rid = %s AND t.kind = 'aud' "
                         "AND ((t.type = 'agent' AND t.value = ?) OR (t.type = 'role' AND "
                         "t.value = ?))) OR (m.audiences IS NULL AND d.agent_id IS NOT NULL))"
                         % rid)
            params += [agent_id, role]
            count_frm = frm
        for kind, tag in tags:
            where.append("EXISTS (SELECT 1 FROM tags t WHERE t.rid = %s"
                         " AND t.kind = ? AND t.type = ? AND t.value = ?)" % rid)
            params += [kind, tag["type"], tag["value"]]
        if sender:
            where.append("m.agent_id = ?")
            params.append(sender)
            count_frm = frm
        if thread:
            where.append("(m.thread_id = ? OR m.message_id = ?)")
            params += [thread, thread]
            count_frm = frm
        base_where = " AND ".join(where)
        if unread:
            where.append(unread_sql)
        wsql = " AND ".join(where)
        plain = count_frm == "deliveries d" and len(params) == 1  # no filter at all
        if not all:  # the unread ones from their index
            unread_frm = count_frm.replace("deliveries d", _UNREAD_D, 1)
            if unread:
                frm, count_frm = frm.replace("deliveries d", _UNREAD_D, 1), unread_frm
        if plain:
            counts = self.inbox_counts(agent_id, total=not unread)
            total, n_unread = counts["unread" if unread else "total"], counts["unread"]
        else:
            total = self.value("SELECT count(*) FROM %s WHERE %s" % (count_frm, wsql), params)
            n_unread = total if unread else self.value(  # (then it is the same count)
                "SELECT count(*) FROM %s WHERE %s AND %s" % (
                    count_frm if all else unread_frm, base_where, unread_sql), params)
        direction = "ASC" if oldest else "DESC"
        rows = self.rows(
            "SELECT %s, d.read_at IS NOT NULL OR d.agent_id IS NULL AS is_read, "
            "d.agent_id IS NOT NULL AS addressed FROM %s WHERE %s ORDER BY %s LIMIT ? "
            "OFFSET ?" % (_MSG_COLS, frm, wsql, order % (direction, direction)),
            params + [limit, offset])
        return {"total": total, "unread": n_unread,
                "rows": [(m, bool(r["addressed"])) for m, r in zip(self.short_ids(
                    [message_dict(r, r["is_read"]) for r in rows]), rows)]}

    def sent(self, agent_id, to=None, unread=False, limit=10, offset=0):
        """One page of what an agent sent, newest first: {total, messages} (dicts with
        is_read true). `to`: only messages to this agent, or by this role or group."""
        where, params = ["m.agent_id = ?", "m.deleted = 0", "m.dup_of IS NULL"], [agent_id]
        if to:
            where.append(_TO_SQL)
            params += [to, to]
        if unread:
            where.append("EXISTS (SELECT 1 FROM deliveries x WHERE x.rid = m.rid AND "
                         "x.read_at IS NULL)")
        wsql = " AND ".join(where)
        total = self.value("SELECT count(*) FROM messages m WHERE " + wsql, params)
        rows = self.rows("SELECT %s FROM messages m WHERE %s ORDER BY m.ts DESC, "
                         "m.message_id DESC LIMIT ? OFFSET ?" % (_MSG_COLS, wsql),
                         params + [limit, offset])
        return {"total": total,
                "messages": self.short_ids([message_dict(r, True) for r in rows])}

    def _arrived_since(self, agent_id, since, where, params):
        """FROM and WHERE of an agent's deliveries: those that arrived in this store after
        `since` (a timestamp: found by the index messages_arrived), else all unread ones
        (the index deliveries_unread)."""
        if since is None:
            return _UNREAD, ["d.agent_id = ?", "d.read_at IS NULL", "d.deleted = 0"] + where, \
                [agent_id] + params
        k = _ts_key(since)
        return _TO_AGENT.replace("messages m", "messages m INDEXED BY messages_arrived", 1), \
            ["m.arrived > ?", _ARRIVED + " > ?"] + where, [agent_id, k, k] + params

    def search(self, agent_id, query, sender=None, to=None, ref=None, since=None, limit=20,
               rank=False, fts=True, everyone=False):
        """Messages the agent can see (to it, by it, through its roles and groups,
        broadcasts; not deleted, not duplicates) whose current text matches `query` (a
        SearchQuery): newest first, or by bm25 (`rank`, ties newest first). Filters:
        `sender` an author, `to` an agent/role/group (_TO_SQL), `ref` a {type, value}
        tag, `since` a timestamp. With `fts` and a search index, FTS5 finds them, else a
        scan; both give the same answer. Returns {total, capped, messages: [message dict
        + snippet]}: `total` counts the matches up to SEARCH_COUNT_MAX, `capped` says
        there are more."""
        frm = "messages m LEFT JOIN deliveries d ON d.rid = m.rid AND d.agent_id = ?"
        where = ["m.deleted = 0", "m.dup_of IS NULL"] + (
            [] if everyone else ["(d.agent_id IS NOT NULL OR m.agent_id = ?)"])
        params = [] if everyone else [agent_id]
        if sender:
            where.append("m.agent_id = ?")
            params.append(sender)
        if to:
            where.append(_TO_SQL)
            params += [to, to]
        if ref:
            where.append("EXISTS (SELECT 1 FROM tags t WHERE t.rid = m.rid "
                         "AND t.kind = 'ref' AND t.type = ? AND t.value = ?)")
            params += [ref["type"], ref["value"]]
        if since:
            where.append("m.ts >= ?")
            params.append(_ts_key(since))
        newest, wsql, most = "m.ts DESC, m.message_id DESC", " AND ".join(where), \
            SEARCH_COUNT_MAX + 1
        db = self.db or self.open().db
        if fts and self.fts:
            match = "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?"
            if rank:
                found = [r[0] for r in db.execute(
                    "SELECT m.rowid FROM (SELECT rowid AS rid, bm25(messages_fts) AS score "
                    "FROM messages_fts WHERE messages_fts MATCH ?) f JOIN messages m ON "
                    "m.rowid = f.rid LEFT JOIN deliveries d ON d.rid = m.rid "
                    "AND d.agent_id = ? WHERE %s ORDER BY f.score, %s LIMIT ?"
                    % (wsql, newest), [query.fts(), agent_id] + params + [most])]
            else:
                # Few matches: look each up by rowid and sort them. Many, and a good
                # share of all messages: walk the messages newest first and ask the
                # index about a batch at a time (_search_walk). Otherwise, or when that
                # does not pay: walk them newest first against all the matches (the `+`
                # keeps SQLite from driving the query by the matches' rowids).
                dense = self.value("SELECT coalesce(max(rowid), 0) FROM messages") // 8
                n = self.value("SELECT count(*) FROM (%s LIMIT ?)" % match,
                               (query.fts(), max(SEARCH_DIRECT_MAX, dense) + 1))
                found = self._search_walk(db, query, "SELECT m.rowid FROM %s WHERE %s "
                                          "ORDER BY %s" % (frm, wsql, newest),
                                          [agent_id] + params, most) \
                    if n > max(SEARCH_DIRECT_MAX, dense) else None
                if found is None:
                    found = [r[0] for r in db.execute(
                        "SELECT m.rowid FROM %s WHERE %sm.rowid IN (%s) AND %s ORDER BY %s "
                        "LIMIT ?" % (frm, "" if n <= SEARCH_DIRECT_MAX else "+", match, wsql,
                                     newest), [agent_id, query.fts()] + params + [most])]
        else:
            found = self._search_scan(query, frm, wsql, [agent_id] + params, newest, rank)
        page = found[:limit]
        rows = {r["rid"]: r for r in self.rows(
            "SELECT %s, m.rowid AS rid, d.read_at IS NOT NULL OR d.agent_id IS NULL AS "
            "is_read FROM %s WHERE m.rowid IN (%s)" % (_MSG_COLS, frm, ",".join("?" * len(
                page))), [agent_id] + page)} if page else {}
        msgs = []
        for rid in page:
            m = message_dict(rows[rid], rows[rid]["is_read"])
            m["snippet"] = search_snippet(m["body"]["content"], query)
            msgs.append(m)
        return {"total": min(len(found), SEARCH_COUNT_MAX),
                "capped": len(found) > SEARCH_COUNT_MAX, "messages": self.short_ids(msgs)}

    #: _search_walk: at most this many rows walked (in batches of `most`, then twice as
    #: many each time), at most this many ranges of rowids per batch (a gap of more than
    #: WALK_GAP starts a new one).
    WALK_ROWS, WALK_RANGES, WALK_GAP = 32768, 32, 256

    def _search_walk(self, db, query, sql, args, most):
        """The first `most` messages of `sql` (the visible ones, newest first) that match
        `query`, asking the FTS5 index a batch at a time, by ranges of rowids (a batch of
        recent messages mostly holds a few runs of rowids); None when the rowids are too
        scattered, or the matches too sparse, for that to pay."""
        cur = db.execute(sql, args)
        out, size, walked = [], most, 0
        try:
            while len(out) < most:
                if walked >= self.WALK_ROWS:
                    return None
                batch = [r[0] for r in cur.fetchmany(size)]
                if not batch:
                    break
                walked, size = walked + len(batch), size * 2
                ranges, ordered = [], sorted(batch)
                lo = prev = ordered[0]
                for rid in ordered[1:]:
                    if rid - prev > self.WALK_GAP:
                        ranges.append((lo, prev))
                        lo = rid
                    prev = rid
                ranges.append((lo, prev))
                # (FTS5 merges a prefix's postings anew for every query: one range only)
                if len(ranges) > (1 if any(p for _, p in query.terms) else self.WALK_RANGES):
                    return None
                hit = set()
                for lo, hi in ranges:
                    hit.update(r[0] for r in db.execute(
                        "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? AND "
                        "rowid BETWEEN ? AND ?", (query.fts(), lo, hi)))
                out += [rid for rid in batch if rid in hit]
        finally:
            cur.close()
        return out[:most]

    def _search_scan(self, query, frm, wsql, args, order, rank):
        """search() without FTS5: the rowids of the matches in order (newest first, or
        by bm25), SEARCH_COUNT_MAX + 1 at most."""
        matched = []  # (rowid, per-term hits, number of words), newest first
        for rid, text in self.db.execute("SELECT m.rowid, coalesce(m.content, m.content0) "
                                         "FROM %s WHERE %s ORDER BY %s" % (frm, wsql, order),
                                         args):
            text = text or ""
            if not query.might_match(text):
                continue
            words = folded_words(text)
            hits = query.hits(words)
            if hits is not None:
                matched.append((rid, hits, len(words)))
                if not rank and len(matched) > SEARCH_COUNT_MAX:
                    break
        if rank and matched:
            # bm25 over the whole index, as FTS5 has it: every message, its words
            rows = tokens = 0
            per_term = [0] * len(query.terms)
            for (text,) in self.db.execute("SELECT coalesce(content, content0) FROM "
                                           "messages"):
                words = folded_words(text or "")
                rows += 1
                tokens += len(words)
                if query.might_match(text or ""):
                    for n, (term, prefix) in enumerate(query.terms):
                        if query.positions(words, term, prefix):
                            per_term[n] += 1
            idfs = [bm25_idf(rows, n) for n in per_term]
            avgdl = float(tokens) / float(rows)
            matched.sort(key=lambda x: bm25([float(len(h)) for h in x[1]], x[2], idfs,
                                            avgdl))  # (stable: ties stay newest first)
        return [x[0] for x in matched[:SEARCH_COUNT_MAX + 1]]

    def waiting_for(self, agent_id, since=None, unread=False, skip_read=False, scope=None):
        """Messages to the agent, not by it, not deleted, oldest first, as message dicts:
        all unread ones (`since` None), or those that arrived in this store after `since`
        (a timestamp), only unread ones with `unread` or `skip_read`; `scope`: a {type,
        value} tag they must carry. In the order they arrived here."""
        where, params = ["d.deleted = 0", "m.agent_id != ?"], [agent_id]
        if skip_read or unread:
            where.append("d.read_at IS NULL")
        _scope_filter(scope, where, params)
        frm, where, params = self._arrived_since(agent_id, since, where, params)
        return self.short_ids([message_dict(r, r["is_read"]) for r in self.rows(
            "SELECT %s, d.read_at IS NOT NULL AS is_read FROM %s WHERE %s ORDER BY "
            "%s, m.ts, m.message_id" % (_MSG_COLS, frm, " AND ".join(where), _ARRIVED),
            params)])

    def unread_arrived(self, agent_id, since=None):
        """An agent's unread messages (not its own) that arrived in this store after
        `since` (all without it), oldest first: message_id, author, arrived_at."""
        frm, where, params = self._arrived_since(
            agent_id, since, ["d.read_at IS NULL", "d.deleted = 0", "m.agent_id != ?"],
            [agent_id])
        return self.rows("SELECT m.message_id, m.agent_id AS author, %s AS arrived_at FROM "
                         "%s WHERE %s ORDER BY m.ts, m.message_id"
                         % (_ARRIVED_AT, frm, " AND ".join(where)), params)

    def unread_deliveries(self, agent_id, mids):
        """Of `mids`, those still unread by the agent and not deleted, oldest first:
        message_id, author."""
        return self.rows("SELECT m.message_id, m.agent_id AS author FROM %s WHERE "
                         "d.read_at IS NULL AND d.deleted = 0 AND m.message_id IN (%s) "
                         "ORDER BY m.ts, m.message_id"
                         % (_TO_AGENT, ",".join("?" * len(mids))), [agent_id] + list(mids))

    def arrivals_since(self, since):
        """Unread deliveries that arrived in this store after `since`: agent_id,
        message_id, author, arrived_at."""
        k = _ts_key(since)
        return self.rows("SELECT d.agent_id, m.message_id, m.agent_id AS author, %s AS "
                         "arrived_at FROM messages m CROSS JOIN deliveries d ON d.rid = "
                         "m.rid WHERE m.arrived > ? AND %s > ? AND d.read_at IS NULL AND "
                         "d.deleted = 0" % (_ARRIVED_AT, _ARRIVED), (k, k))

    def arrived_messages(self, agent_id, since, limit=200):
        """Every message of the store (not deleted, not a hidden duplicate) that arrived
        here after `since`, whoever it is to, in the order it arrived, as message dicts:
        `is_read` for `agent_id` (true when not addressed to it), plus `arrived_at`. At
        most `limit`, the earliest arrivals first (a range of messages_arrived)."""
        rows = self.rows(
            "SELECT %s, CASE WHEN m.arrived = m.ts THEN %s ELSE %s END AS arrived_at, "
            "coalesce((SELECT d.read_at IS NOT NULL FROM deliveries d WHERE d.rid = m.rid "
            "AND d.agent_id = ?), 1) AS is_read FROM messages m WHERE m.arrived > ? AND "
            "m.deleted = 0 AND m.dup_of IS NULL ORDER BY m.arrived, m.ts, m.message_id "
            "LIMIT ?" % (_MSG_COLS, _CREATED, _ts_sql("m.arrived")),
            (agent_id, _ts_key(since) if since else _TS_LOW - 1, limit))
        msgs = self.short_ids([message_dict(r, r["is_read"]) for r in rows])
        for m, r in zip(msgs, rows):
            m["arrived_at"] = r["arrived_at"]
        return msgs

    # -- retention (SPEC §17) ----------------------------------------------------------
    def purge_plan(self, before):
        """What a purge at `before` takes, as this index knows the log: {keep: the old
        messages of threads that have a newer one (threads kept whole), messages:
        {author: n}, receipts: {reader: n}, threads_kept: n}."""
        bound = purge_bound(before)
        by_time = PurgeSet([{"event_id": "", "before": before}])
        old = {r[0]: (r[1], r[2]) for r in self.rows(
            "SELECT m.message_id, m.agent_id, m.thread_id, %s FROM messages m WHERE "
            "m.message_id < ? OR m.ts < ?" % _CREATED, (bound, _ts_key(before)))
            if by_time.is_purged(r[0], r[3])}
        threads = {t for _, t in old.values() if t}
        alive = {r[0] for r in self.rows(
            "SELECT m.thread_id, m.message_id, %s FROM messages m WHERE m.thread_id IS NOT "
            "NULL AND (m.message_id >= ? OR m.ts >= ?)" % _CREATED, (bound, _ts_key(before)))
            if r[0] in threads and not by_time.is_purged(r[1], r[2])}
        keep = sorted(m for m, (_, t) in old.items() if t in alive)
        plan = PurgeSet([{"event_id": "", "before": before, "keep": keep}])
        msgs, receipts = {}, {}
        for m, (author, t) in old.items():
            if t not in alive:
                msgs[author] = msgs.get(author, 0) + 1
        for r in self.rows("SELECT message_id, agent_id FROM receipts WHERE message_id < ?",
                           (bound,)):
            if plan.is_purged(r[0]):
                receipts[r[1]] = receipts.get(r[1], 0) + 1
        return {"keep": keep, "messages": msgs, "receipts": receipts,
                "threads_kept": len(alive)}

    # -- checks ------------------------------------------------------------------------
    def quick_check(self):
        """SQLite's quick_check of the index file: 'ok' or the problem."""
        return self.value("PRAGMA quick_check")

    def differs_from_log(self):
        """Compare this index with a projection of the whole log in memory: None when they
        agree, else which table differs."""
        mem = Index(":memory:", self.log)
        mem.db = sqlite3.connect(":memory:", isolation_level=None)
        try:
            mem.db.executescript(_SCHEMA)
            mem.db.execute("BEGIN")
            evs = []
            for rel, path, _ in self.log.files():
                with open(path, "rb") as f:
                    data = f.read()
                evs += parse_lines(data[:data.rfind(b"\n") + 1], rel, warn=False)[0]
            mem.apply(evs)
            mem.db.execute("COMMIT")
            for table, frm, cols in (
                    ("messages", "messages", "message_id, content0, content, deleted, "
                                             "thread_id, version, dup_of"),
                    ("deliveries", "deliveries d JOIN messages m ON m.rid = d.rid",
                     "d.agent_id, m.message_id, d.read_at, d.deleted"),
                    ("agents", "agents", "agent_id, role, reg_key, del_key")):
                sql = "SELECT %s FROM %s ORDER BY 1, 2" % (cols, frm)
                a, b = self.db.execute(sql).fetchall(), mem.db.execute(sql).fetchall()
                if a != b:
                    return "%s differ from the log (%d rows vs %d)" % (table, len(a), len(b))
            return None
        finally:
            mem.db.close()

# === 8. Processes and threads: git, work contexts, tmux =======================
#
# Every git call goes through git(): an argv list (never a shell), a bound on its time,
# its own process group, and a THRUM_DEBUG trace.

class ChildProcesses:
    """The git and tmux processes this process is running (each in a process group of its
    own), so a daemon that stops ends them instead of leaving them behind (SPEC §9). By
    nature there is one per process: `CHILDREN`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs = set()

    def add(self, proc):
        with self._lock:
            self._procs.add(proc)

    def discard(self, proc):
        with self._lock:
            self._procs.discard(proc)

    def kill_all(self):
        """Kill every running child's process group. Returns how many there were."""
        import signal
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        return len(procs)


#: This process's running git and tmux children.
CHILDREN = ChildProcesses()


def git(args, cwd, env, check=True, input=None, timeout=60, env_extra=None, text=True):
    """Run git with an argv list (never a shell) in `cwd`, with the environment `env`
    (the process environment the caller was given). Returns CompletedProcess (text,
    or bytes with text=False).

    Thrum's own commits use thrum's identity; hooks are disabled; nothing can prompt
    (GIT_TERMINAL_PROMPT=0, no controlling terminal); every call is time-bounded.
    With THRUM_DEBUG=1 in `env`, each call is logged to stderr (argv, exit, time).
    """
    import subprocess
    genv = dict(env)
    genv.update({"GIT_TERMINAL_PROMPT": "0", "GIT_AUTHOR_NAME": "thrum",
                 "GIT_AUTHOR_EMAIL": "thrum@localhost", "GIT_COMMITTER_NAME": "thrum",
                 "GIT_COMMITTER_EMAIL": "thrum@localhost", "LC_ALL": "C"})
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR"):
        genv.pop(k, None)
    if env_extra:
        genv.update(env_extra)
    argv = ["git", "-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false"] + list(args)
    if text and isinstance(input, str):
        input = input.encode("utf-8", "surrogateescape")
    t0 = time.monotonic()
    try:
        # Its own process group (and no controlling terminal, so nothing can prompt):
        # on a timeout the whole group is killed, including helpers such as ssh or
        # git-remote-http that would otherwise keep the pipes open.
        proc = subprocess.Popen(argv, cwd=cwd, env=genv, start_new_session=True,
                                stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        _trace(env, argv[5:], "not found", t0)
        raise GitMissingError("git is not installed or not on PATH",
                              hint="install git, or run thrum outside a repository")
    CHILDREN.add(proc)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException as e:  # timeout, Ctrl-C: never leave git running
        _kill_group(proc)
        _trace(env, argv[5:], "killed", t0)
        if isinstance(e, subprocess.TimeoutExpired):
            raise GitError(list(args), "timeout", "timed out after %s" % format_duration(
                timeout)) from None
        raise
    finally:
        CHILDREN.discard(proc)
    _trace(env, argv[5:], proc.returncode, t0)
    if text:
        out = out.decode("utf-8", "surrogateescape")
        err = err.decode("utf-8", "surrogateescape")
    p = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise GitError(list(args), p.returncode, err if text else err.decode("utf-8",
                                                                              "replace"))
    return p


def debug_enabled(env):
    """THRUM_DEBUG=1 (or --debug, which sets it) logs every git and tmux call."""
    return env.get("THRUM_DEBUG", "") not in ("", "0", "false", "no", "off")


def _trace(env, argv, result, t0, tool="git"):
    if debug_enabled(env):
        try:
            sys.stderr.write("thrum: debug: %s %s -> %s (%.1f ms)\n" % (
                tool, " ".join(argv), result, (time.monotonic() - t0) * 1000))
        except (OSError, ValueError, AttributeError):  # pragma: no cover - closed stderr
            pass


def _kill_group(proc):
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.communicate(timeout=5)
    except Exception:  # pragma: no cover - a member escaped the group
        pass


# What git keeps in files thrum may read without a process (a ref), and objects it can
# hash itself (a tree): a sync cycle with nothing to do must stay cheap (SPEC §8).

_HEX_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?\Z").match


def _read_ref(common, ref):
    """The sha `ref` holds in git's files: the loose ref, else packed-refs (written
    before a loose ref goes). None: no such ref; False: ask git (reftable, symref)."""
    if os.path.exists(os.path.join(common, "reftable")):
        return False
    try:
        with open(os.path.join(common, ref), "rb") as f:
            text = f.read(200).decode("ascii", "replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        text = None
    except OSError:
        return False
    if text is not None:
        return text if _HEX_SHA(text) else False
    try:
        with open(os.path.join(common, "packed-refs"), "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        return False
    tail = " " + ref
    for line in data.splitlines():
        if line.endswith(tail) and not line.startswith(("#", "^")):
            sha = line[:-len(tail)]
            return sha if _HEX_SHA(sha) else False
    return None


def _tree_objects(files, algo):
    """Tree objects for {path: blob sha}: (root sha, [`mktree` listing], subtrees
    first), hashed here as git does (a tree sorts as if its name ended in `/`)."""
    import hashlib
    root = {}
    for path, sha in files.items():
        parts = path.split("/")
        d = root
        for part in parts[:-1]:
            d = d.setdefault(part, {})
        d[parts[-1]] = sha
    listings = []

    def build(d):
        items = []
        for name, v in d.items():
            if isinstance(v, dict):
                items.append((name + "/", b"40000", "040000 tree", name, build(v)))
            else:
                items.append((name, b"100644", "100644 blob", name, v))
        items.sort(key=lambda x: x[0].encode("utf-8", "surrogateescape"))
        body = b"".join(mode + b" " + name.encode("utf-8", "surrogateescape") + b"\0" +
                        bytes.fromhex(sha) for _, mode, _, name, sha in items)
        h = hashlib.new(algo)
        h.update(b"tree %d\0" % len(body))
        h.update(body)
        listings.append("".join("%s %s\t%s\n" % (kind, sha, name)
                                for _, _, kind, name, sha in items))
        return h.hexdigest()
    return build(root), listings


_STATUS_NAMES = {"M": "modified", "A": "added", "D": "deleted", "R": "renamed",
                 "C": "copied", "?": "untracked", "U": "conflicted", "T": "modified"}


def work_context(worktree, env, cache=None):
    """Branch and changed files of a worktree, asking git (read-only, no locks).

    files: [{path, status}] with status modified|added|deleted|renamed|untracked
    (uncommitted) or committed (changed on the branch since its base, the first of
    origin/HEAD, origin/main, origin/master, main, master). One `git status` gives the
    branch, HEAD and uncommitted files; the committed files are asked for only when
    HEAD or the base moved, if `cache` (a dict the caller keeps) remembers them.
    """
    if not os.path.isdir(worktree) or not git_dirs(worktree):
        return {"branch": None, "files": []}
    ro = ["--no-optional-locks"]
    try:
        st = git(ro + ["status", "--porcelain=v2", "--branch", "-z",
                       "--untracked-files=all"], worktree, env, check=False, timeout=20)
    except GitMissingError:
        raise  # a question we cannot answer is an error, not "no files"
    except ThrumError:
        return {"branch": None, "files": []}
    files, seen, branch, head = [], set(), None, None
    entries = st.stdout.split("\0") if st.returncode == 0 else []
    i = 0
    while i < len(entries):
        e = entries[i]
        i += 1
        kind = e[:2]
        if e.startswith("# branch.head "):
            branch = e[14:] if e[14:] != "(detached)" else None
            continue
        if e.startswith("# branch.oid "):
            head = e[13:] if e[13:] != "(initial)" else None
            continue
        if kind == "? ":
            letter, path = "?", e[2:]
        elif kind in ("1 ", "2 ", "u "):
            parts = e.split(" ", {"1 ": 8, "2 ": 9, "u ": 10}[kind])
            if len(parts) < 2:
                continue
            xy, path = parts[1], parts[-1]
            if kind == "2 ":
                i += 1  # the next entry is the rename source
            letter = "U" if kind == "u " else (xy[0] if xy[0] != "." else xy[1])
        else:
            continue
        if path.startswith(".thrum/") or path == ".thrum":
            continue
        seen.add(path)
        files.append({"path": path, "status": _STATUS_NAMES.get(letter, "modified")})
    for path in _committed_files(worktree, env, branch, head, cache):
        if path not in seen:
            files.append({"path": path, "status": "committed"})
    return {"branch": branch, "files": files}


def _committed_files(worktree, env, branch, head, cache):
    """Files changed on HEAD since the merge base with the default branch."""
    if not head:
        return []
    ro = ["--no-optional-locks"]
    wanted = ["refs/remotes/origin/HEAD", "refs/remotes/origin/main",
              "refs/remotes/origin/master", "refs/heads/main", "refs/heads/master"]
    wanted = [r for r in wanted if not (branch and r.endswith("/" + branch))]
    p = git(ro + ["for-each-ref", "--format=%(refname) %(objectname)"] + wanted, worktree,
            env, check=False, timeout=10)
    have = dict(l.split(" ", 1) for l in p.stdout.splitlines() if " " in l) \
        if p.returncode == 0 else {}
    base = next((r for r in wanted if r in have), None)
    if not base:
        return []
    key = (os.path.realpath(worktree), head, have[base])
    if cache is not None and key in cache:
        return cache[key]
    d = git(ro + ["diff", "--name-only", "-z", base + "...HEAD"], worktree, env, check=False,
            timeout=20)
    out = [p for p in d.stdout.split("\0") if p] if d.returncode == 0 else []
    if cache is not None:
        if len(cache) > 256:
            cache.clear()
        cache[key] = out
    return out


# -- tmux -----------------------------------------------------------------------------
# Every tmux call goes through Tmux.run(): an argv list, one server (`-S socket` when
# one is known, else tmux's own default, which honours TMUX_TMPDIR), a bound on its
# time (a hung server never hangs thrum), and a THRUM_DEBUG trace.

TMUX_MIN = (3, 0)  # new-session -e and a command given as separate arguments


def _which(prog, env):
    """The path of `prog` on env's PATH (None when it is not there)."""
    if os.sep in prog:
        return prog if os.access(prog, os.X_OK) and not os.path.isdir(prog) else None
    for d in (env.get("PATH") or os.defpath).split(os.pathsep):
        p = os.path.join(d or ".", prog)
        if os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    return None


def tmux_socket(env, explicit=None):
    """The tmux server to use: --socket, THRUM_TMUX_SOCKET, the server this process runs
    in ($TMUX), else None (tmux's default server)."""
    sock = explicit or env.get("THRUM_TMUX_SOCKET") or (
        (env.get("TMUX") or "").split(",")[0] or None)
    return os.path.abspath(sock) if sock else None


class TmuxMissingError(ThrumError):
    def __init__(self):
        super().__init__("tmux is not installed (not on PATH); thrum's tmux commands need "
                         "tmux 3.0 or newer")


class Tmux:
    """One tmux server, driven with argv lists. `exe` is None when tmux is absent."""

    def __init__(self, env, socket=None):
        self.env = {k: v for k, v in env.items() if not k.startswith("THRUM_")}
        self.socket = socket
        self.exe = _which("tmux", env)
        self._trace_env = env

    def require(self):
        """tmux itself, new enough (raises a clear error otherwise)."""
        if self.exe is None:
            raise TmuxMissingError()
        r = self.run("-V", timeout=5.0, check=False)
        m = re.search(r"(\d+)\.(\d+)", r[1])
        if r[0] != 0 or not m:
            raise ThrumError("cannot tell the version of %s (%s)" % (
                self.exe, (r[2] or r[1]).strip() or "exit %d" % r[0]))
        if (int(m.group(1)), int(m.group(2))) < TMUX_MIN:
            raise ThrumError("tmux %s is too old: thrum needs tmux %d.%d or newer" % (
                m.group(0), *TMUX_MIN), hint="upgrade tmux")
        return self

    def run(self, *args, timeout=3.0, check=True):
        """(exit code, stdout, stderr). check: a failure raises ThrumError."""
        import subprocess
        if self.exe is None:
            raise TmuxMissingError()
        argv = [self.exe] + (["-S", self.socket] if self.socket else []) + list(args)
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.env,
                                    start_new_session=True)
        except OSError as e:
            raise ThrumError("cannot run tmux: %s" % (e.strerror or e))
        CHILDREN.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except Exception:
            _kill_group(proc)
            _trace(self._trace_env, argv[1:], "timeout", t0, tool="tmux")
            raise ThrumError("tmux did not answer within %gs (%s)" % (timeout, " ".join(
                args[:1])), hint="is the tmux server hung? ('tmux kill-server' ends it)")
        finally:
            CHILDREN.discard(proc)
        _trace(self._trace_env, argv[1:], proc.returncode, t0, tool="tmux")
        out = out.decode("utf-8", "replace")
        err = err.decode("utf-8", "replace")
        if check and proc.returncode != 0:
            raise ThrumError("tmux %s failed: %s" % (args[0], err.strip() or
                                                     "exit %d" % proc.returncode))
        return proc.returncode, out, err

    def has_session(self, session):
        return self.run("has-session", "-t", "=" + session, check=False)[0] == 0

    def pane(self, target, fmt):
        """display-message -p for a pane (or `=SESSION:`); None when it is gone."""
        code, out, _ = self.run("display-message", "-p", "-t", target, fmt, check=False)
        return out.rstrip("\n") if code == 0 and out.strip() else None


#: What a pane shows while it asks the user to choose (a permission prompt, a
#: selection list, a y/n question): a nudge then waits instead of typing into it.
_DIALOG = re.compile(
    r"do you want to (proceed|continue|allow|make|create|run|apply)|"
    r"\[y/n\]|\(y/n\)|\[Y/n\]|\[y/N\]|\(yes/no\)|"
    r"^\s*[›❯>▶]\s*\d+[.)]\s|"
    r"press enter to (confirm|continue|select)|esc to (cancel|exit|go back)|"
    r"allow (once|always|this)|\bapprove\b.*\bdeny\b|\byes, and\b",
    re.IGNORECASE | re.MULTILINE)


def _pid_alive(pid):
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False


def start_thread(name, fn, *args):
    """Start a daemon thread named `thrum-NAME` (the name shows in tracebacks, py-spy and
    /proc/PID/task/*/comm): every thread thrum starts goes through here."""
    t = threading.Thread(target=fn, args=args, name="thrum-" + name, daemon=True)
    t.start()
    return t


# === 9. Git sync ==============================================================
#
# The log lives in a worktree of the orphan branch `a-sync` under
# <git-common-dir>/thrum-sync/. A cycle merges the remote branch into the local
# files by appending remote-only events (union by event_id; never rewriting a
# file, so concurrent appenders lose nothing), then records the files' complete
# lines as ONE commit whose parent is the fetched remote tip and pushes it.
# Commits are built with plumbing (blobs, trees, commit-tree, update-ref): the
# user's HEAD, index and working tree are never touched. Few git processes (SPEC §8):
# refs are read from git's files and worktree files compared with blobs by hashing them
# here, so a cycle with nothing to do runs two (worktree list, fetch); a rejected push
# costs one fetch, one merge and one push (the commit is made again from trees).

_BRANCH_HINT = ("choose a branch name that nothing else uses: "
                "'thrum config set sync.branch thrum-log'")


#: Push refusals that mean "someone else pushed first": fetch, merge and retry.
#: Any other refusal (e.g. a pre-receive hook declining) fails at once.
_CONTENTION = ("non-fast-forward", "fetch first", "stale info", "failed to update ref",
               "cannot lock ref", "incorrect old value", "[rejected]")


#: What this process learnt of git, for every SyncEngine (the daemon makes one per
#: cycle): a commit's log files (commits never change), git's answer to `git remote`
#: (while the config keeps its stat), files known to hold a blob's lines (while theirs).
_SYNC_CACHE = {"trees": {}, "remotes": {}, "same": {}}
_SYNC_CACHE_LOCK = threading.Lock()  # writers (the daemon's threads share the cache)


def _cache_put(kind, key, value, limit=256):
    with _SYNC_CACHE_LOCK:
        cache = _SYNC_CACHE[kind]
        if len(cache) >= limit:
            cache.pop(next(iter(cache)), None)  # the oldest entry
        cache[key] = value


def _stat_key(path, st=None):
    """Inode, size, mtime and ctime: any write or rename changes one of them."""
    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _event_ids(data):
    """event_ids of the complete lines in `data` (cheap substring scan + JSON fallback)."""
    ids = set()
    for line in data.split(b"\n"):
        i = line.find(b'"event_id":"')
        if i >= 0:
            j = line.find(b'"', i + 12)
            if j > 0:
                ids.add(line[i + 12:j])
                continue
        if line.strip():
            try:
                ids.add(json.loads(line)["event_id"].encode())
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
    return ids


def _complete(data):
    """The complete lines of `data` (a torn tail is never committed or merged)."""
    return data[:data.rfind(b"\n") + 1]


class GitLog:
    """One clone's sync branch as git objects (refs, a commit's log files, blobs, new
    commits from the worktree's files), with few git processes. SyncEngine builds on it."""

    def __init__(self, store, branch=None):
        self.store = store
        self.loc = store.loc
        if not self.loc.git_common:
            raise ThrumError("sync needs a git repository; this store (%s) is outside git"
                             % self.loc.store, hint="run 'git init' and 'thrum init' to "
                             "use sync")
        self.root = self.loc.store_root
        self.common = (git_dirs(self.root) or (None, self.loc.git_common))[1]
        self.branch = branch or store.config.get("sync.branch")
        self.ref = "refs/heads/" + self.branch
        self.remote = store.config.get("sync.remote")
        self.local_only = store.config.get("sync.local_only")
        self.wt = self.loc.log_dir(self.branch)
        #: Remote requests this engine made, and pushes refused because another clone
        #: pushed first (the daemon adds them up for `daemon status`).
        self.counts = {"fetch": 0, "push": 0, "rejected": 0, "ls-remote": 0}

    # -- git and refs -------------------------------------------------------------
    def git(self, *args, check=True, input=None, timeout=60, env_extra=None, cwd=None):
        return git(list(args), cwd or self.root, self.store.env, check=check, input=input,
                   timeout=timeout, env_extra=env_extra)

    def rev(self, ref):
        """The commit `ref` names, or None. A full ref is read from git's ref files (no
        process); anything else, or a ref only git can read, is asked of git."""
        if ref.startswith("refs/"):
            sha = _read_ref(self.common, ref)
            if sha is not False:
                return sha
        p = self.git("rev-parse", "--verify", "--quiet", ref + "^{commit}", check=False)
        return p.stdout.strip() if p.returncode == 0 else None

    def remotes(self):
        """The names of the repository's git remotes (git's answer, kept while the
        repository's config file is unchanged)."""
        key = _stat_key(os.path.join(self.common, "config"))
        hit = _SYNC_CACHE["remotes"].get(self.common)
        if hit and key and hit[0] == key:
            return list(hit[1])
        names = self.git("remote", check=False).stdout.split()
        _cache_put("remotes", self.common, (key, names))
        return list(names)

    def has_remote(self):
        return not self.local_only and self.remote in self.remotes()

    def purges(self):
        """The purges the log holds: merges and commits never keep what they make dead."""
        return log_purges(self.store.log)

    @property
    def tracking(self):
        return "refs/remotes/%s/%s" % (self.remote, self.branch)

    def _set_local(self, commit, pushed=False):
        """Point the branch (and, after a push, the tracking ref) at `commit`: one ref
        transaction; then the worktree's index follows its HEAD (files stay as they are)."""
        moves = [ref for ref in (self.ref, self.tracking if pushed else None)
                 if ref and self.rev(ref) != commit]
        if not moves:
            return
        self.git("update-ref", "--stdin", input="".join(
            "update %s %s\n" % (ref, commit) for ref in moves))
        if self.ref in moves:
            self.git("read-tree", "HEAD", cwd=self.wt, check=False)

    # -- what a commit holds -----------------------------------------------------------
    def _tree_files(self, commit):
        """{path: blob_sha} of a commit's regular log files (symlinks, submodules and
        other paths are ignored)."""
        return {path: sha for path, (sha, _) in self._tree_blobs(commit).items()}

    def _tree_blobs(self, commit):
        """{path: (blob_sha, size)} of a commit's regular log files (asked of git once
        per process: commits never change). Do not modify the answer."""
        if not commit:
            return {}
        hit = _SYNC_CACHE["trees"].get((self.common, commit))
        if hit is not None:
            return hit
        p = self.git("ls-tree", "-r", "-l", "-z", commit)
        out = {}
        for entry in p.stdout.split("\0"):
            if entry:
                meta, path = entry.split("\t", 1)
                mode, kind, sha, size = meta.split()
                if kind == "blob" and mode in ("100644", "100755") and log_relpath_ok(path):
                    out[path] = (sha, int(size))
        _cache_put("trees", (self.common, commit), out, limit=32)
        return out

    def _read_blobs(self, shas):
        """{sha: bytes} through one `git cat-file --batch` process."""
        if not shas:
            return {}
        p = git(["cat-file", "--batch"], self.root, self.store.env,
                input=("\n".join(shas) + "\n").encode(),
                timeout=120, text=False)
        out, data, i = {}, p.stdout, 0
        for sha in shas:
            nl = data.index(b"\n", i)
            header = data[i:nl].split()
            if len(header) < 3:
                raise GitError(["cat-file"], 1, "missing object %s" % sha)
            size = int(header[2])
            out[sha] = data[nl + 1:nl + 1 + size]
            i = nl + 1 + size + 1
        return out

    # -- the worktree against a commit ----------------------------------------------
    def _against(self, commit, only=None):
        """{path: state} of the worktree's log files against `commit`'s blobs: same
        (complete lines = the blob), grown (starts with it, more lines after), changed
        (does not start with it), missing (not here), new (not in the commit). Git names
        a blob by the hash of `blob <size>\\0<bytes>`: hashing each file's first N bytes
        tells with no git process; a file found the same is not read while its stat holds."""
        import hashlib
        blobs = self._tree_blobs(commit)
        here = {rel: (path, st) for rel, path, st in
                EventLog(self.wt, self.store.log.torn_dir).files()}
        same = _SYNC_CACHE["same"]
        out = {}
        for rel in sorted(set(blobs) | set(here)):
            if only is not None and rel not in only:
                continue
            if rel not in here:
                out[rel] = "missing"
                continue
            path, st = here[rel]
            sha, size = blobs.get(rel, (None, 0))
            key = _stat_key(path, st)
            if sha and same.get(path) == (key, sha):
                out[rel] = "same"
                continue
            if st.st_size < size:
                out[rel] = "changed"
                continue
            try:
                fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
            except OSError:
                out[rel] = "missing" if sha else None
                continue
            with os.fdopen(fd, "rb") as f:
                head, rest = f.read(size), f.read()
            if sha is None:
                out[rel] = "new" if b"\n" in rest else None
                continue
            h = hashlib.new("sha256" if len(sha) == 64 else "sha1")
            h.update(b"blob %d\0" % size)
            h.update(head)
            if len(head) < size or h.hexdigest() != sha:
                out[rel] = "changed"
            elif b"\n" in rest:
                out[rel] = "grown"
            else:
                out[rel] = "same"
                _cache_put("same", path, (key, sha), limit=4096)
        return {rel: s for rel, s in out.items() if s}

    def _equivalent(self, rel, sha, blob):
        """Whether the worktree file holds exactly the lines of `blob`, in any order (a
        groups.jsonl several clones wrote; never a torn blob: that gets mended), remembered
        while its stat holds, so it is neither committed nor read again every cycle."""
        path = os.path.join(self.wt, rel)
        try:
            fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        mine, theirs = _complete(data).split(b"\n"), blob.split(b"\n")
        if theirs[-1] or len(mine) != len(theirs) or sorted(mine) != sorted(theirs):
            return False
        _cache_put("same", path, (_stat_key(path, st), sha), limit=4096)
        return True

    # -- making commits ----------------------------------------------------------------
    def _store_files(self, rels):
        """{path: (blob sha, size)}: the complete lines of these worktree files (read under
        their shared flock) stored as blobs by one `git hash-object`."""
        import tempfile
        if not rels:
            return {}
        with tempfile.TemporaryDirectory(prefix="thrum-sync-") as tmp:
            copies = []
            for rel in rels:
                path = os.path.join(self.wt, rel)
                try:  # never through a symlink (EventLog.files lists none)
                    fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
                except OSError:
                    continue
                with os.fdopen(fd, "rb") as f:
                    flock(f.fileno(), shared=True)
                    st = os.fstat(f.fileno())
                    data = f.read()
                whole = _complete(data)
                copy = os.path.join(tmp, "%d" % len(copies))
                with open(copy, "wb") as f:
                    f.write(whole)
                copies.append((rel, copy, len(whole), _stat_key(path, st)
                               if len(whole) == len(data) else None))
            if not copies:
                return {}
            shas = self.git("hash-object", "-w", "--stdin-paths", input="\n".join(
                c[1] for c in copies) + "\n").stdout.split()
        out = {}
        for (rel, _, size, key), sha in zip(copies, shas):
            out[rel] = (sha, size)
            if key:  # the file is exactly this blob now
                _cache_put("same", os.path.join(self.wt, rel), (key, sha), limit=4096)
        return out

    def _make_commit(self, files, parent):
        """Commit {path: (blob sha, size)} on `parent`: (commit, made), (parent, False)
        when nothing changed. Trees are hashed here and written by one `git mktree
        --batch` (it checks every entry exists); the commit's files are remembered."""
        files = without_dead(files, self.purges(), self.wt, self._read_blobs)
        if parent is not None and {p: s for p, (s, _) in files.items()} == \
                self._tree_files(parent):
            return parent, False
        if files:
            algo = "sha256" if len(next(iter(files.values()))[0]) == 64 else "sha1"
            root, listings = _tree_objects({p: s for p, (s, _) in files.items()}, algo)
            made = self.git("mktree", "--batch", input="\n".join(listings)).stdout.split()
            if not made or made[-1] != root:
                raise GitError(["mktree"], 1, "git wrote tree %s where thrum computed %s"
                               % (made[-1] if made else "nothing", root))
        else:
            root = self.git("mktree", input="").stdout.strip()
        args = ["commit-tree", root, "-m", "thrum: sync %s" % now_ts()]
        if parent:
            args[2:2] = ["-p", parent]
        commit = self.git(*args).stdout.strip()
        _cache_put("trees", (self.common, commit), dict(files), limit=32)
        return commit, True


class SyncEngine(GitLog):
    """One clone's side of git sync, over a store (its location, config and log)."""

    #: Attempts at pushing in one cycle while other clones keep pushing first.
    MAX_ATTEMPTS = 8
    #: Clones whose events are this recent count for the push slots (push_slot).
    PEERS_FOR = 3600.0
    #: The pause before the n-th retry of a rejected push: random in [cap/2, cap], cap =
    #: BACKOFF_FIRST x 2^(n-1), at most BACKOFF_MAX (so clones that collided spread out).
    BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0

    def __init__(self, store, branch=None):
        super().__init__(store, branch)
        self.state_file = os.path.join(self.loc.var, "sync.json")
        #: Bound on every git call that talks to the remote (sync.timeout).
        self.net_timeout = parse_duration(store.config.get("sync.timeout"))
        self.restored = []  # events this engine put back (restore_lost)
        self._remember = {}  # sync.json entries to write with the next _save_state
        self.merged_sig = None  # the log files as the merge left them (for the daemon)

    # -- bootstrap ----------------------------------------------------------------
    def ensure_branch_and_worktree(self, locked=False):
        """Create (or adopt from the remote) the branch and its worktree. Idempotent.

        Holds the sync lock (unless the caller already does), so agents starting at
        once in a fresh repository create one worktree, not several."""
        if not locked:
            lock = self._lock(wait=120)
            try:
                return self.ensure_branch_and_worktree(locked=True)
            finally:
                lock.release()
        out = {"adopted_remote": False, "created_branch": False, "repaired_worktree": None}
        worktrees = self._worktrees()
        self.check_branch(worktrees)
        if self.rev(self.ref) is None:
            if self.has_remote() and self.rev(self.tracking) is None:
                self.fetch(quiet=True)
            remote_tip = self.rev(self.tracking) if not self.local_only else None
            if remote_tip:
                self.check_remote_history(remote_tip)
                self.git("update-ref", self.ref, remote_tip, "")
                out["adopted_remote"] = True
            else:
                tree = self.git("mktree", input="").stdout.strip()
                c = self.git("commit-tree", tree, "-m", "thrum: start the %s branch"
                             % self.branch).stdout.strip()
                p = self.git("update-ref", self.ref, c, "", check=False)
                if p.returncode != 0 and self.rev(self.ref) is None:
                    raise GitError(["update-ref", self.ref], p.returncode, p.stderr)
            out["created_branch"] = True
        problem = self.worktree_problem(worktrees)
        if problem:
            self._recreate_worktree(problem)
            out["repaired_worktree"] = problem
        return out

    # -- is the branch thrum's own? --------------------------------------------------
    #
    # thrum commits only to a branch that is its own log: not checked out in any
    # worktree but its sync worktree, and an orphan history whose root commits hold
    # nothing but log files (thrum's own root is the empty tree). A branch made from
    # the project's history (`git branch a-sync`, or `sync.branch = main`) fails both.

    def _worktrees(self):
        """{realpath: checked-out ref or None} of every worktree of the clone."""
        p = self.git("worktree", "list", "--porcelain", check=False)
        out, cur = {}, None
        for line in p.stdout.splitlines():
            if line.startswith("worktree "):
                cur = os.path.realpath(line[9:])
                out[cur] = None
            elif line.startswith("branch ") and cur:
                out[cur] = line[7:]
        return out

    def branch_problem(self, worktrees=None):
        """Why the configured branch is not thrum's own log (None when it is)."""
        mine = os.path.realpath(self.wt)
        for path, ref in (self._worktrees() if worktrees is None else worktrees).items():
            if ref == self.ref and path != mine:
                return "it is checked out in %s" % path
        local = self.rev(self.ref)
        return self._history_problem(local) if local else None

    def check_branch(self, worktrees=None):
        problem = self.branch_problem(worktrees)
        if problem:
            hint = _BRANCH_HINT if _is_store(self.loc.store) else (
                "choose a branch name that nothing else uses: 'THRUM_SYNC_BRANCH=thrum-log "
                "thrum init', then 'thrum config set sync.branch thrum-log' to keep it")
            raise UsageError("the sync branch %r is not thrum's own log branch: %s"
                             % (self.branch, problem), hint=hint)

    def check_remote_history(self, tip):
        problem = self._history_problem(tip)
        if problem:
            raise ThrumError("the remote's %s branch (%s/%s) is not a thrum log: %s"
                             % (self.branch, self.remote, self.branch, problem),
                             hint="thrum will not commit onto it; " + _BRANCH_HINT)

    def _history_problem(self, commit):
        """foreign_history(commit), cheaply: a commit checked before (sync.json
        `log_tips`, the last 8) passes at once, and otherwise only the commits that no
        such tip reaches are walked (usually the few other clones pushed since)."""
        tips = self._state("log_tips") or []
        if commit in tips:
            return None
        problem = self.foreign_history(commit, since=tips)
        if problem is None:
            self._good_tips(commit)
        return problem

    def _good_tips(self, *commits):
        """Remember commits whose history is a thrum log: the last ones checked, and our
        own commits on top of them."""
        tips = [t for t in self._state("log_tips") or [] if t not in commits]
        self._remember["log_tips"] = (tips + [c for c in commits if c])[-8:]

    def foreign_history(self, commit, since=()):
        """None when every root commit of `commit` holds only log files, else what
        the history holds. Roots found good are remembered (sync.json). `since`: commits
        known to be good; roots only they reach are not looked at again."""
        args = ["rev-list", "--max-parents=0", "--ignore-missing", commit]
        roots = self.git(*(args + (["--not"] + list(since) if since else []))).stdout.split()
        known = self._state("log_roots") or []
        new = []
        for root in roots:
            if root in known:
                continue
            names = [n for n in self.git("ls-tree", "-r", "--name-only", "-z",
                                         root).stdout.split("\0") if n]
            other = [n for n in names if not log_relpath_ok(n)]
            if other:
                return "its history starts from a commit holding other files (%s%s)" % (
                    ", ".join(other[:3]), ", ..." if len(other) > 3 else "")
            if not names:  # an empty root: thrum's own says so
                msg = self.git("log", "-1", "--format=%s", root).stdout
                if not msg.startswith("thrum:"):
                    return "its history starts from an empty commit thrum did not make " \
                           "(%s)" % msg.strip()[:60]
            new.append(root)
        if new:
            self._remember["log_roots"] = (known + new)[-20:]
            try:
                self._save_state()
            except OSError:  # only a cache (a read-only store still answers)
                pass
        return None

    def worktree_problem(self, worktrees=None):
        """None when the sync worktree is healthy, else what is wrong."""
        if not os.path.isdir(self.wt):
            return "missing"
        gd = git_dirs(self.wt)
        if not gd or not os.path.isdir(gd[0]):
            return "not a git worktree"
        if os.path.realpath(self.wt) not in (self._worktrees() if worktrees is None
                                             else worktrees):
            return "not registered"
        head = _read_text(os.path.join(gd[0], "HEAD"), "").strip()
        if head != "ref: " + self.ref:
            return "on the wrong branch (%s)" % head
        return None

    def _recreate_worktree(self, problem):
        """Recreate the worktree from the branch, keeping any events it held."""
        rescue = None
        if os.path.exists(self.wt):
            rescue = "%s.rescue-%s" % (self.wt, new_id(""))
            os.rename(self.wt, rescue)
        self.git("worktree", "prune", check=False)
        os.makedirs(os.path.dirname(self.wt), exist_ok=True)
        p = self.git("worktree", "add", "--force", "--quiet", self.wt, self.branch,
                     check=False)
        if p.returncode != 0:
            if rescue and not os.path.exists(self.wt):
                os.rename(rescue, self.wt)
            elif rescue:  # keep what the old directory held, wherever the log is now
                self._merge_dir(rescue)
                import shutil
                shutil.rmtree(rescue, ignore_errors=True)
            e = GitError(["worktree", "add"], p.returncode, p.stderr)
            e.hint = "run 'thrum doctor --fix'"
            raise e
        if rescue:
            self._merge_dir(rescue)
            import shutil
            shutil.rmtree(rescue, ignore_errors=True)
        if problem != "missing":
            _warn("sync worktree was %s; recreated it at %s" % (problem, self.wt))

    def _merge_dir(self, other):
        """Union the log files of another directory into the worktree."""
        for rel, path, _ in EventLog(other, self.store.log.torn_dir).files():
            with open(path, "rb") as f:
                data = f.read()
            self._merge_file(rel, data)

    # -- merging ------------------------------------------------------------------
    def _merge_file(self, rel, remote_data):
        """Append the remote's complete lines whose event_id this file lacks.

        Holds the file's flock (the same lock appenders take). Returns the
        number of lines appended.
        """
        if not log_relpath_ok(rel):
            return 0  # only log files are merged (see log_relpath_ok)
        path = os.path.join(self.wt, rel)
        remote_data = self.purges().live(_complete(remote_data))  # never a dead line
        if not remote_data:
            return 0
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = open_for_append(path)
        except OSError as e:  # a symlink or directory where a log file belongs
            _warn("sync: not merging into %s: %s" % (rel, e.strerror))
            return 0
        try:
            self.store.log.repair_tail(fd, rel)
            size = os.fstat(fd).st_size
            local = os.pread(fd, size, 0) if size else b""
            have = _event_ids(local)
            add = []
            for line in remote_data.split(b"\n"):
                if not line.strip():
                    continue
                ids = _event_ids(line)
                if not ids:
                    continue  # a corrupt remote line: nothing to keep
                if not ids & have:
                    add.append(line)
                    have |= ids
            if add:
                data = b"\n".join(add) + b"\n"
                self.store.log.merged += 1  # its quick listings stat every file again
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            return len(add)
        finally:
            os.close(fd)

    def push_slot(self):
        """(rank, n): this clone's place among the clones that wrote in the last
        PEERS_FOR seconds: the origins of the log files' last events, by the events' own
        timestamps, so clones that hold the same log agree. Files not written in that
        time are not read, nor a writer's segments but its latest. The daemon pushes in
        slot `rank` of `n` (SyncSchedule)."""
        now = time.time()
        cutoff, peers = now_ts(now - self.PEERS_FOR), {self.store.origin}
        latest = {}
        for rel, path, st in EventLog(self.wt, self.store.log.torn_dir).files():
            seg = split_segment(rel[rel.find("/") + 1:-6]) if "/" in rel else None
            key = (rel[:rel.find("/")], seg[0]) if seg else rel
            if key not in latest or latest[key][0] < (seg[1] if seg else 0):
                latest[key] = (seg[1] if seg else 0, path, st)
        for _, path, st in latest.values():
            if st.st_mtime < now - self.PEERS_FOR:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, st.st_size - 8192))
                    tail = _complete(f.read()).rstrip(b"\n")
            except OSError:
                continue
            line = tail[tail.rfind(b"\n") + 1:]
            i, j = line.find(b'"origin":"'), line.find(b'"timestamp":"')
            if i >= 0 and j >= 0 and line[j + 13:j + 40].decode("ascii", "replace") >= cutoff:
                peers.add(line[i + 10:line.find(b'"', i + 10)].decode("ascii", "replace"))
        ordered = sorted(peers)
        return ordered.index(self.store.origin), len(ordered)

    def merge_commit(self, commit, base=None):
        """Merge into the worktree what `commit` holds and `base` does not (the files
        whose blobs differ, read through one `git cat-file`). Returns events appended."""
        theirs = self._tree_files(commit)
        ours = self._tree_files(base) if base else {}
        todo = {p: s for p, s in theirs.items() if ours.get(p) != s}
        blobs = self._read_blobs(sorted(set(todo.values())))
        return sum(self._merge_file(p, blobs[s]) for p, s in sorted(todo.items()))

    # -- append-only, enforced ----------------------------------------------------------
    def lost_lines(self, commits, only=None):
        """{path: [blob shas]}: log files of the worktree that no longer start with what
        one of `commits` holds for them (truncated, rewritten or replaced by another
        process, or missing). No git process (`_against`)."""
        lost = {}
        for commit in dict.fromkeys(c for c in commits if c):
            blobs = self._tree_blobs(commit)
            for rel, state in self._against(commit, only).items():
                if state in ("changed", "missing"):
                    lost.setdefault(rel, []).append(blobs[rel][0])
        keep = set()  # (not the files a purge removed: only dead lines were lost)
        for i in (0, -1):
            keep |= set(without_dead({r: (s[i], 0) for r, s in lost.items()},
                                     self.purges(), self.wt, self._read_blobs))
        return {r: s for r, s in lost.items() if r in keep}

    def restore_lost(self, commits, only=None):
        """Append back, from git, the events a worktree file lost against `commits`
        (SPEC §8: the log is append-only; only retention removes events). Reported
        once: a warning on stderr (the daemon's goes to daemon.log), and a record in
        sync.json that `doctor` shows. A file that lost nothing is checked for holding the
        lines in another order (`_equivalent`). Returns [{file, events}]."""
        lost = self.lost_lines(commits, only)
        if not lost:
            return []
        blobs = self._read_blobs(sorted({s for shas in lost.values() for s in shas}))
        out = []
        for rel, shas in sorted(lost.items()):
            n = sum(self._merge_file(rel, blobs[sha]) for sha in shas)
            if n:
                out.append({"file": rel, "events": n, "at": now_ts()})
            else:  # against the commit that goes under the next one
                self._equivalent(rel, shas[-1], blobs[shas[-1]])
        if out:
            try:  # recorded for doctor first, then said (what says it can be trusted)
                self._save_state(restored=((self.load_state().get("restored") or [])
                                           + out)[-20:])
            except OSError:  # only a report; the events are back either way
                pass
            self.restored += out
        for r in out:
            _warn("sync: %s had lost %d event%s against its last commit (truncated or "
                  "rewritten by another process); restored from git" % (
                      r["file"], r["events"], "" if r["events"] == 1 else "s"))
        return out

    # -- committing -------------------------------------------------------------------
    def _commit(self, parent):
        """Commit on `parent` its log files with the worktree's that have more lines laid
        over them (a file missing here keeps the parent's copy: a damaged worktree never
        deletes history; files that are not log files are left out). (tip, made)."""
        # Never commit a file that lost lines against the last commit of this clone or
        # the commit this one goes on top of: put them back first (not dead ones).
        self.store.drop_dead()
        self.restore_lost([self.rev(self.ref), parent])
        files = dict(self._tree_blobs(parent))
        changed = [rel for rel, s in self._against(parent).items()
                   if s in ("grown", "changed", "new")]
        files.update(self._store_files(changed))
        return self._make_commit(files, parent)

    def _commit_locally(self):
        """Commit pending log lines on the local branch only. Returns True if made."""
        tip, made = self._commit(self.rev(self.ref))
        if made:
            self._set_local(tip)
        return made

    def _rebase(self, ours, base, theirs):
        """Our unpushed commit `ours` (made on `base`) made again on `theirs`, the tip that
        beat it: our blob where only we changed a file, theirs where only they did, and
        where both did the worktree's union (merge_commit just appended their lines)."""
        o, b, t = self._tree_blobs(ours), self._tree_blobs(base), self._tree_blobs(theirs)
        files, both = {}, []
        for rel in set(o) | set(b) | set(t):
            ov, bv, tv = o.get(rel), b.get(rel), t.get(rel)
            if (tv and tv[0]) == (bv and bv[0]) or (ov and ov[0]) == (tv and tv[0]):
                pick = ov
            elif (ov and ov[0]) == (bv and bv[0]):
                pick = tv
            else:
                both.append(rel)
                continue
            if pick:
                files[rel] = pick
        if both:
            self.restore_lost([ours], only=set(both))  # the worktree holds all of ours
            files.update(self._store_files(sorted(both)))
        return self._make_commit(files, theirs)[0]

    # -- network --------------------------------------------------------------------
    def fetch(self, quiet=False):
        """Fetch the remote branch. Returns 'ok', 'absent' (no such branch) or raises."""
        PROGRESS.step("fetching %s from %s" % (self.branch, self.remote))
        self.counts["fetch"] += 1
        p = self.git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", self.remote,
                     "+%s:%s" % (self.ref, self.tracking), check=False,
                     timeout=self.net_timeout)
        if p.returncode == 0:
            return "ok"
        err = p.stderr.lower()
        if "couldn't find remote ref" in err or "could not find remote ref" in err:
            return "absent"
        if quiet:
            return "error"
        raise GitError(["fetch", self.remote], p.returncode, p.stderr)

    def remote_tip(self):
        """The remote branch's tip by one `git ls-remote` (None: no such branch); raises
        GitError when the remote cannot be asked."""
        self.counts["ls-remote"] += 1
        p = self.git("ls-remote", self.remote, self.ref, check=False,
                     timeout=self.net_timeout)
        if p.returncode != 0:
            raise GitError(["ls-remote", self.remote], p.returncode, p.stderr)
        for line in p.stdout.splitlines():
            sha, _, name = line.partition("\t")
            if name.strip() == self.ref:
                return sha.strip()
        return None

    def remote_moved(self):
        """The cheap remote check (the daemon's while agents are active; a wait's with no
        daemon): has the remote branch moved since the last fetch? One `git ls-remote`,
        False without a remote; raises GitError when the remote cannot be asked."""
        if not self.has_remote():
            return False
        return self.remote_tip() != self.rev(self.tracking)

    def push(self, commit, expect):
        """Push `commit` to the remote branch with a lease on `expect` (the remote tip it
        was made on; None: the remote had no branch). True when pushed, False when the
        remote moved first (contention); any other refusal raises."""
        args = ["push", "--quiet", "--no-verify", "--porcelain"]
        args.append("--force-with-lease=%s:%s" % (self.ref, expect or ""))
        PROGRESS.step("pushing %s to %s" % (self.branch, self.remote))
        self.counts["push"] += 1
        p = self.git(*(args + [self.remote, "%s:%s" % (commit, self.ref)]), check=False,
                     timeout=self.net_timeout)
        if p.returncode == 0:
            return True
        text = p.stdout + p.stderr
        if any(r in text.lower() for r in _CONTENTION):
            self.counts["rejected"] += 1
            return False
        reason = [l.split("\t")[-1] for l in p.stdout.splitlines() if l.startswith("!")]
        said = [l[7:].strip() for l in p.stderr.splitlines()  # a hook's own words
                if l.startswith("remote:") and l[7:].strip()]
        raise ThrumError("sync failed: %s refused the push: %s%s" % (
            self.remote, reason[0] if reason else git_reason(p.stderr),
            " (remote says: %s)" % " / ".join(said[:3])[:300] if said else ""),
            hint="local changes are committed; fix the remote, then run 'thrum sync force'")

    def _fetch_tip(self, res, unpushed=None):
        """Fetch; the remote tip (None: no branch yet), checked to be a thrum log. On a
        failure, what the remote lacks is committed locally (`unpushed`, else the
        worktree) before the error is raised."""
        def keep():
            if unpushed:
                self._set_local(unpushed)
            else:
                res["committed"] = self._commit_locally() or res["committed"]
        try:
            status = self.fetch()
        except GitError as e:  # offline: keep the local commit so nothing waits uncommitted
            keep()
            raise ThrumError("sync failed: cannot fetch from %s: %s" % (
                self.remote, git_reason(e.stderr)),
                hint="local changes are committed; run 'thrum sync force' again "
                     "when the remote is reachable")
        tip = self.rev(self.tracking) if status == "ok" else None
        if tip:
            try:
                self.check_remote_history(tip)
            except ThrumError:
                keep()
                raise
        return tip

    def _backoff(self, attempt):  # jittered, exponential
        import random
        cap = min(self.BACKOFF_MAX, self.BACKOFF_FIRST * 2 ** (attempt - 1))
        return random.uniform(cap / 2, cap)

    # -- the cycle ----------------------------------------------------------------------
    def _lock(self, wait=30.0):
        """The clone's sync lock (one cycle at a time), held by the returned FileLock."""
        os.makedirs(self.loc.var, exist_ok=True)
        lock = FileLock(os.path.join(self.loc.var, "sync.lock"))
        if lock.acquire(timeout=0):
            return lock
        PROGRESS.step("waiting for another sync of this clone to finish")
        if not lock.acquire(timeout=wait, step=0.05):
            raise ThrumError("another sync is still running for this clone",
                             hint="retry in a moment")
        return lock

    def _state(self, key):
        return self._remember[key] if key in self._remember else self.load_state().get(key)

    def _save_state(self, **kw):
        state = self.load_state()
        state.update(self._remember)
        state.update(kw)
        _write_file_atomic(self.state_file, json.dumps(state, indent=2) + "\n")
        self._remember = {}

    def load_state(self):
        try:
            return json.loads(_read_text(self.state_file, "{}") or "{}")
        except ValueError:
            return {}

    def cycle(self, max_attempts=None, push=True):
        """Commit, fetch, merge, commit on the remote tip, push; retry on contention.
        `push=False`: fetch and merge only (the daemon's pushes wait for their slot).

        Returns {pulled, committed, pushed, attempts, rejected, local_only, remote}.
        Any failure is recorded as `last_error` in the sync state before it is raised.
        """
        lock = self._lock()
        try:
            return self._cycle(max_attempts or self.MAX_ATTEMPTS, push)
        except ThrumError as e:
            self._save_state(last_error=e.message, last_attempt_at=now_ts())
            raise
        finally:
            lock.release()
            try:
                self.store.refresh()
            except ThrumError as e:  # never hide the sync's own outcome
                _warn("after sync: %s" % e.message)

    def _cycle(self, max_attempts, push=True):
        self.ensure_branch_and_worktree(locked=True)
        self.store.log.repair()
        res = {"pulled": 0, "committed": False, "pushed": False, "attempts": 0,
               "rejected": 0, "local_only": self.local_only, "remote": None,
               "restored": self.restored}
        if not self.has_remote():
            res["committed"] = self._commit_locally()
            self._save_state(last_sync_at=now_ts(), last_error=None)
            return res
        res["remote"] = self.remote
        local = self.rev(self.ref)
        remote_tip = self._fetch_tip(res)
        if remote_tip and remote_tip != local:
            res["pulled"] += self.merge_commit(remote_tip, local)
        self.merged_sig = self.store.log_signature(None)
        if not push:
            self._save_state(last_sync_at=now_ts(), last_error=None)
            return res
        tip, res["committed"] = self._commit(remote_tip or local)
        # Push; when another clone pushed first: fetch, merge what it pushed, make our
        # commit again on its tip (from the trees: the log is not read again), push.
        while tip != remote_tip:
            res["attempts"] += 1
            try:
                pushed = self.push(tip, remote_tip)
            except ThrumError:
                self._set_local(tip)  # the refusal's hint says local changes are committed
                raise
            if pushed:
                res["pushed"] = True
                break
            res["rejected"] += 1
            if res["attempts"] >= max_attempts:
                self._set_local(tip)
                raise ThrumError("sync failed: push rejected (the remote moved) after %d "
                                 "attempts" % max_attempts,
                                 hint="nothing is lost; run 'thrum sync force' again")
            PROGRESS.step("the remote moved while pushing: merging again (attempt %d of %d)"
                          % (res["attempts"] + 1, max_attempts))
            time.sleep(self._backoff(res["attempts"]))
            newer = self._fetch_tip(res, unpushed=tip)
            if newer != remote_tip:
                res["pulled"] += self.merge_commit(newer, remote_tip)
                self.merged_sig = self.store.log_signature(None)
                tip = self._rebase(tip, remote_tip, newer) if newer else tip
                remote_tip = newer
        self._set_local(tip, pushed=res["pushed"])
        self._good_tips(tip)
        self._save_state(last_sync_at=now_ts(), last_error=None)
        return res

    def unpushed(self):
        """How many events of the log the remote's branch (as last fetched) lacks: writes
        not pushed yet. None when there is no remote to push to."""
        if not self.has_remote():
            return None
        theirs = self._tree_blobs(self.rev(self.tracking))
        mine = EventLog(self.wt, self.store.log.torn_dir).files()
        changed = [(rel, path) for rel, path, st in mine
                   if theirs.get(rel, (None, -1))[1] != st.st_size]
        blobs = self._read_blobs(sorted({theirs[rel][0] for rel, _ in changed
                                         if rel in theirs}))
        n = 0
        for rel, path in changed:
            with open(path, "rb") as f:
                data = _complete(f.read())
            n += len(_event_ids(data) - _event_ids(blobs.get(theirs.get(rel, ("",))[0], b"")))
        return n

    def pending_paths(self):
        """Log files of the worktree with lines the branch's tip lacks: what the next
        cycle commits (other files are not thrum's and never committed, so they are never
        pending). Compared here (`_against`): no git process while nothing changed; a
        file holding the tip's lines in another order is not pending."""
        tip = self.rev(self.ref)
        blobs = self._tree_blobs(tip)
        states = self._against(tip)
        out = [rel for rel, s in states.items() if s in ("grown", "new")]
        odd = [rel for rel, s in states.items() if s == "changed"]
        if odd:
            data = self._read_blobs(sorted({blobs[rel][0] for rel in odd}))
            out += [rel for rel in odd
                    if not self._equivalent(rel, blobs[rel][0], data[blobs[rel][0]])]
        return sorted(out)

    def stray_paths(self):
        """Files in the sync worktree that are not log files (doctor reports them)."""
        out = []
        for d, dirs, files in os.walk(self.wt):
            dirs[:] = [x for x in dirs if not (d == self.wt and x == ".git")]
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), self.wt).replace(os.sep, "/")
                if rel != ".git" and not log_relpath_ok(rel):
                    out.append(rel)
        return sorted(out)

    def status(self):
        """Sync state without touching the network (SPEC §6 shape)."""
        st = self.load_state()
        has_remote = self.has_remote()
        out = {"remote": self.remote if has_remote else None, "branch": self.branch,
               "local_only": self.local_only, "last_sync_at": st.get("last_sync_at"),
               "last_error": st.get("last_error"), "ahead": 0, "behind": 0,
               "worktree": self.wt,
               "last_attempt_at": st.get("last_attempt_at") if st.get("last_error") else None}
        if not has_remote and not self.local_only:
            # say why: sync.remote names no remote of this repository (which has others?)
            out["remote_missing"] = {"name": self.remote, "remotes": self.remotes()}
        local = self.rev(self.ref)
        pending = False
        if local and os.path.isdir(self.wt):
            pending = bool(self.pending_paths())
        remote_tip = self.rev(self.tracking) if has_remote else None
        if local and remote_tip:
            p = self.git("rev-list", "--left-right", "--count", "%s...%s" % (
                local, remote_tip), check=False) if local != remote_tip else None
            if p is not None and p.returncode == 0:
                a, b = p.stdout.split()
                out["ahead"], out["behind"] = int(a), int(b)
        elif local and has_remote:
            out["ahead"] = 1
        out["ahead"] += 1 if pending else 0
        out["pending_changes"] = pending
        if self.local_only:
            state = "local-only"
        elif not has_remote:
            state = "no-remote"
        elif out["last_error"]:
            state = "error"
        elif not out["last_sync_at"]:
            state = "never"
        elif out["ahead"] and out["behind"]:
            state = "diverged"
        elif out["ahead"]:
            state = "ahead"
        elif out["behind"]:
            state = "behind"
        else:
            state = "synced"
        out["state"] = state
        return out



class RemoteCheck:
    """When to run the cheap remote check (`SyncEngine.remote_moved()`, one `git
    ls-remote`; fetch only when it moved): every `short` seconds; after failed checks 2x,
    4x, ... `short` up to `longest`; with `quiet_after=N`, also doubling after N checks
    in a row that saw nothing (back to `short` on a move or `reset()`). A plain object on
    an injected clock (no threads, no git): the daemon's SyncSchedule drives one, a wait
    without a daemon can drive its own (`due()`, check, `checked(moved)`/`failed()`)."""

    def __init__(self, short, longest, clock=time.monotonic, quiet_after=None):
        self.clock = clock
        self.short, self.longest, self.quiet_after = short, max(short, longest), quiet_after
        self.every = short
        self.next_at = clock() + short
        self.quiet = 0      # checks in a row that saw nothing
        self.failures = 0   # checks in a row that failed

    def set_intervals(self, short, longest):
        self.short, self.longest = short, max(short, longest)
        self.every = min(max(self.every, self.short), self.longest)

    def due_in(self):
        return max(0.0, self.next_at - self.clock())

    def due(self):
        return self.clock() >= self.next_at

    def reset(self):
        """The remote was just looked at, or something changed: the short interval, and
        the next check `short` from now."""
        self.every, self.quiet, self.failures = self.short, 0, 0
        self.next_at = self.clock() + self.short

    def checked(self, moved):
        self.failures = 0
        if moved:
            self.every, self.quiet = self.short, 0
        else:
            self.quiet += 1
            if self.quiet_after is not None and self.quiet >= self.quiet_after:
                self.every = min(self.longest, self.every * 2)
        self.next_at = self.clock() + self.every

    def failed(self):
        self.failures += 1
        self.next_at = self.clock() + min(self.longest,
                                          self.short * 2 ** min(self.failures, 16))


class SyncSchedule:
    """When a daemon's sync loop runs a cycle or a remote check (SPEC §8, §9), on an
    injected clock (and randomness), so the rules are tested without waiting:

    - push: PUSH_AFTER s after a burst's first local write, then in this clone's push
      slot: the clones that wrote in the last hour (SyncEngine.push_slot) take turns in
      a frame of wall-clock slots, so clones that wrote at once push one after another,
      not into each other (alone: plus up to PUSH_JITTER at random); other cycles do
      not push meanwhile; with no remote, the writes are committed at the next interval;
    - fetch: a cycle every `interval` (sync.interval): all an idle clone asks of the remote;
    - check: while the clone is active (an agent waits or watches: `listening`; or ran a
      command in the last ACTIVE_FOR s: `command()`), the cheap remote check every
      `wait_every` (sync.wait_interval), no backoff unless checks fail; a cycle when the
      tip moved; a successful cycle counts as a check;
    - after a failed cycle the next fetch comes 10 s later, doubling, at most `interval`.

    Thread-safe (every field under `cond`): any thread reports `wrote`, `command`, `poke`;
    the loop sleeps on `cond` for `due_in()`, takes `next_action()` and reports back
    (`checked`, `check_failed`, `started`, `ran`, `failed`)."""

    PUSH_AFTER = 1.0     #: seconds after the first write of a burst, then...
    PUSH_SLOT = 0.5      #: ...this clone's slot of this many seconds (fewer beyond 10
    PUSH_FRAME = 5.0     #: clones: all slots fit in PUSH_FRAME), or, alone, a random
    PUSH_JITTER = 1.0    #: part up to PUSH_JITTER (1-2 s: "about 2 s", SPEC §9)
    ACTIVE_FOR = 600.0   #: a command keeps the clone active this long (SPEC §9)
    RETRY_FIRST = 10.0   #: seconds before the first retry of a failed cycle

    def __init__(self, interval, wait_every, clock=time.monotonic, rand=None,
                 wall=time.time):
        if rand is None:
            import random
            rand = random.random
        self.clock, self.rand, self.wall = clock, rand, wall
        self.slot = (0, 1)         # (rank, n): this clone's push slot among n
        self.cond = threading.Condition()
        self.interval = interval
        self.next_fetch = clock() + interval
        self.check = RemoteCheck(wait_every, interval, clock)
        self.push_at = None        # when the writes not pushed yet go out
        self.uncommitted = False   # writes left for the next interval (no remote)
        self.last_command = None   # when an agent of this clone last ran a command
        self.failures = 0          # failed cycles in a row

    def set_intervals(self, interval, wait_every):
        """The configured intervals (re-read every round: `config set` applies at once)."""
        with self.cond:
            self.interval = interval
            self.check.set_intervals(wait_every, interval)

    def _active(self, now, listening):
        return bool(listening) or (self.last_command is not None and
                                   now - self.last_command < self.ACTIVE_FOR)

    def active(self, listening=False):
        with self.cond:
            return self._active(self.clock(), listening)

    def command(self):
        """An agent ran a command (a request served, a write noticed): active from now."""
        with self.cond:
            now = self.clock()
            if not self._active(now, False):
                self.check.reset()  # coming back: the first check a wait_interval from now
            self.last_command = now
            self.cond.notify_all()

    def poke(self):
        """A new wait (a command too), or a stop: the loop looks again now."""
        self.command()

    def set_slot(self, rank, n):
        with self.cond:
            self.slot = (rank, n)

    def wrote(self):
        """A local write: a push soon (the first write of a burst sets when)."""
        with self.cond:
            if self.push_at is None:
                self.push_at = self.clock() + self.PUSH_AFTER + self._to_slot()
            self.cond.notify_all()

    def _to_slot(self):
        """Seconds from PUSH_AFTER from now to the start of this clone's next slot."""
        rank, n = self.slot
        if n <= 1:
            return self.rand() * self.PUSH_JITTER
        slot = min(self.PUSH_SLOT, self.PUSH_FRAME / n)
        frame, w = slot * n, self.wall() + self.PUSH_AFTER
        start = (w - rank * slot) // frame * frame + rank * slot
        return start - w if start >= w else start + frame - w

    def pending(self):
        """Whether local writes wait for a cycle (a clean stop runs one for them)."""
        with self.cond:
            return self.push_at is not None or self.uncommitted

    def due_in(self, listening):
        """Seconds until the next action is due (0: now)."""
        with self.cond:
            now = self.clock()
            due = self.next_fetch
            if self.push_at is not None:
                due = min(due, self.push_at)
            if self._active(now, listening):
                due = min(due, self.check.next_at)
            return max(0.0, due - now)

    def next_action(self, listening):
        """What is due now: 'push' (a burst's debounce is over: cycle if there is a
        remote), 'commit' (the interval is up and writes wait: cycle), 'fetch' (the
        interval is up: cycle if there is a remote), 'check' (compare the remote tip,
        then `checked()` or `check_failed()`), or None."""
        with self.cond:
            now = self.clock()
            if self.push_at is not None and now >= self.push_at:
                # With nowhere to push, the writes are committed at the next interval
                # instead (no git work per write).
                self.push_at, self.uncommitted = None, True
                return "push"
            if now >= self.next_fetch:
                self.next_fetch = now + self.interval
                return "commit" if self.uncommitted else "fetch"
            if self._active(now, listening) and self.check.due():
                return "check"
            return None

    def checked(self, moved):
        with self.cond:
            self.check.checked(moved)

    def check_failed(self):
        with self.cond:
            self.check.failed()

    def started(self):
        """A cycle starts: it takes every pending write with it."""
        with self.cond:
            self.push_at, self.uncommitted = None, False

    def ran(self, pulled=False):
        """A cycle succeeded: it just looked, so the next check and fetch count from now."""
        with self.cond:
            self.failures = 0
            self.check.reset()
            self.next_fetch = self.clock() + self.interval

    def failed(self):
        """A cycle failed: try again soon, backing off up to `interval`."""
        with self.cond:
            self.failures += 1
            self.next_fetch = self.clock() + min(
                self.interval, self.RETRY_FIRST * 2 ** min(self.failures - 1, 5))


# === 10. Store, callers and the service's base ================================

_ROLE_INTENTS = {
    "implementer": "Implement features and fixes in %s",
    "coordinator": "Coordinate agents and tasks in %s",
    "reviewer": "Review changes in %s",
    "tester": "Test changes in %s",
    "pipeline": "Report CI results for %s",
}


def _check_name(name, what="agent name"):
    if not isinstance(name, str) or not name_ok(name):
        raise UsageError(
            "invalid %s %r: use 1-64 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit" % (what, name))
    if name in RESERVED_NAMES:
        raise UsageError("invalid %s %r: it is reserved (%s)"
                         % (what, name, ", ".join(sorted(RESERVED_NAMES))))
    if what == "agent name" and "--" in name and name[name.rfind("--") + 2:].isdigit():
        raise UsageError("invalid agent name %r: names ending in '--' and digits are "
                         "reserved (they name log segments)" % name)
    return name


_TMUX_SESSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z").match


def _command_argv(command, env):
    """The pane's command as an argv list (one argument with spaces in it is split the
    way a shell would, without running one); default: the user's shell. The program
    must be found on PATH, so a typo fails before anything is registered."""
    if isinstance(command, str):
        command = [command]
    command = list(command or ())
    if not all(isinstance(c, str) and c for c in command):
        raise UsageError("the command must be a list of non-empty arguments")
    if len(command) == 1 and any(ch.isspace() for ch in command[0]):
        import shlex
        try:
            command = shlex.split(command[0])
        except ValueError as e:
            raise UsageError("cannot split the command %r: %s" % (command[0], e))
    if not command:
        command = [env.get("SHELL") or "/bin/sh"]
    if _which(command[0], env) is None:
        raise UsageError("command not found: %s" % command[0],
                         hint="--command takes a program on PATH and its arguments")
    return command


def _strip_at(name):
    return name[1:] if isinstance(name, str) and name.startswith("@") else name


def _check_text(value, what, limit=1000, allow_empty=False):
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError("%s must be text" % what)
    if not allow_empty and not value.strip():
        raise UsageError("%s must not be empty" % what)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("%s is not valid UTF-8" % what)
    if len(value) > limit or "\n" in value or "\r" in value or "\x00" in value:
        raise UsageError("%s must be one line of at most %d characters" % (what, limit))
    return value


def parse_after(text):
    """A wait's start point: epoch seconds (a number), a negative duration meaning
    "ago" (`-15s`) or a UTC timestamp -> epoch seconds."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not 0 <= text < 253402300800:
            raise UsageError("invalid start point %r: must be between 1970 and 9999" % text)
        return float(text)
    if not isinstance(text, str):
        raise UsageError("invalid start point %r" % (text,))
    t = text.strip()
    try:
        secs = parse_duration(t)
    except ValueError:
        try:
            ts = parse_ts(t)
        except (ValueError, OverflowError):
            raise UsageError("invalid start point (after) %r: use a negative duration such as -15s, "
                             "or a UTC timestamp such as 2026-01-31T12:00:00Z" % text)
        if not 0 <= ts < 253402300800:
            raise UsageError("invalid start point (after) %r: a timestamp must be between 1970 and 9999"
                             % text)
        return ts
    if secs > 0 or (secs == 0 and not t.startswith("-")):
        raise UsageError("invalid start point (after) %r: a duration must be negative (-15s means "
                         "fifteen seconds ago)" % text)
    if secs < -100 * 365 * 86400:
        raise UsageError("invalid start point (after) %r: at most 100 years ago" % text)
    return time.time() + secs


def parse_horizon(text, now=None):
    """A purge's horizon (`--before`): an age (`30d`, `12h`, `2w`: that long ago), a date
    (`2026-11-01`: UTC midnight) or a UTC timestamp, never in the future -> the event
    timestamp (SPEC §17)."""
    now = time.time() if now is None else now
    t = text.strip() if isinstance(text, str) else ""
    bad = UsageError("invalid horizon (before) %r: use an age such as 30d, 12h or 2w, a "
                     "date such as 2026-11-01, or a UTC timestamp" % (text,))
    if re.match(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", t):
        try:
            secs = parse_ts(t + "T00:00:00Z" if len(t) == 10 else t)
        except (ValueError, OverflowError):
            raise bad from None
    else:
        try:
            if not t[-1:].isalpha() or not t[:1].isdigit() and t[:1] != ".":
                raise ValueError(t)  # a unit is needed, and no sign
            secs = now - parse_duration(t)
        except ValueError:
            raise bad from None
        if secs >= now:
            raise UsageError("invalid horizon (before) %r: the age must be more than 0"
                             % text)
    if secs > now:
        raise UsageError("invalid horizon (before) %r: it is in the future" % text,
                         hint="purge takes what was created before it: a past date or "
                              "an age such as 30d")
    if secs < 0:
        raise UsageError("invalid horizon (before) %r: it is before 1970" % text)
    return now_ts(secs)


def parse_since(text):
    """A search's `--since`: a duration meaning that long ago (`2h`, `7d`, also `-7d`), a
    date (`2026-11-01`, midnight UTC) or a UTC timestamp -> a timestamp in the event
    format; None for None."""
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip():
        raise UsageError("invalid --since %r: use a duration such as 7d, a date such as "
                         "2026-11-01, or a UTC timestamp" % (text,))
    t = text.strip()
    try:
        secs = abs(parse_duration(t))
        when = time.time() - secs if secs < 100 * 365 * 86400 else 0.0
    except ValueError:
        try:
            when = parse_ts(t)
        except (ValueError, OverflowError):
            raise UsageError("invalid --since %r: use a duration such as 7d, a date such as "
                             "2026-11-01, or a UTC timestamp" % text) from None
        if not 0 <= when < 253402300800:
            raise UsageError("invalid --since %r: must be between 1970 and 9999" % text)
    return now_ts(when)


def parse_timeout(text):
    """A wait's timeout: seconds (a number) or a duration (`8m`), 0 .. 24h."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        secs = float(text)
    else:
        try:
            secs = parse_duration(text if isinstance(text, str) else "")
        except ValueError as e:
            raise UsageError("invalid timeout: %s" % e)
    if not 0 <= secs <= MAX_TIMEOUT:  # also refuses nan
        raise UsageError("invalid timeout %r: must be between 0 and 24h" % (text,))
    return secs


def _target_list(targets):
    """Targets as a list of names: a string may hold a comma list; `@` is kept."""
    if targets is None:
        return []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, (list, tuple)):
        raise UsageError("targets must be a name or a list of names")
    out = []
    for t in targets:
        if not isinstance(t, str):
            raise UsageError("invalid target %r: expected a name" % (t,))
        out += [x.strip() for x in t.split(",") if x.strip()]
    return out


def parse_tag(text, what="scope"):
    """Parse `type:value` (or a {type, value} dict) for --scope/--ref."""
    if isinstance(text, dict):
        t, v = text.get("type"), text.get("value")
    else:
        if not isinstance(text, str) or ":" not in text:
            raise UsageError("invalid %s %r: expected type:value (e.g. module:auth)"
                             % (what, text))
        t, v = text.split(":", 1)
    if (not isinstance(t, str) or not isinstance(v, str) or not t or not v.strip()
            or not all(c.isalnum() or c in "_.-" for c in t)
            or any(c in v for c in "\n\r\x00") or len(v) > 500 or not _utf8_ok(v)):
        raise UsageError("invalid %s %r: expected type:value with a non-empty type "
                         "(letters, digits, _ . -) and value" % (what, text))
    return {"type": t, "value": v}


def _utf8_ok(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _tag_str(tag):
    return "%s:%s" % (tag["type"], tag["value"])


class Store:
    """One thrum store, held open: its config, event log, index and origin.

    The long-lived half of the service layer. A CLI process holds one for a single
    call; the daemon and the MCP server hold one for hours and share it between
    threads: ULIDs are minted under a lock, every thread gets its own SQLite
    connection, and `refresh()` (run at the start of every request) catches the
    index up with writes made by other processes.
    """

    def __init__(self, loc, env, overrides=None):
        if not loc.store:
            raise NotSetUpError("thrum is not initialised here (%s)" % loc.worktree,
                                hint="run 'thrum init' (or 'thrum quickstart --name N "
                                     "--role R --module M')")
        self.loc = Location(loc.store_root, loc.store, loc.git_common)
        own_path(self.loc.store, "the thrum store")
        own_path(self.loc.var, "thrum's local state", private=True)
        self.env = env
        self.config = Config(loc.store, env, overrides)
        self._overrides = overrides
        self._log = self._index = self._origin = None
        self._lock = threading.Lock()
        self.listeners = []  # see notify()
        self.pushed_by_daemon = False  # a daemon serves this store and pushes its writes
        #: A running daemon keeps {worktree: (checked_at, work context)} here.
        self.contexts = None
        #: Late arrivals (by sync) and, per agent, messages a wait has returned.
        self.arrivals = ArrivalRecord(os.path.join(self.loc.var, "arrivals.jsonl"))

    @property
    def path(self):
        return self.loc.store

    @property
    def branch(self):
        return self.config.get("sync.branch")

    @property
    def log(self):
        if self._log is None:
            self._log = EventLog(self.loc.log_dir(self.branch),
                                 os.path.join(self.loc.var, "torn"))
        return self._log

    @property
    def index(self):
        """The index (not caught up: see refresh)."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._index = Index(os.path.join(self.loc.var, "index.db"), self.log,
                                        self.arrivals, parse_duration(
                                            self.config.get("index.lock_wait")))
        return self._index

    def refresh(self):
        """See what other processes wrote: re-read a changed config file and catch
        the index up with the log (cheap when nothing changed: file stats)."""
        if self.config.changed():
            old = self.config.get("sync.branch")
            self.config = Config(self.loc.store, self.env, self._overrides)
            if self.config.get("sync.branch") != old:  # the log lives elsewhere now
                with self._lock:
                    self._log = self._index = None
        return self.index.catch_up()

    @property
    def origin(self):
        """This clone's id (`.thrum/origin`), written on first use."""
        if self._origin is None:
            with self._lock:
                path = os.path.join(self.loc.store, "origin")
                o = (_read_text(path) or "").strip()
                if not o:
                    o = new_id("o_")
                    _write_file_atomic(path, o + "\n")
                self._origin = o
        return self._origin

    def event(self, etype, **fields):
        return make_event(etype, self.origin, **fields)

    def emit(self, events):
        """Append events to the log, then project them. The only write path.

        Once the events are in the log they are stored, whatever happens next: a failure
        to project them (the index locked by another process, a full disk) is a
        StoredError, which says what was stored and never to retry (SPEC §16). The next
        command's catch-up projects them."""
        if not events:
            return
        self.log.append(events)
        try:
            self.index.catch_up()
        except (ThrumError, OSError, sqlite3.Error) as e:
            raise StoredError(events, e) from None

    def log_signature(self, subdir="messages"):
        """What the message files look like now (names, inodes, sizes, mtimes): every
        message, edit or delete, written here or merged in by a sync, changes it.
        One directory scan (a quick listing: EventLog.files), no SQL. `subdir=None`:
        every log file."""
        files = self.log.files(quick=True)
        if subdir is not None:
            files = [f for f in files if f[0].startswith(subdir + "/")]
        return [(rel, st.st_ino, st.st_size, st.st_mtime_ns) for rel, _, st in files]

    def sync_engine(self, branch=None):
        return SyncEngine(self, branch=branch)

    def drop_dead(self):
        """Remove the message and receipt files whose lines the log's purges all made
        dead (SPEC §17), and have the index forget them. Returns their relpaths."""
        dropped = drop_dead_files(self.log, log_purges(self.log))
        if dropped:
            try:
                self.index.forget_files(dropped)
            except (ThrumError, sqlite3.Error) as e:  # at worst: a rebuild, later
                _warn("the index could not forget %s: %s" % (", ".join(dropped), e))
        return dropped

    def notify(self, events):
        """Tell the listeners (callables taking a list of events: the daemon's wake-ups,
        tmux nudges) what a request wrote. A failing listener never fails the write."""
        for fn in list(self.listeners):
            try:
                fn(events)
            except Exception as e:  # noqa: BLE001 - a nudge must not break a send
                _warn("after the write: %s: %s" % (type(e).__name__, e))

    def close(self):
        """Close this thread's index connection."""
        if self._index is not None:
            self._index.close()


class StoredError(ThrumError):
    """The events are in the log (stored), but a later step of the same write failed:
    exit 1, saying what was stored, and that repeating the command would store it twice."""

    def __init__(self, events, cause):
        reason = getattr(cause, "message", None) or getattr(cause, "strerror", None) or \
            str(cause)
        for said in ("the index cannot be updated: ", "the index cannot be read: "):
            if reason.startswith(said):  # (said once, below)
                reason = reason[len(said):]
        sent = [e["message_id"] for e in events if e.get("type") == "message.create"]
        keyed = [e for e in events if e.get("idempotency_key") is not None]
        if sent:
            what = "stored as %s" % ", ".join(sent)
            again = "do not send it again"
            hint = "it shows in 'thrum sent' once the index catches up (any command does)"
            if keyed:  # (SPEC §16: the same key cannot store it twice)
                hint += ("; the same command with the same idempotency key is safe: it "
                         "stores nothing and answers %s" % keyed[0]["message_id"])
        else:
            what = "written to the log"
            again = "do not repeat the command"
            hint = "the index catches up at the next command"
        super().__init__("%s, but the index could not be updated (%s); %s" % (
            what, reason, again), hint=hint)
        self.message_ids = sent


class Caller:
    """Who is asking, as a plain value the front end builds: the directory the
    request comes from (its worktree decides which identities are "here"), the
    caller's environment (THRUM_NAME, THRUM_ROLE, THRUM_AUTOSYNC, ...) and an
    explicit agent name (`--agent`), which wins over THRUM_NAME."""

    __slots__ = ("cwd", "env", "agent")

    def __init__(self, cwd, env, agent=None):
        self.cwd = os.path.abspath(cwd)
        self.env = dict(env)
        self.agent = agent

    def to_dict(self):
        return {"cwd": self.cwd, "env": self.env, "agent": self.agent}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or not isinstance(d.get("cwd"), str) or not \
                isinstance(d.get("env", {}), dict):
            raise UsageError("a caller needs cwd (text) and env (an object)")
        return cls(d["cwd"], {str(k): str(v) for k, v in d.get("env", {}).items()},
                   d.get("agent"))

    def __repr__(self):  # pragma: no cover - debugging aid
        return "Caller(%r, agent=%r)" % (self.cwd, self.agent)


#: What an operation needs before it runs: nothing, a store, or the caller's identity
#: (checked in this order, before the arguments' meaning: SPEC §14).
NEEDS_NOTHING, NEEDS_STORE, NEEDS_IDENTITY = 0, 1, 2


class Operation:
    """The facts of one operation, declared once, with @operation on its Service method;
    the front ends (call(), the Router, the daemon, the CLI parser, the MCP tools) derive
    what they need from here.

    needs          NEEDS_NOTHING | NEEDS_STORE | NEEDS_IDENTITY, checked before it runs
    retry_safe     running it again changes nothing, so a request the daemon took but never
                   answered may simply run again in the caller's process: True, False, or
                   a function of the request's params
    local          front ends run it in their own process, never through the daemon (it
                   checks or repairs local files). An operation that needs nothing is
                   always local: without a store there is no daemon
    blocks         it waits for something (wait): front ends pass it wake-ups and a way
                   to abandon it, and through the daemon it blocks on change notifications
    starts_daemon  with daemon.autostart, the first such call that finds no daemon
                   starts one (not config_set: it may be turning autostart off)

    The parameters, and their defaults, are the method's signature: `params()` and
    `default(name)` read them, and `check()` refuses anything else."""

    __slots__ = ("name", "needs", "retry_safe", "local", "blocks", "starts_daemon", "_fn")

    def __init__(self, fn, needs, retry_safe=False, local=False, blocks=False,
                 starts_daemon=True):
        self.name, self._fn, self.needs = fn.__name__, fn, needs
        self.retry_safe, self.blocks, self.starts_daemon = retry_safe, blocks, starts_daemon
        self.local = local or needs == NEEDS_NOTHING

    def params(self):
        """{name: default} of the parameters a request may pass (a required one has the
        default `REQUIRED`). `agent` and `_private` ones are not a request's to set."""
        code = self._fn.__code__
        names = code.co_varnames[1:code.co_argcount]
        defaults = self._fn.__defaults__ or ()
        out = {}
        for i, n in enumerate(names):
            d = i - (len(names) - len(defaults))
            if not n.startswith("_") and n != "agent":
                out[n] = defaults[d] if d >= 0 else REQUIRED
        return out

    def default(self, name):
        return self.params()[name]

    def may_retry(self, params):
        safe = self.retry_safe
        return bool(safe(params) if callable(safe) else safe)

    def check(self, params):
        """Refuse, as usage errors, parameters the operation does not take (or private
        ones), missing ones, and a non-boolean where the parameter is a flag."""
        allowed = self.params()
        bad = sorted(str(k) for k in params if k not in allowed)
        if bad:
            raise UsageError("unknown parameter%s for this operation: %s (known: %s)" % (
                "s" if len(bad) > 1 else "", ", ".join(map(str, bad)),
                ", ".join(sorted(allowed)) or "none"))
        missing = [n for n, d in allowed.items() if d is REQUIRED and n not in params]
        if missing:
            raise UsageError("missing parameter%s: %s" % ("s" if len(missing) > 1 else "",
                                                          ", ".join(missing)))
        for name, default in allowed.items():
            if isinstance(default, bool) and name in params and \
                    not isinstance(params[name], bool):
                raise UsageError("%s must be true or false" % name)

    def __repr__(self):  # pragma: no cover - debugging aid
        return "Operation(%s)" % self.name


#: The default of a required parameter (Operation.params()).
REQUIRED = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


def operation(needs, **facts):
    """Declare a Service method an operation, with its facts (see Operation)."""
    def declare(fn):
        fn.operation = Operation(fn, needs, **facts)
        return fn
    return declare


class ServiceBase:
    """What every operation stands on: the request's store and caller, the one write
    path (`_emit`) and the per-call work after it (`finish`), and who "me" is (SPEC §4).

    One instance serves one request: it pairs the long-lived Store (None until `init`
    makes one) with the Caller, and resolves "me" from the caller, never from the process.
    """

    def __init__(self, store, caller):
        self.caller = caller
        self.env = caller.env
        self.loc = locate(caller.cwd)
        if store is not None and self.loc.store and \
                os.path.realpath(self.loc.store) != os.path.realpath(store.path):
            raise UsageError("%s belongs to the thrum store %s, not %s" % (
                caller.cwd, self.loc.store, store.path))
        if store is not None and not self.loc.store:
            self.loc = Location(self.loc.worktree, store.path, store.loc.git_common)
        if store is None and self.loc.store:
            store = Store(self.loc, self.env)
        self.store = store
        self._fresh = False          # the store was refreshed for this request
        self._idx = None             # ...and this is the index it caught up
        self.autosync_error = None   # set when THRUM_AUTOSYNC's sync after a write failed
        self.wrote = False           # this call appended events, or answered with a
        #                              message that may not be pushed yet (see finish())
        self.written = []            # ...these ones (the store's listeners hear of them)
        self._me = {}                # me() results of this call (cleared by identity writes)

    # -- plumbing --------------------------------------------------------------
    def require_store(self):
        if self.store is None:
            raise NotSetUpError("thrum is not initialised here (%s)" % self.loc.worktree,
                                hint="run 'thrum init' (or 'thrum quickstart --name N "
                                     "--role R --module M')")
        return self.store

    @property
    def config(self):
        return self.store.config if self.store else Config(None, self.env)

    @property
    def log(self):
        return self.require_store().log

    @property
    def branch(self):
        return self.config.get("sync.branch")

    @property
    def index(self):
        """The index, caught up with the log once per request (writes catch up again)."""
        store = self.require_store()
        if not self._fresh:
            self._fresh = True
            store.refresh()
            self._idx = store.index  # this request keeps the index it caught up
        return self._idx

    def close(self):
        if self.store is not None:
            self.store.close()

    @property
    def origin(self):
        return self.require_store().origin

    def _emit(self, events):
        """Append events to the log, then project them. The only write path."""
        if not events:
            return
        self._autosync  # a bad THRUM_AUTOSYNC is refused before anything is written
        self.index  # caught up first, so the write's own catch-up reads only it
        self.store.emit(events)
        self.wrote = True
        self.written.extend(events)

    def _emit_once(self, me, key, ev):
        """Store a message.create, unless it has an idempotency key that already names a
        message of mine (sent here, or by another clone and synced): then store nothing
        and return that message's row (Index.sent_with_key). The look and the append
        happen under one lock per agent (`var/keys/<agent>.lock`, an flock, so processes
        and the daemon's threads alike take turns), after catching up with the log: two
        sends with one key at once store one message."""
        if key is None:
            self._emit([ev])
            return None
        keys = os.path.join(self.store.loc.var, "keys")
        os.makedirs(keys, mode=0o700, exist_ok=True)
        with FileLock(_safe_name_path(keys, me, ".lock")):
            index = self.index
            index.catch_up()  # what another process stored while this one waited
            first = index.sent_with_key(me, key, now_ts(time.time() - KEY_WINDOW))
            if first is None:
                self._emit([ev])
        return first

    def finish(self):
        """The per-call work after an operation, in one place for every front end:
        with THRUM_AUTOSYNC, one sync cycle if the call wrote anything (a failure is
        kept in `autosync_error`; the write stays), then the store's listeners hear
        of the events it wrote (wake-ups, nudges)."""
        if self.wrote and self._autosync and self.loc.git_common:
            self.wrote = False
            try:
                self.sync_force()
            except ThrumError as e:
                self.autosync_error = e
        if self.written:
            events, self.written = self.written, []
            self.store.notify(events)

    def _push_now(self):
        """Sync this call's writes now when they have somewhere to go and no daemon pushes
        them. Returns (pushed: True/False, or None when there is nothing to push to or a
        daemon does it, warnings)."""
        if not self.wrote or self.store.pushed_by_daemon or not self.loc.git_common:
            return None, []
        try:
            if not self.store.sync_engine().has_remote():
                return None, []
            self.sync_force()
        except ThrumError as e:
            return False, ["not pushed: %s; run 'thrum sync force'" % e.message]
        self.wrote = False  # (THRUM_AUTOSYNC has nothing left to do)
        return True, []

    @property
    def _autosync(self):
        try:
            return _parse_bool(self.env.get("THRUM_AUTOSYNC") or "0")
        except ValueError:
            raise UsageError("THRUM_AUTOSYNC must be 1/0 or true/false")

    def _event(self, etype, **fields):
        return self.require_store().event(etype, **fields)

    # -- identity --------------------------------------------------------------
    def _identity_file(self, name, worktree=None):
        return _safe_name_path(os.path.join(worktree or self.loc.worktree, THRUM_DIR,
                                            "identities"), name, ".json")

    @staticmethod
    def _read_identity(path):
        name = os.path.basename(path)[:-5]
        hint = ("repair it with 'thrum doctor --fix', or register again: 'thrum quickstart "
                "--name %s --role ROLE --module MODULE'" % name)
        try:
            text = _read_text(path)
            if text is None:
                return None
            data = json.loads(text)
        except (ValueError, ThrumError):
            raise NotSetUpError("identity file %s is corrupt" % path, hint=hint)
        if not isinstance(data, dict) or not name_ok(data.get("agent_id", "")) or any(
                data.get(k) is not None and not isinstance(data.get(k), str) for k in (
                    "role", "module", "display", "worktree", "intent", "session_id",
                    "tmux_session", "tmux_pane", "tmux_socket", "created_at", "updated_at")):
            raise NotSetUpError("identity file %s is not a valid thrum identity" % path,
                                hint=hint)
        data["identity_file"] = path
        return data

    def _write_identity(self, ident):
        self._me.clear()
        data = {k: v for k, v in ident.items() if k != "identity_file"}
        data["updated_at"] = now_ts()
        path = ident.get("identity_file") or self._identity_file(data["agent_id"])
        _write_file_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", 0o600)
        ident["identity_file"] = path
        ident["updated_at"] = data["updated_at"]

    def identities_here(self):
        """Names with an identity file in this worktree."""
        try:
            names = os.listdir(self.loc.identities)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and name_ok(n[:-5]))

    def me(self, agent=None):
        """Resolve the calling agent's identity (SPEC §4). Never guesses."""
        if agent in self._me:
            return self._me[agent]
        self._me[agent] = ident = self._resolve_me(agent)
        self._me.setdefault(ident["agent_id"], ident)
        return ident

    def _resolve_me(self, agent):
        self.require_store()
        agent = agent or self.caller.agent
        name = _strip_at(agent) if agent else self.env.get("THRUM_NAME") or None
        here = self.identities_here()
        if name:
            if not name_ok(name) or name in RESERVED_NAMES:
                raise UsageError("invalid agent name %r%s" % (
                    name, "" if agent else " in THRUM_NAME"),
                    hint="names are 1-64 lowercase letters, digits, '_' or '-', and not "
                         "reserved")
            if name in here:
                ident = self._read_identity(self._identity_file(name))
            elif not here:
                ident = self._identity_elsewhere(name)
            else:
                ident = None
            if ident is None:
                raise NotSetUpError(
                    "%s does not name an identity in this worktree"
                    % (("agent %s" % name) if agent else "THRUM_NAME=" + name),
                    hint=("available here: %s" % ", ".join(here)) if here else
                    "register it with 'thrum quickstart --name %s --role R --module M'"
                    % name)
        elif len(here) == 1:
            ident = self._read_identity(self._identity_file(here[0]))
        elif not here:
            raise NotSetUpError("no agent identity in this worktree",
                                hint="register with 'thrum quickstart --name NAME "
                                     "--role ROLE --module MODULE'")
        else:
            raise NotSetUpError("several identities in this worktree (%s); "
                                "cannot choose" % ", ".join(here),
                                hint="set THRUM_NAME to one of: %s" % ", ".join(here))
        stale = self._identity_stale(ident)
        if stale:
            raise stale
        return ident

    def _identity_elsewhere(self, name):
        """An identity of another worktree of this store (helper processes)."""
        row = self.index.agent(name)
        if row is None:
            return None
        if row["worktree"]:
            ident = self._read_identity(self._identity_file(name, row["worktree"]))
            if ident:
                return ident
        return {"agent_id": row["agent_id"], "role": row["role"], "module": row["module"],
                "display": row["display"], "worktree": row["worktree"], "intent": None,
                "session_id": None, "identity_file": None}

    def _require_agent(self, name, what="agent"):
        """The index row of a registered agent (`@` optional), else a clear error."""
        name = _strip_at(name)
        if not name_ok(name or ""):
            raise UsageError("invalid agent name %r" % name)
        row = self.index.agent(name)
        if row is None:
            raise NotFoundError("unknown %s @%s" % (what, name),
                                hint="see registered agents with 'thrum team --all'")
        return row

    def _update_fields(self, aid, **fields):
        ev = self._event("agent.update", agent_id=aid, **fields)
        self._emit([ev])
        return ev


# === 11. Operations: setup, agents, sessions, context =========================

class AgentOps(ServiceBase):
    """Operations: set-up (init, setup), agents, sessions and saved context."""

    # -- setup -------------------------------------------------------------------
    @operation(NEEDS_NOTHING)
    def init(self, local=False, force=False):
        """Create `.thrum/`, the sync branch and its worktree. Idempotent.

        Returns {store, log_dir, git, branch, created, adopted_remote, local_only}.
        """
        loc = self.loc
        created = []
        if loc.git_common and _is_bare(loc.git_common) and \
                os.path.realpath(loc.worktree) == os.path.realpath(loc.git_common):
            raise UsageError("%s is a bare git repository (no working tree), so thrum has "
                             "no place for its store" % loc.worktree,
                             hint="run thrum in a clone or a worktree of it "
                                  "('git clone %s' or 'git worktree add')" % loc.worktree)
        if loc.store is None and loc.git_common:
            main = _main_checkout(loc.git_common)
            store_root = main if main and os.path.isdir(main) else loc.worktree
        elif loc.store is None:
            store_root = loc.worktree  # outside git: where `.thrum/` was found, or here
        else:
            store_root = loc.store_root
        store = os.path.join(store_root, THRUM_DIR)
        pending_config = None
        fresh = not os.path.exists(store)
        if not _is_store(store):
            for sub in ("identities", "context", "var"):  # (var: private, below)
                os.makedirs(os.path.join(store, sub), exist_ok=True)
            # config.toml marks a finished store, so it is written last: other agents
            # starting now run init too (and wait on the sync lock) instead of writing
            # into a half-made sync worktree.
            pending_config = _dump_toml({"sync.local_only": True} if local else {})
            created.append(store)
        elif local:
            Config(store, self.env).set("sync.local_only", "true")
        own_path(store, "the thrum store")
        os.makedirs(os.path.join(store, "var"), mode=0o700, exist_ok=True)
        own_path(os.path.join(store, "var"), "thrum's local state", private=True)
        self.loc = Location(loc.worktree, store, loc.git_common)
        self.store = Store(self.loc, self.env, {"sync.local_only": True} if local else None)
        self._fresh = False
        result = {"store": store, "git": bool(self.loc.git_common), "branch": self.branch,
                  "created": created, "adopted_remote": False,
                  "local_only": self.config.get("sync.local_only")}
        try:
            if self.loc.git_common:
                result.update(self._init_git(force))
            else:
                os.makedirs(self.log.root, exist_ok=True)
        except BaseException:
            if fresh:  # a refused init leaves nothing behind
                import shutil
                shutil.rmtree(store, ignore_errors=True)
            raise
        if pending_config is not None and not _is_store(store):
            _write_file_atomic(os.path.join(store, "config.toml"), pending_config)
        self.loc = locate(loc.worktree)
        self.store = Store(self.loc, self.env)
        self._fresh = False
        result["log_dir"] = self.log.root
        if force:
            result["rebuilt_events"] = self.rebuild_index()["events"]
        else:
            self.index  # build the index now
        return result

    def _exclude_thrum(self, common):
        path = os.path.join(common, "info", "exclude")
        text = _read_text(path, "", errors="replace")
        if any(l.strip() in (".thrum", ".thrum/", "/.thrum", "/.thrum/")
               for l in text.splitlines()):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            if text and not text.endswith("\n"):
                f.write("\n")
            f.write("# thrum's local state (messages live on the a-sync branch)\n.thrum/\n")
        return True

    def _init_git(self, force=False):
        common = self.loc.git_common
        out = {"adopted_remote": False}
        out["excluded"] = self._exclude_thrum(common)
        if force:
            self.log.repair()
        sync = self.store.sync_engine()
        out.update(sync.ensure_branch_and_worktree())
        return out

    @operation(NEEDS_NOTHING)
    def setup(self, main_repo=None):
        """In a linked worktree, write `.thrum/redirect` to the main checkout's store."""
        loc = self.loc
        if main_repo:
            target_root = os.path.abspath(main_repo)
            target = target_root if os.path.basename(target_root) == THRUM_DIR else \
                os.path.join(target_root, THRUM_DIR)
        else:
            if not loc.git_common:
                raise UsageError("not inside a git worktree: give the main checkout",
                                 hint="thrum setup --main-repo PATH")
            main = _main_checkout(loc.git_common)
            if not main:
                raise UsageError("cannot find the main checkout of this bare repository",
                                 hint="pass --main-repo PATH")
            target = os.path.join(main, THRUM_DIR)
        if not _is_store(target):
            raise NotSetUpError("%s is not an initialised thrum store" % target,
                                hint="run 'thrum init' in the main checkout first")
        here = os.path.join(loc.worktree, THRUM_DIR)
        if os.path.normpath(here) == os.path.normpath(target):
            raise UsageError("this is the main checkout; setup is for linked worktrees")
        os.makedirs(os.path.join(here, "identities"), exist_ok=True)
        _write_file_atomic(os.path.join(here, "redirect"), target + "\n")
        self.loc = locate(loc.worktree)
        self.store = Store(self.loc, self.env)
        self._fresh = False
        return {"worktree": loc.worktree, "store": target,
                "redirect": os.path.join(here, "redirect")}

    # -- agents -------------------------------------------------------------------
    def register(self, name, role, module, display=None, intent=None, force=False,
                 pid=None):
        """Register NAME in this worktree (SPEC §4). Idempotent from the same worktree.

        Returns {agent_id, status: registered|updated|unchanged, identity_file}.
        """
        name = _check_name(_strip_at(name) if name else name)
        if not role:
            raise UsageError("a role is required (or set THRUM_ROLE)",
                             hint="pass --role ROLE")
        if not module:
            raise UsageError("a module is required (or set THRUM_MODULE)",
                             hint="pass --module MODULE")
        role = _check_name(role, "role")
        module = _check_text(module, "module", 200)
        display = _check_text(display, "display name", 200)
        intent = _check_text(intent, "intent", 1000, allow_empty=True)
        if name == role:
            raise UsageError("agent name %r cannot be the same as its role" % name,
                             hint="use a distinct name, e.g. %s_1" % name)
        agents = self.index.agent_roles()
        roles = {r for a, r in agents.items() if a != name}
        groups = self.index.group_names()
        if name in roles:
            raise UsageError("agent name %r is already a role of other agents" % name,
                             hint="pick another name so @%s stays unambiguous" % name)
        if role in agents and role != name:
            raise UsageError("role %r is already the name of an agent" % role,
                             hint="pick another role")
        if name in groups:
            raise UsageError("agent name %r is already a group name" % name)
        if role in groups:
            raise UsageError("role %r is already a group name" % role)
        worktree = os.path.realpath(self.loc.worktree)
        host = os.uname().nodename
        row = self.index.agent(name)
        status = "registered"
        if row is not None:
            if row["worktree"] and os.path.realpath(row["worktree"]) != worktree and \
                    not force:
                raise RefusedError(
                    "agent name %r is already registered from %s%s" % (
                        name, row["worktree"], "" if row["hostname"] == host else
                        " on " + str(row["hostname"])),
                    hint="pick another name, or take it over with --force")
            status = "updated"
        display = display or (row["display"] if row and row["module"] == module and
                              row["role"] == role
                              else None) or "%s (%s)" % (role.capitalize(), module)
        path = self._identity_file(name)
        try:
            ident = self._read_identity(path) if os.path.exists(path) else None
        except NotSetUpError as e:  # registering again is how a damaged file is repaired
            _warn("%s; replacing it" % e.message)
            ident = None
        events = []
        if (row is None or force or (row["role"], row["module"], row["display"],
                                     row["worktree"]) != (role, module, display, worktree)):
            extra = {"takeover": True} if (
                force and row is not None and row["worktree"] and
                os.path.realpath(row["worktree"]) != worktree) else {}
            events.append(self._event("agent.register", agent_id=name, role=role,
                                      module=module, display=display, worktree=worktree,
                                      hostname=host, **extra))
        else:
            status = "unchanged"
        if intent is not None:
            events.append(self._event("agent.update", agent_id=name, intent=intent))
        now = now_ts()
        if ident is None:
            ident = {"agent_id": name, "created_at": now, "session_id": None,
                     "intent": None}
        ident.update({"agent_id": name, "role": role, "module": module, "display": display,
                      "worktree": worktree})
        if intent is not None:
            ident["intent"] = intent
        if pid:
            ident["pid"] = int(pid)
        # The identity file first: if it cannot be written, nothing reaches the log.
        existed = os.path.exists(path)
        self._write_identity(ident)
        try:
            self._emit(events)
        except StoredError:
            raise  # the registration is in the log: the identity file stays with it
        except BaseException:
            if not existed:
                os.unlink(path)
            raise
        return {"agent_id": name, "role": role, "module": module, "display": display,
                "worktree": worktree, "status": status,
                "identity_file": ident["identity_file"]}

    @operation(NEEDS_STORE)
    def agent_register(self, name=None, role=None, module=None, display=None, intent=None,
                       force=False):
        """`agent register`: register (name, role and module fall back to THRUM_NAME,
        THRUM_ROLE and THRUM_MODULE) without starting a session."""
        name = name or self.env.get("THRUM_NAME")
        if not name:
            raise UsageError("agent register needs an agent name (or THRUM_NAME)",
                             hint="thrum agent register --name NAME --role R --module M")
        return self.register(name, role or self.env.get("THRUM_ROLE"),
                             module or self.env.get("THRUM_MODULE"), display=display,
                             intent=intent, force=force)

    @operation(NEEDS_NOTHING)
    def quickstart(self, name=None, role=None, module=None, intent=None, display=None,
                   force=False):
        """init if needed, register, start a session and set the intent. The name,
        role and module fall back to THRUM_NAME, THRUM_ROLE and THRUM_MODULE."""
        name = name or self.env.get("THRUM_NAME")
        role = role or self.env.get("THRUM_ROLE")
        module = module or self.env.get("THRUM_MODULE")
        if not self.loc.store:
            self.init()
        if not name:
            raise UsageError("quickstart needs an agent name (or THRUM_NAME)",
                             hint="thrum quickstart --name NAME --role ROLE --module MODULE")
        if not role or not module:
            raise UsageError("a role and a module are required (or set THRUM_ROLE and "
                             "THRUM_MODULE)",
                             hint="thrum quickstart --name NAME --role ROLE --module MODULE")
        _check_text(intent, "intent", 1000, allow_empty=True)  # refuse before writing
        reg = self.register(name, role, module, display=display, force=force)
        ses = self.session_start(agent=reg["agent_id"])
        current = self.index.agent_fields(reg["agent_id"]).get("intent")
        if not intent and current:  # a re-run keeps the intent the agent set
            it = {"agent_id": reg["agent_id"], "session_id": ses["session_id"],
                  "intent": current, "intent_updated_at": None}
        else:
            if not intent:
                repo = os.path.basename(self.loc.store_root)
                intent = _ROLE_INTENTS.get(reg["role"], "Working in %s") % repo
            it = self.session_set_intent(intent, agent=reg["agent_id"])
        return {"register": reg, "session": ses, "intent": it}

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def whoami(self, agent=None):
        """My identity and session."""
        ident = self.me(agent)
        ses = self.index.open_session(ident["agent_id"])
        fields = self.index.agent_fields(ident["agent_id"])
        return {"agent_id": ident["agent_id"], "role": ident.get("role"),
                "module": ident.get("module"), "display": ident.get("display"),
                "worktree": ident.get("worktree"),
                "intent": fields.get("intent", ident.get("intent")),
                "task": fields.get("task"), "branch": fields.get("branch"),
                "session_id": ses["session_id"] if ses else None,
                "session_started_at": ses["started_at"] if ses else None,
                "pid": ses["pid"] if ses else None,
                "tmux_session": ident.get("tmux_session"),
                "tmux_pane": ident.get("tmux_pane"), "tmux_socket": ident.get("tmux_socket"),
                "identity_file": ident.get("identity_file")}

    @operation(NEEDS_STORE)
    def agent_delete(self, name, force=False, agent=None):
        """Delete an agent (needs force). Removes its identity file when local."""
        self.require_store()
        row = self._require_agent(name)
        aid = row["agent_id"]
        if not force:
            raise RefusedError("deleting agent @%s must be forced (it cannot be undone)"
                               % aid, hint="thrum agent delete %s --force" % aid)
        by = None
        try:
            by = self.me(agent)["agent_id"]
        except ThrumError:
            pass
        self._emit([self._event("agent.delete", agent_id=aid, by=by or aid)])
        self._me.clear()
        removed = None
        if row["worktree"] and (row["hostname"] in (None, os.uname().nodename)):
            path = self._identity_file(aid, row["worktree"])
            try:
                os.unlink(path)
                removed = path
            except FileNotFoundError:
                pass
        return {"agent_id": aid, "deleted": True, "identity_file_removed": removed}

    @operation(NEEDS_STORE)
    def agent_cleanup(self, dry_run=False, force=False, agent=None):
        """Find agents whose worktree is gone (on this host) or silent too long."""
        if dry_run and force:
            raise UsageError("a dry run and a forced cleanup cannot be asked for together",
                             hint="use --dry-run or --force, not both")
        stale = self.config.get("agents.stale_after")
        cutoff = now_ts(time.time() - parse_duration(stale))
        host = os.uname().nodename
        orphans = []
        for m in self._members(all_agents=True):
            reasons = []
            if m["hostname"] == host and m["worktree"] and not os.path.isdir(m["worktree"]):
                reasons.append("worktree missing")
            if (m["last_seen_at"] or "") < cutoff:
                reasons.append("silent since %s" % (m["last_seen_at"] or "registration"))
            if reasons:
                orphans.append({"agent_id": m["agent_id"], "role": m["role"],
                                "worktree": m["worktree"], "last_seen_at": m["last_seen_at"],
                                "reasons": reasons})
        deleted = []
        if force and orphans:
            for o in orphans:
                self.agent_delete(o["agent_id"], force=True, agent=agent)
                deleted.append(o["agent_id"])
        return {"orphans": orphans, "deleted": deleted, "dry_run": not force,
                "stale_after": stale}

    # -- sessions & work context -----------------------------------------------
    @operation(NEEDS_IDENTITY)
    def session_start(self, pid=None, agent=None):
        """Start a session, ending any open one (reason `superseded`)."""
        ident = self.me(agent)
        aid = ident["agent_id"]
        events = [self._event("agent.session.end", agent_id=aid, session_id=sid,
                              reason="superseded")
                  for sid in self.index.open_session_ids(aid)]
        sid = new_id("ses_")
        fields = {"pid": int(pid)} if pid else {}
        start = self._event("agent.session.start", agent_id=aid, session_id=sid, **fields)
        events.append(start)
        branch = head_branch(ident.get("worktree") or self.loc.worktree)
        if branch:
            events.append(self._event("agent.update", agent_id=aid, branch=branch))
        self._emit(events)
        ident["session_id"] = sid
        if pid:
            ident["pid"] = int(pid)
        if ident.get("identity_file"):
            self._write_identity(ident)
        return {"session_id": sid, "agent_id": aid, "started_at": start["timestamp"],
                "branch": branch, "ended": [e["session_id"] for e in events
                                            if e["type"] == "agent.session.end"]}

    @operation(NEEDS_IDENTITY)
    def session_end(self, reason="normal", session_id=None, agent=None):
        """End my session and, with a remote, push that at once: other clones stop
        showing the agent active (a daemon pushes it within seconds instead). A push
        that fails leaves a warning (`pushed` false), never an error: the end is stored."""
        res = self._end_session(reason, session_id, agent)
        res["pushed"], res["warnings"] = self._push_now()
        return res

    def _end_session(self, reason="normal", session_id=None, agent=None):
        ident = self.me(agent)
        aid = ident["agent_id"]
        current = self.index.open_session(aid)
        if session_id:
            row = self.index.open_session(aid, session_id)
            if row is None:
                raise NotFoundError(
                    "%s is not an open session of @%s" % (session_id, aid),
                    hint=("the open session is %s" % current["session_id"]) if current else
                    "@%s has no open session" % aid)
        else:
            row = current
        if row is None:
            raise NotFoundError("no open session to end for @%s" % aid,
                                hint="start one with 'thrum session start'")
        reason = _check_text(reason or "normal", "reason", 200)
        sid, started = row["session_id"], row["started_at"]
        ev = self._event("agent.session.end", agent_id=aid, session_id=sid, reason=reason)
        self._emit([ev])
        if ident.get("session_id") == sid and ident.get("identity_file"):
            ident["session_id"] = None
            self._write_identity(ident)
        dur = parse_ts(ev["timestamp"]) - parse_ts(started) if started else None
        return {"session_id": sid, "agent_id": aid, "ended_at": ev["timestamp"],
                "duration_ms": int(dur * 1000) if dur is not None else None,
                "reason": reason}

    @operation(NEEDS_STORE, retry_safe=True)
    def session_list(self, agent_filter=None, active=False, agent=None):
        if agent_filter:
            aid = self._require_agent(agent_filter)["agent_id"]
        else:
            aid = self.me(agent)["agent_id"]
        return {"sessions": [dict(r, status="ended" if r["ended_at"] else "active")
                             for r in self.index.sessions(aid, active)]}

    @operation(NEEDS_IDENTITY)
    def session_set_intent(self, text, agent=None):
        ident = self.me(agent)
        text = _check_text(text, "intent", 1000, allow_empty=True)
        ev = self._update_fields(ident["agent_id"], intent=text)
        if ident.get("identity_file"):
            ident["intent"] = text
            self._write_identity(ident)
        ses = self.index.open_session(ident["agent_id"])
        return {"agent_id": ident["agent_id"], "session_id": ses["session_id"] if ses else None,
                "intent": text, "intent_updated_at": ev["timestamp"]}

    @operation(NEEDS_IDENTITY)
    def session_set_task(self, text, agent=None):
        ident = self.me(agent)
        text = _check_text(text, "task", 1000, allow_empty=True)
        ev = self._update_fields(ident["agent_id"], task=text)
        ses = self.index.open_session(ident["agent_id"])
        return {"agent_id": ident["agent_id"], "session_id": ses["session_id"] if ses else None,
                "task": text, "task_updated_at": ev["timestamp"]}

    @operation(NEEDS_IDENTITY)
    def session_heartbeat(self, agent=None):
        """Record liveness and my worktree's git state (branch, changed files)."""
        ident = self.me(agent)
        ses = self.index.open_session(ident["agent_id"])
        if ses is None:
            raise NotFoundError("no open session for @%s" % ident["agent_id"],
                                hint="start one with 'thrum session start'")
        wc = work_context(ident.get("worktree") or self.loc.worktree, self.store.env)
        ev = self._update_fields(ident["agent_id"], branch=wc.get("branch"),
                                 files=wc.get("files", []))
        return {"agent_id": ident["agent_id"], "session_id": ses["session_id"],
                "last_seen_at": ev["timestamp"], "branch": wc.get("branch"),
                "files": wc.get("files", [])}

    # -- context -------------------------------------------------------------------
    def _context_path(self, name):
        return _safe_name_path(os.path.join(self.require_store().path, "context"), name, ".md")

    def _context_agent(self, agent_filter, agent):
        if agent_filter:
            return self._require_agent(agent_filter)["agent_id"]
        return self.me(agent)["agent_id"]

    @operation(NEEDS_STORE)
    def context_save(self, content=None, agent_filter=None, allow_empty=False, agent=None):
        """Save my (or another agent's) context notes. An empty save would wipe the
        notes, so it is refused unless allow_empty."""
        name = self._context_agent(agent_filter, agent)
        if content is None:
            raise MissingBodyError("no context to save", hint="pipe it in or pass --file F")
        if not isinstance(content, str):
            raise UsageError("context must be text")
        if not content.strip() and not allow_empty:
            raise UsageError("refusing to save empty context (it would replace the saved "
                             "notes)", hint="to clear them use 'thrum context clear'; to "
                             "save an empty file, add --allow-empty")
        path = self._context_path(name)
        _write_file_atomic(path, content, 0o600)
        return {"agent_id": name, "path": path, "bytes": len(content.encode("utf-8"))}

    @operation(NEEDS_STORE, retry_safe=True)
    def context_show(self, agent_filter=None, agent=None):
        name = self._context_agent(agent_filter, agent)
        path = self._context_path(name)
        text = _read_text(path)
        source = "local"
        if text is None:  # published from another machine with `context sync`
            published = self.index.agent_field(name, "context")
            if published and published[0] is not None:
                text, source = published[0], "synced"
                updated = published[1]
        if text is None:
            source, updated = None, None
        elif source == "local":
            updated = now_ts(os.stat(path).st_mtime)
        return {"agent_id": name, "path": path if source == "local" else None,
                "content": text, "source": source,
                "bytes": len(text.encode("utf-8")) if text is not None else 0,
                "updated_at": updated}

    @operation(NEEDS_STORE)
    def context_clear(self, agent_filter=None, agent=None):
        name = self._context_agent(agent_filter, agent)
        path = self._context_path(name)
        try:
            os.unlink(path)
            existed = True
        except FileNotFoundError:
            existed = False
        published = self.index.agent_field(name, "context")
        unpublished = bool(published and published[0] is not None)
        if unpublished:  # a copy published with `context sync` is withdrawn too
            self._update_fields(name, context=None)
        return {"agent_id": name, "cleared": existed or unpublished,
                "unpublished": unpublished}


# === 12. Operations: messages and waiting =====================================

def check_idempotency_key(key):
    """An idempotency key (SPEC §16): 1-128 printable ASCII characters, space included;
    None when not given. Anything else is a usage error."""
    if key is None:
        return None
    if not isinstance(key, str):
        raise UsageError("invalid idempotency key: it must be text")
    rule = "use 1-128 printable ASCII characters (space included)"
    if not key:
        raise UsageError("invalid idempotency key: it is empty; " + rule)
    if len(key) > 128:
        raise UsageError("invalid idempotency key: it is %d characters long; %s"
                         % (len(key), rule))
    for i, c in enumerate(key):
        if not " " <= c <= "~":
            raise UsageError("invalid idempotency key: character %d (U+%04X) is not "
                             "printable ASCII; %s" % (i + 1, ord(c), rule))
    return key


def _keyed(params):
    """A send or reply with an idempotency key is safe to run again: the second run
    stores nothing and answers the first message (SPEC §16)."""
    return params.get("idempotency_key") is not None


def _already_sent(row, ev, key):
    """The result of a send whose key named an earlier message: that message, with
    `duplicate` true, and a warning where this attempt asked for something else."""
    mid = row["message_id"]
    res = {"message_id": mid, "thread_id": row["thread_id"], "reply_to": row["reply_to"],
           "created_at": row["created_at"],
           "recipients": json.loads(row["recipients"]),
           "audiences": json.loads(row["audiences"]), "warnings": [],
           "duplicate": True, "idempotency_key": key}
    body = ev["body"]
    differs = [what for what, same in (
        ("body", body["content"] == row["content0"] and body["format"] == row["format0"]
         and body.get("structured") == (json.loads(row["structured0"])
                                        if row["structured0"] else None)),
        ("recipients", sorted(ev["recipients"]) == sorted(res["recipients"])),
        ("reply_to", ev.get("reply_to") == row["reply_to"])) if not same]
    if differs:
        res["warnings"].append(
            "this attempt's %s differ%s from %s, which was sent with the same "
            "idempotency key; nothing was stored, %s stands" % (
                " and ".join([", ".join(differs[:-1]), differs[-1]] if differs[1:]
                             else differs), "s" if len(differs) == 1 else "", mid, mid))
    if row["deleted"]:
        res["warnings"].append("%s, sent with this idempotency key, was deleted since"
                               % mid)
    return res


def _marks_nothing(params):
    """An inbox that marks nothing read (unread only, or marks left to the front end) is
    safe to run again; one that marked rows read would show them read the second time."""
    return bool(params.get("defer_marks") or params.get("unread"))


class RemoteWatch:
    """A blocked wait's own look at the remote when no daemon serves the store (SPEC §7
    "Across clones with no daemon"): at once, then every sync.wait_interval, a cheap tip
    check (`git ls-remote`); only when the tip moved, one sync cycle, whose merge changes
    the log files the wait is watching. After QUIET_CHECKS unchanged checks the gap
    doubles, up to sync.interval. It runs on its own thread, so a remote that is slow,
    failing or hanging never stretches or breaks the wait: it says so once on stderr."""

    QUIET_CHECKS = 6

    def __init__(self, store):
        self.store = store
        self._stop = threading.Event()
        self._thread = None
        self._warned = False

    @classmethod
    def wanted(cls, store):
        """Whether a wait on `store` should look at the remote itself: in git, not in
        the daemon, and with no daemon running (it checks while agents wait)."""
        if store.pushed_by_daemon or not store.loc.git_common or \
                _parse_bool(str(store.config.get("sync.local_only"))):
            return False
        return not DaemonFiles(store.loc.var, store.env).running()

    def start(self):
        self._thread = start_thread("wait-remote", self._loop)
        return self

    def stop(self):
        self._stop.set()

    def _loop(self):
        try:
            eng = self.store.sync_engine()
            if not eng.has_remote():
                return
            cfg = self.store.config
            check = RemoteCheck(parse_duration(cfg.get("sync.wait_interval")),
                                parse_duration(cfg.get("sync.interval")),
                                quiet_after=self.QUIET_CHECKS)
        except (ThrumError, OSError) as e:
            return self._warn(getattr(e, "message", None) or str(e))
        gap = 0.0  # the first look at once
        while not self._stop.wait(gap):
            try:
                moved = eng.remote_moved()
                if moved and not self._stop.is_set():
                    eng.cycle()
                check.checked(moved)
            except (ThrumError, OSError) as e:
                self._warn(getattr(e, "message", None) or str(e))
                check.failed()
            gap = check.due_in()

    def _warn(self, text):
        if not self._warned and not self._stop.is_set():
            self._warned = True
            _warn("while waiting, the remote could not be checked (%s); messages from "
                  "other clones arrive after the next sync" % text)


class MessageOps(ServiceBase):
    """Operations: addressing, sending, reading, waiting, and the hooks' news."""

    # -- addressing ------------------------------------------------------------------
    def _group_members(self, name, agents=None):
        """Agent names of a group (agents and role members), now."""
        if agents is None:
            agents = self.index.agent_roles()
        out = set()
        for m in self.index.group_members(name):
            if m["member_type"] == "agent" and m["member"] in agents:
                out.add(m["member"])
            elif m["member_type"] == "role":
                out.update(a for a, r in agents.items() if r == m["member"])
        return out

    def resolve_targets(self, targets, me):
        """Targets -> (recipients, audiences, unknown). SPEC §5."""
        agents = self.index.agent_roles()
        roles = set(agents.values())
        groups = self.index.group_names()
        recipients, audiences, unknown = [], [], []

        def add(names):
            for n in sorted(names):
                if n not in recipients:
                    recipients.append(n)
        for raw in targets:
            t = _strip_at(raw.strip()) if isinstance(raw, str) else raw
            if not isinstance(t, str) or not t:
                unknown.append(str(raw))
                continue
            if t == "everyone":
                aud = {"type": "everyone", "value": "everyone"}
                add(a for a in agents if a != me)
            elif t in agents:
                aud = {"type": "agent", "value": t}
                add([t])
            elif t in groups:
                aud = {"type": "group", "value": t}
                add(self._group_members(t, agents) - {me})
            elif t in roles:
                aud = {"type": "role", "value": t}
                add(a for a, r in agents.items() if r == t and a != me)
            else:
                unknown.append("@" + t)
                continue
            if aud not in audiences:
                audiences.append(aud)
        return recipients, audiences, unknown

    def _check_body(self, content, fmt="markdown", structured=None):
        if content is None:
            raise MissingBodyError("no message body",
                                   hint="give the text as an argument, '-' or --stdin for "
                                        "standard input, or --body-file PATH")
        if not isinstance(content, str):
            raise UsageError("message body must be text")
        if not content.strip():
            raise UsageError("empty message body",
                             hint="pass the text as an argument, with --stdin or --body-file")
        limit = self.config.get("messages.max_body_bytes")
        try:
            size = len(content.encode("utf-8"))
        except UnicodeEncodeError:
            raise UsageError("message body is not valid UTF-8")
        if size > limit:
            raise UsageError("message body is %d bytes, over the limit of %d bytes"
                             % (size, limit),
                             hint="shorten it, or raise messages.max_body_bytes")
        if fmt not in BODY_FORMATS:
            raise UsageError("invalid format %r (must be markdown, plain or json)" % fmt)
        if structured is not None:
            if isinstance(structured, str):
                try:
                    structured = json.loads(structured, parse_constant=_no_constant)
                except (ValueError, RecursionError) as e:
                    raise UsageError("invalid structured data: not JSON (%s)"
                                     % str(e)[:100])
            if not isinstance(structured, dict):
                raise UsageError("invalid structured data: must be a JSON object")
            check_json_value(structured, "structured data")
        body = {"format": fmt, "content": content}
        if structured is not None:
            body["structured"] = structured
        return body

    @operation(NEEDS_IDENTITY, retry_safe=_keyed)
    def send(self, content=None, to=(), mentions=(), broadcast=False, scopes=(), refs=(),
             fmt="markdown", structured=None, reply_to=None, idempotency_key=None,
             agent=None, _reply=None):
        """Send a message to targets (`to`, `mentions`: names, roles, groups or
        `everyone`; a list, or text with commas). `reply_to`: a message id; the new
        message joins its thread (unlike `reply`, the targets are the ones given).
        `idempotency_key`: a second send (or reply) of mine with the same key within
        24 h stores nothing and answers the first message, with `duplicate` true.
        Returns {message_id, thread_id, created_at, recipients, audiences, warnings,
        duplicate}. Stores nothing on any error."""
        ident = self.me(agent)
        me = ident["agent_id"]
        key = check_idempotency_key(idempotency_key)
        parent = None
        if reply_to is not None and _reply is None:
            parent = self.resolve_message_id(reply_to)
        targets = _target_list(to)
        if broadcast:
            targets.append("everyone")
        mention_list = [_strip_at(m) for m in _target_list(mentions)]
        if not targets and not mention_list and _reply is None:
            raise UsageError("missing recipient",
                             hint="add --to @agent (or a role, group, everyone), "
                                  "--mention @x, or --broadcast")
        body = self._check_body(content, fmt, structured)
        scopes = [parse_tag(s, "scope") for s in scopes or ()]
        refs = [parse_tag(r, "ref") for r in refs or ()]
        warnings = []
        if _reply is not None:
            recipients, audiences, reply_to, thread_id = _reply
        else:
            recipients, audiences, unknown = self.resolve_targets(targets + mention_list, me)
            if unknown:
                raise UsageError("unknown recipient%s: %s" % (
                    "s" if len(unknown) > 1 else "", ", ".join(unknown)),
                    hint=self._unknown_hint())
            reply_to = thread_id = None
            if parent is not None:
                reply_to, thread_id = parent, self._thread_of(parent)
            for m in mention_list:
                ref = {"type": "mention", "value": m}
                if ref not in refs:
                    refs.append(ref)
        if not recipients:
            warnings.append("no agent received this message (the targets have no other "
                            "members)")
        ses = self.index.open_session(me)
        fields = dict(message_id=new_id("msg_"), agent_id=me,
                      session_id=ses["session_id"] if ses else None, body=body,
                      recipients=recipients, audiences=audiences)
        if scopes:  # (empty lists are left out: every reader takes absent as [])
            fields["scopes"] = scopes
        if refs:
            fields["refs"] = refs
        if reply_to:
            fields["reply_to"] = reply_to
            fields["thread_id"] = thread_id
        if key is not None:
            fields["idempotency_key"] = key
        ev = self._event("message.create", **fields)
        first = self._emit_once(me, key, ev)
        if first is not None:
            # A retry finishes what the first attempt may not have: with THRUM_AUTOSYNC
            # (a CI job whose push failed, then retried), it syncs as a write would.
            self.wrote = True
            return _already_sent(first, ev, key)
        if parent is not None:
            self._mark_read(me, [parent])
        res = {"message_id": ev["message_id"], "thread_id": ev.get("thread_id"),
               "reply_to": ev.get("reply_to"), "created_at": ev["timestamp"],
               "recipients": recipients, "audiences": audiences, "warnings": warnings,
               "duplicate": False}
        if key is not None:
            res["idempotency_key"] = key
        return res

    @operation(NEEDS_IDENTITY, retry_safe=_keyed)
    def reply(self, message_id, content=None, fmt="markdown", structured=None, scopes=(),
              refs=(), idempotency_key=None, agent=None):
        """Reply to a message: its author and recipients except me; joins its thread.
        `idempotency_key`: as for send (one key space for my sends and replies); a
        duplicate stores nothing, not even the parent's read mark."""
        ident = self.me(agent)
        me = ident["agent_id"]
        check_idempotency_key(idempotency_key)
        mid = self.resolve_message_id(message_id)
        parent = self.index.message(mid)
        agents = self.index.agent_roles()
        recips = []
        for n in [parent["agent_id"]] + json.loads(parent["recipients"]):
            if n != me and n in agents and n not in recips:
                recips.append(n)
        if not recips:
            raise UsageError("nobody to reply to: the author and recipients of %s are you "
                             "or no longer registered" % mid,
                             hint="send a new message with 'thrum send TEXT --to @agent'")
        thread = self._thread_of(mid, parent["thread_id"])
        res = self.send(content, fmt=fmt, structured=structured, scopes=scopes, refs=refs,
                        idempotency_key=idempotency_key, agent=me,
                        _reply=(recips, [{"type": "agent", "value": n} for n in recips],
                                mid, thread))
        if not res["duplicate"]:
            self._mark_read(me, [mid])
        return res

    def _thread_of(self, mid, known=None):
        """The thread a reply to `mid` joins: its thread, else a new one (the index then
        gives the parent that thread too)."""
        if known is None:
            row = self.index.message(mid)
            known = row["thread_id"] if row else None
        return known or new_id("thr_")

    # -- reading -----------------------------------------------------------------------
    def _unknown_hint(self):
        """Where a recipient may be hiding: another clone this one has not synced with
        since it registered, or a typo (the registered names say)."""
        hint = ("see registered agents, roles and groups with 'thrum team --all' and "
                "'thrum group list'")
        try:
            synced = self.loc.git_common and self.store.sync_engine().has_remote()
        except ThrumError:
            synced = False
        if synced:
            return ("agents registered in another clone are known here after a sync: run "
                    "'thrum sync force' and send again; or " + hint)
        return hint

    def resolve_message_id(self, text):
        """Full id or unique prefix (>= 8 ULID chars, `msg_` optional). SPEC §14. A
        hidden duplicate (SPEC §16) stands for the message it duplicates: replying to,
        editing, deleting or reading it acts on the message everyone sees."""
        mid = self._match_message_id(text)
        return self.index.duplicate_of(mid) or mid

    def _match_message_id(self, text):
        """The one message id that `text` names (resolve_message_id without duplicates)."""
        if not isinstance(text, str) or not text.strip():
            raise UsageError("missing message id")
        s = text.strip()
        if s[:4].lower() == "msg_":
            s = s[4:]
        s = s.upper()
        if not s or not set(s) <= _ULID_CHARS or len(s) > 26:
            raise UsageError("invalid message id %r" % text)
        if len(s) < 8:
            raise UsageError("message id prefix %r is too short: give at least 8 "
                             "characters after msg_" % text)
        ids = self.index.message_ids("msg_" + s, 6)
        if not ids:
            raise NotFoundError("message not found: %s" % text,
                                hint="see message ids with 'thrum inbox --all'")
        if len(ids) > 1:
            raise UsageError("message id prefix %r is ambiguous: matches %s%s" % (
                text, ", ".join(ids[:5]), ", ..." if len(ids) > 5 else ""),
                hint="give more characters")
        return ids[0]

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def mark_read(self, message_ids, agent=None):
        """Mark these exact message ids read for me (those addressed to me and unread).
        Returns the number marked."""
        if isinstance(message_ids, str):
            message_ids = [message_ids]
        if not isinstance(message_ids, (list, tuple)) or not all(
                isinstance(m, str) for m in message_ids):
            raise UsageError("message ids must be a list of ids")
        return self._mark_read(self.me(agent)["agent_id"], list(message_ids))

    def _mark_read(self, me, mids):
        """Write receipts for the given messages addressed to me and still unread."""
        if not mids:
            return 0
        todo = self.index.unread_among(me, mids)
        if todo:
            self._emit([self._event("message.receipt", message_id=m, agent_id=me)
                        for m in todo])
        return len(todo)

    @operation(NEEDS_IDENTITY, retry_safe=_marks_nothing)
    def inbox(self, unread=False, mentions=False, scope=None, ref=None, sender=None,
              thread=None, all=False, limit=10, page=1, oldest=False, mark_read=None,
              defer_marks=False, agent=None):
        """Messages to me, newest first (SPEC §6, §14). Marks the rows it returns
        that are addressed to me read, unless `unread` (mark_read=True/False
        overrides). `unread` in the result is the count before marking. With
        defer_marks the receipts are not written: the result's `pending_marks`
        lists them, for a front end that marks after it has delivered the rows."""
        ident = self.me(agent)
        me, role = ident["agent_id"], ident.get("role")
        limit, page = self._paging(limit, page)
        tags = [(kind, parse_tag(text, kind)) for kind, text in (("scope", scope),
                                                                  ("ref", ref)) if text]
        sender = self._require_agent(sender)["agent_id"] if sender else None
        thread = self._resolve_thread(thread) if thread else None
        got = self.index.inbox(me, role, unread=unread, mentions=mentions, tags=tags,
                               sender=sender, thread=thread, all=all, limit=limit,
                               offset=(page - 1) * limit, oldest=oldest)
        msgs = [m for m, _ in got["rows"]]
        if mark_read is None:
            mark_read = not unread
        marks = [m["message_id"] for m, addressed in got["rows"]
                 if addressed and not m["is_read"]] if mark_read else []
        total = got["total"]
        res = {"messages": msgs, "total": total, "unread": got["unread"], "page": page,
               "page_size": limit, "total_pages": max(1, -(-total // limit)),
               "agent_id": me}
        if defer_marks:
            res["pending_marks"] = marks
        else:
            self._mark_read(me, marks)
        return res

    @staticmethod
    def _paging(limit, page):
        try:
            limit, page = int(limit), int(page)
        except (TypeError, ValueError):
            raise UsageError("limit and page must be whole numbers")
        if limit < 1 or limit > 1000:
            raise UsageError("limit must be between 1 and 1000")
        if page < 1 or page > 10 ** 9:
            raise UsageError("page must be between 1 and 1000000000")
        return limit, page

    def _resolve_thread(self, text):
        t = text.strip()
        if t.startswith("thr_"):
            if not self.index.thread_exists(t):
                raise NotFoundError("thread not found: %s" % t)
            return t
        mid = self.resolve_message_id(t)
        return self.index.message(mid)["thread_id"] or mid

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def sent(self, to=None, unread=False, limit=10, page=1, agent=None):
        """What I sent, newest first, with per-recipient read state."""
        ident = self.me(agent)
        me = ident["agent_id"]
        limit, page = self._paging(limit, page)
        t = self._recipient_filter(to)
        got = self.index.sent(me, to=t, unread=unread, limit=limit, offset=(page - 1) * limit)
        for m in got["messages"]:
            m["receipts"] = self._receipts(m)
            m["read_count"] = sum(1 for x in m["receipts"] if x["read_at"])
        total = got["total"]
        return {"messages": got["messages"], "total": total, "page": page,
                "page_size": limit, "total_pages": max(1, -(-total // limit))}

    def _recipient_filter(self, to):
        """A `--to` filter (`sent`, `search`): an agent, role or group name (`@` optional)
        or `everyone`; None without one."""
        if not to:
            return None
        t = _strip_at(to)
        if t != "everyone":
            if not name_ok(t or ""):
                raise UsageError("invalid recipient filter %r" % to)
            agents = self.index.agent_roles()
            if t not in agents and t not in set(agents.values()) and \
                    t not in self.index.group_names():
                raise NotFoundError("unknown agent, role or group @%s" % t,
                                    hint="see 'thrum team --all' and 'thrum group list'")
        return t

    def _receipts(self, m):
        got = self.index.receipts(m["message_id"])
        return [{"agent_id": a, "read_at": got.get(a)} for a in m["recipients"]]

    @operation(NEEDS_STORE, retry_safe=True)
    def message_get(self, message_id, agent=None):
        """One message with its edits and receipts; marks it read for me."""
        self.require_store()
        asked = self._match_message_id(message_id)
        mid = self.index.duplicate_of(asked) or asked
        me = None
        try:
            me = self.me(agent)["agent_id"]
        except NotSetUpError:
            pass
        row = self.index.message(mid)
        d = self.index.delivery(mid, me) if me else None
        m = self.index.short_ids([message_dict(row, d is None or d["read_at"] is not None)])[0]
        m["edits"] = [dict(r) for r in self.index.edits(mid, m["agent_id"])]
        m["receipts"] = self._receipts(m)
        m["deleted_at"], m["delete_reason"] = row["deleted_at"], row["delete_reason"]
        key = m["idempotency_key"] = row["idempotency_key"]
        m["duplicates"] = self.index.duplicates(mid, m["agent_id"], key) if key else []
        if me and not m["deleted"]:
            self._mark_read(me, [mid])
        res = {"message": m}
        if asked != mid:  # a hidden duplicate: it stands for the message shown
            res["requested_id"] = asked
        return res

    def _own_message(self, message_id, me, verb):
        mid = self.resolve_message_id(message_id)
        row = self.index.message(mid)
        author = row["agent_id"]
        if author != me:
            raise RefusedError("only the author can %s %s (author: @%s, you: @%s)"
                               % (verb, mid, author, me),
                               hint="ask @%s, or reply to it instead" % author)
        if row["deleted"]:
            raise RefusedError("cannot %s %s: it was deleted" % (verb, mid))
        return mid, row

    @operation(NEEDS_IDENTITY)
    def message_edit(self, message_id, content=None, fmt=None, structured=None, agent=None):
        """Replace a message's body (author only). Returns {message_id, updated_at, version}."""
        me = self.me(agent)["agent_id"]
        mid, old = self._own_message(message_id, me, "edit")
        if structured is None:  # an edit replaces the text; structured data stays
            structured = json.loads(old["structured"]) if old["structured"] else None
        body = self._check_body(content, fmt or old["format"], structured)
        ev = self._event("message.edit", message_id=mid, agent_id=me, body=body)
        self._emit([ev])
        version = self.index.message(mid)["version"]
        return {"message_id": mid, "updated_at": ev["timestamp"], "version": version}

    @operation(NEEDS_IDENTITY)
    def message_delete(self, message_id, force=False, reason=None, agent=None):
        """Soft-delete my message (needs force)."""
        me = self.me(agent)["agent_id"]
        mid, _ = self._own_message(message_id, me, "delete")
        if not force:
            raise RefusedError("deleting %s must be forced" % mid,
                               hint="thrum message delete %s --force" % mid)
        fields = {"reason": _check_text(reason, "reason", 500)} if reason else {}
        ev = self._event("message.delete", message_id=mid, agent_id=me, **fields)
        self._emit([ev])
        return {"message_id": mid, "deleted_at": ev["timestamp"]}

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def message_read(self, message_ids=(), all=False, agent=None):
        """Mark messages (or all my unread) read. Returns {marked_count}."""
        me = self.me(agent)["agent_id"]
        if isinstance(message_ids, str):
            message_ids = [message_ids]
        if not isinstance(message_ids, (list, tuple)) or any(
                not isinstance(m, str) for m in message_ids):  # (`all` is a parameter)
            raise UsageError("message ids must be a list of ids")
        if not message_ids and not all:
            raise UsageError("give message ids, or all", hint="thrum message read ID... | --all")
        if all:
            mids = self.index.unread_ids(me)
        else:
            mids = [self.resolve_message_id(m) for m in message_ids]
        return {"marked_count": self._mark_read(me, mids), "message_ids": mids}

    # -- waiting -------------------------------------------------------------------
    def _delivered(self, me, record="delivered"):
        """The delivered-once record of agent `me`: messages its waits have returned
        (`record="pushed"`: those the MCP channel pushed)."""
        return _delivered_record(self.loc.var, me, record)

    #: How far a lookback wait reaches at most (SPEC §7), and the overlap it keeps
    #: before the end of the previous wait (a writer stamps a message's arrival when it
    #: appends, and may project it a moment after a wait looked).
    LOOKBACK_MAX = 86400.0
    LOOKBACK_OVERLAP = 2.0

    @operation(NEEDS_IDENTITY, retry_safe=True, blocks=True)
    def wait(self, timeout="30s", after=None, unread=False, scope=None, skip_read=False,
             lookback=None, agent=None, _poll=0.05, _wake=None, _alive=None,
             _record="delivered", _hold=False):
        """Block until a message to me (not by me) is new to this store: arrived here
        after the start point, and not returned by an earlier wait of mine (SPEC §7).
        `timeout`: seconds or a duration; `after`: epoch seconds, a negative duration
        ("-15s") or a UTC timestamp (default: one second ago).

        Gap-proof: with `after` (or `lookback` true; `lookback` false: never, as for a
        start point a front end filled in), the wait also reaches back to the end of my previous
        wait (the last one that handed messages over or timed out; a cancelled or
        killed one leaves that point where it was), at most LOOKBACK_MAX, for the
        messages I have not read. Returns {status: received|timeout, messages} in the
        order they arrived; marks nothing read. What it returns counts as delivered to me
        once it was handed over: with `_hold` (a front end that writes the result
        itself) the messages are only held and the result carries `claim`, which the
        front end settles (Router.settle) once it knows; without, they count at once.
        `unread` returns all my unread messages at once, delivered or not; `skip_read`
        leaves out messages already read. Idle polling only stats the message files;
        `_wake(seconds)` (the daemon's change notification, a cancellable sleep) replaces
        the sleep between polls; `_alive()` false means the waiter is gone (WaitAbandoned,
        nothing held); `_record` names the record to claim in.
        """
        ident = self.me(agent)
        me = ident["agent_id"]
        timeout = parse_timeout(timeout)
        start = parse_after(after)
        reach = start is not None if lookback is None else bool(lookback)
        lookback = None
        if start is None:
            start = time.time() - 1.0
        if reach:
            prev = _read_text(self._wait_cursor(me, _record))
            try:
                prev = parse_ts(prev.strip()) if prev and prev.strip() else None
            except ValueError:
                prev = None
            if prev is not None and prev < start:
                lookback = now_ts(max(prev, time.time() - self.LOOKBACK_MAX))
            elif prev is None:  # my first lookback wait: if it is killed, the next one
                self._set_wait_cursor(me, _record, now_ts(start))  # reaches back to here
        tag = parse_tag(scope, "scope") if scope else None
        claims = Claims(self._delivered(me, _record))
        if unread:
            msgs = self.index.waiting_for(me, scope=tag)
            if msgs:
                if _alive is not None and not _alive():
                    raise WaitAbandoned()
                token, held = claims.hold([m["message_id"] for m in msgs])
                if token is not None and not _hold:
                    claims.commit(token)
                    token = None
                return self._waited(me, _record, msgs, token, None)
        since = now_ts(start)
        looked = [time.time()]

        def look():
            # Another process may have projected the message already, so the query runs
            # even if our catch-up reads nothing.
            looked[0] = time.time()
            self.index.catch_up()
            msgs = self.index.waiting_for(me, since, unread=unread, skip_read=skip_read,
                                          scope=tag)
            if lookback is not None:  # the gap since my previous wait
                ids = {m["message_id"] for m in msgs}
                msgs = [m for m in self.index.waiting_for(me, lookback, skip_read=True,
                                                          scope=tag)
                        if m["message_id"] not in ids] + msgs
            if msgs and _alive is not None and not _alive():
                raise WaitAbandoned()  # nobody to deliver to: hold nothing
            if not msgs:
                return None
            token, held = claims.hold([m["message_id"] for m in msgs])
            if token is None:
                return None
            held = set(held)
            msgs = [m for m in msgs if m["message_id"] in held]
            cursor = now_ts(looked[0] - self.LOOKBACK_OVERLAP)
            if not _hold:
                claims.commit(token)
                self._set_wait_cursor(me, _record, cursor)
                token = cursor = None
            return self._waited(me, _record, msgs, token, cursor)
        got = self._blocking(look, timeout, _wake, _poll)
        if got is not None:
            return got
        # nothing was found up to the last look: the next wait starts there
        self._set_wait_cursor(me, _record, now_ts(looked[0] - self.LOOKBACK_OVERLAP))
        return {"status": "timeout", "messages": []}

    def _blocking(self, look, timeout, wake=None, poll=0.05, subdir="messages"):
        """Call `look()` now and whenever the message files change, until it returns
        something (returned) or `timeout` seconds pass (None). Only a change in the log
        files can bring a new message: idle, this stats them (no SQL); the first look
        always runs, since a writer may have appended after this request's first catch-up
        and the files would never change again. `wake(seconds)` (the daemon's change
        notification, a cancellable sleep) replaces the sleep between looks. While it
        blocks with no daemon, a RemoteWatch brings in other clones' messages.
        `subdir`: the log files watched (None: all of them)."""
        deadline = time.monotonic() + timeout
        sleep = wake or time.sleep
        seen = watch = None
        try:
            while True:
                sig = (self.store.log_signature(subdir), holds_signature(self.loc.var))
                if sig != seen:
                    seen = sig
                    got = look()
                    if got is not None:
                        return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if watch is None:  # it blocks: look at the remote too (once decided)
                    watch = RemoteWatch(self.store).start() if RemoteWatch.wanted(
                        self.store) else False
                sleep(min(poll, left))
        finally:
            if watch:
                watch.stop()

    # -- watch (SPEC §7a) ------------------------------------------------------------------
    @operation(NEEDS_IDENTITY, retry_safe=True, blocks=True)
    def watch(self, timeout="30s", since=None, skip=(), began=None, agent=None, _poll=0.05,
              _wake=None, _alive=None, _hold=False):
        """One step of `thrum watch`: block until messages to me (not by me) reach this
        store after `since` (a timestamp), leaving out the ids in `skip` (what this watch
        printed in the overlap). Without `since` it is a watch's first step: it starts
        where my previous watch ended (at most 24 h back; my first watch ever starts now).
        Every step leaves out what watches of mine printed before this one `began` (a
        timestamp; default: now), so a restart repeats nothing, while two watches at once
        each print everything. Marks nothing read, claims
        nothing (a watch is not a wait; two watches each get every message): the front
        end records what it printed (Router.watched). Returns {status, messages, since:
        where the next step starts}."""
        me = self.me(agent)["agent_id"]
        timeout = parse_timeout(timeout)
        record = _delivered_record(self.loc.var, me, "watched")
        skip = set(skip or ())
        first = since is None
        if first:
            prev = (_read_text(_wait_cursor_path(self.loc.var, me, "watched")) or "").strip()
            try:
                since = now_ts(max(parse_ts(prev), time.time() - self.LOOKBACK_MAX)) \
                    if prev else now_ts(time.time() - 1.0)
            except ValueError:
                since = now_ts(time.time() - 1.0)
        elif not isinstance(since, str):
            raise UsageError("since must be a timestamp")
        if began is None:
            began = now_ts()
        elif not isinstance(began, str):
            raise UsageError("began must be a timestamp")
        looked = [time.time()]

        def look():
            looked[0] = time.time()
            self.index.catch_up()
            msgs = [m for m in self.index.waiting_for(me, since) if m["message_id"] not in skip]
            if msgs:  # what an earlier watch printed is not news (a restart)
                done = record.load()
                msgs = [m for m in msgs if done.get(m["message_id"], "~") >= began]
            if msgs and _alive is not None and not _alive():
                raise WaitAbandoned()
            return msgs or None
        msgs = self._blocking(look, timeout, _wake, _poll)
        return {"status": "received" if msgs else "timeout", "messages": msgs or [],
                "since": now_ts(looked[0] - self.LOOKBACK_OVERLAP), "began": began}

    def _waited(self, me, record, msgs, token, cursor):
        res = {"status": "received", "messages": msgs}
        if token is not None:
            res["claim"] = {"agent": me, "record": record, "token": token, "cursor": cursor}
        return res

    def _wait_cursor(self, me, record):
        return _wait_cursor_path(self.loc.var, me, record)

    def _set_wait_cursor(self, me, record, ts):
        _set_wait_cursor(self._wait_cursor(me, record), ts)

    # -- agent integrations (SPEC §15) ---------------------------------------------------
    @operation(NEEDS_IDENTITY)
    def hook_news(self, agent=None):
        """My unread messages that no wait, hook or listener has told me of yet; they are
        recorded as told (the delivered-once record), so each one is news once.
        Returns {agent_id, messages: [{message_id, from}]}. Only messages that reached
        this store since the previous call are looked at (a mark per agent, with a 2 s
        overlap for writers that project concurrently): older ones were considered then."""
        me = self.me(agent)["agent_id"]
        mark_path = _safe_name_path(os.path.join(self.loc.var, "hooks"), me, ".mark")
        mark = (_read_text(mark_path) or "").strip()
        try:
            since = now_ts(parse_ts(mark) - 2.0) if mark else None
        except ValueError:  # a damaged mark: look at everything once
            since = None
        rows = self.index.unread_arrived(me, since)
        delivered = self._delivered(me)
        told = delivered.present([r["message_id"] for r in rows]) if rows else set()
        if rows:  # a wait holding one is about to hand it over: it is news there
            told |= Claims(delivered).held()
        fresh = [r for r in rows if r["message_id"] not in told]
        claimed = set(delivered.add([r["message_id"] for r in fresh], only_new=True)) \
            if fresh else ()
        newest = max([mark] + [r["arrived_at"] for r in rows if r["arrived_at"]])
        if newest and newest != mark:
            try:
                os.makedirs(os.path.dirname(mark_path), exist_ok=True)
                _write_file_atomic(mark_path, newest + "\n", 0o600)
            except OSError:
                pass  # a read-only store: the next call looks further back
        return {"agent_id": me, "messages": [{"message_id": r["message_id"],
                                              "from": r["author"]}
                                             for r in fresh if r["message_id"] in claimed]}

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def briefing(self, limit=8, agent=None):
        """A short `prime` for hooks: me, my unread count and newest `limit` unread
        messages, the team and my saved context. No git, nothing marked or told."""
        who = self.whoami(agent)
        me = who["agent_id"]
        return {"agent": who, "inbox": self.index.inbox_counts(me),
                "unread": self.index.unread_messages(me, newest_first=True,
                                                     limit=max(0, int(limit))),
                "team": self._members(all_agents=False),
                "context": self.context_show(agent=me)["content"]}


class SearchOps(ServiceBase):
    """Operations: search (SPEC §17). (With MessageOps' _paging and _recipient_filter:
    Service joins them.)"""

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def search(self, query, sender=None, to=None, ref=None, since=None, limit=20, rank=False,
               agent=None, everyone=False):
        """Messages I can see whose text matches `query` (SPEC §17), newest first or by
        relevance (`rank`), each with a one-line `snippet`; marks nothing read. SQLite
        FTS5 when the index has it, else a scan with the same answer (THRUM_FTS=0 forces
        the scan). `everyone`: every message of the store, whoever it is to (the web
        page's search, over the feed it already shows; neither the CLI nor MCP offers it)."""
        me = self.me(agent)["agent_id"]
        q = SearchQuery(_check_text(query, "search query"))
        limit = self._paging(limit, 1)[0]
        sender = self._require_agent(sender)["agent_id"] if sender else None
        to = self._recipient_filter(to)
        ref = parse_tag(ref, "ref") if ref else None
        since = parse_since(since)
        got = self.index.search(me, q, sender=sender, to=to, ref=ref, since=since,
                                limit=limit, rank=rank, everyone=bool(everyone),
                                fts=self.env.get("THRUM_FTS", "").strip() != "0")
        return {"messages": got["messages"], "total": got["total"], "capped": got["capped"],
                "query": query, "rank": rank, "limit": limit, "agent_id": me}


# === 13. Operations: team, groups, admin ======================================

class TeamOps(ServiceBase):
    """Operations: who is on the team and what they are doing; status and briefings."""

    def _context_checked(self, worktree, host):
        """When the daemon last looked at this local worktree's git state (None without
        a daemon, or for other machines' agents)."""
        contexts = self.store.contexts
        if contexts is None or not worktree or host != os.uname().nodename:
            return None
        got = contexts.get(os.path.realpath(worktree))
        return got[0] if got else None

    @operation(NEEDS_STORE, retry_safe=True)
    def agent_list(self, context=False):
        """Registered agents with their work context."""
        return {"agents": self._members(all_agents=True, with_files=context)}

    def _members(self, all_agents, with_files=False):
        """The team as `team` shows it: agents with an open session (all_agents: every
        registered agent), with their work context and inbox counts."""
        out = []
        for a in self.index.team():
            if not all_agents and not a["session_id"]:
                continue
            f = a["fields"]
            m = {"agent_id": a["agent_id"], "role": a["role"], "module": a["module"],
                 "display": a["display"],
                 "status": "active" if a["session_id"] else "offline",
                 "intent": f.get("intent"), "task": f.get("task"),
                 "branch": f.get("branch"), "last_seen_at": a["last_seen_at"],
                 "session_id": a["session_id"],
                 "session_started_at": a["session_started_at"],
                 "worktree": a["worktree"], "hostname": a["hostname"],
                 "registered_at": a["registered_at"], "unread": a["unread"],
                 "total": a["total"],
                 "context_at": self._context_checked(a["worktree"], a["hostname"]) or
                 a["context_at"], "tmux": f.get("tmux")}
            if with_files:
                m["files"] = f.get("files") or []
            out.append(m)
        return out

    # -- team & status --------------------------------------------------------------
    @operation(NEEDS_STORE, retry_safe=True)
    def team(self, all=False):
        """Agents with an open session (all=True: everyone)."""
        return {"members": self._members(all_agents=all)}

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def status(self, agent=None):
        """Me, my session, inbox counts, daemon and sync state."""
        who = self.whoami(agent)
        ses = ({"session_id": who["session_id"], "started_at": who["session_started_at"]}
               if who["session_id"] else None)
        sync = self.sync_status()
        return {"agent": who, "session": ses, "inbox": self.index.inbox_counts(who["agent_id"]),
                "daemon": self.daemon_info(),
                "sync": {"state": sync["state"], "last_sync_at": sync["last_sync_at"],
                         "remote": sync["remote"], "last_error": sync["last_error"]}}

    def daemon_info(self):
        """Whether a daemon runs for this store (its lock decides, never the pid file)."""
        if not self.loc.store:
            return {"running": False, "pid": None}
        return DaemonFiles(self.loc.var, self.env).info()

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def overview(self, agent=None):
        st = self.status(agent)
        st["team"] = self._members(all_agents=False)
        return st

    @operation(NEEDS_IDENTITY, retry_safe=True)
    def prime(self, agent=None):
        """Recovery briefing after a restart: nothing is marked read."""
        who = self.whoami(agent)
        me = who["agent_id"]
        unread = self.index.unread_messages(me)
        ctx = self.context_show(agent=me)
        try:
            wc = work_context(who.get("worktree") or self.loc.worktree, self.store.env)
        except GitMissingError as e:  # the briefing still helps without git
            wc = {"branch": None, "files": [], "error": e.message}
        wc["intent"], wc["task"] = who.get("intent"), who.get("task")
        return {"agent": who,
                "session": {"session_id": who["session_id"],
                            "started_at": who["session_started_at"]}
                if who["session_id"] else None,
                "unread": unread,
                "inbox": self.index.inbox_counts(me),
                "team": self._members(all_agents=False),
                "work_context": wc,
                "context": ctx["content"]}

    @operation(NEEDS_STORE, retry_safe=True)
    def ping(self, name):
        """Is the agent active; last seen; intent."""
        row = self._require_agent(name)
        for m in self._members(all_agents=True):
            if m["agent_id"] == row["agent_id"]:
                return m
        raise NotFoundError("unknown agent @%s" % name)  # pragma: no cover

    @operation(NEEDS_STORE, retry_safe=True)
    def who_has(self, path):
        """Agents with an open session whose worktree has PATH changed or uncommitted
        (asks git live for local worktrees; uses the last recorded context for others).
        Agents that share a worktree cannot be told apart by git: each is listed with
        `shared` naming the others there."""
        self.require_store()
        rel = self._repo_relpath(path)
        host = os.uname().nodename
        found, contexts = [], {}
        daemon = self.store.contexts  # kept fresh by a running daemon (None without one)
        for m in self._members(all_agents=False, with_files=True):
            wt = m["worktree"]
            if m["hostname"] == host and wt and os.path.isdir(wt):
                real = os.path.realpath(wt)
                if real not in contexts:  # agents sharing a worktree share one git query
                    got = daemon.get(real) if daemon is not None else None
                    if got and parse_ts(got[0]) > time.time() - 15:
                        contexts[real] = got
                    else:
                        contexts[real] = (now_ts(), work_context(wt, self.store.env))
                checked, wc = contexts[real]
                files, branch, live = wc.get("files", []), wc.get("branch"), True
            else:
                files, branch, live = m.get("files") or [], m.get("branch"), False
                checked = m.get("context_at")
            for f in files:
                if f.get("path") == rel:
                    found.append({"agent_id": m["agent_id"], "branch": branch,
                                  "status": f.get("status"), "live": live,
                                  "worktree": wt, "checked_at": checked,
                                  "host": m["hostname"]})
                    break
        where = [(a.pop("host"), a["worktree"]) for a in found]
        for a, w in zip(found, where):
            a["shared"] = [o["agent_id"] for o, ow in zip(found, where) if o is not a and ow == w]
        return {"path": rel, "agents": found}

    def _repo_relpath(self, path):
        if not path or not isinstance(path, str):
            raise UsageError("who-has needs a PATH")
        root = os.path.realpath(self.loc.worktree)
        ap = os.path.realpath(os.path.join(self.caller.cwd, path))
        # This worktree first, then any agent's worktree (linked worktrees of a clone).
        roots = [root] + [os.path.realpath(m["worktree"]) for m in self._members(
            all_agents=True) if m["worktree"]]
        for r in sorted(set(roots), key=lambda r: (r != root, -len(r))):
            if ap.startswith(r + os.sep):
                return os.path.relpath(ap, r).replace(os.sep, "/")
        raise UsageError("%s is outside this repository (%s)" % (path, root))

    # -- the page's feed (SPEC §18) -----------------------------------------------------
    @operation(NEEDS_IDENTITY, retry_safe=True, blocks=True)
    def feed(self, timeout="30s", since=None, skip=(), seen=None, limit=200, agent=None,
             _poll=0.05, _wake=None, _alive=None, _hold=False):
        """One step of a page's live feed (`thrum ui`): block until a message of anyone
        reaches this store after `since` (a timestamp; default: one second ago), leaving
        out the ids in `skip`, or until anything else in the log changes (receipts, edits,
        the team): `seen` is the previous step's `seen`, so a change between two steps
        is not missed. Messages as I see them (`is_read`), in the order they arrived.
        Marks nothing read, claims nothing; it blocks as `watch` does (MessageOps).
        Returns {status: "received" | "changed" | "timeout", messages, more (more than
        `limit` arrived), since: where the next step starts, seen}."""
        me = self.me(agent)["agent_id"]
        timeout = parse_timeout(timeout)
        if since is None:
            since = now_ts(time.time() - 1.0)
        elif not isinstance(since, str):
            raise UsageError("since must be a timestamp")
        if seen is not None and not isinstance(seen, str):
            raise UsageError("seen must be text")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise UsageError("limit must be between 1 and 1000")
        skip = set(skip or ())
        looked, last = [time.time()], [seen]

        def look():
            import zlib
            looked[0] = time.time()
            sig = "%08x" % zlib.crc32(repr(self.store.log_signature(None)).encode())
            self.index.catch_up()
            msgs = [m for m in self.index.arrived_messages(me, since, limit + len(skip))
                    if m["message_id"] not in skip][:limit]
            changed = last[0] is not None and sig != last[0]
            last[0] = sig
            if (msgs or changed) and _alive is not None and not _alive():
                raise WaitAbandoned()
            return (msgs, changed) if msgs or changed else None
        got = MessageOps._blocking(self, look, timeout, _wake, _poll, subdir=None)
        msgs = got[0] if got else []
        return {"status": "received" if msgs else "changed" if got else "timeout",
                "messages": msgs, "more": len(msgs) >= limit,
                "since": now_ts(looked[0] - MessageOps.LOOKBACK_OVERLAP), "seen": last[0]}


class GroupOps(ServiceBase):
    """Operations: named groups of agents and roles."""

    # -- groups -----------------------------------------------------------------------
    def _by(self, agent):
        try:
            return self.me(agent)["agent_id"]
        except NotSetUpError:
            return None

    @operation(NEEDS_STORE)
    def group_create(self, name, description=None, agent=None):
        self.require_store()
        name = _check_name(_strip_at(name), "group name")
        description = _check_text(description, "description", 500)
        agents = self.index.agent_roles()
        if name in agents:
            raise UsageError("group name %r is already an agent name" % name)
        if name in set(agents.values()):
            raise UsageError("group name %r is already a role" % name)
        if self.index.group(name):
            raise RefusedError("group %r already exists" % name)
        ev = self._event("group.create", group=name, group_id=new_id("grp_"),
                         description=description, by=self._by(agent))
        self._emit([ev])
        return {"group": name, "group_id": ev["group_id"], "description": description,
                "created_at": ev["timestamp"]}

    def _require_group(self, name):
        """The name of a group that exists (`@` optional), else a clear error."""
        name = _strip_at(name)
        row = self.index.group(name) if name_ok(name or "") else None
        if row is None:
            raise NotFoundError("unknown group %r" % name,
                                hint="see groups with 'thrum group list'")
        return row["name"]

    @operation(NEEDS_STORE)
    def group_delete(self, name, agent=None):
        self.require_store()
        group = self._require_group(name)
        self._emit([self._event("group.delete", group=group, by=self._by(agent))])
        return {"group": group, "deleted": True}

    def _parse_members(self, members):
        out = []
        agents = self.index.agent_roles()
        for raw in members:
            if not isinstance(raw, str) or not raw.strip():
                raise UsageError("empty group member")
            s = raw.strip()
            if s.startswith("role:"):
                role = s[5:]
                _check_name(role, "role")
                out.append(("role", role))
            else:
                name = _strip_at(s)
                if not name_ok(name):
                    raise UsageError("invalid member %r: use @agent or role:ROLE" % raw)
                if name not in agents:
                    raise NotFoundError("unknown agent @%s" % name,
                                        hint="roles need the role: prefix, e.g. role:%s"
                                        % name)
                out.append(("agent", name))
        if not out:
            raise UsageError("give at least one member (@agent or role:ROLE)")
        return out

    @operation(NEEDS_STORE)
    def group_add(self, name, members, agent=None):
        self.require_store()
        group = self._require_group(name)
        parsed = self._parse_members(members)
        by = self._by(agent)
        self._emit([self._event("group.member.add", group=group, member_type=t, member=m,
                                by=by) for t, m in parsed])
        return self.group_info(group)

    @operation(NEEDS_STORE)
    def group_remove(self, name, members, agent=None):
        self.require_store()
        group = self._require_group(name)
        current = {(m["type"], m["value"]) for m in self.group_info(group)["members"]}
        parsed = []
        for raw in members:
            s = raw.strip()
            key = ("role", s[5:]) if s.startswith("role:") else ("agent", _strip_at(s))
            if key not in current:
                raise NotFoundError("%s is not a member of group %s" % (raw, group))
            parsed.append(key)
        by = self._by(agent)
        self._emit([self._event("group.member.remove", group=group, member_type=t,
                                member=m, by=by) for t, m in parsed])
        return self.group_info(group)

    @operation(NEEDS_STORE, retry_safe=True)
    def group_list(self):
        self.require_store()
        out = []
        for g in self.index.groups():
            info = self.group_info(g["name"])
            out.append({"group": g["name"], "group_id": g["group_id"],
                        "description": g["description"], "created_by": g["created_by"],
                        "created_at": g["created_at"], "member_count": len(info["members"]),
                        "agents": info["agents"]})
        return {"groups": out}

    @operation(NEEDS_STORE, retry_safe=True)
    def group_info(self, name):
        self.require_store()
        row = self.index.group(self._require_group(name))
        members = [{"type": m["member_type"], "value": m["member"], "added_by": m["added_by"],
                    "added_at": m["added_at"]} for m in self.index.group_members(row["name"])]
        return {"group": row["name"], "group_id": row["group_id"],
                "description": row["description"], "created_by": row["created_by"],
                "created_at": row["created_at"], "members": members,
                "agents": sorted(self._group_members(row["name"]))}


class AdminOps(ServiceBase):
    """Operations: configuration, sync, health checks and the index."""

    # -- config ---------------------------------------------------------------------------
    @operation(NEEDS_NOTHING, retry_safe=True)
    def config_show(self):
        return {"repo_file": self.config.repo_file, "user_file": self.config.user_file,
                "values": {k: {"value": v, "source": s} for k, v, s in self.config.items()}}

    @operation(NEEDS_NOTHING, retry_safe=True)
    def config_get(self, key):
        if key not in CONFIG_KEYS:
            raise UsageError("unknown config key %r" % key,
                             hint="known keys: " + ", ".join(CONFIG_KEYS))
        return {"key": key, "value": self.config.get(key), "source": self.config.source(key)}

    @operation(NEEDS_STORE, starts_daemon=False)
    def config_set(self, key, value):
        self.require_store()
        if key == "sync.branch" and self.loc.git_common:
            try:
                branch = _parse_branch(value)
            except ValueError:
                branch = None  # Config.set below refuses it with the reason
            if branch:
                eng = self.store.sync_engine(branch)
                remote_tip = eng.rev(eng.tracking)
                problem = eng.branch_problem()
                if not problem and remote_tip and eng.foreign_history(remote_tip):
                    problem = "the remote's copy (%s/%s) is not a thrum log" % (
                        eng.remote, branch)
                if problem:
                    raise UsageError("cannot use %r as the sync branch: %s" % (branch, problem),
                                     hint=_BRANCH_HINT)
        v = self.config.set(key, value)
        return {"key": key, "value": v, "file": self.config.repo_file}

    # -- sync (the engine is section 8) ---------------------------------------------------
    @operation(NEEDS_STORE)
    def sync_force(self):
        """Run one sync cycle now. Returns the sync status plus what the cycle did:
        {remote, branch, local_only, last_sync_at, last_error, ahead, behind, state,
        pulled, committed, pushed, attempts}."""
        self.require_store()
        eng = self.store.sync_engine()
        res = eng.cycle()
        st = eng.status()
        st.update(res)
        return st

    # -- retention (SPEC §17) -------------------------------------------------------------
    @operation(NEEDS_STORE)
    def purge(self, before, confirm=False, agent=None, _by=None):
        """Preview, or with `confirm` purge, the messages created before the horizon
        `before` (an age such as 30d, a date, a UTC timestamp) with their edits and
        receipts; a thread with a newer message is kept whole. The purge is a log.purge
        event (by me, or `_by`: the daemon's retention) that syncs, so every clone drops
        the same messages; log files left with nothing but purged lines are removed.
        Returns {before, confirmed, agents: [{agent, messages, receipts}], messages,
        receipts, threads_kept, files_removed} (+ by, event_id, pushed, warnings)."""
        self.require_store()
        by = _by or (self.me(agent)["agent_id"] if confirm else None)
        horizon = parse_horizon(before)
        plan = self.index.purge_plan(horizon)
        msgs, rcpts = plan["messages"], plan["receipts"]
        res = {"before": horizon, "confirmed": bool(confirm),
               "agents": [{"agent": a, "messages": msgs.get(a, 0),
                           "receipts": rcpts.get(a, 0)} for a in sorted(set(msgs) | set(rcpts))],
               "messages": sum(msgs.values()), "receipts": sum(rcpts.values()),
               "threads_kept": plan["threads_kept"], "files_removed": []}
        if confirm:
            ev = self._event(PURGE_EVENT, by=by, before=horizon, keep=plan["keep"])
            self._emit([ev])
            res["files_removed"] = self.store.drop_dead()
            res["by"], res["event_id"] = by, ev["event_id"]
            res["pushed"], res["warnings"] = self._push_now()
        return res

    @operation(NEEDS_STORE, retry_safe=True)
    def sync_status(self):
        """Sync state without network: {remote, branch, local_only, last_sync_at,
        last_error, ahead, behind, state, git}."""
        self.require_store()
        if not self.loc.git_common:
            return {"remote": None, "branch": self.branch, "local_only": True,
                    "last_sync_at": None, "last_error": None, "ahead": 0, "behind": 0,
                    "state": "no-remote", "git": False}
        st = self.store.sync_engine().status()
        st["git"] = True
        return st

    @operation(NEEDS_IDENTITY)
    def context_sync(self, agent=None):
        """Publish my saved context on the sync branch (an agent.update event whose
        `context` field is the text; the latest publication wins), then sync."""
        me = self.me(agent)["agent_id"]
        text = _read_text(self._context_path(me))
        if text is None:
            raise NotFoundError("no saved context for @%s" % me,
                                hint="save one with 'thrum context save'")
        self.store.sync_engine()  # outside git this raises: there is nothing to publish to
        self._update_fields(me, context=text)
        res = self.sync_force()
        res["agent_id"] = me
        return res

    # -- health -------------------------------------------------------------------------------
    @operation(NEEDS_STORE, local=True)
    def doctor(self, fix=False):
        """Check (and with fix, repair) the index, log lines, sync worktree, daemon files;
        report (never fix) Codex's trust of the project when it has thrum's Codex block.

        Returns {ok, checks: [{name, ok, detail, fixed}]}.
        """
        self.require_store()
        checks = []

        def check(name, ok, detail, fixed=False):
            checks.append({"name": name, "ok": bool(ok), "detail": detail, "fixed": fixed})
        # log lines
        torn = self.log.torn_files()
        if torn and fix:
            self.log.repair()
        check("log: torn lines", not torn, ", ".join("%s (%d bytes)" % t for t in torn)
              or "none", fixed=bool(torn and fix))
        bad = 0
        for rel, path, _ in self.log.files():
            with open(path, "rb") as f:
                data = f.read()
            _, n = parse_lines(data[:data.rfind(b"\n") + 1], rel, warn=False)
            bad += n
        check("log: corrupt lines", True, "%d corrupt line(s) are skipped" % bad
              if bad else "none")
        # index
        problem = None
        try:
            idx = Index(os.path.join(self.loc.var, "index.db"), self.log, self.store.arrivals)
            idx.open()
            res = idx.quick_check()
            if res != "ok":
                problem = "integrity check: %s" % res
            else:
                idx.catch_up()
                problem = idx.differs_from_log()
            idx.close()
        except (sqlite3.DatabaseError, ThrumError) as e:
            problem = str(e)
        if problem and fix:
            idx = Index(os.path.join(self.loc.var, "index.db"), self.log, self.store.arrivals)
            idx.rebuild()
            idx.close()
        check("index", not problem, problem or "matches the log", fixed=bool(problem and fix))
        # sync worktree
        if self.loc.git_common:
            try:
                eng = self.store.sync_engine()
                wts = eng._worktrees()
                branch_issue = eng.branch_problem(wts)
                check("sync branch", not branch_issue, "%s: %s (%s)" % (
                    eng.branch, branch_issue, _BRANCH_HINT) if branch_issue else
                    "%s is thrum's own log branch" % eng.branch)
                if not branch_issue:
                    issue = eng.worktree_problem(wts)
                    if issue and fix:
                        eng.ensure_branch_and_worktree()
                    check("sync worktree", not issue, issue or "ok",
                          fixed=bool(issue and fix))
                    stray = [] if issue else eng.stray_paths()
                    if stray and fix:
                        for rel in stray:
                            os.unlink(os.path.join(eng.wt, rel))
                    check("sync worktree: other files", not stray, "not log files, never "
                          "committed: %s" % ", ".join(stray[:5]) if stray else "none",
                          fixed=bool(stray and fix))
                    self._doctor_append_only(eng, check, fix, issue)
            except ThrumError as e:
                check("sync worktree", False, e.message)
        # can thrum write where it must?
        for what, path, effect in (
                ("log directory", self.log.root, "every write (send, reply, receipts) fails"),
                ("store", self.loc.var, "the index is rebuilt in memory on every command")):
            if os.path.isdir(path) and not os.access(path, os.W_OK):
                check("%s writable" % what, False, "%s is read-only: %s (fix the "
                      "permissions)" % (path, effect))
        # identity files of this worktree
        for name, problem, fixed in self._check_identities(fix):
            check("identity @%s" % name, False, problem, fixed=fixed)
        # stale daemon files
        pidf = os.path.join(self.loc.var, "daemon.pid")
        if os.path.exists(pidf) and not self.daemon_info()["running"]:
            if fix:
                DaemonFiles(self.loc.var, self.env).clean()
            check("daemon files", False, "stale daemon.pid and socket (no daemon holds "
                  "daemon.lock)", fixed=fix)
        # Codex ignores what `integrate codex` wrote until the user trusts the project
        # and its hooks: reported, never fixed (that is the user's own Codex config)
        for name, ok, detail in codex_trust_checks(self.loc.worktree, self.loc.git_common,
                                                   self.env):
            check(name, ok, detail)
        ok = all(c["ok"] or c["fixed"] for c in checks)
        return {"ok": ok, "checks": checks}

    def _doctor_append_only(self, eng, check, fix, worktree_issue):
        """The log is append-only (SPEC §8): a file that lost lines against the last
        commit is a problem (--fix restores it from git), and restorations a sync made
        since the last doctor are reported once."""
        if not worktree_issue:
            tip = eng.rev(eng.ref)
            lost = eng.lost_lines([tip])
            if lost and fix:
                eng.restore_lost([tip])
            check("log: append-only", not lost, "lost lines against the last commit: %s "
                  "(truncated or rewritten by another process; --fix restores them from "
                  "git)" % ", ".join(sorted(lost)) if lost else "no file lost lines",
                  fixed=bool(lost and fix))
        state = eng.load_state()
        shown = state.get("restored_shown_at") or ""
        news = [r for r in state.get("restored") or [] if isinstance(r, dict) and
                str(r.get("at") or "") > shown]
        if news:
            check("log: restored by sync", False, "; ".join(
                "%s: %s events at %s" % (r.get("file"), r.get("events"), r.get("at"))
                for r in news) + " (the files had been truncated or rewritten by another "
                "process; sync put the events back from git)", fixed=True)
            try:
                eng._save_state(restored_shown_at=max(str(r.get("at")) for r in news))
            except OSError:
                pass

    def _identity_stale(self, ident):
        """Why an identity file no longer speaks for its agent (a NotSetUpError to raise
        or report), or None: the agent was deleted, or its name is registered from
        another worktree (a forced takeover, or the newer of two registrations that met
        in a sync)."""
        row = self.index.agent(ident["agent_id"])
        if row and row["worktree"] and ident.get("worktree") and ident.get("identity_file") \
                and os.path.realpath(row["worktree"]) != os.path.realpath(ident["worktree"]):
            where = row["worktree"] + ("" if row["hostname"] in (None, os.uname().nodename)
                                       else " on " + str(row["hostname"]))
            hint = ("register another name here, or claim it back with 'thrum quickstart "
                    "--name %s --role ROLE --module MODULE --force'" % ident["agent_id"])
            if row["takeover"]:
                return NotSetUpError("agent @%s was taken over (a forced registration) by "
                                     "the worktree %s" % (ident["agent_id"], where), hint=hint)
            return NotSetUpError(
                "the name @%s is also registered from another worktree (%s), and that "
                "registration is the newer one (two registrations met in a sync)"
                % (ident["agent_id"], where), hint=hint)
        if row is None:
            return NotSetUpError("agent %s is not registered in this store (deleted?)"
                                 % ident["agent_id"],
                                 hint="re-register with 'thrum quickstart --name %s "
                                      "--role R --module M'" % ident["agent_id"])
        return None

    def _check_identities(self, fix):
        """[(name, problem, fixed)] for damaged or stale identity files of this worktree.
        A fix rewrites a damaged file from the agent's registration when it was made here,
        else moves it aside (`<name>.json.corrupt`), and removes a stale one (its agent
        deleted, or its name registered from another worktree)."""
        out = []
        for name in self.identities_here():
            path = self._identity_file(name)
            try:
                stale = self._identity_stale(self._read_identity(path))
            except NotSetUpError as e:
                problem = e.message
            else:
                if stale:  # a leftover: it only makes this worktree need THRUM_NAME
                    fixed = False
                    if fix:
                        os.unlink(path)
                        fixed = True
                    out.append((name, "stale: %s%s" % (stale.message, "; removed" if fix else
                                "; --fix removes this identity file"), fixed))
                continue
            fixed = False
            if fix:
                row = self.index.agent(name)
                here = os.path.realpath(self.loc.worktree)
                if row and row["worktree"] and os.path.realpath(row["worktree"]) == here:
                    ses = self.index.open_session(name)
                    self._write_identity({
                        "agent_id": name, "role": row["role"], "module": row["module"],
                        "display": row["display"], "worktree": here,
                        "intent": self.index.agent_fields(name).get("intent"),
                        "session_id": ses["session_id"] if ses else None,
                        "created_at": row["registered_at"], "identity_file": path})
                    problem += "; rewritten from its registration"
                else:
                    os.replace(path, path + ".corrupt")
                    problem += "; moved aside to %s.corrupt" % os.path.basename(path)
                fixed = True
            out.append((name, problem, fixed))
        return out

    @operation(NEEDS_STORE, local=True)
    def rebuild_index(self):
        store = self.require_store()
        n = store.index.rebuild()
        self._fresh, self._idx = True, store.index
        return {"events": n}


# -- what doctor reads of a host's files: Codex's trust ---------------------------------
# `thrum integrate codex` (section 21) writes a marked block into .codex/config.toml;
# Codex ignores it until the user trusts the project and approves its hooks, which Codex
# records in $CODEX_HOME/config.toml. doctor reads that file and never writes it.

#: The lines around thrum's block in a Codex config.toml.
INTEGRATE_MARK = "# >>> thrum (written by `thrum integrate codex`; `--remove` takes it out)"


INTEGRATE_END = "# <<< thrum"


def _is_thrum_command(command):
    """A hook command of thrum's (`thrum hook EVENT ...`, or `python thrum.py hook ...`)."""
    return isinstance(command, str) and " hook " in " %s " % command and "thrum" in command


def _codex_config_path(env):
    """$CODEX_HOME/config.toml (default ~/.codex/config.toml): where Codex keeps the trust
    of projects and hooks."""
    home = env.get("CODEX_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"),
                                                 ".codex")
    return os.path.join(home, "config.toml")


def _codex_trust_keys(root, git_common):
    """Where Codex (0.171.0) looks for a checkout's trust, in order: `[projects."<its real
    path>"]`, then, for a linked worktree, the main checkout's. A parent directory's entry
    does not count, nor one under a symlinked path."""
    keys = [os.path.realpath(root)]
    if git_common and os.path.basename(os.path.normpath(git_common)) == ".git":
        main = os.path.realpath(os.path.dirname(os.path.normpath(git_common)))
        if main not in keys:
            keys.append(main)
    return keys


def _codex_hook_keys(path):
    """{Codex's hooks.state key: event} for thrum's hooks in a project's config.toml
    (`<file>:<event_in_snake_case>:<group>:<handler>`, as Codex 0.171.0 records them)."""
    import tomllib
    try:
        hooks = tomllib.loads(_read_text(path, "", errors="replace")).get("hooks")
    except (OSError, ValueError):
        return {}
    out = {}
    for event, groups in hooks.items() if isinstance(hooks, dict) else ():
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", event).lower()
        for gi, g in enumerate(groups if isinstance(groups, list) else ()):
            handlers = g.get("hooks") if isinstance(g, dict) else None
            for hi, h in enumerate(handlers if isinstance(handlers, list) else ()):
                if isinstance(h, dict) and _is_thrum_command(h.get("command")):
                    out["%s:%s:%d:%d" % (os.path.realpath(path), snake, gi, hi)] = event
    return out


def _toml_table(data, *path):
    """data[path...] when every step is a table, else {}."""
    for k in path:
        data = data.get(k) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def codex_trust_checks(root, git_common, env):
    """doctor's checks of Codex's trust when .codex/config.toml holds thrum's block, else
    none: [(name, ok, detail)]. Reads $CODEX_HOME/config.toml, never writes it."""
    import tomllib
    project = os.path.join(root, ".codex", "config.toml")
    try:
        if INTEGRATE_MARK not in _read_text(project, "", errors="replace"):
            return []
    except OSError:
        return []
    conf, keys = _codex_config_path(env), _codex_trust_keys(root, git_common)
    never = " (doctor --fix never edits Codex's config)"
    try:
        text = _read_text(conf, None, errors="replace")
        data = tomllib.loads(text or "")
    except (OSError, ValueError) as e:
        return [("codex: project trusted", False, "cannot read %s (%s), nor can Codex%s"
                 % (conf, e, never))]
    projects = _toml_table(data, "projects")
    key = next((k for k in keys if k in projects), None)
    level = _toml_table(projects, key).get("trust_level") if key else None
    if level != "trusted":
        if key is None:
            why = "%s %s" % (conf, "does not exist" if text is None else "has no "
                             "[projects.%s] entry" % json.dumps(keys[0]))
        elif level == "untrusted":
            why = "%s marks %s untrusted" % (conf, key)
        else:
            why = "[projects.%s] in %s has trust_level = %s, which Codex does not accept" % (
                json.dumps(key), conf, json.dumps(level))
        return [("codex: project trusted", False, "%s, so Codex ignores .codex/config.toml "
                 "(thrum's MCP server and hooks): run `codex` in %s and choose \"Trust and "
                 "continue\", or set trust_level = \"trusted\" under [projects.%s] in %s%s"
                 % (why, keys[0], json.dumps(key or keys[0]), conf, never))]
    checks = [("codex: project trusted", True, "%s trusts %s: Codex loads thrum's MCP server "
               "and hooks from .codex/config.toml" % (conf, key))]
    if len(keys) > 1:  # a linked worktree: Codex 0.171.0 runs the main checkout's hooks
        return checks  # there, not this file's (docs/integrations.md), so no hook check
    state, ours = _toml_table(data, "hooks", "state"), _codex_hook_keys(project)
    off = sorted(ev for k, ev in ours.items()
                 if _toml_table(state, k).get("enabled") is False)
    todo = sorted(ev for k, ev in ours.items()
                  if ev not in off and not _toml_table(state, k).get("trusted_hash"))
    if not (off or todo):
        checks.append(("codex: hooks approved", True, "%s records your approval of thrum's "
                       "%d hooks (Codex asks again for a hook that changed since)"
                       % (conf, len(ours))))
        return checks
    why = "; ".join(["not approved in %s: %s" % (conf, ", ".join(todo))] * bool(todo) +
                    ["disabled in Codex: %s" % ", ".join(off)] * bool(off))
    checks.append(("codex: hooks approved", False, "%s, so Codex does not run them: start "
                   "`codex` in %s and choose \"Trust all and continue\" when it says \"Hooks "
                   "need review\", or type /hooks there and press t%s" % (why, keys[0], never)))
    return checks


# === 14. Operations: tmux agents; the service and its table ===================

#: The first process of a pane `tmux create` starts (run with `python -I -S -c`, argv:
#: GO_FILE NAME CMD...): it waits until thrum has recorded the pane and creates GO_FILE,
#: then becomes CMD with THRUM_NAME=NAME and no other THRUM_* variable. No shell.
_PANE_START = """\
import os, sys, time
go, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("thrum: the agent was not recorded in time; not starting " + argv[0])
    time.sleep(0.005)
os.unlink(go)
env = {k: v for k, v in os.environ.items() if not k.startswith("THRUM_")}
env["THRUM_NAME"] = name
try:
    os.execvpe(argv[0], argv, env)
except OSError as e:
    sys.exit("thrum: cannot run %s: %s" % (argv[0], e.strerror or e))
"""


class TmuxOps(ServiceBase):
    """Operations: agents started in tmux sessions (SPEC §12)."""

    # -- tmux (SPEC §12) ------------------------------------------------------------------
    @operation(NEEDS_NOTHING)
    def tmux_create(self, session, name=None, role=None, module=None, intent=None,
                    command=(), force=False, socket=None):
        """Register the agent in this worktree (init if needed) and start its session,
        then a detached tmux session whose pane runs `command` (default: the user's
        shell) with THRUM_NAME set and no other THRUM_*. The identity records the tmux
        session, pane and server socket; the pane's process is the agent's long-lived pid.
        Checks that need no writes come first; a failure after the registration rolls it
        back (a new agent is deleted again, a re-registered one has its session ended)."""
        if not isinstance(session, str) or not _TMUX_SESSION(session):
            raise UsageError("invalid tmux session name %r" % (session,),
                             hint="1-64 letters, digits, '_' or '-', starting with a letter "
                                  "or digit")
        if not self.loc.store and not self.loc.git_common:
            raise UsageError("%s is not in a git repository" % self.caller.cwd,
                             hint="pass --cwd DIR, a directory inside the repository")
        name = _strip_at(name) if name else self.env.get("THRUM_NAME")
        if not name:
            raise UsageError("tmux create needs --name NAME")
        _check_name(name)
        if not (role or self.env.get("THRUM_ROLE")) or not (
                module or self.env.get("THRUM_MODULE")):
            raise UsageError("tmux create needs --role and --module (or THRUM_ROLE and "
                             "THRUM_MODULE)")
        _check_text(intent, "intent", 1000, allow_empty=True)
        argv = _command_argv(command, self.env)
        tmux = Tmux(self.env, tmux_socket(self.env, socket)).require()
        if tmux.has_session(session):
            if not force:
                raise RefusedError("tmux session %s already exists" % session,
                                   hint="--force replaces it (and ends its agent's session)")
            if self.store is not None:
                self._tmux_forget(session, None, "tmux session replaced")
            tmux.run("kill-session", "-t", "=" + session, check=False)
        existed = self.store is not None and self.index.agent(name) is not None
        if existed and not force:
            raise RefusedError("agent @%s is already registered" % name,
                               hint="--force registers it again here and gives it this "
                                    "tmux session")
        if existed:  # (forced) its old tmux session on this host goes
            for m in self._tmux_members(mine=True):
                if m["agent_id"] == name and m["tmux"]["session"] != session:
                    Tmux(self.env, m["tmux"].get("socket")).run(
                        "kill-session", "-t", "=" + m["tmux"]["session"], check=False)
                    self._tmux_forget(m["tmux"]["session"], name, "tmux session replaced")
        qs = self.quickstart(name=name, role=role, module=module, intent=intent, force=force)
        aid = qs["register"]["agent_id"]
        try:
            # The pane starts held: its session, pane and pid are recorded before the
            # command runs, so the command's first `thrum whoami` sees them (SPEC §12).
            pane, pid, sock, go = self._tmux_start(tmux, session, aid, argv)
            ses = self.session_start(pid=pid, agent=aid)
            rec = {"session": session, "pane": pane, "socket": sock,
                   "host": os.uname().nodename,
                   "origin": self.origin}  # the clone whose nudgers type into this pane
            self._emit([self._event("agent.update", agent_id=aid, tmux=rec)])
            ident = self.me(aid)
            ident.update(tmux_session=session, tmux_pane=pane, tmux_socket=sock)
            self._write_identity(ident)
            self._tmux_release(tmux, session, go, argv)
        except ThrumError:
            tmux.run("kill-session", "-t", "=" + session, check=False)
            self._tmux_forget(session, aid, "tmux create failed")
            if not existed:
                self.agent_delete(aid, force=True)
            elif self.index.open_session(aid):
                self._end_session(reason="tmux create failed", agent=aid)
            raise
        return {"session": session, "agent_id": aid, "pane": pane, "socket": sock,
                "pid": pid, "session_id": ses["session_id"], "command": argv,
                "cwd": self.caller.cwd, "registered": not existed}

    def _tmux_start(self, tmux, session, aid, argv):
        """Start the tmux session with its pane held: the pane's first process (this
        interpreter, _PANE_START) waits for a go file, then drops every THRUM_* variable
        (the tmux server's global environment may hold some, kept from whoever started
        it), sets THRUM_NAME and becomes the command (exec: the pane's pid is the
        command's). Returns (pane, pid, socket, go file)."""
        hold = os.path.join(self.loc.var, "tmux")
        os.makedirs(hold, mode=0o700, exist_ok=True)
        go = os.path.join(hold, "%s.%s.go" % (session, new_id("")))
        tmux.run("new-session", "-d", "-s", session, "-c", self.caller.cwd, "-x", "200",
                 "-y", "50", sys.executable, "-I", "-S", "-c", _PANE_START, go, aid, *argv,
                 timeout=10.0)
        info = tmux.pane("=%s:" % session, "#{pane_id}\t#{pane_pid}\t#{socket_path}")
        if not info:
            raise ThrumError("tmux session %s ended as soon as it started" % session,
                             hint="see 'tmux%s ls'" % (" -S " + tmux.socket if tmux.socket
                                                       else ""))
        pane, pid, sock = info.split("\t")
        return pane, int(pid), sock, go

    def _tmux_release(self, tmux, session, go, argv):
        """Let the held pane run its command, and see that it did not end at once."""
        _write_file_atomic(go, b"", 0o600)
        deadline, n = time.monotonic() + 10.0, 0
        while os.path.exists(go):  # the pane takes the file just before it becomes CMD
            n += 1
            if time.monotonic() > deadline or (n % 10 == 0 and tmux.pane(
                    "=%s:" % session, "#{pane_dead}") not in ("0", "")):
                try:
                    os.unlink(go)
                except FileNotFoundError:
                    pass
                raise ThrumError("the pane of tmux session %s did not start" % session,
                                 hint="is %s runnable there?" % sys.executable)
            time.sleep(0.01)
        time.sleep(0.15)  # a command that cannot start ends at once
        if tmux.pane("=%s:" % session, "#{pane_dead}") not in ("0", ""):
            raise ThrumError("%s exited as soon as it started in tmux session %s"
                             % (argv[0], session), hint="run the command by hand to see why")

    def _tmux_members(self, mine=False):
        """Members with a tmux record. mine: only records this clone wrote on this host,
        the only panes thrum ever types into, kills or replaces (SPEC §12): a record
        synced from another clone, or one with no origin, is data, never a target."""
        return [m for m in self._members(all_agents=True) if m.get("tmux") and
                (not mine or self._tmux_mine(m["tmux"]))]

    def _tmux_mine(self, rec):
        return isinstance(rec, dict) and rec.get("host") == os.uname().nodename and \
            rec.get("origin") == self.origin

    @operation(NEEDS_STORE, retry_safe=True, local=True)
    def tmux_list(self):
        """Agents with a tmux session: alive or gone (asked live for this host)."""
        self.require_store()
        out, exe = [], _which("tmux", self.env)
        if exe is None:
            raise TmuxMissingError()
        for m in self._tmux_members():
            rec = m["tmux"]
            alive, mine = None, self._tmux_mine(rec)
            if mine:  # another clone's panes are only shown, never asked about
                tm = Tmux(self.env, rec.get("socket"))
                alive = tm.has_session(rec["session"]) and \
                    tm.pane(rec["pane"], "#{pane_dead}") == "0"
            out.append({"agent_id": m["agent_id"], "session": rec["session"],
                        "pane": rec.get("pane"), "socket": rec.get("socket"),
                        "host": rec.get("host"), "alive": alive, "status": m["status"],
                        "unread": m["unread"], "clone": "this" if mine else "other"})
        return {"agents": out}

    @operation(NEEDS_STORE, local=True)
    def tmux_kill(self, session=None, name=None, socket=None):
        """Kill a tmux session (exact name, never a prefix) and end its agent's session."""
        self.require_store()
        if bool(session) == bool(name):
            raise UsageError("give a SESSION or --name NAME (one of them)")
        aid = None
        if name:
            aid = self._require_agent(name)["agent_id"]
            m = next((m for m in self._tmux_members(mine=True) if m["agent_id"] == aid),
                     None)
            if m is None:
                raise NotFoundError("@%s has no tmux session" % aid,
                                    hint="see them with 'thrum tmux list'")
            session, sock = m["tmux"]["session"], socket or m["tmux"].get("socket")
        else:
            if not _TMUX_SESSION(session):
                raise UsageError("invalid tmux session name %r" % session)
            mine = [m for m in self._tmux_members(mine=True)
                    if m["tmux"]["session"] == session]
            sock = socket or (mine[0]["tmux"].get("socket") if mine else None)
        tm = Tmux(self.env, tmux_socket(self.env, sock)).require()
        killed = tm.has_session(session) and \
            tm.run("kill-session", "-t", "=" + session, check=False)[0] == 0
        agents, ended = self._tmux_forget(session, aid, "tmux session killed")
        if not killed and not agents:
            raise NotFoundError("no tmux session %s" % session,
                                hint="see them with 'thrum tmux list' or 'tmux ls'")
        return {"session": session, "killed": killed, "agents": agents, "ended": ended}

    def _tmux_forget(self, session, aid, reason):
        """The agents of tmux session `session` (or agent `aid`) lose it: their thrum
        session ends and the record is cleared (log and identity file)."""
        agents, events, ended = [], [], []
        for m in self._tmux_members(mine=True):
            if (aid and m["agent_id"] != aid) or m["tmux"]["session"] != session:
                continue
            agents.append(m["agent_id"])
            ses = self.index.open_session(m["agent_id"])
            sid = ses["session_id"] if ses else None
            if sid:
                ended.append(sid)
                events.append(self._event("agent.session.end", agent_id=m["agent_id"],
                                          session_id=sid, reason=reason))
            events.append(self._event("agent.update", agent_id=m["agent_id"], tmux=None))
            path = self._identity_file(m["agent_id"], m.get("worktree"))
            ident = self._read_identity(path) if os.path.exists(path) else None
            if ident and ident.get("tmux_session") == session:
                for k in ("tmux_session", "tmux_pane", "tmux_socket", "pid"):
                    ident[k] = None
                if sid and ident.get("session_id") == sid:
                    ident["session_id"] = None
                self._write_identity(ident)
        self._emit(events)
        return agents, ended


class Service(AgentOps, MessageOps, SearchOps, TeamOps, GroupOps, AdminOps, TmuxOps):
    """Every thrum operation, as one method taking and returning plain data.

    The domains live in their own classes (sections 11-14); the operation names stay flat,
    so the CLI, the daemon's RPC and the MCP tools name them the same way. Front ends go
    through `call()`, which builds one Service per request.
    """


#: Every operation a front end can call, by name: the methods of Service declared with
#: @operation, in the order of their classes. The CLI, the daemon's RPC and the MCP tools
#: all go through call() with these names.
OPS = {op.name: op for cls in (AgentOps, MessageOps, SearchOps, TeamOps, GroupOps, AdminOps,
                               TmuxOps)
       for op in (getattr(v, "operation", None) for v in vars(cls).values()) if op}


def call(op, params, caller, store=None, hooks=None):
    """Run one operation for one caller: the entry point of every front end.

    `params` is a dict of plain data, `caller` a Caller, `store` an open Store (None:
    located from the caller's directory). Checks what the operation needs, runs it,
    then the per-call work (THRUM_AUTOSYNC's sync after a write). Returns plain data,
    or raises ThrumError (AfterWriteError when only the sync after a write failed).
    `hooks`: the method's private keyword arguments (callables a long-lived front end
    passes in process, e.g. a wait's `_wake`); never taken from a request.
    """
    try:
        spec = OPS[op]
    except (KeyError, TypeError):
        raise UsageError("unknown operation %r" % (op,))
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise UsageError("an operation's parameters must be an object (name -> value)")
    params = dict(params)
    svc = Service(store, caller)
    try:
        spec.check(params)
        if spec.needs >= NEEDS_STORE:
            svc.require_store()
        if spec.needs >= NEEDS_IDENTITY:
            svc.me()
        result = getattr(svc, spec.name)(**params, **(hooks or {}))
        svc.finish()
    finally:
        if store is None:  # a store opened for this call only
            svc.close()
    if svc.autosync_error is not None:
        raise AfterWriteError(svc.autosync_error, result)
    return result


# === 15. tmux nudges ==========================================================

# -- nudges (SPEC §12) ------------------------------------------------------------------
# When a message reaches an agent with a live tmux pane on this host, one line is typed
# into that pane. Requests go into a queue file per agent (`.thrum/var/nudge/<agent>.queue`);
# a nudger, holding the agent's lock file so two never type into one pane at once,
# waits a moment for the rest of a burst, then types one line for all of it. Nudgers
# run in the daemon (threads, also for messages that came by sync) or, without one, in a
# process the sender spawns after the message is stored. A message nudges its
# recipient once (`<agent>.done`), and never while the agent has already read it.

def _tmux_pane_key(rec):
    return (rec.get("socket") or "", rec.get("pane") or "")


class Nudges:
    SETTLE = 1.5        # a burst is over when its queue has been quiet this long...
    BURST_MAX = 15.0    # ...or after this long, whichever comes first
    ENTER_PAUSE = 0.2   # between the typed line and its Enter (see docs/cli.md#nudges)
    RETRY_ENTER = 2     # more Enters when the pane did not change after the first
    DEFER_FOR = 600.0   # a busy pane (copy mode, a dialog) is tried again for this long
    DEFER_STEP = 1.0

    def __init__(self, store, env, log=None):
        self.store = store
        self.env = env
        self.dir = os.path.join(store.loc.var, "nudge")
        self.log = log or self._log_file

    def _log_file(self, msg):
        try:
            os.makedirs(self.dir, exist_ok=True)
            with open(os.path.join(self.dir, "nudge.log"), "a") as f:
                f.write("%s %s\n" % (now_ts(), msg))
        except OSError:
            pass

    def targets(self):
        """{agent: tmux record} of agents with a tmux pane started from this clone (on
        this host: another clone of the same machine leaves them to this one)."""
        host, origin = os.uname().nodename, self.store.origin
        out = {}
        for aid, rec in self.store.index.field_of_all("tmux").items():
            if isinstance(rec, dict) and rec.get("host") == host and rec.get("pane") and \
                    rec.get("origin") == origin:  # (no origin: not ours, never typed into)
                out[aid] = rec
        return out

    def collect(self, pairs, exclude=None):
        """[(recipient, message id, author)] -> [(recipient, message id)] worth a nudge:
        recipients with a pane here, never the author's own pane or `exclude`'s (the
        sending process's pane, (socket, pane))."""
        targets = self.targets() if pairs else {}
        out = []
        for to, mid, author in pairs:
            rec = targets.get(to)
            if rec is None or to == author:
                continue
            key = _tmux_pane_key(rec)
            if (author in targets and _tmux_pane_key(targets[author]) == key) or \
                    (exclude and exclude[1] and key == exclude):
                self.log("@%s: %s not nudged: sent from that agent's own pane %s"
                         % (to, mid, rec["pane"]))
                continue
            out.append((to, mid))
        return out

    def _path(self, aid, ext):
        return _safe_name_path(self.dir, aid, ext)

    def enqueue(self, items):
        """Queue nudges; returns the agents that got new ones."""
        by = {}
        for aid, mid in items:
            by.setdefault(aid, []).append(mid)
        os.makedirs(self.dir, exist_ok=True)
        for aid, mids in by.items():
            with FileLock(self._path(aid, ".qlock")):
                with open(self._path(aid, ".queue"), "a") as f:
                    f.write("".join(m + "\n" for m in mids))
        return list(by)

    def busy(self, aid):
        """Whether a nudger for `aid` runs right now (holds its lock)."""
        lock = FileLock(self._path(aid, ".lock"))
        try:
            if lock.acquire(wait=False):
                lock.release()
                return False
        except OSError:
            return False
        return True

    def take(self, aid):
        path = self._path(aid, ".queue")
        if not os.path.exists(path):
            return []
        with FileLock(self._path(aid, ".qlock")):
            try:
                with open(path, "r+") as f:
                    ids = [ln.strip() for ln in f if ln.strip()]
                    f.truncate(0)
            except OSError:
                return []
        return list(dict.fromkeys(ids))

    def run(self, aid):
        """Deliver what is queued for `aid`, as its only nudger (returns at once when
        another one runs: that one picks the new entries up)."""
        while True:
            lock = FileLock(self._path(aid, ".lock"))
            if not lock.acquire(wait=False):
                return
            try:
                while True:
                    self._settle(aid)
                    ids = self.take(aid)
                    if not ids:
                        break
                    self._deliver(aid, ids)
            finally:
                lock.release()
            try:  # queued while we let go of the lock: go round again
                if not os.path.getsize(self._path(aid, ".queue")):
                    return
            except OSError:
                return

    def _settle(self, aid):
        """Wait for the end of a burst: the queue unchanged for SETTLE seconds."""
        path, start = self._path(aid, ".queue"), time.monotonic()
        last, quiet = None, time.monotonic()
        while time.monotonic() - start < self.BURST_MAX:
            try:
                size = os.path.getsize(path)
            except OSError:
                size = 0
            if size != last:
                last, quiet = size, time.monotonic()
            elif time.monotonic() - quiet >= self.SETTLE:
                return
            time.sleep(0.05)

    def _fresh(self, aid, ids):
        """Ids still worth a nudge: not nudged before, not read, not deleted."""
        done = LocalRecord(self._path(aid, ".done")).load()
        ids = [i for i in dict.fromkeys(ids) if i not in done]
        if not ids:
            return [], []
        self.store.refresh()
        rows = self.store.index.unread_deliveries(aid, ids)
        return [r["message_id"] for r in rows], [r["author"] for r in rows]

    def _deliver(self, aid, ids):
        rec = self.targets().get(aid)
        if rec is None:
            return
        tm = Tmux(self.env, rec.get("socket"))
        if tm.exe is None:
            return
        deadline, deferred = time.monotonic() + self.DEFER_FOR, None
        while True:
            ids, authors = self._fresh(aid, ids)
            if not ids:
                return
            state = self._pane_state(tm, rec["pane"])
            if state == "hung":
                return
            if state == "gone":
                self._gone(aid, rec)
                return
            if state == "ready":
                break
            if state != deferred:  # said once per reason, so a test can wait on it
                deferred = state
                self.log("@%s: pane %s %s; nudge deferred" % (aid, rec["pane"], {
                    "copy-mode": "is in copy mode", "dialog": "shows a dialog"}[state]))
            if time.monotonic() > deadline:
                self.log("@%s: pane %s stayed busy for %ds; nudge dropped"
                         % (aid, rec["pane"], self.DEFER_FOR))
                return
            time.sleep(self.DEFER_STEP)
            ids += self.take(aid)  # what came meanwhile joins this nudge
        senders = list(dict.fromkeys(authors))
        who = ", ".join("@" + s for s in senders)
        line = ("New message from %s" % who if len(ids) == 1 else
                "%d new messages from %s" % (len(ids), who)) + \
            " -- run `thrum inbox --unread`"
        if self._type(tm, rec["pane"], line):
            LocalRecord(self._path(aid, ".done")).add(ids)
            self.log("@%s: nudged pane %s: %d message(s)" % (aid, rec["pane"], len(ids)))

    def _gone(self, aid, rec):
        """Note a vanished pane once (not on every message)."""
        mark = self._path(aid, ".gone")
        key = "%s %s\n" % _tmux_pane_key(rec)
        if _read_text(mark) == key:
            return
        self.log("@%s: tmux pane %s (session %s) is gone; no nudges until it is back"
                 % (aid, rec["pane"], rec.get("session")))
        try:
            _write_file_atomic(mark, key)
        except OSError:
            pass

    def _pane_state(self, tm, pane):
        """gone, copy-mode or dialog (a choice on screen): never typed into, or ready."""
        try:
            info = tm.pane(pane, "#{pane_dead}\t#{pane_in_mode}")
            if info is None or info.split("\t")[0] == "1":
                return "gone"
            if info.split("\t")[1] != "0":
                return "copy-mode"
            screen = tm.run("capture-pane", "-p", "-t", pane, check=False)[1]
        except ThrumError as e:
            self.log("tmux does not answer (%s); nudge dropped" % e.message)
            return "hung"  # never wait minutes on a hung server
        tail = "\n".join([ln for ln in screen.splitlines() if ln.strip()][-15:])
        return "dialog" if _DIALOG.search(tail) else "ready"

    def _look(self, tm, pane):
        return (tm.pane(pane, "#{cursor_x},#{cursor_y},#{history_size}"),
                tm.run("capture-pane", "-p", "-t", pane, check=False)[1])

    def _type(self, tm, pane, line):
        """The line literally, a pause, then Enter (again, a bounded number of times,
        while the pane shows no sign of it)."""
        try:
            tm.run("send-keys", "-t", pane, "-l", line)
            time.sleep(self.ENTER_PAUSE)
            before = self._look(tm, pane)
            tm.run("send-keys", "-t", pane, "Enter")
            for _ in range(self.RETRY_ENTER):
                time.sleep(0.3)
                if self._look(tm, pane) != before:
                    break
                tm.run("send-keys", "-t", pane, "Enter")
            return True
        except ThrumError as e:
            self.log("nudge into %s failed: %s" % (pane, e.message))
            return False


def nudge_after_write(router, events):
    """A Store listener of the CLI and the MCP server: nudge the tmux panes of the
    recipients of messages this process stored, unless a daemon runs (it nudges)."""
    pairs = [(to, ev["message_id"], ev["agent_id"]) for ev in events
             if ev.get("type") == "message.create" for to in ev.get("recipients") or ()]
    store, env = router.store, router.caller.env
    if not pairs or store is None:
        return
    nudges = Nudges(store, env)
    items = nudges.collect(pairs, exclude=(tmux_socket(env) or "", env.get("TMUX_PANE")))
    if not items or _which("tmux", env) is None or \
            DaemonFiles(store.loc.var, env).running():
        return
    # An agent whose nudger is running needs no new one: it takes up what was queued
    # before it lets go of its lock (no storm of nudger processes in a burst).
    agents = [a for a in nudges.enqueue(items) if not nudges.busy(a)]
    if agents:
        router.start_nudger(agents)


def _nudge_quietly(store, env, aid):
    try:
        Nudges(store, env).run(aid)
    except Exception:  # noqa: BLE001 - a nudge never disturbs its sender
        pass


def _spawn_nudger(store, env, agents):
    """Run the nudgers in a new process (posix_spawn: a millisecond for the sender, which
    exits without waiting; never a fork, which would carry SQLite's state along). It
    imports this file as a module, so it runs from cached bytecode when there is some."""
    argv = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
            "import thrum; thrum._nudge_main(sys.argv[2:])",
            os.path.dirname(os.path.abspath(__file__)), store.loc.store_root] + list(agents)
    try:
        os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)])
    except (OSError, AttributeError, TypeError):
        pass  # no nudge is worth failing a send


def _nudge_main(args):
    """The nudger process: `STORE_ROOT AGENT...`."""
    try:
        loc = locate(args[0])
        if loc.store:
            nudges = Nudges(Store(loc, dict(os.environ)), dict(os.environ))
            for aid in args[1:]:
                nudges.run(aid)
    except Exception:  # noqa: BLE001 - nobody to report to
        pass


# === 16. Daemon ===============================================================
#
# One optional process per store (SPEC §9). It holds `daemon.lock` (the lock, never
# the pid file, says whether a daemon runs), serves the operations of section 9 over
# a Unix socket with multiprocessing.connection's framing and handshake (JSON frames,
# never pickle; clients prove they hold `daemon.key`), and runs the background work:
# it watches the log files (a write made without it still wakes waiters), syncs
# (debounced push after writes, interval fetch, a cheap remote check while agents
# wait), and ends the sessions of agents whose long-lived process died.

#: daemon.log is rotated (one old copy kept) past this size.
DAEMON_LOG_MAX = 1 << 20


_CHALLENGE, _WELCOME, _FAILURE = b"#CHALLENGE#", b"#WELCOME#", b"#FAILURE#"


# -- the wire: multiprocessing.connection's framing and handshake, without importing it
# (20-30 ms on these machines, more than a whole send). A frame is a 4-byte big-endian
# signed length (-1, then 8 bytes, for huge frames) and the payload.

def _send_frame(sock, data):
    import struct
    head = struct.pack("!i", len(data)) if len(data) <= 0x7fffffff else \
        struct.pack("!iQ", -1, len(data))
    sock.sendall(head + data)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the daemon closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_frame(sock, limit=None):
    import struct
    n, = struct.unpack("!i", _recv_exact(sock, 4))
    if n == -1:
        n, = struct.unpack("!Q", _recv_exact(sock, 8))
    if n < 0 or (limit is not None and n > limit):
        raise ConnectionError("bad frame from the daemon")
    return _recv_exact(sock, n)


def _hmac(key, msg, name):
    """HMAC with the builtin hash modules where they exist (no hashlib/OpenSSL load)."""
    mods = {"md5": ("_md5", "md5"), "sha256": ("_sha2", "sha256")}.get(name)
    ctor = None
    if mods:
        for mod in (mods[0], "_sha256"):
            try:
                ctor = getattr(__import__(mod), mods[1])
                break
            except (ImportError, AttributeError):
                continue
    if ctor is None:
        import hmac
        return hmac.new(key, msg, name).digest()
    block = 64
    if len(key) > block:
        key = ctor(key).digest()
    key = key.ljust(block, b"\0")
    inner = ctor(bytes(b ^ 0x36 for b in key) + msg).digest()
    return ctor(bytes(b ^ 0x5c for b in key) + inner).digest()


#: Lengths of the classic handshake's challenge (random bytes) and answer (an MD5
#: digest): any other length is the `{digest}payload` form of newer Pythons. Telling
#: them apart by a leading "{" would misread 1 in 256 random challenges.
_LEGACY_CHALLENGE, _LEGACY_ANSWER = 20, 16


def _mac_for(key, challenge):
    """The answer to a challenge: `{digest}` + HMAC for newer Pythons' prefixed
    challenges, a bare HMAC-MD5 for the classic ones."""
    if len(challenge) != _LEGACY_CHALLENGE and challenge.startswith(b"{"):
        end = challenge.find(b"}")
        name = challenge[1:end].decode("ascii", "replace")
        return b"{" + name.encode("ascii") + b"}" + _hmac(key, challenge, name)
    return _hmac(key, challenge, "md5")


def _check_mac(key, challenge, answer):
    if len(answer) != _LEGACY_ANSWER and answer.startswith(b"{"):
        end = answer.find(b"}")
        name = answer[1:end].decode("ascii", "replace")
        if name not in ("md5", "sha256", "sha384", "sha3_256", "sha3_384"):
            return False
        return _hmac(key, challenge, name) == answer[end + 1:]
    return _hmac(key, challenge, "md5") == answer


class DaemonUnavailable(Exception):
    """No daemon answered (none runs, a sandbox forbids the connect, a wrong key):
    the CLI works directly instead, silently."""


class DaemonClient:
    """A short-lived client of the daemon over `socket` (what
    multiprocessing.connection.Client would do, at a fraction of the import cost)."""

    #: A kept connection idle longer than this is replaced by a new one, well before the
    #: daemon closes idle ones (Daemon.IDLE), so a request never meets a closing socket.
    REUSE = 5.0

    def __init__(self, files):
        self.files = files
        self._sock = None  # kept open between the requests of one command
        self._used = 0.0   # when the kept connection last carried a request
        self.aborted = False  # set by abort(): the request in flight must not go on

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def abort(self):
        """From another thread: end the request in flight (its reply is not read),
        or the next one before it is sent."""
        self.aborted = True
        sock = self._sock
        if sock is not None:
            import _socket
            try:
                sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass

    def _open(self, timeout):
        """The kept connection if the daemon still holds it open, else a new one."""
        import _socket
        if self._sock is not None and time.monotonic() - self._used > self.REUSE:
            self.close()
        if self._sock is not None:
            try:  # a closed peer reads as b"" at once; an open one has nothing to read
                self._sock.settimeout(0.0)  # (with a timeout, recv would wait for data)
                if self._sock.recv(1, _socket.MSG_PEEK) == b"":
                    self.close()
            except BlockingIOError:
                self._sock.settimeout(timeout)
                return self._sock
            except OSError:
                self.close()
        if self._sock is None:
            self._sock = self._connect(timeout)
        return self._sock

    def _connect(self, timeout):
        import _socket  # the C module alone: `socket` costs ~2 ms more to import
        info = self.files.info()
        if not info["running"]:
            raise DaemonUnavailable("no daemon")
        key = self.files.read_key()
        if not key:
            raise DaemonUnavailable("no key")
        path = info.get("socket") or self.files.default_socket
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            for attempt in range(50):  # a full accept queue answers EAGAIN at once
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:
                    if attempt == 49:
                        raise
                    time.sleep(0.01)
            # The server's challenge first, then ours (as Client() does).
            msg = _recv_frame(sock, 256)
            if not msg.startswith(_CHALLENGE):
                raise DaemonUnavailable("unexpected handshake")
            _send_frame(sock, _mac_for(key, msg[len(_CHALLENGE):]))
            if _recv_frame(sock, 256) != _WELCOME:
                raise DaemonUnavailable("the daemon refused our key")
            mine = os.urandom(20)
            _send_frame(sock, _CHALLENGE + mine)
            ok = _check_mac(key, mine, _recv_frame(sock, 256))
            _send_frame(sock, _WELCOME if ok else _FAILURE)
            if not ok:
                raise DaemonUnavailable("the daemon did not prove the key")
        except (OSError, ConnectionError, ValueError) as e:
            sock.close()
            raise DaemonUnavailable(str(e))
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, req, timeout=5.0, wait=None, retry_safe=True):
        """Send one request; return the reply. `timeout` bounds the connect and
        handshake; `wait` is how long the reply may take (a blocking wait; default
        300 s). Raises DaemonUnavailable when the daemon cannot be reached, or when the
        reply never comes for a request that is safe to run again (`retry_safe`), so
        the caller works directly; a write that was sent but never answered is an
        error instead (it may have been done: running it again could do it twice)."""
        sock = self._open(timeout)
        if self.aborted:  # after _open: an abort during the connect saw no socket
            self.aborted = False  # (it ends this request, nothing later)
            self.close()
            raise DaemonUnavailable("aborted")
        done = False
        try:
            try:
                _send_frame(sock, json.dumps(req).encode("utf-8"))
            except (OSError, ValueError) as e:
                raise DaemonUnavailable(str(e))
            sock.settimeout(300.0 if wait is None else wait + 30.0)
            try:
                data = _recv_frame(sock)
                done = True
                self._used = time.monotonic()
            except (OSError, ConnectionError, ValueError) as e:
                if retry_safe:
                    raise DaemonUnavailable(str(e))
                raise ThrumError("the daemon went away while doing %s (%s): it may or may "
                                 "not be done" % (req.get("op"), e),
                                 hint="check (e.g. 'thrum sent'), then retry if needed")
        finally:
            if not done:
                self.close()
        try:
            reply = json.loads(data)
        except ValueError:
            raise DaemonUnavailable("a reply that is not JSON")
        if not isinstance(reply, dict):
            raise DaemonUnavailable("a reply that is not an object")
        return reply

    def call(self, op, params, caller, wait=None):
        """call() through the daemon: the same result, or the same error raised. A
        request that was never answered is run again by the caller only when the
        operation declares that safe (Operation.retry_safe)."""
        spec = OPS.get(op)
        reply = self.request({"op": op, "params": params, "caller": caller.to_dict()},
                             wait=wait, retry_safe=spec is not None and spec.may_retry(params))
        if reply.get("busy"):  # the daemon keeps its workers for others: run it here
            raise DaemonUnavailable("busy")
        if reply.get("ok"):
            if reply.get("after_error"):
                raise AfterWriteError(_error_from(reply["after_error"]), reply.get("result"))
            return reply.get("result")
        raise _error_from(reply.get("error") or {})


def _error_from(payload):
    """A ThrumError from an error payload (the inverse of error_payload)."""
    code = payload.get("exit_code") if isinstance(payload.get("exit_code"), int) else EXIT_FAIL
    return ThrumError(str(payload.get("message") or "the daemon failed"),
                      hint=payload.get("hint"), exit_code=code)


class ContextPublishing:
    """When a daemon publishes an agent's work context (SPEC §8, no commit noise): a
    change must hold for SETTLE seconds (an editor's swap file that appears and vanishes
    is no event), and an agent publishes at most once per EVERY seconds (so at most one
    work-context commit per agent per minute). The clock is injected for tests."""

    SETTLE = 10.0
    EVERY = 60.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._seen = {}   # agent -> (observed context, since when)
        self._last = {}   # agent -> when it last published

    def decide(self, agent, observed, published):
        """'publish' (write it now), 'changed' (a new change: wait for it to settle),
        'wait' (not settled yet, or too soon after the last one), 'revert' (a change that
        went back to what is published: dropped), or None (unchanged)."""
        now = self.clock()
        if observed == published:
            return "revert" if self._seen.pop(agent, None) is not None else None
        seen = self._seen.get(agent)
        if seen is None or seen[0] != observed:
            self._seen[agent] = (observed, now)
            return "changed"
        last = self._last.get(agent)
        if now - seen[1] < self.SETTLE or (last is not None and now - last < self.EVERY):
            return "wait"
        self._seen.pop(agent, None)
        self._last[agent] = now
        return "publish"


class Daemon:
    """The daemon process for one store. `run()` returns when it is told to stop.

    Threads: the main one (signals, shutdown), `accept`, one `client` per connection,
    and the loops `watch`, `sync`, `reap`, `context` and `nudge` (plus a nudger per
    agent being nudged). What they share, and what guards it:

        field                      guarded by        written by
        _changes, _waiting         _cond             _changed() (any thread), _wait()
        _watching                  _cond             watching() (any thread)
        _synced_sig, _syncing      _cond             the sync loop; read by the watch loop
        remote_counts              (one writer)      the sync loop; read by status()
        schedule.*                 schedule.cond     SyncSchedule's methods (any thread)
        _stopped                   (an Event)        stop()
        key, socket, listener      set before any thread starts, read-only after
        store.contexts             replaced whole by the context loop (never mutated);
                                   readers take the reference once
    """

    #: How often the log files are checked for writes made without the daemon.
    WATCH_EVERY = 0.25
    #: How often sessions with a recorded long-lived pid are checked.
    REAP_EVERY = 3.0
    #: How often local agents' worktrees are looked at (live work contexts).
    CONTEXT_EVERY = 5.0
    #: Threads that serve clients (a fixed pool: more clients wait in the backlog), of
    #: which at most MAX_WAITS may block in waits (beyond, a client waits by itself).
    WORKERS = 16
    MAX_WAITS = 12
    #: A client connection idle this long is closed (its worker takes the next one);
    #: clients reconnect after half of it (DaemonClient.REUSE).
    IDLE = 10.0
    #: Bounds on a client's handshake and on writing a reply to it.
    HANDSHAKE_WAIT = 5.0
    SEND_WAIT = 30.0
    #: The largest request the daemon reads.
    FRAME_MAX = 64 << 20

    def __init__(self, store, env, clock=time.monotonic):
        self.store = store
        self.env = env
        self.files = DaemonFiles(store.loc.var, env)
        self._stopped = threading.Event()  # set by stop(): loops sleep on it
        self._cond = threading.Condition()
        self._changes = 0            # bumped on every change of the log (wakes waiters)
        self._waiting = 0            # requests blocked in a wait
        self._watching = 0           # streams holding the clone active (watching())
        self._synced_sig = None      # the log as the last sync cycle's merge left it
        self._syncing = False        # a sync cycle runs (its merge may be writing)
        #: Remote requests of this daemon's syncs and checks, and pushes the remote
        #: rejected because another clone pushed first (`daemon status`).
        self.remote_counts = {"ls-remote": 0, "fetch": 0, "push": 0, "rejected": 0}
        self.schedule = SyncSchedule(*self._intervals(), clock=clock)
        self.listener = None
        self.socket = None

    @property
    def stopping(self):
        return self._stopped.is_set()

    def _intervals(self):
        """(sync.interval, sync.wait_interval) in seconds, as configured now."""
        cfg = self.store.config
        return (parse_duration(cfg.get("sync.interval")),
                parse_duration(cfg.get("sync.wait_interval")))

    # -- logging -------------------------------------------------------------------
    def log(self, msg):
        line = "%s %s\n" % (now_ts(), msg)
        try:
            if os.path.getsize(self.files.log) > DAEMON_LOG_MAX:
                os.replace(self.files.log, self.files.log + ".1")
        except OSError:
            pass
        try:
            fd = os.open(self.files.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW,
                         0o600)
            try:
                os.write(fd, line.encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError:
            pass

    # -- lifecycle -----------------------------------------------------------------
    def run(self):
        """Take the lock, listen, serve until stopped. Returns an exit code."""
        import signal
        var = self.files.var
        os.makedirs(var, mode=0o700, exist_ok=True)
        own_path(var, "thrum's local state", private=True)
        for path in (self.files.lock, self.files.key, self.files.pid, self.files.log):
            own_path(path, "file")
        lock = FileLock(self.files.lock)
        if not lock.acquire(timeout=DAEMON_LOCK_TRY):
            return None  # another daemon runs (or a stop holds it): never disturb it
        try:
            return self._serve(signal)
        finally:
            for path in (self.socket, self.files.pid):
                try:
                    if path:
                        os.unlink(path)
                except OSError:
                    pass
            lock.release()  # releasing the lock is the last thing a daemon does

    def _serve(self, signal):
        import socket
        key = self.files.read_key()
        if not key:
            key = os.urandom(32).hex().encode("ascii")
            _write_file_atomic(self.files.key, key, 0o600)
        self.key = key
        self.socket = self.files.socket_path()
        try:
            os.unlink(self.socket)  # stale, from a daemon that was killed
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.socket)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket, 0o600)
        listener.listen(1024)  # connections beyond the workers wait here (up to somaxconn)
        listener.settimeout(0.5)  # workers look up at a stop
        self.listener = listener
        _write_file_atomic(self.files.pid, json.dumps(
            {"pid": os.getpid(), "socket": os.path.abspath(self.socket),
             "started_at": now_ts()}) + "\n", 0o600)
        self.store.listeners.append(self._on_write)
        self.store.pushed_by_daemon = bool(self.store.loc.git_common)
        signal.signal(signal.SIGTERM, lambda *a: self.stop())
        signal.signal(signal.SIGINT, lambda *a: self.stop())
        self.log("daemon %d started for %s (socket %s)" % (os.getpid(), self.store.path,
                                                          self.socket))
        threads = {fn: start_thread("daemon-" + fn.__name__.strip("_").replace("_loop", ""),
                                    self._guard, fn)
                   for fn in (self._watch_loop, self._sync_loop, self._reap_loop,
                              self._context_loop, self._nudge_loop)}
        for n in range(self.WORKERS):
            start_thread("daemon-worker-%d" % n, self._guard, self._worker_loop)
        while not self._stopped.wait(0.5):
            pass
        self.log("daemon %d stopping" % os.getpid())
        try:
            self.listener.close()
        except OSError:
            pass
        self._shut_down(threads[self._sync_loop])
        return EXIT_OK

    def _shut_down(self, sync_thread):
        """A clean stop within sync.timeout (SPEC §9): the sync cycle in flight may finish,
        pending writes get one more cycle in the time left, and then every git or tmux
        process this daemon started is killed: none outlives it."""
        budget = parse_duration(self.store.config.get("sync.timeout"))
        deadline = time.monotonic() + budget
        if not self._within(sync_thread, deadline):
            self.log("the sync in progress did not end within %s; stopped it"
                     % format_duration(budget))
        if self.schedule.pending() and self.store.loc.git_common and \
                time.monotonic() < deadline:
            flush = start_thread("daemon-flush", self._guard, self._flush_sync)
            if not self._within(flush, deadline):
                self.log("the final sync did not end within %s; stopped it (run "
                         "'thrum sync force')" % format_duration(budget))
        CHILDREN.kill_all()

    @staticmethod
    def _within(thread, deadline):
        """Let a thread end by `deadline`; past it, kill the git processes it waits on.
        True when it ended in time."""
        thread.join(max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            return True
        CHILDREN.kill_all()
        thread.join(5.0)
        return False

    def stop(self):
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        self.schedule.poke()  # the sync loop looks up and sees the stop

    def _guard(self, fn, *args):
        """Run a connection, or a background loop (restarted after a bug, a second
        later); a bug is logged and never kills the daemon."""
        try:
            while True:
                try:
                    fn(*args)
                    return
                except Exception:  # noqa: BLE001
                    import traceback
                    self.log("error in %s:\n%s" % (fn.__name__, traceback.format_exc()))
                    if args or self._stopped.wait(1.0):
                        return  # a connection ends; a loop starts again
        finally:
            self.store.close()  # this thread's index connection

    # -- serving -------------------------------------------------------------------
    def _worker_loop(self):
        """One of WORKERS threads: take the next client from the listening socket (more
        wait in its backlog), serve its requests until it closes, goes idle for IDLE
        seconds or the daemon stops, then take the next one. A worker keeps its SQLite
        connection across clients, so a burst costs no descriptors or memory that stay."""
        import socket
        idle_since = time.monotonic()
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                if idle_since is not None and time.monotonic() - idle_since > self.IDLE:
                    self.store.close()  # idle after a burst: keep no connection open
                    idle_since = None
                continue
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.05)
                continue
            try:
                self._serve_client(sock)
            finally:
                sock.close()
                idle_since = time.monotonic()

    def _serve_client(self, sock):
        import socket
        sock.settimeout(self.HANDSHAKE_WAIT)
        try:
            self._handshake(sock)
        except ValueError as e:  # a wrong key
            self.log("refused a client: %s" % e)
            return
        except (OSError, ConnectionError):  # gone (it gave up waiting in the backlog)
            return
        while not self.stopping:
            sock.settimeout(self.IDLE)
            try:
                data = _recv_frame(sock, self.FRAME_MAX)
            except socket.timeout:
                return  # idle: the worker goes to the next client (this one reconnects)
            except (OSError, ConnectionError):
                return
            try:
                reply = self._handle(data, sock)
            except WaitAbandoned:
                return  # no reply: the client's wait carries on by itself
            sock.settimeout(self.SEND_WAIT)
            try:
                _send_frame(sock, json.dumps(reply, allow_nan=False).encode("utf-8"))
            except (OSError, ValueError):
                result = reply.get("result")  # a wait's client is gone: free what it held
                if isinstance(result, dict) and result.get("claim"):
                    settle_claim(self.store.loc.var, result["claim"], False)
                return

    def _handshake(self, sock):
        """multiprocessing.connection's handshake, both ways: the client proves it holds
        daemon.key, then the daemon does (what Listener(authkey=...) and Client() do)."""
        challenge = os.urandom(_LEGACY_CHALLENGE)
        _send_frame(sock, _CHALLENGE + challenge)
        if not _check_mac(self.key, challenge, _recv_frame(sock, 256)):
            _send_frame(sock, _FAILURE)
            raise ValueError("the client did not prove the key")
        _send_frame(sock, _WELCOME)
        msg = _recv_frame(sock, 256)
        if not msg.startswith(_CHALLENGE):
            raise ValueError("no challenge from the client")
        _send_frame(sock, _mac_for(self.key, msg[len(_CHALLENGE):]))
        if _recv_frame(sock, 256) != _WELCOME:
            raise ValueError("the client refused the daemon's answer")

    def _handle(self, data, conn=None):
        try:
            req = json.loads(data)
            if not isinstance(req, dict):
                raise UsageError("a request must be a JSON object")
            op = req.get("op")
            if op == "daemon_status":
                return {"ok": True, "result": self.status()}
            if op == "daemon_stop":
                self.stop()
                return {"ok": True, "result": {"stopping": True, "pid": os.getpid()}}
            spec = OPS.get(op)
            if spec is None or spec.needs == NEEDS_NOTHING:  # without a store: no daemon
                raise UsageError("operation %r is not served by the daemon" % (op,))
            caller = Caller.from_dict(req.get("caller"))
            params = req.get("params") or {}
            self.schedule.command()  # an agent is active: keep the short remote check
            if spec.blocks and isinstance(params, dict):
                with self._cond:
                    busy = self._waiting >= self.MAX_WAITS
                if busy:  # workers are kept for other requests: the client waits itself
                    return {"ok": False, "busy": True, "error": error_payload(ThrumError(
                        "the daemon serves %d waits already" % self.MAX_WAITS))}
                return {"ok": True, "result": self._wait(op, dict(params), caller, conn)}
            try:
                return {"ok": True, "result": call(op, params, caller, self.store)}
            except AfterWriteError as e:
                return {"ok": True, "result": e.result, "after_error": error_payload(e.error)}
        except (KeyboardInterrupt, SystemExit, MemoryError, WaitAbandoned):
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
            if not isinstance(e, ThrumError):
                import traceback
                self.log("request failed:\n%s" % traceback.format_exc())
            return {"ok": False, "error": error_payload(e)}

    def _wait(self, op, params, caller, conn=None):
        """A wait that blocks on the daemon's change notification (no polling). It ends
        as soon as its client goes away (killed, timed out), so it never takes a message
        as delivered for a listener that is no longer there."""
        with self._cond:
            self._waiting += 1
            seen = [self._changes]
        self.schedule.poke()  # the sync loop checks the remote every wait_interval now

        def gone():
            if conn is None:
                return False
            import select
            try:  # the client sends nothing while it waits: readable means closed
                return bool(select.select([conn], [], [], 0)[0])
            except (OSError, ValueError):
                return True

        def wake(seconds):
            deadline = time.monotonic() + seconds
            with self._cond:
                while self._changes == seen[0] and not self.stopping and not gone():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 1.0))  # a look at the client every second
                seen[0] = self._changes
            if self.stopping or gone():
                raise WaitAbandoned()
        try:  # woken by changes, not by a clock: between them it costs nothing
            return call(op, params, caller, self.store, hooks=dict(
                _poll=3600.0, _wake=wake, _alive=lambda: not gone(), _hold=True))
        finally:
            with self._cond:
                self._waiting -= 1

    def status(self):
        return {"pid": os.getpid(), "socket": self.socket, "store": self.store.path,
                "waiting": self._waiting, "watching": self._watching,
                "sync": self.store.config.get("sync.interval"),
                "active": self.schedule.active(self._listening()),
                "remote": dict(self.remote_counts)}

    def _listening(self):
        """Whether an agent of this clone waits or watches right now."""
        with self._cond:
            return self._waiting + self._watching > 0

    def watching(self):
        """Hold this clone active while a stream runs (`with daemon.watching(): ...`,
        for `thrum watch`): like a blocked wait, it keeps the remote check at
        sync.wait_interval (SPEC §9)."""
        import contextlib

        @contextlib.contextmanager
        def held():
            with self._cond:
                self._watching += 1
            self.schedule.poke()
            try:
                yield
            finally:
                with self._cond:
                    self._watching -= 1
        return held()

    # -- background work -------------------------------------------------------------
    def _changed(self, local):
        with self._cond:
            self._changes += 1
            self._cond.notify_all()
        if local:
            self.schedule.wrote()  # a push soon; remote checks at the short interval

    def _on_write(self, events):
        """A request served here wrote events: wake waiters now, schedule a push."""
        self._changed(local=True)

    def _watch_loop(self):
        """Notice writes made without the daemon (a sandboxed agent, a sync run by hand)
        and a deleted index, by stat: no SQL while nothing changes."""
        seen = judged = self.store.log_signature(None)
        holds = holds_signature(self.store.loc.var)
        index = os.path.join(self.store.loc.var, "index.db")
        while not self._stopped.wait(self.WATCH_EVERY):
            now_holds = holds_signature(self.store.loc.var)
            if now_holds != holds:  # a hold was released: the waits that skipped it look
                holds = now_holds
                self._changed(local=False)
            sig = self.store.log_signature(None)
            if not os.path.exists(index):
                self.log("index.db was deleted; rebuilding it")
                self.store.refresh()
            if sig != seen:
                seen = sig
                try:
                    self.store.refresh()
                except ThrumError as e:
                    self.log("catching up: %s" % e.message)
                self._changed(local=False)  # waiters look
            # Lines a sync merged in need no push; anything else was written here. While
            # a cycle runs its merge may be writing: judged once it is over.
            with self._cond:
                synced, syncing = self._synced_sig, self._syncing
            if sig != judged and not syncing:
                if sig != synced:
                    self.schedule.wrote()
                    if self._by_agents(synced or judged, sig):
                        self.schedule.command()  # a direct send or read: an agent is active
                judged = sig

    @staticmethod
    def _by_agents(before, after):
        """Whether messages, receipts or groups changed (agents' commands write them;
        the daemon's own writes, work contexts and ended sessions, go to agents/)."""
        def part(sig):
            return {e for e in sig if not e[0].startswith("agents/")}
        return part(before) != part(after)

    def _sync_loop(self):
        """Run sync cycles when the schedule says so (SyncSchedule: a debounced push in
        this clone's slot after local writes, a fetch every sync.interval, cheap remote
        checks while an agent is active). Failures back off and never stop it."""
        if not self.store.loc.git_common:
            return
        sched = self.schedule
        try:
            sched.set_slot(*self.store.sync_engine().push_slot())
        except ThrumError as e:
            self.log("sync: %s" % e.message)
        while not self.stopping:
            sched.set_intervals(*self._intervals())  # `config set` applies at once
            listening = self._listening()
            with sched.cond:
                due = sched.due_in(listening)
                if due > 0 and not self.stopping:
                    sched.cond.wait(min(due, 5.0))
            if self.stopping:
                return
            action = sched.next_action(self._listening())
            if action == "check":
                run = self._remote_moved()
            elif action in ("push", "fetch"):  # (no remote: committed at the next interval)
                run = self.store.sync_engine().has_remote()
            else:
                run = action == "commit"
            if run:  # writes waiting for their push slot are not pushed by other cycles
                self._sync_cycle(push=action in ("push", "commit") or not sched.pending())

    def _sync_cycle(self, push=True):
        sched = self.schedule
        if push:
            sched.started()
        eng = None
        with self._cond:
            self._syncing = True
        try:
            eng = self.store.sync_engine()
            res = eng.cycle(push=push)
        except ThrumError as e:
            sched.failed()
            self.log("sync failed (%d in a row): %s" % (sched.failures, e.message))
            return
        finally:
            with self._cond:
                self._syncing = False
                if eng is not None and eng.merged_sig is not None:
                    self._synced_sig = eng.merged_sig
            self._count(eng)
        sched.ran(pulled=bool(res.get("pulled")))
        sched.set_slot(*eng.push_slot())
        if res.get("pulled"):
            self._changed(local=False)

    def _count(self, eng):
        if eng is not None:
            for k, n in eng.counts.items():
                self.remote_counts[k] = self.remote_counts.get(k, 0) + n

    def _remote_moved(self):
        """The cheap check (one `git ls-remote`): has the remote branch moved past what
        we last fetched? Reports the outcome to the schedule."""
        eng = None
        try:
            eng = self.store.sync_engine()
            moved = eng.remote_moved()
        except ThrumError as e:
            self.schedule.check_failed()
            if self.schedule.check.failures == 1:  # once per outage, not every check
                self.log("remote check failed: %s" % e.message)
            return False
        finally:
            self._count(eng)
        self.schedule.checked(moved)
        return moved

    def _flush_sync(self):
        """On a clean stop, push what is pending (bounded by _shut_down)."""
        if self.schedule.pending() and self.store.loc.git_common:
            try:
                self.store.sync_engine().cycle()
            except ThrumError as e:
                self.log("final sync failed: %s" % e.message)

    def _context_loop(self):
        """Live work contexts: every few seconds, each local agent's worktree (branch,
        files changed against the default branch, uncommitted files), asked with
        --no-optional-locks, kept live for who-has and team (Store.contexts), and
        recorded as agent.update when ContextPublishing says so."""
        host = os.uname().nodename
        cache, publishing = {}, ContextPublishing()
        while not self.stopping:
            try:
                self.store.refresh()
                idx = self.store.index
                # This clone's agents only: another clone's daemon looks after its own.
                rows = idx.local_agents(host, self.store.origin)
                branches, files = idx.field_of_all("branch"), idx.field_of_all("files")
                by_wt = {}
                for r in rows:
                    wt = r["worktree"]
                    if wt and os.path.isdir(wt):
                        by_wt.setdefault(os.path.realpath(wt), []).append(r["agent_id"])
                events, contexts = [], {}
                for wt, agents in by_wt.items():
                    wc = work_context(wt, self.store.env, cache)
                    contexts[wt] = (now_ts(), wc)
                    for aid in agents:
                        decision = publishing.decide(
                            aid, (wc["branch"], wc["files"]),
                            (branches.get(aid), files.get(aid) or []))
                        if decision == "publish":
                            events.append(self.store.event("agent.update", agent_id=aid,
                                                           branch=wc["branch"],
                                                           files=wc["files"]))
                        elif decision == "changed":
                            self.log("work context of @%s changed; published once it holds "
                                     "for %ds" % (aid, publishing.SETTLE))
                        elif decision == "revert":
                            self.log("work context of @%s: a change went back within %ds; "
                                     "not published" % (aid, publishing.SETTLE))
                self.store.contexts = contexts  # replaced whole: readers never see it change
                if events:
                    self.store.emit(events)
                    self._changed(local=True)
            except ThrumError as e:
                self.log("work contexts: %s" % e.message)
            self._stopped.wait(self.CONTEXT_EVERY)

    def _nudge_loop(self):
        """Nudge the tmux panes of agents on this host for every message new to the
        store: written through the daemon or without it, or pulled in by a sync."""
        nudges = Nudges(self.store, self.env, log=self.log)
        mark = now_ts(time.time() - 1.0)
        seen = {}                       # (agent, message id) -> when it was queued
        running = set()                 # agents with a nudger thread of ours
        lock = threading.Lock()
        with self._cond:
            last = self._changes

        def nudger(aid):
            try:
                nudges.run(aid)
            finally:
                with lock:
                    running.discard(aid)
        while not self.stopping:
            with self._cond:
                while self._changes == last and not self.stopping:
                    self._cond.wait(1.0)
                last = self._changes
            if self.stopping:
                return
            try:
                if not nudges.targets():
                    continue
                # Overlapping windows (2 s back) and `seen`: a message projected by
                # another process a moment before a later one is not missed.
                since = now_ts(parse_ts(mark) - 2.0)
                rows = self.store.index.arrivals_since(since)
            except ThrumError as e:
                self.log("nudges: %s" % e.message)
                continue
            now = time.monotonic()
            for k in [k for k, t in seen.items() if now - t > 60.0]:
                del seen[k]
            fresh = [(r["agent_id"], r["message_id"], r["author"]) for r in rows
                     if (r["agent_id"], r["message_id"]) not in seen]
            mark = max([mark] + [r["arrived_at"] for r in rows if r["arrived_at"]])
            items = nudges.collect(fresh)
            for a, m, _ in fresh:
                seen[(a, m)] = now
            if items:
                for aid in nudges.enqueue(items):
                    with lock:
                        if aid in running:
                            continue
                        running.add(aid)
                    start_thread("nudge-" + aid, self._guard, nudger, aid)

    def _reap_loop(self):
        """End the sessions of agents whose recorded long-lived process died (SPEC §14
        "Dead agents"); short-lived CLI processes record no pid and are never reaped."""
        host = os.uname().nodename
        while not self._stopped.wait(self.REAP_EVERY):
            Claims.reap()  # descriptors of holds its clients settled (or never did)
            try:
                idx = self.store.index
                self.store.refresh()
                dead = [r for r in idx.sessions_with_pid(host, self.store.origin)
                        if not _pid_alive(r["pid"])]
                if dead:
                    self.store.emit([self.store.event(
                        "agent.session.end", agent_id=r["agent_id"],
                        session_id=r["session_id"], reason="process %d exited" % r["pid"])
                        for r in dead])
                    self.log("ended %d session(s) of dead processes" % len(dead))
                    self._changed(local=True)
            except ThrumError as e:
                self.log("session check: %s" % e.message)
            self._retention()

    #: How often retention (retention.days) purges, at most.
    RETENTION_EVERY = 86400.0

    def _retention(self):
        """With retention.days set, purge what is older, once a day at most, and only
        when that takes something (SPEC §17). The last run is recorded in
        var/retention.json, so a restarted daemon does not run it again within a day."""
        days = self.store.config.get("retention.days")
        if not days:
            return
        path = os.path.join(self.store.loc.var, "retention.json")
        try:
            last = parse_ts(json.loads(_read_text(path) or "{}").get("last_run") or "")
        except (ValueError, AttributeError, TypeError):
            last = 0.0
        if 0 <= time.time() - last < self.RETENTION_EVERY:
            return
        caller = Caller(self.store.loc.store_root, self.env)
        try:
            params = {"before": "%dd" % days}
            r = call("purge", params, caller, self.store)
            if r["messages"] or r["receipts"]:
                r = call("purge", dict(params, confirm=True), caller, self.store,
                         hooks={"_by": "daemon"})
                self.log("retention (%d days): purged %d messages and %d receipts "
                         "created before %s" % (days, r["messages"], r["receipts"],
                                                r["before"]))
                self._changed(local=True)
            _write_file_atomic(path, json.dumps({"last_run": now_ts(), "days": days,
                                                 "purged": r["messages"]}) + "\n", 0o600)
        except (ThrumError, OSError) as e:
            self.log("retention: %s" % getattr(e, "message", e))


def start_daemon(store, env, files, wait=10.0):
    """Start a detached daemon (it holds none of our pipes) and wait until it answers.
    Returns (its info, whether this call started it). Concurrent starts give one
    daemon: the lock decides."""
    info = files.info()
    proc = None if info["running"] else spawn_daemon(store, env, files)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        info = files.info()
        if info["running"] and info.get("socket"):  # it answers: report it
            try:
                DaemonClient(files).request({"op": "daemon_status"}, timeout=2.0)
                return info, proc is not None and info.get("pid") == proc.pid
            except DaemonUnavailable:
                pass
        elif proc is not None and proc.poll() not in (None, 0):
            raise ThrumError("the daemon did not start (exit %s)" % proc.returncode,
                             hint="see %s" % files.log)
        time.sleep(0.02)
    raise ThrumError("the daemon did not answer within %ds" % wait, hint="see %s" % files.log)


def spawn_daemon(store, env, files):
    """`thrum daemon run` as a detached process: its own session, no terminal, and none
    of our pipes (its output goes to daemon.log)."""
    import subprocess
    files.clean()
    os.makedirs(files.var, exist_ok=True)
    log = os.open(files.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW, 0o600)
    try:
        return subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--repo", store.loc.store_root,
             "daemon", "run"], cwd=store.loc.store_root, env=env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True)
    finally:
        os.close(log)


#: How long a starting daemon tries for the lock (a status probe holds it shared for an
#: instant); `daemon stop` holds the lock longer than this after the daemon is gone, so a
#: start that raced with it cannot take it over.
DAEMON_LOCK_TRY = 0.5


def stop_daemon(files, wait=None):
    """Stop the running daemon (asked over its socket, else SIGTERM); True if one ran.

    When it returns, no daemon of the store runs, even when `daemon start`s raced with
    the stop: it asks every daemon that holds the lock meanwhile to stop, takes the lock
    itself, and holds it a moment longer than a starting daemon tries for it. A daemon's
    own stop is bounded by sync.timeout (the sync in flight, one more for pending writes,
    then its git processes are killed); this waits that long plus 15 s."""
    if wait is None:
        try:
            wait = 15.0 + parse_duration(Config(os.path.dirname(files.var), files.env)
                                         .get("sync.timeout"))
        except ThrumError:
            wait = 45.0
    deadline = time.monotonic() + wait
    lock, asked, ran = FileLock(files.lock), set(), False
    while not lock.acquire(wait=False):
        info = files.info()
        if info["running"] and info["pid"] and info["pid"] not in asked:
            asked.add(info["pid"])
            ran = True
            _ask_to_stop(files, info["pid"])
        if time.monotonic() > deadline:
            pids = " ".join(map(str, sorted(asked))) or "?"
            raise ThrumError("the daemon (pid %s) did not stop within %ds" % (pids, wait),
                             hint="kill it: kill %s" % pids)
        time.sleep(0.02)
    try:
        time.sleep(DAEMON_LOCK_TRY + 0.2)  # a start that raced with us gives up meanwhile
    finally:
        lock.release()
    files.clean()
    return ran


def _ask_to_stop(files, pid):
    import signal
    try:
        DaemonClient(files).request({"op": "daemon_stop"}, timeout=2.0)
    except DaemonUnavailable:  # not listening (yet, or any more): the signal does it
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


# === 17. The front ends' way in: Router =======================================

class Cancel:
    """A flag another thread raises to abandon a call (a cancelled MCP request, a
    server shutting down); what is registered with `on_set` runs when it is raised."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._fns = []

    def set(self):
        with self._lock:
            fns, self._fns = self._fns, []
            self._event.set()
        for fn in fns:
            try:
                fn()
            except Exception:  # noqa: BLE001 - cancelling must not fail
                pass

    def is_set(self):
        return self._event.is_set()

    def wait(self, seconds):
        return self._event.wait(seconds)

    def on_set(self, fn):
        with self._lock:
            if not self._event.is_set():
                self._fns.append(fn)
                return
        fn()

    def off(self, fn):
        with self._lock:
            if fn in self._fns:
                self._fns.remove(fn)


# -- the front ends' way in ------------------------------------------------------------

class Router:
    """Runs operations for one caller, as the CLI and the MCP server do: through the
    store's daemon when one answers, else directly on this process's Store, with the
    same result either way. Threads may share it: each keeps its own daemon connection.
    """

    #: Config keys that only change what a front end does (not the operation's result).
    FRONT_KEYS = ("mcp.",)

    #: Nudgers run in threads (a long-lived front end) or in a spawned process (the CLI).
    threads = False

    def __init__(self, caller, autostart=True, overrides=None):
        self.caller = caller
        self.store = None
        self._overrides = overrides  # config this front end sets for its own store
        self._autostarted = not autostart
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._clients = []
        loc = locate(caller.cwd)
        if loc.store:
            self._open(loc)

    def _open(self, loc):
        self.store = Store(loc, self.caller.env, self._overrides)
        self.store.listeners.append(lambda events: nudge_after_write(self, events))

    def start_nudger(self, agents):
        """Type the queued nudges for these agents without holding up this call."""
        if self.threads:
            for aid in agents:
                start_thread("nudge-" + aid, _nudge_quietly, self.store, self.caller.env, aid)
            return
        _spawn_nudger(self.store, self.caller.env, agents)

    def run(self, op, params, cancel=None):
        """call(op, params) for this caller (raises what call() raises). `cancel`: a
        Cancel that abandons a wait (WaitAbandoned), wherever it runs."""
        if self.store is None:  # made since (`thrum init` by somebody else)?
            loc = locate(self.caller.cwd)
            if loc.store:
                with self._lock:
                    if self.store is None:
                        self._open(loc)
        spec = OPS.get(op)
        client = self._daemon(spec)
        if client is not None:
            try:
                return self._via_daemon(client, spec, params, cancel)
            except DaemonUnavailable:
                if cancel is not None and cancel.is_set():
                    raise WaitAbandoned()
                # else silently, directly
        return call(op, params, self.caller, self.store,
                    hooks=self._wait_hooks(cancel) if spec and spec.blocks else None)

    @staticmethod
    def _wait_hooks(cancel):
        """A wait run here: it only holds what it finds (the front end settles it once
        it has handed the result over), and `cancel` abandons it (its sleeps between
        polls end early)."""
        if cancel is None:
            return {"_hold": True}

        def wake(seconds):
            if cancel.wait(seconds):
                raise WaitAbandoned()
        return {"_wake": wake, "_alive": lambda: not cancel.is_set(), "_hold": True}

    def watched(self, agent, messages, since=None):
        """For a watch of `agent`: record `messages` as printed (a restarted watch leaves
        them out; its own record, not the wait's), and/or that the next watch starts at
        `since`."""
        if self.store is None or not name_ok(agent or ""):
            return
        if messages:
            _delivered_record(self.store.loc.var, agent, "watched").add(
                [m["message_id"] for m in messages], only_new=True)
        if since:
            _set_wait_cursor(_wait_cursor_path(self.store.loc.var, agent, "watched"), since)

    def settle(self, result, handed):
        """After a wait: take its `claim` out of `result` and settle it, as handed over
        (its output was written) or not (the messages go to the next wait). Whatever
        process held the messages (this one, or the daemon), the claim is settled here."""
        claim = result.pop("claim", None) if isinstance(result, dict) else None
        if claim and self.store is not None:
            settle_claim(self.store.loc.var, claim, handed)

    def _daemon(self, spec):
        """A client of this store's daemon when the operation may go through it."""
        if self.store is None or spec is None or spec.local:
            return None
        env = self.caller.env
        # Settings only this process sees (config from the environment, a debug
        # trace on this terminal) keep it local, so both modes give the same result.
        if debug_enabled(env) or any(env.get(_env_var_for(k)) for k in CONFIG_KEYS
                                     if not k.startswith(self.FRONT_KEYS)):
            return None
        files = DaemonFiles(self.store.loc.var, env)
        if files.running():
            client = getattr(self._tls, "client", None)
            if client is None:
                client = self._tls.client = DaemonClient(files)
                with self._lock:
                    self._clients.append(client)
            return client
        if not self._autostarted and spec.starts_daemon and \
                self.store.config.get("daemon.autostart"):
            self._autostarted = True  # start one for the calls after this one
            try:
                spawn_daemon(self.store, self.caller.env, files)
            except OSError as e:
                _warn("daemon.autostart: cannot start the daemon: %s" % e)
        return None

    def _via_daemon(self, client, spec, params, cancel):
        op = spec.name
        if not spec.blocks:
            return client.call(op, params, self.caller)
        # A blocking wait: if the daemon goes away mid-wait, carry on here from the
        # same start point, for the time that is left.
        try:
            timeout = parse_timeout(params.get("timeout", spec.default("timeout")))
            start = parse_after(params.get("after"))
        except UsageError:  # the daemon reports it, after the set-up checks
            return client.call(op, params, self.caller)
        params = dict(params, timeout=timeout)
        if op == "wait":  # (a start point it fills in itself never looks back)
            params.update(after=time.time() - 1.0 if start is None else start,
                          lookback=params.get("lookback", start is not None))
        deadline = time.monotonic() + timeout
        if cancel is not None:  # a closed connection ends the daemon's wait at once
            client.aborted = False
            cancel.on_set(client.abort)
        try:
            return client.call(op, params, self.caller, wait=timeout)
        except DaemonUnavailable:
            if cancel is not None and cancel.is_set():
                raise WaitAbandoned()
            params["timeout"] = max(0.0, deadline - time.monotonic())
            return call(op, params, self.caller, self.store, hooks=self._wait_hooks(cancel))
        finally:
            if cancel is not None:
                cancel.off(client.abort)

    def release_thread(self):
        """Close what this thread keeps open (its daemon connection, its SQLite
        connection): a pool thread that went idle calls it."""
        client = getattr(self._tls, "client", None)
        if client is not None:
            client.close()
        if self.store is not None:
            self.store.close()

    def close(self):
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()
        if self.store is not None:
            self.store.close()


# === 18. Rendering ============================================================

def _visible(text, keep="\t"):
    """Escape control characters (ESC, CR, ...) so stored text cannot drive the
    terminal. Applied to data before rendering; colour is added afterwards."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else
                   ch.encode("unicode_escape").decode("ascii") for ch in text)


def _visible_data(obj):
    """_visible() over every string in a result (newlines kept for bodies)."""
    if isinstance(obj, str):
        return _visible(obj, "\t\n")
    if isinstance(obj, dict):
        return {k: _visible_data(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_visible_data(v) for v in obj]
    return obj


def clip(line, width=80):
    """One display line cut to `width` columns (an ellipsis marks the cut); a width of
    None (output that is not a terminal) keeps the line whole."""
    return line if width is None or len(line) <= width else line[:width - 1] + "…"


def _width(style):
    """The columns a renderer may fill: the terminal's, or None when the output is not
    a terminal (a pipe, a file, an agent's tool call), which is never wrapped or cut."""
    return getattr(style, "width", None)


def _who(names):
    return ", ".join("@" + n for n in names) if names else "(nobody)"


def _aud_str(auds):
    return ", ".join("@" + a["value"] if a["type"] == "agent" else
                     "everyone" if a["type"] == "everyone" else
                     "%s:%s" % (a["type"], a["value"]) for a in auds)


def _shown_id(m, style):
    """A message's id as a list shows it: on a terminal its short form (unique in this
    store, as git abbreviates), elsewhere (pipes, agents, MCP text) the full id."""
    return (_width(style) and m.get("short_id")) or m["message_id"]


def _body_lines(text, indent, max_lines=20, width=None):
    """A body indented; on a terminal of `width` columns, wrapped at spaces only (never
    inside a word, a path or at a hyphen: a long word overflows instead)."""
    out = []
    for line in text.split("\n"):
        if width is None or len(indent) + len(line) <= width:
            out.append(indent + line)
            continue
        import textwrap
        wrapped = textwrap.wrap(line, max(20, width - len(indent)), break_long_words=False,
                                break_on_hyphens=False, replace_whitespace=False) or [""]
        out.extend(indent + w for w in wrapped)
    if len(out) > max_lines:
        more = len(out) - max_lines
        out = out[:max_lines] + [indent + "… %d more line%s" % (more, "s" * (more != 1))]
    return out


def render_message_rows(out, msgs):
    """Inbox-style rows with replies nested under parents shown on the same page."""
    by_id = {m["message_id"]: m for m in msgs}
    children = {}
    roots = []
    for m in msgs:
        if m.get("reply_to") in by_id and m["reply_to"] != m["message_id"]:
            children.setdefault(m["reply_to"], []).append(m)
        else:
            roots.append(m)
    lines = []

    def row(m, depth):
        ind = "  " * depth
        mark = out.c("1;33", "●") if not m["is_read"] else "○"
        arrow = "↳ " if m.get("reply_to") else ""
        re = "" if depth or not m.get("reply_to") else "  (re %s)" % m["reply_to"]
        edited = "  (edited)" if m.get("updated_at") else ""
        to = " → " + _aud_str(m["audiences"]) if m.get("audiences") else ""
        head = "%s%s%s %s  @%s%s  %s%s%s" % (ind, arrow, "●" if not m["is_read"] else "○",
                                             _shown_id(m, out), m["agent_id"], to,
                                             relative_time(m["created_at"]), edited, re)
        head = clip(head, _width(out))  # colour is added after measuring the width
        head = head.replace("●", mark, 1).replace("@" + m["agent_id"],
                                                  out.c("1", "@" + m["agent_id"]), 1)
        lines.append(head)
        content = m["body"]["content"]
        lines.extend(_body_lines(content, ind + ("    " if arrow else "  "), width=_width(out)))
        if m["body"].get("structured"):
            lines.append(clip(ind + "  data: " + _dumps(m["body"]["structured"]), _width(out)))
        tags = ["refs: " + ", ".join(map(_tag_str, m["refs"]))] if m.get("refs") else []
        tags += ["scopes: " + ", ".join(map(_tag_str, m["scopes"]))] if m.get("scopes") else []
        if tags:
            lines.append(clip(ind + "  " + "  ".join(tags), _width(out)))
        for c in children.get(m["message_id"], []):
            row(c, depth + 1)
    for m in roots:
        row(m, 0)
    return lines


def _page_footer(res, noun="messages", extra=""):
    if not res["total"]:
        return []
    first = (res["page"] - 1) * res["page_size"] + 1
    last = min(res["total"], first + len(res["messages"]) - 1)
    if not res["messages"]:
        return ["Page %d is past the end (%d %s)" % (res["page"], res["total"], noun)]
    return ["Showing %d-%d of %d %s%s" % (first, last, res["total"], noun, extra)]


def render_member(out, m):
    mark = out.c("32", "●") if m["status"] == "active" else "○"
    head = "%s @%s  %s (%s)" % (mark, m["agent_id"], m["role"], m["module"])
    if m.get("intent"):
        head += " — " + m["intent"]
    bits = []
    if m.get("task"):
        bits.append("task: " + m["task"])
    if m.get("branch"):
        bits.append("branch: " + m["branch"])
    if m.get("tmux"):
        bits.append("tmux: " + str(m["tmux"].get("session")))
    bits.append("seen " + relative_time(m.get("last_seen_at")))
    bits.append("inbox %d unread / %d" % (m["unread"], m["total"]))
    return [clip(head, _width(out)), clip("    " + " · ".join(bits), _width(out))]


# -- one renderer per result ---------------------------------------------------------
# Each takes a result (plain data, as an operation returns it) and a style (anything
# with `c(code, text)`: the CLI's Output, or PLAIN for MCP text) and returns lines.

class _Plain:
    """A style without colour (MCP text content, logs)."""

    @staticmethod
    def c(code, text):
        return text


PLAIN = _Plain()


def render_init(r, style=PLAIN):
    lines = [("Initialised thrum in %s" if r["created"] else
              "thrum is already initialised in %s") % os.path.dirname(r["store"])]
    if r.get("adopted_remote"):
        lines.append("  Adopted the remote's %s branch (full history)" % r["branch"])
    if r.get("git"):
        lines.append("  Log: %s branch, worktree %s" % (r["branch"], r["log_dir"]))
    else:
        lines.append("  Log: %s (not a git repository: sync is off)" % r["log_dir"])
    if r["local_only"]:
        lines.append("  Sync: local only")
    lines.append("  Next: thrum quickstart --name NAME --role ROLE --module MODULE")
    return lines


def render_quickstart(r, style=PLAIN):
    reg = r["register"]
    return ["Registered as @%s (%s, %s)%s" % (
        reg["agent_id"], reg["role"], reg["module"],
        "" if reg["status"] == "registered" else " — " + reg["status"]),
        "  Session: %s" % r["session"]["session_id"],
        "  Intent:  %s" % r["intent"]["intent"],
        "  Identity: %s" % reg["identity_file"]]


def render_whoami(r, style=PLAIN):
    return [clip(l, _width(style)) for l in [
        "@%s  %s (%s)" % (r["agent_id"], r["role"], r["module"]),
        "  Display:  %s" % (r["display"] or ""),
        "  Intent:   %s" % (r["intent"] or ""),
        "  Task:     %s" % (r["task"] or ""),
        "  Session:  %s" % ("%s (started %s)" % (r["session_id"], relative_time(
            r["session_started_at"])) if r["session_id"] else
            "none (thrum session start)"),
        "  Worktree: %s" % r["worktree"]] + (
            ["  Tmux:     %s (pane %s)" % (r["tmux_session"], r.get("tmux_pane"))]
            if r.get("tmux_session") else []) + [
        "  Identity: %s" % r["identity_file"]]]


def render_status(r, style=PLAIN):
    a = r["agent"]
    lines = ["@%s  %s (%s)" % (a["agent_id"], a["role"], a["module"])]
    if a.get("intent"):
        lines.append("  Intent:  " + a["intent"])
    lines.append("  Session: %s" % (r["session"]["session_id"] if r["session"] else "none"))
    if a.get("tmux_session"):
        lines.append("  Tmux:    %s (pane %s)" % (a["tmux_session"], a.get("tmux_pane")))
    ib = r["inbox"]
    lines.append("  Inbox:   %d unread / %d" % (ib["unread"], ib["total"]))
    d = r["daemon"]
    lines.append("  Daemon:  %s" % ("running (pid %s)" % d["pid"] if d["running"]
                                     else "not running (pure-CLI mode)"))
    s = r["sync"]
    lines.append("  Sync:    %s%s" % (s["state"], ", last %s%s" % (
        "good sync " if s.get("last_error") else "", relative_time(s["last_sync_at"]))
        if s.get("last_sync_at") else ""))
    if s.get("last_error"):
        lines.append("           last error: %s" % s["last_error"])
    return [clip(l, _width(style)) for l in lines]


def render_overview(r, style=PLAIN):
    ls = render_status(r, style) + ["", "Team (%d active):" % len(r["team"])]
    for m in r["team"]:
        ls.extend(clip("  " + l, _width(style)) for l in render_member(style, m))
    return ls


def render_team(r, style=PLAIN, all=False):
    if not r["members"]:
        return ["No active agents." + ("" if all else " Use --all to include offline agents.")]
    ls = []
    for m in r["members"]:
        ls.extend(render_member(style, m))
    return ls


def render_prime(r, style=PLAIN):
    a = r["agent"]
    ls = ["# thrum briefing for @%s" % a["agent_id"],
          "You are @%s, role %s, module %s." % (a["agent_id"], a["role"], a["module"])]
    if a.get("intent"):
        ls.append("Intent: " + a["intent"])
    if a.get("task"):
        ls.append("Task: " + a["task"])
    ls.append("Session: %s" % (r["session"]["session_id"] if r["session"] else
                               "none (start one: thrum session start)"))
    wc = r["work_context"]
    if wc.get("branch"):
        ls.append("Branch: %s, %d changed file(s)" % (wc["branch"], len(wc["files"])))
    ls.append("")
    ls.append("## Unread messages: %d (of %d) — handle these before new work"
              % (len(r["unread"]), r["inbox"]["total"]))
    ls.extend(render_message_rows(style, r["unread"][-20:]))
    if len(r["unread"]) > 20:
        ls.append("(%d older unread not shown: thrum inbox --unread)" % (len(r["unread"]) - 20))
    ls.append("")
    ls.append("## Team (%d active)" % len(r["team"]))
    for m in r["team"]:
        ls.extend(render_member(style, m))
    if r["context"]:
        ls += ["", "## Saved context", r["context"]]
    ls += ["", "Commands: thrum inbox | thrum reply ID TEXT | thrum send TEXT --to @x",
           "          thrum wait --timeout 5m | thrum team | thrum who-has PATH"]
    return ls


def render_send(r, style=PLAIN, verb="Message sent"):
    if r.get("duplicate"):  # SPEC §16: the key named an earlier message
        ls = ["Already sent: %s (same idempotency key; nothing stored again)"
              % r["message_id"]]
    else:
        ls = ["%s: %s" % (verb, r["message_id"])]
    if r.get("thread_id"):
        ls.append("  Thread: %s" % r["thread_id"])
    ls.append("  To: %s" % _who(r["recipients"]))
    return ls


def render_reply(r, style=PLAIN):
    return render_send(r, style, "Reply sent")


def render_inbox(r, style=PLAIN, unread=False, filters=(), all=False):
    """`filters`: the filter flags given, as text (for the empty message)."""
    if not r["total"]:
        if unread:
            return ["No unread messages."]
        if filters:
            return ["No messages matching %s." % " ".join(filters)]
        return ["No messages%s." % ("" if all else " for @" + r["agent_id"])]
    return render_message_rows(style, r["messages"]) + _page_footer(
        r, "messages", " (%d unread)" % r["unread"])


def render_sent(r, style=PLAIN):
    if not r["total"]:
        return ["No sent messages."]
    ls = []
    for m in r["messages"]:
        ls.append(clip("%s  to %s  %s  %d/%d read" % (
            _shown_id(m, style), _aud_str(m["audiences"]) or _who(m["recipients"]),
            relative_time(m["created_at"]), m["read_count"], len(m["receipts"])), _width(style)))
        ls.extend(_body_lines(m["body"]["content"], "  ", 6, _width(style)))
        if m["receipts"]:
            ls.append("  " + ", ".join("@%s(%s)" % (x["agent_id"], "read" if x["read_at"]
                                                     else "unread") for x in m["receipts"]))
    return ls + _page_footer(r, "sent messages")


def render_search(r, style=PLAIN):
    """One line per hit: read mark, id, author, time, the snippet with its matches in
    bold on a colour terminal, else between [ and ]."""
    if not r["messages"]:
        return ["No messages match %s." % r["query"]]
    colour = getattr(style, "color", False)
    opened, closed = SNIPPET_MARKS

    def mark(m):
        return style.c("1;33", m.group(1)) if colour else "[%s]" % m.group(1)
    ls = []
    for m in r["messages"]:
        line = clip("%s %s  @%s  %s  %s" % ("●" if not m["is_read"] else "○",
                                            _shown_id(m, style), m["agent_id"],
                                            relative_time(m["created_at"]), m["snippet"]),
                    _width(style))
        ls.append(re.sub("%s([^%s]*)(?:%s|$)" % (opened, closed, closed), mark, line))
    n, total = len(r["messages"]), r["total"]
    more = n < total or r.get("capped")
    order = "by relevance" if r.get("rank") else "newest first"
    ls.append("%s match%s, %s%s" % ("%d of %d%s" % (n, total, "+" * bool(r.get("capped")))
                                    if more else n, "" if total == 1 else "es", order,
                                    " (--limit N for more)" if more else ""))
    return ls


def render_message(r, style=PLAIN):
    m = r["message"]
    ls = ["%s is a hidden duplicate of %s (same author and idempotency key, stored in two "
          "clones before they synced); showing %s" % (r["requested_id"], m["message_id"],
                                                       m["message_id"]), ""] \
        if r.get("requested_id") else []
    ls += ["Message: %s" % m["message_id"],
          "  From:    @%s" % m["agent_id"],
          "  Time:    %s (%s)" % (m["created_at"], relative_time(m["created_at"])),
          "  To:      %s" % (_aud_str(m["audiences"]) or "(nobody)")]
    if m["thread_id"]:
        ls.append("  Thread:  %s" % m["thread_id"])
    if m["reply_to"]:
        ls.append("  Reply to: %s" % m["reply_to"])
    if m["scopes"]:
        ls.append("  Scopes:  %s" % ", ".join(map(_tag_str, m["scopes"])))
    if m["refs"]:
        ls.append("  Refs:    %s" % ", ".join(map(_tag_str, m["refs"])))
    if m["edits"]:
        ls.append("  Edited:  %d time(s), last %s" % (len(m["edits"]), relative_time(
            m["updated_at"])))
    if m.get("idempotency_key") is not None:
        ls.append("  Key:     %s (idempotency key)%s" % (
            m["idempotency_key"], "; hidden duplicates: " + ", ".join(m["duplicates"])
            if m.get("duplicates") else ""))
    ls.append("  Read by: %s" % (", ".join(
        "@%s(%s)" % (x["agent_id"], "read" if x["read_at"] else "unread")
        for x in m["receipts"]) or "-"))
    if m["deleted"]:
        ls.append("  Status:  DELETED")
    ls.append("")
    ls.extend(m["body"]["content"].split("\n"))
    if m["body"].get("structured") is not None:
        ls += ["", "Structured: " + json.dumps(m["body"]["structured"], ensure_ascii=False)]
    return ls


def render_wait(r, style=PLAIN):
    """The listener format (SPEC §7). Continuation lines of a body are indented, so no
    body line can start a block or a field: agents parse this line by line."""
    if r["status"] == "timeout":
        return ["NO_MESSAGES_TIMEOUT"]
    ls = ["MESSAGES_RECEIVED"]
    for m in r["messages"]:
        first, *more = m["body"]["content"].split("\n")
        ls += ["---", "FROM: @%s" % m["agent_id"], "ID: %s" % m["message_id"],
               "CONTENT: %s" % first] + ["  " + l for l in more] + [
               "TIMESTAMP: %s" % m["created_at"]]
    return ls + ["---"]


def render_tmux_list(r, style=PLAIN):
    if not r["agents"]:
        return ["No agents with a tmux session. Start one with 'thrum tmux create'."]
    ls = []
    for a in r["agents"]:
        state = {True: style.c("32", "alive"), False: style.c("31", "gone"),
                 None: "other clone (on %s)" % a.get("host")}[a["alive"]]
        ls.append(clip("@%s  %s (pane %s)  %s  inbox %d unread" % (
            a["agent_id"], a["session"], a.get("pane"), state, a["unread"]), _width(style)))
    return ls


def render_who_has(r, style=PLAIN):
    if not r["agents"]:
        return ["No agent is editing %s" % r["path"]]
    ls, said = [], set()
    for a in r["agents"]:
        if a["agent_id"] in said:
            continue
        names = [a["agent_id"]] + (a.get("shared") or [])
        said.update(names)
        ls.append("%s %s editing %s (branch %s)%s%s" % (
            ", ".join("@" + n for n in names), "is" if len(names) == 1 else "are",
            r["path"], a["branch"] or "detached",
            "" if a["status"] in (None, "modified") else " [%s]" % a["status"],
            "; they share one worktree, git cannot tell which" if len(names) > 1 else ""))
    return ls


def render_ping(m, style=PLAIN):
    ls = ["@%s: %s, last seen %s" % (m["agent_id"], m["status"],
                                     relative_time(m["last_seen_at"]))]
    for k in ("intent", "task", "branch"):
        if m.get(k):
            ls.append(clip("  %s: %s" % (k.capitalize(), m[k]), _width(style)))
    return ls


def render_agent_list(r, style=PLAIN, context=False):
    if not r["agents"]:
        return ["No agents registered."]
    ls = []
    for m in r["agents"]:
        ls.extend(render_member(style, m))
        if context:
            for f in m.get("files") or []:
                ls.append("      %s %s" % (f.get("status", "?")[:9].ljust(9), f.get("path")))
    return ls


def render_agent_cleanup(r, style=PLAIN):
    if not r["orphans"]:
        return ["No stale agents (threshold %s)." % r["stale_after"]]
    ls = ["%s @%s (%s): %s" % ("Deleted" if o["agent_id"] in r["deleted"] else "Stale",
                               o["agent_id"], o["role"], "; ".join(o["reasons"]))
          for o in r["orphans"]]
    if not r["deleted"]:
        ls.append("Run 'thrum agent cleanup --force' to delete them.")
    return ls


def render_session_list(r, style=PLAIN):
    return [clip("%s  %s  @%s  started %s%s" % (
        s["session_id"], s["status"], s["agent_id"], relative_time(s["started_at"]),
        ", ended %s (%s)" % (relative_time(s["ended_at"]), s["end_reason"])
        if s["ended_at"] else ""), _width(style)) for s in r["sessions"]] or ["No sessions."]


def render_heartbeat(r, style=PLAIN):
    return ["Heartbeat: %s" % r["session_id"],
            "  Branch: %s, %d changed file(s)" % (r["branch"] or "(detached HEAD)",
                                                 len(r["files"]))]


def render_context(r, style=PLAIN):
    if r["content"] is None:
        return ["No context saved for @%s" % r["agent_id"]]
    return [r["content"][:-1] if r["content"].endswith("\n") else r["content"]]


def render_group(r, style=PLAIN):
    ls = [clip("%s  (%s)%s" % (r["group"], r["group_id"], " — " + r["description"]
                              if r.get("description") else ""), _width(style))]
    ls += ["  %s" % ("@" + m["value"] if m["type"] == "agent" else "role:" + m["value"])
           for m in r["members"]] or ["  (no members)"]
    ls.append(clip("  Reaches: %s" % _who(r["agents"]), _width(style)))
    return ls


def render_group_list(r, style=PLAIN):
    return [clip("%s  %d member(s)%s  reaches %s" % (
        g["group"], g["member_count"], " — " + g["description"] if g["description"]
        else "", _who(g["agents"])), _width(style)) for g in r["groups"]] or ["No groups."]


def _fmt_value(v):
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def render_config(r, style=PLAIN):
    return ["%s = %s  (%s)" % (k, _fmt_value(v["value"]), v["source"])
            for k, v in r["values"].items()] + \
        ["", "repo file: %s" % r["repo_file"], "user file: %s" % r["user_file"]]


def _sync_lines(r):
    remote = r["remote"]
    missing = r.get("remote_missing")
    if not remote and missing:
        others = missing["remotes"]
        remote = "(none: this repository has no remote named %r%s)" % (
            missing["name"], "; it has %s: thrum config set sync.remote %s" % (
                ", ".join(others), others[0]) if others else
            ": add one with 'git remote add %s URL'" % missing["name"])
    good = relative_time(r["last_sync_at"]) if r["last_sync_at"] else "never"
    ls = ["  State:   %s" % r["state"],
          "  Remote:  %s" % (remote or "(none)"),
          "  Branch:  %s" % r["branch"]]
    if r.get("last_error"):  # the failure is the news; the last success is history
        ls += ["  Last sync: failed %s" % relative_time(r.get("last_attempt_at")),
               "  Last good sync: %s" % good]
    else:
        ls.append("  Last sync: %s" % good)
    if r.get("ahead") or r.get("behind"):
        ls.append("  Ahead %d, behind %d" % (r["ahead"], r["behind"]))
    if r.get("last_error"):
        ls.append("  Last error: %s" % r["last_error"])
    return ls


def render_sync_force(r, style=PLAIN):
    if r["local_only"] or not r["remote"]:
        head = "Sync committed locally (%s: nothing fetched or pushed)" % r["state"]
    else:
        head = "Synced with %s: %d event(s) pulled%s" % (
            r["remote"], r["pulled"], ", pushed" if r["pushed"] else "")
    return [head] + _sync_lines(r)


def render_sync_status(r, style=PLAIN):
    if not r.get("git"):
        return ["Sync needs git: this store is outside a git repository."]
    return ["Sync status"] + _sync_lines(r)


def render_purge(r, style=PLAIN):
    """`thrum purge`: what would go (a preview) or what went."""
    def n(k, word):
        return "%d %s%s" % (k, word, "" if k == 1 else "s")
    ls = ["%s created before %s:" % ("Purged the messages" if r["confirmed"] else
                                     "Preview: a purge takes the messages", r["before"])]
    ls += ["  @%s: %s, %s" % (a["agent"], n(a["messages"], "message"),
                              n(a["receipts"], "receipt")) for a in r["agents"]]
    ls.append("Total: %s, %s; %s kept whole (they have a newer message)" % (
        n(r["messages"], "message"), n(r["receipts"], "receipt"),
        n(r["threads_kept"], "thread")))
    if not r["confirmed"]:
        ls.append("Nothing was deleted: run again with --confirm to purge.")
    elif r["files_removed"]:
        ls.append("Log files removed: %s" % ", ".join(r["files_removed"]))
    return ls


def render_doctor(r, style=PLAIN):
    ls = []
    for c in r["checks"]:
        mark = "✓" if c["ok"] else ("fixed" if c["fixed"] else "✗")
        ls.append("%s %s: %s" % (mark, c["name"], c["detail"]))
    ls.append("All good." if r["ok"] and all(c["ok"] for c in r["checks"]) else
              ("Repaired." if r["ok"] else "Problems found: run 'thrum doctor --fix'."))
    return ls


# === 19. MCP server ===========================================================
#
# `thrum mcp serve`: MCP over stdio (one JSON-RPC 2.0 message per line) for agents
# that speak MCP. One process serves both protocol eras, chosen per request: the
# legacy `initialize` handshake (2024-11-05 .. 2025-11-25) and the stateless
# 2026-07-28 revision (`server/discover`, a `_meta` envelope on every request); with
# --channel only the first (Claude Code delivers channel pushes only on that era). Each
# `tools/call` runs on its own thread through a shared Router (so through the daemon
# when one runs), so cancellation and other calls keep flowing while a wait blocks;
# one lock serialises the frames on stdout. A tool is one MCP_TOOLS row naming an
# OPS entry: MCP adds argument checking and text content, never behaviour.

MCP_LEGACY_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")


MCP_MODERN_VERSIONS = ("2026-07-28",)


_MCP = "io.modelcontextprotocol/"


_MCP_PARSE, _MCP_INVALID, _MCP_NO_METHOD, _MCP_PARAMS, _MCP_INTERNAL = (
    -32700, -32600, -32601, -32602, -32603)


_MCP_VERSION = -32022
#: Frames are compact JSON, never NaN or Infinity (a strict client could not read them).
_MCP_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _mcp_id_ok(rid):
    """A JSON-RPC id we answer with: a string or an integer (not a bool), JSON-safe."""
    return isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))


def _mcp_schema(required, **props):
    s = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        s["required"] = list(required)
    return s


def _mcp_targets(what):
    return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
            "description": what}


_MCP_ID = {"type": "string", "description": "a message id (msg_...), or a unique prefix of "
           "at least 8 characters after msg_"}


_MCP_TAGS = {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}],
             "description": "TYPE:VALUE tags, e.g. [\"module:auth\"]"}


def _mcp_send_params(a):
    return {"content": a["content"], "to": a["to"], "mentions": a["mention"] or (),
            "scopes": _mcp_list(a["scopes"]), "refs": _mcp_list(a["refs"]),
            "reply_to": a["reply_to"], "idempotency_key": a["idempotency_key"]}


_MCP_KEY = {"type": "string", "description": "optional: a key of yours (1-128 printable "
            "ASCII characters) that makes a retry safe: another send or reply of yours with "
            "the same key within 24 h stores nothing and returns the first message, with "
            "duplicate: true"}


def _mcp_mark_params(a):
    if (a["message_ids"] is None) == (not a["all"]):
        raise UsageError("give either message_ids (a list of ids) or all: true")
    return {"message_ids": a["message_ids"] or (), "all": a["all"]}


def _mcp_list(v):
    return [v] if isinstance(v, str) else list(v or ())


def _mcp_marked(r, a):
    n = r["marked_count"]
    return ["Marked %d message%s as read." % (n, "" if n == 1 else "s") if n else
            "No unread messages to mark."]


#: wait_for_message's default timeout (seconds): the wait operation's own default.
_MCP_WAIT_DEFAULT = parse_duration(OPS["wait"].default("timeout"))

#: tool -> (operation, description, input schema, arguments -> params, result -> text).
#: Schema defaults come from the operations' declarations (Operation.default), except
#: where a tool differs on purpose: check_messages lists unread messages and marks
#: nothing unless asked.
MCP_TOOLS = {
    "send_message": (
        "send",
        "Send a message to other agents. `to`: an agent name (@alice or alice), a role "
        "(every agent with it), a group, `everyone`, or a list of these. `reply_to`: a "
        "message id to join its thread. Returns the message id and who received it.",
        _mcp_schema(("to", "content"),
                    to=_mcp_targets("recipients: name, role, group, everyone, or a list"),
                    content={"type": "string", "description": "the message (markdown)"},
                    reply_to=dict(_MCP_ID, description="a message this one answers: "
                                  "joins its thread"),
                    mention=_mcp_targets("also deliver to and record a mention of these"),
                    scopes=_MCP_TAGS, refs=_MCP_TAGS, idempotency_key=_MCP_KEY),
        _mcp_send_params, lambda r, a: render_send(r)),
    "check_messages": (
        "inbox",
        "List messages sent to you, newest first. By default only unread ones, and nothing "
        "is marked read (pass mark_read: true to mark the listed messages read).",
        _mcp_schema((), limit={"type": "integer", "minimum": 1, "maximum": 100,
                               "default": OPS["inbox"].default("limit"),
                               "description": "how many (default %d)"
                               % OPS["inbox"].default("limit")},
                    unread_only={"type": "boolean", "default": True,
                                 "description": "only unread messages (default true)"},
                    mark_read={"type": "boolean", "default": False,
                               "description": "mark the listed messages read (default "
                                              "false)"}),
        lambda a: {"unread": a["unread_only"], "limit": a["limit"],
                   "mark_read": a["mark_read"]},
        lambda r, a: render_inbox(r, unread=a["unread_only"])),
    "wait_for_message": (
        "wait",
        "Block until a message to you arrives, then return it (each message wakes you "
        "once, whether you wait here or with `thrum wait`; it is not marked read). Returns "
        "status \"received\" with the messages, or status \"timeout\" with none. Call it "
        "again after handling a message.",
        _mcp_schema((), timeout={"type": "number", "minimum": 0, "maximum": 600,
                                 "default": _MCP_WAIT_DEFAULT,
                                 "description": "seconds to wait (default %g, at most 600)"
                                 % _MCP_WAIT_DEFAULT}),
        lambda a: {"timeout": a["timeout"]}, lambda r, a: render_wait(r)),
    "reply_message": (
        "reply",
        "Reply to a message: goes to its author and other recipients (not you) and joins "
        "its thread; marks the message read.",
        _mcp_schema(("message_id", "content"), message_id=_MCP_ID,
                    content={"type": "string", "description": "the reply (markdown)"},
                    idempotency_key=_MCP_KEY),
        lambda a: {"message_id": a["message_id"], "content": a["content"],
                   "idempotency_key": a["idempotency_key"]},
        lambda r, a: render_reply(r)),
    "get_message": (
        "message_get",
        "Show one message in full, with its edits and read receipts; marks it read.",
        _mcp_schema(("message_id",), message_id=_MCP_ID),
        lambda a: {"message_id": a["message_id"]}, lambda r, a: render_message(r)),
    "mark_read": (
        "message_read",
        "Mark messages read: the given ids, or all your unread messages with all: true.",
        _mcp_schema((), message_ids={"type": "array", "items": _MCP_ID,
                                     "description": "ids to mark read"},
                    all={"type": "boolean", "default": OPS["message_read"].default("all"),
                         "description": "mark every unread message read"}),
        _mcp_mark_params, _mcp_marked),
    "list_agents": (
        "team",
        "The agents of this team with an open session: name, role, module, intent, "
        "branch, last seen, unread count. include_offline: everyone registered.",
        _mcp_schema((), include_offline={"type": "boolean",
                                         "default": OPS["team"].default("all"),
                                         "description": "also agents without an open "
                                                        "session"}),
        lambda a: {"all": a["include_offline"]},
        lambda r, a: render_team(r, all=a["include_offline"])),
    "who_has": (
        "who_has",
        "Which agents have a file changed or uncommitted in their worktree (ask before "
        "editing a shared file). `path`: relative to the repository root or absolute.",
        _mcp_schema(("path",), path={"type": "string", "description": "a file path"}),
        lambda a: {"path": a["path"]}, lambda r, a: render_who_has(r)),
    "search_messages": (
        "search",
        "Search the messages you can see (to you, from you, to your roles and groups, "
        "broadcasts) by their text: words in any order, all of which must match (case does "
        "not matter), \"an exact phrase\", or a prefix* . Newest first. Use it to recover "
        "context (\"what did we decide about auth?\"). Marks nothing read.",
        _mcp_schema(("query",), query={"type": "string", "description": "words, \"a "
                                       "phrase\" or prefix*, e.g. auth \"rate limit\""},
                    limit={"type": "integer", "minimum": 1, "maximum": 100,
                           "default": OPS["search"].default("limit"),
                           "description": "how many (default %d)"
                           % OPS["search"].default("limit")},
                    **{"from": {"type": "string",
                                "description": "only messages by this agent (@alice)"}}),
        lambda a: {"query": a["query"], "sender": a["from"], "limit": a["limit"]},
        lambda r, a: render_search(r)),
}


_MCP_KINDS = {"string": "text", "boolean": "true or false", "integer": "a whole number",
              "number": "a number", "array": "a list of strings"}


def mcp_arguments(schema, args):
    """Check a tool's arguments against its (simple) schema; fill in the defaults.
    Lenient where models are sloppy ("5" for 5, "true" for true); clear otherwise."""
    props = schema["properties"]
    unknown = sorted(str(k) for k in args if k not in props)
    if unknown:
        raise UsageError("unknown argument%s: %s (known: %s)" % (
            "s" if len(unknown) > 1 else "", ", ".join(unknown), ", ".join(props)))
    missing = [k for k in schema.get("required", ()) if args.get(k) is None]
    if missing:
        raise UsageError("missing argument%s: %s" % ("s" if len(missing) > 1 else "",
                                                     ", ".join(missing)))
    return {k: spec.get("default") if args.get(k) is None else _mcp_value(k, spec, args[k])
            for k, spec in props.items()}


def _mcp_value(name, spec, v):
    kinds = [x["type"] for x in spec["anyOf"]] if "anyOf" in spec else [spec["type"]]
    if "boolean" in kinds:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
    if "integer" in kinds or "number" in kinds:
        n = v
        if isinstance(v, str):
            try:
                n = float(v.strip())
            except ValueError:
                n = None
        if isinstance(n, (int, float)) and not isinstance(n, bool) and n - n == 0:
            if "integer" in kinds:
                if n != int(n):
                    raise UsageError("%s must be a whole number" % name)
                n = int(n)
            lo, hi = spec.get("minimum"), spec.get("maximum")
            if (lo is not None and n < lo) or (hi is not None and n > hi):
                raise UsageError("%s must be between %s and %s" % (name, lo, hi))
            return n
    if "string" in kinds and isinstance(v, str):
        return v
    if "array" in kinds and isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise UsageError("%s must be %s" % (name, " or ".join(_MCP_KINDS[k] for k in kinds)))


class _Workers:
    """A fixed pool of at most `size` threads, started as needed and kept (each keeps
    its SQLite connection and daemon connection, so a burst opens no more than `size` of
    each); jobs beyond the pool wait in a queue, in order. A thread idle for `idle`
    seconds runs `on_idle` (which closes what it keeps open), so a burst leaves nothing
    behind."""

    def __init__(self, guard, size, name, idle=10.0, on_idle=None):
        import queue
        self._jobs = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._threads = self._queued = 0
        self._size, self._name, self._idle, self._on_idle = size, name, idle, on_idle
        self._guard = guard

    def submit(self, fn, *args):
        with self._cond:
            self._queued += 1
            start = self._threads < self._size
            if start:
                self._threads += 1
                n = self._threads
        self._jobs.put((fn, args))
        if start:
            start_thread("%s-%d" % (self._name, n), self._loop)

    def wait_below(self, n, timeout=None):
        """Block while `n` or more jobs wait for a thread (backpressure for a reader)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._queued < n, timeout)

    def _loop(self):
        import queue
        idle = False
        while True:
            try:
                fn, args = self._jobs.get(timeout=self._idle)
            except queue.Empty:
                if not idle and self._on_idle is not None:
                    self._guard(self._on_idle)
                idle = True
                continue
            idle = False
            with self._cond:
                self._queued -= 1
                self._cond.notify_all()
            self._guard(fn, *args)


class _McpCall:
    """One tools/call in flight."""

    __slots__ = ("token", "cancel", "done", "received", "claim", "waits")

    def __init__(self, token):
        self.token = token      # the request's progressToken, or None
        self.cancel = Cancel()  # notifications/cancelled, or stdin closed
        self.done = False       # its response (or nothing, if cancelled) is decided
        self.received = time.time()  # when the request was read (a wait starts here)
        self.claim = None       # what a wait holds until its result frame is written
        self.waits = False      # a wait_for_message


class McpServer:
    """`thrum mcp serve`: reads requests from `rfile` (binary, line by line) and writes
    frames to the file descriptor `wfd`, as the agent the caller names."""

    #: Threads for tool calls, and for waits (calls beyond them queue).
    WORKERS = 8
    WAITERS = 8
    #: The reader stops reading new requests while this many calls queue for a worker
    #: (what a burst holds in memory is bounded; cancellations still arrive soon).
    QUEUE_MAX = 64

    def __init__(self, caller, rfile, wfd, channel=False):
        self.router = Router(caller)
        self.router.threads = True  # nudges: never fork a threaded process
        self.caller = caller
        self.rfile, self.wfd = rfile, wfd
        self.channel = channel
        self.started = time.time()
        self.closing = Cancel()        # stdin closed: abandon waits and the channel
        self._wlock = threading.Lock()
        self._calls = {}               # request id (as JSON) -> _McpCall
        self._reg_lock = threading.Lock()
        self._registered = False
        self._reg_error = None
        self._channel_on = False
        self._tools = [{"name": n, "description": d, "inputSchema": s}
                       for n, (_, d, s, _, _) in MCP_TOOLS.items()]
        # Two fixed pools: waits block for minutes, so they have their own and never
        # hold up the other calls (requests beyond a pool queue, SPEC §11).
        self._workers = _Workers(self._guard, self.WORKERS, "mcp-worker",
                                 on_idle=self.router.release_thread)
        self._waiters = _Workers(self._guard, self.WAITERS, "mcp-wait",
                                 on_idle=self.router.release_thread)

    # -- I/O ----------------------------------------------------------------------------
    def log(self, msg):
        try:
            sys.stderr.write("thrum mcp: %s\n" % msg)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def _write(self, msg):
        """One frame; the caller holds _wlock. A closed stdout ends the server. A reply
        that cannot be encoded (it should never happen: what a request echoes is made
        JSON-safe) goes out as an internal error for its id instead."""
        try:
            data = _MCP_ENCODE(msg).encode("utf-8") + b"\n"
        except (ValueError, TypeError, RecursionError, UnicodeError) as e:
            self.log("cannot encode a frame: %s: %s" % (type(e).__name__, e))
            rid = msg.get("id") if isinstance(msg, dict) else None
            data = _MCP_ENCODE(self._error(rid if _mcp_id_ok(rid) else None, _MCP_INTERNAL,
                                           "Internal error: the reply could not be "
                                           "encoded")).encode("utf-8") + b"\n"
        try:
            while data:
                data = data[os.write(self.wfd, data):]
            return True
        except OSError:
            self.closing.set()
            return False

    def send(self, msg):
        with self._wlock:
            self._write(msg)

    @staticmethod
    def _error(rid, code, message, data=None):
        err = {"code": code, "message": message}
        if data is not None:
            err["data"] = data
        return {"jsonrpc": "2.0", "id": rid, "error": err}

    def serve(self):
        """Answer requests until stdin closes; then abandon what is in flight."""
        started = threading.Lock()
        started.acquire()

        def register():
            try:
                self._register()
            finally:
                started.release()
        start_thread("mcp-register", self._guard, register)
        while not self.closing.is_set():
            while not self._workers.wait_below(self.QUEUE_MAX, 1.0):
                if self.closing.is_set():
                    break
            try:
                line = self.rfile.readline()
            except (OSError, ValueError):
                break
            if not line:
                break
            line = line.strip()
            if line:
                self._line(line)
        self.closing.set()
        for c in list(self._calls.values()):
            c.cancel.set()
        # A write in flight (the registration too) gets a moment to finish: a client
        # kills a server about two seconds after closing its stdin; we are gone in one.
        deadline = time.monotonic() + 0.6
        if started.acquire(timeout=0.6):
            started.release()
        while self._calls and time.monotonic() < deadline:
            time.sleep(0.01)

    def _guard(self, fn, *args):
        try:
            fn(*args)
        except BaseException:  # noqa: B902 - a worker must never take the server down
            import traceback
            self.log("internal error:\n" + traceback.format_exc())

    # -- JSON-RPC -------------------------------------------------------------------------
    def _line(self, line):
        """One line of input: whatever it holds, an answer or nothing (a notification),
        and the server goes on (SPEC §11): invalid UTF-8, NaN or Infinity, a number too
        long, nesting too deep are parse errors."""
        try:
            msg = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError, UnicodeDecodeError):
            return self.send(self._error(None, _MCP_PARSE, "Parse error: not JSON"))
        if isinstance(msg, list):  # a batch (2025-03-26): answered with one array
            if not msg:
                return self.send(self._error(None, _MCP_INVALID, "Invalid Request: an "
                                                                 "empty batch"))
            self._waiters.submit(self._batch, msg)  # (it may hold waits: the waiters' pool)
            return None
        reply = self._answer(msg)
        if reply is not None:
            self.send(reply)

    def _answer(self, msg, inline=False):
        """_message(), with a bug answered as an internal error (and logged)."""
        try:
            return self._message(msg, inline)
        except Exception:  # noqa: BLE001 - the read loop must go on
            import traceback
            self.log("internal error:\n" + traceback.format_exc())
            rid = msg.get("id") if isinstance(msg, dict) else None
            return self._error(rid if _mcp_id_ok(rid) else None, _MCP_INTERNAL,
                               "Internal error")

    def _batch(self, msgs):
        replies = [r for r in (self._answer(m, inline=True) for m in msgs) if r is not None]
        if replies:
            self.send(replies)

    def _message(self, msg, inline=False):
        """The reply to one message, or None (a notification; a call answered later)."""
        if not isinstance(msg, dict):
            return self._error(None, _MCP_INVALID, "Invalid Request: not an object")
        method, rid, has_id = msg.get("method"), msg.get("id"), "id" in msg
        if method is None and ("result" in msg or "error" in msg):
            return None  # a response: we never send requests, so nothing to match
        if has_id and not _mcp_id_ok(rid):
            return self._error(None, _MCP_INVALID, "Invalid Request: id must be a string "
                                                   "or an integer")
        if msg.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return self._error(rid if has_id else None, _MCP_INVALID,
                               "Invalid Request: needs jsonrpc \"2.0\" and a method")
        params = msg.get("params")
        params = {} if params is None else params
        if not has_id:
            if isinstance(params, dict):
                self._notification(method, params)
            return None
        if not isinstance(params, dict):
            return self._error(rid, _MCP_PARAMS, "params must be an object")
        meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
        modern = _MCP + "protocolVersion" in meta
        if self.channel and (modern or method == "server/discover"):
            return self._legacy_only(rid, method, meta)
        if modern:
            problem = self._check_modern(rid, meta)
            if problem:
                return problem
        elif method == "server/discover":
            return self._error(rid, _MCP_PARAMS, "server/discover needs params._meta with "
                               "%sprotocolVersion and %sclientCapabilities" % (_MCP, _MCP))
        if method == "tools/call":
            return self._tools_call(rid, params, meta, modern, inline)
        handler = self._METHODS.get(method)
        if handler is None:
            return self._error(rid, _MCP_NO_METHOD, "Method not found: %s" % method)
        return self._result(rid, handler(self, params), modern)

    def _check_modern(self, rid, meta):
        version = meta.get(_MCP + "protocolVersion")
        if version not in MCP_MODERN_VERSIONS:
            return self._version_error(rid, version, MCP_MODERN_VERSIONS + MCP_LEGACY_VERSIONS)
        if not isinstance(meta.get(_MCP + "clientCapabilities"), dict):
            return self._error(rid, _MCP_PARAMS, "params._meta needs %sclientCapabilities"
                               % _MCP)
        return None

    def _legacy_only(self, rid, method, meta):
        """With --channel: only the initialize era (SPEC §11). Claude Code picks the
        2026-07-28 era when a server offers it, and delivers channel notifications only
        on initialize: server/discover is an unknown method (so a client falls back to
        initialize at once), and any other 2026-07-28 request is an unsupported version
        whose `supported` lists the legacy versions only."""
        why = " (with --channel thrum speaks only the initialize handshake)"
        if method == "server/discover":
            return self._error(rid, _MCP_NO_METHOD, "Method not found: server/discover" + why)
        return self._version_error(rid, meta.get(_MCP + "protocolVersion"),
                                   MCP_LEGACY_VERSIONS, why)

    def _version_error(self, rid, version, supported, why=""):
        # `requested` echoes only a JSON-safe value: a short string, else null
        asked = version[:100] if isinstance(version, str) else None
        return self._error(rid, _MCP_VERSION, "Unsupported protocol version: %s%s" % (
            asked, why), {"supported": list(supported), "requested": asked})

    def _result(self, rid, result, modern):
        if modern:
            result = dict(result, resultType="complete")
            result["_meta"] = {_MCP + "serverInfo": self._server_info()}
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    @staticmethod
    def _server_info():
        return {"name": "thrum", "version": __version__}

    def _capabilities(self):
        caps = {"tools": {"listChanged": False}}
        if self.channel:
            caps["experimental"] = {"claude/channel": {}}
        return caps

    def _initialize(self, params):
        asked = params.get("protocolVersion")
        return {"protocolVersion": asked if asked in MCP_LEGACY_VERSIONS else
                MCP_LEGACY_VERSIONS[0], "capabilities": self._capabilities(),
                "serverInfo": self._server_info(), "instructions": self._instructions()}

    def _discover(self, params):
        return {"supportedVersions": list(MCP_MODERN_VERSIONS + MCP_LEGACY_VERSIONS),
                "capabilities": self._capabilities(), "instructions": self._instructions(),
                "ttlMs": 0, "cacheScope": "public"}

    def _list_tools(self, params):
        return {"tools": self._tools, "ttlMs": 0, "cacheScope": "public"}

    _METHODS = {"initialize": _initialize, "server/discover": _discover,
                "tools/list": _list_tools, "ping": lambda self, params: {}}

    def _instructions(self):
        text = ("thrum: persistent messaging between the AI coding agents of this "
                "repository. Message teammates by name, role or group with send_message; "
                "read your inbox with check_messages (it marks nothing read unless "
                "asked); block for the next message with wait_for_message (each message "
                "wakes you once; call it again after handling one); answer with "
                "reply_message. who_has tells who is editing a file. Ids are msg_...; a "
                "unique prefix of 8+ characters works.")
        if self.channel:
            text += (" Messages sent to you also arrive while you work, as <channel "
                     "source=\"thrum\" from=\"...\" message_id=\"...\" thread_id=\"...\" "
                     "ts=\"...\"> tags: they come from teammates (other agents), not from "
                     "the user. Act on them when they concern your work and answer with "
                     "reply_message, using the tag's message_id. A pushed message is not "
                     "marked read: check_messages still lists it.")
        return text

    def _notification(self, method, params):
        if method == "notifications/cancelled":
            rid = params.get("requestId")
            try:
                key = json.dumps(rid)
            except (TypeError, ValueError):
                return
            c = self._calls.get(key)
            if c is not None:
                c.cancel.set()  # its worker sends nothing for it
        elif method == "notifications/initialized":
            self._start_channel()

    # -- tools ----------------------------------------------------------------------------
    def _tools_call(self, rid, params, meta, modern, inline):
        name, args = params.get("name"), params.get("arguments")
        args = {} if args is None else args
        if not isinstance(name, str) or name not in MCP_TOOLS:
            return self._error(rid, _MCP_PARAMS, "Unknown tool: %s" % (name,))
        if not isinstance(args, dict):
            return self._error(rid, _MCP_PARAMS, "arguments must be an object")
        key = json.dumps(rid)
        c = _McpCall(meta.get("progressToken"))
        c.waits = OPS[MCP_TOOLS[name][0]].blocks
        if c.waits:
            # A client that calls wait_for_message again has given up on its earlier
            # wait (Codex and the SDKs cut a call at their own timeout, some without a
            # cancel): end that one unanswered, so it cannot claim a message nobody reads.
            for other in list(self._calls.values()):
                if other.waits and not other.done:
                    other.cancel.set()
        self._calls[key] = c
        if inline:
            return self._finish(key, c, rid, name, args, modern)
        pool = self._waiters if c.waits else self._workers
        pool.submit(self._finish, key, c, rid, name, args, modern, True)
        return None

    def _finish(self, key, c, rid, name, args, modern, write=False):
        """Run a tool and answer it (unless it was cancelled: then nothing is sent)."""
        try:
            if c.cancel.is_set():  # cancelled while it queued: it never runs
                raise WaitAbandoned()
            result = self._tool(name, args, c)
        except WaitAbandoned:
            result = None
        except Exception as e:  # noqa: BLE001 - a bug: an isError result, logged
            import traceback
            self.log("tool %s failed:\n%s" % (name, traceback.format_exc()))
            result = self._tool_error(e)
        handed = False
        try:
            with self._wlock:  # a cancel decides before the frame is written, or not at all
                c.done = True
                self._calls.pop(key, None)
                if result is None or c.cancel.is_set():
                    return None
                reply = self._result(rid, result, modern)
                if write:
                    handed = self._write(reply)
                    return None
                handed = True  # (returned to be written in line: as good as written)
                return reply
        finally:
            if c.claim is not None:
                self.router.settle({"claim": c.claim}, handed)

    def _tool(self, name, args, c):
        op, _, schema, adapt, render = MCP_TOOLS[name]
        note = None
        try:
            a = mcp_arguments(schema, args)
            params = adapt(a)
            self._register()
            if OPS[op].blocks:  # a wait: it looks back, reports progress, is cancelled
                r = self._wait(op, params, c)
            else:
                r = self.router.run(op, params)
        except AfterWriteError as e:  # stored; only the sync after it failed
            r, note = e.result, "saved locally, but THRUM_AUTOSYNC failed: " + e.error.message
        except ThrumError as e:
            return self._tool_error(e)
        text = "\n".join(render(r, a)) + ("\n" + note if note else "")
        return {"content": [{"type": "text", "text": text}], "structuredContent": r}

    def _tool_error(self, e):
        err = error_payload(e)
        if isinstance(e, NotSetUpError) and self.router.store is not None:
            err["hint"] = (err["hint"] + "; " if err["hint"] else "") + (
                "an MCP client starts this server with little of your environment: set "
                "THRUM_NAME in the server's \"env\" block, or run 'thrum mcp serve --agent "
                "NAME'")
        content = [{"type": "text", "text": err["message"]}]
        if err["hint"]:
            content.append({"type": "text", "text": "hint: " + err["hint"]})
        return {"content": content, "structuredContent": {"error": err}, "isError": True}

    def _wait(self, op, params, c):
        """wait_for_message: `thrum wait` for this agent (the same delivered-once
        record), from one second before the request was read (not when a worker got to
        it), looking back over the gap since this server's previous wait, leaving out
        what was read meanwhile. Progress every mcp.progress_interval."""
        if c.token is not None:
            start_thread("mcp-progress", self._guard, self._progress, c, params["timeout"])
        # `after` makes it a lookback wait: it also reaches back to the end of this
        # agent's previous wait, however that one ended (SPEC §7, §11)
        r = self.router.run(op, dict(params, after=c.received - 1.0, skip_read=True),
                            cancel=c.cancel)  # (stdin closing cancels every call)
        c.claim = r.pop("claim", None)  # settled once the result frame is written
        return r

    def _progress(self, c, timeout):
        store = self.router.store
        every = parse_duration(store.config.get("mcp.progress_interval")
                               if store is not None else
                               CONFIG_KEYS["mcp.progress_interval"][0])
        t0 = time.monotonic()
        while not c.cancel.wait(every):
            left = max(0, round(timeout - (time.monotonic() - t0)))
            with self._wlock:
                if c.done or c.cancel.is_set() or self.closing.is_set():
                    return
                self._write({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                    "progressToken": c.token, "progress": round(time.monotonic() - t0, 1),
                    "total": timeout, "message": "waiting for a message (%ds left)" % left}})

    # -- the agent: its long-lived pid, the channel ----------------------------------------
    def _register(self):
        """Record this server's pid as the agent's long-lived process (a new session),
        once the identity resolves (it may be registered after the server started)."""
        if self._registered:
            return
        with self._reg_lock:
            if self._registered:
                return
            try:
                self.router.run("session_start", {"pid": os.getpid()})
                self._registered = True
            except ThrumError as e:
                if self._reg_error != e.message:
                    self._reg_error = e.message
                    self.log("no agent yet (%s); tools that need one say how to set it"
                             % e.message)

    def _start_channel(self):
        if self.channel and not self._channel_on:
            self._channel_on = True
            start_thread("mcp-channel", self._guard, self._channel_loop)

    def _channel_loop(self):
        """Push each new message to this agent once (its own record, `pushed`: the push
        is fire-and-forget, so it claims nothing for waits and marks nothing read)."""
        def wake(seconds):
            if self.closing.wait(seconds):
                raise WaitAbandoned()
        hooks = {"_wake": wake, "_poll": 0.25, "_record": "pushed",
                 "_alive": lambda: not self.closing.is_set()}
        problem = None
        while not self.closing.is_set():
            try:
                r = call("wait", {"timeout": 3600.0, "skip_read": True,
                                  "after": max(self.started - 1.0, time.time() - 43200.0)},
                         self.caller, self.router.store, hooks=hooks)
                problem = None
            except WaitAbandoned:
                return
            except ThrumError as e:
                if problem != e.message:
                    problem = e.message
                    self.log("channel: %s (retrying)" % e.message)
                self.closing.wait(2.0)
                continue
            for m in r["messages"]:
                body = m["body"]
                content = body["content"] or (_dumps(body["structured"])
                                              if body.get("structured") else "")
                self.send({"jsonrpc": "2.0", "method": "notifications/claude/channel",
                           "params": {"content": content, "meta": {
                               "from": m["agent_id"], "message_id": m["message_id"],
                               "thread_id": m["thread_id"] or "", "ts": m["created_at"]}}})


def serve_mcp(caller, channel=False):
    """Run the MCP server on this process's stdin and stdout. stdout carries frames
    only: file descriptor 1 is pointed at stderr, so a stray print cannot corrupt it."""
    wfd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if sys.stdin is None:
        raise UsageError("mcp serve needs a standard input (an MCP client starts it)")
    if sys.stdin.isatty():
        sys.stderr.write("thrum mcp: speaking MCP (JSON-RPC) on stdin/stdout; an MCP "
                         "client starts this command. Ctrl-D ends it.\n")
    server = McpServer(caller, sys.stdin.buffer, wfd, channel=channel)
    server.serve()
    return server


# === 20. Web page =============================================================
#
# `thrum ui` (SPEC §18): a live page for the people who direct the agents, from the
# standard library alone: http.server (imported only when `ui` runs), one inline page
# (HTML, CSS and a small script, no framework, nothing remote) and server-sent events.
# Every read and write is an operation run through a Router, as the CLI runs them (so
# through the daemon when one answers), as the human identity `--as`. The live feed is
# one thread running the `feed` operation for every open stream (none while no page
# is open). The server is bounded: connections, streams, request sizes, idle sockets.
# Security: loopback unless --bind; a random token (in the printed URL, then an HttpOnly
# SameSite=Strict cookie) on every request; the Host header must name this server (DNS
# rebinding); a POST also needs a same-origin Origin and a JSON body; the page renders
# names and bodies as text only, under a strict Content-Security-Policy with a nonce.

class _UiRefused(Exception):
    """A request refused before any operation ran: an HTTP status and one line."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)


#: HTTP status of an operation's error, by exit code (SPEC §6).
_UI_STATUS = {EXIT_USAGE: 400, EXIT_NOT_SETUP: 409, EXIT_NOT_FOUND: 404, EXIT_REFUSED: 409}


class UiFeed:
    """The page's live feed: one thread runs the `feed` operation (the arrival mechanism
    of `watch`: the daemon's notification, else cheap polling and remote checks) while
    at least one stream is open, and hands each result to every stream's queue as a
    ready server-sent event. With no stream open it sits idle, holding nothing."""

    #: Events a stream may fall behind by; then it is told to reload instead.
    QUEUE = 64
    #: How long one step of the feed blocks (it starts again at once).
    STEP = 60.0

    def __init__(self, router, max_streams, log):
        self.router, self.max_streams, self.log = router, max_streams, log
        self._cond = threading.Condition()
        self._subs = []
        self._cancel = None      # the running step's Cancel (set: abandon it)
        self._thread = None
        self._closed = False

    def subscribe(self):
        """A new stream's queue, or None when there are too many streams."""
        import queue
        with self._cond:
            if self._closed or len(self._subs) >= self.max_streams:
                return None
            q = queue.Queue(self.QUEUE)
            self._subs.append(q)
            if self._thread is None:
                self._thread = start_thread("ui-feed", self._loop)
            self._cond.notify_all()
        return q

    def unsubscribe(self, q):
        with self._cond:
            if q in self._subs:
                self._subs.remove(q)
            if not self._subs and self._cancel is not None:
                self._cancel.set()  # nobody listens: the step ends, the thread idles

    def close(self):
        with self._cond:
            self._closed = True
            subs, self._subs = self._subs, []
            if self._cancel is not None:
                self._cancel.set()
            self._cond.notify_all()
        for q in subs:
            self._put(q, None)

    @staticmethod
    def event(name, data):
        return ("event: %s\ndata: %s\n\n" % (name, json.dumps(
            data, ensure_ascii=True, separators=(",", ":")))).encode("ascii")

    def publish(self, name, data):
        frame = self.event(name, data)
        with self._cond:
            subs = list(self._subs)
        for q in subs:
            self._put(q, frame)

    def _put(self, q, item):
        import queue
        try:
            q.put_nowait(item)
        except queue.Full:  # a stream that does not keep up: it reloads what it shows
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            try:
                q.put_nowait(item if item is None else self.event("changed", {"reset": True}))
            except queue.Full:  # (refilled meanwhile: it reloads all the same)
                pass

    def _loop(self):
        since = seen = None
        shown = {}  # id -> when it was published (the overlap of two steps)
        problem = None
        while True:
            with self._cond:
                while not self._subs and not self._closed:
                    self.router.release_thread()  # idle: no daemon or index connection
                    since = seen = None  # a page that opens loads what it shows itself
                    shown = {}
                    self._cond.wait()
                if self._closed:
                    return
                cancel = self._cancel = Cancel()
            params = {"timeout": self.STEP}
            if since is not None:
                params.update(since=since, skip=list(shown), seen=seen)
            try:
                r = self.router.run("feed", params, cancel=cancel)
                problem = None
            except WaitAbandoned:
                continue
            except Exception as e:  # noqa: BLE001 - the feed carries on (a locked index,
                msg = error_payload(e)["message"]  # a full disk, a daemon going away)
                if problem != msg:
                    problem = msg
                    self.log("live feed: %s (retrying)" % msg)
                cancel.wait(2.0)
                continue
            finally:
                with self._cond:
                    self._cancel = None
            since, seen = r["since"], r["seen"]
            now = time.monotonic()
            new = [m for m in r["messages"] if m["message_id"] not in shown]
            for m in new:
                shown[m["message_id"]] = now
            if new:
                self.publish("messages", {"messages": new})
            if r["status"] == "changed" or r.get("more"):
                self.publish("changed", {"reset": bool(r.get("more"))})
            shown = {k: t for k, t in shown.items() if t > now - 60.0}


class UiApp:
    """What `thrum ui` serves, apart from the HTTP plumbing (built by _ui_server when
    `ui` runs): the checks every request passes, the page, the JSON API over the
    operations and the event stream. `serve(handler)` answers one request."""

    MAX_CONNECTIONS = 32        # open connections (each has a thread); more get 503
    MAX_STREAMS = 8             # open event streams (pages); more get 503
    MAX_BODY = 4 << 20          # bytes of a POST body (a message body is <= 1 MiB)
    MAX_TARGET = 4096           # characters of a request's path and query
    IDLE = 30.0                 # seconds a socket may sit idle (reads and writes)
    HEARTBEAT = 15.0            # seconds between a stream's keep-alive comments
    WORKERS = 4                 # threads that run operations (each keeps its connections)

    def __init__(self, router, me, token, log):
        self.router, self.me, self.token, self.log = router, me, token, log
        self.port = self.cookie = self.hosts = None  # bound(), once the port is known
        self.feed = UiFeed(router, self.MAX_STREAMS, log)
        self.slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        self.closing = threading.Event()
        self._pool = _Workers(lambda fn, *a: fn(*a), self.WORKERS, "ui-worker",
                              on_idle=router.release_thread)
        self._page = None

    def bound(self, host, port):
        self.port = port
        self.cookie = "thrum_ui_%d" % port  # cookies are not per port: one name per port
        self.hosts = _ui_hosts(host, port)

    # -- one request ------------------------------------------------------------------
    def serve(self, h):
        """Answer the request the handler `h` has read (method, path, headers)."""
        api = h.path.startswith("/api/")
        try:
            self._serve(h, api)
        except _UiRefused as r:
            self._send_error(h, r.status, r.message, api, r.headers)
        except ThrumError as e:
            err = error_payload(e)
            self._send(h, _UI_STATUS.get(err["exit_code"], 500), {
                "error": err["message"], "hint": err["hint"], "exit_code": err["exit_code"]})
        except (ConnectionError, TimeoutError):  # the client went away, or stalled
            pass
        except Exception as e:  # noqa: BLE001 - a bug: one line here and in the reply
            msg = error_payload(e)["message"]
            self.log("request %s %s failed: %s" % (h.command, h.path[:80], msg))
            try:
                self._send_error(h, 500, msg, api)
            except (OSError, ValueError):  # (the client went away meanwhile)
                pass

    def _serve(self, h, api):
        if len(h.path) > self.MAX_TARGET:
            raise _UiRefused(414, "the request's address is too long")
        host = h.headers.get("Host") or ""
        if host.lower() not in self.hosts:
            raise _UiRefused(403, "this server answers only to %s" % ", ".join(
                sorted(self.hosts)[:3]))
        from urllib.parse import parse_qs, urlsplit
        try:
            url = urlsplit(h.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=20).items()}
        except ValueError as e:
            raise _UiRefused(400, "bad address: %s" % e)
        if h.command == "GET" and url.path == "/" and "token" in query:
            if not self._token_ok(query["token"]):
                raise _UiRefused(403, "wrong token: open the address `thrum ui` printed")
            # The token becomes a cookie and the address bar forgets it. The page moves
            # itself on (a refresh, not a 303): a SameSite=Strict cookie would not go
            # with a redirect that began on another site (a link in a chat, a file).
            return self._send(h, 200, _UI_ENTER, "text/html; charset=utf-8", [
                ("Set-Cookie", "%s=%s; HttpOnly; SameSite=Strict; Path=/" % (
                    self.cookie, self.token))])
        if not self._token_ok(h.headers.get("X-Thrum-Token") or self._cookie(h)):
            raise _UiRefused(403, "no or wrong token: open the address `thrum ui` printed")
        route = _UI_ROUTES.get(url.path)
        if route is None:
            raise _UiRefused(404, "not found: %s" % url.path)
        method, name = route
        if h.command != method:
            raise _UiRefused(405, "use %s for %s" % (method, url.path), [("Allow", method)])
        fn = getattr(self, name)
        if method == "POST":
            return self._send(h, 200, fn(self._body(h, host)))
        if name.startswith("_"):  # the page, the event stream: they answer themselves
            return fn(h)
        return self._send(h, 200, fn(query))

    def _token_ok(self, given):
        import hmac
        return isinstance(given, str) and hmac.compare_digest(
            given.encode("utf-8", "replace"), self.token.encode("ascii"))

    def _cookie(self, h):
        for part in (h.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie:
                return value
        return None

    def _body(self, h, host):
        """A state-changing request's JSON object, after the same-origin checks."""
        origin = h.headers.get("Origin")
        if origin is None or origin.lower() != "http://" + host.lower():
            raise _UiRefused(403, "refused: a change must come from this page (Origin %s)"
                             % ("missing" if origin is None else "not this server"))
        ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _UiRefused(415, "send JSON (Content-Type: application/json)")
        try:
            n = _ascii_int(h.headers.get("Content-Length") or "")
        except ValueError:
            raise _UiRefused(411, "a Content-Length (a whole number) is required")
        if n < 0:
            raise _UiRefused(400, "a negative Content-Length")
        if n > self.MAX_BODY:
            raise _UiRefused(413, "the request is over %d bytes" % self.MAX_BODY)
        data = h.rfile.read(n)
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _UiRefused(400, "the request is not valid JSON")
        if not isinstance(body, dict):
            raise _UiRefused(400, "the request must be a JSON object")
        return body

    # -- responses ----------------------------------------------------------------------
    def _headers(self, h, csp="default-src 'none'; frame-ancestors 'none'"):
        for k, v in (("Content-Security-Policy", csp), ("X-Content-Type-Options", "nosniff"),
                     ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store"),
                     ("X-Frame-Options", "DENY"),
                     ("Cross-Origin-Opener-Policy", "same-origin"),
                     ("Cross-Origin-Resource-Policy", "same-origin")):
            h.send_header(k, v)

    def _send(self, h, status, data, ctype="application/json", extra=()):
        if not isinstance(data, bytes):
            data = json.dumps(data, ensure_ascii=True, separators=(",", ":")).encode("ascii")
        h.send_response(status)
        self._headers(h)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _send_error(self, h, status, message, api, headers=()):
        if api:
            return self._send(h, status, {"error": message}, extra=headers)
        self._send(h, status, ("thrum ui: %s\n" % message).encode("utf-8"),
                   "text/plain; charset=utf-8", headers)

    def _send_page(self, h):
        import secrets
        nonce = secrets.token_urlsafe(18)
        if self._page is None:
            self._page = _ui_page().encode("utf-8")
        data = self._page.replace(b"__NONCE__", nonce.encode("ascii"))
        src = "'nonce-%s'" % nonce
        h.send_response(200)
        self._headers(h, "default-src 'none'; script-src %s; style-src %s; connect-src "
                         "'self'; img-src 'self'; base-uri 'none'; form-action 'self'; "
                         "frame-ancestors 'none'; require-trusted-types-for 'script'; "
                         "trusted-types 'none'" % (src, src))
        h.send_header("Content-Type", "text/html; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _no_icon(self, h):
        self._send(h, 204, b"", "text/plain")

    def _stream(self, h):
        """Server-sent events until the page or the server goes: `hello` once (the
        page then loads what it shows), `messages` as they arrive, `changed` when
        anything else in the store changed, a comment every HEARTBEAT seconds."""
        import queue
        q = self.feed.subscribe()
        if q is None:
            raise _UiRefused(503, "too many open pages (at most %d)" % self.MAX_STREAMS)
        try:
            h.send_response(200)
            self._headers(h)
            h.send_header("Content-Type", "text/event-stream")
            h.end_headers()
            h.wfile.write(b"retry: 3000\n\n" + UiFeed.event("hello", {"me": self.me}))
            h.wfile.flush()
            while not self.closing.is_set():
                try:
                    frame = q.get(timeout=self.HEARTBEAT)
                except queue.Empty:
                    frame = b": keep-alive\n\n"
                if frame is None:
                    return
                h.wfile.write(frame)
                h.wfile.flush()
        finally:
            self.feed.unsubscribe(q)

    # -- operations ---------------------------------------------------------------------
    def run(self, op, params):
        """Run an operation on one of the pool's threads (each keeps its daemon and
        index connections, so a burst of requests opens no more than WORKERS of each)."""
        done, box = threading.Event(), {}

        def job():
            try:
                box["result"] = self.router.run(op, params)
            except BaseException as e:  # noqa: B902 - handed to the request's thread
                box["error"] = e
            finally:
                done.set()
        self._pool.submit(job)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def api_state(self, q):
        files = DaemonFiles(self.router.store.loc.var, self.router.caller.env)
        return {"me": self.me, "repo": os.path.basename(self.router.store.loc.store_root),
                "daemon": files.running(), "search": "search" in OPS,
                "version": __version__}

    def api_team(self, q):
        return self.run("agent_list", {"context": True})

    def api_messages(self, q):
        return self.run("inbox", {"all": q.get("view", "all") != "inbox",
                                  "page": _ui_int(q, "page", 1),
                                  "limit": _ui_int(q, "limit", 100), "mark_read": False})

    def api_thread(self, q):
        if not q.get("id"):
            raise UsageError("missing id", hint="/api/thread?id=MESSAGE_OR_THREAD_ID")
        return self.run("inbox", {"thread": q["id"], "all": True, "oldest": True,
                                  "limit": 1000, "mark_read": False})

    def api_search(self, q):
        spec = OPS.get("search")
        if spec is None:
            raise _UiRefused(501, "search unavailable in this version of thrum")
        known = spec.params()
        params = {"query": q.get("q", "")}
        for given, names in (("from", ("sender", "from_", "frm")), ("to", ("to",)),
                             ("ref", ("ref",)), ("since", ("since",))):
            name = next((n for n in names if n in known), None)
            if q.get(given) and name:
                params[name] = q[given]
        if "limit" in known:
            params["limit"] = _ui_int(q, "limit", 50)
        if "rank" in known and q.get("rank") in ("1", "true"):
            params["rank"] = True
        if "everyone" in known:  # the page shows every message: its search finds them all
            params["everyone"] = True
        return self.run("search", params)

    def api_who_has(self, q):
        return self.run("who_has", {"path": q.get("path", "")})

    def api_send(self, b):
        content = b.get("body")
        reply_to = (b.get("reply_to") or "").strip() if isinstance(
            b.get("reply_to"), str) else None
        if reply_to:
            return self.run("reply", {"message_id": reply_to, "content": content})
        to = b.get("to") or ""
        if isinstance(to, str):
            to = [t for t in re.split(r"[,\s]+", to) if t]
        if not isinstance(to, list) or not all(isinstance(t, str) for t in to):
            raise UsageError("to must be text or a list of names")
        return self.run("send", {"content": content, "to": to})

    def api_read(self, b):
        if b.get("all") is True:
            return self.run("message_read", {"all": True})
        return self.run("message_read", {"message_ids": b.get("ids") or []})

    def api_open(self, b):
        """A message with its edits and receipts; marks it read for me (as `thrum
        message get` does)."""
        return self.run("message_get", {"message_id": b.get("id") or ""})


#: What the address with the token answers, with the cookie: go on to the page.
_UI_ENTER = (b'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" '
             b'content="0; url=/"><title>thrum</title><p><a href="/">Open the page</a></p>\n')


#: path -> (method, UiApp method): api_* take the query (GET) or the JSON body (POST)
#: and return the JSON answer; the page and the event stream write their own.
_UI_ROUTES = {
    "/": ("GET", "_send_page"),
    "/api/events": ("GET", "_stream"),
    "/favicon.ico": ("GET", "_no_icon"),
    "/api/state": ("GET", "api_state"),
    "/api/team": ("GET", "api_team"),
    "/api/messages": ("GET", "api_messages"),
    "/api/thread": ("GET", "api_thread"),
    "/api/search": ("GET", "api_search"),
    "/api/who-has": ("GET", "api_who_has"),
    "/api/send": ("POST", "api_send"),
    "/api/read": ("POST", "api_read"),
    "/api/open": ("POST", "api_open"),
}


def _ui_int(q, name, default):
    try:
        return _ascii_int(q.get(name) or str(default))
    except ValueError:
        raise UsageError("%s must be a whole number" % name)


def _ui_hosts(host, port):
    """The Host headers this server answers to (anything else may be a DNS-rebinding
    page): its address, and for loopback `localhost`; for a wildcard bind also this
    machine's name and any address literal is checked in `_ui_host_ok`."""
    names = {host, "localhost", "127.0.0.1", "[::1]"} if _ui_loopback(host) else {host}
    if host in ("0.0.0.0", "::", ""):
        names |= {os.uname().nodename, "localhost", "127.0.0.1", "[::1]"}
    return _UiHosts({("[%s]" % n if ":" in n and not n.startswith("[") else n).lower() +
                     ":%d" % port for n in names}, port, host in ("0.0.0.0", "::", ""))


class _UiHosts(frozenset):
    """A set of `name:port` strings; with `wildcard`, any IP address literal at this
    port is in it too (a server bound to every interface, reached by its address)."""

    def __new__(cls, items, port, wildcard):
        s = super().__new__(cls, items)
        s.port, s.wildcard = port, wildcard
        return s

    def __contains__(self, host):
        if frozenset.__contains__(self, host):
            return True
        if not self.wildcard:
            return False
        import ipaddress
        name, _, port = host.rpartition(":")
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return port == str(self.port)


def _ui_loopback(host):
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ui_server(app, addr, family):
    """The HTTP server (http.server is imported here, when `ui` runs): threads per
    connection, at most MAX_CONNECTIONS of them (more are answered 503 at once), each
    socket idle at most IDLE seconds, no log line per request, one line for a bad one."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "thrum-ui"
        sys_version = ""
        timeout = app.IDLE

        def _any(self):
            app.serve(self)
        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any

        def log_message(self, *args):
            pass

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (a bad request line, too many headers): one
            line of text, never an HTML page."""
            try:
                self.close_connection = True
                text = ("thrum ui: %s\n" % (message or self.responses.get(
                    code, ("error",))[0])).encode("utf-8", "replace")
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(text)))
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(text)
            except (OSError, ValueError):
                pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = family
        request_queue_size = 16

        def process_request(self, request, client_address):
            if not app.slots.acquire(blocking=False):
                try:
                    request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: "
                                    b"text/plain\r\nContent-Length: 22\r\n\r\n"
                                    b"thrum ui: server busy\n")
                except OSError:
                    pass
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                app.slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                app.slots.release()

        def handle_error(self, request, client_address):
            e = sys.exc_info()[1]
            if not isinstance(e, (OSError, ValueError)):
                app.log("connection failed: %s" % error_payload(e)["message"])

    return Server(addr, Handler)


def serve_ui(caller, port=0, bind="127.0.0.1", as_name="user", open_browser=True,
             write=None, as_json=False):
    """`thrum ui`: serve the page until interrupted (SIGINT, SIGTERM: returns 0). The
    human identity `as_name` is registered with role `human` when it does not exist
    yet (once the address is known to work: a refused start stores nothing).
    `write(text)` prints the address (a line, or with `as_json` one JSON document)."""
    import secrets
    import signal
    import socket
    name = _strip_at(as_name or "user")
    router = Router(Caller(caller.cwd, caller.env, name))
    router.threads = True  # nudges: never fork a threaded process
    try:
        if router.store is None:  # set-up first (SPEC §14), then the arguments
            router.run("whoami", {})
        try:
            who = router.run("whoami", {})
        except ThrumError as e:  # (from the daemon: a ThrumError with the exit code)
            if e.exit_code != EXIT_NOT_SETUP:
                raise
            who = None  # registered below, once the server listens
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise UsageError("invalid --port %r: use 0 (any free port) to 65535" % (port,))
        try:
            family, _, _, _, addr = socket.getaddrinfo(
                bind, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)[0]
        except (socket.gaierror, UnicodeError) as e:
            raise UsageError("invalid --bind %r: %s" % (bind, getattr(e, "strerror", None)
                                                        or e))
        app = UiApp(router, None, secrets.token_urlsafe(24), _ui_log)
        try:
            server = _ui_server(app, addr, family)
        except OSError as e:
            raise UsageError("cannot listen on %s port %d: %s" % (bind, port,
                                                                   e.strerror or e),
                             hint="choose another --port (0: any free one), or a --bind "
                                  "address of this machine (default 127.0.0.1)")
        try:
            if who is None:
                router.run("agent_register", {"name": name, "role": "human",
                                              "module": "ui"})
                who = router.run("whoami", {})
            app.me = {"agent_id": who["agent_id"], "role": who.get("role")}
            host, real_port = server.server_address[:2]
            app.bound(host, real_port)
            shown = os.uname().nodename if host in ("0.0.0.0", "::") else (
                "[%s]" % host if ":" in host else host)
            url = "http://%s:%d/?token=%s" % (shown, real_port, app.token)
            if not _ui_loopback(host):
                _warn("listening on %s: anyone who can reach it and has the address can "
                      "read every message and write as @%s" % (host, who["agent_id"]))
            if as_json:
                write(json.dumps({"url": url, "host": host, "port": real_port,
                                  "agent": who["agent_id"]}) + "\n")
            else:
                write("thrum ui: %s  (as @%s; Ctrl-C stops)\n" % (url, who["agent_id"]))
            env = caller.env
            if open_browser and (sys.platform == "darwin" or env.get("DISPLAY") or
                                 env.get("WAYLAND_DISPLAY")):
                start_thread("ui-browser", _ui_open_browser, url)

            def stop(*_):
                raise KeyboardInterrupt
            signal.signal(signal.SIGTERM, stop)
            try:
                server.serve_forever(poll_interval=0.5)
            except KeyboardInterrupt:
                pass
        finally:
            app.closing.set()
            app.feed.close()
            server.server_close()
        return EXIT_OK
    finally:
        router.close()


def _ui_open_browser(url):
    try:
        import webbrowser
        webbrowser.open(url)
    except Exception:  # noqa: BLE001 - the address is printed anyway
        pass


def _ui_log(msg):
    try:
        sys.stderr.write("thrum ui: %s\n" % msg)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _ui_page():
    """The page: HTML, CSS and script in one document, with `__NONCE__` where each
    response puts its CSP nonce. Names and bodies only ever reach the DOM as text."""
    return _UI_PAGE


#: The page `thrum ui` serves (see _ui_page). No framework, nothing remote: the script
#: builds every element with createElement and fills it with textContent.
_UI_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>thrum</title>
<style nonce="__NONCE__">
:root{--fg:#1d232a;--mut:#66707a;--line:#d9dee3;--bg:#f6f7f9;--card:#fff;--acc:#2458b3;--bad:#b3261e;--unread:#fff7db}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;gap:12px;align-items:baseline;padding:8px 16px;background:#1d232a;color:#fff}
header h1{font-size:18px;margin:0}
header .conn{margin-left:auto;font-size:12px;color:#b8c4cf}
#status{margin:0;padding:4px 16px;min-height:1.6em;font-size:13px}
#status.bad{color:var(--bad)}#status.ok{color:#2e7d32}
main{display:grid;grid-template-columns:minmax(380px,1.6fr) minmax(260px,1fr);grid-template-areas:"people people" "traffic lookup";gap:12px;padding:0 16px 16px;align-items:start}
#people{grid-area:people}#traffic{grid-area:traffic}#lookup{grid-area:lookup}
section{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:8px 12px;min-width:0;overflow-x:auto}
h2{font-size:14px;margin:8px 0;color:var(--mut);text-transform:uppercase;letter-spacing:.04em}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 4px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--mut);font-weight:600}
tr.offline td{color:var(--mut)}
td.num{text-align:right}
.small{font-size:12px;color:var(--mut)}
form{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
input,select,textarea,button{font:inherit}
input,select,textarea{border:1px solid var(--line);border-radius:4px;padding:4px 6px;background:#fff}
textarea{width:100%;min-height:4.5em;resize:vertical}
#send-form label{display:flex;gap:4px;align-items:center;flex:1 1 45%}
#send-form label input{flex:1;min-width:0}
button{border:1px solid var(--line);background:#eef1f4;border-radius:4px;padding:3px 9px;cursor:pointer}
button[type=submit]{background:var(--acc);color:#fff;border-color:var(--acc)}
#filters{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin:8px 0;font-size:13px}
ol{list-style:none;margin:0;padding:0}
.msg,.tmsg,.result{border-top:1px solid var(--line);padding:6px 2px}
.msg.unread{background:var(--unread)}
.meta{font-size:12px;color:var(--mut);display:flex;flex-wrap:wrap;gap:6px}
.meta .from{color:var(--fg);font-weight:600}
.body{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0}
.structured{white-space:pre-wrap;font:12px ui-monospace,monospace;background:var(--bg);padding:4px;margin:2px 0}
.actions{display:flex;gap:4px}
.actions button{font-size:12px;padding:1px 6px}
.receipts{font-size:12px;color:var(--mut)}
.tag{background:#e8eef8;border-radius:3px;padding:0 4px}
#older{margin-top:8px}
details summary{cursor:pointer}
.thread-head{font-size:12px;color:var(--mut)}
@media (max-width:900px){main{grid-template-columns:1fr;grid-template-areas:"people" "traffic" "lookup"}}
</style></head>
<body>
<header><h1>thrum</h1><span id="where"></span><span id="conn" class="conn">connecting</span></header>
<p id="status" role="status" aria-live="polite"></p>
<main>
<section id="people">
<h2>Team</h2>
<table id="team"><thead><tr><th>Agent</th><th>Role</th><th>Intent / task</th><th>Branch</th><th>Files</th><th>Last seen</th><th>Unread</th><th>Session</th></tr></thead><tbody></tbody></table>
</section>
<section id="traffic">
<form id="send-form" autocomplete="off">
<label>To <input name="to" placeholder="@bob, reviewer, everyone"></label>
<label>Reply to <input name="reply_to" placeholder="a message id (Reply fills it)"></label>
<textarea name="body" placeholder="Message"></textarea>
<button type="submit">Send</button>
</form>
<div id="filters">
<select id="view" aria-label="view"><option value="all">Everything</option><option value="inbox">My inbox</option></select>
<label>Agent <select id="f-agent"><option value="">any</option></select></label>
<label>Role <select id="f-role"><option value="">any</option></select></label>
<label>Ref <input id="f-ref" size="12" placeholder="bd:bd-123"></label>
<button id="mark-all-read" type="button">Mark all read</button>
</div>
<ol id="feed"></ol>
<button id="older" type="button">Older messages</button>
</section>
<section id="lookup">
<h2>Search</h2>
<form id="search-form"><input name="q" type="search" placeholder="words, &quot;a phrase&quot;, auth*"><button type="submit">Search</button></form>
<ol id="results"></ol>
<h2>Thread</h2>
<div id="thread"><p class="small">Choose Thread on a message.</p></div>
<h2>Who has a file</h2>
<form id="who-has-form"><input name="path" placeholder="src/auth.py" required><button type="submit">Who has it</button></form>
<ul id="who-has"></ul>
</section>
</main>
<script nonce="__NONCE__">
"use strict";
(function () {
  var S = {me: null, roles: {}, team: [], view: "all", pages: 1, els: new Map(), timer: null};
  var feed = document.getElementById("feed");

  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function snippet(text) {  // a search hit: the matches (between \u00ab and \u00bb) as <mark>, all as text
    var d = el("div", "body"), parts = String(text).split(/\u00ab([^\u00bb]*)\u00bb/);
    parts.forEach(function (p, i) { d.append(i % 2 ? el("mark", null, p) : document.createTextNode(p)); });
    return d;
  }
  function say(text, bad) { var s = $("status"); s.textContent = text; s.className = bad ? "bad" : "ok"; }
  function api(path, body) {
    var opt = {credentials: "same-origin", cache: "no-store"};
    if (body !== undefined) {
      opt.method = "POST";
      opt.headers = {"Content-Type": "application/json"};
      opt.body = JSON.stringify(body);
    }
    return fetch(path, opt).then(function (r) {
      return r.json().catch(function () { return null; }).then(function (d) {
        if (!r.ok) {
          var err = new Error(d && d.error ? d.error : "HTTP " + r.status);
          err.status = r.status;
          throw err;
        }
        return d;
      });
    });
  }
  function fail(e) { say("thrum: error: " + e.message, true); }
  function ago(ts) {
    if (!ts) { return ""; }
    var s = (Date.now() - Date.parse(ts)) / 1000;
    if (!(s >= 0)) { s = 0; }
    if (s < 60) { return Math.floor(s) + "s ago"; }
    if (s < 3600) { return Math.floor(s / 60) + "m ago"; }
    if (s < 86400) { return Math.floor(s / 3600) + "h ago"; }
    return Math.floor(s / 86400) + "d ago";
  }
  function audiences(m) {
    var a = (m.audiences || []).map(function (x) {
      return x.type === "agent" ? "@" + x.value : x.type === "everyone" ? "everyone" : x.type + ":" + x.value;
    });
    return a.length ? a.join(", ") : m.recipients.map(function (r) { return "@" + r; }).join(", ");
  }
  function tags(m) { return (m.refs || []).map(function (r) { return r.type + ":" + r.value; }); }
  function toMe(m) { return S.me && m.recipients.indexOf(S.me.agent_id) >= 0; }

  // -- one message ------------------------------------------------------------------
  function fill(li, m, thread) {
    var sig = JSON.stringify(m) + (S.me ? S.me.agent_id : "");
    if (li.thrumSig === sig) { return li; }  // unchanged: the same elements stay
    li.thrumSig = sig;
    var box = li.querySelector(":scope > .receipts");
    li.replaceChildren();
    if (box) { li.append(box); }
    li.dataset.id = m.message_id;
    li.dataset.created = m.created_at;
    li.dataset.author = m.agent_id;
    li.dataset.recipients = m.recipients.join(" ");
    li.dataset.refs = tags(m).join(" ");
    li.classList.toggle("unread", toMe(m) && !m.is_read);
    var meta = el("div", "meta");
    var when = el("time", "when", ago(m.created_at));
    when.dateTime = m.created_at;
    meta.append(el("span", "from", "@" + m.agent_id), el("span", "to", "\u2192 " + audiences(m)),
                when, el("span", "id", m.short_id || m.message_id));
    if (m.reply_to) {
      var parent = S.els.get(m.reply_to), pid = parent && parent.querySelector(".id");
      meta.append(el("span", "re", "\u21b3 re " + (pid ? pid.textContent : m.reply_to)));
    }
    if (m.version) { meta.append(el("span", "edited", "(edited)")); }
    tags(m).forEach(function (x) { meta.append(el("span", "tag", x)); });
    li.append(meta);
    var text = m.body.content;
    li.append(el("div", "body", text));
    if (m.body.structured) { li.append(el("div", "structured", JSON.stringify(m.body.structured, null, 2))); }
    var acts = el("div", "actions");
    var reply = el("button", "reply", "Reply");
    reply.type = "button";
    reply.addEventListener("click", function () {
      var f = $("send-form");
      f.elements.reply_to.value = m.message_id;
      f.elements.body.focus();
      say("Replying to @" + m.agent_id + " (" + (m.short_id || m.message_id) + ")");
    });
    acts.append(reply);
    if (!thread) {
      var th = el("button", "thread-btn", "Thread");
      th.type = "button";
      th.addEventListener("click", function () { showThread(m.message_id); });
      acts.append(th);
    }
    var rc = el("button", "receipts-btn", "Receipts");
    rc.type = "button";
    var box = li.querySelector(":scope > .receipts") || el("div", "receipts");
    rc.addEventListener("click", function () { li.dataset.receipts = "open"; receipts(m.message_id, box, li); });
    acts.append(rc);
    if (toMe(m) && !m.is_read) {
      var mr = el("button", "mark-read", "Mark read");
      mr.type = "button";
      mr.addEventListener("click", function () {
        api("/api/read", {ids: [m.message_id]}).then(function () {
          li.classList.remove("unread"); mr.remove(); refreshSoon();
        }, fail);
      });
      acts.append(mr);
    }
    li.append(acts, box);
    if (li.dataset.receipts === "open") { receipts(m.message_id, box, li); }  // kept current
    return li;
  }
  function receipts(id, box, li) {
    api("/api/open", {id: id}).then(function (d) {
      var m = d.message;
      box.replaceChildren();
      m.receipts.forEach(function (r) {
        box.append(el("div", "", "@" + r.agent_id + ": " + (r.read_at ? "read " + ago(r.read_at) : "unread")));
      });
      if (m.edits && m.edits.length) { box.append(el("div", "", m.edits.length + " edit(s)")); }
      li.classList.remove("unread");
      var mr = li.querySelector(".mark-read");
      if (mr) { mr.remove(); }
    }, fail);
  }
  function visible(li) {
    var a = $("f-agent").value, r = $("f-role").value, ref = $("f-ref").value.trim();
    var people = [li.dataset.author].concat(li.dataset.recipients ? li.dataset.recipients.split(" ") : []);
    if (a && people.indexOf(a) < 0) { return false; }
    if (r && !people.some(function (p) { return S.roles[p] === r; })) { return false; }
    if (ref && (" " + li.dataset.refs + " ").indexOf(" " + ref + " ") < 0) { return false; }
    return true;
  }
  function filter() { feed.querySelectorAll("li.msg").forEach(function (li) { li.hidden = !visible(li); }); }
  function order(li) { return li.dataset.created + "|" + li.dataset.id; }
  function put(m) {
    if (S.view === "inbox" && !toMe(m)) { return; }
    var li = S.els.get(m.message_id);
    if (li) { fill(li, m); li.hidden = !visible(li); return; }
    li = fill(el("li", "msg"), m);
    S.els.set(m.message_id, li);
    var key = order(li), before = null;
    for (var c = feed.firstElementChild; c; c = c.nextElementSibling) {
      if (order(c) < key) { before = c; break; }
    }
    feed.insertBefore(li, before);
    li.hidden = !visible(li);
  }

  // -- loading ---------------------------------------------------------------------
  function load() {
    var got = [], n = S.pages;
    function page(p) {
      return api("/api/messages?view=" + S.view + "&page=" + p + "&limit=100").then(function (d) {
        got = got.concat(d.messages);
        $("older").hidden = p >= d.total_pages;
        if (p < n && p < d.total_pages) { return page(p + 1); }
      });
    }
    return page(1).then(function () {
      var keep = new Map();
      var items = got.map(function (m) {
        var li = S.els.get(m.message_id) || el("li", "msg");
        fill(li, m);
        li.hidden = !visible(li);
        keep.set(m.message_id, li);
        return li;
      });
      S.els = keep;
      feed.replaceChildren.apply(feed, items);
    });
  }
  function team() {
    return api("/api/team").then(function (d) {
      var body = $("team").tBodies[0], roles = {}, names = [];
      var rows = d.agents.slice().sort(function (a, b) {
        return (a.status === b.status ? 0 : a.status === "active" ? -1 : 1) || (a.agent_id < b.agent_id ? -1 : 1);
      }).map(function (a) {
        roles[a.agent_id] = a.role;
        names.push(a.agent_id);
        var tr = el("tr", a.status === "active" ? "active" : "offline");
        tr.dataset.agent = a.agent_id;
        var name = el("td", "name");
        name.append(el("div", "", "@" + a.agent_id));
        if (a.display) { name.append(el("div", "small", a.display)); }
        var doing = el("td", "intent");
        doing.append(el("div", "", a.intent || ""));
        if (a.task) { doing.append(el("div", "small", "task: " + a.task)); }
        var files = el("td", "files"), fl = a.files || [];
        if (fl.length) {
          var det = el("details"), ul = el("ul");
          det.append(el("summary", "", fl.length + (fl.length === 1 ? " file" : " files")));
          fl.forEach(function (f) { ul.append(el("li", "", (f.status ? f.status + " " : "") + f.path)); });
          det.append(ul);
          files.append(det);
        }
        var ses = el("td", "session", a.session_id ? "open" : "\u2014");
        if (a.tmux && a.tmux.session) { ses.append(el("div", "small", "tmux " + a.tmux.session)); }
        tr.append(name, el("td", "role", a.role), doing, el("td", "branch", a.branch || ""), files,
                  el("td", "seen", ago(a.last_seen_at)), el("td", "num unread", a.unread), ses);
        return tr;
      });
      body.replaceChildren.apply(body, rows);
      S.roles = roles;
      options($("f-agent"), names, "@");
      options($("f-role"), Array.from(new Set(Object.values(roles))).sort(), "");
    });
  }
  function options(sel, values, prefix) {
    var cur = sel.value, first = sel.options[0];
    sel.replaceChildren(first);
    values.forEach(function (v) { var o = el("option", "", prefix + v); o.value = v; sel.append(o); });
    sel.value = values.indexOf(cur) >= 0 ? cur : "";
  }
  function refresh() { return Promise.all([team(), load()]).then(filter).catch(fail); }
  function refreshSoon() {
    if (S.timer) { return; }
    S.timer = setTimeout(function () { S.timer = null; refresh(); }, 1000);
  }
  function showThread(id) {
    api("/api/thread?id=" + encodeURIComponent(id)).then(function (d) {
      var box = $("thread"), ol = el("ol");
      box.replaceChildren(el("div", "thread-head", d.messages.length + " message(s) in this thread"), ol);
      box.dataset.id = id;
      d.messages.forEach(function (m) { ol.append(fill(el("li", "tmsg"), m, true)); });
    }, fail);
  }

  // -- the live stream -----------------------------------------------------------
  function live() {
    var es = new EventSource("/api/events");
    es.addEventListener("hello", function (ev) {
      S.me = JSON.parse(ev.data).me;
      $("conn").textContent = "live as @" + S.me.agent_id;
      refresh();
    });
    es.addEventListener("messages", function (ev) {
      JSON.parse(ev.data).messages.forEach(put);
      if ($("thread").dataset.id) { showThread($("thread").dataset.id); }
      refreshSoon();
    });
    es.addEventListener("changed", function () { refreshSoon(); });
    es.onerror = function () {
      $("conn").textContent = es.readyState === 2 ? "disconnected: open the address thrum ui printed" : "reconnecting";
    };
  }

  // -- forms -------------------------------------------------------------------------
  $("send-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var f = ev.target, reply = f.elements.reply_to.value.trim();
    var b = {body: f.elements.body.value, to: f.elements.to.value};
    if (reply) { b.reply_to = reply; }
    api("/api/send", b).then(function (r) {
      f.elements.body.value = "";
      f.elements.reply_to.value = "";
      var parent = reply && S.els.get(r.reply_to);
      if (parent) {  // a reply marks its parent read
        parent.classList.remove("unread");
        var mr = parent.querySelector(".mark-read");
        if (mr) { mr.remove(); }
      }
      var to = r.recipients.map(function (x) { return "@" + x; }).join(", ");
      say((reply ? "Replied: " : "Sent: ") + r.message_id + (to ? " to " + to : "") +
          (r.warnings && r.warnings.length ? " (" + r.warnings.join("; ") + ")" : ""));
      refreshSoon();
    }, fail);
  });
  $("search-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var q = ev.target.elements.q.value, out = $("results");
    api("/api/search?q=" + encodeURIComponent(q)).then(function (d) {
      out.replaceChildren();
      if (!d.messages.length) { out.append(el("li", "result", "No match.")); }
      d.messages.forEach(function (m) {
        var li = el("li", "result");
        li.dataset.id = m.message_id;
        li.append(el("div", "meta", "@" + m.agent_id + " \u2192 " + audiences(m) + " \u00b7 " + ago(m.created_at)),
                  snippet(m.snippet || m.body.content));
        var th = el("button", "thread-btn", "Thread");
        th.type = "button";
        th.addEventListener("click", function () { showThread(m.message_id); });
        li.append(th);
        out.append(li);
      });
    }, function (e) {
      out.replaceChildren(el("li", "result", e.status === 501 ? "search unavailable" : "thrum: error: " + e.message));
    });
  });
  $("who-has-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var out = $("who-has");
    api("/api/who-has?path=" + encodeURIComponent(ev.target.elements.path.value)).then(function (d) {
      out.replaceChildren();
      if (!d.agents.length) { out.append(el("li", "", "Nobody has " + d.path + " changed.")); }
      d.agents.forEach(function (a) {
        out.append(el("li", "", "@" + a.agent_id + " is editing " + d.path + (a.branch ? " (branch " + a.branch + ")" : "")));
      });
    }, fail);
  });
  $("mark-all-read").addEventListener("click", function () {
    api("/api/read", {all: true}).then(function (r) {
      say("Marked " + r.marked_count + " message(s) read"); refresh();
    }, fail);
  });
  $("older").addEventListener("click", function () { S.pages += 1; load().catch(fail); });
  $("view").addEventListener("change", function (ev) { S.view = ev.target.value; S.pages = 1; load().catch(fail); });
  ["f-agent", "f-role"].forEach(function (id) { $(id).addEventListener("change", filter); });
  $("f-ref").addEventListener("input", filter);
  setInterval(function () {
    document.querySelectorAll("time.when").forEach(function (t) {
      var li = t.closest("[data-created]");
      if (li) { t.textContent = ago(li.dataset.created); }
    });
  }, 30000);
  api("/api/state").then(function (d) {
    $("where").textContent = d.repo + (d.daemon ? " \u00b7 daemon" : "") + " \u00b7 thrum " + d.version;
    if (!d.search) { $("search-form").elements.q.placeholder = "search unavailable"; }
  }, fail);
  live();
}());
</script>
</body></html>
"""


# === 21. CLI: output, arguments, the Cli context ==============================

def _columns(stream):
    """A terminal's width in columns (80 when it does not say; at least 40)."""
    try:
        return max(40, os.get_terminal_size(stream.fileno()).columns)
    except (OSError, ValueError, AttributeError):
        return 80


class Output:
    """Writes results: one JSON document with --json, compact text otherwise."""

    def __init__(self, json_mode=False, quiet=False, verbose=False, stream=None):
        self.stream = stream or sys.stdout
        self.document = None    # with --json: the one document, written by flush()
        self.result = None      # the last result emitted (what an output error reports)
        self.broken = False     # stdout failed: write nothing more
        self.autosync_error = None
        self.configure(json_mode, quiet, verbose)

    def configure(self, json_mode=False, quiet=False, verbose=False):
        self.json = json_mode
        self.quiet = quiet
        self.verbose = verbose
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.color = not json_mode and "NO_COLOR" not in os.environ and tty
        # a terminal's columns for wrapping and cutting; None (never wrap) for a pipe
        self.width = _columns(self.stream) if tty else None

    def c(self, code, text):
        return "\033[%sm%s\033[0m" % (code, text) if self.color else text

    def emit(self, data, lines=None):
        """Print `data` as JSON (held for flush), or the human `lines` (a list or a
        callable), with control characters in them made visible."""
        if isinstance(data, dict):
            self.result = data
        if self.json:
            self.document = data
            return
        if callable(lines):
            lines = lines(_visible_data(data))
        else:
            lines = [_visible(l, "\t\n") for l in lines or ()]
        if lines:
            self.write("\n".join(lines) + "\n")

    def write(self, text):
        """Write to stdout; a failure (closed, full disk, broken pipe) is OutputError."""
        if self.broken:
            return
        PROGRESS.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as e:
            self.broken = True
            raise OutputError(e) from None

    def flush(self):
        """Write the held JSON document (exactly one per command)."""
        if self.json and self.document is not None:
            doc, self.document = self.document, None
            self.write(json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    def ok(self, data, *lines):
        """A confirmation: `✓ first line` plus detail lines (hidden by --quiet)."""
        if self.json:
            return self.emit(data)
        if self.quiet:
            return
        lines = [_visible(l) for l in lines if l]
        self.emit(data, lambda _: [self.c("32", "✓") + " " + lines[0]] + lines[1:])


#: Options whose value may start with "-" (`--after -15s`): argv is rewritten
#: to `--after=-15s` before argparse sees it.
_VALUE_OPTS = ("--after", "--timeout", "--to", "--mention", "--scope", "--ref", "--reason",
               "--intent", "--task", "--description", "--display", "--from", "--body-file",
               "--format", "--structured", "--name", "--role", "--module", "--limit", "--page",
               "--idempotency-key", "--since")


def _argparse():
    import argparse

    class Parser(argparse.ArgumentParser):
        def __init__(self, *a, **kw):
            kw.setdefault("allow_abbrev", False)  # `--un` is not `--unread`, anywhere
            super().__init__(*a, **kw)

        def error(self, message):
            raise UsageError(message, hint="see '%s --help'" % self.prog)

        def add_subparsers(self, **kw):
            """Subcommands whose --help opens with their one-line help."""
            action = super().add_subparsers(**kw)
            add = action.add_parser

            def add_parser(name, **k):
                if k.get("help"):
                    k.setdefault("description", k["help"])
                return add(name, **k)
            action.add_parser = add_parser
            return action

    return argparse, Parser


def split_global_flags(argv):
    """Pull global flags (--json, --quiet, --verbose, --repo, --version, --debug) out of
    argv wherever they appear (before a `--`)."""
    flags = {"json": False, "quiet": False, "verbose": False, "repo": None,
             "version": False, "debug": False}
    rest, i, raw = [], 0, False
    while i < len(argv):
        a = argv[i]
        if raw and a not in ("--json", "--"):  # the pane's command, word for word
            rest.append(a)
            i += 1
            continue
        if a == "--command":
            raw = True
        if a == "--":  # (`--command -- CMD...`: CMD may take flags like thrum's own)
            rest.extend(argv[i + 1:] if rest[-1:] == ["--command"] else argv[i:])
            break
        if a == "--json":
            flags["json"] = True
        elif a in ("--quiet", "-q"):
            flags["quiet"] = True
        elif a in ("--verbose", "-v"):
            flags["verbose"] = True
        elif a == "--version":
            flags["version"] = True
        elif a == "--debug":
            flags["debug"] = True
        elif a == "--repo":
            if i + 1 >= len(argv) or not argv[i + 1]:
                raise UsageError("--repo needs a PATH")
            flags["repo"] = argv[i + 1]
            i += 1
        elif a.startswith("--repo="):
            flags["repo"] = a[7:]
            if not flags["repo"]:
                raise UsageError("--repo needs a PATH")
        elif a in _VALUE_OPTS and i + 1 < len(argv) and argv[i + 1] != "--":
            rest.append(a + "=" + argv[i + 1])
            i += 1
        else:
            rest.append(a)
        i += 1
    return flags, rest


def _pid_arg(text):
    try:
        pid = _ascii_int(text)
    except ValueError:
        pid = 0
    if not 0 < pid < 2 ** 31:
        import argparse
        raise argparse.ArgumentTypeError("not a process id: %r" % text)
    return pid


def _add_body_args(p, op):
    """BODY, --stdin, --body-file, --format and --structured of operation `op` (their
    defaults are the operation's)."""
    p.add_argument("body", nargs="*", metavar="BODY",
                   help="message text ('-' reads standard input)")
    p.add_argument("--stdin", action="store_true", help="read the body from standard input")
    p.add_argument("--body-file", metavar="PATH",
                   help="read the body from a file ('-' reads standard input)")
    fmt = OPS[op].default("fmt")
    p.add_argument("--format", dest="fmt", default=fmt, metavar="FMT",
                   help="markdown, plain or json (default: %s)" % (
                       fmt or "the message's format"))
    p.add_argument("--structured", metavar="JSON", help="a JSON object of structured data")


def _int_arg(text):
    try:
        return _ascii_int(text)
    except ValueError:
        import argparse
        raise argparse.ArgumentTypeError("not a whole number: %r" % text)


def _add_paging(p, op):
    """--limit and --page of operation `op` (their defaults are the operation's)."""
    limit, page = OPS[op].default("limit"), OPS[op].default("page")
    p.add_argument("--limit", "--page-size", type=_int_arg, default=limit, metavar="N",
                   help="messages per page (default %d)" % limit)
    p.add_argument("--page", type=_int_arg, default=page, metavar="N",
                   help="page number (default %d)" % page)


def read_body(args, stdin=None):
    """Exactly one body source; stdin/file bodies lose one trailing newline (SPEC §14)."""
    words = getattr(args, "body", None) or []
    positional = " ".join(words) if words else None
    body_file = getattr(args, "body_file", None)
    use_stdin = bool(getattr(args, "stdin", False)) or positional == "-"
    sources = [n for n, on in (("an argument", positional not in (None, "-")),
                               ("standard input", use_stdin),
                               ("--body-file", bool(body_file))) if on]
    if not sources:
        raise UsageError("no message body",
                         hint="give the text as an argument, '-' or --stdin for standard "
                              "input, or --body-file PATH")
    if len(sources) > 1:
        raise UsageError("message body is ambiguous: got %s; give exactly one"
                         % " and ".join(sources))
    if positional not in (None, "-"):
        return positional
    if use_stdin or body_file == "-":  # `--body-file -` is standard input, as elsewhere
        data = _read_stdin(stdin)
    else:
        try:
            with open(args.body_file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError("cannot read --body-file %s: %s" % (args.body_file,
                                                                   e.strerror or e))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError("message body is not valid UTF-8 (byte %d)" % e.start)
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return text


def _read_stdin(stream=None):
    """All of standard input as bytes; a closed stdin is a usage error."""
    if stream is None:
        if sys.stdin is None or sys.stdin.closed:
            raise UsageError("standard input is closed", hint="pipe the text in, or pass "
                             "it as an argument or with a file option")
        stream = sys.stdin.buffer
    return stream.read()


# -- command handlers -------------------------------------------------------------
# Each takes (args, cli, out): it turns the arguments into one operation's params,
# calls it through `cli.call()` and renders the result. No policy lives here.

class Cli(Router):
    """The CLI's side of one process: the caller (cwd, environment, --repo), the store
    it opened and the output, shared by the operations one command runs."""

    def __init__(self, caller, out, overrides=None):
        super().__init__(caller, overrides=overrides)
        self.out = out

    def call(self, op, **params):
        """Run an operation (see Router.run). A write whose THRUM_AUTOSYNC failed still
        returns its result; the error is reported after the output (exit 1)."""
        try:
            return self.run(op, params)
        except AfterWriteError as e:
            self.out.autosync_error = e.error
            return e.result

    def check(self, op, **params):
        """Run `op` without its body, when the body could not be read: set-up and
        the other arguments are checked first (SPEC §14), then the body error stands."""
        try:  # here, not through the daemon: only the error matters
            call(op, params, self.caller, self.store)
        except MissingBodyError:
            pass

    def body(self, args, op, **params):
        try:
            return read_body(args)
        except UsageError:
            self.check(op, **params)
            raise


# === 22. Host integrations: hooks, integrate, install =========================

HOOK_EVENTS = ("session-start", "stop", "prompt", "wake")


HOOK_BRIEFING_MAX = 2000  # bytes: a host may move longer hook output to a file

#: Seconds Claude Code gives the background `hook wake` (its own --timeout is 10m).
WAKE_HOOK_TIMEOUT = 660


def _hook_news_line(news, verb):
    who = ", ".join(dict.fromkeys("@" + m["from"] for m in news["messages"]))
    n = len(news["messages"])
    return "thrum: %s from %s %s -- run `thrum inbox` to read %s." % (
        "1 new message" if n == 1 else "%d new messages" % n, who, verb,
        "it" if n == 1 else "them")


def hook_briefing(r, limit=HOOK_BRIEFING_MAX):
    """The `prime` briefing, compact: who I am, unread messages (newest few), the team,
    my saved context; cut to `limit` UTF-8 bytes on a line boundary."""
    a = r["agent"]
    ls = ["thrum: you are @%s (%s, %s)%s." % (a["agent_id"], a.get("role"), a.get("module"),
                                             "; intent: " + a["intent"] if a.get("intent")
                                             else "")]
    unread, n = r["unread"], r["inbox"]["unread"]
    if n:
        ls.append("%d unread message%s (read with `thrum inbox`; nothing was marked read):"
                  % (n, "" if n == 1 else "s"))
        for m in unread:  # the newest few, newest first
            first = (m["body"]["content"] or "").strip().split("\n")[0]
            ls.append("- @%s %s: %s" % (m["agent_id"], m["message_id"], clip(first, 100)))
        if n > len(unread):
            ls.append("- ... and %d older" % (n - len(unread)))
    else:
        ls.append("No unread messages.")
    team = [m for m in r["team"] if m["agent_id"] != a["agent_id"]]
    if team:
        ls.append("Team: " + "; ".join(
            "@%s (%s%s)" % (m["agent_id"], m["role"], ": " + clip(m["intent"], 60)
                           if m.get("intent") else "") for m in team[:10]))
    if r.get("context"):
        ls.append("Your saved context (thrum context show):")
        ls += ["  " + clip(l, 120) for l in r["context"].strip().split("\n")[:12]]
    ls.append("Messages: `thrum inbox`, `thrum reply ID TEXT`, `thrum send TEXT --to @NAME`.")
    ls.append("To hear of new messages as they arrive, run `thrum watch --agent %s` with "
              "your Monitor tool, if you have one (one line per message)." % a["agent_id"])
    out, size = [], 0
    for line in ls:
        n = len(line.encode("utf-8")) + 1
        if size + n > limit - 40:
            out.append("(briefing cut; run `thrum prime` for all of it)")
            break
        out.append(line)
        size += n
    return "\n".join(out)


#: A hook answers within this many seconds whatever the store's state (SPEC §15)...
HOOK_BUDGET = 1.8
#: ...of which reading the host's JSON on stdin may take this long...
HOOK_STDIN_WAIT = 1.0
#: ...and this many bytes: more is junk (and not read).
HOOK_STDIN_MAX = 1 << 20


def _args_hook(p):
    p.add_argument("event", metavar="EVENT", help="session-start | stop | prompt | wake")
    p.add_argument("--agent", metavar="NAME", help="the agent (default: THRUM_NAME, else "
                   "the worktree's only identity)")
    p.add_argument("--timeout", metavar="D", default="10m",
                   help="wake: how long to wait for a message (default 10m)")


def cmd_hook(args, cli, out):
    """(`thrum hook` runs through run_hook(), from _run(): this is for the table.)"""
    return run_hook(["hook"] + [a for a in (args.event,) if a] +
                    (["--agent", args.agent] if args.agent else []), cli.caller, out)


def run_hook(rest, caller, out):
    """`thrum hook EVENT [--agent NAME]`: a hook of Claude Code or Codex. It never breaks
    the host's turn: exit 0 always; at most one line on stderr (the problem, or the first
    warning); an answer within HOOK_BUDGET seconds even when the index is locked, the
    disk is full or stdin never closes (then silently, nothing on stdout)."""
    import io
    deadline = time.monotonic() + HOOK_BUDGET
    real_err, sys.stderr = sys.stderr, io.StringIO()  # warnings are collected, not shown
    result = {}

    def work():
        try:
            _, parser = _argparse()
            parser = parser(prog="thrum hook")
            _args_hook(parser)
            at = rest.index("hook") if "hook" in rest else -1
            args = parser.parse_args(rest[:at] + rest[at + 1:] if at >= 0 else rest)
            result["event"] = args.event
            if args.event not in HOOK_EVENTS:
                raise UsageError("unknown hook event %r (known: %s)" % (
                    args.event, ", ".join(HOOK_EVENTS)))
            data = _read_hook_input(min(deadline, time.monotonic() + HOOK_STDIN_WAIT))
            agent = _strip_at(args.agent) if args.agent else None
            cwd = data.get("cwd")  # the host's project directory, when it says
            if not (isinstance(cwd, str) and os.path.isdir(cwd)):
                cwd = caller.cwd
            if args.event == "wake":  # it blocks by design: the main thread runs it
                result["wake"] = (Caller(cwd, caller.env, agent), args.timeout)
                return
            wait = "%dms" % max(100, int((deadline - time.monotonic()) * 1000) - 300)
            here = Cli(Caller(cwd, caller.env, agent), out, {"index.lock_wait": wait})
            try:
                result["reply"] = _hook_reply(args.event, data, here)
            finally:
                here.close()
        except BaseException as e:  # noqa: B902 - a hook must never fail the host's turn
            result["error"] = e
    worker = start_thread("hook", work)
    worker.join(max(0.0, deadline - time.monotonic()))
    collected, sys.stderr = sys.stderr.getvalue(), real_err
    line = None
    if "wake" in result and not worker.is_alive():
        return wake_hook(*result["wake"], out=out)
    if worker.is_alive():
        pass  # out of time: silently, nothing on stdout
    elif "error" in result:
        line = "thrum hook %s: %s" % (result.get("event", "?"),
                                      _visible(error_payload(result["error"])["message"]))
    else:
        if result.get("reply") is not None:
            try:
                out.write(json.dumps(result["reply"], ensure_ascii=False) + "\n")
            except OutputError:
                pass
        first = [ln for ln in collected.splitlines() if ln.strip()][:1]
        line = first[0] if first else None
    if line:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
    if worker.is_alive():  # stuck in a lock or a read: leave it behind
        os._exit(EXIT_OK)
    return EXIT_OK


def wake_hook(caller, timeout, out):
    """`thrum hook wake`: for a Claude Code Stop hook run in the background (`async`,
    `asyncRewake`). Blocks until a message arrives that the agent was not told of (a
    lookback wait in the same delivered-once record as the stop hook), for at most
    `timeout`; then one line on stderr and exit 2, which wakes the idle session. Nothing
    by then, or a newer wake hook of the same agent started (it supersedes this one):
    exit 0 and silence. Any problem: exit 0 and one stderr line."""
    import io
    real_err, sys.stderr = sys.stderr, io.StringIO()  # warnings are collected
    cli = cancel = None
    try:
        cli = Cli(caller, out)
        me = cli.call("whoami")["agent_id"]
        cancel = Cancel()
        path = _safe_name_path(os.path.join(cli.store.loc.var, "hooks"), me, ".wake")
        token = "%d-%s" % (os.getpid(), os.urandom(6).hex())
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        _write_file_atomic(path, token + "\n", 0o600)

        def superseded():  # a newer wake hook of this agent rewrote the file
            while not cancel.wait(0.25):
                if (_read_text(path) or "").strip() != token:
                    cancel.set()
        start_thread("wake-supersede", superseded)
        try:
            r = cli.run("wait", {"timeout": timeout, "after": "-1s", "skip_read": True},
                        cancel=cancel)
        except WaitAbandoned:
            return EXIT_OK
        if r["status"] != "received":
            cli.settle(r, False)
            return EXIT_OK
        line = _hook_news_line({"messages": [{"from": m["agent_id"]} for m in r["messages"]]},
                               "arrived")
        try:
            real_err.write(_visible(line) + "\n")
            real_err.flush()
        except (OSError, ValueError):
            cli.settle(r, False)
            return EXIT_OK
        cli.settle(r, True)
        return 2  # Claude Code: exit 2 from an asyncRewake hook wakes the session
    except BaseException as e:  # noqa: B902 - a hook must never fail the host's turn
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return EXIT_OK
        try:
            real_err.write("thrum hook wake: %s\n" % _visible(error_payload(e)["message"]))
        except (OSError, ValueError):
            pass
        return EXIT_OK
    finally:
        sys.stderr = real_err
        if cancel is not None:
            cancel.set()
        if cli is not None:
            cli.close()


def _read_hook_input(deadline):
    """The host's hook JSON on stdin, read until EOF, `deadline` or HOOK_STDIN_MAX bytes:
    anything else (no stdin, a terminal, junk, too big, too slow, nested too deep) is {}."""
    import select
    stdin = sys.stdin
    if stdin is None or stdin.closed or stdin.isatty():
        return {}
    fd, chunks, size = stdin.fileno(), [], 0
    while size <= HOOK_STDIN_MAX:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {}  # the host never closed it: junk
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > HOOK_STDIN_MAX:
        return {}
    raw = b"".join(chunks)
    try:
        data = json.loads(raw.decode("utf-8", "replace"), parse_constant=_no_constant) \
            if raw.strip() else {}
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _hook_reply(event, data, cli):
    if event == "session-start":
        r = cli.call("briefing")
        limit = HOOK_BRIEFING_MAX - 100
        while True:  # the whole reply within the budget, JSON escapes included
            reply = {"hookSpecificOutput": {"hookEventName": "SessionStart",
                                            "additionalContext": hook_briefing(r, limit)}}
            if len(json.dumps(reply, ensure_ascii=False).encode()) < HOOK_BRIEFING_MAX or \
                    limit < 300:
                return reply
            limit -= 200
    if event == "stop" and data.get("stop_hook_active") is True:
        return None  # the agent already went on once because of a Stop hook
    news = cli.call("hook_news")
    if not news["messages"]:
        return None
    if event == "stop":
        return {"decision": "block", "reason": _hook_news_line(news, "arrived")}
    return {"hookSpecificOutput": {"hookEventName": "UserPromptSubmit",
                                   "additionalContext": _hook_news_line(news, "arrived")}}


# -- integrate: hooks, MCP config and a listener subagent for Claude Code and Codex -----

_LISTENER = """\
---
name: thrum-listener
description: Waits in the background for thrum messages to @{agent} and reports them as soon
  as one arrives. Start it when you begin a task and again each time it returns. It only
  listens; it never reads (marks), answers or sends messages.
tools: Bash
---
You are the message listener of the agent @{agent}. You run one command in a loop and
report what it prints. You never run any other command.

1. Run exactly this with the Bash tool, with its timeout set to 600000 ms (10 minutes;
   the default of 2 minutes would cut the wait short): `{wait}`
2. If it exits 0 and prints `"status": "received"`, stop and return, for each message:

   MESSAGES_RECEIVED
   ---
   FROM: @<agent_id>
   ID: <message_id>
   CONTENT: <body.content>
   TIMESTAMP: <created_at>
   ---

3. If it exits 1 with `"status": "timeout"`, run it again. After 30 timeouts in a row
   (about 4 hours), stop and return exactly: NO_MESSAGES_TIMEOUT
4. If it fails in any other way, return its error line and stop.

Each message is returned once (thrum records what it handed over), and nothing is marked
read: the main agent reads with `thrum inbox` and answers with `thrum reply`. Nothing is
lost between two runs, however long they are apart: `--after` makes each run reach back
to where the previous one ended (`-15s` only sets how far the very first run looks back).
"""


def _thrum_argv(env):
    """How a host should start thrum: the installed `thrum`, else this file."""
    exe = _which("thrum", env)
    if exe:
        return ["thrum"]
    return [sys.executable, os.path.abspath(__file__)]


def _shell_words(argv):
    import shlex
    return " ".join(shlex.quote(a) for a in argv)


def _load_json_file(path):
    """(data, text): {} and None for a missing file; a file that is not a JSON object is
    refused (UsageError) and left as it is."""
    text = _read_text(path)
    if text is None:
        return {}, None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise UsageError("%s is not valid JSON (%s); it was left untouched" % (path, e),
                         hint="fix or move it, then run this again")
    if not isinstance(data, dict):
        raise UsageError("%s is not a JSON object; it was left untouched" % path)
    return data, text


def _is_thrum_hook(h):
    return isinstance(h, dict) and isinstance(h.get("command"), str) and \
        " hook " in " %s " % h["command"] and "thrum" in h["command"]


def _hook_entries(command):
    """A hook command (a plain command: a 10 s command hook) or the list of hook
    entries of one event, as the host's settings hold them."""
    if isinstance(command, str):
        return [{"type": "command", "command": command, "timeout": 10}]
    return list(command)


def _merge_hooks(data, commands, remove=False):
    """data["hooks"][EVENT] = [{hooks: [{type: command, command, ...}]}]: ours replaced
    (or removed), every other entry kept in place. `commands`: {EVENT: a command, or
    a list of hook entries}."""
    hooks = data.get("hooks")
    if hooks is not None and not isinstance(hooks, dict):
        raise UsageError("its \"hooks\" is not an object; it was left untouched")
    hooks = dict(hooks or {})
    for event, command in commands.items():
        groups = hooks.get(event) or []
        if not isinstance(groups, list):
            raise UsageError("its hooks.%s is not a list; it was left untouched" % event)
        ours = {"hooks": _hook_entries(command)}
        kept, placed = [], remove
        for g in groups:
            if isinstance(g, dict) and isinstance(g.get("hooks"), list):
                inner = [h for h in g["hooks"] if not _is_thrum_hook(h)]
                if inner:
                    kept.append(dict(g, hooks=inner))
                elif not g["hooks"]:
                    kept.append(g)
                elif not placed:  # thrum's own group: replaced where it stands
                    kept.append(ours)
                    placed = True
            else:
                kept.append(g)
        if not placed:
            kept.append(ours)
        if kept:
            hooks[event] = kept
        else:
            hooks.pop(event, None)
    return _with_key(data, "hooks", hooks)


def _with_key(data, key, value):
    """A copy of `data` with `key` set to `value`, or without it when `value` is empty."""
    out = dict(data)
    if value:
        out[key] = value
    else:
        out.pop(key, None)
    return out


def _toml_block(mcp, hooks):
    """Our part of a Codex config.toml: [mcp_servers.thrum] and the hook tables in the
    layout of Codex's documentation. Always written here, never by tomli-w, whose
    versions differ (1.0 writes the handlers as an inline array, 1.2 as tables), so the
    block is the same wherever thrum runs and docs/integrations.md shows it as it is."""
    ls = ["[mcp_servers.thrum]", "command = %s" % _toml_value(mcp["command"]),
          "args = [%s]" % ", ".join(_toml_value(a) for a in mcp["args"]), "",
          "[mcp_servers.thrum.env]"]
    ls += ["%s = %s" % (_toml_key(k), _toml_value(v)) for k, v in mcp["env"].items()]
    for event, cmd in hooks.items():
        ls += ["", "[[hooks.%s]]" % event, "", "[[hooks.%s.hooks]]" % event,
               'type = "command"', "command = %s" % _toml_value(cmd), "timeout = 10"]
    return "%s\n%s\n%s\n" % (INTEGRATE_MARK, "\n".join(ls), INTEGRATE_END)


def _strip_toml_block(text):
    """The text without our block (and the blank line we put before it)."""
    start = text.find(INTEGRATE_MARK)
    if start < 0:
        return text
    end = text.find(INTEGRATE_END, start)
    end = len(text) if end < 0 else end + len(INTEGRATE_END)
    if text[end:end + 1] == "\n":
        end += 1
    if text[max(0, start - 1):start] == "\n" and text[max(0, start - 2):start - 1] == "\n":
        start -= 1
    return text[:start] + text[end:]


def _json_text(data):
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


class Integration:
    """`thrum integrate HOST`: the files of a project that make a host (Claude Code,
    Codex) use thrum. `plan()` -> [(path, old text or None, new text or None)] (None: no
    file); every file is parsed first, and one that cannot be is refused before anything
    is written. A JSON file's first version is kept under .thrum/var/integrate/, so
    `--remove` gives back its exact bytes when nothing else changed in it since."""

    def __init__(self, host, root, agent, env, var):
        if host not in ("claude", "codex"):
            raise UsageError("unknown host %r (known: claude, codex)" % host)
        self.host, self.root, self.agent, self.env = host, root, agent, env
        self.backups = os.path.join(var, "integrate")
        thrum = _thrum_argv(env)
        hook = lambda ev: _shell_words(thrum + ["hook", ev, "--agent", agent])  # noqa: E731
        self.commands = {"SessionStart": hook("session-start"), "Stop": hook("stop"),
                         "UserPromptSubmit": hook("prompt")}
        # Claude Code also runs `hook wake` in the background on Stop: it may wake the
        # idle session (exit 2 of an `asyncRewake` hook) when a message arrives.
        self.claude_hooks = dict(self.commands, Stop=_hook_entries(self.commands["Stop"]) + [
            {"type": "command", "command": _shell_words(thrum + [
                "hook", "wake", "--agent", agent, "--timeout", "10m"]),
             "async": True, "asyncRewake": True, "timeout": WAKE_HOOK_TIMEOUT}])
        self.mcp = {"command": thrum[0], "args": thrum[1:] + ["mcp", "serve"],
                    "env": {"THRUM_NAME": agent}}
        self.wait = _shell_words(["env", "THRUM_NAME=" + agent] + thrum + [
            "wait", "--timeout", "8m", "--after", "-15s", "--json"])

    def _backup(self, path):
        import hashlib
        key = os.path.realpath(path)  # (linked worktrees share .thrum/var)
        return os.path.join(self.backups, hashlib.sha256(key.encode()).hexdigest()[:20])

    def _json(self, path, change, remove):
        data, old = _load_json_file(path)
        try:
            new = change(data)
        except UsageError as e:
            raise UsageError("%s: %s" % (path, e.message))
        if not remove:
            return path, old, old if new == data and old is not None else _json_text(new)
        backup = _read_text(self._backup(path))
        if backup is not None:
            try:  # the file differs from its first version by thrum's entries only
                first = json.loads(backup)
                if isinstance(first, dict) and (first == new or change(first) == new):
                    return path, old, backup
            except (ValueError, UsageError):
                pass
        if new == data:
            return path, old, old
        return path, old, _json_text(new) if new else None

    def plan(self, remove=False):
        if self.host == "claude":
            return [self._json(os.path.join(self.root, ".mcp.json"),
                               lambda d: self._mcp_json(d, remove), remove),
                    self._json(os.path.join(self.root, ".claude", "settings.json"),
                               lambda d: _merge_hooks(d, self.claude_hooks, remove), remove),
                    self._listener(remove)]
        return [self._codex(remove)]

    def _mcp_json(self, data, remove):
        servers = data.get("mcpServers", {})
        if not isinstance(servers, dict):
            raise UsageError("its \"mcpServers\" is not an object; it was left untouched")
        servers = dict(servers)
        if remove:
            servers.pop("thrum", None)
        else:
            servers["thrum"] = {"type": "stdio", **self.mcp}
        return _with_key(data, "mcpServers", servers)

    def _listener(self, remove):
        path = os.path.join(self.root, ".claude", "agents", "thrum-listener.md")
        return path, _read_text(path), None if remove else _LISTENER.format(
            agent=self.agent, wait=self.wait)

    def _codex(self, remove):
        import tomllib
        path = os.path.join(self.root, ".codex", "config.toml")
        old = _read_text(path)
        base = _strip_toml_block(old or "")
        try:
            parsed = tomllib.loads(base)
        except ValueError as e:
            raise UsageError("%s is not valid TOML (%s); it was left untouched" % (path, e),
                             hint="fix or move it, then run this again")
        if "thrum" in (parsed.get("mcp_servers") or {}):
            raise UsageError("%s defines mcp_servers.thrum outside thrum's block; it was "
                             "left untouched" % path, hint="remove that table first")
        if remove:
            return path, old, base if old is not None and base else None
        sep = "" if not base or base.endswith("\n\n") else (
            "\n" if base.endswith("\n") else "\n\n")
        text = base + sep + _toml_block(self.mcp, self.commands)
        try:
            tomllib.loads(text)
        except ValueError as e:
            raise UsageError("%s: thrum's tables would not fit in it (%s); it was left "
                             "untouched" % (path, e))
        return path, old, text

    def apply(self, plan, write, remove=False):
        """[(path, action)], action create|update|remove|unchanged; writes when asked."""
        done = []
        for path, old, new in plan:
            if new == old:
                done.append((path, "unchanged"))
                continue
            action = "remove" if new is None else ("create" if old is None else "update")
            if write:
                backup = self._backup(path)
                if new is None:
                    os.unlink(path)
                    for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
                        if os.path.abspath(d) != os.path.abspath(self.root):
                            try:
                                os.rmdir(d)  # only when empty: a dir we made
                            except OSError:
                                pass
                else:
                    if not remove and old is not None and path.endswith(".json") and \
                            not os.path.exists(backup):
                        os.makedirs(self.backups, exist_ok=True)
                        _write_file_atomic(backup, old, 0o600)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    _write_file_atomic(path, new)
                if remove and os.path.exists(backup):
                    os.unlink(backup)
            done.append((path, action))
        return done


def codex_trust_steps(root, env):
    """What `integrate codex` says after its files (SPEC §15): Codex ignores a project's
    .codex/config.toml until the project is trusted, and runs its hooks only once the
    user approved them. {project, codex_config, steps}."""
    key, conf = os.path.realpath(root), _codex_config_path(env)
    return {"project": key, "codex_config": conf, "steps": [
        "1. Trust the project (until then Codex ignores .codex/config.toml: thrum's MCP "
        "server and hooks): run `codex` in %s and choose \"Trust and continue\", or add to "
        "%s:" % (key, conf),
        "       [projects.%s]" % json.dumps(key, ensure_ascii=False),
        "       trust_level = \"trusted\"",
        "2. Approve the hooks (Codex runs them only then): when `codex` starts there and says "
        "\"Hooks need review\", choose \"Trust all and continue\" (or type /hooks and press "
        "t). A hook that changes (say, after another `integrate codex --write`) needs it "
        "again.",
        "3. Check: `codex mcp get thrum` in the project shows the server; `thrum doctor` "
        "reports both steps."]}


def cmd_integrate(args, cli, out):
    if cli.store is None:
        raise NotSetUpError("thrum is not initialised here (%s)" % cli.caller.cwd,
                            hint="register first: 'thrum quickstart --name N --role R "
                                 "--module M'")
    if args.agent:
        agent = _strip_at(args.agent)
        _check_name(agent)
        cli.call("ping", name=agent)  # registered? (exit 4 if not)
    else:
        agent = cli.call("whoami")["agent_id"]
    root = locate(cli.caller.cwd).worktree
    integ = Integration(args.host, root, agent, cli.caller.env, cli.store.loc.var)
    plan = integ.plan(remove=args.remove)
    done = integ.apply(plan, write=args.write, remove=args.remove)
    texts = {p: new for p, _, new in plan}
    r = {"host": args.host, "agent_id": agent, "written": bool(args.write),
         "remove": bool(args.remove), "files": [
             {"path": p, "action": a, "content": texts[p]} for p, a in done]}
    lines = []
    for f in r["files"]:
        rel = os.path.relpath(f["path"], cli.caller.cwd)
        if args.write:
            lines.append("%s %s" % ({"create": "created", "update": "updated", "remove":
                                     "removed", "unchanged": "unchanged"}[f["action"]], rel))
        else:
            lines.append("--- %s (%s) ---" % (rel, "would be " + {
                "create": "created", "update": "updated", "remove": "removed",
                "unchanged": "left as it is"}[f["action"]]))
            if f["action"] in ("create", "update"):
                lines += f["content"].rstrip("\n").split("\n")
    if not args.write:
        lines.append("(nothing was written: run again with --write)")
    if args.host == "codex" and not args.remove:  # Codex ignores it until trusted
        r["codex_trust"] = codex_trust_steps(root, cli.caller.env)
        lines += ["", "Then, in Codex:"] + r["codex_trust"]["steps"]
    out.emit(r, lines)


def cmd_install(args, cli, out):
    """What install.sh does, built in: copy this file to the data dir, precompile it and
    write a `thrum` launcher that imports the compiled module (or `--pip`)."""
    import subprocess
    env = cli.caller.env
    home = env.get("HOME")
    if not home:
        raise UsageError("HOME is not set")
    src = os.path.abspath(__file__)
    if args.pip:
        here = os.path.dirname(src)
        if not os.path.exists(os.path.join(here, "pyproject.toml")):
            raise UsageError("--pip installs a checkout: no pyproject.toml next to %s" % src,
                             hint="run it from the repository, or install without --pip")
        argv = [sys.executable, "-m", "pip", "install"] + (
            [] if env.get("VIRTUAL_ENV") else ["--user"]) + [here]
        out.flush()
        code = subprocess.call(argv, env=env)
        if code:
            raise ThrumError("pip install failed (exit %d)" % code)
        return out.ok({"mode": "pip", "source": here}, "Installed thrum with pip")
    bindir = os.path.abspath(os.path.expanduser(args.prefix or env.get("PREFIX") or
                                                os.path.join(home, ".local", "bin")))
    datadir = os.path.join(env.get("XDG_DATA_HOME") or os.path.join(
        home, ".local", "share"), "thrum")
    dst = os.path.join(datadir, "thrum.py")
    os.makedirs(datadir, exist_ok=True)
    os.makedirs(bindir, exist_ok=True)
    with open(src, "rb") as f:
        code = f.read()
    if os.path.realpath(src) != os.path.realpath(dst):
        _write_file_atomic(dst, code)  # a running thrum never sees a half-written file
    import py_compile
    py_compile.compile(dst, doraise=True)
    launcher = os.path.join(bindir, "thrum")
    _write_file_atomic(launcher, (
        "#!%s\n# thrum launcher written by `thrum install`: it imports the precompiled "
        "single file below.\nimport sys\nsys.path.insert(0, %r)\nimport thrum\n"
        "raise SystemExit(thrum.main())\n" % (sys.executable, datadir)), 0o755)
    on_path = bindir in [os.path.abspath(d) for d in (env.get("PATH") or "").split(os.pathsep)
                         if d]
    r = {"mode": "file", "program": dst, "launcher": launcher, "on_path": on_path,
         "version": __version__}
    lines = ["Installed thrum %s" % __version__, "  program:  %s" % dst,
             "  launcher: %s" % launcher]
    if not on_path:
        _warn("%s is not on your PATH; add it, e.g.: export PATH=\"%s:$PATH\""
              % (bindir, bindir))
    else:
        lines.append("Run: thrum --help")
    out.ok(r, *lines)


# === 23. CLI: command handlers and the parser =================================

def _split_list(items):
    return [t for item in items or () for t in item.split(",") if t.strip()]


def cmd_init(args, cli, out):
    r = cli.call("init", local=args.local, force=args.force)
    out.ok(r, *render_init(r))


def cmd_setup(args, cli, out):
    r = cli.call("setup", main_repo=args.main_repo)
    out.ok(r, "This worktree now uses the store at %s" % r["store"])


def cmd_quickstart(args, cli, out):
    r = cli.call("quickstart", name=args.name or args.name_pos, role=args.role,
                 module=args.module, intent=args.intent, display=args.display,
                 force=args.force)
    out.ok(r, *render_quickstart(r))


def cmd_whoami(args, cli, out):
    r = cli.call("whoami")
    if args.field:
        if args.field not in r:
            raise UsageError("unknown field %r (fields: %s)" % (args.field, ", ".join(r)))
        v = r[args.field]
        if out.json:
            return out.emit({args.field: v})
        return out.write(("" if v is None else _visible(str(v))) + "\n")
    out.emit(r, lambda r: render_whoami(r, out))


def cmd_status(args, cli, out):
    out.emit(cli.call("status"), lambda r: render_status(r, out))


def cmd_overview(args, cli, out):
    out.emit(cli.call("overview"), lambda r: render_overview(r, out))


def cmd_team(args, cli, out):
    out.emit(cli.call("team", all=args.all), lambda r: render_team(r, out, all=args.all))


def cmd_prime(args, cli, out):
    out.emit(cli.call("prime"), lambda r: render_prime(r, out))


def _warnings(r):
    for w in r.get("warnings") or ():
        _warn(w)


def cmd_send(args, cli, out):
    params = dict(to=_split_list(args.to), mentions=_split_list(args.mention),
                  broadcast=args.broadcast, scopes=args.scope or (), refs=args.ref or (),
                  fmt=args.fmt, structured=args.structured,
                  idempotency_key=args.idempotency_key)
    r = cli.call("send", content=cli.body(args, "send", **params), **params)
    _warnings(r)
    out.ok(r, *render_send(r))


def cmd_reply(args, cli, out):
    params = dict(message_id=args.message_id, fmt=args.fmt,
                  structured=args.structured, scopes=args.scope or (), refs=args.ref or (),
                  idempotency_key=args.idempotency_key)
    r = cli.call("reply", content=cli.body(args, "reply", **params), **params)
    _warnings(r)
    out.ok(r, *render_reply(r))


def cmd_inbox(args, cli, out):
    # The operation decides which rows get marked read; they are marked only after
    # they were written out (a closed or broken stdout marks nothing).
    r = cli.call("inbox", unread=args.unread, mentions=args.mentions, scope=args.scope,
                 ref=args.ref, sender=args.sender, thread=args.thread, all=args.all,
                 limit=args.limit, page=args.page, oldest=args.oldest, defer_marks=True)
    marks = r.pop("pending_marks", [])
    filters = [f for f, on in (("--scope " + str(args.scope), args.scope),
                               ("--ref " + str(args.ref), args.ref),
                               ("--from " + str(args.sender), args.sender),
                               ("--thread " + str(args.thread), args.thread),
                               ("--mentions", args.mentions)) if on]
    out.emit(r, lambda r: render_inbox(r, out, unread=args.unread, filters=filters,
                                       all=args.all))
    out.flush()
    if marks:
        cli.call("mark_read", message_ids=marks)


def cmd_search(args, cli, out):
    r = cli.call("search", query=args.query, sender=args.sender, to=args.to, ref=args.ref,
                 since=args.since, limit=args.limit, rank=args.rank)
    out.emit(r, lambda r: render_search(r, out))


def cmd_sent(args, cli, out):
    r = cli.call("sent", to=args.to, unread=args.unread, limit=args.limit, page=args.page)
    out.emit(r, lambda r: render_sent(r, out))


def cmd_message(args, cli, out):
    if args.sub == "get":
        return out.emit(cli.call("message_get", message_id=args.message_id),
                        lambda r: render_message(r, out))
    if args.sub == "edit":
        params = dict(message_id=args.message_id, fmt=args.fmt, structured=args.structured)
        r = cli.call("message_edit", content=cli.body(args, "message_edit", **params),
                     **params)
        return out.ok(r, "Message edited: %s (version %d)" % (r["message_id"], r["version"]))
    if args.sub == "delete":
        r = cli.call("message_delete", message_id=args.message_id, force=args.force,
                     reason=args.reason)
        return out.ok(r, "Message deleted: %s" % r["message_id"])
    if args.sub == "read":
        r = cli.call("message_read", message_ids=args.message_ids, all=args.all)
        if not out.json and r["marked_count"] == 0:
            return out.emit(r, ["No unread messages to mark."] if not out.quiet else [])
        return out.ok(r, "Marked %d message%s as read" % (r["marked_count"],
                                                          "" if r["marked_count"] == 1 else "s"))


def cmd_wait(args, cli, out):
    r = cli.call("wait", timeout=args.timeout, after=args.after, unread=args.unread,
                 scope=args.scope)
    claim = r.pop("claim", None)
    try:  # the messages are delivered once they are written out, not before
        out.emit(r, lambda r: render_wait(r, out))
        out.flush()
    except BaseException:
        cli.settle({"claim": claim}, False)
        raise
    cli.settle({"claim": claim}, True)
    return EXIT_FAIL if r["status"] == "timeout" else EXIT_OK


def watch_line(m, as_json=False):
    """One message as `thrum watch` prints it (SPEC §7a): `@alice -> @bob: first line
    [msg_... re msg_...]`, control characters escaped; or compact JSON."""
    if as_json:
        return json.dumps(m, ensure_ascii=False, separators=(",", ":"))
    first = (m["body"]["content"] or "").split("\n", 1)[0].strip()
    return _visible("@%s -> %s: %s [%s%s]" % (
        m["agent_id"], _aud_str(m["audiences"]) or _who(m["recipients"]), clip(first, 200),
        m["message_id"], " re " + m["reply_to"] if m.get("reply_to") else ""))


def cmd_watch(args, cli, out):
    """Runs until interrupted (Ctrl-C, SIGTERM: exit 0): one flushed line per message."""
    import signal

    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    if args.agent:  # as that agent (checked like THRUM_NAME)
        cli = Cli(Caller(cli.caller.cwd, cli.caller.env, _strip_at(args.agent)), out)
    me = since = began = None
    printed = {}  # id -> when this watch printed it (the overlap of two steps)
    try:
        while True:
            r = cli.call("watch", **(dict(since=since, skip=list(printed), began=began)
                                     if since else {}))
            since, began = r["since"], r["began"]
            if me is None:
                me = cli.call("whoami")["agent_id"]
            # recorded, then printed: a watch killed as it prints never prints it again
            # (the ids only: where the next watch starts is kept after the lines are out)
            cli.watched(me, r["messages"])
            for m in r["messages"]:
                out.write(watch_line(m, out.json) + "\n")
                printed[m["message_id"]] = time.monotonic()
            cli.watched(me, (), since)
            old = time.monotonic() - 60.0
            printed = {k: t for k, t in printed.items() if t > old}
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_ui(args, cli, out):
    """Serves until interrupted (Ctrl-C, SIGTERM: exit 0); see section 20."""
    return serve_ui(cli.caller, port=args.port, bind=args.bind, as_name=args.as_name,
                    open_browser=not args.no_open, write=out.write, as_json=out.json)


def cmd_who_has(args, cli, out):
    out.emit(cli.call("who_has", path=args.path), lambda r: render_who_has(r, out))


def cmd_ping(args, cli, out):
    out.emit(cli.call("ping", name=args.name), lambda r: render_ping(r, out))


def cmd_agent(args, cli, out):
    if args.sub == "register":
        r = cli.call("agent_register", name=args.name or args.name_pos, role=args.role,
                     module=args.module, display=args.display, intent=args.intent,
                     force=args.force)
        return out.ok(r, "Agent %s: @%s (%s, %s)" % (r["status"], r["agent_id"], r["role"],
                                                     r["module"]))
    if args.sub == "list":
        return out.emit(cli.call("agent_list", context=args.context),
                        lambda r: render_agent_list(r, out, context=args.context))
    if args.sub == "delete":
        r = cli.call("agent_delete", name=args.name, force=args.force)
        return out.ok(r, "Agent @%s deleted" % r["agent_id"])
    if args.sub == "cleanup":
        return out.emit(cli.call("agent_cleanup", dry_run=args.dry_run, force=args.force),
                        lambda r: render_agent_cleanup(r, out))


def cmd_session(args, cli, out):
    if args.sub == "start":
        r = cli.call("session_start", pid=args.pid)
        return out.ok(r, "Session started: %s" % r["session_id"])
    if args.sub == "end":
        r = cli.call("session_end", reason=args.reason, session_id=args.session_id)
        _warnings(r)
        return out.ok(r, "Session ended: %s%s" % (r["session_id"], " (pushed)" if r.get(
            "pushed") else ""))
    if args.sub == "list":
        return out.emit(cli.call("session_list", agent_filter=args.agent,
                                 active=args.active), lambda r: render_session_list(r, out))
    if args.sub == "heartbeat":
        r = cli.call("session_heartbeat")
        return out.ok(r, *render_heartbeat(r))
    text = " ".join(args.text)
    if args.sub == "set-intent":
        r = cli.call("session_set_intent", text=text)
        return out.ok(r, "Intent set: %s" % (text or "(cleared)"))
    if args.sub == "set-task":
        r = cli.call("session_set_task", text=text)
        return out.ok(r, "Task set: %s" % (text or "(cleared)"))


def _read_context_input(args):
    if args.file:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError("cannot read --file %s: %s" % (args.file, e.strerror or e))
    else:
        data = _read_stdin()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("context is not valid UTF-8")


def cmd_context(args, cli, out):
    if args.sub == "save":
        params = dict(agent_filter=args.agent, allow_empty=args.allow_empty)
        cli.check("context_save", **params)  # who is saving, before reading the input
        r = cli.call("context_save", content=_read_context_input(args), **params)
        return out.ok(r, "Context saved for @%s (%d bytes)" % (r["agent_id"], r["bytes"]))
    if args.sub == "show":
        return out.emit(cli.call("context_show", agent_filter=args.agent),
                        lambda r: render_context(r, out))
    if args.sub == "clear":
        r = cli.call("context_clear", agent_filter=args.agent)
        return out.ok(r, "Context cleared for @%s" % r["agent_id"])
    if args.sub == "sync":
        r = cli.call("context_sync")
        return out.ok(r, "Context published for @%s (sync %s)" % (r["agent_id"], r["state"]))


def cmd_group(args, cli, out):
    if args.sub == "create":
        r = cli.call("group_create", name=args.name, description=args.description)
        return out.ok(r, "Group created: %s" % r["group"])
    if args.sub == "delete":
        r = cli.call("group_delete", name=args.name)
        return out.ok(r, "Group deleted: %s" % r["group"])
    if args.sub in ("add", "remove"):
        r = cli.call("group_" + args.sub, name=args.name, members=args.members)
        if out.json or not out.quiet:
            out.emit(r, lambda r: render_group(r, out))
        return
    if args.sub == "list":
        return out.emit(cli.call("group_list"), lambda r: render_group_list(r, out))
    if args.sub == "info":
        return out.emit(cli.call("group_info", name=args.name),
                        lambda r: render_group(r, out))


def cmd_config(args, cli, out):
    if args.sub == "show":
        return out.emit(cli.call("config_show"), lambda r: render_config(r, out))
    if args.sub == "get":
        r = cli.call("config_get", key=args.key)
        return out.emit(r, [_fmt_value(r["value"])])
    if args.sub == "set":
        r = cli.call("config_set", key=args.key, value=args.value)
        return out.ok(r, "%s = %s" % (r["key"], _fmt_value(r["value"])))


def cmd_sync(args, cli, out):
    if args.sub == "force":
        PROGRESS.step("syncing")
        r = cli.call("sync_force")
        return out.ok(r, *render_sync_force(r))
    out.emit(cli.call("sync_status"), lambda r: render_sync_status(r, out))


def cmd_purge(args, cli, out):
    r = cli.call("purge", before=args.before, confirm=args.confirm)
    _warnings(r)
    return out.emit(r, lambda r: render_purge(r, out))


def cmd_doctor(args, cli, out):
    r = cli.call("doctor", fix=args.fix)
    out.emit(r, lambda r: render_doctor(r, out))
    return EXIT_OK if r["ok"] else EXIT_FAIL


def cmd_rebuild(args, cli, out):
    r = cli.call("rebuild_index")
    out.ok(r, "Index rebuilt from the log (%d events)" % r["events"])


def _daemon_files(cli):
    if cli.store is None:
        raise NotSetUpError("thrum is not initialised here (%s)" % cli.caller.cwd,
                            hint="run 'thrum init' first")
    return DaemonFiles(cli.store.loc.var, cli.caller.env)


def cmd_daemon(args, cli, out):
    files = _daemon_files(cli)
    if args.sub == "status":
        r = files.info()
        lines = ["daemon running (pid %s, socket %s)" % (r["pid"], r.get("socket"))
                 if r["running"] else "no daemon running (pure-CLI mode)"]
        try:  # what it is doing: are agents active, what it asked of the remote
            client = DaemonClient(files) if r["running"] else None
            try:  # (a stuck daemon answers within seconds or not at all)
                live = client.request({"op": "daemon_status"}, timeout=2.0, wait=2.0) \
                    if client else {}
            finally:
                if client:
                    client.close()
        except DaemonUnavailable:
            live = {}
        if live.get("ok"):
            r.update((k, live["result"].get(k)) for k in ("active", "waiting", "watching",
                                                           "remote"))
            n = r["remote"] or {}
            lines.append("  Agents: %s; remote: %s ls-remote, %s fetch, %s push (%s "
                         "rejected)" % ("active" if r["active"] else "idle",
                                        n.get("ls-remote"), n.get("fetch"), n.get("push"),
                                        n.get("rejected")))
        out.emit(r, lines)
        return EXIT_OK if r["running"] else EXIT_FAIL
    if args.sub == "run":
        d = Daemon(cli.store, cli.caller.env)
        code = d.run()
        if code is None:
            r = files.info()
            out.ok(dict(r, started=False), "daemon already running (pid %s)" % r["pid"])
            return EXIT_OK
        return code
    if args.sub in ("stop", "restart"):
        PROGRESS.step("stopping the daemon")
        stopped = stop_daemon(files)
        unpushed = _unpushed(cli.store)
        if unpushed:
            _warn("%d write%s not pushed: run `thrum sync force`" % (
                unpushed, "" if unpushed == 1 else "s"))
        if args.sub == "stop":
            return out.ok({"running": False, "stopped": stopped, "unpushed": unpushed},
                          "daemon stopped" if stopped else "no daemon was running")
    PROGRESS.step("starting the daemon")
    r, started = start_daemon(cli.store, cli.caller.env, files)
    out.ok(dict(r, started=started), ("daemon started (pid %s)" if started else
                                      "daemon already running (pid %s)") % r["pid"],
           "  Socket: %s" % r.get("socket"))


def _unpushed(store):
    """Events not on the remote yet (None: no git, no remote, or it cannot be told)."""
    if not store.loc.git_common:
        return None
    try:
        return store.sync_engine().unpushed()
    except (ThrumError, OSError):
        return None


def cmd_mcp(args, cli, out):
    agent = None
    if args.agent is not None:
        agent = _strip_at(args.agent)
        if not name_ok(agent) or agent in RESERVED_NAMES:
            raise UsageError("invalid agent name %r in --agent" % args.agent,
                             hint="names are 1-64 lowercase letters, digits, '_' or '-'")
    out.flush()
    serve_mcp(Caller(cli.caller.cwd, cli.caller.env, agent=agent), channel=args.channel)
    try:
        sys.stderr.flush()
    finally:  # abandon waits and workers at once: the client wants us gone
        os._exit(EXIT_OK)


def cmd_tmux(args, cli, out):
    if args.sub in ("create", "quickstart"):
        cwd = os.path.abspath(os.path.join(cli.caller.cwd, args.cwd or "."))
        if not os.path.isdir(cwd):
            raise UsageError("--cwd %s is not a directory" % (args.cwd or cwd))
        r = call("tmux_create", dict(
            session=args.session, name=args.name, role=args.role, module=args.module,
            intent=args.intent, command=args.pane_command or (), force=args.force,
            socket=args.socket), Caller(cwd, cli.caller.env))
        return out.ok(r, "Session created: %s (pane %s)" % (r["session"], r["pane"]),
                      "  Agent:  @%s (%s, pid %d)" % (r["agent_id"], "registered" if
                                                      r["registered"] else "re-registered",
                                                      r["pid"]),
                      "  Attach: tmux%s attach -t '=%s'" % (
                          " -S " + r["socket"] if args.socket or
                          cli.caller.env.get("THRUM_TMUX_SOCKET") else "", r["session"]))
    if args.sub == "list":
        if _which("tmux", cli.caller.env) is None:
            raise TmuxMissingError()
        return out.emit(cli.call("tmux_list"), lambda r: render_tmux_list(r, out))
    r = cli.call("tmux_kill", session=args.session, name=args.name, socket=args.socket)
    out.ok(r, "Killed tmux session %s%s" % (r["session"], "" if r["killed"] else
                                            " (it was already gone)"),
           *(["  Ended the thrum session of %s" % ", ".join("@" + a for a in r["agents"])]
             if r["ended"] else []))


def cmd_demo(args, cli, out):
    if not out.json:
        return run_demo(out, cli.caller.env)
    import io
    buf = io.StringIO()
    code = run_demo(Output(stream=buf), cli.caller.env)
    out.emit({"ok": code == EXIT_OK, "transcript": buf.getvalue()})
    return code


def run_demo(out, env):
    """A self-contained tour: two agents in a throw-away repo, a waiter that wakes,
    a threaded reply, read state, and a second clone syncing through a local bare
    remote. Prints each step; removes everything it created."""
    import shutil
    import subprocess
    import tempfile
    me = os.path.abspath(__file__)
    tmp = tempfile.mkdtemp(prefix="thrum-demo-")
    env = {k: v for k, v in env.items()
           if not k.startswith("THRUM_") and not k.startswith("GIT_")}
    env.update({"NO_COLOR": "1", "GIT_TERMINAL_PROMPT": "0"})
    w = out.stream.write

    def sh(argv, cwd):
        subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True)

    def step(title):
        w("\n== %s\n" % title)

    def thrum(cwd, who, *args, show=True):
        e = dict(env, THRUM_NAME=who) if who else env
        label = ("THRUM_NAME=%s " % who if who else "") + "thrum " + " ".join(
            a if " " not in a else repr(a) for a in args)
        p = subprocess.run([sys.executable, me] + list(args), cwd=cwd, env=e,
                           capture_output=True, text=True)
        if show:
            w("$ %s\n" % label)
            text = (p.stdout + p.stderr).rstrip()
            if text:
                w("".join("  " + l + "\n" for l in text.splitlines()))
        if p.returncode not in (0,):
            raise ThrumError("demo step failed (exit %d): %s" % (p.returncode, label))
        return p
    try:
        remote = os.path.join(tmp, "remote.git")
        a = os.path.join(tmp, "laptop")
        b = os.path.join(tmp, "ci-runner")
        ident = ["-c", "user.name=demo", "-c", "user.email=demo@example.invalid"]
        step("A repository with a shared remote (%s)" % tmp)
        sh(["git", "init", "-q", "--bare", remote], tmp)
        sh(["git", "init", "-q", a], tmp)
        sh(["git"] + ident + ["commit", "-q", "--allow-empty", "-m", "start"], a)
        sh(["git", "remote", "add", "origin", remote], a)
        sh(["git", "push", "-q", "origin", "HEAD"], a)
        w("created %s and a bare remote\n" % a)
        step("Two agents register in one worktree")
        thrum(a, "alice", "quickstart", "--name", "alice", "--role", "coordinator",
              "--module", "core")
        thrum(a, "bob", "quickstart", "--name", "bob", "--role", "implementer",
              "--module", "auth")
        step("bob waits for a message; alice sends one; bob wakes up")
        waiter = subprocess.Popen([sys.executable, me, "wait", "--timeout", "30s"], cwd=a,
                                  env=dict(env, THRUM_NAME="bob"), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        t0 = time.monotonic()
        thrum(a, "alice", "send", "Please add rate limiting to src/auth.py", "--to", "@bob")
        got, _ = waiter.communicate(timeout=30)
        w("$ THRUM_NAME=bob thrum wait --timeout 30s   (woke %.0f ms after alice's send "
          "started)\n"
          % ((time.monotonic() - t0) * 1000))
        w("".join("  " + l + "\n" for l in got.rstrip().splitlines()))
        step("bob reads his inbox (● unread) and replies in a thread")
        p = thrum(a, "bob", "inbox", "--unread", "--json", show=False)
        mid = json.loads(p.stdout)["messages"][0]["message_id"]
        thrum(a, "bob", "inbox")
        thrum(a, "bob", "reply", mid, "On it: token bucket, 10 req/s")
        step("alice sees the reply under her message; bob's copy is now read (○)")
        thrum(a, "alice", "inbox")
        thrum(a, "bob", "inbox")
        thrum(a, "alice", "sent")
        step("Sync: the laptop pushes the a-sync branch; a CI runner clones and reads it")
        thrum(a, None, "sync", "force")
        sh(["git", "clone", "-q", remote, b], tmp)
        thrum(b, "ci", "quickstart", "--name", "ci", "--role", "pipeline", "--module", "build")
        thrum(b, "ci", "send", "build 123 passed", "--broadcast", "--structured",
              '{"build": 123, "status": "passed"}')
        thrum(b, None, "sync", "force")
        thrum(a, None, "sync", "force")
        thrum(a, "alice", "inbox", "--unread")
        thrum(a, "alice", "team", "--all")
        step("Done")
        w("Everything above lived in %s, which is now removed.\n" % tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------

def _args_init(p):
    p.add_argument("--local", action="store_true", help="never fetch or push (sync.local_only)")
    p.add_argument("--force", action="store_true", help="re-check and repair the setup")


def _args_setup(p):
    p.add_argument("--main-repo", metavar="PATH", help="the main checkout (default: found "
                   "through git)")


def _args_quickstart(p):
    p.add_argument("name_pos", nargs="?", metavar="NAME")
    p.add_argument("--name", help="agent name (else NAME, else THRUM_NAME)")
    p.add_argument("--role", help="role, e.g. implementer (or THRUM_ROLE)")
    p.add_argument("--module", help="module or area, e.g. auth (or THRUM_MODULE)")
    p.add_argument("--intent", help="what you are working on")
    p.add_argument("--display", help="display name")
    p.add_argument("--force", action="store_true", help="take the name over from another "
                   "worktree")


def _args_whoami(p):
    p.add_argument("--field", metavar="F", help="print one field's bare value")


def _args_team(p):
    p.add_argument("--all", action="store_true", help="include offline agents")


def _args_send(p):
    _add_body_args(p, "send")
    p.add_argument("--to", action="append", metavar="T", help="@agent, role, group or "
                   "everyone (repeatable, comma lists)")
    p.add_argument("--mention", action="append", metavar="T", help="deliver like --to and "
                   "record a mention")
    p.add_argument("--broadcast", action="store_true", help="same as --to everyone")
    p.add_argument("--scope", action="append", metavar="TYPE:VALUE")
    p.add_argument("--ref", action="append", metavar="TYPE:VALUE", help="e.g. bd:bd-123")
    _add_key_arg(p)


def _add_key_arg(p):
    p.add_argument("--idempotency-key", metavar="KEY", help="makes a retry safe: another "
                   "send or reply by the same agent with KEY within 24h stores nothing and "
                   "answers with the first message (1-128 printable ASCII characters)")


def _args_reply(p):
    p.add_argument("message_id", metavar="MSG_ID")
    _add_body_args(p, "reply")
    p.add_argument("--scope", action="append", metavar="TYPE:VALUE")
    p.add_argument("--ref", action="append", metavar="TYPE:VALUE")
    _add_key_arg(p)


def _args_inbox(p):
    p.add_argument("--unread", action="store_true", help="only unread; marks nothing read")
    p.add_argument("--mentions", action="store_true", help="only messages naming me or my role")
    p.add_argument("--scope", metavar="TYPE:VALUE")
    p.add_argument("--ref", metavar="TYPE:VALUE")
    p.add_argument("--from", dest="sender", metavar="AGENT")
    p.add_argument("--thread", metavar="THREAD", help="thr_... id or a message id in it")
    p.add_argument("--all", action="store_true", help="every message in the store")
    p.add_argument("--oldest", action="store_true", help="oldest first")
    _add_paging(p, "inbox")


def _args_search(p):
    p.add_argument("query", metavar="QUERY",
                   help='words (all must match), "a phrase", prefix*')
    p.add_argument("--from", dest="sender", metavar="AGENT", help="only messages by AGENT")
    p.add_argument("--to", metavar="T", help="only messages to an agent, role or group")
    p.add_argument("--ref", metavar="TYPE:VALUE")
    p.add_argument("--since", metavar="WHEN", help="a duration ago (7d), a date or a "
                   "timestamp")
    limit = OPS["search"].default("limit")
    p.add_argument("--limit", type=_int_arg, default=limit, metavar="N",
                   help="at most N messages (default %d)" % limit)
    p.add_argument("--rank", action="store_true", help="most relevant first (bm25)")


def _args_sent(p):
    p.add_argument("--to", metavar="T")
    p.add_argument("--unread", action="store_true", help="not yet read by every recipient")
    _add_paging(p, "sent")


def _args_message(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    g = sub.add_parser("get", help="show one message (marks it read)")
    g.add_argument("message_id", metavar="MSG_ID")
    e = sub.add_parser("edit", help="replace the body of my message")
    e.add_argument("message_id", metavar="MSG_ID")
    _add_body_args(e, "message_edit")
    d = sub.add_parser("delete", help="delete my message (needs --force)")
    d.add_argument("message_id", metavar="MSG_ID")
    d.add_argument("--force", action="store_true")
    d.add_argument("--reason")
    r = sub.add_parser("read", help="mark messages read")
    r.add_argument("message_ids", nargs="*", metavar="MSG_ID")
    r.add_argument("--all", action="store_true", help="all my unread messages")


def _args_watch(p):
    p.add_argument("--agent", metavar="NAME", help="the agent (default: THRUM_NAME, else "
                   "the worktree's only identity)")


def _args_wait(p):
    timeout = OPS["wait"].default("timeout")
    p.add_argument("--timeout", default=timeout, metavar="D", help="how long (default %s, "
                   "max 24h; 0 checks once)" % timeout)
    p.add_argument("--after", metavar="D", help="start point: -15s (ago) or a UTC timestamp")
    p.add_argument("--unread", action="store_true", help="return at once if I have unread "
                   "messages")
    p.add_argument("--scope", metavar="TYPE:VALUE", help="only messages with this scope")


def _args_ui(p):
    p.add_argument("--port", type=_int_arg, default=0, metavar="N",
                   help="port to listen on (default 0: any free port)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--as", dest="as_name", default="user", metavar="NAME",
                   help="the human identity the page writes as (default user; registered "
                        "with role human when new)")
    p.add_argument("--no-open", action="store_true", help="do not open a browser")


def _args_who_has(p):
    p.add_argument("path", metavar="PATH")


def _args_ping(p):
    p.add_argument("name", metavar="NAME")


def _args_agent(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    r = sub.add_parser("register", help="register an agent in this worktree")
    r.add_argument("name_pos", nargs="?", metavar="NAME")
    for flag in ("--name", "--role", "--module", "--display", "--intent"):
        r.add_argument(flag)
    r.add_argument("--force", action="store_true")
    ls = sub.add_parser("list", help="registered agents")
    ls.add_argument("--context", action="store_true", help="with changed files")
    d = sub.add_parser("delete", help="delete an agent (needs --force)")
    d.add_argument("name", metavar="NAME")
    d.add_argument("--force", action="store_true")
    c = sub.add_parser("cleanup", help="find (and with --force delete) stale agents")
    c.add_argument("--dry-run", action="store_true")
    c.add_argument("--force", action="store_true")


def _args_session(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("start", help="start a session")
    s.add_argument("--pid", type=_pid_arg, help="a long-lived process whose death ends the "
                   "session")
    e = sub.add_parser("end", help="end my session")
    e.add_argument("--reason", default=OPS["session_end"].default("reason"))
    e.add_argument("--session-id")
    ls = sub.add_parser("list", help="my sessions")
    ls.add_argument("--agent", metavar="NAME")
    ls.add_argument("--active", action="store_true")
    sub.add_parser("heartbeat", help="record liveness and git work context")
    for name in ("set-intent", "set-task"):
        x = sub.add_parser(name, help="set my %s (empty clears)" % name[4:])
        x.add_argument("text", nargs="*", metavar="TEXT")


def _args_context(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("save", help="save context from --file or standard input")
    s.add_argument("--file", metavar="F")
    s.add_argument("--allow-empty", action="store_true", help="save even empty input")
    for name, h in (("show", "show saved context"), ("clear", "delete saved context")):
        x = sub.add_parser(name, help=h)
        x.add_argument("--agent", metavar="NAME")
    s.add_argument("--agent", metavar="NAME")
    sub.add_parser("sync", help="publish my saved context on the sync branch")


def _args_group(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("create", help="create a group")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--description")
    d = sub.add_parser("delete", help="delete a group")
    d.add_argument("name", metavar="NAME")
    for name in ("add", "remove"):
        x = sub.add_parser(name, help="%s members (@agent or role:ROLE)" % name)
        x.add_argument("name", metavar="NAME")
        x.add_argument("members", nargs="+", metavar="MEMBER")
    sub.add_parser("list", help="all groups")
    i = sub.add_parser("info", help="a group's members")
    i.add_argument("name", metavar="NAME")


def _args_config(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    sub.add_parser("show", help="every key with its value and source")
    g = sub.add_parser("get", help="print one value")
    g.add_argument("key", metavar="KEY")
    s = sub.add_parser("set", help="set a value in .thrum/config.toml")
    s.add_argument("key", metavar="KEY")
    s.add_argument("value", metavar="VALUE")


def _args_sync(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    sub.add_parser("force", help="run one sync cycle now: commit this clone's new events, "
                   "fetch and merge the remote's, push (what a daemon does by itself)")
    sub.add_parser("status", help="sync state")


def _args_daemon(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    sub.add_parser("start", help="start a detached daemon for this store")
    sub.add_parser("stop", help="stop it")
    sub.add_parser("status", help="is one running (exit 0) or not (exit 1)")
    sub.add_parser("restart", help="stop, then start")
    sub.add_parser("run", help="run it in the foreground")


def _args_mcp(p):
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    s = sub.add_parser("serve", help="serve MCP on stdin/stdout (an MCP client starts it)")
    s.add_argument("--agent", metavar="NAME", help="act as this agent (default: "
                   "THRUM_NAME, else the only identity of this worktree)")
    s.add_argument("--channel", action="store_true", help="also push each new message "
                   "into a running Claude Code session (notifications/claude/channel)")


def _args_tmux(p):
    import argparse
    sub = p.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    for verb, help_ in (("create", "register an agent and start it in a tmux session"),
                        ("quickstart", "the same as create")):
        c = sub.add_parser(verb, help=help_, description=help_)
        c.add_argument("session", metavar="SESSION")
        c.add_argument("--name", metavar="N", required=True)
        c.add_argument("--role", metavar="R")
        c.add_argument("--module", metavar="M")
        c.add_argument("--intent", metavar="I")
        c.add_argument("--cwd", metavar="DIR", help="the agent's repository (default: here)")
        c.add_argument("--force", action="store_true", help="replace a session or "
                       "registration of that name")
        c.add_argument("--socket", metavar="PATH", help="the tmux server's socket")
        c.add_argument("--command", dest="pane_command", nargs=argparse.REMAINDER,
                       metavar="CMD",
                       help="what the pane runs, with its arguments (last; default: "
                            "your shell), e.g. --command claude")
    sub.add_parser("list", help="agents with a tmux session: alive or gone, unread")
    k = sub.add_parser("kill", help="kill a tmux session (exact name) and end its "
                                    "agent's session")
    k.add_argument("session", metavar="SESSION", nargs="?")
    k.add_argument("--name", metavar="N", help="the agent whose session to kill")
    k.add_argument("--socket", metavar="PATH")


def _args_integrate(p):
    p.add_argument("host", metavar="HOST", choices=("claude", "codex"),
                   help="claude | codex")
    p.add_argument("--write", action="store_true", help="write the files (default: print "
                   "what would be written)")
    p.add_argument("--remove", action="store_true", help="take thrum's entries out again")
    p.add_argument("--agent", metavar="NAME", help="the identity the host acts as "
                   "(default: this worktree's)")


def _args_install(p):
    p.add_argument("--prefix", metavar="DIR", help="bin dir for the launcher (default: "
                   "$PREFIX or ~/.local/bin)")
    p.add_argument("--pip", action="store_true", help="pip install this checkout instead "
                   "(--user unless a virtualenv is active)")


def _args_purge(p):
    p.add_argument("--before", metavar="AGE|DATE", required=True,
                   help="purge messages created before this: an age (30d, 12h, 2w), a "
                        "date (2026-11-01, UTC midnight) or a UTC timestamp")
    p.add_argument("--confirm", action="store_true", help="purge them (default: only "
                   "show what would go)")


def _args_doctor(p):
    p.add_argument("--fix", action="store_true", help="repair what can be repaired")


def _no_args(p):
    pass


#: name -> (help, argument builder, handler). One table, so the parser, the help text
#: and dispatch cannot drift apart (what each operation needs is in OPS).
COMMANDS = {
    "init": ("create .thrum/, the a-sync branch and its worktree", _args_init, cmd_init),
    "setup": ("point a linked worktree at the main checkout's store", _args_setup, cmd_setup),
    "quickstart": ("init if needed, register, start a session, set intent", _args_quickstart,
                   cmd_quickstart),
    "whoami": ("my identity and session", _args_whoami, cmd_whoami),
    "status": ("me, my session, inbox counts, daemon and sync state", _no_args, cmd_status),
    "team": ("agents with an open session (--all: everyone)", _args_team, cmd_team),
    "overview": ("status + team in one view", _no_args, cmd_overview),
    "prime": ("recovery briefing after a restart (marks nothing read)", _no_args, cmd_prime),
    "send": ("send a message", _args_send, cmd_send),
    "reply": ("reply to a message (joins its thread)", _args_reply, cmd_reply),
    "inbox": ("messages to me, newest first", _args_inbox, cmd_inbox),
    "sent": ("messages I sent, with read receipts", _args_sent, cmd_sent),
    "search": ("search the messages I can see", _args_search, cmd_search),
    "message": ("get | edit | delete | read", _args_message, cmd_message),
    "wait": ("block until a message to me arrives", _args_wait, cmd_wait),
    "watch": ("print a line for each message to me as it arrives, until interrupted",
              _args_watch, cmd_watch),
    "who-has": ("which agents have PATH changed or uncommitted", _args_who_has, cmd_who_has),
    "ui": ("serve a live web page of the team and its messages, until interrupted",
           _args_ui, cmd_ui),
    "ping": ("is an agent active; last seen; intent", _args_ping, cmd_ping),
    "agent": ("register | list | delete | cleanup", _args_agent, cmd_agent),
    "session": ("start | end | list | heartbeat | set-intent | set-task", _args_session,
                cmd_session),
    "context": ("save | show | clear | sync: notes that survive restarts", _args_context,
                cmd_context),
    "group": ("create | delete | add | remove | list | info", _args_group, cmd_group),
    "sync": ("force | status: git sync of the a-sync branch", _args_sync, cmd_sync),
    "config": ("show | get | set", _args_config, cmd_config),
    "daemon": ("start | stop | status | restart | run: the optional daemon", _args_daemon,
               cmd_daemon),
    "mcp": ("serve: the MCP server for agents that speak MCP", _args_mcp, cmd_mcp),
    "tmux": ("create | quickstart | list | kill: agents in tmux panes", _args_tmux, cmd_tmux),
    "hook": ("session-start | stop | prompt: for Claude Code / Codex hooks", _args_hook,
             cmd_hook),
    "integrate": ("claude | codex: MCP config, hooks, a listener subagent", _args_integrate,
                  cmd_integrate),
    "doctor": ("check and repair the index, log, sync worktree", _args_doctor, cmd_doctor),
    "rebuild": ("rebuild the index from the log", _no_args, cmd_rebuild),
    "purge": ("drop old messages from every clone (a preview without --confirm)",
              _args_purge, cmd_purge),
    "install": ("install a fast `thrum` launcher for this user (or --pip)", _args_install,
                cmd_install),
    "demo": ("a self-contained tour in a throw-away repo", _no_args, cmd_demo),
}


_EPILOG = """global flags (anywhere): --json --quiet --verbose --repo PATH --version --debug
exit codes: 0 ok, 1 failure/timeout, 2 usage, 3 not set up, 4 not found, 5 refused

Start:  thrum quickstart --name alice --role implementer --module auth
Then:   thrum send "hi" --to @bob | thrum inbox | thrum wait --timeout 5m

Run as a copied script, thrum.py is compiled on every call (~0.2 s); `python3 thrum.py
install` writes a `thrum` launcher that imports a precompiled copy (3x faster)."""


def build_parser(command=None):
    """The argparse parser. Only `command`'s arguments are built (fast start-up)."""
    argparse, Parser = _argparse()
    p = Parser(prog="thrum", description="Persistent, git-backed messaging for AI coding "
               "agents.", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, builder, _) in COMMANDS.items():
        if command is None or name == command:
            builder(sub.add_parser(name, help=help_, description=help_))
    return p


# === 24. main =================================================================

def _version_text():
    import hashlib
    try:
        with open(os.path.abspath(__file__), "rb") as f:
            h = hashlib.sha256(f.read()).hexdigest()[:10]
    except OSError:  # pragma: no cover
        h = "unknown"
    return "thrum %s (file %s, python %s)" % (__version__, h, sys.version.split()[0])


def main(argv=None):
    """Command-line entry point. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    closed = sys.stdout is None or sys.stdout.closed
    if closed:  # started with stdout closed (>&-): output fails, stray prints do not
        sys.stdout = open(os.devnull, "w")
    out = Output(json_mode="--json" in argv, stream=_ClosedStream() if closed else None)
    try:
        code = _run(argv, out)
        if out.autosync_error is not None:
            e = out.autosync_error  # the write is stored; its sync is not
            code = _report(out, "saved locally, but THRUM_AUTOSYNC failed: " + e.message,
                           EXIT_FAIL, e.hint)
        out.flush()
    except BaseException as e:  # noqa: B902 - every failure becomes one line
        code = _fail(out, e, debug="--debug" in argv)
        try:
            out.flush()
        except OutputError as e2:
            code = _fail(out, e2)
    finally:
        CHILDREN.kill_all()  # a git a background thread still runs (a wait's remote look)
    return code


class _ClosedStream:
    """Standard output when the process started with it closed."""

    def write(self, text):
        import errno
        raise OSError(errno.EBADF, "standard output is closed")

    flush = write

    def isatty(self):
        return False


def _fail(out, e, debug=False):
    """Report an exception as the one-line error; returns the exit code."""
    if isinstance(e, (SystemExit, MemoryError)) or (debug and not isinstance(
            e, (ThrumError, KeyboardInterrupt))):
        raise e
    if isinstance(e, OutputError):
        out.document = None
        try:  # nothing more reaches stdout, not even Python's flush at exit
            sys.stdout = open(os.devnull, "w")
        except OSError:  # pragma: no cover
            pass
        stored = out.result.get("message_id") if isinstance(out.result, dict) and \
            "recipients" in out.result else None  # a send or reply was stored
        if stored and isinstance(stored, str):
            return _report(out, "%s; the message WAS stored as %s (do not send it again)"
                           % (e.message, stored), EXIT_FAIL, "see it with 'thrum sent'")
        if e.broken_pipe:  # the reader went away (`| head`): nothing to say
            return EXIT_FAIL
        return _report(out, e.message, EXIT_FAIL)
    err = error_payload(e)
    return _report(out, err["message"], err["exit_code"], err["hint"])


def _run(argv, out):
    flags, rest = split_global_flags(argv)
    out.configure(json_mode=flags["json"], quiet=flags["quiet"], verbose=flags["verbose"])
    if flags["version"]:
        if out.json:
            out.emit({"version": __version__})
        else:
            out.write(_version_text() + "\n")
        return EXIT_OK
    command = next((a for a in rest if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    if command == "hook" and not {"-h", "--help"} & set(rest):
        env = dict(os.environ)
        if flags["debug"]:
            env["THRUM_DEBUG"] = "1"
        return run_hook(rest, Caller(_cli_cwd(flags["repo"]), env), out)
    parser = build_parser(command)
    try:
        if out.json:  # --help with --json: the help text inside one JSON document
            import contextlib
            import io
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                args = parser.parse_args(rest)
        else:
            args = parser.parse_args(rest)
    except SystemExit as e:  # --help
        if out.json:
            out.emit({"help": buf.getvalue()})
        return e.code if isinstance(e.code, int) else EXIT_OK
    if not args.command:
        if out.json:
            raise UsageError("missing command", hint="see 'thrum --help'")
        parser.print_help()
        return EXIT_USAGE if rest else EXIT_OK
    _, _, handler = COMMANDS[args.command]
    if not flags["quiet"] and args.command != "mcp" and _isatty(sys.stderr):
        PROGRESS.enable(sys.stderr)  # long steps say what they do, on a terminal only
    env = dict(os.environ)
    if flags["debug"]:
        env["THRUM_DEBUG"] = "1"
    cli = Cli(Caller(_cli_cwd(flags["repo"]), env), out)
    try:
        code = handler(args, cli, out)
    finally:
        PROGRESS.clear()
        cli.close()
    return EXIT_OK if code is None else code


def _isatty(stream):
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):
        return False


def _cli_cwd(repo):
    """Where the command runs: --repo PATH, else the current directory."""
    try:
        return os.path.abspath(repo) if repo else os.getcwd()
    except FileNotFoundError:
        raise ThrumError("the current directory no longer exists (was it deleted?)",
                         hint="cd into the repository (or pass --repo PATH) and retry")


def _report(out, message, code, hint=None):
    """The one-line error (plus a hint line) on stderr; with --json also the error
    object, joined to the command's result when there is one."""
    message = _visible(message)
    PROGRESS.clear()
    try:
        sys.stderr.write("thrum: error: %s\n" % message)
        if hint:
            sys.stderr.write("  hint: %s\n" % _visible(hint))
    except (OSError, ValueError, AttributeError):  # stderr closed: the exit code remains
        pass
    if out.json:
        err = {"message": message, "exit_code": code}
        if hint:
            err["hint"] = hint
        if isinstance(out.document, dict):
            out.document["error"] = err
        else:
            out.document = {"error": err}
    return code


if __name__ == "__main__":
    sys.exit(main())
