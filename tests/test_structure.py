"""The shape of thrum.py that docs/architecture.md §1 promises: numbered sections in
dependency order (no top-level function or class uses a name defined in a later section),
a section table in the docs that matches the banners, bounded classes and sections, and
SQL only in the index sections."""

import ast
import re
from pathlib import Path

from conftest import REPO_ROOT

SOURCE = (REPO_ROOT / "thrum.py").read_text(encoding="utf-8")
BANNER = re.compile(r"^# === (\d+)\. (.+?) =+$")

#: The limits the architecture note sets for a file one maintainer can read.
MAX_CLASS_LINES = 700
MAX_SECTION_LINES = 1200


def banners():
    """[(line number, section number, title)] from `grep -n '^# ==='`."""
    out = []
    for i, line in enumerate(SOURCE.splitlines(), 1):
        if line.startswith("# ==="):
            m = BANNER.match(line)
            assert m, f"line {i} is a banner that does not read '# === N. Title ===': {line}"
            out.append((i, int(m.group(1)), m.group(2)))
    return out


def section_of(lineno, table):
    current = 0
    for line, num, _ in table:
        if lineno > line:
            current = num
    return current


def top_level_names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    return []


def local_names(node):
    """Names a definition binds itself (arguments, assignments, imports, nested defs)."""
    out = set()
    for x in ast.walk(node):
        if isinstance(x, ast.arg):
            out.add(x.arg)
        elif isinstance(x, ast.Name) and isinstance(x.ctx, (ast.Store, ast.Del)) and \
                not isinstance(node, (ast.Assign, ast.AnnAssign)):
            out.add(x.id)
        elif isinstance(x, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in x.names)
        elif isinstance(x, (ast.FunctionDef, ast.ClassDef)) and x is not node:
            out.add(x.name)
    return out


def test_sections_are_numbered_in_order_without_gaps():
    nums = [num for _, num, _ in banners()]
    assert nums == list(range(1, len(nums) + 1)), nums


def test_no_name_is_used_above_the_section_that_defines_it():
    table = banners()
    tree = ast.parse(SOURCE)
    defined = {}
    for node in tree.body:
        for name in top_level_names(node):
            defined.setdefault(name, section_of(node.lineno, table))
    backwards = []
    for node in tree.body:
        here, own = section_of(node.lineno, table), local_names(node)
        for x in ast.walk(node):
            if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load) and x.id not in own:
                there = defined.get(x.id)
                if there is not None and there > here:
                    backwards.append(f"line {x.lineno}: section {here} uses {x.id} "
                                     f"(section {there})")
    assert not backwards, "\n".join(backwards)


def test_the_checker_sees_a_forward_reference():
    # The walk above must be able to fail: a function that calls a later section's name.
    src = "# === 1. A ===\ndef f():\n    return g()\n\n# === 2. B ===\ndef g():\n    return 1\n"
    tree, table = ast.parse(src), [(1, 1, "A"), (5, 2, "B")]
    node = tree.body[0]
    used = {x.id for x in ast.walk(node) if isinstance(x, ast.Name)} - local_names(node)
    assert "g" in used and section_of(tree.body[1].lineno, table) > section_of(node.lineno,
                                                                                 table)


def test_architecture_section_table_matches_the_banners():
    doc = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+)\. ([^|]+?) \|", doc, re.M)
    assert [(int(n), t) for n, t in rows] == [(num, title) for _, num, title in banners()]


def test_no_class_or_section_is_too_long():
    tree = ast.parse(SOURCE)
    long_classes = [(n.name, n.end_lineno - n.lineno + 1) for n in tree.body
                    if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 >
                    MAX_CLASS_LINES]
    assert not long_classes, long_classes
    table = banners()
    ends = [line for line, _, _ in table[1:]] + [len(SOURCE.splitlines()) + 1]
    long_sections = [(num, title, end - line) for (line, num, title), end in zip(table, ends)
                     if end - line > MAX_SECTION_LINES]
    assert not long_sections, long_sections


def test_sql_lives_with_the_index():
    """Queries are named methods of the index (sections 6-7), so rows are read by name
    next to the schema that gives them meaning."""
    table = banners()
    index_sections = {num for _, num, title in table if title.startswith("Index")}
    assert index_sections, "no index sections"
    sql = re.compile(r"\b(SELECT|INSERT INTO|DELETE FROM|UPDATE \w+ SET)\b")
    elsewhere = []
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                sql.search(node.value) and \
                section_of(node.lineno, table) not in index_sections:
            elsewhere.append(f"line {node.lineno}: {node.value[:60]!r}")
    assert not elsewhere, "\n".join(elsewhere)
