"""`thrum search` (SPEC §17): what it finds (only what the caller can see), its query
language, filters and order, its two backends (SQLite FTS5, and the scan that replaces it,
forced with THRUM_FTS=0) giving the same answers, with and without a daemon, and the MCP
tool `search_messages`."""

from __future__ import annotations

import json
import sqlite3

import anyio
import pytest
from mcp import Client, StdioServerParameters

from conftest import THRUM_CMD, api, make_team, thrum

BACKENDS = {"fts": {}, "scan": {"THRUM_FTS": "0"}}
NEEDS_FTS5 = pytest.mark.skipif(not thrum.fts5_available(),
                                reason="this interpreter's SQLite has no FTS5")


def seed(team) -> dict:
    """The messages every read-only test searches, oldest first, by short name."""
    g = team.api
    g("group_create", dict(name="backend"), name="alice")
    g("group_add", dict(name="backend", members=["bob"]), name="alice")
    ids = {}

    def send(key, frm, body, **kw):
        ids[key] = team.seed(frm, body, **kw)["message_id"]
    # one 3 days old, written as another clone's sync would have brought it
    old = thrum.make_event("message.create", "o_TEST", message_id="msg_" + thrum._UlidGen()(
        int((thrum.time.time() - 3 * 86400) * 1000)), agent_id="alice", session_id=None,
        body={"format": "markdown", "content": "old auth note from last week"},
        recipients=["bob"], audiences=[{"type": "agent", "value": "bob"}], scopes=[], refs=[])
    old["timestamp"] = thrum.now_ts(thrum.time.time() - 3 * 86400)
    (team.log / "messages").mkdir(exist_ok=True)
    with open(team.log / "messages" / "alice.jsonl", "ab") as f:
        f.write(thrum.encode_event(old))
    ids["old"] = old["message_id"]
    send("g3", "alice", "gateway gateway gateway", to=["bob"])
    send("m1", "alice", "We decided auth goes through the gateway; the rate limit is 10 "
         "requests per second.", to=["bob"], refs=["bd:bd-7"])
    send("m2", "alice", "Reviewers: the Authentication tokens rotate daily", to=["reviewer"])
    send("m3", "alice", "Backend: auth cache lives in redis", to=["backend"])
    send("m4", "carol", "Lunch at noon. AUTH-token rotation tomorrow", broadcast=True)
    send("m5", "bob", "Gateway auth decided? I think the limit should be per client",
         to=["alice"])
    send("m6", "carol", "a private auth note, carol to alice", to=["alice"])
    send("m7", "alice", "Straße café naïve: ÉCOLE «quoted»", to=["carol"])
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    team = make_team(tmp_path_factory.mktemp("search"))
    team.ids = seed(team)
    return team


def found(doc) -> list:
    return [m["message_id"] for m in doc["messages"]]


def search(team, who, *args, backend="fts") -> dict:
    r = team.t("search", *args, "--json", name=who, extra_env=BACKENDS[backend])
    assert r.code == 0, r.describe()
    return r.json


def names(team, ids) -> list:
    """Message ids -> the seed's short names (for readable failures)."""
    back = {v: k for k, v in team.ids.items()}
    return [back.get(i, i) for i in ids]


#: (who, query, what it finds, newest first), for the CLI test and the backends' one.
CASES = [
        # (who, query, expected newest first): visibility
        ("alice", "auth", ["m6", "m5", "m4", "m3", "m1", "old"]),
        ("bob", "auth", ["m5", "m4", "m3", "m1", "old"]),    # group, broadcast, to/from him
        ("carol", "auth", ["m6", "m4"]),                     # never alice->bob or ->backend
        ("carol", "auth*", ["m6", "m4", "m2"]),              # her role's message
        # case, order of words, phrases, prefixes, no stemming
        ("bob", "AUTH", ["m5", "m4", "m3", "m1", "old"]),
        ("bob", "limit rate", ["m1"]),
        ("bob", "decided gateway", ["m5", "m1"]),
        ("bob", '"rate limit"', ["m1"]),
        ("bob", '"limit rate"', []),
        ("bob", '"auth goes" gateway', ["m1"]),
        ("bob", "decide", []),
        ("bob", "decide*", ["m5", "m1"]),
        ("bob", '"the gate"*', ["m1"]),
        ("bob", "auth-token", ["m4"]),                        # a phrase of its words
        ("carol", "rot*", ["m4", "m2"]),
        # beyond ASCII: folded case, no accent removal
        ("carol", "strasse ÉCOLE", ["m7"]),
        ("carol", "café", ["m7"]),
        ("carol", "cafe", []),
        ("carol", "quoted", ["m7"]),
]


