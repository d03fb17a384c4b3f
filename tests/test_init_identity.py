"""init, quickstart, identity resolution, setup, whoami (SPEC §2, §4, §6, §14)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from conftest import (SES_ID_RE, Runner, assert_error, git, log_dir, make_repo, read_log,
                      run_thrum)


def user_state(repo: Path, env) -> dict:
    """Everything about the user's checkout that thrum must leave alone."""
    gitdir = repo / ".git"
    index = gitdir / "index"
    head_rev = git("--no-optional-locks", "rev-parse", "--verify", "-q", "HEAD",
                   cwd=repo, env=env, check=False).strip()
    return {
        "HEAD file": (gitdir / "HEAD").read_text(),
        "HEAD rev": head_rev,
        "branch": git("--no-optional-locks", "symbolic-ref", "-q", "HEAD", cwd=repo, env=env,
                      check=False).strip(),
        "status": git("--no-optional-locks", "status", "--porcelain", "--untracked-files=all",
                      cwd=repo, env=env),
        "index": index.read_bytes() if index.exists() else None,
        "gitignore": (repo / ".gitignore").read_bytes() if (repo / ".gitignore").exists() else None,
    }


# ----------------------------------------------------------------------------- init

def test_init_creates_store_branch_and_worktree(tmp_path, env):
    repo = make_repo(tmp_path / "repo", env=env)
    before = user_state(repo, env)
    r = run_thrum(["init"], repo, env)
    assert r.code == 0, r.describe()

    assert (repo / ".thrum").is_dir()
    exclude = (repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert any(ln.strip() in (".thrum", ".thrum/", "/.thrum", "/.thrum/") for ln in exclude), exclude
    assert not (repo / ".gitignore").exists(), "init must not create or edit .gitignore"

    git("rev-parse", "--verify", "-q", "refs/heads/a-sync", cwd=repo, env=env)
    wt = log_dir(repo)
    assert wt.is_dir()
    listed = git("worktree", "list", "--porcelain", cwd=repo, env=env)
    assert f"worktree {wt.resolve()}" in listed or f"worktree {wt}" in listed, listed
    # the sync worktree is on the orphan branch: it shares no history with main
    base = git("merge-base", "main", "a-sync", cwd=repo, env=env, check=False)
    assert base.strip() == ""

    assert user_state(repo, env) == before


def test_init_and_send_leave_user_checkout_untouched(tmp_path, env):
    repo = make_repo(tmp_path / "repo", env=env)
    # a staged change and an untracked file: both must survive byte-identically
    (repo / "staged.txt").write_text("staged\n")
    git("add", "staged.txt", cwd=repo, env=env)
    (repo / "untracked.txt").write_text("untracked\n")
    before = user_state(repo, env)
    t = Runner(repo, env)
    t.ok("init")
    assert user_state(repo, env) == before
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", name="alice")
    t.ok("quickstart", "--name", "bob", "--role", "reviewer", "--module", "api", name="bob")
    t.ok("send", "hello", "--to", "bob", name="alice")
    t.ok("inbox", name="bob")
    assert user_state(repo, env) == before


def test_init_without_git_identity(tmp_path, env):
    # make_env's HOME sets user.useConfigOnly and no user: git may not guess an identity
    repo = make_repo(tmp_path / "repo", env=env)
    probe = git("-c", "user.useConfigOnly=true", "var", "GIT_COMMITTER_IDENT", cwd=repo, env=env,
                check=False)
    assert probe == "", "test setup: a git identity leaked into the environment"
    t = Runner(repo, env)
    t.ok("init")
    git("rev-parse", "--verify", "-q", "refs/heads/a-sync", cwd=repo, env=env)
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", name="alice")
    t.ok("send", "hi", "--to", "alice", "--json", name="alice")


def test_init_with_failing_hooks(tmp_path, env):
    repo = make_repo(tmp_path / "repo", env=env)
    marker = tmp_path / "hooks-ran"
    for hook in ("pre-commit", "post-checkout", "commit-msg", "prepare-commit-msg",
                 "post-commit", "reference-transaction"):
        p = repo / ".git" / "hooks" / hook
        p.write_text(f"#!/bin/sh\necho {hook} >> '{marker}'\necho '{hook} says no' >&2\nexit 1\n")
        p.chmod(0o755)
    before = user_state(repo, env)
    t = Runner(repo, env)
    r = t("init")
    assert r.code == 0, r.describe()
    git("rev-parse", "--verify", "-q", "refs/heads/a-sync", cwd=repo, env=env)
    assert log_dir(repo).is_dir()
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", name="alice")
    t.ok("send", "hi", "--to", "alice", name="alice")
    assert user_state(repo, env) == before


def test_init_is_idempotent(cli_team):
    team = cli_team  # set up through the CLI: init and quickstart as a user runs them
    t = team.t
    t.ok("init")
    r = t("init")
    assert r.code == 0, r.describe()
    exclude = (team.path / ".git" / "info" / "exclude").read_text().splitlines()
    assert sum(ln.strip().strip("/") == ".thrum" for ln in exclude) == 1, exclude
    # identities and messages survive
    assert t.json("whoami", name="alice")["agent_id"] == "alice"
    t.ok("send", "still here", "--to", "bob", name="alice")
    assert team.inbox("bob")["total"] == 1


def test_init_outside_git_keeps_log_in_thrum_log(tmp_path, env):
    d = tmp_path / "plain"
    d.mkdir()
    t = Runner(d, env)
    t.ok("init")
    assert (d / ".thrum" / "log").is_dir()
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", name="alice")
    t.ok("quickstart", "--name", "bob", "--role", "reviewer", "--module", "api", name="bob")
    sent = t.json("send", "offline hello", "--to", "bob", name="alice")
    inbox = t.json("inbox", name="bob")
    assert [m["message_id"] for m in inbox["messages"]] == [sent["message_id"]]
    log = d / ".thrum" / "log"
    events = read_log(log / "messages" / "alice.jsonl")
    assert [e["message_id"] for e in events if e["type"] == "message.create"] == [sent["message_id"]]
    assert read_log(log / "agents" / "alice.jsonl")
    assert not (d / ".git").exists()
    # sync needs git: exit 1 with an explanation
    r = t("sync", "force", name="alice")
    assert_error(r, 1, "git")


def test_repo_without_commits(tmp_path, env):
    repo = make_repo(tmp_path / "repo", commit=False, env=env)
    before = user_state(repo, env)
    assert before["HEAD rev"] == ""
    t = Runner(repo, env)
    t.ok("init")
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", name="alice")
    t.ok("quickstart", "--name", "bob", "--role", "reviewer", "--module", "api", name="bob")
    t.ok("send", "first words", "--to", "bob", name="alice")
    assert t.json("inbox", name="bob")["total"] == 1
    git("rev-parse", "--verify", "-q", "refs/heads/a-sync", cwd=repo, env=env)
    after = user_state(repo, env)
    assert after == before, "HEAD must stay unborn and the checkout untouched"


# ----------------------------------------------------------------------------- quickstart

def test_quickstart_writes_identity_and_register_event(repo, env):
    t = Runner(repo, env)
    r = t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth",
             "--intent", "Fix login", "--display", "Alice A", name="alice")
    ident = repo / ".thrum" / "identities" / "alice.json"
    assert ident.is_file(), r.describe()
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    data = json.loads(ident.read_text())
    for k in ("agent_id", "role", "module", "display", "worktree", "intent", "session_id",
              "created_at", "updated_at"):
        assert k in data, f"identity file lacks {k}: {data}"
    assert data["agent_id"] == "alice" and data["role"] == "implementer"
    assert data["module"] == "auth" and data["display"] == "Alice A"
    assert data["intent"] == "Fix login"
    assert SES_ID_RE.match(data["session_id"])
    assert Path(data["worktree"]).resolve() == repo.resolve()

    events = read_log(log_dir(repo) / "agents" / "alice.jsonl")
    reg = [e for e in events if e["type"] == "agent.register"]
    assert len(reg) == 1
    assert reg[0]["agent_id"] == "alice" and reg[0]["role"] == "implementer"
    assert reg[0]["module"] == "auth"
    assert Path(reg[0]["worktree"]).resolve() == repo.resolve()
    assert "hostname" in reg[0]
    starts = [e for e in events if e["type"] == "agent.session.start"]
    assert starts and starts[-1]["session_id"] == data["session_id"]


