"""`thrum hook` and `thrum integrate` (SPEC §15): hook inputs as Claude Code and Codex send
them (fixtures written from their hook documentation), configs merged and undone."""

from __future__ import annotations

import json
import os
import tomllib

import pytest

from conftest import REPO_ROOT, git, make_env, make_repo, run_thrum


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


# --------------------------------------------------------------------------- Codex's trust
# Codex (0.171.0, checked with the real binary) reads a project's .codex/config.toml only
# once the project is trusted in $CODEX_HOME/config.toml, and runs a project's hooks only
# once their approval is recorded there under [hooks.state."<file>:<event>:<group>:<hook>"].

def codex_env(team, codex_home=None, name="bob"):
    env = dict(team.env, THRUM_NAME=name)
    if codex_home is not None:
        env["CODEX_HOME"] = str(codex_home)
    return env


def codex_checks(team, env, *args, cwd=None):
    r = run_thrum(["doctor", "--json", *args], cwd or team.path, env)
    return r, {c["name"]: c for c in json.loads(r.out)["checks"] if c["name"].startswith("codex")}


def test_integrate_codex_prints_the_trust_steps(team, tmp_path):
    home = tmp_path / "codex-home"
    key = os.path.realpath(team.path)
    for args in ((), ("--write",)):
        r = run_thrum(["integrate", "codex", *args], team.path, codex_env(team, home))
        assert r.code == 0, r.describe()
        steps = r.out[r.out.index("Then, in Codex:"):]
        assert f'run `codex` in {key} and choose "Trust and continue"' in steps
        assert f"add to {home}/config.toml:" in steps
        assert f'\n       [projects."{key}"]\n       trust_level = "trusted"\n' in steps
        assert '"Hooks need review", choose "Trust all and continue"' in steps
        assert "/hooks" in steps and "`codex mcp get thrum`" in steps
    j = json.loads(run_thrum(["integrate", "codex", "--json"], team.path,
                             codex_env(team, home)).out)
    assert j["codex_trust"]["project"] == key
    assert j["codex_trust"]["codex_config"] == f"{home}/config.toml"
    assert any("Trust and continue" in s for s in j["codex_trust"]["steps"])
    # the default Codex home is ~/.codex; removing and Claude Code print no such steps
    r = run_thrum(["integrate", "codex"], team.path, codex_env(team))
    assert f"add to {team.env['HOME']}/.codex/config.toml:" in r.out
    r = run_thrum(["integrate", "codex", "--remove", "--write", "--json"], team.path,
                  codex_env(team, home))
    assert "codex_trust" not in json.loads(r.out)
    assert "Trust and continue" not in run_thrum(["integrate", "claude"], team.path,
                                                 codex_env(team, home)).out
    assert not home.exists()  # nothing of Codex's own was written


