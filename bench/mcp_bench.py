#!/usr/bin/env python3
"""The MCP server (`thrum mcp serve`): tool-call latency, start-up, memory, wait wake-up.

    python3 bench/mcp_bench.py [--runs N] [--calls N] [--quick] [--json] [--keep]
                               [--only 1,2,...]

The benchmark is the MCP client: it starts `thrum mcp serve` as bob through the installed
launcher (built by benchlib from a snapshot of thrum.py), with the small environment an MCP
client passes (HOME, PATH, LOGNAME, SHELL, TERM, USER and THRUM_NAME), and speaks
newline-delimited JSON-RPC 2.0 over its stdin and stdout. A reader thread stamps every frame
with time.monotonic() as it arrives; replies are matched by id, notifications kept apart.
The daemon is started and stopped with `thrum daemon start|stop`. Sections 1, 3 and 4 share
one store of 10,000 messages (alice -> bob, written with benchlib.write_messages):

  1. tools/call round trip, client-side (write the request -> its reply frame arrives), of
     `send_message` (bob -> alice) and `check_messages {}` (bob's 10 newest of 10,000
     unread), in a running server, with a daemon and without, in ABBA blocks (a fresh
     server per block, one untimed first call and 5 warm-up calls of each tool, then the
     two tools alternated). Target for each tool and mode: p50 <= 5 ms, p95 <= 20 ms
     (nearest rank). Peer figure, for context only: mcp-agent-mail takes about 140 ms per
     send over HTTP on this machine.
  2. Start-up: spawn the process, write `initialize`, read the reply; median <= 150 ms for
     the installed launcher. Also shown, in the same rounds (order rotated): `python3
     thrum.py mcp serve` (the script is compiled on every start; expected slower, info)
     and a `python3 -c` baseline that reads one line and answers. No daemon.
  3. VmRSS and VmHWM (/proc/<pid>/status) of the server after each section-1 block (its
     traffic; without section 1, one such block per mode): <= 30 MiB.
  4. `wait_for_message` wake-up vs the CLI `thrum wait`, in the same mode, with a daemon
     and without (ABBA blocks of 5, MCP and CLI trials alternated, one warm-up of each per
     block). MCP: a tools/call `wait_for_message {"timeout": 30}` to the block's running
     server; CLI: a background `thrum wait --timeout 30s` as bob (daemon_bench section 1's
     trial). Both get 0.5 s to block (with a daemon, also until the daemon reports the wait
     as blocked); then `thrum send` as alice; latency from the send *returning* to the
     reply frame arriving (MCP) / the waiter exiting (CLI). Every wait must report its own
     fresh message. Target: MCP median <= CLI median in each mode (their
     difference <= 0 ms: a ratio would mislead, as a median can be negative).

This script reports; it never fails on a missed target (exit 0), only when the benchmark
itself breaks (exit 1). MCP servers, CLI waiters, daemons and the temp dir are cleaned up
on every exit (a failure, Ctrl-C, SIGTERM, SIGHUP).
"""

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon_bench as db  # noqa: E402
from benchlib import BenchError, Workspace, median, meta  # noqa: E402
from daemon_bench import (abba, lat_stats, pctl, proc_mem, rss_parts,  # noqa: E402
                          _terminate)

SECTIONS = {1: "tools/call latency", 2: "start-up to first response", 3: "server memory",
            4: "wait_for_message wake-up vs thrum wait"}
#: What an MCP client passes from its own environment (the MCP SDKs' default list).
CLIENT_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER")
PROTOCOL = "2025-11-25"
#: The baseline for section 2: an interpreter that reads one request and answers it.
BASELINE = ("import json, sys\n"
            "m = json.loads(sys.stdin.readline())\n"
            "sys.stdout.write(json.dumps({'jsonrpc': '2.0', 'id': m['id'], "
            "'result': {}}) + '\\n')\n"
            "sys.stdout.flush()\n")
SEND_ARGS = {"to": "alice", "content": "bench: a short status update"}
WARM_CALLS = 5


