"""Shared helpers for the thrum.py benchmarks (stdlib only).

Not a test module: nothing here asserts timings. Every benchmark measures medians over
many runs and reports ratios against a baseline measured in the same run.

What lives here:
    Workspace      a temp dir with a private HOME, a deterministic environment (no inherited
                   GIT_*/THRUM_* variables, like tests/conftest.py), a snapshot of thrum.py,
                   an "installed launcher" built the way install.sh builds one, and the
                   snapshot imported as a module (for its ULID generator and event helpers)
    write_messages append N `message.create` events straight to the author's log files
                   (write_lines: in the snapshot's segment layout)
    median/fmt helpers and the result table printer
"""

import hashlib
import json
import os
import py_compile
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
THRUM_SRC = os.path.join(REPO_ROOT, "thrum.py")

_DROP = ("XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME",
         "XDG_CONFIG_DIRS", "TMUX", "TMUX_PANE", "PYTHONSTARTUP", "PYTHONINSPECT",
         "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV_PROMPT")

#: Fixed identity for the commits the benchmark itself makes (never exported to thrum).
_COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+0000",
    "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+0000",
}


class BenchError(Exception):
    """The benchmark itself failed (a command errored, a check did not hold)."""


def make_env(home):
    """Deterministic environment for subprocesses (mirrors tests/conftest.py make_env)."""
    os.makedirs(home, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "THRUM_")) and k not in _DROP}
    env.update(HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"),
               GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", TZ="UTC",
               LC_ALL="C.UTF-8", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    with open(os.path.join(home, ".gitconfig"), "w") as f:
        f.write("[user]\n\tuseConfigOnly = true\n[init]\n\tdefaultBranch = main\n"
                "[advice]\n\tdetachedHead = false\n")
    return env


def run(argv, cwd, env, name=None, check=True, input=None, extra_env=None, timeout=600):
    """Run argv (never a shell). Returns (elapsed_seconds, CompletedProcess)."""
    e = dict(env)
    if name is not None:
        e["THRUM_NAME"] = name
    if extra_env:
        e.update(extra_env)
    t0 = time.perf_counter()
    p = subprocess.run([str(a) for a in argv], cwd=str(cwd), env=e, input=input,
                       stdin=None if input is not None else subprocess.DEVNULL,
                       capture_output=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise BenchError("command failed (exit %d): %s\n  cwd: %s\n  stdout: %s\n  stderr: %s"
                         % (p.returncode, " ".join(map(str, argv)), cwd,
                            p.stdout.decode("utf-8", "replace")[-2000:],
                            p.stderr.decode("utf-8", "replace")[-2000:]))
    return dt, p


def git(args, cwd, env, commit_identity=False):
    e = dict(env, **_COMMIT_ENV) if commit_identity else env
    return run(["git"] + list(args), cwd, e)[1].stdout.decode()


def make_repo(path, env):
    """`git init -b main` + one commit, like the tests' make_repo."""
    os.makedirs(path, exist_ok=True)
    git(["init", "-q", "-b", "main"], path, env)
    with open(os.path.join(path, "README"), "w") as f:
        f.write("benchmark repository\n")
    git(["add", "README"], path, env)
    git(["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "initial"],
        path, env, commit_identity=True)
    return path


class Workspace:
    """Temp root + env + thrum snapshot + installed launcher. Use as a context manager."""

    def __init__(self, prefix="thrum-bench-", keep=False):
        self.root = tempfile.mkdtemp(prefix=prefix)
        self.keep = keep
        self.env = make_env(os.path.join(self.root, "home"))
        # Snapshot thrum.py once so every measurement in this run uses the same bytes
        # (the checkout may be edited while a long benchmark runs).
        with open(THRUM_SRC, "rb") as f:
            data = f.read()
        self.thrum_sha256 = hashlib.sha256(data).hexdigest()
        src = os.path.join(self.root, "src")
        os.makedirs(src)
        self.script = os.path.join(src, "thrum.py")
        with open(self.script, "wb") as f:
            f.write(data)
        # The installed launcher, as install.sh writes it: program in <inst>/lib, byte-
        # compiled (__pycache__), launcher in <inst>/bin importing it.
        inst = os.path.join(self.root, "inst")
        lib, bindir = os.path.join(inst, "lib"), os.path.join(inst, "bin")
        os.makedirs(lib)
        os.makedirs(bindir)
        shutil.copy2(self.script, os.path.join(lib, "thrum.py"))
        py_compile.compile(os.path.join(lib, "thrum.py"), doraise=True)
        if not os.path.isdir(os.path.join(lib, "__pycache__")):
            raise BenchError("py_compile wrote no __pycache__ in %s" % lib)
        self.launcher = os.path.join(bindir, "thrum")
        with open(self.launcher, "w") as f:
            f.write("#!%s\nimport sys; sys.path.insert(0, %r); import thrum; "
                    "raise SystemExit(thrum.main())\n" % (sys.executable, lib))
        os.chmod(self.launcher, 0o755)
        self._thrum = None

    # argv prefixes for the two ways of running thrum
    def cmd(self, how):
        return [self.launcher] if how == "installed" else [sys.executable, self.script]

    @property
    def thrum(self):
        """The snapshot of thrum.py imported as a module (ULIDs, timestamps, JSON)."""
        if self._thrum is None:
            sys.path.insert(0, os.path.dirname(self.script))
            sys.dont_write_bytecode = True
            import thrum  # noqa: E402  (the snapshot, by sys.path order)
            if os.path.realpath(thrum.__file__) != os.path.realpath(self.script):
                raise BenchError("imported thrum from %s, not the snapshot" % thrum.__file__)
            self._thrum = thrum
        return self._thrum

    def thrum_run(self, args, cwd, name=None, how="installed", check=True, **kw):
        return run(self.cmd(how) + list(args), cwd, self.env, name=name, check=check, **kw)

    def init_store(self, repo, agents=(("alice", "implementer"), ("bob", "reviewer"))):
        self.thrum_run(["init"], repo)
        for name, role in agents:
            self.thrum_run(["quickstart", "--name", name, "--role", role, "--module", "bench"],
                           repo, name=name)

    def cleanup(self):
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


def log_dir(repo):
    """The a-sync worktree of a main checkout (SPEC §2)."""
    return os.path.join(repo, ".git", "thrum-sync", "a-sync")


def write_messages(thrum, repo, author, recipient, n, step=0.002, end=None):
    """Append n `message.create` events author -> recipient to author's message log.

    Exactly the event shape `thrum send` writes (SPEC §3; make_event + Service.send):
    v, event_id, type, timestamp, origin, message_id, agent_id, session_id, body,
    recipients, audiences (`scopes` and `refs` are left out when empty, as send does).
    Timestamps are fixed width, spaced `step` seconds apart and ending a minute before
    `end` (default now), so that later real sends sort after them; each ULID's time part
    matches its event's timestamp.
    Returns the number of bytes written.
    """
    if n <= 0:
        return 0
    store = os.path.join(repo, ".thrum")
    with open(os.path.join(store, "origin")) as f:
        origin = f.read().strip()
    with open(os.path.join(store, "identities", author + ".json")) as f:
        session = json.load(f).get("session_id")
    if not origin:
        raise BenchError("%s has no origin id" % store)
    gen = thrum._UlidGen() if hasattr(thrum, "_UlidGen") else thrum.ulid
    dumps = thrum._dumps if hasattr(thrum, "_dumps") else (
        lambda o: json.dumps(o, ensure_ascii=False, separators=(",", ":")))
    now_ts = thrum.now_ts
    t0 = (time.time() if end is None else end) - 60.0 - n * step
    audiences = [{"type": "agent", "value": recipient}]
    filler = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2
    out = []
    for i in range(n):
        t = t0 + i * step
        ms = int(t * 1000)
        mid = "msg_" + gen(ms)
        eid = "evt_" + gen(ms)
        out.append(dumps({
            "v": 1, "event_id": eid, "type": "message.create", "timestamp": now_ts(t),
            "origin": origin, "message_id": mid, "agent_id": author, "session_id": session,
            "body": {"format": "markdown", "content": "bench message %d: %s" % (i, filler)},
            "recipients": [recipient], "audiences": audiences}))
    _check_line(thrum, out[0])
    return write_lines(thrum, repo, "messages", author, [l.encode("utf-8") for l in out])


def write_lines(thrum, repo, sub, writer, lines):
    """Append log lines (bytes, no newline) to `writer`'s file in `sub` in the layout
    the snapshot's own appends make: its latest segment, the next one each time one
    holds SEGMENT_BYTES (one file when the snapshot has no segments). Returns the
    number of bytes written."""
    root = log_dir(repo)
    os.makedirs(os.path.join(root, sub), exist_ok=True)
    limit = getattr(thrum, "SEGMENT_BYTES", None)
    if not limit:  # a thrum.py from before segments
        data = b"".join(l + b"\n" for l in lines)
        with open(os.path.join(root, sub, writer + ".jsonl"), "ab") as f:
            f.write(data)
        return len(data)
    have = thrum.EventLog(root, os.path.join(root, ".torn")).segments(sub, writer)
    seg = have[-1][0] if have else 0

    def path_of(n):
        return os.path.join(root, thrum.segment_relpath(sub, writer, n))
    try:
        size = os.path.getsize(path_of(seg))
    except FileNotFoundError:
        size = 0
    total, chunk = 0, []

    def flush():
        if chunk:
            with open(path_of(seg), "ab") as f:
                f.write(b"".join(chunk))
            chunk.clear()
    for line in lines:
        if size >= limit:
            flush()
            seg, size = seg + 1, 0
        line += b"\n"
        chunk.append(line)
        size += len(line)
        total += len(line)
    flush()
    return total


def _check_line(thrum, line):
    """Sanity-check one generated line against the SPEC §3 formats."""
    import re
    ulid = r"[0-9A-HJKMNP-TV-Z]{26}"
    ev = json.loads(line)
    ok = (re.fullmatch("evt_" + ulid, ev["event_id"]) and re.fullmatch("msg_" + ulid,
          ev["message_id"]) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z",
                                             ev["timestamp"])
          and thrum.is_ulid(ev["event_id"][4:]) and thrum.is_ulid(ev["message_id"][4:]))
    if not ok:
        raise BenchError("generated event has a bad format: %s" % line)


# -- statistics and reporting ----------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def summary(samples):
    xs = sorted(samples)
    if not xs:
        return {"n": 0}
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return {"n": len(xs), "median_ms": median(xs) * 1000, "min_ms": xs[0] * 1000,
            "p90_ms": p90 * 1000, "max_ms": xs[-1] * 1000}


def print_table(rows, title=None, stream=None):
    """rows: dicts with name, median_ms, ratio, target, status, n."""
    stream = stream or sys.stdout
    heads = ("measurement", "median ms", "x baseline", "+ms", "n", "target", "result")
    nright = 5  # columns 1..4 are right-aligned numbers

    def cells(r):
        med = r.get("median_ms")
        ratio = r.get("ratio")
        delta = r.get("delta_ms")
        return (r["name"],
                "-" if med is None else ("%.1f" % med if med < 10000 else "%.0f" % med),
                "-" if ratio is None else "%.2fx" % ratio,
                "-" if delta is None else "%+.1f" % delta,
                str(r.get("n", "")) or "-",
                r.get("target") or "-",
                r.get("status") or "")
    body = [cells(r) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(heads)]

    def fmt(cs):
        return "  ".join(c.ljust(w) if i == 0 or i >= nright else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    if title:
        stream.write(title + "\n")
    head = fmt(heads)
    stream.write(head + "\n" + "-" * len(head) + "\n")
    for b in body:
        stream.write(fmt(b) + "\n")


def meta(ws, **extra):
    import platform
    d = {"python": sys.version.split()[0], "executable": sys.executable,
         "platform": platform.platform(), "cpus": os.cpu_count(),
         "thrum_py_sha256": ws.thrum_sha256[:16],
         "git": subprocess.run(["git", "--version"], capture_output=True,
                               text=True).stdout.strip(),
         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    d.update(extra)
    return d


def report(benchmark, title, m, rows, info, as_json):
    """Print a benchmark's results: JSON, or the table plus one line per info entry."""
    if as_json:
        json.dump({"benchmark": benchmark, "meta": m, "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print_table(rows, "%s (python %s, thrum.py %s, %d runs, %.0fs)"
                % (title, m["python"], m["thrum_py_sha256"][:12], m["runs"], m["elapsed_s"]))
    for k, v in info.items():
        shown = ", ".join("%s=%s" % kv for kv in v.items()) if isinstance(v, dict) else v
        print("  %s: %s" % (k, shown))
