"""send, inbox, reply, sent, message ops, groups, config, context, sessions, team views,
agents, who-has, ping, doctor, --json errors, durations (SPEC §3, §5, §6, §7, §10, §14)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (EVT_ID_RE, MSG_ID_RE, SES_ID_RE, THR_ID_RE, THRUM_PY, TS_RE, Runner, Team,
                      assert_error, commit_all, git, make_env, make_repo, read_log, wait_until)

M_KEYS = ("message_id", "thread_id", "reply_to", "agent_id", "recipients", "audiences", "body",
          "scopes", "refs", "created_at", "updated_at", "deleted", "is_read")


@pytest.fixture
def team(modal_team):
    """Every test here runs twice: in pure-CLI mode and with a daemon (SPEC §1)."""
    return modal_team


def messages_snapshot(team: Team) -> dict:
    d = team.log / "messages"
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.jsonl"))} if d.is_dir() else {}


def creates(team: Team, author: str) -> list:
    return [e for e in read_log(team.log / "messages" / f"{author}.jsonl")
            if e["type"] == "message.create"]


def ids(doc) -> list:
    return [m["message_id"] for m in doc["messages"]]


def aud(doc) -> list:
    return sorted((a["type"], a["value"]) for a in doc["audiences"])


def refs_of(m) -> set:
    return {(r["type"], r["value"]) for r in m["refs"]}


class Refusals:
    """Check that a series of refused sends stores nothing at all."""

    def __init__(self, team: Team, author="alice"):
        self.team, self.author = team, author

    def __enter__(self):  # (the state before, read in process; the check is the CLI's)
        self.snap = messages_snapshot(self.team)
        self.sent = self.team.api("sent", {}, name=self.author)["total"]
        self.bob = self.team.api("inbox", {"unread": True}, name="bob")["total"]
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            assert messages_snapshot(self.team) == self.snap, "a refused command wrote a message"
            assert self.team.t.json("sent", name=self.author)["total"] == self.sent
            assert self.team.t.json("inbox", "--unread", name="bob")["total"] == self.bob


# =============================================================================== send: targets

def test_send_to_agent(team):
    r = team.t.ok("send", "hello bob", "--to", "bob", name="alice")
    assert "✓ Message sent: msg_" in r.out
    doc = team.send("alice", "again", "--to", "@bob")
    assert MSG_ID_RE.fullmatch(doc["message_id"])
    assert doc["recipients"] == ["bob"]
    assert aud(doc) == [("agent", "bob")]
    assert TS_RE.match(doc["created_at"])
    assert doc["warnings"] == []
    assert "thread_id" in doc


def test_send_event_in_log(team):
    doc = team.send("alice", "logged", "--to", "bob", "--scope", "module:auth",
                    "--ref", "bd:bd-123")
    evs = creates(team, "alice")
    assert len(evs) == 1
    ev = evs[0]
    assert ev["v"] == 1 and EVT_ID_RE.match(ev["event_id"]) and TS_RE.match(ev["timestamp"])
    assert ev["origin"]
    assert ev["message_id"] == doc["message_id"] and ev["agent_id"] == "alice"
    assert SES_ID_RE.match(ev["session_id"])
    assert ev["body"]["content"] == "logged" and ev["body"]["format"] == "markdown"
    assert ev["recipients"] == ["bob"]
    assert [(a["type"], a["value"]) for a in ev["audiences"]] == [("agent", "bob")]
    assert {"type": "module", "value": "auth"} in ev["scopes"]
    assert {"type": "bd", "value": "bd-123"} in ev["refs"]


def test_send_to_role_excludes_sender(team):
    first = doc = team.send("alice", "reviewers!", "--to", "reviewer")
    assert sorted(doc["recipients"]) == ["bob", "carol"]
    assert aud(doc) == [("role", "reviewer")]
    doc = team.send("bob", "fellow reviewers", "--to", "@reviewer")
    assert doc["recipients"] == ["carol"]
    assert team.unread_ids("carol") == [doc["message_id"], first["message_id"]]


def test_send_to_everyone_and_broadcast(team):
    a = team.send("alice", "all hands", "--to", "everyone")
    assert sorted(a["recipients"]) == ["bob", "carol"]
    assert [x[0] for x in aud(a)] == ["everyone"]
    b = team.send("bob", "broadcast", "--broadcast")
    assert sorted(b["recipients"]) == ["alice", "carol"]
    assert [x[0] for x in aud(b)] == ["everyone"]
    assert team.unread_ids("carol") == [b["message_id"], a["message_id"]]
    assert team.unread_ids("alice") == [b["message_id"]]


def test_send_to_lists_and_repeats(team):
    doc = team.send("alice", "two", "--to", "bob,carol")
    assert sorted(doc["recipients"]) == ["bob", "carol"]
    doc = team.send("alice", "two again", "--to", "@bob", "--to", "@carol")
    assert sorted(doc["recipients"]) == ["bob", "carol"]
    assert aud(doc) == [("agent", "bob"), ("agent", "carol")]


def test_send_mention(team):
    doc = team.send("alice", "look @bob", "--mention", "bob")
    assert doc["recipients"] == ["bob"]
    m = team.get("bob", doc["message_id"])
    assert ("mention", "bob") in refs_of(m)
    doc = team.send("alice", "to bob, cc reviewers", "--to", "bob", "--mention", "@reviewer")
    assert sorted(doc["recipients"]) == ["bob", "carol"]
    assert ("mention", "reviewer") in refs_of(team.get("alice", doc["message_id"]))


def test_agents_registered_later_do_not_see_earlier_messages(team):
    team.send("alice", "before dave", "--to", "everyone")
    team.quickstart("dave", "tester", "qa")
    assert team.inbox("dave")["total"] == 0
    later = team.send("alice", "after dave", "--broadcast")
    assert "dave" in later["recipients"]
    assert ids(team.inbox("dave")) == [later["message_id"]]


def test_unknown_targets_refused(team):
    t = team.t
    with Refusals(team):
        assert_error(t("send", "x", "--to", "nobody", name="alice"), 2, "nobody")
        r = t("send", "x", "--to", "nobody,ghost", "--to", "bob", name="alice")
        assert_error(r, 2, "nobody", "ghost")
        assert_error(t("send", "x", "--to", "bob", "--mention", "phantom", name="alice"), 2,
                     "phantom")
        assert_error(t("send", "x", "--to", "Bad.Name", name="alice"), 2)
        assert_error(t("send", "x", name="alice"), 2, "recipient")


# =============================================================================== send: bodies

def test_body_sources(team, tmp_path):
    t = team.t
    a = team.send("alice", "positional body", "--to", "bob")
    b = t.json("send", "-", "--to", "bob", name="alice", input="dash body\n")
    c = t.json("send", "--stdin", "--to", "bob", name="alice", input="stdin body\n")
    f = tmp_path / "body.md"
    f.write_bytes(b"file body\n")
    d = t.json("send", "--body-file", str(f), "--to", "bob", name="alice")
    got = {m["message_id"]: m["body"]["content"] for m in team.inbox("bob")["messages"]}
    assert got == {a["message_id"]: "positional body", b["message_id"]: "dash body",
                   c["message_id"]: "stdin body", d["message_id"]: "file body"}


def test_body_exactly_one_source(team, tmp_path):
    t = team.t
    f = tmp_path / "b.txt"
    f.write_text("file\n")
    with Refusals(team):
        assert_error(t("send", "pos", "--stdin", "--to", "bob", name="alice", input="in"), 2)
        assert_error(t("send", "pos", "--body-file", str(f), "--to", "bob", name="alice"), 2)
        assert_error(t("send", "--stdin", "--body-file", str(f), "--to", "bob", name="alice",
                       input="in"), 2)
        assert_error(t("send", "-", "--body-file", str(f), "--to", "bob", name="alice",
                       input="in"), 2)
        assert_error(t("send", "--to", "bob", name="alice"), 2)  # no body at all


@pytest.mark.parametrize("raw,expected", [
    (b"line\n", "line"),
    (b"line\n\n", "line\n"),
    (b"a\r\n", "a"),
    (b"a\r\nb\r\n\r\n", "a\r\nb\r\n"),
    (b"no newline", "no newline"),
    (b"  lead and trail  \n", "  lead and trail  "),
    (b"tab\there $(rm -rf /) `id` ${HOME} \\n 'q' \"dq\"\n", "tab\there $(rm -rf /) `id` ${HOME} \\n 'q' \"dq\""),
    ("ünïcödé ✓ 🚀\n".encode(), "ünïcödé ✓ 🚀"),
    (b"cr only\r", "cr only\r"),
])
def test_body_bytes_kept_except_one_trailing_newline(team, tmp_path, raw, expected):
    t = team.t
    s = t.json("send", "--stdin", "--to", "bob", name="alice", input=raw)
    f = tmp_path / "body"
    f.write_bytes(raw)
    b = t.json("send", "--body-file", str(f), "--to", "bob", name="alice")
    for doc in (s, b):
        m = team.get("bob", doc["message_id"])
        assert m["body"]["content"] == expected
    # the log holds the same text
    contents = [e["body"]["content"] for e in creates(team, "alice")]
    assert contents == [expected, expected]


def test_positional_body_kept_verbatim(team):
    body = "  spaced $(x) `y`\n"
    doc = team.send("alice", body, "--to", "bob")
    # SPEC §6: only stdin and file bodies lose a trailing newline; an argument is kept whole
    assert team.get("bob", doc["message_id"])["body"]["content"] == body


def test_body_refusals(team, tmp_path):
    t = team.t
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"ok \xff\xfe bad\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with Refusals(team):
        assert_error(t("send", "--stdin", "--to", "bob", name="alice", input=b"\xff\xfe\n"), 2)
        assert_error(t("send", "--body-file", str(bad), "--to", "bob", name="alice"), 2)
        assert_error(t("send", "", "--to", "bob", name="alice"), 2)
        assert_error(t("send", "--stdin", "--to", "bob", name="alice", input=b""), 2)
        assert_error(t("send", "--stdin", "--to", "bob", name="alice", input=b"\n"), 2)
        assert_error(t("send", "--body-file", str(empty), "--to", "bob", name="alice"), 2)
        assert_error(t("send", "--body-file", str(tmp_path / "missing.md"), "--to", "bob",
                       name="alice"), 2, "missing.md")


def test_body_size_limit(team):
    t = team.t
    t.ok("config", "set", "messages.max_body_bytes", "100", name="alice")
    with Refusals(team):
        assert_error(t("send", "x" * 101, "--to", "bob", name="alice"), 2)
        assert_error(t("send", "é" * 51, "--to", "bob", name="alice"), 2)  # 102 bytes, 51 chars
        assert_error(t("send", "--stdin", "--to", "bob", name="alice", input="y" * 101 + "\n"), 2)
    team.send("alice", "x" * 100, "--to", "bob")
    assert team.inbox("bob")["total"] == 1


def test_formats_structured_scopes_refs(team):
    t = team.t
    with Refusals(team):
        assert_error(t("send", "x", "--to", "bob", "--format", "html", name="alice"), 2)
        assert_error(t("send", "x", "--to", "bob", "--structured", "[1, 2]", name="alice"), 2)
        assert_error(t("send", "x", "--to", "bob", "--structured", "{bad", name="alice"), 2)
        assert_error(t("send", "x", "--to", "bob", "--structured", '"str"', name="alice"), 2)
        assert_error(t("send", "x", "--to", "bob", "--scope", "bad", name="alice"), 2)
        assert_error(t("send", "x", "--to", "bob", "--ref", "bad", name="alice"), 2)
    a = team.send("alice", "plain", "--to", "bob", "--format", "plain")
    b = team.send("alice", '{"k": 1}', "--to", "bob", "--format", "json",
                  "--structured", '{"task": "T-1", "n": [1, 2], "nested": {"ok": true}}',
                  "--scope", "module:auth", "--scope", "team:core", "--ref", "bd:bd-123",
                  "--ref", "url:https://x.test/a:b")
    c = team.send("alice", "default", "--to", "bob")
    by_id = {m["message_id"]: m for m in team.inbox("bob")["messages"]}
    assert by_id[a["message_id"]]["body"]["format"] == "plain"
    assert by_id[c["message_id"]]["body"]["format"] == "markdown"
    mb = by_id[b["message_id"]]
    assert mb["body"]["format"] == "json"
    assert mb["body"]["structured"] == {"task": "T-1", "n": [1, 2], "nested": {"ok": True}}
    assert {"type": "module", "value": "auth"} in mb["scopes"]
    assert {"type": "team", "value": "core"} in mb["scopes"]
    assert ("bd", "bd-123") in refs_of(mb)
    assert ("url", "https://x.test/a:b") in refs_of(mb)
    got = team.get("bob", b["message_id"])
    assert isinstance(got["body"]["structured"], dict)


# =============================================================================== inbox

def test_inbox_shape_and_read_state(team):
    a = team.seed("alice", "one", to=["bob"])
    b = team.seed("carol", "two", to=["bob"])
    doc = team.inbox("bob")
    for k in ("messages", "total", "unread", "page", "page_size", "total_pages"):
        assert k in doc, f"inbox lacks {k}"
    assert doc["total"] == 2 and doc["unread"] == 2  # counted before this call marked them
    assert ids(doc) == [b["message_id"], a["message_id"]]  # newest first
    for m in doc["messages"]:
        for k in M_KEYS:
            assert k in m, f"inbox message lacks {k}: {m}"
        assert m["is_read"] is False
        assert m["deleted"] is False
        assert m["recipients"] == ["bob"]
        assert TS_RE.match(m["created_at"])
        assert set(m["body"]) >= {"format", "content", "structured"}
    assert doc["messages"][0]["agent_id"] == "carol"
    assert doc["messages"][1]["body"]["content"] == "one"
    again = team.inbox("bob")
    assert again["unread"] == 0
    assert [m["is_read"] for m in again["messages"]] == [True, True]
    # marking is per agent: alice and carol never read anything of bob's
    assert team.inbox("carol")["total"] == 0


def test_inbox_oldest_and_pagination(team):
    sent = [team.seed("alice", f"m{i}", to=["bob"])["message_id"] for i in range(5)]
    p1 = team.t.json("inbox", "--unread", "--limit", "2", name="bob")
    assert (p1["page"], p1["page_size"], p1["total"], p1["total_pages"]) == (1, 2, 5, 3)
    assert ids(p1) == sent[::-1][:2]
    p2 = team.t.json("inbox", "--unread", "--limit", "2", "--page", "2", name="bob")
    p3 = team.t.json("inbox", "--unread", "--limit", "2", "--page", "3", name="bob")
    assert ids(p2) == sent[::-1][2:4] and ids(p3) == sent[::-1][4:]
    assert p3["page"] == 3
    old = team.t.json("inbox", "--unread", "--oldest", name="bob")
    assert ids(old) == sent
    # displayed rows only are marked: page 1 of 2 rows
    team.t.ok("inbox", "--limit", "2", name="bob")
    assert team.unread_ids("bob") == sent[::-1][2:]


def test_inbox_unread_marks_nothing(team):
    a = team.seed("alice", "one", to=["bob"])
    for _ in range(2):
        doc = team.t.json("inbox", "--unread", name="bob")
        assert ids(doc) == [a["message_id"]] and doc["unread"] == 1
        assert doc["messages"][0]["is_read"] is False
    team.t.ok("inbox", name="bob")
    assert team.t.json("inbox", "--unread", name="bob")["messages"] == []


def test_inbox_human_markers_and_footer(team):
    team.seed("alice", "first message", to=["bob"])
    team.seed("carol", "second message", to=["bob"])
    r = team.t.ok("inbox", name="bob")
    assert "●" in r.out and "○" not in r.out
    assert "first message" in r.out and "second message" in r.out
    assert "@alice" in r.out and "@carol" in r.out
    assert re.search(r"Showing 1-2 of 2 messages", r.out), r.out
    assert "(2 unread)" in r.out
    r = team.t.ok("inbox", name="bob")
    assert "○" in r.out and "●" not in r.out
    assert re.search(r"Showing 1-2 of 2 messages \(0 unread\)", r.out), r.out


def test_inbox_human_nests_replies(team):
    parent = team.seed("alice", "parent text", to=["bob,carol"])
    team.seed("alice", "unrelated newer text", to=["carol"])
    reply = team.t.json("reply", parent["message_id"], "child text", name="bob")
    # JSON stays flat, newest first
    doc = team.t.json("inbox", "--unread", name="carol")
    assert ids(doc)[0] == reply["message_id"] and ids(doc)[-1] == parent["message_id"]
    r = team.t.ok("inbox", name="carol")
    assert "↳" in r.out
    lines = r.out.splitlines()
    p = next(i for i, ln in enumerate(lines) if "parent text" in ln)
    c = next(i for i, ln in enumerate(lines) if "child text" in ln)
    assert p < c, "the reply is shown under its parent"
    assert any("↳" in ln for ln in lines[p:c + 1])


def test_inbox_filters_from_scope_ref_thread(team):
    t = team.t
    a = team.seed("alice", "from alice", to=["bob"], scopes=["module:auth"], refs=["bd:bd-1"])
    c = team.seed("carol", "from carol", to=["bob"], scopes=["module:db"])
    assert ids(t.json("inbox", "--unread", "--from", "alice", name="bob")) == [a["message_id"]]
    assert ids(t.json("inbox", "--unread", "--from", "@carol", name="bob")) == [c["message_id"]]
    assert ids(t.json("inbox", "--unread", "--scope", "module:auth", name="bob")) == [a["message_id"]]
    assert ids(t.json("inbox", "--unread", "--scope", "module:db", name="bob")) == [c["message_id"]]
    assert ids(t.json("inbox", "--unread", "--ref", "bd:bd-1", name="bob")) == [a["message_id"]]
    assert ids(t.json("inbox", "--unread", "--ref", "bd:bd-2", name="bob")) == []
    # thread: bob replies to alice's message, alice answers in the thread
    rep = t.json("reply", a["message_id"], "bob answers", name="bob")
    thr = rep["thread_id"]
    assert THR_ID_RE.match(thr)
    rep2 = t.json("reply", rep["message_id"], "alice again", name="alice")
    got = ids(t.json("inbox", "--thread", thr, name="bob"))  # (reply marked `a` read)
    assert set(got) == {a["message_id"], rep2["message_id"]}
    assert c["message_id"] not in got
    # refusals, one per step
    assert_error(t("inbox", "--from", "nobody", name="bob"), 4, "nobody")
    assert_error(t("inbox", "--from", "Not.A.Name", name="bob"), 2)
    assert_error(t("inbox", "--scope", "nocolon", name="bob"), 2)
    assert_error(t("inbox", "--page", "x", name="bob"), 2)


def test_inbox_mentions(team):
    direct = team.seed("alice", "by name", to=["bob"])
    role = team.seed("alice", "by role", to=["reviewer"])
    mention = team.seed("alice", "mentioned", to=["carol"], mentions=["@bob"])
    team.seed("alice", "broadcast", broadcast=True)
    team.t.ok("group", "create", "crew", name="alice")
    team.t.ok("group", "add", "crew", "@bob", name="alice")
    team.seed("alice", "group msg", to=["crew"])
    got = ids(team.t.json("inbox", "--mentions", "--unread", name="bob"))
    assert set(got) == {direct["message_id"], role["message_id"], mention["message_id"]}
    assert team.t.json("inbox", "--unread", name="bob")["total"] == 5


def test_inbox_all(team):
    m1 = team.seed("alice", "alice to bob", to=["bob"])
    m2 = team.seed("carol", "carol to alice", to=["alice"])
    m3 = team.seed("alice", "alice to carol", to=["carol"])
    gone = team.seed("bob", "deleted soon", to=["alice"])
    team.t.ok("message", "delete", gone["message_id"], "--force", name="bob")
    doc = team.t.json("inbox", "--all", name="carol")
    assert set(ids(doc)) == {m1["message_id"], m2["message_id"], m3["message_id"]}
    assert doc["total"] == 3
    # marks read only what was addressed to carol
    assert team.unread_ids("carol") == []
    assert team.unread_ids("bob") == [m1["message_id"]]
    assert team.unread_ids("alice") == [m2["message_id"]]


# =============================================================================== reply / threads

def test_reply_recipients_threads_and_marks_parent(team):
    t = team.t
    parent = team.seed("alice", "to both", to=["bob,carol"])
    assert team.unread_ids("bob") == [parent["message_id"]]
    r1 = t.json("reply", parent["message_id"], "bob replies", name="bob")
    assert sorted(r1["recipients"]) == ["alice", "carol"]
    assert THR_ID_RE.match(r1["thread_id"])
    assert team.unread_ids("bob") == []  # parent marked read
    p = team.get("alice", parent["message_id"])
    assert p["thread_id"] == r1["thread_id"]
    child = team.get("alice", r1["message_id"])
    assert child["reply_to"] == parent["message_id"] and child["thread_id"] == r1["thread_id"]
    r2 = t.json("reply", parent["message_id"], "carol too", name="carol")
    assert r2["thread_id"] == r1["thread_id"]
    assert sorted(r2["recipients"]) == ["alice", "bob"]
    r3 = t.json("reply", r1["message_id"], "alice answers bob", name="alice")
    assert r3["thread_id"] == r1["thread_id"]
    assert sorted(r3["recipients"]) == ["bob", "carol"]
    # the log records it
    ev = [e for e in creates(team, "bob") if e["message_id"] == r1["message_id"]][0]
    assert ev["reply_to"] == parent["message_id"] and ev["thread_id"] == r1["thread_id"]
    # human output
    r = t.ok("reply", parent["message_id"], "human reply", name="bob")
    assert "msg_" in r.out


def test_reply_body_sources_and_refusals(team):
    t = team.t
    parent = team.seed("alice", "q", to=["bob"])
    rep = t.json("reply", parent["message_id"], "--stdin", name="bob", input="answer\n")
    assert team.get("alice", rep["message_id"])["body"]["content"] == "answer"
    assert_error(t("reply", "msg_00000000000000", "x", name="bob"), 4)
    assert_error(t("reply", parent["message_id"], "", name="bob"), 2)
    assert_error(t("reply", parent["message_id"], name="bob"), 2)


# =============================================================================== sent

def test_sent(team):
    t = team.t
    m1 = team.seed("alice", "one", to=["bob"])
    m2 = team.seed("alice", "two", to=["carol"])
    m3 = team.seed("alice", "three", to=["reviewer"])
    doc = t.json("sent", name="alice")
    for k in ("messages", "total", "page", "page_size", "total_pages"):
        assert k in doc
    assert ids(doc) == [m3["message_id"], m2["message_id"], m1["message_id"]]
    by = {m["message_id"]: m for m in doc["messages"]}
    r3 = by[m3["message_id"]]
    assert sorted(x["agent_id"] for x in r3["receipts"]) == ["bob", "carol"]
    assert all(x["read_at"] is None for x in r3["receipts"])
    assert r3["read_count"] == 0
    t.ok("message", "read", m3["message_id"], name="bob")
    t.ok("message", "read", m1["message_id"], name="bob")
    by = {m["message_id"]: m for m in t.json("sent", name="alice")["messages"]}
    rec = {x["agent_id"]: x["read_at"] for x in by[m3["message_id"]]["receipts"]}
    assert TS_RE.match(rec["bob"]) and rec["carol"] is None
    assert by[m3["message_id"]]["read_count"] == 1
    assert by[m1["message_id"]]["read_count"] == 1
    assert ids(t.json("sent", "--unread", name="alice")) == [m3["message_id"], m2["message_id"]]
    assert ids(t.json("sent", "--to", "carol", name="alice")) == [m3["message_id"], m2["message_id"]]
    assert ids(t.json("sent", "--to", "@bob", name="alice")) == [m3["message_id"], m1["message_id"]]
    p = t.json("sent", "--limit", "1", "--page", "2", name="alice")
    assert ids(p) == [m2["message_id"]] and p["total_pages"] == 3
    assert t.json("sent", name="bob")["total"] == 0


# =============================================================================== message ops

def test_message_get_marks_read(team):
    m = team.seed("alice", "hello", to=["bob"], refs=["bd:bd-9"])
    got = team.t.json("message", "get", m["message_id"], name="bob")["message"]
    for k in M_KEYS + ("edits",):
        assert k in got, f"message get lacks {k}"
    assert got["edits"] == [] and got["deleted"] is False
    assert got["body"]["content"] == "hello" and got["agent_id"] == "alice"
    assert team.unread_ids("bob") == []
    r = team.t.ok("message", "get", m["message_id"], name="bob")
    assert "hello" in r.out


def test_message_edit(team):
    t = team.t
    m = team.seed("alice", "v0", to=["bob"])
    e1 = t.json("message", "edit", m["message_id"], "v1", name="alice")
    assert e1["message_id"] == m["message_id"] and e1["version"] == 1
    assert TS_RE.match(e1["updated_at"])
    e2 = t.json("message", "edit", m["message_id"], "v2", name="alice")
    assert e2["version"] == 2
    got = team.get("bob", m["message_id"])
    assert got["body"]["content"] == "v2"
    assert [e["content"] for e in got["edits"]] == ["v1", "v2"]
    assert all(TS_RE.match(e["edited_at"]) for e in got["edits"])
    assert got["updated_at"] == e2["updated_at"]
    edits = [e for e in read_log(team.log / "messages" / "alice.jsonl")
             if e["type"] == "message.edit"]
    assert [e["body"]["content"] for e in edits] == ["v1", "v2"]
    # refusals
    assert_error(t("message", "edit", m["message_id"], "hijack", name="bob"), 5)
    assert_error(t("message", "edit", m["message_id"], "", name="alice"), 2)
    assert_error(t("message", "edit", "msg_00000000000000", "x", name="alice"), 4)
    assert team.get("bob", m["message_id"])["body"]["content"] == "v2"


def test_message_delete(team):
    t = team.t
    m = team.seed("alice", "to delete", to=["bob"])
    keep = team.seed("alice", "to keep", to=["bob"])
    assert_error(t("message", "delete", m["message_id"], name="alice"), 5, "--force")
    assert_error(t("message", "delete", m["message_id"], "--force", name="bob"), 5)
    d = t.json("message", "delete", m["message_id"], "--force", "--reason", "oops", name="alice")
    assert d["message_id"] == m["message_id"] and TS_RE.match(d["deleted_at"])
    assert ids(team.inbox("bob")) == [keep["message_id"]]
    got = team.get("bob", m["message_id"])
    assert got["deleted"] is True
    assert_error(t("message", "edit", m["message_id"], "zombie", name="alice"), 5)
    assert_error(t("message", "delete", m["message_id"], "--force", name="alice"), 5)
    dels = [e for e in read_log(team.log / "messages" / "alice.jsonl")
            if e["type"] == "message.delete"]
    assert len(dels) == 1 and dels[0]["message_id"] == m["message_id"]
    # a deleted message leaves `sent` too (docs/architecture.md, "Soft delete")
    assert ids(t.json("sent", name="alice")) == [keep["message_id"]]


def test_message_read(team):
    t = team.t
    ms = [team.seed("alice", f"m{i}", to=["bob"])["message_id"] for i in range(4)]
    assert t.json("message", "read", ms[0], ms[1], name="bob")["marked_count"] == 2
    assert t.json("message", "read", ms[0], name="bob")["marked_count"] == 0  # already read
    assert sorted(team.unread_ids("bob")) == sorted(ms[2:])
    assert t.json("message", "read", "--all", name="bob")["marked_count"] == 2
    assert team.unread_ids("bob") == []
    assert t.json("message", "read", "--all", name="bob")["marked_count"] == 0
    assert_error(t("message", "read", name="bob"), 2)
    receipts = read_log(team.log / "receipts" / "bob.jsonl")
    assert sorted(e["message_id"] for e in receipts if e["type"] == "message.receipt") == sorted(ms)
    assert all(e["agent_id"] == "bob" for e in receipts)


def test_message_id_prefixes(team):
    t = team.t
    m = team.seed("alice", "prefix me", to=["bob"])["message_id"]
    ulid = m[4:]
    for arg in (m, ulid[:8], "msg_" + ulid[:8], ulid[:8].lower(), ("msg_" + ulid[:12]).lower(),
                ulid):
        got = t.json("message", "get", arg, name="bob")["message"]
        assert got["message_id"] == m, arg
    assert_error(t("message", "get", ulid[:7], name="bob"), 2)
    assert_error(t("message", "get", "msg_" + ulid[:7], name="bob"), 2)
    assert_error(t("message", "get", "msg_00000000", name="bob"), 4)
    assert_error(t("message", "get", "00000000000000000000000000", name="bob"), 4)
    assert_error(t("reply", ulid[:7], "x", name="bob"), 2)
    assert_error(t("message", "read", "msg_00000000", name="bob"), 4)


def test_message_id_ambiguous_prefix(team):
    # ULIDs start with the time: two sends well within a second share 8 characters unless
    # they straddle a 1.024 s boundary, so try a few pairs
    b = team.seed("alice", "first", to=["bob"])["message_id"][4:]
    for i in range(6):
        a, b = b, team.seed("alice", f"next {i}", to=["bob"])["message_id"][4:]
        if a[:8] == b[:8]:
            break
    else:
        pytest.skip("no two consecutive ids shared 8 characters")
    r = team.t("message", "get", a[:8], name="bob")
    assert_error(r, 2, "msg_" + a, "msg_" + b)


# =============================================================================== groups

def test_groups(team):
    t = team.t
    t.ok("group", "create", "devs", "--description", "the developers", name="alice")
    t.ok("group", "add", "devs", "@bob", "role:reviewer", name="alice")
    lst = t.ok("group", "list", "--json", name="alice")
    assert "devs" in lst.out
    info = t.ok("group", "info", "devs", "--json", name="alice")
    assert "bob" in info.out and "reviewer" in info.out and "the developers" in info.out
    ev = read_log(team.log / "groups.jsonl")
    assert [e["type"] for e in ev][:1] == ["group.create"]
    assert {(e.get("member_type"), e.get("member")) for e in ev
            if e["type"] == "group.member.add"} == {("agent", "bob"), ("role", "reviewer")}

    a = team.send("alice", "hi devs", "--to", "devs")
    assert sorted(a["recipients"]) == ["bob", "carol"]
    assert aud(a) == [("group", "devs")]
    b = team.send("bob", "from inside", "--to", "@devs")
    assert b["recipients"] == ["carol"]  # the sender is never in a fan-out
    t.ok("group", "remove", "devs", "role:reviewer", name="alice")
    assert team.send("alice", "after remove", "--to", "devs")["recipients"] == ["bob"]
    t.ok("group", "delete", "devs", name="alice")
    assert "devs" not in t.ok("group", "list", "--json", name="alice").out
    assert_error(t("send", "x", "--to", "devs", name="alice"), 2, "devs")


def test_group_refusals(team):
    t = team.t
    assert_error(t("group", "create", "bob", name="alice"), 2)
    assert_error(t("group", "create", "reviewer", name="alice"), 2)
    assert_error(t("group", "create", "Bad.Group", name="alice"), 2)
    assert_error(t("group", "create", "everyone", name="alice"), 2)
    t.ok("group", "create", "ops", name="alice")
    assert_error(t("group", "add", "ops", "nobody", name="alice"), 4, "nobody")
    assert_error(t("group", "add", "ops", "reviewer", name="alice"), 4)  # bare word = agent
    assert_error(t("group", "add", "nogroup", "@bob", name="alice"), 4)
    assert_error(t("group", "info", "nogroup", name="alice"), 4)
    assert "group.member.add" not in (team.log / "groups.jsonl").read_text()


# =============================================================================== config

def test_config(team):
    t = team.t
    r = t.ok("config", "show", name="alice")
    assert "max_body_bytes" in r.out
    t.ok("config", "show", "--json", name="alice").json
    assert t.ok("config", "get", "messages.max_body_bytes", name="alice").out == "1048576\n"
    assert t.ok("config", "get", "sync.branch", name="alice").out == "a-sync\n"
    t.ok("config", "set", "messages.max_body_bytes", "100", name="alice")
    assert t.ok("config", "get", "messages.max_body_bytes", name="alice").out == "100\n"
    assert "max_body_bytes" in (team.path / ".thrum" / "config.toml").read_text()
    assert_error(t("config", "set", "no.such_key", "1", name="alice"), 2)
    assert_error(t("config", "set", "messages.max_body_bytes", "lots", name="alice"), 2)
    assert_error(t("config", "set", "messages.max_body_bytes", "-5", name="alice"), 2)
    assert_error(t("config", "set", "sync.local_only", "maybe", name="alice"), 2)
    assert_error(t("config", "set", "sync.interval", "soon", name="alice"), 2)
    assert t.ok("config", "get", "messages.max_body_bytes", name="alice").out == "100\n"


# =============================================================================== context

def test_context_save_show_clear(team, tmp_path):
    t = team.t
    t.ok("context", "save", name="alice", input="remember: fix $(login) `now`\n")
    assert (team.path / ".thrum" / "context" / "alice.md").exists()
    assert "remember: fix $(login) `now`" in t.ok("context", "show", name="alice").out
    assert "remember" in t.ok("context", "show", "--agent", "alice", name="bob").out
    f = tmp_path / "ctx.md"
    f.write_text("from a file\n")
    t.ok("context", "save", "--file", str(f), name="bob")
    assert "from a file" in t.ok("context", "show", name="bob").out
    prime = t.json("prime", name="alice")
    assert "remember" in json.dumps(prime["context"])
    t.ok("context", "clear", name="alice")
    assert "remember" not in t.ok("context", "show", name="alice").out
    t.ok("context", "clear", name="alice")  # idempotent
    assert "from a file" in t.ok("context", "show", name="bob").out


# =============================================================================== sessions

def member(doc, name):
    found = [m for m in doc["members"] if m["agent_id"] == name]
    return found[0] if found else None


def test_sessions_reflected_in_whoami_and_team(team):
    t = team.t
    first = t.json("whoami", name="alice")["session_id"]
    t.ok("session", "set-intent", "Fixing the login flow", name="alice")
    t.ok("session", "set-task", "bd-42", name="alice")
    assert t.json("whoami", name="alice")["intent"] == "Fixing the login flow"
    a = member(t.json("team", name="bob"), "alice")
    assert a["intent"] == "Fixing the login flow" and a["task"] == "bd-42"
    assert a["status"] == "active"
    assert "ses_" in t.ok("session", "list", "--json", name="alice").out

    t.ok("session", "end", name="alice")
    assert t.json("whoami", name="alice")["session_id"] is None
    assert member(t.json("team", name="bob"), "alice") is None
    off = member(t.json("team", "--all", name="bob"), "alice")
    assert off is not None and off["status"] == "offline"
    ends = [e for e in read_log(team.log / "agents" / "alice.jsonl")
            if e["type"] == "agent.session.end"]
    assert ends and ends[-1]["session_id"] == first

    t.ok("session", "start", name="alice")
    second = t.json("whoami", name="alice")["session_id"]
    assert SES_ID_RE.match(second) and second != first
    assert member(t.json("team", name="bob"), "alice")["status"] == "active"
    sess = t.ok("session", "list", "--json", name="alice").out
    assert first in sess and second in sess
    upd = [e for e in read_log(team.log / "agents" / "alice.jsonl") if e["type"] == "agent.update"]
    assert any(e.get("intent") == "Fixing the login flow" for e in upd)
    assert any(e.get("task") == "bd-42" for e in upd)


# =============================================================================== team / status views

def test_team_status_overview_prime_shapes(team):
    t = team.t
    m = team.seed("alice", "please review", to=["bob"])
    m2 = team.seed("carol", "me too", to=["bob"])
    doc = t.json("team", name="bob")
    assert sorted(x["agent_id"] for x in doc["members"]) == ["alice", "bob", "carol"]
    for x in doc["members"]:
        for k in ("agent_id", "role", "module", "status", "intent", "task", "branch",
                  "last_seen_at", "unread", "total"):
            assert k in x, f"team member lacks {k}: {x}"
        assert x["status"] == "active"
    b = member(doc, "bob")
    assert (b["role"], b["module"], b["unread"], b["total"]) == ("reviewer", "api", 2, 2)
    assert member(doc, "alice")["branch"] == "main"

    st = t.json("status", name="bob")
    assert st["agent"]["agent_id"] == "bob" and st["agent"]["role"] == "reviewer"
    assert SES_ID_RE.match(st["session"]["session_id"]) and TS_RE.match(st["session"]["started_at"])
    assert (st["inbox"]["total"], st["inbox"]["unread"]) == (2, 2)
    assert st["daemon"]["running"] is (team.mode == "daemon") and "pid" in st["daemon"]
    assert st["sync"]["state"] == "no-remote" and "last_sync_at" in st["sync"]

    ov = t.json("overview", name="bob")
    for k in ("agent", "session", "inbox", "daemon", "sync", "team"):
        assert k in ov
    assert isinstance(ov["team"], list)
    assert sorted(x["agent_id"] for x in ov["team"]) == ["alice", "bob", "carol"]

    t.ok("context", "save", name="bob", input="bob's notes")
    pr = t.json("prime", name="bob")
    for k in ("agent", "session", "unread", "team", "work_context", "context"):
        assert k in pr
    assert pr["agent"]["agent_id"] == "bob"
    assert sorted(x["message_id"] for x in pr["unread"]) == sorted(
        [m["message_id"], m2["message_id"]])
    assert "bob's notes" in json.dumps(pr["context"])
    # status, overview and prime marked nothing read
    assert len(team.unread_ids("bob")) == 2
    for cmd in ("team", "status", "overview", "prime"):
        r = t.ok(cmd, name="bob")
        assert r.out.strip()
    assert len(team.unread_ids("bob")) == 2


# =============================================================================== agents

def test_agent_list_delete_cleanup(team, tmp_path):
    t = team.t
    lst = t.ok("agent", "list", "--json", name="alice").out
    assert all(n in lst for n in ("alice", "bob", "carol"))
    assert_error(t("agent", "delete", "bob", name="alice"), 5, "--force")
    assert_error(t("agent", "delete", "@nobody", "--force", name="alice"), 4)
    t.ok("agent", "delete", "@bob", "--force", name="alice")
    assert "bob" not in t.ok("agent", "list", "--json", name="alice").out
    assert_error(t("send", "x", "--to", "bob", name="alice"), 2, "bob")
    assert sorted(team.send("alice", "r", "--to", "reviewer")["recipients"]) == ["carol"]
    dels = [e for e in read_log(team.log / "agents" / "alice.jsonl") + read_log(
        team.log / "agents" / "bob.jsonl") if e["type"] == "agent.delete"]
    assert dels and dels[-1]["agent_id"] == "bob" and dels[-1]["by"] == "alice"

    # an agent whose worktree is gone is a cleanup candidate; --dry-run deletes nothing
    wt = tmp_path / "gone"
    git("worktree", "add", "-q", "-b", "feat/gone", str(wt), cwd=team.path, env=team.env)
    t.ok("quickstart", "--name", "ghosty", "--role", "tester", "--module", "x", cwd=wt)
    git("worktree", "remove", "--force", str(wt), cwd=team.path, env=team.env)
    r = t.ok("agent", "cleanup", "--dry-run", name="alice")
    assert "ghosty" in r.out
    t.ok("agent", "cleanup", "--dry-run", "--json", name="alice").json
    assert "ghosty" in t.ok("agent", "list", "--json", name="alice").out
    t.ok("agent", "cleanup", "--force", name="alice")
    after = t.ok("agent", "list", "--json", name="alice").out
    assert "ghosty" not in after and "alice" in after and "carol" in after


# =============================================================================== who-has / ping

@pytest.fixture
def two_worktrees(tmp_path):
    env = make_env(tmp_path / "home")
    main = make_repo(tmp_path / "main", env=env)
    (main / "src").mkdir()
    (main / "src" / "x.py").write_text("x = 1\n")
    (main / "src" / "y.py").write_text("y = 1\n")
    commit_all(main, env, "add src")
    wt = tmp_path / "feature"
    git("worktree", "add", "-q", "-b", "feat/auth", str(wt), cwd=main, env=env)
    t = Runner(main, env)
    t.ok("quickstart", "--name", "bob", "--role", "reviewer", "--module", "api")
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", cwd=wt)
    (wt / "src" / "x.py").write_text("x = 2\n")
    return main, wt, t


def test_who_has(two_worktrees):
    main, wt, t = two_worktrees
    doc = t.json("who-has", "src/x.py")
    assert doc["path"] == "src/x.py"
    assert [a["agent_id"] for a in doc["agents"]] == ["alice"]
    assert doc["agents"][0]["branch"] == "feat/auth"
    assert "status" in doc["agents"][0]
    r = t.ok("who-has", "src/x.py")
    assert "@alice is editing src/x.py" in r.out and "(branch feat/auth)" in r.out
    absdoc = t.json("who-has", str(main / "src" / "x.py"))
    assert absdoc["path"] == "src/x.py" and [a["agent_id"] for a in absdoc["agents"]] == ["alice"]
    # relative to the cwd
    sub = t.json("who-has", "x.py", cwd=main / "src")
    assert sub["path"] == "src/x.py" and [a["agent_id"] for a in sub["agents"]] == ["alice"]
    # from the other worktree, as alice, with a path of that worktree
    mine = t.json("who-has", str(wt / "src" / "x.py"), cwd=wt)
    assert [a["agent_id"] for a in mine["agents"]] == ["alice"]
    assert t.json("who-has", "src/y.py")["agents"] == []
    # a committed change on the branch still counts as "changed"
    (wt / "src" / "y.py").write_text("y = 2\n")
    commit_all(wt, t.env, "touch y")
    assert [a["agent_id"] for a in t.json("who-has", "src/y.py")["agents"]] == ["alice"]


def test_ping(team):
    t = team.t
    for arg in ("alice", "@alice"):
        r = t.ok("ping", arg, name="bob")
        assert "alice" in r.out
    doc = t.json("ping", "alice", name="bob")
    assert "alice" in json.dumps(doc)
    assert_error(t("ping", "nobody", name="bob"), 4, "nobody")
    assert_error(t("ping", "Bad.Name", name="bob"), 2)


# =============================================================================== doctor

def test_doctor_healthy_and_torn_line(team):
    t = team.t
    team.send("alice", "before the tear", "--to", "bob")
    r = t("doctor", name="alice")
    assert r.code == 0, r.describe()
    log = team.log / "messages" / "alice.jsonl"
    torn = b'{"v": 1, "type": "message.create", "message_id": "msg_TORN'
    with open(log, "ab") as f:
        f.write(torn)
    r = t("doctor", name="alice")
    assert r.code == 1, r.describe()
    text = (r.out + r.err).lower()
    assert "torn" in text and "alice.jsonl" in text, r.describe()
    assert t.json("inbox", "--unread", name="bob")["total"] == 1  # still readable
    r = t("doctor", "--fix", name="alice")
    assert r.code == 0, r.describe()
    assert t("doctor", name="alice").code == 0
    read_log(log)  # strict: complete lines only now
    saved = [p for p in (team.path / ".thrum" / "var" / "torn").rglob("*") if p.is_file()]
    assert any(torn in p.read_bytes() for p in saved), saved
    assert t.json("doctor", name="alice") is not None


# =============================================================================== --json errors

def test_json_errors(team, tmp_path):
    t = team.t
    for args, code in ((["send", "x", "--to", "nobody"], 2),
                       (["message", "get", "msg_00000000"], 4),
                       (["message", "delete", "msg_00000000", "--force"], 4)):
        r = t(*args, "--json", name="alice")
        assert_error(r, code)
        doc = r.json
        assert set(doc) == {"error"}, doc
        assert doc["error"]["exit_code"] == code
        assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    m = team.send("alice", "mine", "--to", "bob")
    r = t("message", "edit", m["message_id"], "x", "--json", name="bob")
    assert_error(r, 5)
    assert r.json["error"]["exit_code"] == 5
    plain = tmp_path / "notinit"
    make_repo(plain, env=team.env)
    r = t("--json", "inbox", cwd=plain)
    assert_error(r, 3)
    assert r.json["error"]["exit_code"] == 3
    r = t("whoami", "--json")  # ambiguous identity
    assert_error(r, 3)
    assert r.json["error"]["exit_code"] == 3


def test_usage_errors_are_exit_2_without_traceback(team):
    t = team.t
    assert_error(t("no-such-command", name="alice"), 2)
    assert_error(t("send", "x", "--to", "bob", "--bogus-flag", name="alice"), 2)
    assert_error(t("inbox", "--limit", "many", name="alice"), 2)


# =============================================================================== durations

def test_wait_duration_parsing(team):
    t = team.t
    for args in (["--after", "-15s"], ["--after=-15s"], ["--after", "-1h30m"], ["--after=-250ms"],
                 ["--after", "-1.5h"]):
        r = t("wait", *args, "--timeout", "0", name="bob")
        assert r.code == 1, r.describe()
        assert r.out.strip() == "NO_MESSAGES_TIMEOUT"
    for bad in (["--after", "5s"], ["--after=+5s"], ["--after", "soon"], ["--timeout", "25h"],
                ["--timeout", "24h1s"], ["--timeout", "-1s"], ["--timeout", "abc"],
                ["--timeout", "5x"]):
        assert_error(t("wait", *bad, name="bob"), 2)
    team.send("alice", "waiting for you", "--to", "bob")
    for ok in (["--timeout", "24h"], ["--timeout", "1h30m"], ["--timeout", "1.5h"],
               ["--timeout", "250ms"], ["--timeout", "30"], ["--timeout", "8m"]):
        start = time.monotonic()
        r = t("wait", "--unread", *ok, name="bob")
        assert r.code == 0, r.describe()
        assert r.out.startswith("MESSAGES_RECEIVED")
        assert time.monotonic() - start < 10
    start = time.monotonic()
    r = t("wait", "--timeout", "0", name="carol")
    assert r.code == 1 and r.out.strip() == "NO_MESSAGES_TIMEOUT", r.describe()
    assert time.monotonic() - start < 5


# =============================================================================== more SPEC details

def walk_timestamps(doc, path="$"):
    """Yield (path, value) for every key ending in `_at` (SPEC §14: event timestamp format)."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k.endswith("_at") or k == "timestamp":
                yield f"{path}.{k}", v
            yield from walk_timestamps(v, f"{path}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from walk_timestamps(v, f"{path}[{i}]")


def test_json_everywhere(team):
    """Every command's --json is exactly one JSON document, with event-format timestamps."""
    t = team.t
    m = team.send("alice", "hello", "--to", "bob")
    team.send("bob", "hi", "--to", "alice")
    t.ok("message", "edit", m["message_id"], "hello again", name="alice")
    t.ok("group", "create", "crew", name="alice")
    t.ok("group", "add", "crew", "bob", name="alice")  # a bare word is an agent name
    t.ok("context", "save", name="alice", input="ctx")
    commands = [
        ["whoami"], ["status"], ["team"], ["team", "--all"], ["overview"], ["prime"],
        ["inbox", "--unread"], ["sent"], ["agent", "list"], ["agent", "list", "--context"],
        ["session", "list"], ["session", "heartbeat"], ["session", "set-intent", "x"],
        ["session", "set-task", "y"], ["context", "show"], ["group", "list"],
        ["group", "info", "crew"], ["config", "show"], ["config", "get", "sync.branch"],
        ["ping", "bob"], ["who-has", "README"], ["doctor"], ["message", "get", m["message_id"]],
        ["sync", "status"], ["agent", "cleanup", "--dry-run"], ["message", "read", "--all"],
        ["inbox"], ["context", "clear"],
    ]
    for args in commands:
        doc = t.json(*args, name="alice")
        for where, v in walk_timestamps(doc):
            assert v is None or (isinstance(v, str) and TS_RE.match(v)), \
                f"`thrum {' '.join(args)} --json`: {where} = {v!r} is not an event timestamp"
    st = t.json("sync", "status", name="alice")
    assert st["remote"] is None and st["state"] == "no-remote"
    for k in ("remote", "branch", "local_only", "last_sync_at", "last_error", "ahead", "behind",
              "state"):
        assert k in st, f"sync status lacks {k}"


def test_human_send_says_who_it_reached(team):
    r = team.t.ok("send", "for the reviewers", "--to", "reviewer", name="alice")
    assert re.search(r"✓ Message sent: msg_\w{26}", r.out)
    assert "bob" in r.out and "carol" in r.out


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "tty+NO_COLOR"])
def test_no_colour_without_tty_or_with_no_color(team, tty, procs):
    team.seed("alice", "colourful?", to=["bob"])
    env = dict(team.env, THRUM_NAME="bob")
    if not tty:
        env.pop("NO_COLOR", None)
        out = subprocess.run([sys.executable, THRUM_PY, "inbox", "--unread"], cwd=team.path,
                             env=env, capture_output=True, stdin=subprocess.DEVNULL).stdout
    else:
        import pty
        master, slave = pty.openpty()
        p = procs.popen([sys.executable, THRUM_PY, "inbox", "--unread"], cwd=team.path,
                        env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        p.wait(timeout=30)
        os.close(master)
        out = b"".join(chunks)
    assert b"colourful?" in out
    assert b"\x1b[" not in out, out


def test_config_layers(team):
    t = team.t
    user = Path(team.env["XDG_CONFIG_HOME"]) / "thrum" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("[messages]\nmax_body_bytes = 50\n")
    assert t.ok("config", "get", "messages.max_body_bytes", name="alice").out == "50\n"
    assert_error(t("send", "y" * 60, "--to", "bob", name="alice"), 2)
    t.ok("config", "set", "messages.max_body_bytes", "200", name="alice")  # repo over user
    team.send("alice", "y" * 60, "--to", "bob")
    assert_error(t("send", "y" * 60, "--to", "bob", name="alice",
                   extra_env={"THRUM_MESSAGES_MAX_BODY_BYTES": "10"}), 2)  # env over files


def test_names_never_escape_directories(team, tmp_path):
    t = team.t
    outside = tmp_path / "outside"
    for args in (["quickstart", "--name", "../evil", "--role", "x", "--module", "m"],
                 ["context", "show", "--agent", "../../etc"],
                 ["context", "save", "--agent", "../x"],
                 ["group", "create", "../g"],
                 ["inbox", "--from", "../bob"],
                 ["ping", "../../x"]):
        assert_error(t(*args, name="alice", input="x"), 2)
    assert_error(t("whoami", name="../alice"), 2)
    assert not outside.exists()
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.rglob("x.md"))


