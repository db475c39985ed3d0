"""The repository documents itself: cited ``docs/`` pages exist, links resolve, the Markdown renders.

* every ``docs/<page>.md`` path named anywhere in the repository (code, tests, configs, docs) is a file;
* every relative link of ``README.md`` and ``docs/**/*.md`` points at a file or folder of the repository, and a
  ``#fragment`` into a Markdown page names one of its headings (GitHub's heading anchors);
* every page under ``docs/`` is linked from ``docs/index.md``;
* no file cites notes that live outside the repository (the documentation is ``docs/``, nothing else);
* code fences are closed and tables are contiguous (a blank line inside a table splits it when rendered).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_SKIP_DIRS = {".git", ".venv", "runs", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini", ".sh", ".json", ".ui", ".cmake"}
_TEXT_NAMES = {"Makefile", "run", "CMakeLists.txt"}
_MAX_BYTES = 2_000_000

# Notes kept outside the repository; code and docs must point at docs/ instead. Spelled in parts so that this
# file does not cite them itself.
_OUTSIDE_NOTES = ("MODELS", "ENVIRONMENT", "DESIGN", "STYLE", "MODALITIES", "SLICER")
_OUTSIDE_RE = re.compile(r"\b(" + "|".join(_OUTSIDE_NOTES) + r")\.md\b")
_OUTSIDE_FOLDER = "/work/" + "shared"

_DOCS_PATH_RE = re.compile(r"(?<![\w.-])docs/[\w./-]*?[\w-]\.md\b")
_FENCE_RE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_INLINE_CODE_RE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK_RE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING_RE = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_TABLE_ROW_RE = re.compile(r"^\s*\|.*\|\s*$")
_DELIMITER_RE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _is_text(path: Path) -> bool:
    return (path.suffix in _TEXT_SUFFIXES or path.name in _TEXT_NAMES or path.name.startswith("Dockerfile")) and (
        path.stat().st_size <= _MAX_BYTES
    )


def repository_files() -> list[Path]:
    """Text files of the repository: git's view (tracked and not ignored) when available, else a walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        paths = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        paths = [
            p
            for p in ROOT.rglob("*")
            if not any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
        ]
    return sorted(p for p in paths if p.is_file() and _is_text(p))


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose_lines(text: str, *, blank_code: bool = True) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, with inline code spans blanked out (``blank_code``)."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE_RE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        lines.append((number, _INLINE_CODE_RE.sub("``", line) if blank_code else line))
    return lines


def unclosed_fence(text: str) -> int | None:
    """Line number of a code fence that is never closed, or None."""
    fence, opened = None, 0
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE_RE.match(line)
        if not match:
            continue
        if fence is None:
            fence, opened = match.group(1), number
        elif match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) and not line.strip()[len(fence) :]:
            fence = None
    return opened if fence is not None else None


