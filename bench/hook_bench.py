#!/usr/bin/env python3
"""What the agent hooks cost: `thrum hook session-start|stop|prompt` against a plain
`thrum inbox --unread`, in stores of 1,000 and 10,000 messages.

    python3 bench/hook_bench.py [--runs N] [--quick] [--json] [--keep]

Set-up (untimed), once per store size: a fresh repository (benchlib.make_repo), `thrum
quickstart --name alice --role impl --module a` and `thrum agent register --name bob
--role rev --module b` (as bob), then N `message.create` events alice -> bob appended with
benchlib.write_messages, and one `thrum inbox --unread --json --limit 1` as bob that
builds the index and must count N unread. No daemon. Every command runs as bob
(THRUM_NAME=bob) through the installed launcher (benchlib's snapshot of thrum.py), in the
repository, and is timed from spawn to exit (pipes read to the end). A hook gets the
host's hook JSON on stdin, the way Claude Code and Codex call it; the inbox gets
/dev/null:

    inbox --unread      the baseline (marks nothing read, so the store does not change)
    hook session-start  {"hook_event_name": "SessionStart", "source": "startup", "cwd": R}
    hook stop           {"session_id": "s1", "cwd": R, "hook_event_name": "Stop",
                         "stop_hook_active": false}
    hook prompt         {"hook_event_name": "UserPromptSubmit", "prompt": "go on", "cwd": R}

stop and prompt tell of unread messages that no wait or hook has told of yet, and record
them as told (the delivered-once record in .thrum/var/delivered/), so each message is news
once. Hence:

  1. first stop: the first `hook stop` after the store is filled, timed once per store.
     It must block and tell of all N messages. Shown as info (n = 1).
  2. rounds: each round times six commands, in an order rotated every two rounds and
     reversed in every second round (ABBA-style: drift hits every command alike):
       inbox --unread, hook session-start,
       hook stop with nothing new (must print nothing),
       hook stop with one new message (must block),
       hook prompt with nothing new (must print nothing),
       hook prompt with one new message (must give additionalContext).
     The one new message is a real `thrum send "..." --to @bob -q` as alice, untimed,
     sent just before the command that is to find it; that command records it, so the
     next stop or prompt is back in the steady state. 24 rounds (6 with --quick), after
     one untimed warm-up round.
  3. git processes: one call of each command with a counting `git` first on PATH
     (sync_bench's shim), untimed, so the table can say which hooks ask git.

Targets: in each store, the median of every hook row <= 1.5x the median of inbox --unread
in the same store (the issue: "Hooks are fast (each within 1.5x a plain `inbox --unread`
in bench/)"). The CPU time (user + system) of each command, from the rusage of reaped
children (git children included), is in the details: load disturbs it less than the wall
time.

Checks, on every call (a failed one is a FAIL row and exit 1): exit status 0 and nothing
on stderr; session-start prints one JSON object of <= 2048 bytes with a non-empty string
hookSpecificOutput.additionalContext (hookEventName SessionStart); stop prints
{"decision": "block", "reason": ...} when something is new and nothing otherwise; prompt
prints hookSpecificOutput.additionalContext (hookEventName UserPromptSubmit) when something
is new and nothing otherwise. Once per store, a stop with "stop_hook_active": true and one
new message must print nothing (the message stays news for the next stop).

This script reports; it never fails on a missed target (exit 0), only when the benchmark
itself breaks or a check does not hold (exit 1). The temp dir is removed on every exit (a
failure, Ctrl-C, SIGTERM, SIGHUP); every process it starts is waited for.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (BenchError, Workspace, make_repo, median, meta,  # noqa: E402
                      report, summary, write_messages)
from sync_bench import fake_git_dir, git_subcommands  # noqa: E402

RATIO = 1.5
STORES = (1000, 10000)
SS_MAX = 2048        # bytes: session-start's whole output
TIMEOUT = 60         # s, for any one command
#: key -> (row name, argv, event for the stdin JSON or None, one new message first)
COMMANDS = {
    "inbox": ("inbox --unread (baseline)", ["inbox", "--unread"], None, False),
    "session-start": ("hook session-start", ["hook", "session-start"], "session-start",
                      False),
    "stop": ("hook stop, nothing new", ["hook", "stop"], "stop", False),
    "stop-new": ("hook stop, 1 new message (block)", ["hook", "stop"], "stop", True),
    "prompt": ("hook prompt, nothing new", ["hook", "prompt"], "prompt", False),
    "prompt-new": ("hook prompt, 1 new message", ["hook", "prompt"], "prompt", True),
}


def progress(msg):
    sys.stderr.write("[hook_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def hook_input(event, repo, active=False):
    """The JSON a host writes to a hook's stdin."""
    if event == "session-start":
        d = {"session_id": "s1", "hook_event_name": "SessionStart", "source": "startup",
             "cwd": repo}
    elif event == "stop":
        d = {"session_id": "s1", "cwd": repo, "hook_event_name": "Stop",
             "stop_hook_active": active}
    else:
        d = {"session_id": "s1", "hook_event_name": "UserPromptSubmit", "prompt": "go on",
             "cwd": repo}
    return json.dumps(d).encode()


