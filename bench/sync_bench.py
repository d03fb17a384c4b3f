#!/usr/bin/env python3
"""Git sync throughput of thrum.py, and how many git processes each command spawns.

    python3 bench/sync_bench.py [--runs N] [--messages N] [--quick] [--json] [--keep]

Set-up (untimed): a bare remote R; clones A and B, thrum initialised in both, alice
registered in A and bob in B, both synced. B is then snapshotted. Clone A gets 10,000
`message.create` events alice -> bob written straight into its log, and `thrum sync force`
in A pushes them (reported, not targeted). R is snapshotted too.

Timed: `thrum sync force` in B receiving the 10,000 events (fetch, merge, commit, push,
index catch-up). Before each run R and B are restored from their snapshots at the same
paths (git worktree metadata holds absolute paths), so every run does the same work.
A fresh clone + `thrum init` would not do: init adopts the remote's a-sync branch, so the
events would arrive at init time and `sync force` would have nothing to pull.
After the runs, bob's `inbox --all --json` total must be >= 10,000.

Targets: median B `sync force` <= 2 s; a `sync force` with nothing to merge runs at
most 6 git processes (SPEC §8, its status included).

Git process count: with a fake `git` first on PATH (appends a line to a counter file, then
execs the real git), count the git processes spawned by `thrum send` (pure CLI, no
THRUM_AUTOSYNC: must be 0), `thrum inbox`, `thrum sync force` (pushing the send), and a
second `thrum sync force` with nothing to do (<= 6).

The baseline for ratios is `python3 -c "import sqlite3, json"`, sampled around each run.
Exit 0 whatever the figures; exit 1 only if the benchmark itself fails.
"""

import argparse
import json
import os
import shutil
import stat
import sys
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BenchError, Workspace, git, make_repo, median, meta,  # noqa: E402
                      report, run, summary, write_messages)

SYNC_TARGET_S = 2.0


def progress(msg):
    sys.stderr.write("[sync_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def restore(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)


def fake_git_dir(root, real_git):
    d = os.path.join(root, "fakegit")
    os.makedirs(d, exist_ok=True)
    counter = os.path.join(root, "git-calls.log")
    path = os.path.join(d, "git")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nprintf '%%s\\n' \"$*\" >> '%s'\nexec '%s' \"$@\"\n"
                % (counter, real_git))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return d, counter


def git_subcommands(calls):
    """{subcommand: count} from the shim's argv lines (skipping -c K=V and --options)."""
    out = {}
    for line in calls:
        words = line.split()
        i = 0
        while i < len(words) and words[i].startswith("-"):
            i += 2 if words[i] in ("-c", "-C") else 1
        sub = words[i] if i < len(words) else "?"
        out[sub] = out.get(sub, 0) + 1
    return out


