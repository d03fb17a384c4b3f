"""The in-process service layer: Store, Caller, call(), error_payload (SPEC §4, §14).

The long-lived front ends (daemon, MCP server) hold one `Store` for hours and serve many
callers from many threads through `call()`. These tests import thrum.py as a module and
drive that API directly, next to the real CLI (whose answers are the reference for the
in-process ones).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from conftest import git, make_team, run_thrum
from conftest import thrum as _thrum

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


@pytest.fixture(scope="session")
def thrum():
    """thrum.py as a module: the one copy conftest imported."""
    return _thrum


def open_store(thrum, cwd, env):
    return thrum.Store(thrum.locate(str(cwd)), env)


def caller(thrum, cwd, env, name=None, agent=None):
    e = dict(env)
    if name is not None:
        e["THRUM_NAME"] = name
    return thrum.Caller(cwd=str(cwd), env=e, agent=agent)


def run_threads(targets, timeout=60):
    """Run callables in threads at once (released together); re-raise the first failure."""
    errors = []
    start = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            try:
                start.wait(timeout)
                fn()
            except BaseException as e:  # noqa: B902 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    alive = [th for th in threads if th.is_alive()]
    assert not alive, f"{len(alive)} thread(s) did not finish within {timeout}s"
    if errors:
        raise errors[0]


def add_worktree(team, path, branch):
    git("worktree", "add", "-q", "-b", branch, str(path), cwd=team.path, env=team.env)
    return path


# --------------------------------------------------------------------------- 1. identities

def test_two_callers_many_threads_right_authors_and_recipients(tmp_path, thrum):
    team = make_team(tmp_path)
    store = open_store(thrum, team.path, team.env)
    callers = {n: caller(thrum, team.path, team.env, name=n) for n in ("alice", "bob")}
    other = {"alice": "bob", "bob": "alice"}
    per_thread, n_threads = 25, 8
    sent = {"alice": [], "bob": []}
    lock = threading.Lock()

    def sender(who, k):
        def run():
            mine = []
            try:
                for i in range(per_thread):
                    r = thrum.call("send", {"content": f"{who} t{k} #{i}",
                                            "to": [other[who]]}, callers[who], store)
                    assert r["recipients"] == [other[who]], r
                    mine.append(r["message_id"])
            finally:
                with lock:
                    sent[who].extend(mine)
                store.close()
        return run

    run_threads([sender("alice" if k % 2 == 0 else "bob", k) for k in range(n_threads)])
    expected = per_thread * n_threads // 2
    for who in ("alice", "bob"):
        assert len(sent[who]) == expected
        assert len(set(sent[who])) == expected, f"{who}: duplicate message ids"

    for who in ("alice", "bob"):
        peer = other[who]
        doc = thrum.call("inbox", {"limit": 1000, "mark_read": False}, callers[who], store)
        msgs = doc["messages"]
        assert doc["agent_id"] == who
        assert doc["total"] == expected == len(msgs)
        ids = [m["message_id"] for m in msgs]
        assert len(set(ids)) == len(ids), "duplicate messages in the inbox"
        assert set(ids) == set(sent[peer])
        for m in msgs:
            assert m["agent_id"] == peer, m
            assert m["recipients"] == [who], m
            assert m["body"]["content"].startswith(peer + " t"), m
        # the sender's own messages are not in its inbox
        assert not set(ids) & set(sent[who])
        # `sent` agrees
        out = thrum.call("sent", {"limit": 1000}, callers[who], store)
        assert {m["message_id"] for m in out["messages"]} == set(sent[who])
        # the CLI agrees
        cli = run_thrum(["inbox", "--json", "--limit", "1000"], team.path, team.env, name=who)
        assert cli.code == 0, cli.describe()
        cdoc = cli.json
        assert cdoc["total"] == expected
        assert {m["message_id"] for m in cdoc["messages"]} == set(sent[peer])
        assert {(m["agent_id"], tuple(m["recipients"])) for m in cdoc["messages"]} == \
            {(peer, (who,))}


# --------------------------------------------------------------------------- 2. ids

def test_ids_from_many_threads_are_unique_valid_and_monotonic(thrum):
    n_threads, per_thread = 8, 10_000
    results = [None] * n_threads

    def minter(k):
        def run():
            results[k] = [thrum.new_id("msg_") for _ in range(per_thread)]
        return run

    run_threads([minter(k) for k in range(n_threads)])
    every = [i for ids in results for i in ids]
    assert len(every) == n_threads * per_thread
    assert len(set(every)) == len(every), "duplicate ids across threads"
    for ids in results:
        for i in ids:
            assert i.startswith("msg_") and ULID_RE.match(i[4:]), i
            assert thrum.is_ulid(i[4:]), i
        bodies = [i[4:] for i in ids]
        assert all(a < b for a, b in zip(bodies, bodies[1:])), \
            "ids of one thread are not strictly increasing"


# --------------------------------------------------------------------------- 3. plain data

def test_results_are_json_plain_data(tmp_path, thrum):
    team = make_team(tmp_path)
    (team.path / "src").mkdir()
    (team.path / "src" / "auth.py").write_text("x = 1\n")
    store = open_store(thrum, team.path, team.env)
    alice = caller(thrum, team.path, team.env, name="alice")
    bob = caller(thrum, team.path, team.env, name="bob")
    first = thrum.call("send", {"content": "hello **bob**", "to": ["bob"],
                                "scopes": ["module:auth"], "refs": ["issue:7"],
                                "structured": {"k": [1, 2.5, None, True, "é"]}}, alice, store)
    thrum.call("group_create", {"name": "reviewers", "description": "all reviewers"},
               alice, store)
    thrum.call("group_add", {"name": "reviewers", "members": ["bob", "carol"]}, alice, store)
    ops = [
        ("send", {"content": "plain", "to": "bob,carol", "mentions": ["carol"]}, alice),
        ("reply", {"message_id": first["message_id"], "content": "thanks"}, bob),
        ("whoami", {}, alice),
        ("status", {}, alice),
        ("team", {}, alice),
        ("team", {"all": True}, alice),
        ("inbox", {}, bob),
        ("inbox", {"all": True, "limit": 50}, bob),
        ("sent", {}, alice),
        ("message_get", {"message_id": first["message_id"]}, bob),
        ("who_has", {"path": "src/auth.py"}, alice),
        ("sync_status", {}, alice),
        ("group_list", {}, alice),
        ("group_info", {"name": "reviewers"}, alice),
        ("config_show", {}, alice),
        ("prime", {}, alice),
        ("overview", {}, alice),
        ("agent_list", {}, alice),
        ("session_list", {}, alice),
        ("mark_read", {"message_ids": [first["message_id"]]}, bob),
    ]
    for op, params, who in ops:
        result = thrum.call(op, params, who, store)
        try:
            text = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as e:
            pytest.fail(f"{op} returned data that is not plain JSON ({e}): {result!r}")
        assert json.loads(text) == result, f"{op} does not round-trip through JSON"
        if op != "mark_read":  # mark_read answers a bare count
            assert isinstance(result, dict), f"{op} returned {type(result).__name__}"


# --------------------------------------------------------------------------- 4. refresh

def test_held_store_sees_another_process_send(tmp_path, thrum):
    team = make_team(tmp_path)
    store = open_store(thrum, team.path, team.env)
    bob = caller(thrum, team.path, team.env, name="bob")
    assert thrum.call("inbox", {}, bob, store)["total"] == 0

    first = team.send("alice", "from another process", "--to", "bob")
    doc = thrum.call("inbox", {"mark_read": False}, bob, store)
    assert [m["message_id"] for m in doc["messages"]] == [first["message_id"]]
    assert doc["messages"][0]["agent_id"] == "alice"

    # a thread that did not create the store (and has no connection of its own yet)
    second = team.send("alice", "and another", "--to", "bob")
    seen = {}

    def other_thread():
        try:
            seen["doc"] = thrum.call("inbox", {"mark_read": False}, bob, store)
        finally:
            store.close()

    run_threads([other_thread])
    assert [m["message_id"] for m in seen["doc"]["messages"]] == \
        [second["message_id"], first["message_id"]]

    # and the creating thread sees a third one, sent after the other thread's read
    third = team.send("alice", "third", "--to", "bob")
    doc = thrum.call("inbox", {"unread": True}, bob, store)
    assert [m["message_id"] for m in doc["messages"]][0] == third["message_id"]
    assert doc["total"] == 3


# --------------------------------------------------------------------------- 5. THRUM_NAME

def _cli_whoami(team, cwd, name):
    return run_thrum(["whoami", "--json"], cwd, team.env, name=name)


def _call_payload(thrum, op, params, who, store):
    try:
        return thrum.call(op, params, who, store), None
    except thrum.ThrumError as e:
        return None, thrum.error_payload(e)


def test_thrum_name_of_other_worktree_refused_where_identities_exist(tmp_path, thrum):
    team = make_team(tmp_path)
    wt = add_worktree(team, tmp_path / "wt-dave", "feat/dave")
    team.register("dave", "tester", "wt", cwd=wt)
    store = open_store(thrum, team.path, team.env)

    cli = _cli_whoami(team, team.path, "dave")
    assert cli.code == 3, cli.describe()
    result, err = _call_payload(thrum, "whoami", {},
                                caller(thrum, team.path, team.env, name="dave"), store)
    assert result is None, f"in-process whoami answered {result} where the CLI failed"
    assert err["exit_code"] == 3 == cli.json["error"]["exit_code"]
    assert err["message"] == cli.json["error"]["message"]
    assert err["hint"] == cli.json["error"].get("hint")
    assert "alice" in (err["hint"] or "")
    # the same through an explicit agent (Caller.agent, the MCP tools' `agent`): the CLI
    # has no --agent for whoami, so only the outcome is compared
    _, err2 = _call_payload(thrum, "whoami", {},
                            caller(thrum, team.path, team.env, agent="dave"), store)
    assert err2 is not None and err2["exit_code"] == 3, err2
    assert "dave" in err2["message"] and "alice" in (err2["hint"] or "")

    # dave in his own worktree, through the same store
    mine = thrum.call("whoami", {}, caller(thrum, wt, team.env), store)
    assert mine["agent_id"] == "dave"
    assert Path(mine["worktree"]).resolve() == wt.resolve()


@pytest.mark.parametrize("with_setup", [False, True], ids=["plain", "setup"])
def test_thrum_name_of_other_worktree_allowed_where_none_exist(tmp_path, thrum, with_setup):
    team = make_team(tmp_path)
    wt = add_worktree(team, tmp_path / "wt-dave", "feat/dave")
    team.register("dave", "tester", "wt", cwd=wt)
    helper = add_worktree(team, tmp_path / "wt-helper", "feat/helper")
    if with_setup:
        team.t.ok("setup", cwd=helper)
        assert (helper / ".thrum" / "redirect").is_file()
    store = open_store(thrum, team.path, team.env)

    cli = _cli_whoami(team, helper, "dave")
    assert cli.code == 0, cli.describe()
    doc = thrum.call("whoami", {}, caller(thrum, helper, team.env, name="dave"), store)
    assert doc["agent_id"] == cli.json["agent_id"] == "dave"
    for k in ("role", "module", "worktree", "identity_file", "session_id"):
        assert doc[k] == cli.json[k], (k, doc, cli.json)
    assert Path(doc["worktree"]).resolve() == wt.resolve()

    # a name nobody registered: the same exit 3 both ways
    cli = _cli_whoami(team, helper, "zed")
    _, err = _call_payload(thrum, "whoami", {},
                           caller(thrum, helper, team.env, name="zed"), store)
    assert err["exit_code"] == cli.code == 3, cli.describe()
    assert err["message"] == cli.json["error"]["message"]

    # the helper can act as dave: its message is authored by dave
    sent = thrum.call("send", {"content": "from the helper", "to": ["alice"]},
                      caller(thrum, helper, team.env, name="dave"), store)
    got = team.get("alice", sent["message_id"])
    assert got["agent_id"] == "dave"


# --------------------------------------------------------------------------- 6. worktrees

def test_one_store_two_worktrees_two_threads(tmp_path, thrum):
    team = make_team(tmp_path, members=(("alice", "implementer", "auth"),
                                        ("bob", "reviewer", "api")))
    wt = add_worktree(team, tmp_path / "wt-carol", "feat/carol")
    team.register("carol", "tester", "db", cwd=wt)
    store = open_store(thrum, team.path, team.env)
    # no THRUM_NAME for carol: the only identity of her worktree
    callers = {"alice": caller(thrum, team.path, team.env, name="alice"),
               "carol": caller(thrum, wt, team.env)}
    sent = {"alice": [], "carol": []}
    n = 20

    def sender(who):
        def run():
            try:
                for i in range(n):
                    r = thrum.call("send", {"content": f"{who} #{i}", "to": ["bob"]},
                                   callers[who], store)
                    sent[who].append(r["message_id"])
                    me = thrum.call("whoami", {}, callers[who], store)
                    assert me["agent_id"] == who, me
            finally:
                store.close()
        return run

    run_threads([sender("alice"), sender("carol")])
    bob = caller(thrum, team.path, team.env, name="bob")
    doc = thrum.call("inbox", {"limit": 1000}, bob, store)
    assert doc["total"] == 2 * n
    authors = {m["message_id"]: m["agent_id"] for m in doc["messages"]}
    for who in ("alice", "carol"):
        assert len(sent[who]) == n
        assert all(authors[mid] == who for mid in sent[who])
    cli = team.inbox("bob", "--limit", "1000")
    assert {m["message_id"]: m["agent_id"] for m in cli["messages"]} == authors


# --------------------------------------------------------------------------- 7. errors

def test_unknown_op_and_parameter_are_usage_errors(tmp_path, thrum):
    team = make_team(tmp_path, members=(("alice", "implementer", "auth"),))
    store = open_store(thrum, team.path, team.env)
    alice = caller(thrum, team.path, team.env, name="alice")

    with pytest.raises(thrum.UsageError) as ei:
        thrum.call("no_such_op", {}, alice, store)
    assert ei.value.exit_code == 2
    for op in (None, 7, ["send"]):
        with pytest.raises(thrum.UsageError):
            thrum.call(op, {}, alice, store)

    for op, params in (("inbox", {"bogus": 1}), ("send", {"content": "x", "to": ["alice"],
                                                          "no_such_param": True}),
                       ("whoami", {"x": 1}), ("send", {"_reply": None}),
                       ("message_get", {})):
        try:
            thrum.call(op, params, alice, store)
        except thrum.ThrumError as e:
            assert e.exit_code == 2, (op, params, e.message)
        except TypeError as e:  # pragma: no cover - the bug this guards against
            pytest.fail(f"{op}({params}) raised TypeError: {e}")
        else:
            pytest.fail(f"{op}({params}) was accepted")
    # nothing was stored by the refused send
    assert thrum.call("sent", {}, alice, store)["total"] == 0


def test_error_payload_shape(thrum):
    p = thrum.error_payload(thrum.NotSetUpError("not here", hint="run init"))
    assert p == {"message": "not here", "exit_code": 3, "hint": "run init"}
    p = thrum.error_payload(thrum.UsageError("bad"))
    assert p["exit_code"] == 2 and p["message"] == "bad" and set(p) == {
        "message", "exit_code", "hint"}
    p = thrum.error_payload(ValueError("boom"))
    assert set(p) == {"message", "exit_code", "hint"}
    assert p["exit_code"] == 1
    assert p["message"].startswith("internal error")
    assert "ValueError" in p["message"] and "boom" in p["message"]
    json.dumps(p, allow_nan=False)


# --------------------------------------------------------------------------- regressions

def test_request_in_flight_survives_config_change_seen_by_another_thread(tmp_path, thrum):
    team = make_team(tmp_path)
    store = open_store(thrum, team.path, team.env)
    bob = caller(thrum, team.path, team.env, name="bob")
    svc = thrum.Service(store, bob)  # one request, in this thread
    svc.me()                         # it has refreshed the store and opened the index
    r = run_thrum(["config", "set", "sync.timeout", "45s"], team.path, team.env)
    assert r.code == 0, r.describe()
    # another thread's request sees the changed config file and refreshes the store
    run_threads([lambda: thrum.call("whoami", {}, bob, store)])
    # the first request goes on
    assert svc.inbox()["total"] == 0


def test_call_refuses_malformed_params(tmp_path, thrum):
    team = make_team(tmp_path)
    store = open_store(thrum, team.path, team.env)
    bob = caller(thrum, team.path, team.env, name="bob")
    for params in (["x"], "abc", 5, {1: 2, "x": 3}, {"all": "yes"}, {"unread": 1}):
        with pytest.raises(thrum.UsageError):
            thrum.call("inbox", params, bob, store)
    alice = caller(thrum, team.path, team.env, name="alice")
    mid = thrum.call("send", {"content": "one", "to": "bob"}, alice, store)["message_id"]
    assert thrum.call("mark_read", {"message_ids": mid}, bob, store) == 1
