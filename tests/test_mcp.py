"""`thrum mcp serve` (SPEC §11): the official MCP Python SDK as the client, in its three
connection modes, plus raw stdio sessions for what the SDK hides (framing, cancellation,
EOF, the era of each request, the Claude Code channel)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

from conftest import (MSG_ID_RE, THRUM_CMD, TS_RE, assert_alive, make_env, make_repo,
                      make_team, run_thrum, wait_older_than, wait_until, waiting)

TOOLS = ["send_message", "check_messages", "wait_for_message", "reply_message", "get_message",
         "mark_read", "list_agents", "who_has", "search_messages"]
MODERN = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
          "io.modelcontextprotocol/clientCapabilities": {}}
INIT = {"protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"}}  # what McpSession.initialize sends


def server_env(team, **extra) -> dict:
    """What an MCP client passes: a minimal environment plus the config's `env` block."""
    env = {k: team.env[k] for k in ("PATH", "HOME", "XDG_CONFIG_HOME", "LC_ALL", "TZ")
           if k in team.env}
    env.update(extra)
    return env


@pytest.fixture
def mteam(modal_team):
    """The team, without and with a daemon (which must survive the test)."""
    return modal_team


def daemon_waiting(team) -> int:
    return waiting(team.path)


# --------------------------------------------------------------------------- SDK client

def sdk(team, name, mode="auto", **env):
    params = StdioServerParameters(command=THRUM_CMD[0], args=[*THRUM_CMD[1:], "mcp", "serve"],
                                   cwd=str(team.path), env=dict(env, THRUM_NAME=name))
    return Client(params, mode=mode)


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


@pytest.mark.parametrize("mode", ["auto", "legacy", "2026-07-28"])
def test_sdk_session(team, mode):
    (team.path / "auth.py").write_text("x = 1\n")
    out = {}

    async def main():
        async with sdk(team, "bob", mode, HOME=team.env["HOME"]) as bob, \
                sdk(team, "alice", mode, HOME=team.env["HOME"]) as alice:
            tools = (await bob.list_tools()).tools
            out["tools"] = [(t.name, t.input_schema.get("type"), bool(t.description))
                            for t in tools]
            sent = await alice.call_tool("send_message", {"to": "@bob", "content": "review pls",
                                                          "scopes": ["module:auth"]})
            out["sent"] = sent
            out["check"] = await bob.call_tool("check_messages", {})
            out["check_again"] = await bob.call_tool("check_messages", {"limit": 5})
            mid = sent.structured_content["message_id"]
            out["get"] = await bob.call_tool("get_message", {"message_id": mid})
            out["reply"] = await bob.call_tool("reply_message", {"message_id": mid[:12],
                                                                 "content": "on it"})
            out["alice_inbox"] = await alice.call_tool("check_messages",
                                                       {"unread_only": True, "mark_read": True})
            out["alice_after"] = await alice.call_tool("check_messages", {})
            out["who"] = await alice.call_tool("who_has", {"path": "auth.py"})
            out["agents"] = await alice.call_tool("list_agents", {})
            two = await alice.call_tool("send_message", {"to": ["bob", "carol"],
                                                         "content": "second"})
            out["two"] = two
            out["mark"] = await bob.call_tool("mark_read", {"message_ids": [
                two.structured_content["message_id"]]})
            out["wait"] = await bob.call_tool("wait_for_message", {"timeout": 0.5})
            out["bad"] = await bob.call_tool("send_message", {"to": "@ghost", "content": "x"})
            try:
                await bob.call_tool("no_such_tool", {})
                out["unknown"] = None
            except MCPError as e:
                out["unknown"] = e
    anyio.run(main)

    assert [t[0] for t in out["tools"]] == TOOLS
    assert all(t[1] == "object" and t[2] for t in out["tools"])
    sent = out["sent"]
    assert not sent.is_error and sent.structured_content["recipients"] == ["bob"]
    assert MSG_ID_RE.fullmatch(sent.structured_content["message_id"])
    mid = sent.structured_content["message_id"]
    assert mid in text(sent)
    check = out["check"].structured_content
    assert [m["message_id"] for m in check["messages"]] == [mid]
    assert check["messages"][0]["agent_id"] == "alice" and check["unread"] == 1
    assert check["messages"][0]["scopes"] == [{"type": "module", "value": "auth"}]
    assert "review pls" in text(out["check"])
    # check_messages marks nothing read by default
    assert out["check_again"].structured_content["unread"] == 1
    got = out["get"].structured_content["message"]
    assert got["message_id"] == mid and got["body"]["content"] == "review pls"
    assert TS_RE.match(got["created_at"]) and "receipts" in got
    rep = out["reply"].structured_content
    assert rep["recipients"] == ["alice"] and rep["reply_to"] == mid and rep["thread_id"]
    inbox = out["alice_inbox"].structured_content
    assert [m["message_id"] for m in inbox["messages"]] == [rep["message_id"]]
    assert inbox["messages"][0]["body"]["content"] == "on it"
    assert out["alice_after"].structured_content["total"] == 0  # mark_read: true marked it
    who = out["who"].structured_content
    assert who["path"] == "auth.py"
    assert {a["agent_id"] for a in who["agents"]} == {"alice", "bob", "carol"}
    names = [m["agent_id"] for m in out["agents"].structured_content["members"]]
    assert {"alice", "bob", "carol"} <= set(names)
    assert sorted(out["two"].structured_content["recipients"]) == ["bob", "carol"]
    assert out["mark"].structured_content["marked_count"] == 1
    wait = out["wait"]
    assert not wait.is_error
    assert wait.structured_content == {"status": "timeout", "messages": []}
    assert "NO_MESSAGES_TIMEOUT" in text(wait)
    assert out["bad"].is_error and "unknown recipient" in text(out["bad"])
    assert out["unknown"] is not None
    # the CLI sees what MCP did
    assert team.get("bob", mid)["is_read"] is True  # get_message marked it read
    carol = team.inbox("carol", "--unread")
    assert [m["body"]["content"] for m in carol["messages"]] == ["second"]