def test_finds_only_what_the_caller_can_see_with_the_query_language(store):
    got = [(who, q, names(store, found(search(store, who, q)))) for who, q, _ in CASES]
    assert got == [(who, q, want) for who, q, want in CASES]


def test_filters_limit_and_rank(store):
    s = store

    def ids(*args, who="alice"):
        return names(s, found(search(s, who, *args)))
    assert ids("auth", "--from", "@bob") == ["m5"]
    assert ids("auth", "--to", "bob") == ["m4", "m3", "m1", "old"]
    assert ids("auth*", "--to", "reviewer") == ["m2"]
    assert ids("auth", "--to", "backend") == ["m3"]
    assert ids("auth", "--ref", "bd:bd-7") == ["m1"]
    assert ids("auth", "--since", "2d") == ["m6", "m5", "m4", "m3", "m1"]
    assert ids("auth", "--since", "2020-01-01") == ids("auth")
    assert ids("auth", "--since", "2999-01-01T00:00:00Z") == []
    doc = search(s, "alice", "auth", "--limit", "2")
    assert names(s, found(doc)) == ["m6", "m5"] and doc["total"] == 6
    assert doc["capped"] is False and doc["limit"] == 2
    # newest first by default; --rank puts the densest match first (bm25)
    assert ids("gateway", who="bob") == ["m5", "m1", "g3"]
    assert ids("gateway", "--rank", who="bob") == ["g3", "m5", "m1"]


def same_answers(team, queries, whos=("alice", "bob", "carol"), extras=({},)):
    """FTS5 and the scan (THRUM_FTS=0) give the same documents, through the service in
    process (the CLI tests above use the default backend)."""
    for who in whos:
        for q in queries:
            for extra in extras:
                docs = [api("search", dict(query=q, **extra), team.path,
                            dict(team.env, **env), name=who) for env in BACKENDS.values()]
                assert docs[0] == docs[1], (who, q, extra)


@NEEDS_FTS5
def test_both_backends_give_the_same_json(store):
    """Order, totals, snippets and ranks, for every query above and more, with filters."""
    queries = sorted({q for _, q, _ in CASES}) + [
        "a*", "gate* decided", "the", "per", "rot* daily", "x y z", "gateway", "limit",
        '"gateway gateway"', "é*", "10"]
    same_answers(store, queries, extras=({}, {"rank": True}, {"limit": 1},
                                         {"sender": "alice", "since": "1d"},
                                         {"to": "bob", "rank": True}, {"ref": "bd:bd-7"}))


def test_snippets_and_the_human_view(store):
    doc = search(store, "bob", '"rate limit" auth')
    m = doc["messages"][0]
    assert m["snippet"] == ("We decided «auth» goes through the gateway; the «rate limit» "
                            "is 10 requests per second.")
    for key in ("message_id", "agent_id", "recipients", "audiences", "body", "refs",
                "created_at", "is_read", "short_id", "thread_id", "deleted"):
        assert key in m
    assert m["is_read"] is False and doc["query"] == '"rate limit" auth'
    assert search(store, "carol", "quoted")["messages"][0]["snippet"] == \
        "Straße café naïve: ÉCOLE ‹«quoted»›"
    out = store.t.ok("search", "auth", name="bob").out.splitlines()
    assert out[0].startswith("○ msg_") and "  @bob  " in out[0]  # his own: read
    assert out[0].endswith("Gateway [auth] decided? I think the limit should be per client")
    assert out[-1] == "5 matches, newest first"
    assert store.t.ok("search", "auth", "--limit", "1", name="bob").out.splitlines()[-1] == \
        "1 of 5 matches, newest first (--limit N for more)"
    none = store.t.ok("search", "nothing-like-this", name="bob")
    assert none.out == "No messages match nothing-like-this.\n"
    assert search(store, "bob", "zebra") == {"messages": [], "total": 0, "capped": False,
                                             "query": "zebra", "rank": False, "limit": 20,
                                             "agent_id": "bob"}
    # search marks nothing read
    assert store.t.json("inbox", "--unread", name="bob")["unread"] == 6


