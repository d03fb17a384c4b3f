"""Each operation's facts are declared once (`@operation` on its Service method, with its
parameters' defaults in its signature) and everything else derives from them: the CLI
parser, the MCP tool schemas, the daemon client's retry rule. These tests prove the front
ends and the declarations agree, in process (nothing here is about a subprocess)."""

import io
import sys

import pytest

from conftest import REPO_ROOT, make_env, make_repo

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
import thrum  # noqa: E402


class Recorded(Exception):
    """The first operation a CLI handler ran: (op, params)."""


class RecordingCli(thrum.Cli):
    """A Cli that records the operation a handler asks for instead of running it."""

    def run(self, op, params, cancel=None):
        raise Recorded(op, dict(params))

    def check(self, op, **params):
        pass


def normalise(name, value):
    if name == "timeout":
        return thrum.parse_timeout(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


#: argv -> (operation, params given on the command line, params the handler sets on
#: purpose: the CLI's inbox marks rows read only after printing them).
CLI_CASES = [
    (["init"], "init", {}, {}),
    (["quickstart", "--name", "x", "--role", "r", "--module", "m"], "quickstart",
     {"name": "x", "role": "r", "module": "m"}, {}),
    (["whoami"], "whoami", {}, {}),
    (["status"], "status", {}, {}),
    (["overview"], "overview", {}, {}),
    (["prime"], "prime", {}, {}),
    (["team"], "team", {}, {}),
    (["send", "hi", "--to", "bob"], "send", {"content": "hi", "to": ["bob"]}, {}),
    (["reply", "msg_01ABCDEFGH", "ok"], "reply",
     {"message_id": "msg_01ABCDEFGH", "content": "ok"}, {}),
    (["inbox"], "inbox", {}, {"defer_marks": True}),
    (["sent"], "sent", {}, {}),
    (["search", "auth"], "search", {"query": "auth"}, {}),
    (["message", "get", "msg_01ABCDEFGH"], "message_get", {"message_id": "msg_01ABCDEFGH"},
     {}),
    (["message", "edit", "msg_01ABCDEFGH", "new"], "message_edit",
     {"message_id": "msg_01ABCDEFGH", "content": "new"}, {}),
    (["message", "delete", "msg_01ABCDEFGH"], "message_delete",
     {"message_id": "msg_01ABCDEFGH"}, {}),
    (["message", "read", "--all"], "message_read", {"all": True}, {}),
    (["wait"], "wait", {}, {}),
    (["watch"], "watch", {}, {}),
    (["who-has", "src/a.py"], "who_has", {"path": "src/a.py"}, {}),
    (["ping", "bob"], "ping", {"name": "bob"}, {}),
    (["agent", "register", "--name", "x", "--role", "r", "--module", "m"], "agent_register",
     {"name": "x", "role": "r", "module": "m"}, {}),
    (["agent", "list"], "agent_list", {}, {}),
    (["agent", "delete", "bob"], "agent_delete", {"name": "bob"}, {}),
    (["agent", "cleanup"], "agent_cleanup", {}, {}),
    (["session", "start"], "session_start", {}, {}),
    (["session", "end"], "session_end", {}, {}),
    (["session", "list"], "session_list", {}, {}),
    (["session", "heartbeat"], "session_heartbeat", {}, {}),
    (["session", "set-intent", "x"], "session_set_intent", {"text": "x"}, {}),
    (["session", "set-task", "x"], "session_set_task", {"text": "x"}, {}),
    (["context", "show"], "context_show", {}, {}),
    (["context", "clear"], "context_clear", {}, {}),
    (["context", "sync"], "context_sync", {}, {}),
    (["group", "create", "g"], "group_create", {"name": "g"}, {}),
    (["group", "delete", "g"], "group_delete", {"name": "g"}, {}),
    (["group", "add", "g", "@bob"], "group_add", {"name": "g", "members": ["@bob"]}, {}),
    (["group", "remove", "g", "@bob"], "group_remove", {"name": "g", "members": ["@bob"]},
     {}),
    (["group", "list"], "group_list", {}, {}),
    (["group", "info", "g"], "group_info", {"name": "g"}, {}),
    (["config", "show"], "config_show", {}, {}),
    (["config", "get", "sync.interval"], "config_get", {"key": "sync.interval"}, {}),
    (["config", "set", "sync.interval", "30s"], "config_set",
     {"key": "sync.interval", "value": "30s"}, {}),
    (["sync", "force"], "sync_force", {}, {}),
    (["sync", "status"], "sync_status", {}, {}),
    (["doctor"], "doctor", {}, {}),
    (["rebuild"], "rebuild_index", {}, {}),
    (["purge", "--before", "30d"], "purge", {"before": "30d"}, {}),
    (["tmux", "kill", "s1"], "tmux_kill", {"session": "s1"}, {}),
]


@pytest.mark.parametrize("argv,op,given,deliberate", CLI_CASES,
                         ids=[" ".join(c[0][:2]) for c in CLI_CASES])
def test_cli_parser_passes_the_declared_defaults(tmp_path, argv, op, given, deliberate):
    cli = RecordingCli(thrum.Caller(tmp_path, make_env(tmp_path / "home")),
                       thrum.Output(stream=io.StringIO()))
    args = thrum.build_parser(argv[0]).parse_args(argv)
    with pytest.raises(Recorded) as got:
        thrum.COMMANDS[argv[0]][2](args, cli, cli.out)
    asked, params = got.value.args
    assert asked == op
    spec = thrum.OPS[op]
    spec.check(params)  # every parameter the CLI passes is one the operation takes
    declared = spec.params()
    for name, value in params.items():
        if name in given:
            assert normalise(name, value) == normalise(name, given[name]), name
        elif name in deliberate:
            assert value == deliberate[name], name
        else:
            assert normalise(name, value) == normalise(name, declared[name]), (
                "%s: the CLI passes %s=%r, the operation declares %r"
                % (" ".join(argv), name, value, declared[name]))


def test_every_cli_command_with_an_operation_is_checked():
    ops_reached = {case[1] for case in CLI_CASES}
    # Operations the CLI reaches another way (tmux create runs from --cwd; hooks and MCP
    # are front ends of their own) or that only other front ends call (feed: the page).
    other = {"setup", "mark_read", "context_save", "tmux_create", "tmux_list", "hook_news",
             "briefing", "feed"}
    assert set(thrum.OPS) - ops_reached == other


#: (tool, param) -> value: where a tool differs from the operation on purpose
#: (check_messages lists unread messages and marks nothing unless asked).
MCP_DELIBERATE = {("check_messages", "unread"): True, ("check_messages", "mark_read"): False}
MCP_REQUIRED = {"to": "bob", "content": "hi", "message_id": "msg_01ABCDEFGH",
                "path": "src/a.py", "query": "auth"}


@pytest.mark.parametrize("tool", sorted(thrum.MCP_TOOLS))
def test_mcp_schemas_pass_the_declared_defaults(tool):
    op, _, schema, adapt, _ = thrum.MCP_TOOLS[tool]
    args = {k: MCP_REQUIRED[k] for k in schema.get("required", ())}
    if tool == "mark_read":
        args["all"] = True
    params = adapt(thrum.mcp_arguments(schema, args))
    spec = thrum.OPS[op]
    spec.check(params)
    declared = spec.params()
    for name, value in params.items():
        if name in args or (tool, name) in MCP_DELIBERATE:
            assert (tool, name) not in MCP_DELIBERATE or value == MCP_DELIBERATE[tool, name]
            continue
        assert normalise(name, value) == normalise(name, declared[name]), (
            "%s passes %s=%r, the operation %s declares %r" % (tool, name, value, op,
                                                                declared[name]))


def test_declared_facts():
    ops = thrum.OPS
    assert {n for n, o in ops.items() if o.blocks} == {"wait", "watch", "feed"}
    assert all(o.local for o in ops.values() if o.needs == thrum.NEEDS_NOTHING)
    assert {n for n, o in ops.items() if o.local and o.needs != thrum.NEEDS_NOTHING} == \
        {"doctor", "rebuild_index", "tmux_list", "tmux_kill"}
    assert ops["briefing"].may_retry({})
    assert not ops["inbox"].may_retry({})
    assert ops["inbox"].may_retry({"defer_marks": True})
    for op in ("send", "reply"):  # safe again only with an idempotency key (SPEC §16)
        assert not ops[op].may_retry({})
        assert ops[op].may_retry({"idempotency_key": "k"})
    assert not ops["config_set"].starts_daemon


def _log_bytes(repo):
    root = repo / ".git" / "thrum-sync" / "a-sync"
    return {p: p.read_bytes() for p in root.rglob("*.jsonl")}


#: A sample request for every operation declared safe to run again.
RETRY_SAMPLES = {
    "whoami": {}, "status": {}, "overview": {}, "prime": {}, "team": {"all": True},
    "inbox": {"defer_marks": True}, "sent": {}, "message_get": {"message_id": "MID"},
    "mark_read": {"message_ids": ["MID"]}, "message_read": {"all": True},
    "wait": {"timeout": 0, "after": "-1h"}, "who_has": {"path": "README"},
    "watch": {"timeout": 0}, "feed": {"timeout": 0},
    "ping": {"name": "alice"}, "agent_list": {}, "session_list": {},
    "context_show": {}, "group_list": {}, "group_info": {"name": "devs"},
    "config_show": {}, "config_get": {"key": "sync.interval"}, "sync_status": {},
    "briefing": {}, "tmux_list": {}, "search": {"query": "hi"},
    "send": {"content": "hi", "to": ["alice"], "idempotency_key": "k1"},
    "reply": {"message_id": "MID", "content": "ok", "idempotency_key": "k2"},
}


def test_operations_declared_retry_safe_change_nothing_when_repeated(tmp_path):
    """What `retry_safe` promises: once an operation ran, running it again writes no
    event (so the CLI may repeat a request the daemon took but never answered)."""
    env = make_env(tmp_path / "home")
    repo = make_repo(tmp_path / "repo", env=env)

    def run(op, params, who="bob"):
        return thrum.call(op, params, thrum.Caller(repo, dict(env, THRUM_NAME=who)))
    thrum.call("init", {}, thrum.Caller(repo, env))
    for name, role in (("alice", "implementer"), ("bob", "reviewer")):
        run("quickstart", {"name": name, "role": role, "module": "m"}, who=name)
    mid = run("send", {"content": "hi", "to": ["bob"]}, who="alice")["message_id"]
    run("group_create", {"name": "devs"}, who="alice")
    safe = {n for n, o in thrum.OPS.items() if o.may_retry(RETRY_SAMPLES.get(n, {}))}
    assert safe == set(RETRY_SAMPLES)
    for op, params in RETRY_SAMPLES.items():
        params = {k: (mid if v == "MID" else v) for k, v in params.items()}
        if op == "tmux_list" and thrum._which("tmux", env) is None:
            continue
        run(op, params)
        before = _log_bytes(repo)
        run(op, params)
        assert _log_bytes(repo) == before, "%s wrote events when repeated" % op
