"""Bounded property tests (hypothesis) for bodies, --structured data and the event encoder.

The property (from the issue): any `--structured` object and any body that `send` accepts
comes back identical from `inbox --json`, `message get` and a rebuilt index; anything it
refuses leaves the log byte-identical; the event encoder never writes a line the reader skips.

The black-box tests run the real program, so each example costs a few processes (~0.1-0.2 s
each). They are bounded: one team per test (not per example), a fixed number of examples,
`derandomize=True` and no example database, so CI sees the same examples on every run.
`THRUM_HYPOTHESIS_EXAMPLES` raises (or lowers) the number of examples for a longer local run.

Oracles (computed in the test from Python's own json/UTF-8 rules, independent of thrum):
- body from stdin / --body-file: bytes -> strict UTF-8 (else exit 2) -> exactly one trailing
  `\\n` or `\\r\\n` removed (SPEC §14); empty or whitespace-only (`str.strip()`) -> exit 2
  (SPEC §6 refuses empty bodies; docs/cli.md: "An empty or whitespace-only body exits 2");
  otherwise accepted and stored exactly. Positional bodies are argv bytes (decoded by Python
  with surrogateescape): invalid UTF-8 there must be refused too, and nothing is stripped.
- `--structured TEXT`: parsed with Python's lenient json.loads (which reads NaN, Infinity and
  turns 1e999 into inf); accepted iff that gives a dict whose numbers are all finite and whose
  strings (keys and values) are all valid Unicode (no lone surrogates). Accepted data must come
  back equal with the same JSON types (1 vs 1.0 vs true, -0.0 kept).
- refused: exit 2, a `thrum: error:` line, the `--json` error object, no traceback, every
  log file byte-identical.
- at the end of each test: every log line parses with strict json (no NaN/Infinity constants),
  re-encodes to UTF-8 and carries the §3 envelope; thrum's own reader skips none; after
  deleting .thrum/var/index.db* every message comes back the same again.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from conftest import assert_error, log_dir, make_team, thrum

EXAMPLES = int(os.environ.get("THRUM_HYPOTHESIS_EXAMPLES", "30"))

BLACK_BOX = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

IN_PROCESS = settings(BLACK_BOX, max_examples=max(200, EXAMPLES * 8))


# --------------------------------------------------------------------------- helpers

def _no_constant(name):
    raise ValueError("non-standard JSON constant %s" % name)


def strict_loads(data):
    """What a strict JSON reader accepts: no NaN/Infinity constants, no overflowing numbers."""
    def parse_float(text):
        v = float(text)
        if not math.isfinite(v):
            raise ValueError("number out of range: %s" % text)
        return v
    return json.loads(data, parse_constant=_no_constant, parse_float=parse_float)


def clean(v) -> bool:
    """A JSON value the log can hold: finite numbers, valid Unicode everywhere."""
    if isinstance(v, bool) or v is None:
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, int):
        return True
    if isinstance(v, str):
        return _unicode_ok(v)
    if isinstance(v, list):
        return all(clean(x) for x in v)
    if isinstance(v, dict):
        return all(_unicode_ok(k) and clean(x) for k, x in v.items())
    return False


def _unicode_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def canon(v):
    """A type-exact, order-insensitive form for comparing JSON values (1 != 1.0 != True)."""
    if v is None:
        return ("null",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, float):
        return ("float", repr(v))  # keeps -0.0 apart from 0.0
    if isinstance(v, str):
        return ("str", v)
    if isinstance(v, list):
        return ("list", tuple(canon(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((k, canon(x)) for k, x in v.items())))
    raise TypeError(type(v))


def argv_safe(s: str) -> bool:
    """Can subprocess put this str in argv? (fsencode with surrogateescape, no NUL)."""
    try:
        b = os.fsencode(s)
    except UnicodeEncodeError:
        return False
    return b"\x00" not in b


def snapshot(team) -> dict:
    """Every file of the event log (the a-sync worktree, without its .git link)."""
    root = log_dir(team.path)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".git"
            and ".git" not in p.relative_to(root).parts}


def assert_log_unchanged(before: dict, after: dict, r) -> None:
    if before == after:
        return
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    detail = []
    for k in changed[:3]:
        old, new = before.get(k, b""), after.get(k, b"")
        detail.append("%s: %d -> %d bytes, new tail %r" % (k, len(old), len(new),
                                                          new[len(old):][:300]))
    pytest.fail("a refused send changed the log:\n  " + "\n  ".join(detail) + "\n"
                + r.describe())


def assert_refused(r, before, team) -> None:
    assert_error(r, 2)
    doc = r.json  # --json was given: stdout is the error document
    assert isinstance(doc, dict) and doc.get("error", {}).get("exit_code") == 2, r.describe()
    assert_log_unchanged(before, snapshot(team), r)




def check_log_lines(team) -> int:
    """Every line of every log file is one a strict reader keeps. Returns message.create count."""
    root = log_dir(team.path)
    creates = 0
    for path in sorted(root.rglob("*.jsonl")):
        if ".git" in path.relative_to(root).parts:
            continue
        data = path.read_bytes()
        rel = path.relative_to(root)
        assert not data or data.endswith(b"\n"), f"{rel} does not end with a newline"
        lines = data.split(b"\n")[:-1] if data else []
        for i, line in enumerate(lines, 1):
            where = f"{rel}:{i}"
            assert line.strip(), f"{where} is blank"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                pytest.fail(f"{where} is not UTF-8 ({e}): {line[:200]!r}")
            try:
                ev = strict_loads(text)
            except ValueError as e:
                pytest.fail(f"{where} is not strict JSON ({e}): {line[:200]!r}")
            assert clean(ev), f"{where} holds a lone surrogate or non-finite number: {line[:200]!r}"
            assert isinstance(ev, dict), f"{where} is not an object"
            for k in ("v", "event_id", "type", "timestamp", "origin"):
                assert k in ev, f"{where} lacks envelope field {k!r}"
            if ev["type"] == "message.create":
                creates += 1
        events, bad = thrum.parse_lines(data, str(rel), warn=False)
        assert bad == 0 and len(events) == len(lines), (
            f"thrum's reader skipped {bad} of {len(lines)} lines of {rel}")
    return creates


def check_message(m: dict, content: str, structured, where: str) -> None:
    body = m.get("body") or {}
    assert body.get("content") == content, (
        f"{where}: content differs\n  sent   {content!r}\n  stored {body.get('content')!r}")
    assert body.get("format") == "markdown", f"{where}: format {body.get('format')!r}"
    got = body.get("structured")
    if structured is None:
        assert got is None, f"{where}: structured {got!r} appeared"
    else:
        assert isinstance(got, dict), f"{where}: structured is {type(got).__name__}: {got!r}"
        assert canon(got) == canon(structured), (
            f"{where}: structured differs\n  sent   {structured!r}\n  stored {got!r}")


def check_round_trip(team, mid: str, content: str, structured) -> None:
    """inbox --unread (does not mark read) then message get (marks read, keeps unread small)."""
    r = team.t("inbox", "--unread", "--limit", "1000", "--json", name="bob")
    assert r.code == 0, r.describe()
    rows = [m for m in r.json["messages"] if m["message_id"] == mid]
    assert len(rows) == 1, f"{mid} is not (exactly once) in bob's unread inbox\n{r.describe()}"
    check_message(rows[0], content, structured, "inbox --unread")
    r = team.t("message", "get", mid, "--json", name="bob")
    assert r.code == 0, r.describe()
    check_message(r.json["message"], content, structured, "message get")


def check_rebuild(team, accepted: list) -> None:
    """The log is readable line by line, and a rebuilt index answers the same."""
    creates = check_log_lines(team)

    def all_messages():
        r = team.t("inbox", "--all", "--limit", "1000", "--json", name="bob")
        assert r.code == 0, r.describe()
        assert "skipping" not in r.err.lower(), f"the reader skipped something\n{r.describe()}"
        return r.json

    before = all_messages()
    for p in (team.path / ".thrum" / "var").glob("index.db*"):
        p.unlink()
    after = all_messages()
    assert after["total"] == before["total"] == creates, (
        f"messages: {before['total']} before rebuild, {after['total']} after, "
        f"{creates} message.create lines in the log")
    rows = {m["message_id"]: m for m in after["messages"]}
    old = {m["message_id"]: m for m in before["messages"]}
    for mid, content, structured in accepted:
        assert mid in rows, f"{mid} is missing after the index rebuild"
        check_message(old[mid], content, structured, "inbox --all before rebuild")
        check_message(rows[mid], content, structured, "inbox --all after rebuild")
    sample = accepted[:4] + accepted[-4:] if len(accepted) > 8 else accepted
    for mid, content, structured in sample:
        r = team.t("message", "get", mid, "--json", name="bob")
        assert r.code == 0, r.describe()
        check_message(r.json["message"], content, structured, "message get after rebuild")


class Store:
    """One team per test, replaced by a fresh one after a failing example: a send that wrote
    what it should have refused may have poisoned the log, and hypothesis replays (and
    shrinks) each failure, so the replay must meet the same clean state or it looks flaky."""

    def __init__(self, factory, label):
        self.factory, self.label = factory, label
        self.reset()

    def reset(self):
        self.team = make_team(self.factory.mktemp(self.label))
        self.accepted = []


# --------------------------------------------------------------------------- strategies

#: Characters worth hitting on purpose, on top of every code point hypothesis can draw
#: (exclude_categories=() lets it draw lone surrogates, which st.text() never does).
SPECIAL = list("\n\r\t \x00\x1b\x7f\x85\u2028\u2029\ufeff\u200b\"\\/{}é中") + [
    "\U0001F600", "\udc80", "\udcff", "\ud800", "\udfff", "\ud83d", "\ude00"]
CHARS = st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIAL))
TEXT = st.text(CHARS, max_size=24)

FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
ANY_FLOATS = st.one_of(st.floats(), st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1.7976931348623157e308]))
INTS = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([2**63, -2**63 - 1, 2**64]))

#: Placeholders replaced in the serialised text by spellings json.dumps never writes.
P_VALUE, P_KEY = "@@poison-value@@", "@@poison-key@@"
VALUE_POISONS = ["1e999", "-1e999", "1E+400", "-2e308", "NaN", "Infinity", "-Infinity",
                 '"\\ud800"', '"x\\udfffy"', '"\\udc00\\ud800"', "[1e999]", '{"n": NaN}']
KEY_POISONS = ['"\\ud83d"', '"\\udfff"', '"a\\udc80"']


def json_values(poison: bool, placeholders: bool = True):
    leaves = st.one_of(st.none(), st.booleans(), INTS,
                       ANY_FLOATS if poison else FINITE_FLOATS, TEXT if poison else
                       st.text(max_size=24))
    keys = TEXT if poison else st.text(max_size=12)
    if poison and placeholders:
        leaves = st.one_of(leaves, st.just(P_VALUE))
        keys = st.one_of(keys, st.just(P_KEY))
    return st.recursive(leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=4)),
        max_leaves=12), keys


@st.composite
def structured_texts(draw):
    """(argv text for --structured, how it was made)."""
    kind = draw(st.sampled_from(["clean", "clean", "wild", "wild", "wild", "raw", "fixed"]))
    if kind == "fixed":
        return draw(st.sampled_from([
            '{"x": 1e999}', '{"x": -1e999}', '{"x": [1, 2, 1E400]}', '{"a": {"b": NaN}}',
            '{"x": Infinity}', '{"x": -Infinity}', '{"\\udfff": 0}', '{"x": "\\ud800\\ud800"}',
            '{"ok": "\\ud83d\\ude00"}', '{"x": 1e308}', '{"x": 5e-324}', '{"x": 1e-400}',
            '{"x": -0.0}', '{"x": 1.0, "y": 1, "z": true}', '{}', ' \n{"a": 1}\n ',
            '{"a": 1, "a": 2}', '{"": ""}', '{"x": 123456789012345678901234567890}',
            '{"x": "\\u0000\\n\\t\\u2028"}', '[1]', '"text"', 'null', '{', '{"a": 1}x',
            '{"x": 1}' + " " * 3, '{"\\u00e9": "\\ud83d\\ude00"}'])), kind
    if kind == "raw":
        text = draw(st.text(max_size=30).filter(lambda s: "\x00" not in s))
        return text, kind
    values, keys = json_values(poison=(kind == "wild"))
    top = draw(st.one_of(st.dictionaries(keys, values, max_size=5),
                         st.dictionaries(keys, values, max_size=5), values))
    ascii_form = json.dumps(top, allow_nan=True, ensure_ascii=True)
    text = ascii_form
    if draw(st.booleans()):
        raw = json.dumps(top, allow_nan=True, ensure_ascii=False)
        if argv_safe(raw):  # may carry \udc80-\udcff as invalid UTF-8 bytes in argv
            text = raw
    if P_VALUE in text or P_KEY in text:
        text = text.replace('"%s"' % P_VALUE, draw(st.sampled_from(VALUE_POISONS)))
        text = text.replace('"%s"' % P_KEY, draw(st.sampled_from(KEY_POISONS)))
    return text, kind


@st.composite
def bodies(draw):
    """(mode, raw bytes of the body)."""
    mode = draw(st.sampled_from(["stdin", "stdin", "file", "arg"]))
    kind = draw(st.sampled_from(["text", "text", "text", "bytes", "fixed"]))
    if kind == "text":
        s = draw(st.text(CHARS, max_size=40))
        s += draw(st.sampled_from(["", "", "\n", "\r\n", "\n\n", "\r\n\r\n", "\r", " \n",
                                   "\r\r\n", "\n\r\n"]))
        data = s.encode("utf-8", "surrogatepass")  # lone surrogates -> invalid UTF-8 bytes
    elif kind == "bytes":
        data = draw(st.binary(max_size=40))
    else:
        data = draw(st.sampled_from([
            b"", b"\n", b"\r\n", b"\n\n", b"   \n", b"\t", b"\xff", b"ok\xff\n", b"caf\xc3\xa9\n",
            b"\xed\xa0\x80", b"\xed\xa0\xbd\xed\xb8\x80", b"\xf0\x9f\x98\x80\n", b"a\x00b\n",
            b"\xef\xbb\xbfbom\n", b"x\r\n\n", b"x\r\r\n", b"x\n\r\n", b"\xc0\xaf", b"\xf4\x90\x80\x80",
            b"line1\r\nline2\r\n", b"-", b"--to", b"\x85", "\u2028".encode(), b"{\"json\": 1}",
        ]))
    return mode, data


def expected_body(mode: str, data: bytes):
    """(verdict, content): verdict is 'accept' or 'refuse'."""
    if mode == "arg":
        text = os.fsdecode(data)  # what Python gives thrum in sys.argv
        if not _unicode_ok(text):
            return "refuse", None
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return "refuse", None
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
    if not text.strip():  # empty or whitespace only
        return "refuse", None
    return "accept", text


def expected_structured(text: str):
    """(accept?, parsed value) by Python's lenient reading of the same text."""
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return False, None
    return isinstance(parsed, dict) and clean(parsed), parsed


