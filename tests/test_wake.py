"""Waking agents (SPEC §7a, §15): `thrum watch`, a line per message for Claude Code's
Monitor and for a terminal, and `thrum hook wake`, the background Stop hook that wakes an
idle Claude Code session. Both modes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time

import pytest

from conftest import THRUM_CMD, blocked, var_dir, wait_until


@pytest.fixture
def team(modal_team):
    return modal_team


class Lines:
    """A process whose stdout is read line by line as it comes (`next(timeout)`)."""

    def __init__(self, procs, team, *args, name="bob"):
        env = dict(team.env, THRUM_NAME=name)
        self.p = procs.popen([*THRUM_CMD, *args], cwd=str(team.path), env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line.decode("utf-8").rstrip("\n"))
        self.q.put(None)

    def next(self, timeout=20):
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("no line within %ss" % timeout)
        assert line is not None, "the watch ended: %s" % self.p.stderr.read().decode()
        return line


def watching(team, w):
    """Wait until the watch `w` blocks (in the daemon, or polling the store itself)."""
    class _W:
        p = w.p

        def running(self):
            return w.p.poll() is None

        def describe(self):
            return "thrum watch"
    blocked(_W(), team.path, team.daemon is not None)


def test_watch_prints_a_line_per_message_as_it_arrives(team, procs):
    w = Lines(procs, team, "watch")
    watching(team, w)
    sent = team.send("alice", "the limiter is ready\nsecond line", "--to", "@bob")
    assert w.next() == "@alice -> @bob: the limiter is ready [%s]" % sent["message_id"]
    team.send("bob", "my own", "--to", "@alice")         # mine: not shown
    team.send("alice", "for carol only", "--to", "@carol")  # not to me: not shown
    role = team.send("carol", "to the reviewers", "--to", "reviewer")
    reply = team.t.json("reply", sent["message_id"], "a reply", name="carol")
    assert w.next() == "@carol -> role:reviewer: to the reviewers [%s]" % role["message_id"]
    line = w.next()
    assert line.startswith("@carol -> ") and line.endswith(
        "[%s re %s]" % (reply["message_id"], sent["message_id"]))
    # nothing was marked read
    assert sent["message_id"] in team.unread_ids("bob")
    w.p.send_signal(signal.SIGTERM)
    assert w.p.wait(10) == 0


def test_watch_json_and_escaped_text(team, procs):
    w = Lines(procs, team, "watch", "--json")
    watching(team, w)
    sent = team.send("alice", "bell \x1b[31m red", "--to", "@bob")
    doc = json.loads(w.next())
    assert doc["message_id"] == sent["message_id"] and doc["body"]["content"] == \
        "bell \x1b[31m red"
    w.p.kill()
    w2 = Lines(procs, team, "watch")
    watching(team, w2)
    again = team.send("alice", "bell \x1b[31m red", "--to", "@bob")
    line = w2.next()
    assert "\x1b" not in line and "\\x1b" in line and again["message_id"] in line


def test_a_restarted_watch_repeats_nothing_and_misses_nothing(team, procs):
    w = Lines(procs, team, "watch")
    watching(team, w)
    first = team.send("alice", "one", "--to", "@bob")
    assert first["message_id"] in w.next()
    procs.kill9(w.p.pid)
    gone = team.send("alice", "while no watch ran", "--to", "@bob")
    w2 = Lines(procs, team, "watch")
    assert gone["message_id"] in w2.next()
    later = team.send("alice", "after the restart", "--to", "@bob")
    assert later["message_id"] in w2.next()  # (not `one` again in between)


def test_two_watches_of_one_agent_each_print_every_message(team, procs):
    a, b = Lines(procs, team, "watch"), Lines(procs, team, "watch")
    watching(team, a)
    watching(team, b)
    sent = team.send("alice", "for both", "--to", "@bob")
    assert sent["message_id"] in a.next() and sent["message_id"] in b.next()
    # and a watch takes nothing from a wait
    r = team.t("wait", "--after", "-1m", "--timeout", "0", "--json", name="bob")
    assert [m["message_id"] for m in r.json["messages"]] == [sent["message_id"]]


# --------------------------------------------------------------------------- hook wake

def wake(procs, team, *args):
    hook_input = team.path.parent / "stop-hook.json"
    hook_input.write_text(json.dumps({"cwd": str(team.path), "hook_event_name": "Stop"}))
    with open(hook_input, "rb") as stdin:
        return procs.popen([*THRUM_CMD, "hook", "wake", "--agent", "bob", *args],
                           cwd=str(team.path), env=team.env, stdin=stdin,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wake_file(team):
    return var_dir(team.path) / "hooks" / "bob.wake"


def finished(p, timeout=30):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out.decode(), err.decode()


def test_hook_wake_exits_2_with_one_line_when_a_message_arrives(team, procs):
    p = wake(procs, team, "--timeout", "30s")
    wait_until(wake_file(team).exists, 20, "the wake hook to start")
    team.send("alice", "wake up", "--to", "@bob")
    code, out, err = finished(p)
    assert code == 2 and out == "", (code, out, err)
    assert err.splitlines() == ["thrum: 1 new message from @alice arrived -- run "
                                "`thrum inbox` to read it."]
    # one wake per message: the next one times out, silently
    code, out, err = finished(wake(procs, team, "--timeout", "1s"))
    assert (code, out, err) == (0, "", "")
    # and the stop hook does not report it again
    r = team.t("hook", "stop", "--agent", "bob", input="{}")
    assert r.out == ""


def test_a_newer_wake_hook_supersedes_the_older(team, procs):
    old = wake(procs, team, "--timeout", "60s")
    wait_until(wake_file(team).exists, 20, "the first wake hook to start")
    first = wake_file(team).read_text()
    new = wake(procs, team, "--timeout", "30s")
    wait_until(lambda: wake_file(team).read_text() != first, 20, "the second to start")
    code, out, err = finished(old, timeout=15)
    assert (code, out, err) == (0, "", "")
    team.send("alice", "for the newer one", "--to", "@bob")
    code, out, err = finished(new)
    assert code == 2 and "1 new message from @alice" in err


def test_hook_wake_problems_are_exit_0_and_one_line(team, tmp_path):
    p = subprocess.run([*THRUM_CMD, "hook", "wake", "--timeout", "soon", "--agent", "bob"],
                       cwd=str(team.path), env=team.env, input=b"{}", capture_output=True,
                       timeout=30)
    assert p.returncode == 0 and p.stdout == b""
    assert len(p.stderr.decode().splitlines()) == 1, p.stderr
    os.makedirs(tmp_path / "empty")
    p = subprocess.run([*THRUM_CMD, "hook", "wake"], cwd=str(tmp_path / "empty"),
                       env=team.env, input=b"{}", capture_output=True, timeout=30)
    assert p.returncode == 0 and len(p.stderr.decode().splitlines()) <= 1
