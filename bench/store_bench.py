#!/usr/bin/env python3
"""Store size of thrum.py: bytes per message on disk, against agent-mail-cli.

    python3 bench/store_bench.py [--quick] [--sizes 1000,10000] [--peer-python PATH]
                                 [--runs N] [--json] [--keep]

For each store size N (1,000, 10,000 and 100,000; 1,000 and 10,000 with --quick) a fresh
store gets N benchmark messages (alice -> bob, benchlib.write_messages: what `thrum send`
writes) and one `thrum inbox` as bob catches the index up. Measured, per message:

  log     the JSONL files of the a-sync worktree
  index   .thrum/var/index.db after a WAL checkpoint; `fts` is the part of it the full-text
          tables take (the pages dropping them frees, in a copy), shown when they exist
  var     the other records under .thrum/var/ (arrivals.jsonl, ...)
  store   log + index + var: the whole store
  git     the a-sync branch as git keeps it: after `thrum sync force` (a local commit) and
          `git gc`, the size of a pack of every object the branch reaches
  peer    agent-mail-cli's SQLite file (one file: its whole store) holding the same bodies,
          written by its own `cmd_send` in a loop (see PEER_SCRIPT)

Then, as cli_latency measures them: `send`/`inbox` medians through the installed launcher
in the 10,000 store, and `rebuild` of the largest store.

Targets (SPEC §17, §19): index <= 500 bytes/message at 10,000; whole store <= 2x the
peer's. This script reports; it never fails on a missed target (exit 0), only when the
benchmark itself breaks (exit 1).
"""

import argparse
import glob
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BenchError, Workspace, git, log_dir, make_repo, meta,  # noqa: E402
                      run, write_messages)
import cli_latency  # noqa: E402  (its send/inbox and rebuild measurements)

INDEX_LIMIT = 500.0   # bytes per message at 10,000 messages (SPEC §17)
PEER_RATIO = 2.0      # whole store vs agent-mail-cli's (SPEC §19)

#: Run by the peer's interpreter: agent-mail-cli's own `send` (argument parsing,
#: validation, its INSERT) once per body, into the file named by AGENT_MAIL_DB. One
#: connection and one transaction for the whole loop (its commit per send changes no
#: byte of the rows, only the time), then a WAL checkpoint so the file holds everything.
PEER_SCRIPT = r"""
import json, os, sys
from agent_mail import cli
conn = cli.get_db()

class OneConnection:  # cli.get_db() would open (and commit) once per send
    def __init__(self, c):
        self.c = c
    def commit(self):
        pass
    def __getattr__(self, k):
        return getattr(self.c, k)

wrapped = OneConnection(conn)
cli.get_db = lambda: wrapped
cli.output = lambda data: None
parser = cli.build_parser()
n = 0
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        args = parser.parse_args(["send", "--from", "bench:alice", "--to", "bench:bob",
                                  "--subject", "", "--body", json.loads(line)])
        cli.cmd_send(args)
        n += 1
conn.commit()
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
conn.close()
print(json.dumps({"sent": n, "rows": count}))
"""


def progress(msg):
    sys.stderr.write("[store_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def files_size(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def log_files(repo):
    root = log_dir(repo)
    return [p for p in glob.glob(os.path.join(root, "**", "*.jsonl"), recursive=True)]


def var_files(repo):
    """Records under .thrum/var/ other than the index and runtime files."""
    var = os.path.join(repo, ".thrum", "var")
    out = []
    for dirpath, _, names in os.walk(var):
        for name in names:
            if name.startswith("index.db") or name.endswith(".lock") or \
                    name.startswith("daemon.") or name.endswith(".sock"):
                continue
            out.append(os.path.join(dirpath, name))
    return out


def fts_tables(db):
    return [r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE "
        "'CREATE VIRTUAL TABLE%' AND lower(sql) LIKE '%using fts5%'")]


