#!/usr/bin/env python3
"""What a tmux nudge costs the send: `thrum send` to an agent with a live tmux pane, with
tmux missing and with a hung tmux, against a recipient without a pane.

    python3 bench/nudge_bench.py [--runs N] [--quick] [--json] [--keep]

One store, no daemon, every command through the installed launcher (benchlib's snapshot
of thrum.py). alice is registered with `thrum quickstart`, bob with `thrum tmux create
w-bob --name bob ... --command python3 -c PROG`, where PROG reads its terminal line by
line and appends each line, stamped with time.monotonic(), to a log file. Every command
runs against a private tmux server: THRUM_TMUX_SOCKET=<tmp>/tmux.sock and
TMUX_TMPDIR=<tmp> (the user's own tmux server is never touched).

  1. send cost: the wall time (spawn to exit, pipes closed) of `thrum send "..." --to @bob
     -q` as alice, in four modes:
       A. bob has no tmux pane (`thrum tmux kill --name bob` before the block): baseline;
       B. bob has a live pane (the nudge is queued and a spawned nudger types it);
       C. tmux missing: the sender's PATH is a directory holding only python3, git, env
          and sh (`thrum doctor` there must still find git);
       D. a hung tmux: a fake `tmux` first on the sender's PATH notes its call and sleeps
          60 s (thrum bounds each tmux call at 3 s; the nudging is in a spawned process, so
          the send must not wait even that).
     40 runs per mode (10 with --quick) in blocks of 5, one untimed warm-up send per block,
     in the order ABCD DCBA ABCD ... (balanced, as ABBA). Between blocks, untimed: B's
     nudger finishes (its one line is counted); D's nudger is killed by the bench (see 4;
     never in the middle of a hung call). Target: B, C and D median <= 1.10x A's median
     (the +ms is shown too). Also shown: each mode's CPU (user + system) of the send
     process, from the rusage of reaped children, which load on the machine disturbs less
     than the wall time, and its minor page faults (after a fork, every page the sender
     writes until it exits is copied).
  2. nudge latency (B): from the send returning to the nudge line reaching the pane's
     program (its Enter; the text itself is typed 0.2 s earlier), one send at a time with
     no nudger running. Expected ~1.7-2 s: a nudger waits for 1.5 s of quiet on the queue
     to coalesce a burst. Also noted: whether the forked nudger's SQLite WAL index (the
     `index.db-shm` it maps) is a deleted file.
  3. burst: 20 sends in a row to bob's live pane give exactly one nudge line ("20 new
     messages from @alice"); no blank lines (retried Enters) either.
  4. hung tmux (D): every D send exits 0; each hung call is killed within the 3 s bound
     (max lifetime <= 3.5 s), its `sleep` child too, so no fake tmux or sleep process is
     left behind; then one more D send and a window of 12 s (6 s with --quick) to see how
     long its nudger lives and how often it calls the hung tmux. 1 s into the window, a B
     send (a PATH with the real tmux): is its nudge typed while the D nudger holds bob's
     nudge lock?
  5. checks: bob's unread total equals the number of messages sent to him, `thrum doctor`
     finds the index matching the log, and `PRAGMA integrity_check` of index.db is ok.

This script reports; it never fails on a missed target (exit 0), only when the benchmark
itself breaks or a check of section 5 does not hold (exit 1). The tmux server, any
nudger or fake tmux still running, and the temp dir are cleaned up on every exit (a
failure, Ctrl-C, SIGTERM, SIGHUP).
"""

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BenchError, Workspace, make_repo, median, meta,  # noqa: E402
                      report, summary)

SESSION = "w-bob"
RATIO = 1.10
MODES = {"A": "A send, bob has no pane (baseline)",
         "B": "B send, bob has a live pane",
         "C": "C send, tmux missing from PATH",
         "D": "D send, hung tmux first on PATH"}
BOUND = 3.0          # thrum's bound on one tmux call (Tmux.run timeout)
NUDGE_TEXT = "New message from @alice -- run `thrum inbox --unread`"
#: The pane's program: every line it reads from its terminal, stamped, appended to a log.
PANE_PROG = ("import sys, time\n"
             "for line in sys.stdin:\n"
             "    with open(sys.argv[1], 'a') as f:\n"
             "        f.write('%.6f %s' % (time.monotonic(), line))\n")