@pytest.mark.parametrize("args,fragment", [
    (["   "], "must not be empty"), (["..."], "no words"), (['" * "'], "no words"),
    (["auth", "--since", "yesterday"], "--since"), (["auth", "--limit", "0"], "limit"),
    (["auth", "--limit", "x"], "whole number"), (["auth", "--limit", "1001"], "limit"),
    (["auth", "--ref", "nocolon"], "ref")])
def test_bad_input_is_a_usage_error(store, args, fragment):
    store.t.fail(2, "search", *args, name="bob", fragments=[fragment])


def test_an_unknown_author_or_recipient_is_not_found(store):
    store.t.fail(4, "search", "auth", "--from", "ghost", name="bob", fragments=["ghost"])
    store.t.fail(4, "search", "auth", "--to", "ghost", name="bob", fragments=["ghost"])


def test_edits_deletes_and_duplicates(tmp_path):
    team = make_team(tmp_path)
    a = team.seed("alice", "first wording zebra", to=["bob"])["message_id"]
    b = team.seed("alice", "to be deleted giraffe zebra", to=["bob"])["message_id"]
    k = team.seed("alice", "keyed okapi", to=["bob"], idempotency_key="k1")["message_id"]
    team.t.ok("message", "edit", a, "second wording yak", name="alice")
    team.t.ok("message", "edit", a, "third wording yak yak", name="alice")
    team.t.ok("message", "delete", b, "--force", name="alice")
    # the same key from another clone, arriving by sync: a hidden duplicate
    dup = thrum.make_event("message.create", "o_OTHER", message_id="msg_" + thrum.ulid(),
                           agent_id="alice", session_id=None,
                           body={"format": "markdown", "content": "keyed okapi"},
                           recipients=["bob"], audiences=[{"type": "agent", "value": "bob"}],
                           scopes=[], refs=[], idempotency_key="k1")
    with open(team.log / "messages" / "alice.jsonl", "ab") as f:
        f.write(thrum.encode_event(dup))

    def ids(q, *args):
        return found(search(team, "bob", q, *args))
    assert ids("zebra") == [] and ids("giraffe") == [] and ids("second") == []
    assert ids("third") == [a] and ids("yak", "--rank") == [a]
    assert search(team, "bob", "yak")["messages"][0]["snippet"] == "third wording «yak yak»"
    assert ids("okapi") == [k]
    if thrum.fts5_available():  # the search index kept in step: ranks agree with the scan
        same_answers(team, ["wording", "yak", "okapi", "w*"], whos=("bob",),
                     extras=({"rank": True},))
    team.t.ok("rebuild")  # a rebuilt index answers the same
    assert ids("zebra") == [] and ids("third") == [a] and ids("okapi") == [k]


def test_with_a_daemon_the_answers_are_the_same(tmp_path, procs):
    team = make_team(tmp_path)
    team.ids = seed(team)
    queries = [("bob", ["auth"]), ("carol", ["auth*", "--rank"]), ("alice", ["gateway",
                                                                            "--from", "bob"])]
    direct = [search(team, who, *q) for who, q in queries]
    h = procs.daemon(team.path, team.env)
    m = team.seed("alice", "one more auth message", to=["bob"])["message_id"]
    assert [search(team, who, *q) for who, q in queries[1:]] == direct[1:]
    assert found(search(team, "bob", "auth"))[0] == m
    assert found(search(team, "bob", "auth", backend="scan"))[0] == m
    assert h.answers()


@NEEDS_FTS5
def test_an_index_built_without_fts5_is_searched_by_the_scan_and_rebuilt_with_it(
        tmp_path):
    """What another interpreter whose SQLite lacks FTS5 does with the store: it builds the
    index without the search table (and marks it so), searches by scan, and an FTS5
    interpreter rebuilds that index, never writing to a table it cannot keep up."""
    team = make_team(tmp_path)
    team.ids = seed(team)
    want = search(team, "bob", "auth")
    db_path = team.path / ".thrum" / "var" / "index.db"
    saved = list(thrum._FTS5)
    try:
        thrum._FTS5[:] = [False]   # this process now plays the interpreter without FTS5
        assert api("search", dict(query="auth"), team.path, team.env, name="bob") == want
        db = sqlite3.connect(db_path)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.close()
        assert "messages_fts" not in tables and version == thrum.SCHEMA_VERSION | 0x10000
        api("send", dict(content="auth while without fts", to=["bob"]), team.path,
            team.env, name="alice")
    finally:
        thrum._FTS5[:] = saved
    r = team.t("search", "auth", "--json", name="bob")
    assert r.code == 0 and "rebuilding" in r.err, r.describe()
    assert found(r.json)[1:] == found(want)