def index_sizes(path, scratch):
    """(bytes of index.db after a checkpoint, bytes its FTS tables take or None,
    {table: bytes} from dbstat when this SQLite has it)."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        total = os.path.getsize(path) + files_size([path + "-wal"])
        tables = {}
        try:
            for name, size in db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name "
                                         "ORDER BY 2 DESC"):
                tables[name] = size
        except sqlite3.DatabaseError:
            pass  # no dbstat in this build
        fts = fts_tables(db)
    finally:
        db.close()
    if not fts:
        return total, None, tables
    copy = os.path.join(scratch, "fts-copy.db")
    shutil.copyfile(path, copy)
    db = sqlite3.connect(copy)
    try:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        free0 = db.execute("PRAGMA freelist_count").fetchone()[0]
        for name in fts:
            db.execute("DROP TABLE %s" % name)
        db.commit()
        freed = (db.execute("PRAGMA freelist_count").fetchone()[0] - free0) * page
    finally:
        db.close()
        os.unlink(copy)
    return total, freed, tables


def git_pack_size(ws, repo):
    """Commit the log (`thrum sync force`: a local commit without a remote), `git gc`,
    and the size of a pack of everything the a-sync branch reaches."""
    ws.thrum_run(["sync", "force", "--json"], repo, name="alice")
    git(["gc", "-q"], repo, ws.env)
    p = subprocess.run(["git", "pack-objects", "--revs", "--stdout", "-q"], cwd=repo,
                       env=ws.env, input=b"refs/heads/a-sync\n", capture_output=True,
                       timeout=600)
    if p.returncode != 0:
        raise BenchError("git pack-objects failed: %s" % p.stderr.decode()[-500:])
    return len(p.stdout)


def find_peer(given):
    """The interpreter that has agent-mail-cli's package, or None."""
    cands = [given] if given else []
    if not given:
        exe = shutil.which("agent-mail")
        if exe:
            try:
                with open(exe, "rb") as f:
                    first = f.readline().decode("utf-8", "replace")
                if first.startswith("#!"):
                    cands.append(first[2:].strip().split()[0])
            except OSError:
                pass
    for py in cands:
        if py and os.path.exists(py) and subprocess.run(
                [py, "-c", "import agent_mail.cli"], capture_output=True).returncode == 0:
            return py
    return None


def peer_size(ws, py, repo, n, scratch):
    """Bytes of agent-mail-cli's database holding the bodies of `repo`'s messages."""
    bodies = os.path.join(scratch, "bodies-%d.jsonl" % n)
    with open(bodies, "w", encoding="utf-8") as out:
        for p in log_files(repo):
            with open(p, encoding="utf-8") as f:
                for line in f:
                    ev = json.loads(line)
                    if ev.get("type") == "message.create":
                        out.write(json.dumps(ev["body"]["content"]) + "\n")
    db = os.path.join(scratch, "peer-%d.db" % n)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    t0 = time.perf_counter()
    _, p = run([py, "-c", PEER_SCRIPT, bodies], scratch, ws.env,
               extra_env={"AGENT_MAIL_DB": db})
    got = json.loads(p.stdout)
    if got["rows"] != n:
        raise BenchError("agent-mail-cli stored %r messages, expected %d" % (got, n))
    size = files_size([db, db + "-wal"])
    os.unlink(bodies)
    return size, time.perf_counter() - t0


class Bench:
    def __init__(self, ws, runs):
        self.ws, self.runs = ws, runs
        self.rows, self.info = [], {}
        self.scratch = os.path.join(ws.root, "scratch")
        os.makedirs(self.scratch)

    def row(self, name, value, unit, n=None, target=None, limit=None, detail=None,
            ratio=None):
        status = None
        if limit is not None and value is not None:
            status = "PASS" if value <= limit else "MISS"
        self.rows.append(dict(name=name, value=value, unit=unit, n=n, target=target,
                              limit=limit, status=status, detail=detail, ratio=ratio))

    def store(self, n):
        ws = self.ws
        repo = make_repo(os.path.join(ws.root, "store-%d" % n), ws.env)
        ws.init_store(repo)
        write_messages(ws.thrum, repo, "alice", "bob", n)
        dt, p = ws.thrum_run(["inbox", "--unread", "--json", "--limit", "1"], repo,
                             name="bob")
        total = json.loads(p.stdout)["total"]
        if total != n:
            raise BenchError("store %d: bob's unread inbox has %d messages, expected %d"
                             % (n, total, n))
        progress("store %d written and indexed (%.2fs)" % (n, dt))
        return repo

    def measure_sizes(self, repo, n, peer):
        log = files_size(log_files(repo))
        index, fts, tables = index_sizes(os.path.join(repo, ".thrum", "var", "index.db"),
                                         self.scratch)
        var = files_size(var_files(repo))
        store = log + index + var
        pack = git_pack_size(self.ws, repo)
        per = lambda b: None if b is None else b / n  # noqa: E731
        ten = n == 10000
        self.row("log @%d" % n, per(log), "B/msg", n)
        self.row("index @%d" % n, per(index), "B/msg", n,
                 "<= %d" % INDEX_LIMIT if ten else None, INDEX_LIMIT if ten else None,
                 detail=None if fts is None else "with the FTS tables")
        if fts is not None:
            self.row("  fts @%d" % n, per(fts), "B/msg", n)
            self.row("  index without fts @%d" % n, per(index - fts), "B/msg", n)
        self.row("var records @%d" % n, per(var), "B/msg", n)
        peer_b = None
        if peer:
            peer_b, took = peer_size(self.ws, peer, repo, n, self.scratch)
            self.info["peer %d" % n] = {"bytes": peer_b, "written_s": round(took, 2)}
        ratio = None if peer_b is None else store / peer_b
        self.row("store (log+index+var) @%d" % n, per(store), "B/msg", n,
                 "<= %.1fx peer" % PEER_RATIO, None if ratio is None else PEER_RATIO,
                 ratio=ratio, detail="n/a: no agent-mail-cli" if peer_b is None else
                 "%.2fx agent-mail-cli" % ratio)
        self.row("git pack of a-sync @%d" % n, per(pack), "B/msg", n)
        self.row("agent-mail-cli @%d" % n, per(peer_b), "B/msg", n,
                 detail="n/a: not found (--peer-python)" if peer_b is None else None)
        self.info["index tables %d (B/msg)" % n] = {
            k: round(v / n, 1) for k, v in list(tables.items())[:12]}
        self.info["bytes %d" % n] = {"log": log, "index": index, "fts": fts, "var": var,
                                     "git_pack": pack, "peer": peer_b}
        progress("store %d: log %.0f, index %.0f, var %.0f B/msg%s" % (
            n, log / n, index / n, var / n,
            "" if peer_b is None else ", agent-mail-cli %.0f B/msg" % (peer_b / n)))

    def measure_latency(self, repos, big, rebuild_runs):
        """cli_latency's send/inbox (installed) and rebuild rows, in these stores."""
        lat = cli_latency.Bench(self.ws, self.runs)
        for _ in range(3):
            lat.sample_baseline()
        lat.baseline.clear()
        lat.block_base.clear()
        if 10000 in repos:
            lat.measure_store(repos[10000], 10000)
        lat.measure_rebuild(repos[big], big, rebuild_runs)
        for r in lat.results():
            if r.get("n") and r["name"].startswith(("send installed", "inbox installed",
                                                    "rebuild", "baseline")):
                ratio = r.get("ratio")
                self.row(r["name"], r["median_ms"], "ms", r["n"], r.get("target"),
                         r.get("limit") if r.get("kind") == "ms" else None,
                         detail=None if not ratio or r["name"].startswith("baseline")
                         else "%.2fx baseline" % ratio)
                if r.get("status"):
                    self.rows[-1]["status"] = r["status"]