@pytest.mark.parametrize("bad", ["Alice", "a.b", "-x", "a b", "x" * 65, "",
                                 "system", "everyone", "daemon", "thrum", "all", "broadcast"])
def test_quickstart_invalid_or_reserved_name(repo, env, bad):
    t = Runner(repo, env)
    r = t("quickstart", "--name", bad, "--role", "implementer", "--module", "auth")
    assert_error(r, 2)
    assert list((repo / ".thrum").rglob("identities/*.json")) == []
    assert list(log_dir(repo).rglob("agents/*.jsonl")) == []


def test_quickstart_name_and_role_conflicts(team):
    t = team.t
    # one refusal per step; each stores nothing
    agents_before = sorted(p.name for p in (team.log / "agents").glob("*.jsonl"))
    assert_error(t("quickstart", "--name", "dave", "--role", "dave", "--module", "m"), 2)
    assert_error(t("quickstart", "--name", "implementer", "--role", "tester", "--module", "m"), 2)
    assert_error(t("quickstart", "--name", "reviewer", "--role", "tester", "--module", "m"), 2)
    assert_error(t("quickstart", "--name", "dave", "--role", "alice", "--module", "m"), 2)
    assert sorted(p.name for p in (team.log / "agents").glob("*.jsonl")) == agents_before
    assert not (team.path / ".thrum" / "identities" / "dave.json").exists()
    # and the repaired command works
    t.ok("quickstart", "--name", "dave", "--role", "tester", "--module", "m")


