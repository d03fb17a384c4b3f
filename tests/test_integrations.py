"""`thrum hook` and `thrum integrate` (SPEC §15): hook inputs as Claude Code and Codex send
them (fixtures written from their hook documentation), configs merged and undone."""

from __future__ import annotations

import json
import tomllib

import pytest

from conftest import make_env, make_repo, run_thrum


def claude_stop(cwd, active=False):
    return {"session_id": "0f5c2a9e-1b7d-4c1e-9a43-2d6f8e0b7c11",
            "transcript_path": "/home/u/.claude/projects/p/0f5c2a9e.jsonl", "cwd": str(cwd),
            "permission_mode": "default", "hook_event_name": "Stop",
            "stop_hook_active": active}


def codex_stop(cwd, active=False):
    return {"session_id": "019a3c1e-7d2b-7c40-b1f3-5e9d2a6c8f00", "turn_id": "turn-7",
            "cwd": str(cwd), "model": "gpt-5-codex", "permission_mode": "on-request",
            "hook_event_name": "Stop", "transcript_path": None, "stop_hook_active": active,
            "last_assistant_message": "Done: tests pass."}


def claude_prompt(cwd):
    return {"session_id": "s1", "transcript_path": "/tmp/t.jsonl", "cwd": str(cwd),
            "permission_mode": "default", "hook_event_name": "UserPromptSubmit",
            "prompt": "carry on with the refactor"}


def session_start(cwd, source="startup"):
    return {"session_id": "s1", "transcript_path": "/tmp/t.jsonl", "cwd": str(cwd),
            "hook_event_name": "SessionStart", "source": source}


def hook(team, event, payload, name="bob", *extra):
    r = run_thrum(["hook", event, *extra], team.path, dict(team.env, THRUM_NAME=name),
                  input=json.dumps(payload))
    assert r.code == 0, r.describe()
    assert len(r.err.strip().splitlines()) <= 1, r.describe()
    return r


@pytest.mark.parametrize("fixture", [claude_stop, codex_stop])
def test_stop_blocks_once_per_message_then_lets_the_agent_stop(team, fixture):
    assert hook(team, "stop", fixture(team.path)).out == ""  # nothing new: silent
    a = team.seed("alice", "can you look at auth?", to=["@bob"])
    team.seed("carol", "and at the db", to=["@bob"])
    r = hook(team, "stop", fixture(team.path))
    reply = json.loads(r.out)
    assert reply["decision"] == "block"
    assert "2 new messages" in reply["reason"] and "@alice" in reply["reason"]
    assert "@carol" in reply["reason"] and "thrum inbox" in reply["reason"]
    assert "\n" not in reply["reason"]
    # each message blocks a stop once: the next stop goes through
    assert hook(team, "stop", fixture(team.path)).out == ""
    # stop_hook_active: never block again in the same stop
    team.seed("alice", "one more", to=["@bob"])
    assert hook(team, "stop", fixture(team.path, active=True)).out == ""
    assert json.loads(hook(team, "stop", fixture(team.path)).out)["decision"] == "block"
    # nothing was marked read
    assert a["message_id"] in team.unread_ids("bob")
    # ...and a listener's wait does not get what the hook already told
    w = team.t("wait", "--timeout", "0", "--after", "-60s", name="bob")
    assert w.code == 1


def test_hooks_never_break_the_turn(team, tmp_path):
    env = make_env(tmp_path / "home2")
    bare = make_repo(tmp_path / "nothing", env=env)
    for event, payload in (("stop", claude_stop(bare)), ("prompt", claude_prompt(bare)),
                           ("session-start", session_start(bare))):
        r = run_thrum(["hook", event], bare, env, input=json.dumps(payload))
        assert r.code == 0 and r.out == "" and len(r.err.strip().splitlines()) <= 1, \
            r.describe()
    # several identities and no THRUM_NAME: no identity, exit 0, one line
    r = run_thrum(["hook", "stop"], team.path, team.env, input=json.dumps(claude_stop(
        team.path)))
    assert r.code == 0 and r.out == "" and len(r.err.strip().splitlines()) == 1
    # junk on stdin, an unknown event, a broken index
    assert hook(team, "stop", "not json at all").out == ""
    r = run_thrum(["hook", "bogus"], team.path, dict(team.env, THRUM_NAME="bob"), input="")
    assert r.code == 0 and r.out == "" and len(r.err.strip().splitlines()) == 1
    # a broken index (a message waits for bob): the hook rebuilds it, says so in its one
    # stderr line, and blocks for the message as it would have
    team.seed("alice", "before the damage", to=["@bob"])
    (team.path / ".thrum" / "var" / "index.db").write_bytes(b"garbage" * 100)
    r = hook(team, "stop", claude_stop(team.path))
    reply = json.loads(r.out)
    assert reply["decision"] == "block" and "1 new message from @alice" in reply["reason"], \
        r.describe()
    assert "rebuilding" in r.err, r.describe()


