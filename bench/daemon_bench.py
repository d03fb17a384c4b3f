#!/usr/bin/env python3
"""The thrum daemon: wait wake-up, CPU and memory at rest, per-command cost, cross-clone
delivery and remote traffic.

    python3 bench/daemon_bench.py [--runs N] [--quick] [--json] [--keep] [--only 1,2,...]

Sections (each in its own store; the daemon is started and stopped with `thrum daemon
start|stop`, every command runs through the installed launcher):

  1. wait wake-up: a background `thrum wait --timeout 30s` as bob, 0.5 s to block (with a
     daemon: also until the daemon reports the wait), then `thrum send` as alice; latency
     from the send *returning* to the waiter *exiting* (reaped by a thread in proc.wait()).
     With a daemon (median <= 10 ms, p95 <= 25 ms) and without (median <= 18 ms: "as today
     or better", the CLI-mode wait measured ~14-18 ms). Modes in ABBA blocks, same store
     (10,000 messages).
  2. CPU of one blocked wait: utime+stime from /proc/<pid>/stat between 1.5 s after start
     and the end of a 30 s window (10 s with --quick). With a daemon <= 0.2 % of a core,
     without <= 1 %. The daemon's CPU over the same window is shown too.
  3. send / inbox with a daemon running vs without, in ABBA blocks, 10,000-message store:
     median daemon / median direct <= 1.05.
  4. Idle daemon, three agents with open sessions, 60 s (15 s with --quick): CPU, including
     the git processes it spawns, <= 0.5 % of a core; VmRSS <= 40 MiB; VmRSS again after
     100,000 messages were appended and the daemon caught up.
  5. Two clones and a local bare remote, a daemon in each (default sync settings), alice in
     A and bob in B take turns: one waits (`wait --timeout 60s --after -1s`), the other
     sends; send return -> waiter exit, 6 deliveries (3 with --quick), median <= 7 s. Then
     60 s idle (20 s with --quick): remote git calls (fetch, push, ls-remote) per clone per
     minute, counted from the daemons' THRUM_DEBUG trace in .thrum/var/daemon.log.

This script reports; it never fails on a missed target (exit 0), only when the benchmark
itself breaks (exit 1). Daemons and temp dirs are cleaned up on every exit.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BenchError, Workspace, git, make_repo, median, meta,  # noqa: E402
                      write_messages)

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: git subcommands that talk to the remote (`git remote` alone only lists remotes)
REMOTE_GIT = ("fetch", "push", "ls-remote", "pull", "clone", "remote update",
              "remote show", "remote prune")
SECTIONS = {1: "wait wake-up", 2: "CPU of a blocked wait", 3: "send/inbox overhead",
            4: "idle daemon", 5: "cross-clone delivery"}


def progress(msg):
    sys.stderr.write("[daemon_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# -- statistics, /proc ---------------------------------------------------------------

def pctl(xs, q):
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, math.ceil(q * len(xs) - 1e-9) - 1))
    return xs[k]


def lat_stats(samples):
    """Seconds -> {n, median_ms, p95_ms, min_ms, max_ms}."""
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "median_ms": median(samples) * 1000,
            "p95_ms": pctl(samples, 0.95) * 1000, "min_ms": min(samples) * 1000,
            "max_ms": max(samples) * 1000}


def proc_cpu(pid):
    """(own CPU seconds, reaped children's CPU seconds) of a process, from /proc."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError as e:
        raise BenchError("cannot read /proc/%d/stat: %s" % (pid, e))
    rest = data[data.rindex(")") + 2:].split()  # rest[0] is field 3 (state)
    ut, st, cut, cst = (int(x) for x in rest[11:15])  # fields 14-17
    return (ut + st) / CLK_TCK, (cut + cst) / CLK_TCK


def proc_sched(pid):
    """CPU seconds of a process's live threads, from /proc/<pid>/task/*/schedstat
    (nanoseconds: finer than the 1/CLK_TCK ticks of /proc/<pid>/stat; threads that
    ended are not in it). None where schedstat is missing."""
    total = 0
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def rss_parts(m):
    return "anon %.1f + file %.1f + shmem %.1f MiB" % (
        m.get("RssAnon", 0), m.get("RssFile", 0), m.get("RssShmem", 0))


def sched_pct(a, b, wall):
    """% of a core between two proc_sched readings (None if unusable)."""
    if a is None or b is None or b < a:
        return None
    return (b - a) / wall * 100


def fmt_pct(x):
    return "-" if x is None else "%.3f %%" % x


def proc_mem(pid):
    """{VmRSS, VmHWM, RssAnon, RssFile, RssShmem} in MiB."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[k] = int(v.split()[0]) / 1024.0
    except OSError as e:
        raise BenchError("cannot read /proc/%d/status: %s" % (pid, e))
    return out


def git_subcommand(args):
    """The subcommand of a traced git argv (skipping -c K=V, -C DIR and --options);
    `remote` keeps its verb ("remote update")."""
    words = args.split()
    i = 0
    while i < len(words) and words[i].startswith("-"):
        i += 2 if words[i] in ("-c", "-C") else 1
    if i >= len(words):
        return "?"
    if words[i] == "remote" and i + 1 < len(words):
        return "remote " + words[i + 1]
    return words[i]


def remote_call(line):
    """The subcommand of a remote git call in a THRUM_DEBUG trace line, else None.
    Trace lines look like `thrum: debug: git ARGS -> EXIT (N ms)`."""
    head = "thrum: debug: git "
    if not line.startswith(head) or " -> " not in line:
        return None
    sub = git_subcommand(line[len(head):].rsplit(" -> ", 1)[0])
    return sub if sub in REMOTE_GIT else None


class LogTail:
    """Follows daemon.log files from their current end, in a thread, and records
    (monotonic time, clone, subcommand) for every remote git call traced there. A trace
    line is written when its call ends, so the time is the call's end (+- `every`)."""

    def __init__(self, logs, every=0.02):
        self.logs = logs
        self.every = every
        self.pos = {c: log_size(p) for c, p in logs.items()}
        self.buf = {c: b"" for c in logs}
        self.events = []
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self):
        for c, path in self.logs.items():
            size = log_size(path)
            if size < self.pos[c]:  # rotated (DAEMON_LOG_MAX)
                self.pos[c], self.buf[c] = 0, b""
            if size == self.pos[c]:
                continue
            try:
                with open(path, "rb") as f:
                    f.seek(self.pos[c])
                    data = f.read(size - self.pos[c])
            except OSError:
                continue
            now = time.monotonic()
            self.pos[c] += len(data)
            lines = (self.buf[c] + data).split(b"\n")
            self.buf[c] = lines.pop()
            for line in lines:
                sub = remote_call(line.decode("utf-8", "replace"))
                if sub:
                    self.events.append((now, c, sub))

    def calls(self, clone, t0, t1):
        """{subcommand: count} of `clone`'s remote calls that ended in [t0, t1]."""
        out = {}
        for t, c, sub in list(self.events):
            if c == clone and t0 <= t <= t1:
                out[sub] = out.get(sub, 0) + 1
        return out

    def timeline(self, t0, t1, zero):
        """`clone sub +s ...` for the calls in [t0, t1], times relative to `zero`."""
        return ", ".join("%s %s %+.1f" % (c, sub, t - zero)
                         for t, c, sub in list(self.events) if t0 <= t <= t1)

    def stop(self):
        self._stop.set()
        self._th.join(5)
        self.poll()