FAKE_TMUX = """#!/bin/sh
# a hung tmux: note the call (pid, boot-clock time, argv), then never answer
read up _ < /proc/uptime
echo "$$ $up $*" >> {log}
sleep 60
"""


def progress(msg):
    sys.stderr.write("[nudge_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def uptime():
    """The boot clock of /proc/uptime (what the fake tmux stamps its calls with)."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def proc_info(pid):
    """(argv, state, pgid) of a live process, else None (gone or a zombie)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmd = f.read()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return ([a.decode("utf-8", "replace") for a in cmd.split(b"\0")[:-1]], rest[0],
            int(rest[2]))


def alive(pid):
    return proc_info(pid) is not None


class FakeCalls:
    """Follows the fake tmux's log in a thread (a small file and a stat of the calls in
    flight every 20 ms: cheap next to the sends) and records each call's start and end
    on the boot clock."""

    def __init__(self, path):
        self.path = path
        self.calls = {}    # pid -> {"start": s, "end": s or None, "args": str}
        self._pos = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.poll()

    def poll(self):
        with self._lock:
            try:
                size = os.path.getsize(self.path)
            except OSError:
                size = 0
            if size > self._pos:
                with open(self.path, "rb") as f:
                    f.seek(self._pos)
                    data = f.read(size - self._pos)
                keep = data.rfind(b"\n") + 1
                self._pos += keep
                for line in data[:keep].decode("utf-8", "replace").splitlines():
                    pid, start, args = (line.split(" ", 2) + [""])[:3]
                    self.calls[int(pid)] = {"start": float(start), "end": None,
                                            "args": args}
            now = uptime()
            for pid, c in self.calls.items():
                if c["end"] is None and not alive(pid):
                    c["end"] = now

    def in_flight(self):
        self.poll()
        with self._lock:
            return [pid for pid, c in self.calls.items() if c["end"] is None]

    def since(self, t):
        self.poll()
        with self._lock:
            return {pid: dict(c) for pid, c in self.calls.items() if c["start"] >= t}

    def stop(self):
        self._stop.set()
        self._th.join(5)


class Bench:
    def __init__(self, ws, a):
        self.ws = ws
        self.a = a
        self.rows = []
        self.info = {}
        self.failed = []         # section-5 checks that did not hold
        root = ws.root
        self.sock = os.path.join(root, "tmux.sock")
        self.marker = "NUDGE_BENCH_ROOT=" + root
        ws.env.update(THRUM_TMUX_SOCKET=self.sock, TMUX_TMPDIR=root,
                      NUDGE_BENCH_ROOT=root)
        self.env = ws.env
        self.pane_log = os.path.join(root, "pane.log")
        self.fake_log = os.path.join(root, "fake-tmux.log")
        self.tmux_exe = ws.thrum._which("tmux", self.env)
        self.paths = {}
        self.repo = None
        self.pane = False
        self.sent_to_bob = 0
        self.sends = dict.fromkeys(MODES, 0)   # every send, warm-ups too, by mode
        self.last_cpu = 0.0
        self.last_flt = 0
        self.fakes = None
        self.bench_kills = {}    # what the bench itself had to kill, by kind

    # -- processes --------------------------------------------------------------------
    def marked(self):
        """[(pid, argv, pgid)] of the live processes this run started (every command
        gets NUDGE_BENCH_ROOT=<tmp> in its environment, and their children inherit it)."""
        out, me, mark = [], os.getpid(), self.marker.encode()
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                with open("/proc/%s/environ" % d, "rb") as f:
                    if mark not in f.read().split(b"\0"):
                        continue
            except OSError:
                continue
            p = proc_info(int(d))
            if p:
                out.append((int(d), p[0], p[2]))
        return out

    def nudgers(self):
        """Nudgers still running: the processes `thrum send` spawned (`python -c ...
        thrum._nudge_main(...)`), or, from a thrum that forked them, children of `thrum
        send` that kept its argv (only ever called while no send of ours runs)."""
        return [pid for pid, argv, _ in self.marked()
                if any("_nudge_main" in a for a in argv[1:3]) or
                (argv[1:2] == [self.ws.launcher] and "send" in argv[2:3])]

    def fake_procs(self):
        fake = self.paths.get("fake")
        return [(pid, argv) for pid, argv, _ in self.marked()
                if fake in argv or argv[:1] == ["sleep"]]

    def kill(self, pids, kind):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
            self.bench_kills[kind] = self.bench_kills.get(kind, 0) + 1
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_nudgers(self, timeout=20.0):
        """Until no nudger runs (seconds waited); one still running at `timeout` is
        killed and counted."""
        t0 = time.monotonic()
        while True:
            left = self.nudgers()
            if not left:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                progress("%d nudger(s) still running after %.0f s: killed" % (
                    len(left), timeout))
                self.kill(left, "nudgers still running after %.0f s" % timeout)
                return time.monotonic() - t0
            time.sleep(0.05)

    # -- tmux -------------------------------------------------------------------------
    def tmux(self, *args, check=False):
        p = subprocess.run([self.tmux_exe, "-S", self.sock] + list(args), env=self.env,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        if check and p.returncode:
            raise BenchError("tmux %s failed: %s" % (args[0], p.stderr.decode()[-300:]))
        return p

    def pane_on(self):
        if self.pane:
            return
        self.ws.thrum_run(["tmux", "create", SESSION, "--name", "bob", "--role", "r",
                           "--module", "m", "--force", "-q", "--command", sys.executable,
                           "-c", PANE_PROG, self.pane_log], self.repo)
        if self.tmux("has-session", "-t", "=" + SESSION).returncode:
            raise BenchError("tmux create left no session %s" % SESSION)
        self.pane = True

    def pane_off(self):
        if not self.pane:
            return
        self.ws.thrum_run(["tmux", "kill", "--name", "bob", "-q"], self.repo)
        self.pane = False

    def pane_lines(self):
        try:
            with open(self.pane_log, encoding="utf-8", errors="replace") as f:
                return f.read().splitlines()
        except OSError:
            return []

    # -- set-up -----------------------------------------------------------------------
    def setup(self):
        ws, env, root = self.ws, self.env, self.ws.root
        if self.tmux_exe is None:
            raise BenchError("tmux is not on PATH")
        v = subprocess.run([self.tmux_exe, "-V"], capture_output=True, text=True).stdout
        self.info["tmux"] = "%s (%s)" % (v.strip(), self.tmux_exe)
        git = shutil.which("git", path=env.get("PATH"))
        if git is None:
            raise BenchError("git is not on PATH")
        # C: a PATH with only what thrum needs
        nobin = os.path.join(root, "bin-no-tmux")
        os.makedirs(nobin)
        for prog, target in (("python3", sys.executable), ("git", git),
                             ("env", shutil.which("env", path=env.get("PATH"))),
                             ("sh", shutil.which("sh", path=env.get("PATH")))):
            if target:
                os.symlink(target, os.path.join(nobin, prog))
        # D: a hung tmux first on PATH
        fakebin = os.path.join(root, "bin-hung-tmux")
        os.makedirs(fakebin)
        fake = os.path.join(fakebin, "tmux")
        with open(fake, "w") as f:
            f.write(FAKE_TMUX.format(log=shlex.quote(self.fake_log)))
        os.chmod(fake, 0o755)
        self.paths = {"A": None, "B": None, "C": nobin,
                      "D": fakebin + os.pathsep + env["PATH"], "fake": fake}
        which = ws.thrum._which
        if which("tmux", dict(env, PATH=nobin)) is not None or \
                which("git", dict(env, PATH=nobin)) is None:
            raise BenchError("the C PATH (%s) must hold git and no tmux" % nobin)
        if which("tmux", dict(env, PATH=self.paths["D"])) != fake:
            raise BenchError("the D PATH does not find the fake tmux first")
        self.repo = make_repo(os.path.join(root, "repo"), env)
        ws.thrum_run(["init"], self.repo)
        ws.thrum_run(["quickstart", "--name", "alice", "--role", "implementer",
                      "--module", "bench"], self.repo, name="alice")
        _, p = ws.thrum_run(["doctor", "--json"], self.repo, check=False,
                            extra_env={"PATH": nobin})
        doc = json.loads(p.stdout or b"{}")
        if not doc.get("ok"):
            raise BenchError("thrum doctor with the C PATH (no tmux) is not ok: %s"
                             % p.stdout.decode()[-800:])
        self.info["C PATH"] = "%s: %s; `thrum doctor` finds git there" % (
            nobin, " ".join(sorted(os.listdir(nobin))))
        self.pane_on()
        self.fakes = FakeCalls(self.fake_log)

    # -- sends ------------------------------------------------------------------------
    def send(self, mode, text="x"):
        """One send as alice: its wall time (s); its CPU (user + system, s, from the
        rusage of reaped children: the forked nudger is not among them) and its minor
        page faults (a fork makes the sender copy every page it writes afterwards) are
        kept in self.last_cpu and self.last_flt."""
        path = self.paths[mode]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        dt, _ = self.ws.thrum_run(["send", text, "--to", "@bob", "-q"], self.repo,
                                  name="alice", extra_env={"PATH": path} if path else None)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.last_cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        self.last_flt = r1.ru_minflt - r0.ru_minflt
        self.sent_to_bob += 1
        self.sends[mode] += 1
        return dt

    def after_d(self, t_block, lifetimes, wait_call=True, timeout=10.0):
        """After D sends: kill the nudger, never in the middle of a hung call (that call
        is left to thrum's bound, and its lifetime recorded), then look for fake tmux or
        sleep processes left behind. wait_call: first wait for a call that started since
        `t_block` to be reaped by thrum."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = any(c["end"] for c in self.fakes.since(t_block).values())
            if not self.fakes.in_flight() and (ended or not wait_call):
                break
            time.sleep(0.02)
        self.kill(self.nudgers(), "D nudgers (retrying the hung tmux)")
        time.sleep(0.1)
        self.fakes.poll()
        calls = self.fakes.since(t_block)
        for c in calls.values():
            if c["end"] is not None:
                lifetimes.append(c["end"] - c["start"])
        left = self.fake_procs()
        if left:
            progress("left behind after the D nudger: %s" % left)
            self.kill([p for p, _ in left], "fake tmux/sleep processes left behind")
        return len(calls), len(left)

    def sec_send(self, runs, block):
        samples = {m: [] for m in MODES}
        cpu = {m: [] for m in MODES}
        flt = {m: [] for m in MODES}
        order, rounds = [], -(-runs // block)
        for i in range(rounds):
            order += list("ABCD" if i % 2 == 0 else "DCBA")
        left = dict.fromkeys(MODES, runs)
        b_lines, d_calls, d_left, lifetimes, waits = [], 0, 0, [], {"B": [], "D": []}
        for mode in order:
            k = min(block, left[mode])
            if not k:
                continue
            left[mode] -= k
            if mode == "A":
                self.pane_off()
            else:
                self.pane_on()
            n0 = len(self.pane_lines())
            t_block = uptime()
            self.send(mode, "warm-up")
            for _ in range(k):
                samples[mode].append(self.send(mode))
                cpu[mode].append(self.last_cpu)
                flt[mode].append(self.last_flt)
            t0 = time.monotonic()
            if mode == "D":
                n, lft = self.after_d(t_block, lifetimes, wait_call=False)
                d_calls += n
                d_left += lft
                waits["D"].append(time.monotonic() - t0)
            self.wait_nudgers()
            if mode == "B":
                waits["B"].append(time.monotonic() - t0)
                time.sleep(0.1)
                b_lines.append(len(self.pane_lines()) - n0)
            elif len(self.pane_lines()) != n0:
                raise BenchError("mode %s typed %d line(s) into bob's pane"
                                 % (mode, len(self.pane_lines()) - n0))
            progress("send %s: %d runs, median %.1f ms" % (
                mode, k, median(samples[mode][-k:]) * 1000))
        base = median(samples["A"])
        for mode, name in MODES.items():
            s = summary(samples[mode])
            row = dict(section=1, name=name, target="baseline", **s)
            if mode != "A":
                ratio = s["median_ms"] / 1000 / base
                row.update(ratio=ratio, delta_ms=s["median_ms"] - base * 1000,
                           target="<= %.2fx A" % RATIO, limit=RATIO,
                           status="PASS" if ratio <= RATIO else "MISS")
            self.rows.append(row)
        cbase = median(cpu["A"])
        for mode in MODES:
            c = summary(cpu[mode])
            row = dict(section=1, name="(info) %s CPU of the send (user+sys)" % mode,
                       minflt_median=median(flt[mode]), **c)
            if mode != "A":
                row.update(ratio=c["median_ms"] / 1000 / cbase,
                           delta_ms=c["median_ms"] - cbase * 1000)
            self.rows.append(row)
        self.info["1 send"] = {
            "order": "".join(order), "block": block, "warm-up": "1 send per block",
            "p90_ms": " ".join("%s %.1f" % (m, summary(samples[m])["p90_ms"])
                               for m in MODES),
            "minor page faults per send (median)": " ".join(
                "%s %d" % (m, median(flt[m])) for m in MODES),
            "B nudge lines per block": " ".join(map(str, b_lines)) + " (expected 1 each)",
            "B nudger done after the block (s)": " ".join("%.1f" % w for w in waits["B"]),
            "D hung calls": d_calls,
            "D nudger killed after the block (s)": " ".join(
                "%.1f" % w for w in waits["D"])}
        return lifetimes, d_left

    # -- 2. latency -----------------------------------------------------------------------
    def shm_of(self, pids):
        """'deleted', 'live' or None: the index.db-shm that these nudgers map."""
        seen = None
        for pid in pids:
            try:
                with open("/proc/%d/maps" % pid) as f:
                    maps = [ln for ln in f if "index.db-shm" in ln]
            except OSError:
                continue
            if maps:
                seen = "deleted" if any(ln.rstrip().endswith("(deleted)")
                                        for ln in maps) else seen or "live"
        return seen

    def wait_line(self, n0, timeout=15.0, watch_shm=False):
        """(monotonic stamp, text) of the first line after the first n0, or None; and
        what index.db-shm the running nudger maps when that line arrives."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.pane_lines()
            if len(lines) > n0:
                shm = self.shm_of(self.nudgers()) if watch_shm else None
                stamp, _, text = lines[n0].partition(" ")
                return float(stamp), text, shm
            time.sleep(0.005)
        return None, None, None

    def sec_latency(self, trials):
        self.pane_on()
        lat, texts, shms = [], set(), []
        for _ in range(trials):
            self.wait_nudgers()
            n0 = len(self.pane_lines())
            self.send("B", "latency")
            t1 = time.monotonic()
            stamp, text, shm = self.wait_line(n0, watch_shm=True)
            if stamp is None:
                raise BenchError("no nudge line in bob's pane 15 s after the send")
            lat.append(stamp - t1)
            texts.add(text)
            shms.append(shm or "not mapped")
        self.wait_nudgers()
        s = summary(lat)
        ok = 1500 <= s["median_ms"] <= 2500
        self.rows.append(dict(section=2, name="B nudge latency: send returns -> line "
                              "in pane", target="1500-2500 ms (expected ~1.7-2 s)",
                              status="PASS" if ok else "MISS", **s))
        deleted = shms.count("deleted")
        self.rows.append(dict(section=2, name="(info) nudger maps a deleted index.db-shm "
                              "in %d of %d trials" % (deleted, trials), n=trials))
        self.info["2 latency"] = {
            "lines": " | ".join(sorted(texts)),
            "expected": NUDGE_TEXT,
            "each_ms": " ".join("%.0f" % (x * 1000) for x in lat),
            "nudger's index.db-shm": " ".join(shms)}
        if texts != {NUDGE_TEXT}:
            self.failed.append("nudge line %r, expected %r" % (sorted(texts), NUDGE_TEXT))

    # -- 3. burst -------------------------------------------------------------------------
    def sec_burst(self, n=20):
        self.pane_on()
        self.wait_nudgers()
        n0 = len(self.pane_lines())
        dts = [self.send("B", "burst %d" % i) for i in range(n)]
        t1 = time.monotonic()
        stamp, text, _ = self.wait_line(n0, timeout=30.0)
        self.wait_nudgers(timeout=30.0)
        time.sleep(0.3)
        new = self.pane_lines()[n0:]
        want = "%d new messages from @alice -- run `thrum inbox --unread`" % n
        ok = len(new) == 1 and new[0].partition(" ")[2] == want
        self.rows.append(dict(section=3, name="burst of %d sends -> %d nudge line%s"
                              % (n, len(new), "" if len(new) == 1 else "s"), n=n,
                              target="exactly 1 line", status="PASS" if ok else "MISS"))
        self.info["3 burst"] = {
            "lines": " | ".join(ln.partition(" ")[2] or "(blank)" for ln in new),
            "last send returns -> line_ms": "-" if stamp is None else
            "%.0f" % ((stamp - t1) * 1000),
            "send median_ms": "%.1f" % (median(dts) * 1000)}

    # -- 4. a hung tmux -------------------------------------------------------------------
    def sec_hung(self, lifetimes, left, window):
        self.pane_on()
        self.wait_nudgers()
        t_start = uptime()
        self.send("D", "hung")
        t_sent = time.monotonic()
        time.sleep(0.3)
        pids = self.nudgers()
        # A sender whose PATH has the real tmux, while that nudger holds bob's lock.
        time.sleep(max(0.0, t_sent + 1.0 - time.monotonic()))
        n0 = len(self.pane_lines())
        self.send("B", "while the hung nudger runs")
        t_end = t_sent + window
        while time.monotonic() < t_end:
            time.sleep(0.1)
        still = [p for p in pids if alive(p)]
        b_lines = len(self.pane_lines()) - n0
        calls = self.fakes.since(t_start)
        starts = sorted(c["start"] for c in calls.values())
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        n_calls, lft = self.after_d(t_start, lifetimes)
        left += lft
        life = max(lifetimes) if lifetimes else None
        self.rows.append(dict(section=4, name="D each hung tmux call is killed (max "
                              "lifetime)", n=len(lifetimes),
                              median_ms=None if life is None else life * 1000,
                              target="<= %.0f ms (%.0f s bound)" % ((BOUND + 0.5) * 1000,
                                                                    BOUND),
                              status="MISS" if life is None or life > BOUND + 0.5
                              else "PASS"))
        self.rows.append(dict(section=4, name="D fake tmux/sleep processes left behind: %d"
                              % left, target="none",
                              status="PASS" if left == 0 else "MISS"))
        self.rows.append(dict(section=4, name="(info) D nudger %s %.0f s after its send, "
                              "%d hung calls" % ("still running" if still else "gone",
                                                 window, len(calls)), n=len(calls)))
        self.rows.append(dict(section=4, name="(info) a B send 1 s into it: %d nudge "
                              "line%s in %.0f s" % (b_lines, "" if b_lines == 1 else "s",
                                                   window - 1), n=1))
        self.info["4 hung tmux"] = {
            "D sends": "%d, all exited 0" % self.sends["D"],
            "call lifetimes_s": " ".join("%.2f" % x for x in lifetimes),
            "calls in the window": len(calls),
            "every_s": " ".join("%.2f" % g for g in gaps) or "-",
            "first hung call, s after the D send (the B send restarts the settle)":
            "-" if not starts else "%.2f" % (starts[0] - t_start),
            "nudger at the end of the window": "running (killed by the bench)" if still
            else "exited by itself",
            "args": (next(iter(calls.values()))["args"] if calls else "-")}

    # -- 5. checks --------------------------------------------------------------------------
    def sec_checks(self):
        _, p = self.ws.thrum_run(["inbox", "--unread", "--json", "--limit", "1"], self.repo,
                                 name="bob")
        total = json.loads(p.stdout)["total"]
        ok = total == self.sent_to_bob
        self.rows.append(dict(section=5, name="bob's unread total %d of %d sent"
                              % (total, self.sent_to_bob), target="all",
                              status="PASS" if ok else "FAIL"))
        if not ok:
            self.failed.append("bob has %d unread messages, %d were sent to him"
                               % (total, self.sent_to_bob))
        _, p = self.ws.thrum_run(["doctor", "--json"], self.repo, check=False)
        doc = json.loads(p.stdout or b"{}")
        idx = [c for c in doc.get("checks", []) if c.get("name") == "index"]
        ok = bool(idx) and idx[0].get("ok")
        self.rows.append(dict(section=5, name="doctor: index %s" % (
            idx[0].get("detail") if idx else "not checked"), target="ok",
            status="PASS" if ok else "FAIL"))
        if not ok:
            self.failed.append("thrum doctor: %s" % p.stdout.decode()[-500:])
        db = sqlite3.connect("file:%s?mode=ro" % os.path.join(self.repo, ".thrum", "var",
                                                               "index.db"), uri=True)
        try:
            res = [r[0] for r in db.execute("PRAGMA integrity_check")]
        finally:
            db.close()
        ok = res == ["ok"]
        self.rows.append(dict(section=5, name="index.db integrity_check: %s"
                              % " ".join(res)[:60], target="ok",
                              status="PASS" if ok else "FAIL"))
        if not ok:
            self.failed.append("integrity_check: %s" % res[:5])
        self.info["5 nudge.log"] = self.nudge_log()

    def nudge_log(self):
        path = os.path.join(self.repo, ".thrum", "var", "nudge", "nudge.log")
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            return "none"
        return "%d line(s); last: %s" % (len(lines), lines[-1] if lines else "-")

    # -- clean-up ---------------------------------------------------------------------------
    def cleanup(self):
        """Stop the tmux server and every process this run started that is still there
        (by pid, found by the marker in their environment)."""
        if self.fakes:
            self.fakes.stop()
        if self.tmux_exe:
            try:
                self.tmux("kill-server")
            except (OSError, subprocess.SubprocessError):
                pass
        deadline = time.monotonic() + 5
        left = self.marked()
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = self.marked()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, argv, _ in left:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            if left:
                time.sleep(0.5)
                left = self.marked()
        if left:
            sys.stderr.write("nudge_bench: processes that would not end: %s\n" % left)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # run the finally blocks: tmux server, temp dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="timed sends per mode (default 40; 10 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer runs (smoke test, ~1 min)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    a = ap.parse_args(argv)
    runs = a.runs or (10 if a.quick else 40)
    if runs < 2:
        ap.error("--runs must be >= 2")
    block = 5
    trials = 3 if a.quick else 6
    window = 6.0 if a.quick else 12.0
    if not os.path.isdir("/proc/self"):
        sys.stderr.write("nudge_bench: needs /proc (Linux)\n")
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    t_start = time.monotonic()
    load0 = os.getloadavg()
    try:
        with Workspace("thrum-bench-nudge-", keep=a.keep) as ws:
            b = Bench(ws, a)
            progress("temp dir %s, thrum.py sha256 %s, %d runs per mode%s"
                     % (ws.root, ws.thrum_sha256[:12], runs, ", quick" if a.quick else ""))
            try:
                b.setup()
                progress("store ready, bob's pane is up")
                lifetimes, left = b.sec_send(runs, block)
                b.sec_latency(trials)
                progress("latency measured")
                b.sec_burst()
                progress("burst checked")
                b.sec_hung(lifetimes, left, window)
                progress("hung tmux checked")
                b.sec_checks()
            finally:
                b.cleanup()
            if b.bench_kills:
                b.info["killed by the bench"] = b.bench_kills
            m = meta(ws, runs=runs, quick=a.quick, block=block,
                     elapsed_s=round(time.monotonic() - t_start, 1),
                     loadavg_1m_start_end=[round(load0[0], 2),
                                           round(os.getloadavg()[0], 2)])
            m["details"] = b.info
    except BenchError as e:
        sys.stderr.write("nudge_bench: benchmark failed: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("nudge_bench: interrupted\n")
        return 130
    report("nudge_bench", "thrum tmux nudges: what they cost the send", m, b.rows, b.info,
           a.json)
    if not a.json:
        print("  load (1 min): %.1f -> %.1f on %s cpus" % (
            m["loadavg_1m_start_end"][0], m["loadavg_1m_start_end"][1], m["cpus"]))
    if b.failed:
        sys.stderr.write("nudge_bench: checks failed: %s\n" % "; ".join(b.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
