"""`thrum ui` (SPEC §18): the page in a real browser, its HTTP checks, the CLI's errors.

The browser is Debian's headless Chromium driven by Selenium (`chromium`, `chromium-driver`
and the `selenium` package, which `.ci/run` installs): one browser for the module, shared
by its tests. The HTTP checks (token, Host, Origin, limits, headers) and the event stream
use urllib and http.client, so they run without a browser too. Set THRUM_UI_SCREENSHOT to
a path (docs/ui.png) to save the screenshot docs/ui.md shows.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from urllib.parse import urlsplit

import pytest

from conftest import (THRUM_CMD, assert_error, make_repo, make_team, run_thrum, thrum,
                      wait_until)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    from selenium.common.exceptions import NoAlertPresentException
except ImportError:  # pragma: no cover - CI installs it
    selenium = None

#: Bodies an agent might send to attack the page: each would set window.__pwned (or show
#: an alert, or add an element) if the page ever treated a body as HTML or a link.
PAYLOADS = (
    "<script>window.__pwned = 1</script>",
    "<img src=x onerror=\"window.__pwned = 2; alert(2)\">",
    "[click me](javascript:window.__pwned=3)",
    "**bold** <a href=\"javascript:window.__pwned=4\">link</a> <b onmouseover=alert(5)>b</b>",
    "```html\n<iframe src=\"javascript:window.__pwned=6\"></iframe>\n```\n<svg onload=alert(7)>",
    "</li></ol><style>body{display:none}</style><div id=\"status\">fake</div>",
)
#: ...and a ref (tags are shown too).
REF_PAYLOAD = "x:<img src=y onerror=window.__pwned=8>"


# --------------------------------------------------------------------------- the server

def read_line(pipe, timeout):
    """One line from a child's binary stdout, within `timeout` seconds."""
    buf, deadline = b"", time.monotonic() + timeout
    fd = pipe.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"no line from thrum ui within {timeout}s (got {buf!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"thrum ui ended before printing its address (got {buf!r})")
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


class Ui:
    """A running `thrum ui --no-open --json` for a team."""

    def __init__(self, procs, team, *args):
        self.bg = procs.thrum(team.path, team.env, "ui", "--no-open", "--json", *args)
        doc = json.loads(read_line(self.bg.p.stdout, 30))
        self.url, self.port, self.agent = doc["url"], doc["port"], doc["agent"]
        parts = urlsplit(self.url)
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.host = parts.netloc
        self.token = parts.query.split("token=", 1)[1]

    def request(self, method, path, body=None, headers=None, token=True):
        """(status, headers, body bytes) of one request through http.client (which sends
        exactly the headers given, plus Host)."""
        h = {"Host": self.host}
        if token:
            h["X-Thrum-Token"] = self.token
        h.update(headers or {})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.items():
                c.putheader(k, v)
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            if data is not None and "Content-Length" not in h:
                c.putheader("Content-Length", str(len(data)))
            c.endheaders(data)
            r = c.getresponse()
            return r.status, r.headers, r.read()
        finally:
            c.close()

    def post(self, path, body, **headers):
        h = {"Origin": self.base, "Content-Type": "application/json"}
        h.update(headers)
        return self.request("POST", path, body, {k: v for k, v in h.items() if v is not None})

    def stop(self):
        """SIGTERM ends it cleanly: exit 0, no traceback."""
        self.bg.p.send_signal(signal.SIGTERM)
        self.bg.finish(timeout=20)
        assert self.bg.code == 0, self.bg.err
        assert "Traceback" not in self.bg.err


# --------------------------------------------------------------------------- the browser

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and selenium),
    reason="needs Debian's chromium and chromium-driver and the selenium package "
           "(.ci/run installs them)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module's browser tests."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,860"):
        opts.add_argument(flag)
    opts.add_argument("--user-data-dir=" + str(tmp_path_factory.mktemp("chromium")))
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def element(driver, css, timeout=10, what=None):
    """Wait for an element (a deadline, not a sleep) and return it."""
    return wait_until(lambda: (driver.find_elements("css selector", css) or [None])[0],
                      timeout, what or f"{css} in the page")


