"""docs/cli.md shows real output: its command examples run here, and the first line each
one prints must be the first line the doc shows under it.

An example is a line `$ COMMAND` inside a fenced block of docs/cli.md; the line under it
is the first line of its output (none when the next line is blank, another `$ ` line or
the end of the block). `EXAMPLES` below lists every example in document order with what it
needs: where it runs (a scratch repository, a linked worktree, a second clone), as which
agent (`THRUM_NAME`, when the worktree holds several identities), the set-up that puts
the store in the state the doc describes (run just before it), and, for a few, something
that happens while the command runs (a held index lock, a message a blocked `wait` is
woken by). They run in order in one scratch world, so earlier examples build the state
later ones use, as they did when the doc was written.

Before comparing, both lines are normalised: ids (`msg_...`, `thr_...`, `ses_...`,
`evt_...`, `grp_...`, full or abbreviated), relative and absolute times, pids, absolute
paths and the version hash are replaced by placeholders, and a line the doc shows cut at
80 columns (`…`) matches a real line that continues it. The doc's ids in a command are
replaced by the real ids of the examples (or set-up steps) that produced them.

`NOT_RUN` is the reviewed allow-list of examples that do not run here, each with its
reason (empty today: all of them run); `test_every_example_is_run_or_allowed` keeps the two
lists and the doc in step, so a new example in the doc fails until it is added to one of
them. The tmux examples need tmux: without it they are skipped with a warning.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import pytest

from conftest import (REPO_ROOT, THRUM_CMD, THRUM_PY, Procs, api, git, holds_open, in_sleep,
                      log_dir, make_env, make_repo, wait_until)

CLI_MD = REPO_ROOT / "docs" / "cli.md"
HAVE_TMUX = shutil.which("tmux") is not None


# --------------------------------------------------------------------------- the doc

@dataclass
class DocExample:
    line: int          # line number of the `$ ` line in docs/cli.md
    cmd: str           # the command, without `$ `
    output: list       # the output lines the doc shows under it

    @property
    def first(self) -> str:
        """The first output line the doc shows ("" for none: the line under the command
        is blank, another command or the end of the block)."""
        return self.output[0] if self.output else ""


def doc_examples(text: str) -> list:
    lines = text.split("\n")
    out, fenced, current = [], False, None
    for i, raw in enumerate(lines):
        s = raw.strip()
        if s.startswith("```"):
            fenced, current = not fenced, None
            continue
        if not fenced:
            continue
        if s.startswith("$ "):
            indent = len(raw) - len(raw.lstrip())
            current = DocExample(i + 1, s[2:], [])
            out.append(current)
        elif current is not None:
            if not current.output and not s:
                current = None          # no output, then a blank line
                continue
            current.output.append((raw[indent:] if raw[:indent].strip() == "" else raw)
                                  .rstrip())
    return out


# --------------------------------------------------------------------------- comparing

_MONTH = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
NORMALISE = [
    # ids of any length: an abbreviated msg_01M98KAJ7NPP is the same token as a full one
    (re.compile(r"\b(msg|thr|ses|evt|grp)_[0-9A-Za-z]+"), r"\1_<id>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z?"), "<time>"),
    (re.compile(r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) " + _MONTH +
                r" [ \d]\d \d\d:\d\d:\d\d \d{4}"), "<time>"),
    (re.compile(r"\bjust now\b|\b\d+[smhd] ago\b|\b" + _MONTH + r" \d\d?\b"), "<when>"),
    (re.compile(r"\bpid \d+"), "pid <n>"),
    (re.compile(r"\bfile [0-9a-f]{6,}\b"), "file <hash>"),
    (re.compile(r"\bpython \d+\.\d+(?:\.\d+)?"), "python <version>"),
    # absolute paths (scratch directories, sockets, interpreters)
    (re.compile(r"(?<![\w.~-])/[^\s'\",;)]+"), "<path>"),
]

#: An id (full, or abbreviated to 8+ characters) whose doc value a later command may use.
SHOWN_ID = re.compile(r"\b(?:msg|thr|ses|grp)_[0-9A-HJKMNP-TV-Z]{8,26}\b")


def normalise(line: str) -> str:
    line = line.rstrip()
    for pattern, repl in NORMALISE:
        line = pattern.sub(repl, line)
    return line


def lines_match(doc: str, real: str) -> bool:
    d, r = normalise(doc), normalise(real)
    if d == r:
        return True
    # a header line cut at 80 columns matches the line it was cut from
    if d.endswith("…") and len(d) > 20 and r.startswith(d[:-1]):
        return True
    return r.endswith("…") and len(r) > 20 and d.startswith(r[:-1])


def test_the_parser_finds_commands_and_their_first_lines():
    text = ("```\n$ thrum a\nfirst of a\nsecond\n$ thrum b\n$ thrum c   # note\n\nx\n```\n"
            "$ not in a block\n  ```\n  $ thrum d\n  out d\n  ```\n")
    assert [(d.line, d.cmd, d.output) for d in doc_examples(text)] == [
        (2, "thrum a", ["first of a", "second"]), (5, "thrum b", []),
        (6, "thrum c   # note", []), (12, "thrum d", ["out d"])]


def test_ids_shown_map_into_later_commands():
    w = SimpleNamespace(base=Path("/scratch"), ids={})
    d = DocExample(1, "thrum send hi --to @bob",
                   ["✓ Message sent: msg_01M8800DHYRK2FAJ21JS6YE828", "  To: @bob"])
    w.ids.update(shown_ids(d, "✓ Message sent: msg_01M98KAJ7NPP4Y3GHM0NH2RNNB\n  To: @bob\n"))
    assert substitute(w, "thrum reply msg_01M8800DHYRK2FAJ21JS6YE828 ok --repo /tmp/x") == \
        "thrum reply msg_01M98KAJ7NPP4Y3GHM0NH2RNNB ok --repo /scratch/x"
    assert substitute(w, "thrum message get 01m8800dhyrk2f") == \
        "thrum message get 01m98kaj7npp4y"
    # an abbreviated real id: the command gets all of it
    w.ids = shown_ids(d, "✓ Message sent: msg_01M98KAJ7NPP\n")
    assert substitute(w, "thrum reply msg_01M8800DHYRK2FAJ21JS6YE828 ok") == \
        "thrum reply msg_01M98KAJ7NPP ok"


def test_normalising_keeps_what_matters():
    # ids of both lengths, times and paths vary; the words around them do not
    assert lines_match("✓ Message sent: msg_01M8800DHYRK2FAJ21JS6YE828",
                       "✓ Message sent: msg_01M98KAJ7NPP")
    assert lines_match("daemon running (pid 23632, socket /tmp/tdoc/repo/.thrum/var/t.sock)",
                       "daemon running (pid 7, socket /tmp/pytest-of-x/p0/r/.thrum/var/t.sock)")
    assert lines_match("↳ ● msg_01M8TPAMZN7GXMVWQBCVP8N0MS  @bob → @alice  just now  "
                       "(re msg_01M8TPAM99…",
                       "↳ ● msg_01M98KAJ7NPP  @bob → @alice  3m ago  (re msg_01M98KAJ7NPQ)")
    assert not lines_match("✓ Message sent: msg_01M8800DHYRK2FAJ21JS6YE828", "✓ Sent: msg_1")
    assert not lines_match("1/1 read", "0/1 read")
    assert not lines_match("messages/alice.jsonl (24 bytes)", "messages/bob.jsonl (24 bytes)")
    assert not lines_match("", "something")


# --------------------------------------------------------------------------- the scratch world

class World:
    """The scratch repositories the examples run in. `base` stands for the doc's `/tmp`:
    a doc path `/tmp/X` in a command becomes `base/X`."""

    def __init__(self, base: Path, procs: Procs):
        self.base = base
        self.procs = procs
        self.ids = {}                      # doc id -> real id
        bindir = base / "bin"
        bindir.mkdir()
        wrapper = bindir / "thrum"         # `thrum` for the examples run by a shell
        wrapper.write_text("#!/bin/sh\nexec %s \"$@\"\n" % shlex.join(THRUM_CMD))
        wrapper.chmod(0o755)
        self.env = make_env(base / "home")
        self.env["PATH"] = "%s:%s" % (bindir, self.env.get("PATH", "/usr/bin:/bin"))
        self.tmux_socket = base / "doc-tmux.sock"
        self.places = {}

    def path(self, where: str) -> Path:
        return self.places[where]

    def api(self, where, op, params=None, name=None):
        return api(op, params, self.path(where), self.env, name)

    def git(self, where, *args):
        return git(*args, cwd=self.path(where), env=self.env)

    def add_ids(self, mapping: dict):
        self.ids.update(mapping)


def bare(path: Path, env) -> Path:
    path.mkdir(parents=True)
    git("init", "-q", "--bare", "-b", "master", cwd=path, env=env)
    return path


def remote_with_master(w: World, path: Path) -> Path:
    """A bare remote whose `master` has one commit (the doc's clones are on master)."""
    remote = bare(path, w.env)
    seed = make_repo(path.parent / (path.stem + "-seed"), env=w.env)
    git("branch", "-m", "master", cwd=seed, env=w.env)
    git("push", "-q", str(remote), "master", cwd=seed, env=w.env)
    return remote


def clone_into(w: World, remote: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", str(remote), str(path), cwd=path.parent, env=w.env)
    return path


def preamble(w: World):
    """What exists before the first example: the repository of the error examples (E,
    alice and bob registered), and the doc's main scratch clone (M, /tmp/tdoc/repo) of a
    bare remote `origin`, not initialised yet (its `thrum init` is an example)."""
    b = w.base
    w.places["E"] = make_repo(b / "e" / "repo", env=w.env)
    w.api("E", "init")
    for name, role, module in (("alice", "coordinator", "core"), ("bob", "implementer", "auth")):
        w.api("E", "quickstart", dict(name=name, role=role, module=module), name)
    w.remote = remote_with_master(w, b / "tdoc" / "remote.git")
    w.places["M"] = clone_into(w, w.remote, b / "tdoc" / "repo")
    w.places["review"] = b / "tdoc" / "review"    # carol's linked worktree
    w.places["dave"] = b / "tdoc" / "dave"        # dave's (removed again)
    w.places["M2"] = b / "tdoc" / "clone2"        # a second clone of the remote
    w.places["dt"] = b / "dt" / "repo"
    w.places["c2"] = b / "dt" / "c2"
    w.places["T"] = b / "tmux" / "repo"
    w.places["H"] = b / "idoc" / "d" / "repo"
    w.places["I"] = b / "idoc" / "repo"
    w.places["src"] = REPO_ROOT


# --------------------------------------------------------------------------- set-up steps
# Each takes the World and returns nothing, or {doc id: real id} for ids a later command
# of the doc uses.

@contextlib.contextmanager
def index_write_locked(w: World, where="E"):
    """Another process holds the index's write lock while the command runs."""
    db = sqlite3.connect(str(w.path(where) / ".thrum" / "var" / "index.db"),
                         isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def short_lock_wait(w):
    w.api("E", "config_set", dict(key="index.lock_wait", value="200ms"))


def carols_worktree(w):
    w.git("M", "worktree", "add", "-q", "-b", "feat/review", str(w.path("review")))


def team_in_m(w):
    """bob (implementer) next to alice in the main clone; carol (reviewer) in her
    worktree on feat/review."""
    w.api("M", "quickstart", dict(name="bob", role="implementer", module="auth"), "bob")
    w.api("review", "quickstart", dict(name="carol", role="reviewer", module="auth",
                                       intent="Reviewing auth changes"), "carol")


def taken_over(w):
    """bob registered in dt/repo, then taken over with --force from the worktree wt2;
    dave registered offline in two clones c2 and c3, c3's the newer."""
    b = w.base
    remote = remote_with_master(w, b / "dt" / "remote.git")
    clone_into(w, remote, w.path("dt"))
    w.api("dt", "init")
    w.api("dt", "quickstart", dict(name="bob", role="implementer", module="auth"), "bob")
    w.git("dt", "worktree", "add", "-q", "--detach", str(b / "dt" / "wt2"))
    api("quickstart", dict(name="bob", role="implementer", module="auth", force=True),
        b / "dt" / "wt2", w.env, "bob")
    w.api("dt", "sync_force")
    c3 = b / "dt" / "c3"
    for c in (w.path("c2"), c3):
        clone_into(w, remote, c)
        api("init", {}, c, w.env)
    for c in (w.path("c2"), c3):   # offline: neither has seen the other's registration
        api("quickstart", dict(name="dave", role="tester", module="qa"), c, w.env, "dave")
    for c in (w.path("c2"), c3, w.path("c2")):
        api("sync_force", {}, c, w.env)


def review_request_read(w):
    m = w.api("M", "send", dict(content="review please", to=["reviewer"]), "alice")
    w.api("review", "message_read", dict(message_ids=[m["message_id"]]), "carol")


def edited_review_message(w):
    """The message `message get` shows: to role:reviewer, a scope and a ref, edited twice,
    unread. Its id is the one of the doc's `send --json` example."""
    m = w.api("M", "send", dict(content="Review checklist is up", to=["reviewer"],
                                scopes=["module:auth"], refs=["bd:bd-42"]), "alice")
    for text in ("Review checklist is up (v2)", "Review checklist is up (v3)"):
        w.api("M", "message_edit", dict(message_id=m["message_id"], content=text), "alice")
    return {"msg_01M8800DT10VPQ767BJ1JBJXNF": m["message_id"]}


def wake_bob(w):
    """Sent once bob's `wait` blocks. (When the examples before it took less than a
    second, the wait returns at once with alice's request instead, from its one-second
    lookback: the same first line.)"""
    w.api("M", "send", dict(content="wake up", to=["bob"]), "alice")


def carol_adds_auth_py(w):
    wt = w.path("review")
    (wt / "src").mkdir()
    (wt / "src" / "auth.py").write_text("RATE = 10\n")
    git("add", "src/auth.py", cwd=wt, env=w.env)


def daves_worktree(w):
    w.git("M", "worktree", "add", "-q", "--detach", str(w.path("dave")))


def daves_worktree_gone(w):
    shutil.rmtree(w.path("dave"))


def second_clone(w):
    clone_into(w, w.remote, w.path("M2"))
    w.api("M2", "init")


def backend_group(w):
    w.api("M", "group_create", dict(name="backend", description="Backend crew"), "alice")
    w.api("M", "group_add", dict(name="backend", members=["bob", "dave", "role:reviewer"]),
          "alice")


def other_clone_pushes(w):
    """erin registers in the second clone (register, session, intent: 4 events) and
    syncs, for the main clone to pull."""
    w.api("M2", "quickstart", dict(name="erin", role="tester", module="ci"), "erin")
    w.api("M2", "sync_force")


def track_daemon(w):
    w.procs.track_store(w.path("M"), w.env)


def tmux_repo(w):
    make_repo(w.path("T"), env=w.env)
    sock = str(w.tmux_socket)
    w.procs.on_teardown(lambda: subprocess.run(["tmux", "-S", sock, "kill-server"],
                                               capture_output=True, timeout=30))


def third_tmux_session(w):
    r = subprocess.run([*THRUM_CMD, "tmux", "create", "impl-2", "--name", "carol", "--role",
                        "tester", "--module", "qa", "--command", "bash"],
                       cwd=w.path("T"), capture_output=True, text=True, timeout=60,
                       env=dict(w.env, THRUM_TMUX_SOCKET=str(w.tmux_socket)))
    assert r.returncode == 0, r.stdout + r.stderr


def hooks_team(w):
    """/tmp/idoc/d/repo: alice (implementer), bob (reviewer), carol (tester); two
    messages to bob; bob's saved notes."""
    make_repo(w.path("H"), env=w.env)
    w.api("H", "init")
    w.api("H", "quickstart", dict(name="alice", role="implementer", module="auth",
                                  intent="Rate limiting for POST /login"), "alice")
    w.api("H", "quickstart", dict(name="bob", role="reviewer", module="api"), "bob")
    w.api("H", "quickstart", dict(name="carol", role="tester", module="qa"), "carol")
    w.api("H", "send", dict(content="limiter is ready for review: src/auth/limiter.py",
                            to=["bob"]), "alice")
    w.api("H", "send", dict(content="tests for the limiter are in tests/test_limiter.py",
                            to=["bob"]), "carol")
    w.api("H", "context_save", dict(content="Reviewing the limiter PR.\n"
                                    "Next: check the db migration.\n"), "bob")


def one_more_for_bob(w):
    w.api("H", "send", dict(content="the limit is per client IP, not per user",
                            to=["bob"]), "alice")


def integrate_repo(w):
    make_repo(w.path("I"), env=w.env)
    w.api("I", "quickstart", dict(name="bob", role="reviewer", module="api"), "bob")


def broken_codex_config(w):
    (w.path("I") / ".codex").mkdir()
    (w.path("I") / ".codex" / "config.toml").write_text("x =")


def codex_config_gone(w):
    shutil.rmtree(w.path("I") / ".codex")


def damaged_store(w):
    """A torn last line (24 bytes) in alice's message log, a stray file in the sync
    worktree, a corrupt identity file."""
    log = log_dir(w.path("M"))
    with open(log / "messages" / "alice.jsonl", "ab") as f:
        f.write(b'{"v": 1, "event_id": "ev')
    (log / "README.md").write_text("not a log file\n")
    (w.path("M") / ".thrum" / "identities" / "alice.json").write_text("{not json")


# --------------------------------------------------------------------------- the examples

@dataclass
class Ex:
    cmd: str                                   # exactly as in the doc, after `$ `
    where: str = "M"                           # which scratch directory (World.places)
    as_: Optional[str] = None                  # THRUM_NAME
    env: dict = field(default_factory=dict)    # more environment (values may use /tmp/)
    before: Optional[Callable] = None          # set-up run just before
    during: Optional[Callable] = None          # a context manager around the run
    woken_by: Optional[Callable] = None        # run once the command blocks (or returned)
    tmux: bool = False                         # needs tmux (without it: skipped, warned)


TMUX_ENV = {"THRUM_TMUX_SOCKET": "/tmp/doc-tmux.sock"}

EXAMPLES = [
    # conventions: errors, in a repository where alice and bob are registered
    Ex('thrum send "ping" --to nobody,ghost', "E", as_="bob"),
    Ex('thrum send "hi" --to @alice > /dev/full', "E", as_="bob"),
    Ex('thrum send "hi" --to @alice', "E", as_="bob", before=short_lock_wait,
       during=index_write_locked),
    # setup and identity, in the main clone
    Ex("thrum init"),
    Ex("thrum setup", "review", before=carols_worktree),
    Ex("thrum quickstart --name alice --role coordinator --module core"),
    Ex("THRUM_NAME=bob thrum whoami", "dt", before=taken_over),
    Ex("THRUM_NAME=dave thrum whoami      # in the clone whose offline registration lost",
       "c2"),
    Ex("THRUM_NAME=alice thrum whoami"),
    # messaging
    Ex('thrum send "Please add rate limiting to src/auth.py" --to @bob', as_="alice",
       before=team_in_m),
    Ex('thrum send "to implementers" --to implementer     # bob is the only implementer',
       as_="bob"),
    Ex('thrum send "Deployed v42" --to @bob --idempotency-key deploy-42', as_="alice"),
    Ex('thrum send "Deployed v42" --to @bob --idempotency-key deploy-42', as_="alice"),
    Ex('thrum reply msg_01M8800DHYRK2FAJ21JS6YE828 "On it: token bucket, 10 req/s"',
       as_="bob"),
    Ex("thrum inbox", as_="alice"),
    Ex("thrum sent --limit 2", as_="alice", before=review_request_read),
    Ex('thrum search "rate limit*"', as_="alice"),
    Ex("thrum message get 01M8800DT10VPQ", as_="alice", before=edited_review_message),
    Ex("thrum wait --timeout 10s", as_="bob", woken_by=wake_bob),
    # who is doing what, agents
    Ex("thrum who-has src/auth.py", as_="alice", before=carol_adds_auth_py),
    Ex("thrum ping bob", as_="alice"),
    Ex("thrum agent register --name dave --role tester --module qa", "dave",
       before=daves_worktree),
    Ex("thrum agent cleanup", as_="alice", before=daves_worktree_gone),
    # context
    Ex("printf '## Working on\\n- rate limiter in src/auth.py\\n' | thrum context save",
       as_="bob"),
    Ex("thrum context sync", as_="bob"),
    Ex("thrum context show --agent bob", "M2", before=second_clone),
    # groups, sync, config
    Ex("thrum group info backend", as_="alice", before=backend_group),
    Ex("thrum group list", as_="alice"),
    Ex("thrum sync force", as_="alice", before=other_clone_pushes),
    Ex("thrum sync status", as_="alice"),
    Ex("thrum config set sync.branch master", as_="alice"),
    # daemon
    Ex("thrum daemon start", before=track_daemon),
    Ex("thrum daemon start"),
    Ex("thrum daemon status"),
    Ex("thrum daemon stop"),
    # tmux, with a private tmux server
    Ex("thrum tmux create impl --name alice --role implementer --module auth --command bash",
       "T", env=TMUX_ENV, before=tmux_repo, tmux=True),
    Ex("thrum tmux create review --name bob --role reviewer --module auth --json --command "
       "bash --norc", "T", env=TMUX_ENV, tmux=True),
    Ex("thrum tmux list", "T", env=TMUX_ENV, tmux=True),
    Ex("thrum tmux kill impl", "T", env=TMUX_ENV, tmux=True),
    Ex("tmux -S /tmp/doc-tmux.sock ls", "T", before=third_tmux_session, tmux=True),
    Ex("thrum tmux kill --name carol --json", "T", env=TMUX_ENV, tmux=True),
    # hooks, in /tmp/idoc/d/repo
    Ex("echo '{\"cwd\": \"/tmp/idoc/d/repo\", \"hook_event_name\": \"Stop\", "
       "\"stop_hook_active\": false}' | thrum hook stop --agent bob", "H", before=hooks_team),
    Ex("echo '{\"cwd\": \"/tmp/idoc/d/repo\", \"hook_event_name\": \"Stop\", "
       "\"stop_hook_active\": false}' | thrum hook stop --agent bob", "H"),
    Ex("echo '{\"cwd\": \"/tmp/idoc/d/repo\", \"hook_event_name\": \"UserPromptSubmit\", "
       "\"prompt\": \"carry on\"}' | thrum hook prompt --agent bob", "H",
       before=one_more_for_bob),
    Ex("echo '{\"session_id\": \"s1\", \"cwd\": \"/tmp/idoc/d/repo\", \"hook_event_name\": "
       "\"SessionStart\", \"source\": \"startup\"}' | thrum hook session-start --agent bob",
       "H"),
    # integrate, in /tmp/idoc/repo
    Ex("thrum integrate claude", "I", before=integrate_repo),
    Ex("thrum integrate claude --write", "I"),
    Ex("thrum integrate claude --write", "I"),
    Ex("thrum integrate claude --write --remove", "I"),
    Ex("thrum integrate codex --write", "I", before=broken_codex_config),
    Ex("thrum integrate codex --write --json", "I", before=codex_config_gone),
    # install, into the scratch directory
    Ex("python3 thrum.py install --prefix /tmp/idoc/x/bin", "src",
       env={"XDG_DATA_HOME": "/tmp/idoc/data"}),
    Ex("cat /tmp/idoc/x/bin/thrum", "src"),
    # maintenance, back in the main clone
    Ex("thrum doctor", before=damaged_store),
    Ex("thrum doctor --fix | grep identity"),
]

#: Examples that are not run, each with the reason. Reviewed: keep it short.
NOT_RUN = {
}


# --------------------------------------------------------------------------- running one

SHELL_OPERATORS = re.compile(r"[|<>;&`]|\$\(")


def needs_shell(cmd: str) -> bool:
    """Pipes and redirections outside quotes need a shell."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    return any(tok and (SHELL_OPERATORS.fullmatch(tok) or set(tok) <= set("|<>;&"))
               for tok in lex)


def substitute(w: World, text: str) -> str:
    """The doc's /tmp paths and ids, made the scratch world's."""
    text = text.replace("/tmp/", str(w.base) + "/")

    def real_id(m):
        # the doc's id, or a prefix of it (or it a prefix of this: an abbreviated id),
        # becomes as much of the real id (a real id shown abbreviated is a unique prefix)
        prefix, ulid = m.group(1) or "", m.group(2).upper()
        for doc_id, real in w.ids.items():
            doc_ulid, real_ulid = doc_id.split("_", 1)[1], real.split("_", 1)[1]
            if doc_ulid.startswith(ulid) or ulid.startswith(doc_ulid):
                real_ulid = real_ulid[:len(ulid)]
                return prefix + (real_ulid.lower() if m.group(2).islower() else real_ulid)
        return m.group(0)
    return re.sub(r"\b(msg_|thr_|ses_|grp_)?([0-9A-Za-z]{8,26})\b", real_id, text)


def argv_of(cmd: str):
    """(argv, env) for a command without shell operators: `VAR=value` prefixes go to the
    environment, `thrum` and `python3 thrum.py` to this checkout's thrum."""
    words = shlex.split(cmd, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    if words[0] == "thrum":
        words = [*THRUM_CMD, *words[1:]]
    elif words[:2] == ["python3", "thrum.py"]:
        words = [sys.executable, THRUM_PY, *words[2:]]
    return words, env


def run_example(w: World, ex: Ex) -> tuple:
    """Run one example; return (exit code, stdout and stderr as one text)."""
    cmd = substitute(w, ex.cmd)
    env = dict(w.env)
    env.update({k: substitute(w, v) for k, v in ex.env.items()})
    if ex.as_:
        env["THRUM_NAME"] = ex.as_
    if needs_shell(cmd):
        argv = ["bash", "-c", cmd]
    else:
        argv, extra = argv_of(cmd)
        env.update(extra)
    cwd = w.path(ex.where)
    during = ex.during(w) if ex.during else contextlib.nullcontext()
    with during:
        p = w.procs.popen(argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if ex.woken_by:
            def blocked():
                if p.poll() is not None:
                    return True   # returned already: its output says why
                return holds_open(p.pid, "index.db") and in_sleep(p.pid)
            wait_until(blocked, 30, f"`{ex.cmd}` to block")
            ex.woken_by(w)
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            pytest.fail(f"`{ex.cmd}` did not finish within 90 s:\n{out.decode()}")
    return p.returncode, out.decode("utf-8", "replace")


def shown_ids(d: DocExample, out: str) -> dict:
    """{doc id: real id} for the ids in the doc's output of an example and in its real
    output, line by line: on the first line whenever both have as many ids (also when the
    line differs otherwise, so that one drift does not fail every later example), on the
    other lines when they match."""
    found = {}
    for i, (doc, real) in enumerate(zip(d.output, out.split("\n"))):
        doc_ids, real_ids = SHOWN_ID.findall(doc), SHOWN_ID.findall(real)
        if len(doc_ids) == len(real_ids) and (i == 0 or lines_match(doc, real)):
            found.update(zip(doc_ids, real_ids))
    return found


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip() if text else ""


# --------------------------------------------------------------------------- the tests

def test_every_example_is_run_or_allowed():
    """Each `$ ` example of docs/cli.md is in EXAMPLES (in document order) or in NOT_RUN,
    and neither list names a command the doc no longer has."""
    doc = doc_examples(CLI_MD.read_text(encoding="utf-8"))
    assert len(doc) >= 40, f"found only {len(doc)} examples: is the parser broken?"
    run = [d for d in doc if d.cmd not in NOT_RUN]
    missing = [f"docs/cli.md:{d.line}: `$ {d.cmd}`" for d in run
               if d.cmd not in {e.cmd for e in EXAMPLES}]
    assert not missing, ("examples that are neither run (EXAMPLES) nor allowed (NOT_RUN) "
                         "in tests/test_docs.py:\n" + "\n".join(missing))
    assert [d.cmd for d in run] == [e.cmd for e in EXAMPLES], \
        "EXAMPLES is not the doc's examples in document order (one added, moved or removed)"
    stale = [c for c in NOT_RUN if c not in {d.cmd for d in doc}]
    assert not stale, f"NOT_RUN names commands the doc does not have: {stale}"


def test_cli_md_examples_print_what_the_doc_shows(tmp_path):
    """Runs every example of docs/cli.md in document order and compares first lines."""
    doc = [d for d in doc_examples(CLI_MD.read_text(encoding="utf-8"))
           if d.cmd not in NOT_RUN]
    assert [d.cmd for d in doc] == [e.cmd for e in EXAMPLES], \
        "out of step: see test_every_example_is_run_or_allowed"
    procs = Procs()
    try:
        w = World(tmp_path, procs)
        preamble(w)
        wrong, ran, no_tmux = [], 0, []
        for d, ex in zip(doc, EXAMPLES):
            if ex.tmux and not HAVE_TMUX:
                no_tmux.append(d.line)
                continue
            try:
                if ex.before:
                    w.add_ids(ex.before(w) or {})
            except Exception as e:  # name the example whose set-up failed
                raise AssertionError(f"docs/cli.md:{d.line}: the set-up of `$ {d.cmd}` "
                                     f"failed: {e!r}") from e
            code, out = run_example(w, ex)
            ran += 1
            real = first_line(out)
            w.add_ids(shown_ids(d, out))
            if not lines_match(d.first, real):
                wrong.append(f"docs/cli.md:{d.line}: `$ {d.cmd}` (exit {code})\n"
                             f"  the doc shows: {d.first!r}\n"
                             f"  it printed:    {real!r}\n"
                             + "".join(f"    | {ln}\n" for ln in out.splitlines()[:12]))
        if no_tmux:
            warnings.warn(f"tmux is not installed: the tmux examples of docs/cli.md (lines "
                          f"{', '.join(map(str, no_tmux))}) did not run")
        assert not wrong, (f"{len(wrong)} of {ran} examples of docs/cli.md print another "
                           "first line than the doc shows:\n\n" + "\n".join(wrong))
    finally:
        procs.teardown()