# --------------------------------------------------------------------------- tests

def test_body_round_trip_or_refusal(tmp_path_factory):
    """Any body `send` accepts comes back byte-exact; anything refused stores nothing."""
    store = Store(tmp_path_factory, "props-body")
    body_file = tmp_path_factory.mktemp("props-body-files") / "body"

    @BLACK_BOX
    @given(bodies())
    def prop(case):
        try:
            one_body(store.team, store.accepted, case)
        except BaseException:
            store.reset()
            raise

    def one_body(team, accepted, case):
        mode, data = case
        if mode == "arg" and (b"\x00" in data or data.startswith(b"-")):
            mode = "stdin"  # argv cannot carry NUL; a leading '-' reads as an option
        verdict, content = expected_body(mode, data)
        note(f"mode={mode} data={data!r} expected={verdict} content={content!r}")
        before = snapshot(team)
        if mode == "stdin":
            r = team.t("send", "--to", "bob", "--stdin", "--json", name="alice", input=data)
        elif mode == "file":
            body_file.write_bytes(data)
            r = team.t("send", "--to", "bob", "--body-file", body_file, "--json", name="alice")
        else:
            r = team.t("send", os.fsdecode(data), "--to", "bob", "--json", name="alice")
        event(f"body via {mode}: expected {verdict}, exit {r.code}")
        if r.code == 0:
            assert verdict == "accept", f"thrum accepted a body it must refuse\n{r.describe()}"
            doc = r.json
            assert doc["recipients"] == ["bob"], r.describe()
            mid = doc["message_id"]
            check_round_trip(team, mid, content, None)
            accepted.append((mid, content, None))
        else:
            assert verdict == "refuse", f"thrum refused a valid body\n{r.describe()}"
            assert_refused(r, before, team)

    prop()
    check_rebuild(store.team, store.accepted)