def test_quickstart_reregister_same_worktree_is_idempotent(cli_team):
    team = cli_team  # set up through the CLI: init and quickstart as a user runs them
    t = team.t
    first = t.json("whoami", name="alice")
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", name="alice")
    again = t.json("whoami", name="alice")
    assert again["agent_id"] == "alice" and again["role"] == "implementer"
    assert again["worktree"] == first["worktree"]
    members = t.json("team", "--all", name="bob")["members"]
    assert [m["agent_id"] for m in members].count("alice") == 1


def test_quickstart_name_taken_from_other_worktree(cli_team, tmp_path):
    team = cli_team  # set up through the CLI: init and quickstart as a user runs them
    t = team.t
    wt = tmp_path / "wt"
    git("worktree", "add", "-q", "-b", "feat/x", str(wt), cwd=team.path, env=team.env)
    r = t("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth",
          name="alice", cwd=wt)
    assert_error(r, 5, "alice")
    assert not (wt / ".thrum" / "identities" / "alice.json").exists()
    # --force takes it over
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth", "--force",
         name="alice", cwd=wt)
    me = t.json("whoami", name="alice", cwd=wt)
    assert Path(me["worktree"]).resolve() == wt.resolve()
    # now the main checkout is the "other" worktree
    r = t("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth",
          name="alice")
    assert_error(r, 5, "alice")


