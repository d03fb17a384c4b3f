#!/usr/bin/env python3
"""Git sync under contention, and the daemons' remote traffic (SPEC §8 "Many clones",
§9, §19).

    python3 bench/contention_bench.py [--clones 10,20] [--rounds N] [--deliveries N]
                                      [--idle S] [--quick] [--json] [--keep] [--only 1,2]

One bare remote on this machine, clones with one agent and one daemon each (default
settings: sync.interval 60s, sync.wait_interval 5s); every command runs through the
installed launcher, and so through the clone's daemon.

  1. N clones (each N of --clones; default 10 and 20, --quick 10):
     - idle: right after the daemons start, before any agent did anything, --idle seconds
       (default 180, --quick 125): remote requests (ls-remote + fetch + push, the daemons'
       own counts in `daemon status --json`) per clone per minute. Target <= 1.
     - contention: --rounds rounds (default 6, --quick 3); in each, every agent sends one
       broadcast at the same moment (a thread per clone, released together); the round
       ends when every clone's log holds every message. Rejected pushes % = the daemons'
       `remote.rejected` / `remote.push` (target <= 10 % at 10 clones); sends p50/p95
       (spawn to exit of `thrum send`; target p95 <= 100 ms at 10 clones); the time for a
       round to reach every clone; and, as info, sends one at a time (a warm-up round
       before the contention rounds). Checks (exit 1 when broken): every clone ends with
       every message exactly once, no event twice, no merge commit on the remote.
  2. delivery to an active agent, two clones A and B: alice (A) sends to bob (B) at a
     random moment (0-5 s after bob's wait blocked or his command ended, so every phase
     of B's check timer is hit); --deliveries each (default 12, --quick 5):
     - bob waits (`thrum wait --timeout 60s --after -1s`, reported blocked by B's daemon):
       send returned -> wait exited;
     - bob only ran a command (`thrum inbox`) before the send, no wait: send returned ->
       the message in B's log (polled every 20 ms).
     Target (SPEC §19): p50 <= 5 s, p95 <= 8 s.

Reports; never fails on a missed target (exit 0), only when the benchmark itself breaks
(exit 1). Daemons and temp dirs are cleaned up on every exit.
"""

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import BenchError, Workspace, git, log_dir, make_repo, meta  # noqa: E402
from daemon_bench import Waiter, fmt_value, lat_stats, pctl  # noqa: E402