def split_tables(text: str) -> list[int]:
    """Line numbers of table rows that start a table without a header delimiter (e.g. after a blank line)."""
    lines = prose_lines(text)
    bad = []
    for i, (number, line) in enumerate(lines):
        if not _TABLE_ROW_RE.match(line) or _DELIMITER_RE.match(line):
            continue
        previous_is_row = i > 0 and lines[i - 1][0] == number - 1 and _TABLE_ROW_RE.match(lines[i - 1][1])
        if previous_is_row:
            continue
        following = lines[i + 1][1] if i + 1 < len(lines) and lines[i + 1][0] == number + 1 else ""
        if not _DELIMITER_RE.match(following):
            bad.append(number)
    return bad


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of a Markdown page (duplicates get ``-1``, ``-2``, ...)."""
    anchors: set[str] = set()
    seen: Counter[str] = Counter()
    for _, line in prose_lines(text, blank_code=False):
        match = _HEADING_RE.match(line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link in a heading keeps its text
        title = title.replace("`", "")  # code in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchors.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return anchors


def link_targets(text: str) -> list[tuple[int, str]]:
    """``(line number, target)`` of the inline and reference links of a Markdown text, outside code."""
    found = []
    for number, line in prose_lines(text):
        found += [(number, m.group(1)) for m in _LINK_RE.finditer(line)]
        ref = _REF_LINK_RE.match(line)
        if ref:
            found.append((number, ref.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """Relative links of the Markdown file ``path`` that do not resolve inside the repository."""
    problems = []
    for number, target in link_targets(path.read_text(encoding="utf-8")):
        if _SCHEME_RE.match(target) or target.startswith("//"):
            continue  # an absolute URL: not checked (no network in the tests)
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{_rel(path)}:{number}: {target}"
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{where} (points outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif (
            fragment
            and resolved.suffix == ".md"
            and fragment not in heading_anchors(resolved.read_text(encoding="utf-8"))
        ):
            problems.append(f"{where} (no heading with anchor #{fragment} in {_rel(resolved)})")
    return problems


# ------------------------------------------------------------------------------------------------------ tests


def test_docs_pages_exist() -> None:
    expected = {"index.md", "architecture.md", "server.md", "environment.md"}
    assert expected <= {p.name for p in DOCS.glob("*.md")}, (
        f"docs/ lacks {expected - {p.name for p in DOCS.glob('*.md')}}"
    )


def test_cited_docs_paths_exist() -> None:
    missing = []
    for path in repository_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for match in _DOCS_PATH_RE.finditer(line):
                if not (ROOT / match.group(0)).is_file():
                    missing.append(f"{_rel(path)}:{number}: {match.group(0)}")
    assert not missing, "cited documentation pages that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", markdown_files(), ids=_rel)
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_index() -> None:
    index = DOCS / "index.md"
    linked = {
        (DOCS / target.partition("#")[0]).resolve()
        for _, target in link_targets(index.read_text(encoding="utf-8"))
        if not _SCHEME_RE.match(target) and target.partition("#")[0]
    }
    orphans = [_rel(p) for p in sorted(DOCS.rglob("*.md")) if p != index and p.resolve() not in linked]
    assert not orphans, f"pages not linked from docs/index.md: {orphans}"


def test_nothing_cites_notes_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    citations = []
    for path in repository_files():
        if path.resolve() == this:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if _OUTSIDE_RE.search(line) or _OUTSIDE_FOLDER in line:
                citations.append(f"{_rel(path)}:{number}: {line.strip()[:100]}")
    assert not citations, "cite the matching docs/ page instead:\n" + "\n".join(citations)


@pytest.mark.parametrize("path", markdown_files(), ids=_rel)
def test_markdown_renders(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    opened = unclosed_fence(text)
    assert opened is None, f"{_rel(path)}:{opened}: code fence never closed"
    rows = split_tables(text)
    assert not rows, f"{_rel(path)}: table rows without a header (a table split by a blank line?) at lines {rows}"


# ------------------------------------------------------------------------------ the checks themselves can fail


def test_checks_catch_broken_markdown() -> None:
    split = "| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n"
    assert split_tables(split) == [5]
    assert split_tables("| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n") == []
    assert unclosed_fence("text\n```bash\nmake test\n") == 2
    assert unclosed_fence("```bash\nmake test\n```\n") is None
    assert link_targets("see [a](x.md#top), `[b](code.md)` and\n```\n[c](fenced.md)\n```\n") == [(1, "x.md#top")]
    assert heading_anchors("# Architecture and contracts\n## The `server/`\n## The server/\n") == {
        "architecture-and-contracts",
        "the-server",
        "the-server-1",
    }
    assert _OUTSIDE_RE.search("see " + _OUTSIDE_NOTES[1] + ".md, section 2")
    assert not _OUTSIDE_RE.search("see docs/environment.md")
    assert _DOCS_PATH_RE.findall("(``docs/server.md``), docs/index.md.") == [
        "docs/server.md",
        "docs/index.md",
    ]
