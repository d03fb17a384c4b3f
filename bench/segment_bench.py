#!/usr/bin/env python3
"""What one sync commit adds to git after one new message, on a big history (SPEC §17, §19).

    python3 bench/segment_bench.py [--messages N] [--sends K] [--quick] [--json] [--keep]

One repository with a bare remote; alice and bob registered with `quickstart`; N messages
alice -> bob written straight into the log in the snapshot's own layout (benchlib
write_messages: segments of SEGMENT_BYTES), committed and pushed by one untimed
`thrum sync force`. Then K times: `thrum send` (alice -> bob), `thrum sync force`, and the
objects that commit added: `git rev-list --objects OLD..NEW` (what the new tip reaches and
the old one does not: the commit, the trees that changed, the blobs that changed), their
sizes from `git cat-file --batch-check` (uncompressed object sizes, before any `git gc`).
Target (SPEC §19): <= 256 KiB at 100,000 messages, the largest of the K commits.

A second row makes the worst case of such a commit: more lines (untimed) until alice's
latest segment is one line short of full, then one more send and sync.

The details give the split (blobs, trees, commit), the number of alice's message segments,
the log's size, and what the same commit stored before segments: the writer's whole file.

Defaults: N = 100,000 (10,000 with --quick), K = 5 (3 with --quick). Exit 1 only when the
benchmark itself breaks (a command fails, or a commit adds no blob).
"""

import argparse
import os
import statistics
import sys
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BenchError, Workspace, git, log_dir, make_repo, meta,  # noqa: E402
                      run, write_messages)

TARGET = 256 * 1024


