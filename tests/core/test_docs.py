"""The repository stands alone: no file points outside it, and every relative link resolves.

The files checked for references are those git tracks or would track (`git ls-files
--cached --others --exclude-standard`), so a new file counts before it is committed and
ignored ones (virtual environments, build output) never do. The test fixtures are left out.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path("tests", "fixtures")

# Documents kept beside the repository rather than in it. The pattern is written so
# that this file does not match it.
OUTSIDE_REFERENCE = re.compile(rb"\.\./shared|\b(?:DESIGN|STYLE)\.md\b")

FENCED_CODE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def repository_files() -> list[Path]:
    """Files git tracks or would track, relative to the repository, fixtures left out."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files to check are the ones git tracks")
    names = (Path(name) for name in listed.decode().split("\0") if name)
    return [name for name in names if (REPO / name).is_file() and name.parts[:2] != FIXTURES.parts]


def references_outside(root: Path, files: list[Path]) -> list[str]:
    """`file:line: text` for every line that points at a document outside the repository."""
    found = []
    for name in files:
        for number, line in enumerate((root / name).read_bytes().splitlines(), start=1):
            if OUTSIDE_REFERENCE.search(line):
                text = line.decode(errors="replace").strip()
                found.append(f"{name}:{number}: {text}")
    return found


def heading_anchors(markdown: str) -> set[str]:
    """The anchors a Markdown renderer gives the headings (GitHub's rule, repeats numbered)."""
    anchors = set()
    seen: Counter[str] = Counter()
    for heading in HEADING.findall(FENCED_CODE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def broken_links(root: Path, pages: list[Path]) -> list[str]:
    """`page: target: why` for every relative link that leaves `root` or names nothing there."""
    broken = []
    for page in pages:
        text = (root / page).read_text()
        prose = INLINE_CODE.sub("", FENCED_CODE.sub("", text))
        targets = INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)
        for target in targets:
            if URL_SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            resolved = ((root / page).parent / path).resolve() if path else root / page
            if not resolved.is_relative_to(root.resolve()):
                broken.append(f"{page}: {target}: outside the repository")
            elif not resolved.exists():
                broken.append(f"{page}: {target}: no such file")
            elif (
                anchor
                and resolved.suffix == ".md"
                and anchor not in heading_anchors(resolved.read_text())
            ):
                broken.append(f"{page}: {target}: no such heading")
    return broken


def test_no_file_points_outside_the_repository() -> None:
    assert references_outside(REPO, repository_files()) == []


def test_every_relative_link_in_the_docs_resolves() -> None:
    pages = [Path("README.md"), *sorted(p.relative_to(REPO) for p in (REPO / "docs").rglob("*.md"))]
    assert broken_links(REPO, pages) == []


def test_link_check_finds_missing_files_headings_and_paths_outside(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs" / "adr").mkdir(parents=True)
    (tmp_path / "elsewhere.md").write_text("# Elsewhere\n")
    (root / "docs" / "adr" / "0001-x.md").write_text("# ADR 0001: x\n## Why it holds\n")
    (root / "docs" / "page.md").write_text(
        "# Page\n"
        "[fine](adr/0001-x.md#why-it-holds) [self](#page) [web](https://example.com/a.md)\n"
        "[gone](adr/0002-y.md) [anchor](adr/0001-x.md#why-not) [out](../../elsewhere.md)\n"
        "`[code](not-checked.md)`\n"
        "```\n[fenced](not-checked-either.md)\n```\n"
        "[ref]: missing.md\n"
    )
    assert broken_links(root, [Path("docs/page.md")]) == [
        "docs/page.md: adr/0002-y.md: no such file",
        "docs/page.md: adr/0001-x.md#why-not: no such heading",
        "docs/page.md: ../../elsewhere.md: outside the repository",
        "docs/page.md: missing.md: no such file",
    ]


def test_heading_anchors_follow_the_renderers_rule() -> None:
    markdown = (
        "# Device identity: how it is enforced and why\n"
        "## `state.json`\n"
        "## Notes\n"
        "## Notes\n"
        "```\n# a comment in code\n```\n"
    )
    assert heading_anchors(markdown) == {
        "device-identity-how-it-is-enforced-and-why",
        "statejson",
        "notes",
        "notes-1",
    }


def test_reference_check_finds_pointers_outside(tmp_path: Path) -> None:
    # Built from pieces, so that this file does not point outside itself.
    beside, style = "../" + "shared/notes.md", "STYLE" + ".md"
    (tmp_path / "a.py").write_text(f"x = 1\n# see {beside}\n")
    (tmp_path / "b.md").write_text(f"See [design](docs/design.md).\nAs {style} says.\n")
    assert references_outside(tmp_path, [Path("a.py"), Path("b.md")]) == [
        f"a.py:2: # see {beside}",
        f"b.md:2: As {style} says.",
    ]