def test_session_start_fits_the_budget_and_marks_nothing(team):
    for i in range(60):  # (stored in process: the hook is under test)
        team.seed("alice", "message %d: " % i + "x" * 300, to=["@bob"])
    team.api("context_save", {"content": "notes\n" * 400}, name="bob")
    before = team.inbox("bob", "--unread")["unread"]
    r = hook(team, "session-start", session_start(team.path, "compact"))
    assert len(r.out.encode()) <= 2048
    reply = json.loads(r.out)
    ctx = reply["hookSpecificOutput"]["additionalContext"]
    assert reply["hookSpecificOutput"]["hookEventName"] == "SessionStart"
    assert "@bob" in ctx and "60 unread" in ctx and "thrum inbox" in ctx
    assert team.inbox("bob", "--unread")["unread"] == before == 60
    # and it told nothing: the stop hook still reports all of them
    assert "60 new messages" in json.loads(hook(team, "stop", claude_stop(team.path)).out)[
        "reason"]


def test_prompt_adds_context_only_when_something_is_new(team):
    assert hook(team, "prompt", claude_prompt(team.path)).out == ""
    team.seed("alice", "ping", to=["@bob"])
    reply = json.loads(hook(team, "prompt", claude_prompt(team.path)).out)
    out = reply["hookSpecificOutput"]
    assert out["hookEventName"] == "UserPromptSubmit"
    assert "1 new message from @alice" in out["additionalContext"]
    assert "\n" not in out["additionalContext"]
    assert hook(team, "prompt", claude_prompt(team.path)).out == ""
    # --agent picks the identity when THRUM_NAME is not set
    team.seed("bob", "for carol", to=["@carol"])
    r = run_thrum(["hook", "prompt", "--agent", "carol"], team.path, team.env,
                  input=json.dumps(claude_prompt(team.path)))
    assert "@bob" in json.loads(r.out)["hookSpecificOutput"]["additionalContext"]


# --------------------------------------------------------------------------- integrate

def integrate(team, *args, name="bob"):
    r = run_thrum(["integrate", *args], team.path, dict(team.env, THRUM_NAME=name))
    return r


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".git" not in p.parts and ".thrum" not in p.parts}


def test_integrate_claude_on_an_empty_project(team):
    before = snapshot(team.path)
    dry = integrate(team, "claude")
    assert dry.code == 0 and ".mcp.json" in dry.out and "--write" in dry.out
    assert snapshot(team.path) == before  # printing writes nothing
    r = integrate(team, "claude", "--write", "--json")
    assert r.code == 0, r.describe()
    assert sorted(f["action"] for f in r.json["files"]) == ["create"] * 3
    mcp = json.loads((team.path / ".mcp.json").read_text())
    srv = mcp["mcpServers"]["thrum"]
    assert srv["env"] == {"THRUM_NAME": "bob"} and srv["args"][-2:] == ["mcp", "serve"]
    settings = json.loads((team.path / ".claude" / "settings.json").read_text())
    for event, word in (("SessionStart", "session-start"), ("Stop", "stop"),
                        ("UserPromptSubmit", "prompt")):
        cmds = [h["command"] for g in settings["hooks"][event] for h in g["hooks"]]
        assert len(cmds) == (2 if event == "Stop" else 1)
        assert f"hook {word} --agent bob" in cmds[0]
    # the wake hook runs in the background on Stop, and may wake the idle session
    wake = settings["hooks"]["Stop"][0]["hooks"][1]
    assert "hook wake --agent bob" in wake["command"]
    assert wake["async"] is True and wake["asyncRewake"] is True
    assert wake["timeout"] > 600  # longer than its own --timeout 10m
    listener = (team.path / ".claude" / "agents" / "thrum-listener.md").read_text()
    assert listener.startswith("---\nname: thrum-listener\n")
    assert "wait --timeout 8m --after -15s --json" in listener
    assert "MESSAGES_RECEIVED" in listener and "NO_MESSAGES_TIMEOUT" in listener
    written = snapshot(team.path)
    again = integrate(team, "claude", "--write", "--json")
    assert [f["action"] for f in again.json["files"]] == ["unchanged"] * 3
    assert snapshot(team.path) == written
    gone = integrate(team, "claude", "--write", "--remove")
    assert gone.code == 0
    assert snapshot(team.path) == before
    assert not (team.path / ".claude").exists()