# --------------------------------------------------------------------------- MCP

def test_mcp_search_messages(store):
    params = StdioServerParameters(command=THRUM_CMD[0], args=[*THRUM_CMD[1:], "mcp", "serve"],
                                   cwd=str(store.path), env={**{
                                       k: store.env[k] for k in ("PATH", "HOME", "LC_ALL")
                                       if k in store.env}, "THRUM_NAME": "carol"})
    out = {}

    async def main():
        async with Client(params) as carol:
            tools = {t.name: t for t in (await carol.list_tools()).tools}
            out["schema"] = tools["search_messages"].input_schema
            out["hit"] = await carol.call_tool("search_messages", {"query": "auth"})
            out["from"] = await carol.call_tool("search_messages",
                                                {"query": "auth*", "from": "@alice",
                                                 "limit": 5})
            out["bad"] = await carol.call_tool("search_messages", {"query": "!!"})
            out["ghost"] = await carol.call_tool("search_messages",
                                                 {"query": "auth", "from": "ghost"})
    anyio.run(main)
    assert out["schema"]["required"] == ["query"]
    assert set(out["schema"]["properties"]) == {"query", "from", "limit"}
    hit = out["hit"]
    assert not hit.is_error
    assert names(store, found(hit.structured_content)) == ["m6", "m4"]  # never alice->bob
    text = "\n".join(c.text for c in hit.content if c.type == "text")
    assert "a private [auth] note, carol to alice" in text and "2 matches" in text
    assert names(store, found(out["from"].structured_content)) == ["m2"]
    assert out["bad"].is_error and "no words" in out["bad"].content[0].text
    assert out["ghost"].is_error and "ghost" in out["ghost"].content[0].text


def test_snippet_and_query_units():
    """The pieces both backends share, on their own."""
    q = thrum.SearchQuery('Auth "rate  limit"* x_y "unclosed phrase')
    assert q.terms == [(("auth",), False), (("rate", "limit"), True), (("x", "y"), False),
                       (("unclosed", "phrase"), False)]
    assert q.fts() == '"auth" "rate limit"* "x y" "unclosed phrase"'
    assert thrum.folded_words("Ünïcode STRASSE Straße x_y ½ cafe\u0301") == \
        ["ünïcode", "strasse", "strasse", "x", "y", "½", "café"]
    long = "word " * 40 + "needle " + "word " * 40
    snip = thrum.search_snippet(long, thrum.SearchQuery("needle"))
    assert snip.startswith("…word") and snip.endswith("word…") and "«needle»" in snip
    assert len(snip) <= thrum.SNIPPET_WIDTH + 2
    assert thrum.search_snippet("a\n\n b\tneedle", thrum.SearchQuery("needle")) == \
        "a b «needle»"
    with pytest.raises(thrum.UsageError):
        thrum.SearchQuery("«» -- ***")