def round_order(i):
    """Round i's order: the commands rotated by i // 2, reversed when i is odd."""
    keys = list(COMMANDS)
    k = (i // 2) % len(keys)
    keys = keys[k:] + keys[:k]
    return keys[::-1] if i % 2 else keys


class Bench:
    def __init__(self, ws):
        self.ws = ws
        self.rows = []
        self.info = {}
        self.failed = []          # checks that did not hold
        self.calls = 0
        self.sent = {}            # store size -> messages sent to bob with `thrum send`
        self.last_cpu = 0.0
        real_git = shutil.which("git", path=ws.env.get("PATH"))
        if real_git is None:
            raise BenchError("git is not on PATH")
        self.fakegit, self.counter = fake_git_dir(ws.root, real_git)

    # -- one command ------------------------------------------------------------------
    def call(self, key, repo, path=None):
        """One timed call of COMMANDS[key] as bob: (seconds, stdout bytes). Its CPU
        (user + system of it and its reaped children) is kept in self.last_cpu. Exit
        status and stderr are checked here, the output by the caller."""
        _, argv, event, _ = COMMANDS[key]
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        dt, p = self.ws.thrum_run(argv, repo, name="bob", check=False, timeout=TIMEOUT,
                                  input=hook_input(event, repo) if event else None,
                                  extra_env={"PATH": path} if path else None)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.last_cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        self.calls += 1
        if p.returncode != 0 or p.stderr:
            self.fail("%s: exit %d, stderr %r" % (" ".join(argv), p.returncode,
                                                  p.stderr.decode("utf-8", "replace")[-300:]))
        return dt, p.stdout

    def fail(self, msg):
        if len(self.failed) < 20:
            self.failed.append(msg)
        progress("CHECK FAILED: " + msg)

    def send(self, repo, n, text):
        self.ws.thrum_run(["send", text, "--to", "@bob", "-q"], repo, name="alice",
                          timeout=TIMEOUT)
        self.sent[n] = self.sent.get(n, 0) + 1

    # -- output checks ----------------------------------------------------------------
    def check(self, key, out, news=None):
        """Does the output of COMMANDS[key] hold? news: the number of new messages the
        call must tell of (None: what the key implies)."""
        name = COMMANDS[key][0]
        if news is None:
            news = 1 if COMMANDS[key][3] else 0
        if key == "inbox":
            if not out.strip():
                self.fail("inbox --unread printed nothing")
            return
        text = out.decode("utf-8", "replace")
        if key in ("stop", "prompt", "stop-new", "prompt-new") and news == 0:
            if out.strip():
                self.fail("%s printed %r, expected nothing" % (name, text[:200]))
            return
        lines = text.splitlines()
        try:
            d = json.loads(text)
        except ValueError:
            self.fail("%s: output is not one JSON object: %r" % (name, text[:200]))
            return
        if not isinstance(d, dict) or len(lines) != 1:
            self.fail("%s: output is not one JSON object on one line: %r"
                      % (name, text[:200]))
            return
        if key == "session-start":
            hso = d.get("hookSpecificOutput") or {}
            ctx = hso.get("additionalContext")
            if len(out) > SS_MAX:
                self.fail("session-start printed %d bytes (> %d)" % (len(out), SS_MAX))
            if not isinstance(ctx, str) or not ctx.strip() or \
                    hso.get("hookEventName") != "SessionStart":
                self.fail("session-start: no hookSpecificOutput.additionalContext for "
                          "SessionStart: %r" % text[:200])
            return
        if key.startswith("stop"):
            reason = d.get("reason")
            if d.get("decision") != "block" or not isinstance(reason, str):
                self.fail("%s: expected {\"decision\": \"block\", \"reason\": ...}, got %r"
                          % (name, text[:200]))
                return
        else:
            hso = d.get("hookSpecificOutput") or {}
            reason = hso.get("additionalContext")
            if hso.get("hookEventName") != "UserPromptSubmit" or not isinstance(reason,
                                                                                 str):
                self.fail("%s: no hookSpecificOutput.additionalContext for "
                          "UserPromptSubmit: %r" % (name, text[:200]))
                return
        want = "1 new message " if news == 1 else "%d new messages " % news
        if want not in reason or "@alice" not in reason:
            self.fail("%s: %r does not tell of %s from @alice" % (name, reason, want.strip()))

    # -- one store --------------------------------------------------------------------
    def setup(self, n):
        ws = self.ws
        repo = make_repo(os.path.join(ws.root, "repo-%d" % n), ws.env)
        ws.thrum_run(["quickstart", "--name", "alice", "--role", "impl", "--module", "a"],
                     repo, name="alice", timeout=TIMEOUT)
        ws.thrum_run(["agent", "register", "--name", "bob", "--role", "rev", "--module",
                      "b"], repo, name="bob", timeout=TIMEOUT)
        size = write_messages(ws.thrum, repo, "alice", "bob", n)
        dt, p = ws.thrum_run(["inbox", "--unread", "--json", "--limit", "1"], repo,
                             name="bob", timeout=TIMEOUT)
        try:
            unread = json.loads(p.stdout)["total"]
        except (ValueError, KeyError, TypeError):
            raise BenchError("inbox --unread --json printed %r" % p.stdout[:300])
        if unread != n:
            raise BenchError("bob has %d unread messages after writing %d" % (unread, n))
        progress("store @%d: %.1f MB of log, index built in %.2f s" % (n, size / 1e6, dt))
        return repo

    def measure_store(self, n, rounds):
        repo = self.setup(n)
        samples = {k: [] for k in COMMANDS}
        cpu = {k: [] for k in COMMANDS}
        self.call("inbox", repo)                     # warm-up, untimed
        # 1. the first stop tells of all n messages (and records them)
        first, out = self.call("stop", repo)
        first_cpu = self.last_cpu
        self.check("stop-new", out, news=n)
        # stop_hook_active: the host already let the agent go on once; nothing printed,
        # nothing recorded
        self.send(repo, n, "while a stop hook is active")
        _, p = self.ws.thrum_run(["hook", "stop"], repo, name="bob", check=False,
                                 timeout=TIMEOUT, input=hook_input("stop", repo, True))
        if p.returncode or p.stderr or p.stdout.strip():
            self.fail("hook stop with stop_hook_active: exit %d, stdout %r, stderr %r"
                      % (p.returncode, p.stdout[:200], p.stderr[:200]))
        _, out = self.call("stop", repo)             # so the next stop finds it
        self.check("stop-new", out)
        # 2. rounds (one untimed warm-up round first)
        for i in range(-1, rounds):
            for key in round_order(max(i, 0)):
                if COMMANDS[key][3]:
                    self.send(repo, n, "new for %s, round %d" % (key, i))
                dt, out = self.call(key, repo)
                self.check(key, out)
                if i >= 0:
                    samples[key].append(dt)
                    cpu[key].append(self.last_cpu)
            if i >= 0 and (i + 1) % 6 == 0:
                progress("@%d: %d rounds, medians %s" % (n, i + 1, " ".join(
                    "%s %.0f" % (k, median(samples[k]) * 1000) for k in COMMANDS)))
        # 3. git processes per command, with the counting shim first on PATH
        gits = {}
        path = self.fakegit + os.pathsep + self.ws.env.get("PATH", "")
        for key in ("inbox", "session-start", "stop", "prompt"):
            if os.path.exists(self.counter):
                os.unlink(self.counter)
            _, out = self.call(key, repo, path=path)
            self.check(key, out)
            try:
                with open(self.counter) as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                lines = []
            gits[key] = (len(lines), git_subcommands(lines))
        self.result_rows(n, samples, cpu, first, first_cpu, gits)
        _, p = self.ws.thrum_run(["inbox", "--unread", "--json", "--limit", "1"], repo,
                                 name="bob", timeout=TIMEOUT)
        total = json.loads(p.stdout)["total"]
        if total != n + self.sent[n]:
            self.fail("@%d: bob has %d unread, expected %d" % (n, total, n + self.sent[n]))
        rec = os.path.join(repo, ".thrum", "var", "delivered", "bob.jsonl")
        try:
            with open(rec, "rb") as f:
                data = f.read()
            recinfo = "%d lines, %.0f KB" % (data.count(b"\n"), len(data) / 1e3)
        except OSError:
            recinfo = "not found at %s" % rec
        self.info["@%d" % n].update({"unread at the end": total,
                                     "bob's delivered record": recinfo})

    def result_rows(self, n, samples, cpu, first, first_cpu, gits):
        base = median(samples["inbox"])
        cbase = median(cpu["inbox"])
        for key, (name, _, _, _) in COMMANDS.items():
            s = summary(samples[key])
            row = dict(store=n, command=key, name="%s @%d" % (name, n),
                       cpu_median_ms=median(cpu[key]) * 1000,
                       git_processes=gits.get(key, (None,))[0], **s)
            if key == "inbox":
                row.update(target="baseline")
            else:
                ratio = s["median_ms"] / 1000 / base
                row.update(ratio=ratio, delta_ms=s["median_ms"] - base * 1000,
                           target="<= %.1fx inbox" % RATIO, limit=RATIO,
                           status="PASS" if ratio <= RATIO else "MISS")
            self.rows.append(row)
        self.rows.append(dict(store=n, command="stop-first",
                              name="(info) first hook stop: %d new (block) @%d" % (n, n),
                              n=1, median_ms=first * 1000, ratio=first / base,
                              delta_ms=(first - base) * 1000, cpu_median_ms=first_cpu * 1000,
                              target="info"))
        self.info["@%d" % n] = {
            "p90_ms": " ".join("%s %.0f" % (k, summary(samples[k])["p90_ms"])
                               for k in COMMANDS),
            "cpu_ms (user+sys, median)": " ".join(
                "%s %.0f" % (k, median(cpu[k]) * 1000) for k in COMMANDS),
            "cpu x inbox": " ".join("%s %.2f" % (k, median(cpu[k]) / cbase)
                                    for k in COMMANDS if k != "inbox"),
            "git processes per call": " ".join(
                "%s %d%s" % (k, c, " (%s)" % ", ".join("%s %d" % kv for kv in sorted(
                    subs.items())) if subs else "") for k, (c, subs) in gits.items()),
            "first stop cpu_ms": "%.0f" % (first_cpu * 1000)}

    def checks_row(self):
        ok = not self.failed
        self.rows.append(dict(name="output checks: %d calls, %d failed"
                              % (self.calls, len(self.failed)), n=self.calls,
                              target="all hold", status="PASS" if ok else "FAIL"))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # run the finally blocks: the temp dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="timed rounds per store (default 24; 6 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke test, ~35 s)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    a = ap.parse_args(argv)
    runs = a.runs or (6 if a.quick else 24)
    if runs < 2:
        ap.error("--runs must be >= 2")
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    t_start = time.monotonic()
    load0 = os.getloadavg()
    try:
        with Workspace("thrum-bench-hook-", keep=a.keep) as ws:
            progress("temp dir %s, thrum.py sha256 %s, %d rounds per store%s"
                     % (ws.root, ws.thrum_sha256[:12], runs, ", quick" if a.quick else ""))
            b = Bench(ws)
            for n in STORES:
                b.measure_store(n, runs)
            b.checks_row()
            b.info["order"] = "rounds: " + " | ".join(
                ",".join(round_order(i)) for i in range(min(runs, 4))) + " | ..."
            b.info["sent to bob with thrum send"] = " ".join(
                "@%d %d" % kv for kv in b.sent.items())
            m = meta(ws, runs=runs, quick=a.quick, stores=list(STORES),
                     elapsed_s=round(time.monotonic() - t_start, 1),
                     loadavg_1m_start_end=[round(load0[0], 2),
                                           round(os.getloadavg()[0], 2)])
            m["details"] = b.info
    except BenchError as e:
        sys.stderr.write("hook_bench: benchmark failed: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("hook_bench: interrupted\n")
        return 130
    report("hook_bench", "thrum hook session-start|stop|prompt against inbox --unread", m,
           b.rows, b.info, a.json)
    if not a.json:
        print("  load (1 min): %.1f -> %.1f on %s cpus" % (
            m["loadavg_1m_start_end"][0], m["loadavg_1m_start_end"][1], m["cpus"]))
    if b.failed:
        sys.stderr.write("hook_bench: checks failed: %s\n" % "; ".join(b.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