def test_quickstart_name_precedence(repo, env):
    t = Runner(repo, env)
    # --name beats positional beats THRUM_NAME
    t.ok("quickstart", "pos1", "--name", "n1", "--role", "worker", "--module", "m", name="env1")
    ids = repo / ".thrum" / "identities"
    assert (ids / "n1.json").exists()
    assert not (ids / "pos1.json").exists() and not (ids / "env1.json").exists()
    t.ok("quickstart", "pos2", "--role", "worker", "--module", "m", name="env2")
    assert (ids / "pos2.json").exists() and not (ids / "env2.json").exists()
    t.ok("quickstart", "--role", "worker", "--module", "m", name="env3")
    assert (ids / "env3.json").exists()
    assert sorted(p.stem for p in ids.glob("*.json")) == ["env3", "n1", "pos2"]


def test_quickstart_role_module_from_env(repo, env):
    t = Runner(repo, env)
    t.ok("quickstart", "--name", "zed", extra_env={"THRUM_ROLE": "tester", "THRUM_MODULE": "core"})
    me = t.json("whoami", name="zed")
    assert (me["role"], me["module"]) == ("tester", "core")


def test_quickstart_missing_role_or_module(repo, env):
    t = Runner(repo, env)
    assert_error(t("quickstart", "--name", "zed", "--module", "core"), 2, "role")
    assert_error(t("quickstart", "--name", "zed", "--role", "tester"), 2, "module")
    assert_error(t("quickstart", "--role", "tester", "--module", "core"), 2)  # no name at all
    assert not (repo / ".thrum" / "identities" / "zed.json").exists()


def test_quickstart_initialises_when_needed(tmp_path, env):
    repo = make_repo(tmp_path / "repo", env=env)
    t = Runner(repo, env)
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth")
    git("rev-parse", "--verify", "-q", "refs/heads/a-sync", cwd=repo, env=env)
    assert t.json("whoami")["agent_id"] == "alice"


# ----------------------------------------------------------------------------- identity

def test_single_identity_is_used(repo, env):
    t = Runner(repo, env)
    t.ok("quickstart", "--name", "alice", "--role", "implementer", "--module", "auth")
    assert t.json("whoami")["agent_id"] == "alice"


def test_two_identities_without_thrum_name_is_ambiguous(cli_team):
    team = cli_team  # set up through the CLI: init and quickstart as a user runs them
    t = team.t
    r = t("whoami")
    assert_error(r, 3, "alice", "bob", "carol", "THRUM_NAME")
    r = t("send", "hi", "--to", "bob")
    assert_error(r, 3, "alice", "bob")
    assert not (team.log / "messages").exists() or not list((team.log / "messages").glob("*.jsonl"))


def test_thrum_name_missing_identity_lists_choices(team):
    r = team.t("whoami", name="ghost")
    assert_error(r, 3, "ghost", "alice", "bob", "carol")


def test_thrum_name_invalid(team):
    assert_error(team.t("whoami", name="Not.Valid"), 2)
    assert_error(team.t("inbox", name="system"), 2)


def test_commands_before_init_exit_3(tmp_path, env):
    repo = make_repo(tmp_path / "repo", env=env)
    t = Runner(repo, env)
    for args in (["whoami"], ["inbox"], ["sent"], ["send", "hi", "--to", "bob"],
                 ["send", "hi", "--to", "nobody", "--format", "html"],  # set-up checked first
                 ["team"], ["message", "get", "msg_0123456789"], ["wait", "--timeout", "0"]):
        r = t(*args, name="alice")
        assert_error(r, 3)
    assert not (repo / ".thrum").exists() or not list((repo / ".thrum").rglob("*.json"))


def test_commands_before_quickstart_exit_3(repo, env):
    t = Runner(repo, env)
    for args in (["whoami"], ["inbox"], ["send", "hi", "--to", "bob"]):
        assert_error(t(*args), 3)