def progress(msg):
    sys.stderr.write("[segment_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def new_objects(repo, env, old, new):
    """{type: [count, bytes]} of the objects `new` reaches and `old` does not."""
    listed = git(["rev-list", "--objects", "%s..%s" % (old, new)], repo, env)
    shas = [line.split()[0] for line in listed.splitlines() if line.strip()]
    out = {"blob": [0, 0], "tree": [0, 0], "commit": [0, 0]}
    if not shas:
        return out
    _, p = run(["git", "cat-file", "--batch-check"], repo, env,
               input=("\n".join(shas) + "\n").encode())
    for line in p.stdout.decode().splitlines():
        _, kind, size = line.split()
        out.setdefault(kind, [0, 0])
        out[kind][0] += 1
        out[kind][1] += int(size)
    return out


def tip(repo, env):
    return git(["rev-parse", "refs/heads/a-sync"], repo, env).strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=None, help="history size (100000)")
    ap.add_argument("--sends", type=int, default=None, help="commits measured (5)")
    ap.add_argument("--quick", action="store_true", help="10,000 messages, 3 commits")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    a = ap.parse_args()
    n = a.messages or (10000 if a.quick else 100000)
    k = a.sends or (3 if a.quick else 5)
    t0 = time.monotonic()
    with Workspace("thrum-bench-segment-", keep=a.keep) as ws:
        env = ws.env
        progress("temp dir %s, thrum.py sha256 %s" % (ws.root, ws.thrum_sha256[:12]))
        repo = make_repo(os.path.join(ws.root, "repo"), env)
        remote = os.path.join(ws.root, "remote.git")
        git(["init", "-q", "--bare", "-b", "main", remote], ws.root, env)
        git(["remote", "add", "origin", remote], repo, env)
        ws.init_store(repo)
        nbytes = write_messages(ws.thrum, repo, "alice", "bob", n)
        dt_first, _ = ws.thrum_run(["sync", "force", "-q"], repo, name="alice")
        progress("%d messages (%.1f MB) written and pushed (sync force %.1fs)"
                 % (n, nbytes / 1e6, dt_first))
        per, times = [], []
        for i in range(k):
            old = tip(repo, env)
            ws.thrum_run(["send", "segment bench %d" % i, "--to", "bob", "-q"], repo,
                         name="alice")
            dt, _ = ws.thrum_run(["sync", "force", "-q"], repo, name="alice")
            times.append(dt)
            new = tip(repo, env)
            got = new_objects(repo, env, old, new)
            if old == new or not got["blob"][0]:
                raise BenchError("the sync after send %d committed no new blob" % i)
            total = sum(v[1] for v in got.values())
            per.append((total, got))
            progress("commit %d/%d: %d bytes of new objects (%s)" % (
                i + 1, k, total, ", ".join("%s %d x %d B" % (t, c, b)
                                           for t, (c, b) in got.items())))
        worst, split = max(per, key=lambda x: x[0])
        # The worst case of a message-only commit: the latest segment one line short of
        # full (more benchmark lines first, untimed), then one more send and sync.
        seg_bytes = getattr(ws.thrum, "SEGMENT_BYTES", None)
        full = None
        if seg_bytes:
            d = os.path.join(log_dir(repo), "messages")
            last = ws.thrum.EventLog(log_dir(repo), "").segments("messages", "alice")[-1][1]
            room = seg_bytes - os.path.getsize(os.path.join(log_dir(repo), last))
            line = nbytes / n
            if room > 2 * line:
                write_messages(ws.thrum, repo, "alice", "bob", int(room // line) - 1)
            ws.thrum_run(["sync", "force", "-q"], repo, name="alice")
            old = tip(repo, env)
            ws.thrum_run(["send", "segment bench: nearly full", "--to", "bob", "-q"], repo,
                         name="alice")
            ws.thrum_run(["sync", "force", "-q"], repo, name="alice")
            full = new_objects(repo, env, old, tip(repo, env))
            progress("latest segment nearly full: %d bytes of new objects"
                     % sum(v[1] for v in full.values()))
        d = os.path.join(log_dir(repo), "messages")
        segs = sorted(f for f in os.listdir(d) if f.startswith("alice"))
        whole = sum(os.path.getsize(os.path.join(d, f)) for f in segs)
        rows = [{"name": "new objects of one sync commit (largest of %d)" % k,
                 "value": worst, "unit": "bytes", "limit": TARGET,
                 "status": "ok" if worst <= TARGET else "MISS",
                 "median": statistics.median(x[0] for x in per),
                 "blobs": split["blob"][1], "trees": split["tree"][1],
                 "commit": split["commit"][1]}]
        if full:
            value = sum(v[1] for v in full.values())
            rows.append({"name": "the same, the latest segment nearly full",
                         "value": value, "unit": "bytes", "limit": TARGET,
                         "status": "ok" if value <= TARGET else "MISS", "median": value,
                         "blobs": full["blob"][1], "trees": full["tree"][1],
                         "commit": full["commit"][1]})
        info = {"history": {"messages": n, "log_bytes": nbytes,
                            "alice_message_segments": len(segs),
                            "segment_bytes": getattr(ws.thrum, "SEGMENT_BYTES", None)},
                "first row's largest commit": {"blobs": "%d x, %d B" % tuple(split["blob"]),
                                   "trees": "%d x, %d B" % tuple(split["tree"]),
                                   "commit": "%d B" % split["commit"][1]},
                "sync force after one send": "median %.0f ms (%d runs; the history's "
                                             "first sync: %.1f s)" % (
                    statistics.median(times) * 1000, k, dt_first),
                "before segments": "a commit stored alice's whole message file: "
                                   "%d B (%.1fx the target)" % (whole, whole / TARGET)}
        m = meta(ws, runs=k, elapsed_s=time.monotonic() - t0, messages=n)
        if a.json:
            import json
            json.dump({"benchmark": "segment_bench", "meta": m, "results": rows,
                       "info": info}, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        print("A sync commit after one message (python %s, thrum.py %s, %d messages, "
              "%.0fs)" % (m["python"], m["thrum_py_sha256"][:12], n, m["elapsed_s"]))
        head = "%-50s %10s %10s %10s  %s" % ("measurement", "bytes", "median", "target",
                                             "result")
        print(head + "\n" + "-" * len(head))
        for r in rows:
            print("%-50s %10d %10d %10s  %s" % (r["name"], r["value"], r["median"],
                                                "<= %d" % r["limit"], r["status"]))
        for key, v in info.items():
            shown = ", ".join("%s=%s" % kv for kv in v.items()) if isinstance(v, dict) \
                else v
            print("  %s: %s" % (key, shown))


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.stderr.write("segment_bench: %s\n" % e)
        sys.exit(1)