def progress(msg):
    sys.stderr.write("[contention_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def message_ids(repo):
    """{message_id: number of message.create lines} in a clone's log files."""
    out = {}
    d = os.path.join(log_dir(repo), "messages")
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        with open(os.path.join(d, name), "rb") as f:
            for line in f.read().split(b"\n"):
                if b'"message.create"' in line:
                    try:
                        mid = json.loads(line)["message_id"]
                    except (ValueError, KeyError):
                        continue
                    out[mid] = out.get(mid, 0) + 1
    return out


def has_message(repo, mid):
    d = os.path.join(log_dir(repo), "messages")
    needle = mid.encode()
    for name in os.listdir(d) if os.path.isdir(d) else []:
        try:
            with open(os.path.join(d, name), "rb") as f:
                if needle in f.read():
                    return True
        except OSError:
            pass
    return False


def event_ids(repo):
    out = []
    for sub in ("agents", "messages", "receipts"):
        d = os.path.join(log_dir(repo), sub)
        for name in os.listdir(d) if os.path.isdir(d) else []:
            with open(os.path.join(d, name), "rb") as f:
                out += [json.loads(line)["event_id"] for line in f.read().split(b"\n")
                        if line.strip()]
    return out


class Bench:
    def __init__(self, ws, a):
        self.ws, self.a = ws, a
        self.rows, self.info = [], {}
        self.daemons = {}  # repo -> pid
        self.waiters = []

    def row(self, section, name, value, unit, target=None, limit=None, n=None, detail=None,
            **extra):
        status = None
        if limit is not None:
            status = "MISS" if value is None or value > limit else "PASS"
        r = dict(section=section, name=name, value=value, unit=unit, target=target,
                 limit=limit, status=status, n=n, detail=detail)
        r.update(extra)
        self.rows.append(r)
        progress("  %s: %s%s" % (name, fmt_value(value, unit),
                                 "  [%s %s]" % (target, status) if status else ""))

    # -- clones and daemons ---------------------------------------------------------------
    def clones(self, n, tag):
        """A bare remote and n clones, agent w<i> in clone i, every clone knowing every
        agent (two rounds of `sync force`). Returns [(repo, name)]."""
        ws, env, root = self.ws, self.ws.env, os.path.join(self.ws.root, tag)
        os.makedirs(root)
        seed = make_repo(os.path.join(root, "seed"), env)
        remote = os.path.join(root, "remote.git")
        os.makedirs(remote)
        git(["init", "-q", "--bare", "-b", "main"], remote, env)
        git(["push", "-q", remote, "main"], seed, env)
        out = []
        for i in range(n):
            repo = os.path.join(root, "c%02d" % i)
            git(["clone", "-q", remote, repo], root, env)
            ws.init_store(repo, agents=(("w%02d" % i, "worker"),))
            out.append((repo, "w%02d" % i))
        for _ in range(2):
            for repo, name in out:
                ws.thrum_run(["sync", "force", "-q"], repo, name=name)
        self.remote = remote
        return out

    def start_daemon(self, repo):
        _, p = self.ws.thrum_run(["daemon", "start", "--json"], repo)
        r = json.loads(p.stdout)
        if not r.get("started"):
            raise BenchError("no daemon started in %s: %r" % (repo, r))
        self.daemons[repo] = r["pid"]

    def status(self, repo):
        _, p = self.ws.thrum_run(["daemon", "status", "--json"], repo)
        r = json.loads(p.stdout)
        if not r.get("running") or "remote" not in r:
            raise BenchError("the daemon in %s does not answer: %r" % (repo, r))
        return r

    def stop_daemon(self, repo):
        pid = self.daemons.pop(repo, None)
        try:
            self.ws.thrum_run(["daemon", "stop", "-q"], repo, check=False, timeout=90)
        finally:
            if pid and os.path.exists("/proc/%d" % pid):
                try:
                    os.kill(pid, signal.SIGKILL)  # only a daemon this benchmark started
                except OSError:
                    pass

    def cleanup(self):
        for w in self.waiters:
            w.kill()
        for repo in list(self.daemons):
            self.stop_daemon(repo)

    # -- 1. contention ----------------------------------------------------------------------
    def sec_contention(self, n, rounds, idle):
        progress("%d clones: setting up" % n)
        clones = self.clones(n, "n%d" % n)
        for repo, _ in clones:
            self.start_daemon(repo)
        if idle:
            time.sleep(10.0)  # the daemons' start-up (first work-context pass)
            before = {repo: self.status(repo)["remote"] for repo, _ in clones}
            progress("%d clones: idle for %.0f s (no agent did anything)" % (n, idle))
            t0 = time.monotonic()
            time.sleep(idle)
            after = {repo: self.status(repo) for repo, _ in clones}
            minutes = (time.monotonic() - t0) / 60.0
            rates, kinds, active = [], {}, 0
            for repo, _ in clones:
                d = {k: after[repo]["remote"][k] - before[repo][k] for k in before[repo]}
                rates.append((d["ls-remote"] + d["fetch"] + d["push"]) / minutes)
                for k, v in d.items():
                    kinds[k] = kinds.get(k, 0) + v
                active += bool(after[repo]["active"])
            self.row(1, "%d clones idle: remote requests per clone per minute (max)" % n,
                     max(rates), "/min", "<= 1", 1.0, len(rates),
                     "median %.2f; all clones: %s over %.1f min; %d daemon(s) said active"
                     % (sorted(rates)[len(rates) // 2],
                        ", ".join("%s %d" % kv for kv in sorted(kinds.items())), minutes,
                        active), rates=[round(x, 3) for x in rates])
        # warm-up, not counted: one send at a time (the cost of a send by itself)
        alone, sent = [], []
        for repo, name in clones:
            dt, p = self.ws.thrum_run(["send", "hello from %s" % name, "--broadcast",
                                       "--json"], repo, name=name)
            alone.append(dt)
            sent.append(json.loads(p.stdout)["message_id"])
        self.converge(clones, sent, "the warm-up")
        time.sleep(8.0)  # its pushes are over
        before = {repo: self.status(repo)["remote"] for repo, _ in clones}
        sends, reach = [], []
        for rnd in range(rounds):
            go, errors, got = threading.Event(), [], []

            def send(repo, name):
                go.wait()
                try:
                    dt, p = self.ws.thrum_run(["send", "round %d from %s" % (rnd, name),
                                               "--broadcast", "--json"], repo, name=name)
                    got.append((dt, json.loads(p.stdout)["message_id"]))
                except (BenchError, ValueError, KeyError) as e:
                    errors.append(str(e))
            threads = [threading.Thread(target=send, args=c) for c in clones]
            for t in threads:
                t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            go.set()
            for t in threads:
                t.join(120)
            if errors:
                raise BenchError("a send failed: %s" % errors[0])
            sends += [dt for dt, _ in got]
            mids = [m for _, m in got]
            sent += mids
            self.converge(clones, mids, "round %d" % rnd)
            reach.append(time.monotonic() - t0)
            progress("%d clones: round %d/%d reached every clone in %.1f s"
                     % (n, rnd + 1, rounds, reach[-1]))
        time.sleep(12.0)  # the last pushes (each clone's own receipts, contexts) settle
        after = {repo: self.status(repo)["remote"] for repo, _ in clones}
        d = {k: sum(after[r][k] - before[r][k] for r, _ in clones) for k in before[clones[0][0]]}
        pct = 100.0 * d["rejected"] / d["push"] if d["push"] else None
        limit = 10.0 if n <= 10 else None
        self.row(1, "%d clones writing at once: rejected pushes" % n, pct, "%",
                 "<= 10 %" if limit else "info", limit, d["push"],
                 "%d of %d pushes; %d fetch, %d ls-remote over %d rounds"
                 % (d["rejected"], d["push"], d["fetch"], d["ls-remote"], rounds),
                 counts=d)
        s = lat_stats(sends)
        self.row(1, "%d clones writing at once: send p95" % n, s["p95_ms"], "ms",
                 "<= 100 ms" if limit else "info", 100.0 if limit else None, s["n"],
                 "p50 %.0f ms, max %.0f ms (all %d sends start together on %d cores)"
                 % (s["median_ms"], s["max_ms"], n, os.cpu_count()), stats=s)
        s = lat_stats(alone)
        self.row(1, "(info) %d clones: one send at a time, p95" % n, s["p95_ms"], "ms",
                 n=s["n"], detail="p50 %.0f ms (the daemons syncing meanwhile)"
                 % s["median_ms"], stats=s)
        s = lat_stats(reach)
        self.row(1, "%d clones: a round reaches every clone (p50)" % n,
                 s["median_ms"] / 1000, "s", "info", n=s["n"],
                 detail="p95 %.1f s, max %.1f s" % (s["p95_ms"] / 1000, s["max_ms"] / 1000),
                 stats=s)
        # nothing lost, nothing twice
        for repo, _ in clones:
            have = message_ids(repo)
            missing = [m for m in sent if m not in have]
            twice = [m for m in sent if have.get(m, 0) > 1]
            ids = event_ids(repo)
            if missing or twice or len(ids) != len(set(ids)):
                raise BenchError("%s: %d messages missing, %d twice, %d duplicate events"
                                 % (repo, len(missing), len(twice), len(ids) - len(set(ids))))
        merges = git(["log", "--merges", "--format=%H", "a-sync"], self.remote, self.ws.env)
        if merges.strip():
            raise BenchError("merge commits on the remote's a-sync")
        self.info["1 %d clones" % n] = "%d messages, every clone holds each exactly once; " \
            "remote history linear" % len(sent)
        for repo, _ in clones:
            self.stop_daemon(repo)

    @staticmethod
    def converge(clones, mids, what, timeout=180):
        deadline = time.monotonic() + timeout
        while not all(has_message(repo, m) for repo, _ in clones for m in mids):
            if time.monotonic() > deadline:
                raise BenchError("%s did not reach every clone in %d s" % (what, timeout))
            time.sleep(0.1)

    # -- 2. delivery ---------------------------------------------------------------------
    def sec_delivery(self, deliveries):
        (A, alice), (B, bob) = self.clones(2, "pair")
        self.start_daemon(A)
        self.start_daemon(B)
        time.sleep(3.0)
        rng = random.Random(self.a.seed)
        for mode in ("waits", "ran a command"):
            lat = []
            for i in range(deliveries):
                w = None
                if mode == "waits":
                    w = Waiter(self.ws, B, bob, ["wait", "--timeout", "60s", "--after",
                                                 "-1s", "--json"],
                               os.path.join(self.ws.root, "wait-%d.out" % i))
                    self.waiters.append(w)
                    deadline = time.monotonic() + 10
                    while self.status(B)["waiting"] < 1:
                        if time.monotonic() > deadline or not w.running():
                            raise BenchError("bob's wait did not reach B's daemon")
                        time.sleep(0.05)
                else:
                    self.ws.thrum_run(["inbox", "-q", "--limit", "1"], B, name=bob)
                time.sleep(rng.uniform(0.0, 5.0))  # any phase of B's check timer
                _, p = self.ws.thrum_run(["send", "delivery %d" % i, "--to", "@" + bob,
                                          "--json"], A, name=alice)
                t1 = time.monotonic()
                mid = json.loads(p.stdout)["message_id"]
                if w is not None:
                    if not w.join(75):
                        raise BenchError("thrum wait outlived its timeout")
                    w.check_received(mid)
                    lat.append(w.t_exit - t1)
                else:
                    deadline = t1 + 75
                    while not has_message(B, mid):
                        if time.monotonic() > deadline:
                            raise BenchError("message %s never reached B" % mid)
                        time.sleep(0.02)
                    lat.append(time.monotonic() - t1)
                progress("delivery (bob %s) %d/%d: %.2f s" % (mode, i + 1, deliveries,
                                                             lat[-1]))
            s = lat_stats(lat)
            self.row(2, "cross-clone delivery, bob %s: p50" % mode, s["median_ms"] / 1000,
                     "s", "<= 5 s", 5.0, s["n"], "min %.2f, max %.2f s; each: %s" % (
                         s["min_ms"] / 1000, s["max_ms"] / 1000,
                         " ".join("%.1f" % x for x in lat)), stats=s)
            self.row(2, "cross-clone delivery, bob %s: p95" % mode,
                     pctl(lat, 0.95), "s", "<= 8 s", 8.0, s["n"])
        st = self.status(B)
        self.info["2 B's daemon at the end"] = "active=%s, remote %s" % (st["active"],
                                                                        st["remote"])
        for repo in (A, B):
            self.stop_daemon(repo)


def print_report(m, rows, info):
    heads = ("measurement", "value", "n", "target", "result", "detail")
    body = [(r["name"], fmt_value(r["value"], r["unit"]), "-" if r["n"] is None
             else str(r["n"]), r["target"] or "-", r["status"] or "", r["detail"] or "")
            for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(heads)]

    def fmt(cs):
        return "  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    print("thrum sync contention (python %s, thrum.py %s, %.0fs, %s cpus, load %.1f -> %.1f)"
          % (m["python"], m["thrum_py_sha256"][:12], m["elapsed_s"], m["cpus"],
             m["loadavg_1m_start_end"][0], m["loadavg_1m_start_end"][1]))
    print(fmt(heads))
    for b in body:
        print(fmt(b))
    for k, v in info.items():
        print("  %s: %s" % (k, v))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # run the finally blocks: stop daemons, remove temp dirs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clones", default=None, help="clone counts (default 10,20; --quick 10)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="sends at once per clone count (default 6; 3 with --quick)")
    ap.add_argument("--deliveries", type=int, default=None,
                    help="cross-clone deliveries per mode (default 12; 5 with --quick)")
    ap.add_argument("--idle", type=float, default=None,
                    help="idle window in seconds on the first clone set (default 180; "
                         "125 with --quick; 0 skips it)")
    ap.add_argument("--only", default="1,2", help="sections to run (1 contention, 2 delivery)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the delivery phases")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    a = ap.parse_args(argv)
    counts = [int(x) for x in (a.clones or ("10" if a.quick else "10,20")).split(",")]
    rounds = a.rounds or (3 if a.quick else 6)
    deliveries = a.deliveries or (5 if a.quick else 12)
    idle = a.idle if a.idle is not None else (125.0 if a.quick else 180.0)
    only = {int(x) for x in a.only.split(",")}
    signal.signal(signal.SIGTERM, _terminate)
    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    try:
        with Workspace("thrum-bench-contention-", keep=a.keep) as ws:
            progress("temp dir %s, thrum.py sha256 %s" % (ws.root, ws.thrum_sha256[:12]))
            b = Bench(ws, a)
            try:
                if 1 in only:
                    for i, n in enumerate(counts):
                        b.sec_contention(n, rounds, idle if i == 0 else 0)
                if 2 in only:
                    b.sec_delivery(deliveries)
            finally:
                b.cleanup()
            m = meta(ws, runs=rounds, quick=a.quick, clones=counts, deliveries=deliveries,
                     idle_s=idle, elapsed_s=round(time.monotonic() - t_start, 1),
                     loadavg_1m_start_end=[load0, os.getloadavg()[0]])
    except BenchError as e:
        sys.stderr.write("contention_bench: benchmark failed: %s\n" % e)
        return 1
    if a.json:
        json.dump({"benchmark": "contention_bench", "meta": m, "results": b.rows,
                   "info": b.info}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(m, b.rows, b.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