def test_linked_worktree_shares_store_with_own_identities(team, tmp_path):
    t = team.t
    wt = tmp_path / "wt"
    git("worktree", "add", "-q", "-b", "feat/wt", str(wt), cwd=team.path, env=team.env)
    # no identity in the new worktree: THRUM_NAME may name one of the store's (helper processes)
    assert t.json("whoami", name="alice", cwd=wt)["agent_id"] == "alice"
    t.ok("quickstart", "--name", "dave", "--role", "tester", "--module", "wt", cwd=wt)
    assert (wt / ".thrum" / "identities" / "dave.json").exists()
    assert not (team.path / ".thrum" / "identities" / "dave.json").exists()
    # one store: the event went to the main checkout's log
    assert read_log(team.log / "agents" / "dave.jsonl")
    assert not (wt / ".git").is_dir()
    # the only identity of this worktree is used without THRUM_NAME
    assert t.json("whoami", cwd=wt)["agent_id"] == "dave"
    sent = team.send("alice", "hello dave", "--to", "dave")
    assert sent["recipients"] == ["dave"]
    inbox = t.json("inbox", cwd=wt)
    assert [m["message_id"] for m in inbox["messages"]] == [sent["message_id"]]
    # now that this worktree has its own identity, another worktree's is refused
    assert_error(t("whoami", name="alice", cwd=wt), 3, "dave")
    # dave replies from the linked worktree; alice sees it in the main checkout
    t.ok("reply", sent["message_id"], "hi alice", cwd=wt)
    assert team.inbox("alice")["total"] == 1


def test_setup_writes_redirect(team, tmp_path):
    wt = tmp_path / "wt2"
    git("worktree", "add", "-q", "-b", "feat/two", str(wt), cwd=team.path, env=team.env)
    team.t.ok("setup", cwd=wt)
    redirect = wt / ".thrum" / "redirect"
    assert redirect.is_file()
    target = Path(redirect.read_text().strip())
    assert target.is_absolute()
    assert target.resolve() == (team.path / ".thrum").resolve()
    # the redirected worktree works against the shared store
    team.t.ok("quickstart", "--name", "erin", "--role", "tester", "--module", "x", cwd=wt)
    assert team.send("erin", "from wt2", "--to", "alice", cwd=wt)["recipients"] == ["alice"]
    # --main-repo form
    wt3 = tmp_path / "wt3"
    git("worktree", "add", "-q", "-b", "feat/three", str(wt3), cwd=team.path, env=team.env)
    team.t.ok("setup", "--main-repo", str(team.path), cwd=wt3)
    assert Path((wt3 / ".thrum" / "redirect").read_text().strip()).resolve() == \
        (team.path / ".thrum").resolve()


def test_whoami_fields(cli_team):
    team = cli_team  # set up through the CLI: init and quickstart as a user runs them
    me = team.t.json("whoami", name="alice")
    for k in ("agent_id", "role", "module", "display", "worktree", "intent", "session_id",
              "identity_file"):
        assert k in me, f"whoami lacks {k}: {me}"
    assert (me["agent_id"], me["role"], me["module"]) == ("alice", "implementer", "auth")
    assert SES_ID_RE.match(me["session_id"])
    assert Path(me["identity_file"]).resolve() == \
        (team.path / ".thrum" / "identities" / "alice.json").resolve()
    assert Path(me["worktree"]).resolve() == team.path.resolve()
    r = team.t.ok("whoami", "--field", "role", name="alice")
    assert r.out == "implementer\n"
    r = team.t.ok("whoami", "--field", "agent_id", name="bob")
    assert r.out == "bob\n"


def test_global_flags_anywhere_and_repo_flag(team, tmp_path):
    t = team.t
    a = t.ok("--json", "whoami", name="alice").json
    b = t.ok("whoami", "--json", name="alice").json
    assert a == b
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    c = t.ok("--repo", str(team.path), "whoami", "--json", name="alice", cwd=elsewhere).json
    assert c["agent_id"] == "alice"
    d = t.ok("whoami", "--repo", str(team.path), "--json", name="alice", cwd=elsewhere).json
    assert d == c


def test_version_flag(team):
    r = team.t.ok("--version")
    assert any(ch.isdigit() for ch in r.out)
