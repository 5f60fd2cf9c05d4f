"""Every commit the docs, the notes and the result rows name can be found: it is in HEAD's history, or
``benchmarks/results/COMMITS.md`` says what it was and where its change is on main.

A figure is traced to its code through the commit its row names; twelve hashes in the docs had
stopped resolving after a rebase before this test existed."""

from __future__ import annotations

import bisect
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterable, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITS_MD = ROOT / "benchmarks" / "results" / "COMMITS.md"
PROSE = ["README.md", "docs/*.md", "csrc/README.md", "benchmarks/quality/*.md", "benchmarks/results/*.md",
         "benchmarks/results/gpu/*/*.md"]
ROWS = ["benchmarks/results/**/*.json", "benchmarks/results/**/*.jsonl",
        "benchmarks/quality/results/**/*.json", "benchmarks/quality/results/**/*.jsonl"]
# A hash in prose: 7-12 hex digits with a letter and a digit, not inside a longer word or number.
PROSE_HASH = re.compile(r"(?<![\w.+-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,12}(?![\w])")
ROW_HASH = re.compile(r'"(?:git_)?commit": "([0-9a-f]{7,40})(?:\+dirty)?"')
LISTED = re.compile(r"^\| ([^|]*`[0-9a-f]{7,40}`[^|]*) \|.*\| (?:`([0-9a-f]{7,40})`|none)[^|]*\|$")


def _git(*args: str, stdin: str = "") -> str:
    return subprocess.run(["git", *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=60).stdout


def _history_or_skip() -> None:
    if not (ROOT / ".git").exists() or _git("rev-parse", "--is-shallow-repository").strip() != "false":
        pytest.skip("needs this checkout's full git history (not a git clone, or a shallow one)")


def _unresolved(hashes: Iterable[str]) -> Set[str]:
    """The hashes that name no commit of HEAD's history (a commit a rebase dropped may still be in this
    checkout's object store, and resolve there, not in a fresh clone)."""
    history = sorted(_git("rev-list", "HEAD").split())
    assert history

    def on_main(short: str) -> bool:
        i = bisect.bisect_left(history, short)
        return i < len(history) and history[i].startswith(short)

    return {h for h in set(hashes) if not on_main(h)}


def _named(patterns, regex) -> Dict[str, Set[str]]:
    where: Dict[str, Set[str]] = {}
    for pattern in patterns:
        for path in ROOT.glob(pattern):
            if path == COMMITS_MD:
                continue
            for match in regex.finditer(path.read_text(errors="replace")):
                where.setdefault(match.group(1) if regex.groups else match.group(0), set()).add(
                    str(path.relative_to(ROOT)))
    return where


def _listed() -> Dict[str, str]:
    """COMMITS.md's first table: each named hash and the commit on main that holds its change ('' for none)."""
    listed = {}
    text = COMMITS_MD.read_text()
    table = text[text.index("## Not on main"):]
    table = table[:table.find("\n## ", 1)] if "\n## " in table[1:] else table
    for line in table.splitlines():
        match = LISTED.match(line)
        if match:
            for named in re.findall(r"`([0-9a-f]+)`", match.group(1)):
                listed[named] = match.group(2) or ""
    return listed


def test_every_named_commit_resolves_or_is_listed():
    _history_or_skip()
    named = _named(PROSE, PROSE_HASH)
    for commit, paths in _named(ROWS, ROW_HASH).items():
        named.setdefault(commit, set()).update(paths)
    assert len(named) > 100  # the scan found the docs' and rows' commits at all
    listed = _listed()
    missing = {h: sorted(named[h]) for h in _unresolved(named) - set(listed)}
    assert not missing, f"commits not in HEAD's history that benchmarks/results/COMMITS.md does not list: {missing}"


def test_the_listed_commits_are_named_gone_and_their_changes_on_main():
    _history_or_skip()
    listed = _listed()
    assert len(listed) >= 10  # the table was read at all
    resolvable = set(listed) - _unresolved(listed)
    assert not resolvable, f"COMMITS.md lists commits of HEAD's history (cite them directly): {sorted(resolvable)}"
    unnamed = set(listed) - set(_named(PROSE, PROSE_HASH)) - set(_named(ROWS, ROW_HASH))
    assert not unnamed, f"COMMITS.md lists commits nothing names any more: {sorted(unnamed)}"
    replacements = {r for r in listed.values() if r}
    assert not _unresolved(replacements), f"COMMITS.md names as on main commits HEAD does not contain: " \
                                          f"{sorted(_unresolved(replacements))}"


def test_the_scan_finds_a_hash_in_prose_and_not_a_number():
    text = "measured at 3ca1910, committed in 99d7d2c; -9.25754489909276e-06, 0x7fc00000u, 1234567, deadbeefs"
    assert [m.group(0) for m in PROSE_HASH.finditer(text)] == ["3ca1910", "99d7d2c"]