@pytest.mark.parametrize("client_mode", ["legacy", "2026-07-28"])
def test_sdk_wait_woken_by_cli_send_with_progress(mteam, client_mode):
    """A wait blocks until a CLI send (with and without a daemon); progress arrives while
    it waits (a short interval set through the config `env` block); a wait the client
    gives up on is cancelled and leaves the server usable; the CLI wait then does not get
    the message again."""
    team = mteam
    progress, out = [], {}

    async def main():
        async with sdk(team, "bob", client_mode, HOME=team.env["HOME"],
                       THRUM_MCP_PROGRESS_INTERVAL="0.2") as bob:
            with anyio.move_on_after(1.0):  # the SDK sends notifications/cancelled
                out["abandoned"] = await bob.call_tool("wait_for_message", {"timeout": 60})
            if team.daemon:
                await anyio.to_thread.run_sync(lambda: wait_until(
                    lambda: daemon_waiting(team) == 0, 20, "the cancelled wait to end"))
            async def cb(p, total, message):
                progress.append((p, total, message))

            async def sender():
                await anyio.to_thread.run_sync(
                    lambda: wait_until(lambda: len(progress) >= 2, 20, "progress"))
                out["sent"] = await anyio.to_thread.run_sync(
                    lambda: team.send("alice", "wake up", "--to", "@bob"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(sender)
                out["wait"] = await bob.call_tool("wait_for_message", {"timeout": 30},
                                                  progress_callback=cb)
    anyio.run(main)
    assert "abandoned" not in out
    r = out["wait"].structured_content
    assert r["status"] == "received"
    assert [m["message_id"] for m in r["messages"]] == [out["sent"]["message_id"]]
    assert "MESSAGES_RECEIVED" in text(out["wait"]) and "FROM: @alice" in text(out["wait"])
    values = [p[0] for p in progress]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert all(p[1] == 30 for p in progress)
    # delivered once: the CLI's listener does not get it again, even looking back
    r = team.t("wait", "--timeout", "0", "--after", "-60s", name="bob")
    assert r.code == 1 and "NO_MESSAGES_TIMEOUT" in r.out


# --------------------------------------------------------------------------- raw sessions

def test_every_stdout_line_is_a_frame(team, procs):
    """A whole session with errors of every kind: stdout carries one JSON-RPC frame per
    line, notifications get no reply, ids keep their type."""
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"))
    assert s.request("ping")["result"] == {}
    init = s.initialize()
    assert init["protocolVersion"] == "2025-11-25"
    assert init["serverInfo"]["name"] == "thrum" and init["capabilities"]["tools"]
    assert "experimental" not in init["capabilities"]
    s.write(b"this is not json")
    s.write(b'{"jsonrpc": "2.0", "id": 5')  # torn
    s.write({"jsonrpc": "2.0", "id": "s1", "method": "no/such"})
    s.write({"jsonrpc": "2.0", "id": 7})                       # no method
    s.write({"id": 8, "method": "tools/list"})                  # no jsonrpc
    s.write({"jsonrpc": "2.0", "method": "notifications/whatever"})
    s.write([{"jsonrpc": "2.0", "id": "b1", "method": "tools/list"},
             {"jsonrpc": "2.0", "method": "notifications/initialized"},
             {"jsonrpc": "2.0", "id": "b2", "method": "tools/call",
              "params": {"name": "check_messages"}}])
    s.write({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
             "params": {"name": "send_message", "arguments": {"to": "alice",
                                                              "content": "a\nb\u2028c"}}})
    assert s.reply("s1")["error"]["code"] == -32601
    assert s.reply(7)["error"]["code"] == -32600
    assert s.reply(8)["error"]["code"] == -32600
    sent = s.reply(9)["result"]
    assert sent["structuredContent"]["recipients"] == ["alice"]
    batch = wait_until(lambda: [m for m in s.all if isinstance(m, list)], 10, "the batch")
    assert sorted(r["id"] for r in batch[0]) == ["b1", "b2"]
    assert isinstance(s.reply(9)["id"], int) and s.reply("s1")["id"] == "s1"
    parse_errors = wait_until(lambda: [m for m in s.all if isinstance(m, dict) and
                                       m.get("error", {}).get("code") == -32700], 10,
                              "the parse errors")
    assert all(m["id"] is None for m in parse_errors)
    got = team.get("alice", sent["structuredContent"]["message_id"])
    assert got["body"]["content"] == "a\nb\u2028c"
    s.close()
    assert not s.notes  # nothing but replies: no notification was due
    assert len([m for m in s.all if isinstance(m, dict) and m.get("id") is None]) == 2


def test_modern_requests_and_a_late_initialize(team, procs):
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"))
    d = s.request("server/discover", {"_meta": MODERN})["result"]
    assert d["resultType"] == "complete" and "2026-07-28" in d["supportedVersions"]
    assert "2025-11-25" in d["supportedVersions"]
    assert isinstance(d["ttlMs"], int) and d["cacheScope"] == "public"  # same for everyone
    assert d["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "thrum"
    # a slow probe raced by the client's fallback: initialize still works
    init = s.request("initialize", INIT)["result"]
    assert init["protocolVersion"] == "2025-11-25" and "serverInfo" in init
    old = s.request("initialize", dict(INIT, protocolVersion="2024-11-05"))["result"]
    assert old["protocolVersion"] == "2024-11-05"
    odd = s.request("initialize", dict(INIT, protocolVersion="1999-01-01"))["result"]
    assert odd["protocolVersion"] == "2025-11-25"
    legacy = s.request("tools/list")["result"]
    modern = s.request("tools/list", {"_meta": MODERN})["result"]
    assert [t["name"] for t in legacy["tools"]] == TOOLS == [t["name"] for t in modern["tools"]]
    assert modern["resultType"] == "complete" and isinstance(modern["ttlMs"], int)
    assert "resultType" not in legacy
    r = s.call("check_messages", {}, meta=MODERN)
    assert r["resultType"] == "complete" and r["structuredContent"]["total"] == 0
    bad = s.request("tools/list", {"_meta": {"io.modelcontextprotocol/protocolVersion":
                                             "2026-07-28"}})
    assert bad["error"]["code"] == -32602
    bad = s.request("tools/list", {"_meta": dict(
        MODERN, **{"io.modelcontextprotocol/protocolVersion": "2099-01-01"})})
    assert bad["error"]["code"] == -32022
    assert "2026-07-28" in bad["error"]["data"]["supported"]
    assert bad["error"]["data"]["requested"] == "2099-01-01"
    assert s.request("server/discover")["error"]["code"] == -32602  # needs the envelope
    s.close()


def test_bad_arguments_are_tool_errors(team, procs):
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"))
    s.initialize()
    cases = [
        ("send_message", {"to": 5, "content": "x"}, "to must be"),
        ("send_message", {"to": "alice"}, "missing argument: content"),
        ("send_message", {"to": "alice", "content": "x", "colour": "red"}, "unknown argument"),
        ("send_message", {"to": "alice", "content": ""}, ""),
        ("send_message", {"to": "alice", "content": "x", "reply_to": "msg_0000"}, "too short"),
        ("wait_for_message", {"timeout": 9999}, "between 0 and 600"),
        ("wait_for_message", {"timeout": "soon"}, "timeout must be a number"),
        ("check_messages", {"limit": 0}, "limit"),
        ("mark_read", {}, "message_ids"),
        ("get_message", {"message_id": "msg_01M8VQ39BXZAX8B1Q9P4T5Z1NG"}, "not found"),
        ("reply_message", {"message_id": "hello-world", "content": "x"}, "invalid message id"),
    ]
    for tool, args, fragment in cases:
        r = s.call(tool, args)
        assert r.get("isError") is True, (tool, args, r)
        assert fragment.lower() in r["content"][0]["text"].lower(), (tool, args, r)
        assert "\n" not in r["content"][0]["text"]
        assert r["structuredContent"]["error"]["message"] == r["content"][0]["text"]
    nf = s.call("get_message", {"message_id": "msg_01M8VQ39BXZAX8B1Q9P4T5Z1NG"})
    assert nf["structuredContent"]["error"]["exit_code"] == 4
    unknown = s.request("tools/call", {"name": "nope", "arguments": {}})
    assert unknown["error"]["code"] == -32602
    notobj = s.request("tools/call", {"name": "check_messages", "arguments": [1]})
    assert notobj["error"]["code"] == -32602
    # lenient where models are sloppy
    ok = s.call("check_messages", {"limit": "3", "unread_only": "false"})
    assert not ok.get("isError") and ok["structuredContent"]["page_size"] == 3
    s.close()
    assert team.t.json("sent", name="bob")["messages"] == []  # nothing was stored


def test_identity_from_env_agent_flag_or_the_only_one(tmp_path, procs):
    team = make_team(tmp_path)
    # three identities here and no THRUM_NAME: tools/list works; tools say how to fix it
    s = procs.mcp(team.path, server_env(team))
    s.initialize()
    assert [t["name"] for t in s.request("tools/list")["result"]["tools"]] == TOOLS
    r = s.call("check_messages")
    assert r["isError"] is True
    hint = " ".join(c["text"] for c in r["content"])
    assert "several identities" in hint and "THRUM_NAME" in hint and "env" in hint
    s.close()
    s = procs.mcp(team.path, server_env(team), "--agent", "@carol")
    s.initialize()
    assert s.call("check_messages")["structuredContent"]["agent_id"] == "carol"
    s.close()
    # a worktree with one identity needs nothing
    env = make_env(tmp_path / "home2")
    repo = make_repo(tmp_path / "solo", env=env)
    assert run_thrum(["quickstart", "--name", "dave", "--role", "r", "--module", "m"],
                     repo, env).code == 0
    solo = procs.mcp(repo, {k: env[k] for k in ("PATH", "HOME")})
    solo.initialize()
    assert solo.call("check_messages")["structuredContent"]["agent_id"] == "dave"
    solo.close()
    bad = run_thrum(["mcp", "serve", "--agent", "Not A Name"], team.path, team.env)
    assert bad.code == 2 and bad.err.count("\n") <= 2 and "invalid agent name" in bad.err
    assert bad.out == ""


def test_pid_recorded_and_session_reaped_by_the_daemon(team, procs):
    daemon = procs.daemon(team.path, team.env)
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"))
    s.initialize()

    def whoami():
        return team.t.json("whoami", name="bob")
    w = wait_until(lambda: (lambda d: d if d["pid"] == s.p.pid else None)(whoami()), 20,
                   "the server's pid as bob's long-lived process")
    sid = w["session_id"]
    s.p.kill()
    s.p.wait()
    s.close()
    wait_until(lambda: whoami()["session_id"] is None, 20, "the daemon to end the session")
    ended = [s for s in team.t.json("session", "list", name="bob")["sessions"]
             if s["session_id"] == sid]
    assert ended and ended[0]["status"] == "ended"
    assert "exited" in ended[0]["end_reason"]
    assert_alive(daemon)


def test_cancelled_wait_sends_nothing_and_claims_nothing(mteam, procs):
    team = mteam
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob", THRUM_MCP_PROGRESS_INTERVAL="0.2"))
    s.initialize()
    rid = s.send("tools/call", {"name": "wait_for_message", "arguments": {"timeout": 60},
                                "_meta": {"progressToken": "p1"}})
    wait_until(lambda: s.notes_of("notifications/progress"), 20, "the wait to block")
    if team.daemon:
        wait_until(lambda: daemon_waiting(team) == 1, 20, "the wait in the daemon")
    s.notify("notifications/cancelled", {"requestId": rid, "reason": "user"})
    if team.daemon:
        wait_until(lambda: daemon_waiting(team) == 0, 20, "the daemon's wait to end")
    # the server stays usable while (and after) the wait is cancelled
    assert "members" in s.call("list_agents", {})["structuredContent"]
    sent = team.send("alice", "after the cancel", "--to", "@bob")
    got = s.call("wait_for_message", {"timeout": 10})["structuredContent"]
    assert [m["message_id"] for m in got["messages"]] == [sent["message_id"]]
    n = len(s.notes_of("notifications/progress"))
    time.sleep(0.6)  # a negative check: a cancelled call's progress and reply stop
    assert len(s.notes_of("notifications/progress")) == n
    assert json.dumps(rid) not in s.replies
    s.close()
    assert json.dumps(rid) not in s.replies


def test_eof_ends_the_server_within_a_second(mteam, procs):
    team = mteam
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob", THRUM_MCP_PROGRESS_INTERVAL="0.2"))
    s.initialize()
    s.send("tools/call", {"name": "wait_for_message", "arguments": {"timeout": 120},
                          "_meta": {"progressToken": 1}})
    wait_until(lambda: s.notes_of("notifications/progress"), 20, "the wait to block")
    t0 = time.monotonic()
    s.p.stdin.close()
    s.p.wait(10)
    assert time.monotonic() - t0 < 1.0
    assert s.p.returncode == 0
    s.close()
    if team.daemon:
        wait_until(lambda: daemon_waiting(team) == 0, 20, "the daemon's wait to end")
    # the abandoned wait claimed nothing
    sent = team.send("alice", "later", "--to", "@bob")
    r = team.t("wait", "--timeout", "10s", "--json", name="bob")
    assert r.code == 0 and r.json["messages"][0]["message_id"] == sent["message_id"]


def test_two_servers_and_the_cli_share_delivered_once(mteam, procs):
    team = mteam
    bob = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"))
    alice = procs.mcp(team.path, server_env(team, THRUM_NAME="alice"))
    bob.initialize()
    alice.initialize()
    rid = bob.send("tools/call", {"name": "wait_for_message", "arguments": {"timeout": 20}})
    sent = alice.call("send_message", {"to": "bob", "content": "ping"})["structuredContent"]
    got = bob.reply(rid)["result"]["structuredContent"]
    assert got["status"] == "received"
    assert [m["message_id"] for m in got["messages"]] == [sent["message_id"]]
    rep = bob.call("reply_message", {"message_id": sent["message_id"], "content": "pong"})
    back = alice.call("wait_for_message", {"timeout": 20})["structuredContent"]
    assert [m["body"]["content"] for m in back["messages"]] == ["pong"]
    assert back["messages"][0]["thread_id"] == rep["structuredContent"]["thread_id"]
    # woken once: neither another MCP wait nor the CLI listener gets them again
    assert bob.call("wait_for_message", {"timeout": 0.3})["structuredContent"]["status"] == \
        "timeout"
    r = team.t("wait", "--timeout", "0", "--after", "-60s", name="alice")
    assert r.code == 1
    # ...and what the CLI listener took, MCP does not get again
    s2 = team.send("alice", "via cli", "--to", "@bob")
    r = team.t("wait", "--timeout", "10s", "--after", "-60s", "--json", name="bob")
    assert [m["message_id"] for m in r.json["messages"]] == [s2["message_id"]]
    assert bob.call("wait_for_message", {"timeout": 0.3})["structuredContent"]["status"] == \
        "timeout"
    # a message that came in between two waits is not lost (the gap is looked back on)
    s3 = team.send("carol", "between waits", "--to", "@bob")
    wait_older_than(s3, 1.0)  # older than a plain wait's one second of lookback
    got = bob.call("wait_for_message", {"timeout": 5})["structuredContent"]
    assert [m["message_id"] for m in got["messages"]] == [s3["message_id"]]
    bob.close()
    alice.close()


def test_progress_every_fifteen_seconds_by_default(team, procs):
    """Progress notifications come every mcp.progress_interval while a wait blocks: 15s by
    default; the mechanism is checked with 0.5s (the config key through the server's
    environment, as an MCP client's `env` block sets it)."""
    assert team.t.ok("config", "get", "mcp.progress_interval").out.strip() == "15s"
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob",
                                        THRUM_MCP_PROGRESS_INTERVAL="0.5s"))
    s.initialize()
    t0 = time.monotonic()
    r = s.call("wait_for_message", {"timeout": 2.25}, meta={"progressToken": "tok"},
               timeout=40)
    assert r["structuredContent"]["status"] == "timeout" and not r.get("isError")
    assert time.monotonic() - t0 >= 2.2
    prog = [n["params"] for n in s.notes_of("notifications/progress")]
    # at 0.5, 1.0, 1.5 and (unless the last one lost the race with the end) 2.0 seconds
    assert 3 <= len(prog) <= 4, prog
    for i, p in enumerate(prog, 1):
        assert p["progressToken"] == "tok" and p["total"] == 2.25, p
        assert 0.5 * i <= p["progress"] <= 0.5 * i + 0.4, prog
        assert "waiting for a message" in p["message"] and "left" in p["message"], p
    s.close()
    assert len(s.notes_of("notifications/progress")) == len(prog)  # none after the reply


# --------------------------------------------------------------------------- the channel

def test_channel_pushes_each_message_once(mteam, procs):
    team = mteam
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"), "--channel")
    init = s.initialize()
    assert init["capabilities"]["experimental"] == {"claude/channel": {}}
    assert "<channel" in init["instructions"] and "reply_message" in init["instructions"]
    s.call("list_agents")  # the server is up and initialized
    m1 = team.send("alice", "first push", "--to", "@bob")
    push = wait_until(lambda: s.notes_of("notifications/claude/channel"), 20, "the push")
    p = push[0]["params"]
    assert p["content"] == "first push"
    assert set(p["meta"]) == {"from", "message_id", "thread_id", "ts"}
    assert all(isinstance(v, str) for v in p["meta"].values())
    assert p["meta"]["from"] == "alice" and p["meta"]["message_id"] == m1["message_id"]
    assert TS_RE.match(p["meta"]["ts"])
    # the push marks nothing read and claims nothing for waits
    assert team.unread_ids("bob") == [m1["message_id"]]
    w = s.call("wait_for_message", {"timeout": 5})["structuredContent"]
    assert [m["message_id"] for m in w["messages"]] == [m1["message_id"]]
    # a reply in a thread is pushed with its thread id; my own messages never are
    ack = s.call("reply_message", {"message_id": m1["message_id"], "content": "ack"})
    thread = ack["structuredContent"]["thread_id"]
    m2 = team.t.json("reply", ack["structuredContent"]["message_id"], "thanks", name="alice")
    wait_until(lambda: len(s.notes_of("notifications/claude/channel")) >= 2, 20, "push 2")
    s.call("list_agents")
    time.sleep(0.6)  # a negative check: nothing more comes
    pushes = s.notes_of("notifications/claude/channel")
    assert [n["params"]["meta"]["message_id"] for n in pushes] == [m1["message_id"],
                                                                   m2["message_id"]]
    assert pushes[1]["params"]["meta"]["thread_id"] == thread and thread
    s.close()
    # a second server for the same agent pushes nothing old again
    s2 = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"), "--channel")
    s2.initialize()
    m3 = team.send("alice", "third", "--to", "@bob")
    wait_until(lambda: s2.notes_of("notifications/claude/channel"), 20, "push 3")
    s2.call("list_agents")
    time.sleep(0.6)
    assert [n["params"]["meta"]["message_id"] for n in
            s2.notes_of("notifications/claude/channel")] == [m3["message_id"]]
    s2.close()


def test_channel_mode_offers_the_initialize_era_only(team, procs):
    """With --channel, server/discover is an unknown method and a 2026-07-28 request an
    unsupported version listing the legacy ones (Claude Code delivers channel pushes only on
    the initialize era, and picks the modern one whenever discover answers); initialize
    still declares the channel. Without the flag discover is answered (the control)."""
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"), "--channel")
    d = s.request("server/discover", {"_meta": MODERN})
    assert d["error"]["code"] == -32601 and "result" not in d
    assert d["error"]["message"].startswith("Method not found: server/discover")
    assert s.request("server/discover")["error"]["code"] == -32601  # whatever its params
    for method, params in (("tools/list", {"_meta": MODERN}),
                           ("tools/call", {"name": "check_messages", "arguments": {},
                                           "_meta": MODERN})):
        bad = s.request(method, params)["error"]
        assert bad["code"] == -32022, bad
        assert bad["data"] == {"supported": ["2025-11-25", "2025-06-18", "2025-03-26",
                                             "2024-11-05"], "requested": "2026-07-28"}
    init = s.request("initialize", INIT)["result"]  # the fallback, on the same process
    assert init["protocolVersion"] == "2025-11-25"
    assert init["capabilities"]["experimental"] == {"claude/channel": {}}
    s.notify("notifications/initialized")
    assert [t["name"] for t in s.request("tools/list")["result"]["tools"]] == TOOLS
    assert s.call("check_messages")["structuredContent"]["total"] == 0
    s.close()
    assert not s.bad
    plain = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"))
    d = plain.request("server/discover", {"_meta": MODERN})["result"]
    assert d["supportedVersions"][0] == "2026-07-28"
    assert "experimental" not in d["capabilities"]
    plain.close()


def test_sdk_auto_mode_falls_back_to_initialize_on_a_channel_server(team):
    """The official client in its default mode: the refused discover sends it to the
    initialize era, where the channel capability is declared."""
    out = {}

    async def main():
        params = StdioServerParameters(
            command=THRUM_CMD[0], args=[*THRUM_CMD[1:], "mcp", "serve", "--channel"],
            cwd=str(team.path), env={"THRUM_NAME": "bob", "HOME": team.env["HOME"]})
        async with Client(params, mode="auto") as bob:
            out["version"] = bob.protocol_version
            out["caps"] = bob.server_capabilities
            out["check"] = await bob.call_tool("check_messages", {})
    anyio.run(main)
    assert out["version"] == "2025-11-25"
    assert (out["caps"].experimental or {}).get("claude/channel") == {}
    assert not out["check"].is_error


def test_no_channel_without_the_flag(team, procs):
    s = procs.mcp(team.path, server_env(team, THRUM_NAME="bob"))
    init = s.initialize()
    assert "experimental" not in init["capabilities"]
    assert "<channel" not in init["instructions"]
    sent = team.send("alice", "hello", "--to", "@bob")
    w = s.call("wait_for_message", {"timeout": 10})["structuredContent"]
    assert w["messages"][0]["message_id"] == sent["message_id"]
    time.sleep(0.6)  # a negative check: the channel would have pushed by now
    assert s.notes_of("notifications/claude/channel") == []
    s.close()


def test_stdout_stays_clean_when_the_store_is_missing(tmp_path, procs):
    """No store at all: the server still answers, tools say what to do, and nothing but
    frames reaches stdout."""
    env = make_env(tmp_path / "home")
    repo = make_repo(tmp_path / "bare-repo", env=env)
    s = procs.mcp(repo, {k: env[k] for k in ("PATH", "HOME")})
    s.initialize()
    r = s.call("send_message", {"to": "bob", "content": "x"})
    assert r["isError"] is True and "not initialised" in r["content"][0]["text"]
    assert not Path(repo, ".thrum").exists() or not list(Path(repo, ".thrum").rglob("*.jsonl"))
    s.close()