def text(driver, css):
    """The text of the element `css` names now ("" when there is none), read in the page:
    no element reference that a redraw could make stale."""
    return js(driver, "var e = document.querySelector(arguments[0]);"
                      "return e ? e.textContent : '';", css)


def click(driver, css):
    """Click the element `css` names, found afresh (the page may have redrawn it)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt():
        try:
            element(driver, css).click()
            return True
        except StaleElementReferenceException:
            return False
    wait_until(attempt, 10, f"a click on {css}")


def msg_css(mid):
    return f'#feed li.msg[data-id="{mid}"]'


def status_says(driver, *fragments, timeout=10):
    def check():
        line = driver.find_element("id", "status").text
        return line if all(f in line for f in fragments) else None
    return wait_until(check, timeout, f"#status to say {fragments}")


def send_from_page(driver, body, to=None):
    form = driver.find_element("id", "send-form")
    if to is not None:
        field = form.find_element("name", "to")
        field.clear()
        field.send_keys(to)
    area = form.find_element("name", "body")
    area.clear()
    area.send_keys(body)
    form.find_element("xpath", ".//button[normalize-space()='Send']").click()


def open_page(driver, ui, via=None):
    """Open the printed address (or click it on the page `via`, another site): the token
    becomes a cookie and leaves the address bar."""
    if via is None:
        driver.get(ui.url)
    else:
        via.write_text(f'<a id="go" href="{ui.url}">the page</a>')
        driver.get(via.as_uri())
        driver.find_element("id", "go").click()
    wait_until(lambda: driver.current_url == ui.base + "/", 10, "the redirect to the clean URL")
    element(driver, '#conn', what="the page")
    wait_until(lambda: "live" in driver.find_element("id", "conn").text, 10,
               "the event stream to be open")


def assert_clean_console(driver):
    """Nothing refused by the Content-Security-Policy, no script error (a refused request,
    such as a send to an unknown agent, is logged by the network and is not one)."""
    bad = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and
           e.get("source") != "network"]
    assert not bad, bad


def assert_nothing_ran(driver):
    assert js(driver, "return typeof window.__pwned") == "undefined"
    try:
        alert = driver.switch_to.alert
        said = alert.text
        alert.dismiss()
        pytest.fail(f"an alert ran: {said!r}")
    except NoAlertPresentException:
        pass
    # no element came from a body: the page itself puts none of these in the feed
    assert js(driver, "return document.querySelectorAll('#feed img, #feed script, "
                      "#feed iframe, #feed svg, #feed a, #feed style, #feed b').length") == 0
    assert js(driver, "return document.querySelectorAll('#status').length") == 1


# --------------------------------------------------------------------------- tests

@needs_browser
def test_page_shows_the_team_and_live_feed_and_writes_as_the_human(tmp_path, procs, browser):
    team = make_team(tmp_path)
    first = team.seed("alice", "please review the auth change", to=["bob"], refs=["bd:bd-7"])
    attacks = [team.seed("alice", body, to=["bob"]) for body in PAYLOADS]
    tagged = team.seed("carol", "see the ref", to=["alice"], refs=[REF_PAYLOAD])
    ui = Ui(procs, team)
    assert ui.agent == "user"
    open_page(browser, ui)

    # the team, with the human registered as role human on first use
    for name in ("alice", "bob", "carol", "user"):
        element(browser, f'#team tr[data-agent="{name}"]')
    assert text(browser, '#team tr[data-agent="user"] .role') == "human"
    roles = {m["agent_id"]: m["role"] for m in team.t.json("team", "--all")["members"]}
    assert roles["user"] == "human"

    # existing messages, bodies and tags as text: nothing runs, nothing is injected
    element(browser, msg_css(first["message_id"]))
    for m, body in zip(attacks, PAYLOADS):
        li = element(browser, msg_css(m["message_id"]))
        assert js(browser, "return arguments[0].querySelector('.body').textContent", li) == body
    li = element(browser, msg_css(tagged["message_id"]))
    assert REF_PAYLOAD in js(browser, "return arguments[0].textContent", li)
    assert_nothing_ran(browser)

    # filters (a ref, an agent, a role) over the messages in the page
    def shown():
        return set(js(browser, "return Array.from(document.querySelectorAll("
                               "'#feed li.msg:not([hidden])'), e => e.dataset.id)"))
    everything = shown()
    browser.find_element("id", "f-ref").send_keys("bd:bd-7")
    assert shown() == {first["message_id"]}
    browser.find_element("id", "f-ref").clear()
    js(browser, "var s = document.getElementById('f-agent'); s.value = 'carol';"
                "s.dispatchEvent(new Event('change'))")
    assert shown() == {tagged["message_id"]}  # from or to carol
    js(browser, "var s = document.getElementById('f-agent'); s.value = '';"
                "s.dispatchEvent(new Event('change'));"
                "var r = document.getElementById('f-role'); r.value = 'implementer';"
                "r.dispatchEvent(new Event('change'))")
    assert shown() == everything  # alice (implementer) wrote or received every one
    js(browser, "var r = document.getElementById('f-role'); r.value = '';"
                "r.dispatchEvent(new Event('change'))")
    assert shown() == everything

    # search: the hits, or "search unavailable" in a thrum without the operation
    form = browser.find_element("id", "search-form")
    form.find_element("name", "q").send_keys("auth")
    form.find_element("css selector", "button").click()
    if "search" in thrum.OPS:
        element(browser, f'#results li.result[data-id="{first["message_id"]}"]')
    else:
        wait_until(lambda: "search unavailable" in browser.find_element("id", "results").text,
                   10, "the page to say search is unavailable")

    # a message sent with the CLI appears without a reload
    js(browser, "window.__same_page = true")
    sent = team.send("alice", "live from the CLI", "--to", "@bob")
    element(browser, msg_css(sent["message_id"]), what="the CLI's message in the feed")
    assert text(browser, msg_css(sent["message_id"]) + " .body") == "live from the CLI"
    assert js(browser, "return window.__same_page") is True

    # sending from the page reaches bob's CLI inbox as from @user
    send_from_page(browser, "ship it after the review", to="@bob")
    status_says(browser, "Sent:", "@bob")
    got = [m for m in team.inbox("bob", "--limit", "50")["messages"]
           if m["body"]["content"] == "ship it after the review"]
    assert len(got) == 1 and got[0]["agent_id"] == "user", got

    # the CLI's rules and one-line errors, in the page; nothing stored
    before = team.t.json("inbox", "--all", "--limit", "1", name="alice")["total"]
    send_from_page(browser, "to nobody", to="@nobody")
    status_says(browser, "thrum: error: unknown recipient", "@nobody")
    browser.find_element("css selector", "#send-form [name=to]").clear()
    assert team.t.json("inbox", "--all", "--limit", "1", name="alice")["total"] == before

    # replying from the page: to bob's question, in its thread
    question = team.send("bob", "which branch should I use?", "--to", "@user")
    li = element(browser, msg_css(question["message_id"]))
    assert "unread" in li.get_attribute("class")
    click(browser, msg_css(question["message_id"]) + " button.reply")
    send_from_page(browser, "use feat/auth")
    status_says(browser, "Replied:")
    replies = [m for m in team.inbox("bob", "--limit", "50")["messages"]
               if m["reply_to"] == question["message_id"]]
    assert [(m["agent_id"], m["body"]["content"]) for m in replies] == [("user", "use feat/auth")]

    # marking read: carol sees the receipt
    note = team.send("carol", "fyi: db migration tonight", "--to", "@user")
    li = element(browser, msg_css(note["message_id"]))
    click(browser, msg_css(note["message_id"]) + " button.mark-read")
    wait_until(lambda: [r["read_at"] for m in team.t.json("sent", name="carol")["messages"]
                        if m["message_id"] == note["message_id"] for r in m["receipts"]
                        if r["agent_id"] == "user"] != [None], 10, "the read receipt")

    # a thread and a message's receipts, in the page; the team's counts follow
    click(browser, msg_css(question["message_id"]) + " button.thread-btn")
    element(browser, f'#thread li.tmsg[data-id="{replies[0]["message_id"]}"]')
    assert len(browser.find_elements("css selector", "#thread li.tmsg")) == 2
    mine = msg_css(replies[0]["message_id"])
    click(browser, mine + " button.receipts-btn")
    wait_until(lambda: "@bob: read" in text(browser, mine + " .receipts"),
               10, "the reply's receipts (bob's inbox marked it read)")
    wait_until(lambda: text(browser, '#team tr[data-agent="user"] .unread') == "0", 10,
               "the team's unread count for @user to follow")
    shot = os.environ.get("THRUM_UI_SCREENSHOT")
    if shot:
        browser.set_window_size(1400, 860)
        browser.save_screenshot(shot)
    assert_nothing_ran(browser)
    assert_clean_console(browser)
    ui.stop()


@needs_browser
def test_page_with_a_daemon(tmp_path, procs, browser):
    team = make_team(tmp_path)
    daemon = procs.daemon(team.path, team.env)
    old = team.seed("alice", "before the page", to=["bob"])
    ui = Ui(procs, team, "--as", "lead")
    open_page(browser, ui, via=tmp_path / "link.html")  # a link on another site works too
    element(browser, '#team tr[data-agent="lead"]')
    element(browser, msg_css(old["message_id"]))
    sent = team.send("bob", "through the daemon", "--to", "@alice")
    element(browser, msg_css(sent["message_id"]), what="the message sent with a daemon")
    send_from_page(browser, "hello from the lead", to="alice")
    status_says(browser, "Sent:", "@alice")
    got = [m for m in team.inbox("alice", "--limit", "50")["messages"]
           if m["agent_id"] == "lead"]
    assert [m["body"]["content"] for m in got] == ["hello from the lead"]
    assert_clean_console(browser)
    ui.stop()
    assert daemon.alive(), "the daemon died during the test"


def test_requests_without_the_token_or_from_elsewhere_are_refused(tmp_path, procs):
    team = make_team(tmp_path)
    ui = Ui(procs, team)

    def log_size():
        return sum(p.stat().st_size for p in team.log.rglob("*.jsonl"))

    # the token in the address: a cookie (HttpOnly, SameSite=Strict), then the clean URL
    status, headers, body = ui.request("GET", "/?token=" + ui.token, token=False)
    assert status == 200 and b'http-equiv="refresh" content="0; url=/"' in body
    cookie = headers["Set-Cookie"]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    cookie = cookie.split(";")[0]
    status, headers, page = ui.request("GET", "/", token=False, headers={"Cookie": cookie})
    assert status == 200
    csp = headers["Content-Security-Policy"]
    nonce = csp.split("script-src 'nonce-", 1)[1].split("'", 1)[0]
    for part in ("default-src 'none'", f"style-src 'nonce-{nonce}'", "connect-src 'self'",
                 "base-uri 'none'", "frame-ancestors 'none'", "form-action 'self'"):
        assert part in csp, csp
    assert page.count(b"<script") == page.count(f'<script nonce="{nonce}">'.encode()) == 1
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"

    # no token, a wrong one, a foreign Host (DNS rebinding): refused, one line
    for path, kw in (("/", {"token": False}), ("/?token=wrong", {"token": False}),
                     ("/api/team", {"token": False}),
                     ("/api/team", {"token": False, "headers": {"X-Thrum-Token": "nope"}}),
                     ("/api/team", {"token": False, "headers": {"Cookie": "thrum_ui_1=x"}}),
                     ("/api/team", {"headers": {"Host": f"evil.example:{ui.port}"}})):
        status, _, body = ui.request("GET", path, **kw)
        assert status == 403, (path, kw, body)
        assert body.count(b"\n") <= 1 and b"Traceback" not in body
    status, _, body = ui.request("GET", "/api/team")
    assert status == 200 and "agents" in json.loads(body)

    # a state-changing request needs the token AND this page's Origin AND JSON
    send = {"to": "@bob", "body": "forged"}
    for extra in ({"Origin": "http://evil.example"}, {"Origin": None},
                  {"Origin": f"http://localhost:{ui.port + 1}"}, {"Origin": "null"}):
        status, _, body = ui.post("/api/send", send, **extra)
        assert status == 403, (extra, body)
        assert "error" in json.loads(body)
    status, _, _ = ui.request("POST", "/api/send", send, token=False,
                              headers={"Origin": ui.base, "Content-Type": "application/json"})
    assert status == 403
    assert ui.post("/api/send", send, **{"Content-Type": "text/plain"})[0] == 415
    assert ui.post("/api/send", b"x" * 16, **{"Content-Length": str(64 << 20)})[0] == 413
    assert ui.post("/api/send", b"{not json")[0] == 400
    assert ui.request("PUT", "/api/send", b"{}")[0] == 405
    assert ui.request("GET", "/api/send")[0] == 405
    assert ui.request("GET", "/etc/passwd")[0] == 404
    assert ui.request("GET", "/" + "a" * 5000)[0] == 414
    with socket.create_connection(("127.0.0.1", ui.port), timeout=10) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")  # http.server's own refusal: one line too
        answer = raw.recv(65536)  # (no status line: an HTTP/0.9-style request gets none)
    assert answer.startswith(b"thrum ui: Bad request") and answer.count(b"\n") == 1
    assert log_size() and all(m["agent_id"] != "user" for m in team.inbox("bob")["messages"])
    size = log_size()

    # reads: who-has, and search (501 where this thrum has no search operation)
    status, _, body = ui.request("GET", "/api/who-has?path=README")
    assert status == 200 and json.loads(body) == {"path": "README", "agents": []}
    status, _, body = ui.request("GET", "/api/search?q=forged")
    assert status == (200 if "search" in thrum.OPS else 501), body

    # an operation's error: the CLI's line, its exit code, nothing stored
    status, _, body = ui.post("/api/send", {"to": "@nobody", "body": "x"})
    assert status == 400 and json.loads(body)["error"].startswith("unknown recipient: @nobody")
    status, _, body = ui.post("/api/send", {"to": "@bob", "body": "   "})
    assert status == 400 and json.loads(body)["error"] == "empty message body"
    assert log_size() == size

    # the event stream (no browser needed): hello, then each message as it arrives
    c = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=20)
    c.request("GET", "/api/events", headers={"Host": ui.host, "X-Thrum-Token": ui.token})
    r = c.getresponse()
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = []

    def next_event(name):
        while True:
            ev = {}
            for line in iter(r.fp.readline, b""):
                line = line.decode().rstrip("\n")
                if not line:
                    break
                key, _, value = line.partition(": ")
                ev[key] = value
            if ev.get("event") == name:
                return json.loads(ev["data"])
            events.append(ev)
    assert next_event("hello")["me"]["agent_id"] == "user"
    sent = team.send("alice", "over the stream", "--to", "@bob")
    got = next_event("messages")["messages"]
    assert [m["message_id"] for m in got] == [sent["message_id"]]
    assert got[0]["body"]["content"] == "over the stream"
    team.inbox("bob")  # receipts: not a message, but the page's counts change
    assert next_event("changed") == {"reset": False}
    c.close()

    # and a good request stores (the control)
    status, _, body = ui.post("/api/send", send)
    assert status == 200 and json.loads(body)["recipients"] == ["bob"]
    ui.stop()


def test_ui_refuses_a_bad_port_or_address(tmp_path):
    team = make_team(tmp_path)
    t = team.t
    t.fail(2, "ui", "--no-open", "--port", "70000", fragments=["invalid --port 70000"])
    t.fail(2, "ui", "--no-open", "--port", "http", fragments=["--port"])
    t.fail(2, "ui", "--no-open", "--bind", "999.1.1.1", fragments=["invalid --bind"])
    t.fail(2, "ui", "--no-open", "--bind", "192.0.2.1", fragments=["cannot listen"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        t.fail(2, "ui", "--no-open", "--port", str(busy), fragments=["cannot listen"])
    t.fail(2, "ui", "--no-open", "--as", "Not A Name", fragments=["invalid agent name"])
    # a refused start registers nobody
    assert "user" not in {m["agent_id"] for m in t.json("team", "--all")["members"]}
    elsewhere = make_repo(tmp_path / "other", env=team.env)
    assert_error(run_thrum(["ui", "--no-open"], elsewhere, team.env), 3, "not initialised")


def test_other_commands_do_not_load_the_web_server(tmp_path):
    team = make_team(tmp_path)
    p = subprocess.run([THRUM_CMD[0], "-X", "importtime", *THRUM_CMD[1:], "inbox"],
                       cwd=team.path, env=dict(team.env, THRUM_NAME="bob"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()
              if line.startswith("import time:")}
    assert not {"http.server", "http.client", "socketserver", "webbrowser"} & loaded
