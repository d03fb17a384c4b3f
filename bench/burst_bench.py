#!/usr/bin/env python3
"""Bounded resources under a burst: the MCP server and the daemon (SPEC §9, §11, §19).

    python3 bench/burst_bench.py [--requests N] [--settle S] [--quick] [--json] [--keep]

Each long-lived part gets a burst and is then left alone; its descriptors (/proc/PID/fd)
and resident memory (VmRSS) a while later are compared with a baseline taken before the
burst, after a warm-up of the same requests (so the baseline holds what a part keeps on
purpose: its worker threads and their SQLite connections). Target (SPEC §19): a minute
after a 3,000-request burst, both within 10% of the baseline (<= 1.10x).

  1. `thrum mcp serve` (bob, no daemon): N `tools/call check_messages` written at once on
     its stdin; every request must get an answer (a result or an error reply: "replies").
  2. The same server with a daemon running (each of its workers reaches the daemon over its
     own kept connection).
  3. The same, with the server's descriptors limited (`ulimit -n 1024`): the attack pass
     saw requests with no reply at all there.
  4. The daemon (sync.interval 5 s, so its background loops have run a few times before
     the baseline): N requests (`inbox --unread` for bob) from 200 concurrent clients, each
     a fresh connection (what N short CLI commands do). A client the daemon cannot take in
     time works without it (the CLI's silent fallback): "answered" counts the daemon's.

This script reports; it never fails on a missed target (exit 0), only when the benchmark
itself breaks (exit 1). Servers, daemons and the temp dir are cleaned up on every exit.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import BenchError, Workspace, make_repo, meta, report  # noqa: E402

TARGET = 1.10
CLIENT_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER")


def progress(msg):
    sys.stderr.write("[burst_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def usage(pid):
    """(descriptors, VmRSS KiB, threads) of a process."""
    fds = len(os.listdir("/proc/%d/fd" % pid))
    with open("/proc/%d/status" % pid) as f:
        status = dict(ln.split(":", 1) for ln in f if ":" in ln)
    return fds, int(status["VmRSS"].split()[0]), int(status["Threads"].strip())


class McpServer:
    def __init__(self, ws, repo, nofile=None):
        env = {k: ws.env[k] for k in CLIENT_ENV if k in ws.env}
        env["THRUM_NAME"] = "bob"

        def limit():
            if nofile:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.p = subprocess.Popen(ws.cmd("installed") + ["mcp", "serve"], cwd=repo,
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, preexec_fn=limit)
        self.replies, self.lock = {}, threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.next_id = 0
        self.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                    "clientInfo": {"name": "burst", "version": "1"}})
        if not self.wait_for(1, 30):
            raise BenchError("the MCP server did not answer initialize")
        self.notify("notifications/initialized")

    def _read(self):
        for line in self.p.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "id" in msg:
                with self.lock:
                    self.replies[msg["id"]] = msg

    def notify(self, method):
        self.p.stdin.write(json.dumps({"jsonrpc": "2.0", "method": method}).encode() + b"\n")
        self.p.stdin.flush()

    def request(self, method, params):
        self.next_id += 1
        self.p.stdin.write(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                       "params": params}).encode() + b"\n")
        self.p.stdin.flush()
        return self.next_id

    def burst(self, n):
        data = b"".join(json.dumps({"jsonrpc": "2.0", "id": self.next_id + i + 1,
                                    "method": "tools/call",
                                    "params": {"name": "check_messages", "arguments": {}}})
                        .encode() + b"\n" for i in range(n))
        self.next_id += n
        self.p.stdin.write(data)
        self.p.stdin.flush()

    def wait_for(self, count, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.replies) >= count:
                    return True
            time.sleep(0.05)
        return False

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def mcp_case(ws, repo, name, n, settle, nofile=None):
    progress("%s: warm-up" % name)
    s = McpServer(ws, repo, nofile)
    try:
        s.burst(100)
        if not s.wait_for(101, 120):
            raise BenchError("%s: the warm-up was not answered" % name)
        time.sleep(2)
        base = usage(s.p.pid)
        progress("%s: burst of %d" % (name, n))
        t0 = time.monotonic()
        peak = base
        s.burst(n)
        total = 101 + n
        deadline = time.monotonic() + 600
        while not s.wait_for(total, 0.5) and time.monotonic() < deadline:
            peak = max(peak, usage(s.p.pid))
        with s.lock:
            got = list(s.replies.values())[101:]
        elapsed = time.monotonic() - t0
        errors = sum(1 for r in got if "error" in r or r.get("result", {}).get("isError"))
        progress("%s: %d replies (%d errors) in %.1fs; settling %ds"
                 % (name, len(got), errors, elapsed, settle))
        time.sleep(settle)
        after = usage(s.p.pid)
        alive = s.p.poll() is None
    finally:
        s.close()
    return rows_for(name, n, base, after, peak, len(got), errors, alive)


def daemon_case(ws, repo, n, settle, clients=200):
    thrum = ws.thrum
    # The background loops (a sync cycle each interval, work contexts) run a few times
    # before the baseline, so it holds what they keep too.
    ws.thrum_run(["config", "set", "sync.interval", "5s"], repo)
    ws.thrum_run(["daemon", "start"], repo)
    try:
        files = thrum.DaemonFiles(os.path.join(repo, ".thrum", "var"), ws.env)
        pid = files.info()["pid"]
        caller = thrum.Caller(repo, dict(ws.env, THRUM_NAME="bob"))
        answered, fell_back, failed = [0], [0], [0]
        lock = threading.Lock()

        def client(k):
            for _ in range(k):
                c = thrum.DaemonClient(files)
                try:
                    c.call("inbox", {"unread": True}, caller)
                    key = answered
                except thrum.DaemonUnavailable:
                    key = fell_back
                except thrum.ThrumError:
                    key = failed
                finally:
                    c.close()
                with lock:
                    key[0] += 1
        progress("daemon: warm-up")
        client(100)
        time.sleep(12)
        base = usage(pid)
        progress("daemon: burst of %d from %d clients" % (n, clients))
        threads = [threading.Thread(target=client, args=(n // clients,))
                   for _ in range(clients)]
        answered[0] = fell_back[0] = failed[0] = 0
        peak = base
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, usage(pid))
            time.sleep(0.2)
        progress("daemon: %d answered, %d fell back, %d failed; settling %ds"
                 % (answered[0], fell_back[0], failed[0], settle))
        time.sleep(settle)
        after = usage(pid)
        alive = files.info()["pid"] == pid
    finally:
        ws.thrum_run(["daemon", "stop"], repo, check=False)
        ws.thrum_run(["config", "set", "sync.interval", "60s"], repo)
    rows = rows_for("daemon", n, base, after, peak, answered[0], failed[0], alive)
    rows[0]["fell_back"] = fell_back[0]
    return rows


def rows_for(name, n, base, after, peak, replies, errors, alive):
    out = []
    for what, i, unit in (("fds", 0, ""), ("RSS", 1, " KiB")):
        ratio = after[i] / base[i]
        out.append({"name": "%s %s after burst" % (name, what), "ratio": ratio,
                    "target": "<= %.2fx" % TARGET,
                    "status": "ok" if ratio <= TARGET and alive else "MISS",
                    "n": n, "baseline": base[i], "after": after[i], "peak": peak[i],
                    "unit": unit.strip() or "count"})
    out[0].update(replies=replies, errors=errors, alive=alive, threads_after=after[2],
                  threads_peak=peak[2])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=None, help="burst size (3000)")
    ap.add_argument("--settle", type=float, default=None, help="seconds to wait (60)")
    ap.add_argument("--quick", action="store_true", help="600 requests, 10 s settle")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    a = ap.parse_args()
    n = a.requests or (600 if a.quick else 3000)
    settle = a.settle if a.settle is not None else (10.0 if a.quick else 60.0)
    t0 = time.monotonic()
    with Workspace(keep=a.keep) as ws:
        repo = os.path.join(ws.root, "repo")
        make_repo(repo, ws.env)
        ws.init_store(repo)
        for i in range(20):
            ws.thrum_run(["send", "burst bench %d" % i, "--to", "bob"], repo, name="alice")
        rows = []
        rows += mcp_case(ws, repo, "mcp", n, settle)
        rows += mcp_case(ws, repo, "mcp, ulimit -n 1024", min(n, 600), settle, nofile=1024)
        rows += daemon_case(ws, repo, n, settle)
        ws.thrum_run(["daemon", "start"], repo)
        try:
            rows += mcp_case(ws, repo, "mcp via daemon", n, settle)
        finally:
            ws.thrum_run(["daemon", "stop"], repo, check=False)
        m = meta(ws, runs=1, elapsed_s=time.monotonic() - t0, requests=n, settle_s=settle)
        info = {r["name"]: {k: r[k] for k in ("baseline", "after", "peak", "replies",
                                               "errors", "fell_back", "alive") if k in r}
                for r in rows}
        report("burst_bench", "Resources after a burst", m, rows, info, a.json)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.stderr.write("burst_bench: %s\n" % e)
        sys.exit(1)