def fmt_value(v, unit):
    if v is None:
        return "n/a"
    return ("%.1f" % v if v < 10000 else "%.0f" % v) + " " + unit


def print_report(m, rows, info):
    heads = ("measurement", "value", "n", "target", "result", "detail")
    body = [(r["name"], fmt_value(r["value"], r["unit"]), "-" if r["n"] is None
             else str(r["n"]), r["target"] or "-", r["status"] or "", r["detail"] or "")
            for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(heads)]

    def fmt(cs):
        return "  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
    print("thrum store size (python %s, thrum.py %s, %.0fs)"
          % (m["python"], m["thrum_py_sha256"][:12], m["elapsed_s"]))
    print(fmt(heads))
    print("-" * len(fmt(heads)))
    for b in body:
        print(fmt(b))
    for k, v in info.items():
        shown = ", ".join("%s=%s" % kv for kv in v.items()) if isinstance(v, dict) else v
        print("  %s: %s" % (k, shown))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None,
                    help="store sizes (default 1000,10000,100000; 1000,10000 with --quick)")
    ap.add_argument("--peer-python", default=None,
                    help="interpreter with agent-mail-cli's package `agent_mail` (default: "
                         "the one `agent-mail` on PATH runs)")
    ap.add_argument("--runs", type=int, default=None,
                    help="send/inbox runs (default 20; 5 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1,000 and 10,000 messages only")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in (a.sizes or ("1000,10000" if a.quick else
                                          "1000,10000,100000")).split(",")]
    runs = a.runs or (5 if a.quick else 20)
    t_start = time.monotonic()
    peer = find_peer(a.peer_python)
    if a.peer_python and not peer:
        sys.stderr.write("store_bench: %s cannot import agent_mail.cli\n" % a.peer_python)
        return 2
    try:
        with Workspace("thrum-bench-store-", keep=a.keep) as ws:
            progress("temp dir %s, thrum.py sha256 %s, peer %s" % (
                ws.root, ws.thrum_sha256[:12], peer or "none"))
            b = Bench(ws, runs)
            repos = {}
            for n in sizes:
                repos[n] = b.store(n)
                b.measure_sizes(repos[n], n, peer)
            b.measure_latency(repos, max(sizes), 2 if a.quick else 3)
            m = meta(ws, runs=runs, quick=a.quick, sizes=sizes, peer_python=peer,
                     elapsed_s=round(time.monotonic() - t_start, 1))
    except BenchError as e:
        sys.stderr.write("store_bench: benchmark failed: %s\n" % e)
        return 1
    if a.json:
        json.dump({"benchmark": "store_bench", "meta": m, "results": b.rows,
                   "info": b.info}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(m, b.rows, b.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
