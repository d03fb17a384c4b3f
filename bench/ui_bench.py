#!/usr/bin/env python3
"""The web page: how fast a message reaches `thrum ui`'s page in a real browser, against
`thrum watch`'s wake-up in the same run, and what an open page costs (issue 21; SPEC §18).

    python3 bench/ui_bench.py [--runs N] [--quick] [--json] [--keep] [--only 1,2]

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (the test extra
installs it): a benchmark may use more than the standard library when what it measures
lives in a browser. One store of 10,000 messages (alice -> bob, benchlib.write_messages),
every command through the installed launcher (benchlib's snapshot of thrum.py), daemons
started and stopped with `thrum daemon start|stop` (daemon_bench's Bench).

  1. page wake-up: `thrum ui --no-open --json` (as `user`), its page open in one headless
     Chromium. The page's own script is not touched: a MutationObserver installed with
     Selenium records Date.now() when a message's element (li.msg[data-id]) is first added
     to #feed. Each trial sends a fresh message (`thrum send TEXT --to @bob --json` as
     alice); latency = the send process returning (time.time() in this script: the same
     wall clock as the browser's Date.now(), on one machine) -> the element added, and
     also from the message's created_at. Compared with wake_bench's watch trial (`thrum
     watch --agent bob`: send returns -> its line arrives on a pipe), measured in the same
     run: ABBA blocks of 5 (daemon, direct, direct, daemon, ...), in each block a page
     sub-block and a watch sub-block in alternating order, each with one untimed warm-up
     trial; only one client runs during a trial (the page's server is started for its
     sub-block and stopped after it, so no stream or feed step outlives it). Every client
     is blocked before each send: `settle` seconds (1.5 s: the page refreshes its lists one
     second after a message, and that must be over), and with a daemon until
     `daemon_status` reports a blocked wait (the page's feed step is one). Target: page
     median <= 1.5x the watch's median per mode, from the send returning and from
     created_at (where a median is <= 0 the medians are compared: page <= watch).
  2. CPU of the page's server: the `thrum ui` process's utime+stime from /proc over a
     window of 30 s (10 s --quick), 1.5 s after start, with no page open and with one
     open page, per mode. Then a send must still reach the page. Targets as a blocked
     watch's: with a daemon <= 0.2 %, without <= 1 % of a core (with no page open: <= 0.2 %
     in both modes: an idle server costs nothing).
  (info) One step of the `feed` operation in process at 10,000 messages: the look that
     runs when the log changed (catch up, the arrivals query, signature), median of 20.

This script reports; it never fails on a missed target (exit 0), only when the benchmark
itself breaks (exit 1). Pages, servers, watches, daemons, the browser and the temp dir are
cleaned up on every exit. CPU comes from /proc: Linux only.
"""

import argparse
import io
import json
import os
import shutil
import signal
import sys
import time

sys.dont_write_bytecode = True  # leave no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemon_bench as db  # noqa: E402
import wake_bench as wb  # noqa: E402
from benchlib import BenchError, Workspace, median, meta  # noqa: E402
from daemon_bench import CLK_TCK, abba, _terminate, proc_cpu  # noqa: E402

SECTIONS = {1: "page wake-up vs watch", 2: "CPU of the page's server"}
TARGET = 1.5
MODES = (("direct", "no daemon"), ("daemon", "daemon"))

#: Records when each message's element is first added to the feed; `__thrumWait(id, cb)`
#: calls back with that time (at once, or when it comes).
OBSERVER = """
window.__seen = {}; window.__waiters = {};
window.__thrumWait = function (id, cb) {
  if (window.__seen[id]) { cb(window.__seen[id]); } else { window.__waiters[id] = cb; }
};
new MutationObserver(function (records) {
  var t = Date.now();
  records.forEach(function (r) {
    r.addedNodes.forEach(function (n) {
      var id = n.dataset && n.dataset.id;
      if (id && !window.__seen[id]) {
        window.__seen[id] = t;
        if (window.__waiters[id]) { window.__waiters[id](t); delete window.__waiters[id]; }
      }
    });
  });
}).observe(document.getElementById("feed"), {childList: true});
"""