@NEEDS_FTS5
def test_fts5_and_the_scan_agree_on_random_texts_to_the_last_bit():
    """The words the FTS5 table gets (_fts_words, ASCII text as it is) and the scan's
    words are the same, and bm25() in Python is SQLite's to the last bit, over random
    texts (ASCII punctuation, case, accents, marks, other scripts) with edits."""
    import random
    rnd = random.Random(20)
    vocab = ["auth", "Author", "authz", "token", "rate", "x_y", "a-b", "the", "É", "café",
             "cafe\u0301", "Straße", "STRASSE", "日本語", "½", "v1.2", "don't", "«q»", "\u0301a",
             "ß", "\x00", "A.B", "__", "ǰ"]

    def text():
        return " ".join(rnd.choice(vocab) for _ in range(rnd.randint(0, 25)))
    docs = {i: text() for i in range(1, 301)}
    db = sqlite3.connect(":memory:")
    db.execute(thrum._FTS_SCHEMA)
    for i, d in docs.items():
        db.execute("INSERT INTO messages_fts(rowid, words) VALUES (?,?)", (i,
                                                                           thrum._fts_words(d)))
    for i in rnd.sample(sorted(docs), 60):  # edits, as _fts_change makes them
        new = text()
        db.execute("INSERT INTO messages_fts(messages_fts, rowid, words) VALUES ('delete', "
                   "?, ?)", (i, thrum._fts_words(docs[i])))
        db.execute("INSERT INTO messages_fts(rowid, words) VALUES (?,?)",
                   (i, thrum._fts_words(new)))
        docs[i] = new
    words = {i: thrum.folded_words(d) for i, d in docs.items()}
    avgdl = float(sum(map(len, words.values()))) / float(len(docs))
    for _ in range(200):
        parts = []
        for _ in range(rnd.randint(1, 3)):
            w, k = rnd.choice(vocab), rnd.random()
            parts.append(w[:max(1, len(w) // 2)] + "*" if k < 0.3 else
                         '"%s %s"' % (w, rnd.choice(vocab)) if k < 0.6 else w)
        try:
            q = thrum.SearchQuery(" ".join(parts))
        except thrum.UsageError:
            continue
        fts = dict(db.execute("SELECT rowid, bm25(messages_fts) FROM messages_fts WHERE "
                              "messages_fts MATCH ?", (q.fts(),)))
        idfs = [thrum.bm25_idf(len(docs), sum(1 for w in words.values()
                                               if q.positions(w, t, p))) for t, p in q.terms]
        scan = {i: thrum.bm25([float(len(h)) for h in hits], len(w), idfs, avgdl)
                for i, w in words.items() for hits in [q.hits(w)] if hits is not None}
        assert fts == scan, q.text


@NEEDS_FTS5
def test_every_fts5_strategy_answers_like_the_scan(tmp_path, monkeypatch):
    """FTS5 finds the newest matches three ways, by how many there are: each looked up
    (few), a walk of the newest messages asking the index batch by batch (many: a good
    share of all), or a walk against all the matches (the rest, and when a batch's rowids
    are scattered). The thresholds are lowered here so that a small store takes every
    way, including the count's cap; each answers like the scan."""
    team = make_team(tmp_path)
    monkeypatch.setattr(thrum, "SEARCH_DIRECT_MAX", 20)
    monkeypatch.setattr(thrum, "SEARCH_COUNT_MAX", 50)
    monkeypatch.setattr(thrum.Index, "WALK_GAP", 8)  # each author's rowids: a range
    t0 = thrum.time.time() - 3600
    to = [(["bob"], [{"type": "agent", "value": "bob"}]),
          (["bob", "carol"], [{"type": "role", "value": "reviewer"}]),
          (["carol"], [{"type": "agent", "value": "carol"}])]
    files = {}
    for i in range(600):
        author = ("alice", "bob", "carol")[i % 3]
        recips, auds = to[i % 3]
        recips = [r for r in recips if r != author] or ["alice"]
        words = ["note", str(i), "common"] + ["medium"] * (i % 17 == 0) + \
            ["rare"] * (i % 150 == 0) + ["prefixed%d" % (i % 7)]
        ts = t0 + (i - i % 2) * 0.5  # pairs share a timestamp: ties go by message id
        ev = thrum.make_event("message.create", "o_TEST", message_id="msg_" + thrum._UlidGen()(
            int(ts * 1000)), agent_id=author, session_id=None,
            body={"format": "markdown", "content": " ".join(words)}, recipients=recips,
            audiences=auds, scopes=[], refs=[])
        ev["timestamp"] = thrum.now_ts(ts)
        files.setdefault(author, []).append(thrum.encode_event(ev))
    (team.log / "messages").mkdir(exist_ok=True)
    for author, lines in files.items():
        with open(team.log / "messages" / f"{author}.jsonl", "ab") as f:
            f.write(b"".join(lines))
    same_answers(team, ["common", "note", "medium", "rare", "prefixed3", "prefix*",
                        '"note 3"*', "common medium"], whos=("bob", "carol"),
                 extras=({}, {"limit": 7}))
    monkeypatch.setattr(thrum.Index, "WALK_ROWS", 10)  # the walk gives up: the other way
    same_answers(team, ["prefixed3", "note"], whos=("bob",))