def progress(msg):
    sys.stderr.write("[mcp_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# daemon_bench's Bench and report are reused as they are: point their progress lines and
# section titles at this script.
db.progress = progress
db.SECTIONS = SECTIONS


class McpClient:
    """One server process (or the baseline) and the client end of its pipes. A thread
    reads stdout line by line and stamps each frame with time.monotonic() on arrival;
    replies (frames with an id and a result or error) are matched by id."""

    def __init__(self, argv, cwd, env, err_path):
        self.err_path = err_path
        self._cv = threading.Condition()
        self._replies = {}    # id -> (arrival, frame)
        self.notes = []       # (arrival, frame): notifications and anything else
        self.bad = []         # lines that are not JSON
        self._next = 0
        self.t_eof = self.t_exit = None
        with open(err_path, "wb") as err:
            self.t_spawn = time.monotonic()
            self.proc = subprocess.Popen([str(x) for x in argv], cwd=cwd, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        self._th = threading.Thread(target=self._read, daemon=True)
        self._th.start()

    @property
    def pid(self):
        return self.proc.pid

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            t = time.monotonic()
            try:
                msg = json.loads(line)
            except ValueError:
                self.bad.append(line[:200])
                continue
            with self._cv:
                if isinstance(msg, dict) and "id" in msg and ("result" in msg or
                                                              "error" in msg):
                    self._replies[json.dumps(msg["id"])] = (t, msg)
                else:
                    self.notes.append((t, msg))
                self._cv.notify_all()
        self.t_eof = time.monotonic()
        self.proc.wait()
        with self._cv:
            self.t_exit = time.monotonic()
            self._cv.notify_all()

    def alive(self):
        return self.t_exit is None

    def stderr_tail(self, n=1500):
        try:
            with open(self.err_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _write(self, msg):
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise BenchError("cannot write to the MCP server (pid %d): %s; stderr: %s"
                             % (self.pid, e, self.stderr_tail()))

    def request(self, method, params):
        """Send a request; returns (id, the monotonic time just before the write)."""
        self._next += 1
        rid = self._next
        t0 = time.monotonic()
        self._write({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return rid, t0

    def notify(self, method, params=None):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self._write(msg)

    def has_reply(self, rid):
        return json.dumps(rid) in self._replies

    def reply(self, rid, timeout=30.0):
        """(arrival time, frame) of the reply to `rid`."""
        key = json.dumps(rid)
        deadline = time.monotonic() + timeout
        with self._cv:
            while key not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.t_exit is not None:
                    break
                self._cv.wait(left)
            got = self._replies.pop(key, None)
        if got is None:
            raise BenchError("no reply to request %s from the MCP server (pid %d, %s); "
                             "stderr: %s" % (rid, self.pid, "exited %s" % self.proc.returncode
                                             if self.t_exit else "running",
                                             self.stderr_tail()))
        return got

    def call(self, method, params, timeout=30.0):
        """(round trip in seconds, result) of one request; an error reply is a failure."""
        rid, t0 = self.request(method, params)
        t, msg = self.reply(rid, timeout)
        if "error" in msg:
            raise BenchError("%s failed: %r" % (method, msg["error"]))
        return t - t0, msg["result"]

    def tool(self, name, args, timeout=30.0):
        dt, res = self.call("tools/call", {"name": name, "arguments": args}, timeout)
        if res.get("isError") or not isinstance(res.get("structuredContent"), dict):
            raise BenchError("tool %s returned an error: %s" % (name, json.dumps(res)[:800]))
        return dt, res["structuredContent"]

    def handshake(self):
        dt, res = self.call("initialize", {"protocolVersion": PROTOCOL, "capabilities": {},
                                           "clientInfo": {"name": "mcp_bench",
                                                          "version": "1"}})
        if res.get("protocolVersion") != PROTOCOL:
            raise BenchError("initialize answered %r" % (res,))
        self.notify("notifications/initialized")
        return dt

    def close(self, timeout=10.0):
        """Close stdin (how a client ends the server) and wait for the exit. Returns the
        seconds from the close to the exit; kills the process if it outlives `timeout`."""
        t0 = time.monotonic()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self._th.join(timeout)
        if self.t_exit is None:
            self.kill()
            raise BenchError("the MCP server (pid %d) did not exit within %.0f s of its "
                             "stdin closing" % (self.pid, timeout))
        return self.t_exit - t0

    def kill(self):
        if self.t_exit is None:
            try:
                self.proc.kill()
            except OSError:
                pass
            self._th.join(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except (OSError, ValueError):
                pass


class _PendingWait:
    """A wait_for_message in flight, shaped like daemon_bench's Waiter for wait_blocked."""

    def __init__(self, srv, rid):
        self.srv, self.rid = srv, rid

    def running(self):
        return self.srv.alive() and not self.srv.has_reply(self.rid)

    def output(self):
        return "MCP server stderr: " + self.srv.stderr_tail()


def threads(pid):
    try:
        return len(os.listdir("/proc/%d/task" % pid))
    except OSError:
        return None


class Bench(db.Bench):
    """daemon_bench's Bench (stores, daemons, CLI waiters, rows) plus MCP servers."""

    def __init__(self, ws, a):
        super().__init__(ws, a)
        self.servers = []
        self.mcp_fallbacks = 0
        self.mem = {"daemon": [], "direct": []}  # section 3: after each section-1 block

    def mcp_env(self, name):
        env = {k: self.ws.env[k] for k in CLIENT_ENV if k in self.ws.env}
        env["THRUM_NAME"] = name
        return env

    def spawn(self, argv, repo, name="bob"):
        srv = McpClient(argv, repo, self.mcp_env(name),
                        os.path.join(self.ws.root, "mcp-%d.err" % (len(self.servers) + 1)))
        self.servers.append(srv)
        return srv

    def server(self, repo, name="bob"):
        """A running `thrum mcp serve` (installed launcher) after the handshake."""
        srv = self.spawn(self.ws.cmd("installed") + ["mcp", "serve"], repo, name)
        srv.handshake()
        return srv

    def close_server(self, srv):
        dt = srv.close()
        if srv.proc.returncode != 0:
            raise BenchError("the MCP server exited %s; stderr: %s"
                             % (srv.proc.returncode, srv.stderr_tail()))
        if srv.bad:
            raise BenchError("the MCP server wrote lines that are not JSON: %r" % srv.bad[:3])
        return dt

    def cleanup(self):
        for srv in self.servers:
            srv.kill()
        super().cleanup()

    # -- 1. tools/call latency ----------------------------------------------------------
    def latency_block(self, repo, mode, k, n, lat, first):
        """One server: an untimed first call of each tool, warm-up, then k timed calls
        of each tool, alternated. Appends to lat[(tool, mode)] and first[(tool, mode)];
        records the server's memory for section 3."""
        self.set_mode(repo, mode)
        srv = self.server(repo)
        mem0 = proc_mem(srv.pid)
        tools = (("send_message", SEND_ARGS), ("check_messages", {}))
        for i in range(WARM_CALLS + 1):
            for tool, args in tools:
                dt, _ = srv.tool(tool, args)
                if i == 0:
                    first[(tool, mode)].append(dt)
        for i in range(k):
            for tool, args in (tools if i % 2 == 0 else tools[::-1]):
                dt, r = srv.tool(tool, args)
                if tool == "send_message":
                    ok = str(r.get("message_id", "")).startswith("msg_")
                else:
                    ok = len(r.get("messages", ())) == 10 and r.get("total", 0) >= n
                if not ok:
                    raise BenchError("%s returned %s" % (tool, json.dumps(r)[:500]))
                lat[(tool, mode)].append(dt)
        self.mem[mode].append({"mem": proc_mem(srv.pid), "threads": threads(srv.pid),
                               "start_rss": mem0["VmRSS"], "calls": 2 * (k + WARM_CALLS + 1)})
        self.close_server(srv)

    def sec_latency(self, repo, calls, blocks, n):
        lat = {(t, m): [] for t in ("send_message", "check_messages")
               for m in ("daemon", "direct")}
        first = {key: [] for key in lat}
        for mode, k in abba(calls, -(-calls // blocks)):
            self.latency_block(repo, mode, k, n, lat, first)
            progress("latency: %d calls of each tool, %s" % (k, mode))
        for tool in ("send_message", "check_messages"):
            for mode, label in (("direct", "no daemon"), ("daemon", "daemon")):
                s = lat_stats(lat[(tool, mode)])
                s["p90_ms"] = pctl(lat[(tool, mode)], 0.9) * 1000
                f = median(first[(tool, mode)]) * 1000
                self.row(1, "%s p50, %s" % (tool, label), s["median_ms"], "ms", "<= 5 ms",
                         5.0, s["n"], "p90 %.2f, min %.2f, max %.2f ms; first call after "
                         "start %.1f ms (median of %d)" % (s["p90_ms"], s["min_ms"],
                                                          s["max_ms"], f,
                                                          len(first[(tool, mode)])),
                         stats=s, first_call_median_ms=f)
                self.row(1, "%s p95, %s" % (tool, label), s["p95_ms"], "ms", "<= 20 ms",
                         20.0, s["n"])
        self.info["1 latency"] = {
            "store": "%d messages to bob" % n,
            "order": "ABBA blocks (daemon, direct, direct, daemon, ...) of %d calls of each "
                     "tool, a fresh server per block, 1 first + %d warm-up calls of each "
                     "tool" % (-(-calls // blocks), WARM_CALLS),
            "peer (context, not measured here)": "mcp-agent-mail ~140 ms per send over HTTP"}

    # -- 2. start-up ----------------------------------------------------------------------
    def sec_startup(self, repo, runs):
        self.set_mode(repo, "direct")
        variants = [("installed", self.ws.cmd("installed") + ["mcp", "serve"]),
                    ("script", self.ws.cmd("script") + ["mcp", "serve"]),
                    ("baseline", [sys.executable, "-c", BASELINE])]
        start = {v: [] for v, _ in variants}
        close = {v: [] for v, _ in variants}
        for r in range(runs + 1):  # round 0 warms the page cache, not recorded
            for v, argv in variants[r % 3:] + variants[:r % 3]:
                srv = self.spawn(argv, repo)
                rid, _ = srv.request("initialize", {
                    "protocolVersion": PROTOCOL, "capabilities": {},
                    "clientInfo": {"name": "mcp_bench", "version": "1"}})
                t, msg = srv.reply(rid, 30)
                if "result" not in msg:
                    raise BenchError("%s: initialize failed: %r" % (v, msg))
                dt = self.close_server(srv)
                if r:
                    start[v].append(t - srv.t_spawn)
                    close[v].append(dt)
        base = median(start["baseline"])
        for v, _ in variants:
            s = lat_stats(start[v])
            s["p90_ms"] = pctl(start[v], 0.9) * 1000
            name = {"installed": "start -> initialize reply, installed",
                    "script": "(info) start -> initialize reply, python3 thrum.py",
                    "baseline": "(info) baseline: python3 -c, read a line, answer"}[v]
            lim = (150.0, "<= 150 ms") if v == "installed" else (None, None)
            self.row(2, name, s["median_ms"], "ms", lim[1], lim[0], s["n"],
                     "%.2fx baseline, %+.1f ms; p90 %.1f, min %.1f, max %.1f ms; stdin "
                     "closed -> exit %.1f ms" % (s["median_ms"] / 1000 / base,
                                                 s["median_ms"] - base * 1000, s["p90_ms"],
                                                 s["min_ms"], s["max_ms"],
                                                 median(close[v]) * 1000),
                     stats=s, ratio=s["median_ms"] / 1000 / base,
                     close_to_exit_median_ms=median(close[v]) * 1000)
        self.info["2 start-up"] = {
            "measured": "spawn -> initialize reply arrives (stdin closed afterwards, "
                        "the exit timed apart)",
            "order": "the three variants rotated each round, 1 warm-up round, no daemon",
            "env": "+".join(CLIENT_ENV) + "+THRUM_NAME"}

    # -- 3. memory ------------------------------------------------------------------------
    def sec_memory(self, repo, n):
        if not self.mem["direct"] or not self.mem["daemon"]:  # section 1 did not run
            lat = {(t, m): [] for t in ("send_message", "check_messages")
                   for m in ("daemon", "direct")}
            for mode in ("direct", "daemon"):
                self.latency_block(repo, mode, 100, n, lat, {k: [] for k in lat})
        for mode, label in (("direct", "no daemon"), ("daemon", "daemon")):
            top = max(self.mem[mode], key=lambda x: x["mem"]["VmRSS"])
            hwm = max(x["mem"]["VmHWM"] for x in self.mem[mode])
            det = "%s; %d threads after %d calls; %.1f MiB after initialize" % (
                rss_parts(top["mem"]), top["threads"] or 0, top["calls"], top["start_rss"])
            self.row(3, "server VmRSS after traffic, %s" % label, top["mem"]["VmRSS"],
                     "MiB", "<= 30 MiB", 30.0, len(self.mem[mode]), det, mem_mib=top["mem"],
                     threads=top["threads"])
            self.row(3, "server VmHWM (peak), %s" % label, hwm, "MiB", "<= 30 MiB", 30.0,
                     len(self.mem[mode]))
        self.info["3 memory"] = {"read": "/proc/<pid>/status after each section-1 block, "
                                 "before closing its server; the largest is shown"}

    # -- 4. wake-up -----------------------------------------------------------------------
    def mcp_wake_trial(self, repo, srv, daemon, settle, tries=4):
        for _ in range(tries):
            rid, _ = srv.request("tools/call", {"name": "wait_for_message",
                                                "arguments": {"timeout": 30}})
            time.sleep(settle)
            pending = _PendingWait(srv, rid)
            if not pending.running():
                t, msg = srv.reply(rid, 1)
                raise BenchError("wait_for_message answered before the send: %s"
                                 % json.dumps(msg)[:500])
            if not daemon or self.wait_blocked(repo, pending):
                break
            # The server's wait is not blocked in the daemon (it polls by itself): cancel
            # it (no reply is sent for a cancelled call) and start again.
            srv.notify("notifications/cancelled", {"requestId": rid,
                                                   "reason": "not blocked in the daemon"})
            self.mcp_fallbacks += 1
            progress("an MCP wait did not reach the daemon; starting it again")
            time.sleep(0.2)
        else:
            raise BenchError("%d MCP waits in a row did not reach the daemon" % tries)
        t0 = time.monotonic()
        mid = self.send(repo, "alice", "wake", "bob")
        t1 = time.monotonic()
        t, msg = srv.reply(rid, 35)
        res = msg.get("result") or {}
        sc = res.get("structuredContent") or {}
        ids = [m.get("message_id") for m in sc.get("messages", [])]
        if res.get("isError") or sc.get("status") != "received" or mid not in ids:
            raise BenchError("wait_for_message did not report message %s: %s"
                             % (mid, json.dumps(msg)[:800]))
        return t - t1, t - t0, len(ids) - 1

    def sec_wakeup(self, repo, trials, settle=0.5):
        keys = [(c, m) for c in ("mcp", "cli") for m in ("daemon", "direct")]
        lat = {k: [] for k in keys}
        e2e = {k: [] for k in keys}
        extra = 0
        for mode, k in abba(trials, 5):
            self.set_mode(repo, mode)
            daemon = mode == "daemon"
            srv = self.server(repo)
            self.mcp_wake_trial(repo, srv, daemon, settle)  # warm-up, not recorded
            self.wake_trial(repo, daemon, settle)
            for i in range(k):
                for c in (("mcp", "cli") if i % 2 == 0 else ("cli", "mcp")):
                    if c == "mcp":
                        a, b, x = self.mcp_wake_trial(repo, srv, daemon, settle)
                        extra += x
                    else:
                        a, b = self.wake_trial(repo, daemon, settle)
                    lat[(c, mode)].append(a)
                    e2e[(c, mode)].append(b)
            self.close_server(srv)
            progress("wake-up: %d MCP and %d CLI trials, %s" % (k, k, mode))
        det = "p95 %.1f, min %.1f, max %.1f, send start->%s %.1f ms"
        for mode, label in (("direct", "no daemon"), ("daemon", "daemon")):
            s = {}
            for c, what in (("mcp", "reply"), ("cli", "exit")):
                s[c] = lat_stats(lat[(c, mode)])
                s[c]["negative"] = sum(1 for x in lat[(c, mode)] if x < 0)
                s[c]["send_start_median_ms"] = median(e2e[(c, mode)]) * 1000
                name = ("wait_for_message wake-up, %s" if c == "mcp" else
                        "(ref) thrum wait wake-up, %s") % label
                self.row(4, name, s[c]["median_ms"], "ms", n=s[c]["n"],
                         detail=det % (s[c]["p95_ms"], s[c]["min_ms"], s[c]["max_ms"], what,
                                       s[c]["send_start_median_ms"]), stats=s[c])
            # A difference, not a ratio: either median can be negative (the reply or the
            # exit came before the sender's process had finished tearing down).
            self.row(4, "MCP - CLI wake-up median, %s" % label,
                     s["mcp"]["median_ms"] - s["cli"]["median_ms"], "ms",
                     "<= 0 ms (MCP no slower)", 0.0, s["mcp"]["n"],
                     "MCP %.1f vs CLI %.1f ms; from the send's start: %.1f vs %.1f ms"
                     % (s["mcp"]["median_ms"], s["cli"]["median_ms"],
                        s["mcp"]["send_start_median_ms"], s["cli"]["send_start_median_ms"]),
                     mcp_median_ms=s["mcp"]["median_ms"], cli_median_ms=s["cli"]["median_ms"])
        self.info["4 wake-up"] = {
            "settle_s": settle, "order": "ABBA blocks of 5 (daemon, direct, direct, daemon, "
            "...), MCP and CLI alternated, one warm-up of each per block; one server per "
            "block", "negative samples (reply/exit before the send returned)": ", ".join(
                "%s %s %d" % (c, m, sum(1 for x in lat[(c, m)] if x < 0)) for c, m in keys),
            "MCP replies with other messages too": extra}


def print_report(m, rows, info):
    buf = io.StringIO()
    db.print_report(m, rows, info, buf)
    sys.stdout.write(buf.getvalue().replace("thrum daemon (", "thrum mcp serve (", 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="start-up rounds (section 2) and wake-up trials per client and "
                         "mode (section 4) (default 20; 10 with --quick)")
    ap.add_argument("--calls", type=int, default=None,
                    help="timed calls of each tool per mode in section 1 (default 400 in 4 "
                         "blocks per mode; 100 in 2 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer runs and calls (smoke test, under a minute)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    ap.add_argument("--only", default="1,2,3,4", help="sections to run, e.g. 1,3")
    a = ap.parse_args(argv)
    q = a.quick
    runs = a.runs or (10 if q else 20)
    calls = a.calls or (100 if q else 400)
    blocks = 2 if q else 4
    if runs < 2 or calls < 2:
        ap.error("--runs and --calls must be >= 2")
    try:
        only = {int(x) for x in a.only.split(",") if x.strip()}
    except ValueError:
        ap.error("--only takes section numbers, e.g. 1,3")
    if not only or not only <= set(SECTIONS):
        ap.error("--only takes section numbers 1-4")
    if not os.path.isdir("/proc/self"):
        sys.stderr.write("mcp_bench: needs /proc (Linux)\n")
        return 1
    store_n = 10000
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    t_start = time.monotonic()
    load0 = os.getloadavg()
    try:
        with Workspace("thrum-bench-mcp-", keep=a.keep) as ws:
            b = Bench(ws, a)
            progress("temp dir %s, thrum.py sha256 %s, %d runs, %d calls%s"
                     % (ws.root, ws.thrum_sha256[:12], runs, calls, ", quick" if q else ""))
            try:
                repo = b.make_store("store-%d" % store_n, store_n)
                progress("store %d ready" % store_n)
                if 1 in only:
                    b.sec_latency(repo, calls, blocks, store_n)
                if 2 in only:
                    b.sec_startup(repo, runs)
                    progress("start-up measured")
                if 3 in only:
                    b.sec_memory(repo, store_n)
                if 4 in only:
                    b.sec_wakeup(repo, runs)
                b.set_mode(repo, "direct")
            finally:
                b.cleanup()
            m = meta(ws, runs=runs, calls=calls, quick=q, sections=sorted(only),
                     elapsed_s=round(time.monotonic() - t_start, 1),
                     loadavg_1m_start_end=[round(load0[0], 2), round(os.getloadavg()[0], 2)])
            if b.fallbacks or b.mcp_fallbacks:
                b.info["waits that did not reach the daemon (retried)"] = {
                    "CLI": sum(b.fallbacks.values()), "MCP": b.mcp_fallbacks}
            m["details"] = b.info
    except BenchError as e:
        sys.stderr.write("mcp_bench: benchmark failed: %s\n" % e)
        return 1
    if a.json:
        json.dump({"benchmark": "mcp_bench", "meta": m, "results": b.rows}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
    else:
        print_report(m, b.rows, b.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