def log_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def abba(runs, block):
    """Blocks of (mode, n) for `runs` runs per mode, in the order daemon, direct, direct,
    daemon, daemon, direct, ... (ABBA: drift hits both modes alike, and the daemon is
    started or stopped only every second block)."""
    left = {"daemon": runs, "direct": runs}
    out, i = [], 0
    while left["daemon"] or left["direct"]:
        mode = ("daemon", "direct", "direct", "daemon")[i % 4]
        i += 1
        k = min(block, left[mode])
        if k:
            out.append((mode, k))
            left[mode] -= k
    return out


# -- processes ----------------------------------------------------------------------

class Waiter:
    """A background `thrum wait` whose exit instant is taken by a thread in proc.wait()."""

    def __init__(self, ws, repo, name, args, out_path):
        self.out_path = out_path
        env = dict(ws.env, THRUM_NAME=name)
        with open(out_path, "wb") as out, open(out_path + ".err", "wb") as err:
            self.proc = subprocess.Popen(ws.cmd("installed") + list(args), cwd=repo, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.t_exit = None
        self._th = threading.Thread(target=self._reap, daemon=True)
        self._th.start()

    def _reap(self):
        self.proc.wait()
        self.t_exit = time.monotonic()

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.t_exit is None

    def join(self, timeout):
        self._th.join(timeout)
        return self.t_exit is not None

    def kill(self):
        if self.t_exit is None:
            try:
                self.proc.kill()
            except OSError:
                pass
            self._th.join(10)

    def output(self):
        try:
            with open(self.out_path, "rb") as f:
                out = f.read()
            with open(self.out_path + ".err", "rb") as f:
                err = f.read()
        except OSError:
            return b"", b""
        return out, err

    def check_received(self, mid):
        out, err = self.output()
        try:
            res = json.loads(out)
        except ValueError:
            res = None
        if self.proc.returncode != 0 or not isinstance(res, dict) or \
                res.get("status") != "received" or \
                mid not in [m.get("message_id") for m in res.get("messages", [])]:
            raise BenchError("thrum wait (exit %s) did not report message %s: %s %s"
                             % (self.proc.returncode, mid, out[-500:], err[-500:]))


class Bench:
    def __init__(self, ws, a):
        self.ws = ws
        self.thrum = ws.thrum
        self.a = a
        self.rows = []
        self.info = {}
        self.daemons = {}   # repo -> pid of the daemon we started there
        self.waiters = []
        self.fallbacks = {}  # section -> CLI waits that did not reach the daemon
        self._nout = 0

    # -- results ----------------------------------------------------------------------
    def row(self, section, name, value, unit, target=None, limit=None, n=None,
            detail=None, **extra):
        status = None
        if limit is not None:
            status = "MISS" if value is None or value > limit else "PASS"
        r = dict(section=section, name=name, value=value, unit=unit, target=target,
                 limit=limit, status=status, n=n, detail=detail)
        r.update((k, v) for k, v in extra.items() if k not in r)
        self.rows.append(r)
        progress("  %s: %s%s" % (name, fmt_value(value, unit),
                                 "  [%s %s]" % (target, status) if status else ""))
        return r

    # -- thrum ------------------------------------------------------------------------
    def thrum_run(self, args, repo, name=None, **kw):
        return self.ws.thrum_run(args, repo, name=name, **kw)

    def send(self, repo, who, text, to):
        _, p = self.thrum_run(["send", text, "--to", "@" + to, "--json"], repo, name=who)
        mid = json.loads(p.stdout).get("message_id")
        if not mid:
            raise BenchError("send printed no message_id: %r" % p.stdout[-300:])
        return mid

    def waiter(self, repo, who, args):
        self._nout += 1
        w = Waiter(self.ws, repo, who, ["wait"] + list(args),
                   os.path.join(self.ws.root, "wait-%d.out" % self._nout))
        self.waiters.append(w)
        return w

    def files(self, repo):
        return self.thrum.DaemonFiles(os.path.join(repo, ".thrum", "var"), self.ws.env)

    def start_daemon(self, repo, extra_env=None):
        if self.files(repo).running():
            raise BenchError("a daemon is already running in %s" % repo)
        _, p = self.thrum_run(["daemon", "start", "--json"], repo, extra_env=extra_env)
        r = json.loads(p.stdout)
        pid = r.get("pid")
        if not r.get("started") or not isinstance(pid, int):
            raise BenchError("daemon start did not start a daemon: %r" % r)
        self.daemons[repo] = pid
        return pid

    def stop_daemon(self, repo, check=True):
        pid = self.daemons.pop(repo, None)
        try:
            self.thrum_run(["daemon", "stop", "-q"], repo, check=check, timeout=60)
        except Exception:  # noqa: BLE001 - fall back to the pid below
            if check:
                raise
        f = self.files(repo)
        deadline = time.monotonic() + 20
        while f.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if f.running() and pid:
            try:
                os.kill(pid, signal.SIGKILL)  # only the daemon this benchmark started
            except OSError:
                pass
            if check:
                raise BenchError("the daemon (pid %s) in %s did not stop" % (pid, repo))

    def set_mode(self, repo, mode):
        if mode == "daemon" and repo not in self.daemons:
            self.start_daemon(repo)
        elif mode == "direct" and repo in self.daemons:
            self.stop_daemon(repo)
        if self.files(repo).running() != (mode == "daemon"):
            raise BenchError("%s: expected %s mode" % (repo, mode))

    def daemon_waiting(self, repo):
        try:
            rep = self.thrum.DaemonClient(self.files(repo)).request(
                {"op": "daemon_status"}, timeout=2.0)
        except self.thrum.DaemonUnavailable:
            return None
        return (rep.get("result") or {}).get("waiting")

    def wait_blocked(self, repo, w, timeout=5.0):
        """True once the daemon in `repo` serves a blocked wait; False if the CLI waiter
        is still running after `timeout` but the daemon serves none: it fell back to
        polling by itself (the CLI does that silently when it cannot reach the daemon).
        Polled every 0.1 s: each poll is a connection to the daemon."""
        deadline = time.monotonic() + timeout
        while True:
            k = self.daemon_waiting(repo)
            if k is not None and k >= 1:
                return True
            if not w.running():
                raise BenchError("thrum wait exited before the send: %r" % (w.output(),))
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def daemon_waiter(self, repo, who, args, settle, section, tries=4):
        """A background wait that the daemon in `repo` serves. A waiter that did not reach
        the daemon is killed, counted and started again."""
        for _ in range(tries):
            w = self.waiter(repo, who, args)
            time.sleep(settle)
            if not w.running():
                raise BenchError("thrum wait exited before the send: %r" % (w.output(),))
            if self.wait_blocked(repo, w):
                return w
            w.kill()
            self.fallbacks[section] = self.fallbacks.get(section, 0) + 1
            progress("a CLI wait in %s did not reach the daemon (it polls by itself); "
                     "starting it again" % os.path.basename(repo))
        raise BenchError("%d CLI waits in a row did not reach the daemon in %s"
                         % (tries, repo))

    def cleanup(self):
        for w in self.waiters:
            w.kill()
        for repo in list(self.daemons):
            self.stop_daemon(repo, check=False)

    # -- stores -----------------------------------------------------------------------
    def make_store(self, label, n, agents=(("alice", "implementer"), ("bob", "reviewer"))):
        ws = self.ws
        repo = make_repo(os.path.join(ws.root, label), ws.env)
        ws.init_store(repo, agents)
        if n:
            write_messages(ws.thrum, repo, "alice", "bob", n)
            _, p = self.thrum_run(["inbox", "--unread", "--json", "--limit", "1"], repo,
                                  name="bob")
            total = json.loads(p.stdout)["total"]
            if total != n:
                raise BenchError("%s: bob has %d unread messages, expected %d"
                                 % (label, total, n))
        return repo

    # -- 1. wake-up ---------------------------------------------------------------------
    def wake_trial(self, repo, daemon, settle):
        args = ["--timeout", "30s", "--after", self.thrum.now_ts(time.time()), "--json"]
        if daemon:
            w = self.daemon_waiter(repo, "bob", args, settle, 1)
        else:
            w = self.waiter(repo, "bob", args)
            time.sleep(settle)
        try:
            if not w.running():
                raise BenchError("thrum wait exited before the send: %r" % (w.output(),))
            t0 = time.monotonic()
            mid = self.send(repo, "alice", "wake", "bob")
            t1 = time.monotonic()
            if not w.join(35):
                raise BenchError("thrum wait did not exit within 35 s of the send")
        finally:
            w.kill()
        w.check_received(mid)
        return w.t_exit - t1, w.t_exit - t0

    def sec_wakeup(self, repo, trials, settle=0.5):
        lat = {"daemon": [], "direct": []}
        e2e = {"daemon": [], "direct": []}
        for mode, k in abba(trials, 5):
            self.set_mode(repo, mode)
            self.wake_trial(repo, mode == "daemon", settle)  # warm-up, not recorded
            for _ in range(k):
                a, b = self.wake_trial(repo, mode == "daemon", settle)
                lat[mode].append(a)
                e2e[mode].append(b)
            progress("wake-up: %d %s trials" % (k, mode))
        sd, sn = lat_stats(lat["daemon"]), lat_stats(lat["direct"])
        for mode, s in (("daemon", sd), ("direct", sn)):
            s["exited_before_send_returned"] = sum(1 for x in lat[mode] if x < 0)
            s["send_start_to_exit_median_ms"] = median(e2e[mode]) * 1000
        det = "p95 %.1f, min %.1f, max %.1f, send start->exit %.1f ms"
        self.row(1, "wake-up median, daemon", sd["median_ms"], "ms", "<= 10 ms", 10.0,
                 sd["n"], det % (sd["p95_ms"], sd["min_ms"], sd["max_ms"],
                                 sd["send_start_to_exit_median_ms"]), stats=sd)
        self.row(1, "wake-up p95, daemon", sd["p95_ms"], "ms", "<= 25 ms", 25.0, sd["n"])
        self.row(1, "wake-up median, no daemon", sn["median_ms"], "ms",
                 "<= 18 ms (today ~14-18)", 18.0, sn["n"],
                 det % (sn["p95_ms"], sn["min_ms"], sn["max_ms"],
                        sn["send_start_to_exit_median_ms"]), stats=sn)
        self.row(1, "(info) wake-up median daemon / no daemon",
                 sd["median_ms"] / sn["median_ms"], "x", n=sd["n"])
        self.info["1 wake-up"] = {"settle_s": settle, "order": "ABBA blocks of 5 (daemon, "
                                  "direct, direct, daemon, ...), one warm-up trial per block",
                                  "negative samples": "daemon %d, direct %d" % (
                                      sd["exited_before_send_returned"],
                                      sn["exited_before_send_returned"])}

    # -- 2. CPU of a blocked wait -------------------------------------------------------
    def sec_wait_cpu(self, repo, window, startup=1.5):
        for mode in ("daemon", "direct"):
            self.set_mode(repo, mode)
            args = ["--timeout", "%ds" % int(window + 60), "--after",
                    self.thrum.now_ts(time.time()), "--json"]
            dpid = self.daemons.get(repo)
            if dpid:
                w = self.daemon_waiter(repo, "bob", args, startup, 2)
            else:
                w = self.waiter(repo, "bob", args)
                time.sleep(startup)
            try:
                if not w.running():
                    raise BenchError("thrum wait exited early: %r" % (w.output(),))
                c0, d0, t0 = proc_cpu(w.pid), dpid and proc_cpu(dpid), time.monotonic()
                p0, q0 = proc_sched(w.pid), dpid and proc_sched(dpid)
                time.sleep(window)
                if not w.running():
                    raise BenchError("thrum wait exited during the window: %r" % (w.output(),))
                c1, d1, t1 = proc_cpu(w.pid), dpid and proc_cpu(dpid), time.monotonic()
                p1, q1 = proc_sched(w.pid), dpid and proc_sched(dpid)
                mid = self.send(repo, "alice", "end of the window", "bob")
                if not w.join(35):
                    raise BenchError("thrum wait did not exit after the send")
            finally:
                w.kill()
            w.check_received(mid)
            wall = t1 - t0
            cpu = (c1[0] - c0[0]) / wall * 100
            ticks = int(round((c1[0] - c0[0]) * CLK_TCK))
            fine = sched_pct(p0, p1, wall)
            det = "%d ticks of 1/%d s in %.1f s; schedstat %s" % (ticks, CLK_TCK, wall,
                                                                 fmt_pct(fine))
            if mode == "daemon":
                self.row(2, "blocked wait CPU, daemon", cpu, "%", "<= 0.2 %", 0.2,
                         detail=det, window_s=round(wall, 2), ticks=ticks, schedstat_pct=fine)
                own = (d1[0] - d0[0]) / wall * 100
                tot = (d1[0] + d1[1] - d0[0] - d0[1]) / wall * 100
                dfine = sched_pct(q0, q1, wall)
                self.row(2, "(info) the daemon meanwhile", tot, "%",
                         detail="incl. git children; own threads %.3f %% (schedstat %s)"
                         % (own, fmt_pct(dfine)), own_pct=own, own_schedstat_pct=dfine)
            else:
                self.row(2, "blocked wait CPU, no daemon", cpu, "%", "<= 1 %", 1.0,
                         detail=det, window_s=round(wall, 2), ticks=ticks, schedstat_pct=fine)
            progress("wait CPU: %s mode measured" % mode)
        self.info["2 wait CPU"] = {"window_s": window, "sampled_after_s": startup,
                                   "clock_tick_s": 1.0 / CLK_TCK}

    # -- 3. send / inbox overhead -------------------------------------------------------
    def sec_overhead(self, repo, runs, n):
        cmds = [("send", ["send", "x", "--to", "@bob", "-q"], "alice"),
                ("inbox", ["inbox", "-q", "--limit", "10"], "bob")]
        s = {(c, m): [] for c, _, _ in cmds for m in ("daemon", "direct")}
        dcpu = []   # (daemon CPU s, requests) per daemon block
        for mode, k in abba(runs, 2):
            self.set_mode(repo, mode)
            for _, args, who in cmds:  # warm-up (page cache, the daemon's connection)
                self.thrum_run(args, repo, name=who)
            pid = self.daemons.get(repo)
            c0 = proc_cpu(pid) if pid else None
            for i in range(k):
                for c, args, who in (cmds if i % 2 == 0 else cmds[::-1]):
                    dt, _ = self.thrum_run(args, repo, name=who)
                    s[(c, mode)].append(dt)
            if pid:
                c1 = proc_cpu(pid)
                dcpu.append((c1[0] - c0[0], k * len(cmds)))
        for c, _, _ in cmds:
            d, x = median(s[(c, "daemon")]), median(s[(c, "direct")])
            dp, xp = pctl(s[(c, "daemon")], 0.9), pctl(s[(c, "direct")], 0.9)
            self.row(3, "%s @%d: daemon / direct" % (c, n), d / x, "x", "<= 1.05", 1.05,
                     len(s[(c, "daemon")]),
                     "medians: daemon %.1f ms, direct %.1f ms; p90: %.1f, %.1f ms"
                     % (d * 1000, x * 1000, dp * 1000, xp * 1000),
                     daemon_median_ms=d * 1000, direct_median_ms=x * 1000,
                     daemon_p90_ms=dp * 1000, direct_p90_ms=xp * 1000)
        cpu = sum(a for a, _ in dcpu)
        nreq = sum(b for _, b in dcpu)
        self.info["3 send/inbox"] = {
            "order": "ABBA blocks of 2 runs, one warm-up of each command per block",
            "daemon_cpu_per_request_ms": round(cpu / max(1, nreq) * 1000, 2)}

    # -- 4. idle daemon -----------------------------------------------------------------
    def cpu_window(self, pid, window, step=1.0):
        """CPU (% of a core: own, own + children) and the largest VmRSS over `window`."""
        c0, p0, t0 = proc_cpu(pid), proc_sched(pid), time.monotonic()
        rss = [proc_mem(pid)]
        while time.monotonic() - t0 < window:
            time.sleep(min(step, max(0.0, window - (time.monotonic() - t0))))
            rss.append(proc_mem(pid))
        c1, p1, wall = proc_cpu(pid), proc_sched(pid), time.monotonic() - t0
        return ((c1[0] - c0[0]) / wall * 100, (sum(c1) - sum(c0)) / wall * 100,
                max(rss, key=lambda m: m["VmRSS"]), wall, sched_pct(p0, p1, wall))

    def sec_idle(self, window, big, idle_big):
        agents = (("alice", "implementer"), ("bob", "reviewer"), ("carol", "tester"))
        repo = self.make_store("idle", 0, agents)
        _, p = self.thrum_run(["team", "--json"], repo, name="alice")
        members = json.loads(p.stdout).get("members", [])
        if len(members) != 3:
            raise BenchError("team lists %d agents with open sessions, expected 3"
                             % len(members))
        pid = self.start_daemon(repo)
        time.sleep(3.0)  # start-up: first work-context pass, index opened
        own, tot, rss, wall, fine = self.cpu_window(pid, window)
        self.row(4, "idle daemon CPU (3 agents)", tot, "%", "<= 0.5 %", 0.5,
                 detail="incl. git children; own threads %.3f %% (schedstat %s); %.0f s"
                 % (own, fmt_pct(fine), wall), own_pct=own, own_schedstat_pct=fine,
                 window_s=round(wall, 1))
        self.row(4, "idle daemon VmRSS (max)", rss["VmRSS"], "MiB", "<= 40 MiB", 40.0,
                 detail="%s; sampled every 1 s over %.0f s" % (rss_parts(rss), wall),
                 mem_mib=rss)
        progress("idle daemon measured; appending %d messages" % big)
        t0 = time.monotonic()
        write_messages(self.ws.thrum, repo, "alice", "bob", big)
        gen = time.monotonic() - t0
        dt, p = self.thrum_run(["inbox", "--unread", "--json", "--limit", "1"], repo,
                               name="bob")
        total = json.loads(p.stdout)["total"]
        if total < big:
            raise BenchError("after appending %d messages bob's unread total is %d"
                             % (big, total))
        # Let the daemon settle: its watch loop catches up too, and the debounced sync
        # commits the appended log (in git children, counted when reaped). Quiet means
        # under 30 ms of CPU, own + children, in each of 3 seconds in a row.
        deadline, prev, quiet = time.monotonic() + 60, sum(proc_cpu(pid)), 0
        while time.monotonic() < deadline and quiet < 3:
            time.sleep(1.0)
            cur = sum(proc_cpu(pid))
            quiet = quiet + 1 if cur - prev < 0.03 else 0
            prev = cur
        settle = time.monotonic() - t0 - gen - dt
        mem = proc_mem(pid)
        self.row(4, "daemon VmRSS @%d messages" % big, mem["VmRSS"], "MiB", "<= 40 MiB",
                 40.0, detail="%s; peak (VmHWM) %.1f MiB" % (rss_parts(mem), mem["VmHWM"]),
                 mem_mib=mem)
        if idle_big:
            own, tot, rss, wall, fine = self.cpu_window(pid, idle_big)
            self.row(4, "(info) idle daemon CPU @%d messages" % big, tot, "%",
                     detail="incl. git children; own threads %.3f %% (schedstat %s); "
                     "%.0f s; VmRSS max %.1f MiB" % (own, fmt_pct(fine), wall, rss["VmRSS"]),
                     own_pct=own, own_schedstat_pct=fine)
        self.info["4 idle daemon"] = {"agents": 3, "window_s": window,
                                      "append_%d_s" % big: round(gen, 2),
                                      "first_inbox_via_daemon_s": round(dt, 2),
                                      "quiet_after_s": round(settle, 1)}
        self.stop_daemon(repo)

    # -- 5. cross-clone ------------------------------------------------------------------
    def sec_cross(self, rounds, idle, settle=0.5):
        ws, env, root = self.ws, self.ws.env, self.ws.root
        seed = make_repo(os.path.join(root, "seed"), env)
        remote = os.path.join(root, "remote.git")
        os.makedirs(remote)
        git(["init", "-q", "--bare", "-b", "main"], remote, env)
        git(["push", "-q", remote, "main"], seed, env)
        A, B = os.path.join(root, "A"), os.path.join(root, "B")
        git(["clone", "-q", remote, A], root, env)
        git(["clone", "-q", remote, B], root, env)
        ws.init_store(A, agents=(("alice", "implementer"),))
        self.thrum_run(["sync", "force", "-q"], A, name="alice")
        ws.init_store(B, agents=(("bob", "reviewer"),))
        self.thrum_run(["sync", "force", "-q"], B, name="bob")
        self.thrum_run(["sync", "force", "-q"], A, name="alice")  # A learns about bob
        cfg = {}
        for k in ("sync.interval", "sync.wait_interval"):
            _, p = self.thrum_run(["config", "get", k], A)
            cfg[k] = p.stdout.decode().strip()
        debug = {"THRUM_DEBUG": "1"}
        self.start_daemon(A, extra_env=debug)
        self.start_daemon(B, extra_env=debug)
        logs = {c: os.path.join(r, ".thrum", "var", "daemon.log") for c, r in
                (("A", A), ("B", B))}
        tail = LogTail(logs)
        try:
            time.sleep(3.0)  # first work-context pass and its push
            t_active = time.monotonic()
            legs = ((B, "bob", A, "alice"), (A, "alice", B, "bob"))
            samples, lost = [], None
            for i in range(rounds):
                wrepo, wname, srepo, sname = legs[i % 2]
                t_wait = time.monotonic()
                w = self.daemon_waiter(wrepo, wname, ["--timeout", "60s", "--after", "-1s",
                                                      "--json"], settle, 5)
                try:
                    mid = self.send(srepo, sname, "round %d" % (i + 1), wname)
                    t1 = time.monotonic()
                    if not w.join(75):
                        raise BenchError("thrum wait outlived its 60 s timeout")
                finally:
                    w.kill()
                time.sleep(2 * tail.every)
                tail.poll()
                key = "5 round %d %s -> %s" % (i + 1, sname, wname)
                self.info[key] = "remote git calls (end, s after send returned): %s" % (
                    tail.timeline(t_wait, w.t_exit, t1) or "none")
                if w.proc.returncode == 1 and b'"timeout"' in w.output()[0]:
                    lost = "round %d (%s -> %s) not delivered within 60 s" % (
                        i + 1, sname, wname)
                    progress(lost)
                    break
                w.check_received(mid)
                samples.append(w.t_exit - t1)
                self.info[key] = "delivered +%.2f s; %s" % (samples[-1], self.info[key])
                progress("round %d: %s -> %s delivered in %.2f s"
                         % (i + 1, sname, wname, samples[-1]))
            t_end = time.monotonic()
            s = lat_stats(samples)
            self.row(5, "cross-clone delivery median", s.get("median_ms", 0) / 1000
                     if samples and not lost else None, "s", "<= 7 s", 7.0, len(samples),
                     ("min %.2f, max %.2f s; each: %s" % (
                         s["min_ms"] / 1000, s["max_ms"] / 1000,
                         " ".join("%.1f" % x for x in samples)) if samples else "") +
                     ("; " + lost if lost else ""), samples_s=[round(x, 3) for x in samples],
                     stats=s)
            for c in ("A", "B"):
                calls = tail.calls(c, t_active, t_end)
                k = sum(calls.values())
                self.row(5, "(info) remote git calls/min talking, clone %s" % c,
                         k * 60.0 / (t_end - t_active), "/min", n=k,
                         detail=", ".join("%s %d" % kv for kv in sorted(calls.items())) +
                         " in %.0f s" % (t_end - t_active), calls=calls)
            time.sleep(3.0)  # the last pushes settle
            t0 = time.monotonic()
            time.sleep(idle)
            t1 = time.monotonic()
            tail.poll()
            for c in ("A", "B"):
                calls = tail.calls(c, t0, t1)
                k = sum(calls.values())
                self.row(5, "remote git calls/min idle, clone %s" % c, k * 60.0 / (t1 - t0),
                         "/min", "info (1 fetch per sync.interval)", n=k,
                         detail=(", ".join("%s %d" % kv for kv in sorted(calls.items()))
                                 or "none") + " in %.0f s" % (t1 - t0), calls=calls,
                         window_s=round(t1 - t0, 1))
            self.info["5 idle remote calls"] = tail.timeline(t0, t1, t0) or "none"
        finally:
            tail.stop()
        self.info["5 cross-clone"] = dict(cfg, rounds=rounds, settle_s=settle,
                                          idle_window_s=idle)
        for r in (A, B):
            self.stop_daemon(r)


# -- report -----------------------------------------------------------------------------

def fmt_value(v, unit):
    if v is None:
        return "-"
    return {"ms": "%.1f ms", "s": "%.2f s", "%": "%.3f %%", "MiB": "%.1f MiB",
            "x": "%.3fx", "/min": "%.1f /min"}.get(unit, "%g " + unit) % v


def print_report(m, rows, info, stream=None):
    stream = stream or sys.stdout
    heads = ("measurement", "value", "n", "target", "result", "detail")
    body = [(r["name"], fmt_value(r["value"], r["unit"]), "-" if r["n"] is None
             else str(r["n"]), r["target"] or "-", r["status"] or "", r["detail"] or "")
            for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(heads)]

    def fmt(cs):
        return "  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    stream.write("thrum daemon (python %s, thrum.py %s, %d runs, %.0fs, load %.1f -> %.1f "
                 "on %s cpus)\n" % (m["python"], m["thrum_py_sha256"][:12], m["runs"],
                                    m["elapsed_s"], m["loadavg_1m_start_end"][0],
                                    m["loadavg_1m_start_end"][1], m["cpus"]))
    head = fmt(heads)
    stream.write(head + "\n")
    section = None
    for r, b in zip(rows, body):
        if r["section"] != section:
            section = r["section"]
            stream.write("-- %d. %s %s\n" % (section, SECTIONS[section],
                                             "-" * max(0, len(head) - 8 -
                                                       len(SECTIONS[section]))))
        stream.write(fmt(b) + "\n")
    for k, v in info.items():
        shown = ", ".join("%s=%s" % kv for kv in v.items()) if isinstance(v, dict) else v
        stream.write("  %s: %s\n" % (k, shown))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # run the finally blocks: stop daemons, remove temp dirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="wake-up trials per mode and send/inbox runs per mode "
                         "(default 20; 10 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="shorter windows and fewer runs (smoke test, ~2 min)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    ap.add_argument("--only", default="1,2,3,4,5", help="sections to run, e.g. 1,3")
    a = ap.parse_args(argv)
    runs = a.runs or (10 if a.quick else 20)
    if runs < 2:
        ap.error("--runs must be >= 2")
    try:
        only = {int(x) for x in a.only.split(",") if x.strip()}
    except ValueError:
        ap.error("--only takes section numbers, e.g. 1,3")
    if not only or not only <= set(SECTIONS):
        ap.error("--only takes section numbers 1-5")
    if not os.path.isdir("/proc/self"):
        sys.stderr.write("daemon_bench: needs /proc (Linux)\n")
        return 1
    q = a.quick
    store_n, big = 10000, 100000
    signal.signal(signal.SIGTERM, _terminate)
    t_start = time.monotonic()
    load0 = os.getloadavg()
    try:
        with Workspace("thrum-bench-daemon-", keep=a.keep) as ws:
            b = Bench(ws, a)
            progress("temp dir %s, thrum.py sha256 %s, %d runs%s"
                     % (ws.root, ws.thrum_sha256[:12], runs, ", quick" if q else ""))
            try:
                if only & {1, 2, 3}:
                    repo = b.make_store("store-%d" % store_n, store_n)
                    progress("store %d ready" % store_n)
                if 1 in only:
                    b.sec_wakeup(repo, runs)
                if 2 in only:
                    b.sec_wait_cpu(repo, 10.0 if q else 30.0)
                if 3 in only:
                    b.sec_overhead(repo, runs, store_n)
                    progress("send/inbox measured")
                if only & {1, 2, 3}:
                    b.set_mode(repo, "direct")
                if 4 in only:
                    b.sec_idle(15.0 if q else 60.0, big, 0 if q else 10.0)
                if 5 in only:
                    b.sec_cross(3 if q else 6, 20.0 if q else 60.0)
            finally:
                b.cleanup()
            m = meta(ws, runs=runs, quick=q, sections=sorted(only),
                     elapsed_s=round(time.monotonic() - t_start, 1),
                     loadavg_1m_start_end=[round(load0[0], 2), round(os.getloadavg()[0], 2)])
            if b.fallbacks:
                b.info["CLI waits that did not reach the daemon (retried)"] = dict(
                    ("section %d" % k, v) for k, v in sorted(b.fallbacks.items()))
            m["details"] = b.info
    except BenchError as e:
        sys.stderr.write("daemon_bench: benchmark failed: %s\n" % e)
        return 1
    if a.json:
        json.dump({"benchmark": "daemon_bench", "meta": m, "results": b.rows}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
    else:
        print_report(m, b.rows, b.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