def test_doctor_reports_whether_codex_trusts_the_project(team, tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    conf = home / "config.toml"
    env = codex_env(team, home)
    key = os.path.realpath(team.path)
    # no thrum block in .codex/config.toml: no Codex check at all, even with other tables
    (team.path / ".codex").mkdir()
    (team.path / ".codex" / "config.toml").write_text('[mcp_servers.docs]\ncommand = "d"\n')
    r, checks = codex_checks(team, env)
    assert checks == {} and r.code == 0, r.describe()
    assert integrate(team, "codex", "--write").code == 0
    project = (team.path / ".codex" / "config.toml").read_bytes()

    # no Codex config, another project trusted, a parent directory trusted, untrusted
    for text, why in (
            (None, f"{conf} does not exist"),
            ('[projects."/elsewhere"]\ntrust_level = "trusted"\n',
             f'{conf} has no [projects."{key}"] entry'),
            (f'[projects."{os.path.dirname(key)}"]\ntrust_level = "trusted"\n',
             f'{conf} has no [projects."{key}"] entry'),
            (f'[projects."{key}"]\ntrust_level = "untrusted"\n',
             f"{conf} marks {key} untrusted"),
            (f'[projects."{key}"]\ntrust_level = "Trusted"\n',
             'has trust_level = "Trusted", which Codex does not accept')):
        if text is None:
            conf.unlink(missing_ok=True)
        else:
            conf.write_text(text)
        r, checks = codex_checks(team, env)
        assert r.code == 1 and list(checks) == ["codex: project trusted"], r.describe()
        c = checks["codex: project trusted"]
        assert c["ok"] is False and c["fixed"] is False and why in c["detail"], c
        assert f'run `codex` in {key} and choose "Trust and continue"' in c["detail"]
        assert f'set trust_level = "trusted" under [projects."{key}"] in {conf}' in c["detail"]
        assert "doctor --fix never edits Codex's config" in c["detail"]
    conf.write_text("[projects\n")  # Codex cannot read it either
    r, checks = codex_checks(team, env)
    c = checks["codex: project trusted"]
    assert r.code == 1 and c["ok"] is False and f"cannot read {conf} (" in c["detail"], c
    conf.write_text(f'[projects."{key}"]\ntrust_level = "Trusted"\n')
    human = run_thrum(["doctor"], team.path, env)
    assert f"✗ codex: project trusted: {conf} marks" not in human.out  # (last case: "Trusted")
    assert "✗ codex: project trusted: " in human.out and human.code == 1

    # --fix changes neither Codex's config nor the project's
    conf.write_text(f'# mine\n[projects."{key}"]\ntrust_level = "untrusted"\n')
    before = conf.read_bytes()
    r, checks = codex_checks(team, env, "--fix")
    assert r.code == 1 and checks["codex: project trusted"]["ok"] is False
    assert conf.read_bytes() == before
    assert (team.path / ".codex" / "config.toml").read_bytes() == project

    # trusted, but the hooks not approved yet: one check says which
    trusted = f'[projects."{key}"]\ntrust_level = "trusted"\n'
    conf.write_text(trusted)
    r, checks = codex_checks(team, env)
    assert checks["codex: project trusted"]["ok"] is True
    assert f"trusts {key}" in checks["codex: project trusted"]["detail"]
    hooks = checks["codex: hooks approved"]
    assert r.code == 1 and hooks["ok"] is False
    assert "not approved in %s: SessionStart, Stop, UserPromptSubmit" % conf in hooks["detail"]
    assert '"Trust all and continue"' in hooks["detail"]

    # approved as Codex records it (one disabled in Codex's /hooks, then all enabled)
    cfg = os.path.realpath(team.path / ".codex" / "config.toml")
    state = "".join(f'[hooks.state."{cfg}:{ev}:0:0"]\ntrusted_hash = "sha256:{n}"\n{extra}\n'
                    for n, ev, extra in ((1, "session_start", ""),
                                         (2, "user_prompt_submit", "enabled = true"),
                                         (3, "stop", "enabled = false")))
    conf.write_text(trusted + "\n[hooks.state]\n\n" + state)
    r, checks = codex_checks(team, env)
    assert checks["codex: hooks approved"]["ok"] is False
    assert "disabled in Codex: Stop" in checks["codex: hooks approved"]["detail"]
    conf.write_text(trusted + "\n[hooks.state]\n\n" + state.replace("enabled = false", ""))
    r, checks = codex_checks(team, env)
    assert r.code == 0, r.describe()
    assert all(c["ok"] for c in checks.values()) and len(checks) == 2, checks
    assert "approval of thrum's 3 hooks" in checks["codex: hooks approved"]["detail"]
    # CODEX_HOME unset: ~/.codex/config.toml
    r, checks = codex_checks(team, dict(team.env, THRUM_NAME="bob"))
    assert f"{team.env['HOME']}/.codex/config.toml does not exist" in \
        checks["codex: project trusted"]["detail"]


def test_doctor_codex_trust_in_a_linked_worktree(team, tmp_path):
    """Codex files a linked worktree's trust under its own path or, failing that, the main
    checkout's; it runs the main checkout's hooks there, so no hook check is made."""
    wt = tmp_path / "wt-dave"
    git("worktree", "add", "-q", wt, cwd=team.path, env=team.env)
    team.register("dave", "dev", "ui", cwd=wt)
    env = codex_env(team, tmp_path / "ch", name="dave")
    assert run_thrum(["integrate", "codex", "--write"], wt, env).code == 0
    (tmp_path / "ch").mkdir()
    main, own = os.path.realpath(team.path), os.path.realpath(wt)
    for text, ok in ((f'[projects."{main}"]\ntrust_level = "trusted"\n', True),
                     (f'[projects."{own}"]\ntrust_level = "trusted"\n', True),
                     (f'[projects."{main}"]\ntrust_level = "trusted"\n'
                      f'[projects."{own}"]\ntrust_level = "untrusted"\n', False)):
        (tmp_path / "ch" / "config.toml").write_text(text)
        r, checks = codex_checks(team, env, cwd=wt)
        assert list(checks) == ["codex: project trusted"], r.describe()
        assert checks["codex: project trusted"]["ok"] is ok, (text, checks)


def test_integrate_codex_writes_the_block_docs_show(team, tmp_path):
    """The block is thrum's own text, whatever TOML writer is installed (tomli-w 1.0 and
    1.2 lay out the hook handlers differently), and docs/integrations.md shows it as is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "thrum").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "thrum").chmod(0o755)
    env = dict(team.env, THRUM_NAME="bob", PATH=f"{bin_dir}:{team.env['PATH']}")
    assert run_thrum(["integrate", "codex", "--write"], team.path, env).code == 0
    written = (team.path / ".codex" / "config.toml").read_text()
    doc = (REPO_ROOT / "docs" / "integrations.md").read_text()
    start = doc.index("```toml\n# >>> thrum") + len("```toml\n")
    assert written == doc[start:doc.index("```", start)]


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