def count_git(ws, args, cwd, name, fakedir, counter):
    """Run thrum (installed launcher) with the counting git first on PATH."""
    if os.path.exists(counter):
        os.unlink(counter)
    env_path = fakedir + os.pathsep + ws.env.get("PATH", "")
    ws.thrum_run(args, cwd, name=name, extra_env={"PATH": env_path})
    if not os.path.exists(counter):
        return 0, []
    with open(counter) as f:
        calls = [l for l in f.read().splitlines()]
    return len(calls), calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="timed sync runs (default 5; 2 with --quick)")
    ap.add_argument("--messages", type=int, default=10000,
                    help="message events pushed from A (default 10000)")
    ap.add_argument("--quick", action="store_true", help="fewer runs (smoke test)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    a = ap.parse_args(argv)
    runs = a.runs or (2 if a.quick else 5)
    n = a.messages
    if runs < 1 or n < 1:
        ap.error("--runs and --messages must be >= 1")
    real_git = shutil.which("git")
    if not real_git:
        sys.stderr.write("sync_bench: git is not on PATH\n")
        return 1
    t_start = time.monotonic()
    info = {}
    try:
        with Workspace("thrum-bench-sync-", keep=a.keep) as ws:
            env, root = ws.env, ws.root
            progress("temp dir %s, thrum.py sha256 %s" % (root, ws.thrum_sha256[:12]))
            # remote with a main branch, two clones
            seed = make_repo(os.path.join(root, "seed"), env)
            remote = os.path.join(root, "remote.git")
            os.makedirs(remote)
            git(["init", "-q", "--bare", "-b", "main"], remote, env)
            git(["push", "-q", remote, "main"], seed, env)
            A, B = os.path.join(root, "A"), os.path.join(root, "B")
            git(["clone", "-q", remote, A], root, env)
            git(["clone", "-q", remote, B], root, env)
            ws.init_store(A, agents=(("alice", "implementer"),))
            ws.thrum_run(["sync", "force", "-q"], A, name="alice")
            ws.init_store(B, agents=(("bob", "reviewer"),))
            ws.thrum_run(["sync", "force", "-q"], B, name="bob")
            ws.thrum_run(["sync", "force", "-q"], A, name="alice")  # A learns about bob
            b_tpl = os.path.join(root, "B.template")
            shutil.copytree(B, b_tpl, symlinks=True)
            # A: n messages straight into the log, pushed by one sync (untimed)
            nbytes = write_messages(ws.thrum, A, "alice", "bob", n)
            dt_a, p = ws.thrum_run(["sync", "force", "--json"], A, name="alice")
            ra = json.loads(p.stdout)
            if not ra.get("pushed"):
                raise BenchError("A's sync force did not push: %r" % ra)
            info["A push"] = {"events": n, "log_bytes": nbytes, "sync_force_s": round(dt_a, 3)}
            progress("A pushed %d events (%.1f MB) in %.2fs" % (n, nbytes / 1e6, dt_a))
            r_tpl = os.path.join(root, "remote.template")
            shutil.copytree(remote, r_tpl, symlinks=True)

            baseline, samples, pulled = [], [], []
            for _ in range(2):  # warm-up of the interpreter, not recorded
                run([sys.executable, "-c", "import sqlite3, json"], root, env)
            for i in range(runs):
                restore(r_tpl, remote)
                restore(b_tpl, B)
                baseline.append(run([sys.executable, "-c", "import sqlite3, json"],
                                    root, env)[0])
                dt, p = ws.thrum_run(["sync", "force", "--json"], B, name="bob")
                r = json.loads(p.stdout)
                samples.append(dt)
                pulled.append(r.get("pulled"))
                baseline.append(run([sys.executable, "-c", "import sqlite3, json"],
                                    root, env)[0])
                progress("run %d/%d: B sync force %.2fs, pulled %s"
                         % (i + 1, runs, dt, r.get("pulled")))
            if any(x is None or x < n for x in pulled):
                raise BenchError("B pulled %r events per run, expected >= %d" % (pulled, n))
            _, p = ws.thrum_run(["inbox", "--all", "--json"], B, name="bob")
            total = json.loads(p.stdout)["total"]
            _, p = ws.thrum_run(["inbox", "--unread", "--json"], B, name="bob")
            unread = json.loads(p.stdout)["total"]
            info["B after sync"] = {"inbox_all_total": total, "inbox_unread_total": unread,
                                    "pulled_per_run": pulled[0]}
            if total < n:
                raise BenchError("after sync, bob's inbox --all total is %d, expected >= %d"
                                 % (total, n))

            # git processes per command (counting shim first on PATH)
            fakedir, counter = fake_git_dir(root, real_git)
            counts = {}
            counts["send"], _ = count_git(ws, ["send", "x", "--to", "@alice", "-q"], B, "bob",
                                          fakedir, counter)
            counts["inbox"], _ = count_git(ws, ["inbox", "-q", "--limit", "10"], B, "bob",
                                           fakedir, counter)
            counts["sync force"], calls = count_git(ws, ["sync", "force", "-q"], B, "bob",
                                                    fakedir, counter)
            info["git calls of sync force"] = git_subcommands(calls)
            counts["sync force, nothing to do"], calls = count_git(
                ws, ["sync", "force", "-q"], B, "bob", fakedir, counter)
            info["git calls of sync force, nothing to do"] = git_subcommands(calls)
            m = meta(ws, runs=runs, quick=a.quick, messages=n,
                     elapsed_s=round(time.monotonic() - t_start, 1))
            m["details"] = info
    except BenchError as e:
        sys.stderr.write("sync_bench: benchmark failed: %s\n" % e)
        return 1

    base = median(baseline)
    s = summary(samples)
    rows = [dict(name="baseline: python3 -c 'import sqlite3, json'", ratio=1.0,
                 **summary(baseline)),
            dict(name="sync force in B receiving %d events" % n,
                 ratio=s["median_ms"] / 1000 / base, target="<= 2 s",
                 status="PASS" if s["median_ms"] / 1000 <= SYNC_TARGET_S else "MISS", **s),
            dict(name="(info) sync force in A pushing %d events" % n, n=1,
                 median_ms=info["A push"]["sync_force_s"] * 1000,
                 ratio=info["A push"]["sync_force_s"] / base),
            dict(name="B inbox --all total after sync", n=1, median_ms=None, ratio=None,
                 target=">= %d" % n, status="PASS (%d)" % total),
            dict(name="git processes: send (no autosync)", median_ms=None, ratio=None, n=1,
                 target="0", status=("PASS" if counts["send"] == 0 else "MISS")
                 + " (%d)" % counts["send"]),
            dict(name="git processes: inbox", median_ms=None, ratio=None, n=1,
                 status="(%d)" % counts["inbox"]),
            dict(name="git processes: sync force (contrast)", median_ms=None, ratio=None, n=1,
                 status="(%d)" % counts["sync force"]),
            dict(name="git processes: sync force, nothing to do", median_ms=None, ratio=None,
                 n=1, target="<= 6", status=("PASS" if counts["sync force, nothing to do"]
                                             <= 6 else "MISS") +
                 " (%d)" % counts["sync force, nothing to do"])]
    for r in rows:
        if r["name"].startswith("git processes"):
            r["git_processes"] = counts[r["name"].split(": ")[1].split(" (")[0]]
    report("sync_bench", "thrum sync", m, rows, info, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