def test_structured_round_trip_or_refusal(tmp_path_factory):
    """Any --structured object `send` accepts comes back equal (same JSON types); a
    non-finite number or a lone surrogate anywhere, or a non-object, is refused (exit 2)
    and stores nothing."""
    store = Store(tmp_path_factory, "props-structured")
    body = "structured payload"

    @BLACK_BOX
    @given(structured_texts())
    def prop(case):
        try:
            one_structured(store.team, store.accepted, case)
        except BaseException:
            store.reset()
            raise

    def one_structured(team, accepted, case):
        text, kind = case
        ok, parsed = expected_structured(text)
        note(f"kind={kind} --structured={text!r} expected={'accept' if ok else 'refuse'}")
        before = snapshot(team)
        r = team.t("send", body, "--to", "bob", "--structured=" + text, "--json", name="alice")
        event(f"structured {kind}: expected {'accept' if ok else 'refuse'}, exit {r.code}")
        if ok:
            assert r.code == 0, f"thrum refused a finite, valid JSON object\n{r.describe()}"
            mid = r.json["message_id"]
            check_round_trip(team, mid, body, parsed)
            accepted.append((mid, body, parsed))
        else:
            assert r.code != 0, (f"thrum accepted --structured it must refuse "
                                 f"(lenient parse: {parsed!r})\n{r.describe()}")
            assert_refused(r, before, team)

    prop()
    check_rebuild(store.team, store.accepted)