def test_integrate_claude_keeps_what_is_there(team):
    (team.path / ".claude").mkdir()
    mcp = {"mcpServers": {"db": {"command": "db-mcp", "args": ["--ro"]}}, "x": [1, 2]}
    settings = {"permissions": {"allow": ["Bash(ls)"]}, "hooks": {"Stop": [
        {"matcher": "", "hooks": [{"type": "command", "command": "./notify.sh"}]}]}}
    (team.path / ".mcp.json").write_text(json.dumps(mcp, indent=4))
    (team.path / ".claude" / "settings.json").write_text(json.dumps(settings))
    before = snapshot(team.path)
    assert integrate(team, "claude", "--write", "--agent", "carol").code == 0
    new_mcp = json.loads((team.path / ".mcp.json").read_text())
    assert new_mcp["mcpServers"]["db"] == mcp["mcpServers"]["db"] and new_mcp["x"] == [1, 2]
    assert new_mcp["mcpServers"]["thrum"]["env"] == {"THRUM_NAME": "carol"}
    new = json.loads((team.path / ".claude" / "settings.json").read_text())
    assert new["permissions"] == settings["permissions"]
    stop = [h["command"] for g in new["hooks"]["Stop"] for h in g["hooks"]]
    assert stop[0] == "./notify.sh" and "hook stop --agent carol" in stop[1]
    middle = snapshot(team.path)
    assert integrate(team, "claude", "--write", "--agent", "carol").code == 0
    assert snapshot(team.path) == middle
    assert integrate(team, "claude", "--write", "--remove", "--agent", "carol").code == 0
    assert snapshot(team.path) == before


def test_integrate_refuses_a_file_it_cannot_parse(team):
    (team.path / ".mcp.json").write_text('{"mcpServers": {')
    before = snapshot(team.path)
    r = integrate(team, "claude", "--write")
    assert r.code == 2 and "not valid JSON" in r.err and "untouched" in r.err, r.describe()
    assert snapshot(team.path) == before  # nothing half-written: no settings.json either
    (team.path / ".codex").mkdir()
    (team.path / ".codex" / "config.toml").write_text("model = [\n")
    before = snapshot(team.path)
    r = integrate(team, "codex", "--write")
    assert r.code == 2 and "not valid TOML" in r.err, r.describe()
    assert snapshot(team.path) == before
    assert integrate(team, "gemini").code == 2
    assert integrate(team, "claude", "--agent", "nobody").code == 4


def test_integrate_codex_keeps_comments_and_undoes_exactly(team):
    (team.path / ".codex").mkdir()
    original = ('# team settings: keep this comment\nmodel = "gpt-5-codex"  # pinned\n\n'
                '[mcp_servers.docs]\ncommand = "docs-mcp"\nargs = ["--port", "0"]\n')
    (team.path / ".codex" / "config.toml").write_text(original)
    assert integrate(team, "codex").code == 0
    assert (team.path / ".codex" / "config.toml").read_text() == original
    r = integrate(team, "codex", "--write")
    assert r.code == 0, r.describe()
    text = (team.path / ".codex" / "config.toml").read_text()
    assert text.startswith(original) and "# team settings: keep this comment" in text
    doc = tomllib.loads(text)
    assert doc["model"] == "gpt-5-codex" and doc["mcp_servers"]["docs"]["command"] == "docs-mcp"
    thrum = doc["mcp_servers"]["thrum"]
    assert thrum["env"] == {"THRUM_NAME": "bob"} and thrum["args"][-2:] == ["mcp", "serve"]
    for event, word in (("SessionStart", "session-start"), ("Stop", "stop"),
                        ("UserPromptSubmit", "prompt")):
        assert f"hook {word} --agent bob" in doc["hooks"][event][0]["hooks"][0]["command"]
    assert integrate(team, "codex", "--write").code == 0
    assert (team.path / ".codex" / "config.toml").read_text() == text
    assert integrate(team, "codex", "--write", "--remove").code == 0
    assert (team.path / ".codex" / "config.toml").read_text() == original
    # on a project without a config: created, then removed again
    (team.path / ".codex" / "config.toml").unlink()
    assert integrate(team, "codex", "--write").code == 0
    assert tomllib.loads((team.path / ".codex" / "config.toml").read_text())["mcp_servers"]
    assert integrate(team, "codex", "--write", "--remove").code == 0
    assert not (team.path / ".codex" / "config.toml").exists()