def test_context_unknown_agent(team):
    assert_error(team.t("context", "show", "--agent", "nobody", name="alice"), 4, "nobody")


def test_agent_register_and_takeover(team, tmp_path):
    t = team.t
    t.ok("agent", "register", "--name", "dave", "--role", "tester", "--module", "qa")
    assert read_log(team.log / "agents" / "dave.jsonl")[0]["type"] == "agent.register"
    assert team.send("alice", "hi dave", "--to", "dave")["recipients"] == ["dave"]
    wt = tmp_path / "wt"
    git("worktree", "add", "-q", "-b", "feat/reg", str(wt), cwd=team.path, env=team.env)
    assert_error(t("agent", "register", "--name", "dave", "--role", "tester", "--module", "qa",
                   cwd=wt), 5, "dave")
    t.ok("agent", "register", "--name", "dave", "--role", "tester", "--module", "qa", "--force",
         cwd=wt)
    assert Path(t.json("whoami", cwd=wt)["worktree"]).resolve() == wt.resolve()
    assert_error(t("agent", "register", "--name", "Dave", "--role", "tester", "--module", "qa"),
                 2)


def test_sessions_not_ended_by_cli_exits(team, procs):
    t = team.t
    sid = t.json("whoami", name="alice")["session_id"]
    gone = procs.popen(["true"])
    gone.wait()  # reaped: a dead pid
    t.ok("session", "start", "--pid", str(gone.pid), name="carol")
    for _ in range(3):
        t.ok("inbox", name="alice")
        t.ok("team", name="bob")
    assert t.json("whoami", name="alice")["session_id"] == sid
    members = {m["agent_id"]: m["status"] for m in t.json("team", name="bob")["members"]}
    if team.daemon is None:
        # SPEC §14: pure-CLI commands never end a session, not even one whose recorded
        # long-lived process is dead
        assert members == {"alice": "active", "bob": "active", "carol": "active"}
    else:
        # ...but the daemon does, within its check interval (SPEC §14 "Sessions"): carol's,
        # and only hers (alice's and bob's record no process)
        wait_until(lambda: t.json("whoami", name="carol")["session_id"] is None, 15,
                   "the daemon to end the session of carol's dead process")
        members = {m["agent_id"]: m["status"] for m in t.json("team", name="bob")["members"]}
        assert members == {"alice": "active", "bob": "active"}
        assert t.json("whoami", name="alice")["session_id"] == sid


def test_lines_have_no_length_limit(team, tmp_path):
    big = tmp_path / "big.txt"
    body = ("0123456789abcdef" * 65536)  # exactly 1 MiB, the default limit
    big.write_text(body + "\n")
    doc = team.t.json("send", "--body-file", str(big), "--to", "bob", name="alice")
    got = team.get("bob", doc["message_id"])
    assert got["body"]["content"] == body
    big.write_text(body + "!\n")
    assert_error(team.t("send", "--body-file", str(big), "--to", "bob", name="alice"), 2)
    for f in (team.path / ".thrum" / "var").glob("index.db*"):
        f.unlink()
    assert team.get("bob", doc["message_id"])["body"]["content"] == body