# ----------------------------------------------------------------- in-process: the encoder

@st.composite
def message_events(draw):
    """A message.create event as `send` would build it, with arbitrary body and structured
    data (possibly non-finite or with lone surrogates), plus sometimes an odd extra field."""
    values, keys = json_values(poison=True, placeholders=False)
    structured = draw(st.one_of(st.none(), st.dictionaries(keys, values, max_size=5)))
    content = draw(st.text(CHARS, min_size=1, max_size=40))
    body = {"format": "markdown", "content": content}
    if structured is not None:
        body["structured"] = structured
    extra = draw(st.one_of(st.none(), st.tuples(st.sampled_from(["note", "x"]), values)))
    return body, extra


def test_encoder_never_writes_a_line_the_reader_skips():
    """encode_event either refuses (UsageError) or writes one line that thrum's reader and a
    strict JSON reader both read back unchanged; an event with NaN/Infinity or a lone
    surrogate anywhere is always refused; a clean message.create is always accepted."""
    mod = thrum
    origin = "org_" + "0" * 26

    @IN_PROCESS
    @given(message_events())
    def prop(case):
        body, extra = case
        fields = dict(message_id=mod.new_id("msg_"), agent_id="alice", session_id=None,
                      body=body, recipients=["bob"],
                      audiences=[{"type": "agent", "value": "bob"}], scopes=[], refs=[])
        if extra is not None:
            fields[extra[0]] = extra[1]
        ev = mod.make_event("message.create", origin, **fields)
        bad = not clean(ev)
        note(f"event={ev!r} poisoned={bad}")
        event("poisoned" if bad else "clean")
        try:
            line = mod.encode_event(ev)
        except mod.UsageError as e:
            assert bad, f"encode_event refused a clean message.create: {e}"
            return
        assert not bad, f"encode_event accepted an event the log cannot hold: {line[:300]!r}"
        assert isinstance(line, bytes) and line.endswith(b"\n") and line.count(b"\n") == 1, line
        back = strict_loads(line.decode("utf-8"))
        assert canon(back) == canon(ev), f"the line does not read back as the event: {line!r}"
        events, skipped = mod.parse_lines(line, "test.jsonl", warn=False)
        assert skipped == 0 and len(events) == 1, f"thrum's reader skips {line[:300]!r}"
        assert canon(events[0]) == canon(ev)

    prop()