def progress(msg):
    sys.stderr.write("[ui_bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


db.progress = wb.progress = progress
db.SECTIONS = SECTIONS
wb.TARGET = TARGET  # wake_bench's ratio_row compares against this


def browser(root):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,900"):
        opts.add_argument(flag)
    opts.add_argument("--user-data-dir=" + os.path.join(root, "chromium"))
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    d = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    d.set_script_timeout(35)
    return d


class Stream:
    """The page's event stream read by a plain HTTP client in a thread: when each
    message's `messages` event arrived (time.monotonic()), to split the page's latency
    into the server's part and the browser's."""

    def __init__(self, url):
        import http.client
        import threading
        from urllib.parse import urlsplit
        u = urlsplit(url)
        self.seen, self._cv = {}, threading.Condition()
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        self.conn.request("GET", "/api/events", headers={
            "Host": u.netloc, "X-Thrum-Token": u.query.split("token=", 1)[1]})
        self.resp = self.conn.getresponse()
        if self.resp.status != 200:
            raise BenchError("the event stream answered %d" % self.resp.status)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for line in iter(self.resp.fp.readline, b""):
                if line.startswith(b'data: {"messages"'):
                    t = time.monotonic()
                    with self._cv:
                        for m in json.loads(line[6:])["messages"]:
                            self.seen.setdefault(m["message_id"], t)
                        self._cv.notify_all()
        except (OSError, ValueError):
            pass

    def arrival(self, mid, timeout):
        with self._cv:
            if not self._cv.wait_for(lambda: mid in self.seen, timeout):
                raise BenchError("the event stream did not carry %s" % mid)
            return self.seen[mid]

    def close(self):
        try:
            self.conn.sock.shutdown(2)
        except (OSError, AttributeError):
            pass
        self.conn.close()


class Bench(wb.Bench):
    """wake_bench's Bench (store, daemons, watches, rows) plus a page in a browser."""

    def __init__(self, ws, a):
        super().__init__(ws, a)
        self.driver = None

    def cleanup(self):
        if self.driver is not None:
            try:
                self.driver.quit()
            except Exception:  # noqa: BLE001 - it is going anyway
                pass
        super().cleanup()

    def start_ui(self):
        p = self.spawn(["ui", "--no-open", "--json"], name=None)
        got = p.line(b'"url"', 30)
        if got is None:
            raise BenchError("thrum ui printed no address: %r" % (p.output(),))
        return p, json.loads(got[1])["url"]

    def stop_ui(self, p):
        if not p.stop(10):
            p.kill()
            raise BenchError("thrum ui did not exit within 10 s of SIGTERM")
        if p.returncode != 0:
            raise BenchError("thrum ui exited %s on SIGTERM: %r" % (p.returncode,
                                                                     p.output()))

    def open_page(self, url):
        d = self.driver
        d.get(url)
        deadline = time.monotonic() + 20
        while "live" not in d.find_element("id", "conn").text:
            if time.monotonic() > deadline:
                raise BenchError("the page did not go live within 20 s")
            time.sleep(0.05)
        d.execute_script(OBSERVER)

    def seen(self, mid):
        """When the page added the message's element (monotonic), waiting for it."""
        t_ms = self.driver.execute_async_script(
            "window.__thrumWait(arguments[0], arguments[arguments.length - 1]);", mid)
        if not isinstance(t_ms, (int, float)):
            raise BenchError("the page did not show %s" % mid)
        return t_ms / 1000.0 - (time.time() - time.monotonic())

    def page_block(self, mode, k, settle):
        p, url = self.start_ui()
        try:
            self.open_page(url)
            stream = Stream(url)  # a plain HTTP client on the same stream (info)
            for i in range(k + 1):
                if not self.blocked(p, mode == "daemon", settle, "page"):
                    raise BenchError("the page's feed did not reach the daemon")
                sent = self.send()
                t = self.seen(sent[0])
                ts = stream.arrival(sent[0], 10)
                if i:
                    self.record("page", mode, t, sent)
                    self.record("stream", mode, ts, sent)
            stream.close()
            self.driver.get("about:blank")
        except BaseException:
            p.kill()
            raise
        self.stop_ui(p)

    def watch_block2(self, mode, k, settle):
        """wake_bench's watch sub-block with this script's settle before each send."""
        since = self.thrum.now_ts(time.time())
        w = self.start_watch(mode, settle + 0.5)
        mids = []
        try:
            for i in range(k + 1):
                if i and not self.blocked(w, mode == "daemon", settle, "watch"):
                    raise BenchError("the watch did not reach the daemon")
                sent = self.send()
                mids.append(sent[0])
                got = w.line(sent[0].encode(), 35)
                if got is None:
                    raise BenchError("thrum watch printed no line for %s" % sent[0])
                if i:
                    self.record("watch", mode, got[0], sent)
        except BaseException:
            w.kill()
            raise
        self.stop_watch(w)
        self.drain(since, mids)

    # -- section 1 ----------------------------------------------------------------------
    def sec_page(self, runs, settle):
        for b, (mode, k) in enumerate(abba(runs, 5)):
            self.set_mode(self.repo, mode)
            order = ("page", "watch") if b % 2 == 0 else ("watch", "page")
            for c in order:
                (self.page_block if c == "page" else self.watch_block2)(mode, k, settle)
            progress("block %d: %d trials each of %s, %s" % (b + 1, k, ", ".join(order),
                                                            mode))
        for mode, label in MODES:
            pg = self.lat_row(1, "page: send returns -> element, " + label, "page", mode)
            wa = self.lat_row(1, "(ref) watch: send returns -> line, " + label, "watch",
                              mode)
            self.lat_row(1, "(info) the page's stream, read by a plain HTTP client, " +
                         label, "stream", mode)
            self.ratio_row(1, "page / watch, " + label, pg, wa)
            self.ratio_row(1, "page / watch, from created_at, " + label, pg, wa,
                           created=True)
        self.info["1 page wake-up"] = {
            "settle_s": settle, "order": "ABBA blocks of 5, page and watch sub-blocks "
            "alternated, 1 warm-up trial per sub-block", "clock": "Date.now() in the page "
            "vs time.time() here (one machine), moved onto time.monotonic()"}

    # -- section 2 ----------------------------------------------------------------------
    def sec_cpu(self, window, startup=1.5):
        for mode, label in (("daemon", "daemon"), ("direct", "no daemon")):
            self.set_mode(self.repo, mode)
            for page in (False, True):
                p, url = self.start_ui()
                try:
                    if page:
                        self.open_page(url)
                    time.sleep(startup)
                    c0, t0 = proc_cpu(p.pid), time.monotonic()
                    time.sleep(window)
                    c1, t1 = proc_cpu(p.pid), time.monotonic()
                    if not p.running():
                        raise BenchError("thrum ui exited during the window")
                    extra = ""
                    if page:
                        sent = self.send("end of the window")
                        t = self.seen(sent[0])
                        extra = "; then a send reached the page in %.1f ms" % (
                            (t - sent[2]) * 1000)
                        self.driver.get("about:blank")
                except BaseException:
                    p.kill()
                    raise
                self.stop_ui(p)
                wall = t1 - t0
                cpu = (c1[0] - c0[0]) / wall * 100
                ticks = int(round((c1[0] - c0[0]) * CLK_TCK))
                lim = 0.2 if mode == "daemon" or not page else 1.0
                self.row(2, "thrum ui CPU, %s, %s" % (
                    "one page open" if page else "no page open", label), cpu, "%",
                    "<= %g %%" % lim, lim, detail="%d ticks of 1/%d s in %.1f s%s" % (
                        ticks, CLK_TCK, wall, extra), window_s=round(wall, 2))
            progress("ui CPU: %s measured" % label)
        self.info["2 ui CPU"] = {"window_s": window, "sampled_after_s": startup}

    def feed_look(self, n=20):
        """One feed step that finds a message, in process (info)."""
        t = self.thrum
        caller = t.Caller(self.repo, dict(self.ws.env), "bob")
        store = t.Store(t.locate(self.repo), caller.env)  # kept open, as a server does
        since = t.now_ts(time.time() - 1.0)  # (the store's messages arrived before)
        self.send("for the feed look")
        xs = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                r = t.call("feed", {"timeout": 0, "since": since}, caller, store)
                xs.append(time.perf_counter() - t0)
                if len(r["messages"]) != 1:
                    raise BenchError("the feed step found %d messages, not 1"
                                     % len(r["messages"]))
        finally:
            store.close()
        self.row(1, "(info) one feed step that finds a message, in process, 10,000 "
                 "messages", median(xs) * 1000, "ms", n=n,
                 detail="min %.1f, max %.1f ms" % (min(xs) * 1000, max(xs) * 1000))


def print_report(m, rows, info):
    buf = io.StringIO()
    db.print_report(m, rows, info, buf)
    sys.stdout.write(buf.getvalue().replace("thrum daemon (", "thrum ui (", 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None,
                    help="timed trials per client and mode (default 20; 10 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer trials and 10 s CPU windows (smoke test, ~2.5 min)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (debugging)")
    ap.add_argument("--only", default="1,2", help="sections to run, e.g. 1")
    a = ap.parse_args(argv)
    q = a.quick
    runs = a.runs or (10 if q else 20)
    if runs < 2:
        ap.error("--runs must be >= 2")
    try:
        only = {int(x) for x in a.only.split(",") if x.strip()}
    except ValueError:
        ap.error("--only takes section numbers, e.g. 1")
    if not only or not only <= set(SECTIONS):
        ap.error("--only takes section numbers 1-2")
    if not os.path.isdir("/proc/self"):
        sys.stderr.write("ui_bench: needs /proc (Linux)\n")
        return 1
    import importlib.util
    if importlib.util.find_spec("selenium") is None:
        sys.stderr.write("ui_bench: needs the selenium package (pip install selenium)\n")
        return 1
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or \
            not shutil.which("chromedriver"):
        sys.stderr.write("ui_bench: needs chromium and chromedriver (apt-get install "
                         "chromium chromium-driver)\n")
        return 1
    window = 10.0 if q else 30.0
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    t_start = time.monotonic()
    load0 = os.getloadavg()
    try:
        with Workspace("thrum-bench-ui-", keep=a.keep) as ws:
            b = Bench(ws, a)
            progress("temp dir %s, thrum.py sha256 %s, %d runs%s"
                     % (ws.root, ws.thrum_sha256[:12], runs, ", quick" if q else ""))
            try:
                b.driver = browser(ws.root)
                b.repo = b.make_store("store-10000", 10000)
                progress("store 10000 ready")
                time.sleep(2.0)  # bob's first watch starts a second back: let them age
                if 1 in only:
                    b.feed_look()
                    b.sec_page(runs, settle=1.5)
                if 2 in only:
                    b.sec_cpu(window)
                b.set_mode(b.repo, "direct")
            finally:
                b.cleanup()
            m = meta(ws, runs=runs, quick=q, sections=sorted(only),
                     elapsed_s=round(time.monotonic() - t_start, 1),
                     loadavg_1m_start_end=[round(load0[0], 2), round(os.getloadavg()[0], 2)])
            m["details"] = b.info
    except BenchError as e:
        sys.stderr.write("ui_bench: benchmark failed: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("ui_bench: interrupted\n")
        return 130
    if a.json:
        json.dump({"benchmark": "ui_bench", "meta": m, "results": b.rows}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
    else:
        print_report(m, b.rows, b.info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
