"""The documentation holds together: every citation of a design section names a heading of
docs/design.md, nothing points at notes outside the repository, and relative markdown links lead
to files that exist."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
CITED_SUFFIXES = (".py", ".md", ".ipynb", ".sh")
# A citation: the design file's path, then a section number or a range of them ("§5.1-5.3").
SECTION = r"§(\d+(?:\.\d+)*)(?:-(\d+(?:\.\d+)*))?"
CITATION = re.compile(r"docs/design\.md " + SECTION)
HEADING = re.compile(r"^#{1,6} §(\d+(?:\.\d+)*) ", re.M)
# Spelled in pieces, so that this file does not mention them itself.
FORBIDDEN = ("DESIGN" + ".md", ".." + "/shared")
LINKED_DOCS = ("README.md", "BENCHMARKS.md", "launch/README.md")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCED = re.compile(r"^```.*?^```", re.S | re.M)


def repo_files() -> list[pathlib.Path]:
    """Tracked files, plus new ones git does not ignore (a file added but not yet committed)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return sorted({REPO / p for p in out.split("\0") if p and (REPO / p).is_file()})


def read_text(path: pathlib.Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # images and other binary files
        return None


def sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def test_design_headings_are_unique_and_numbered():
    found = HEADING.findall(DESIGN.read_text(encoding="utf-8"))
    assert found, f"{DESIGN}: no '§N' headings"
    assert len(found) == len(set(found)), f"{DESIGN}: repeated section numbers"
    for number in found:  # §1.2 needs §1 above it
        parent = number.rpartition(".")[0]
        assert not parent or parent in found, f"{DESIGN}: §{number} has no §{parent}"


def test_every_design_citation_names_a_section():
    known = sections()
    bad, cited = [], 0
    for path in repo_files():
        if path.suffix not in CITED_SUFFIXES or (text := read_text(path)) is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for m in CITATION.finditer(line):
                cited += 1
                bad += [f"{path.relative_to(REPO)}:{n}: §{s}" for s in m.groups()
                        if s and s not in known]
    assert cited, "no file cites docs/design.md"
    assert not bad, "citations of sections docs/design.md does not have:\n" + "\n".join(bad)


def test_design_cross_references_name_sections():
    known = sections()
    text = DESIGN.read_text(encoding="utf-8")
    bad = [f"§{s}" for m in re.finditer(SECTION, text) for s in m.groups()
           if s and s not in known]
    assert not bad, f"{DESIGN}: references to missing sections: {bad}"


def test_nothing_points_outside_the_repository():
    bad = []
    for path in repo_files():
        if (text := read_text(path)) is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            bad += [f"{path.relative_to(REPO)}:{n}: {word}" for word in FORBIDDEN if word in line]
    assert not bad, "mentions of notes outside the repository:\n" + "\n".join(bad)


def linked_docs() -> list[pathlib.Path]:
    return [REPO / d for d in LINKED_DOCS] + sorted((REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", linked_docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(doc):
    text = FENCED.sub("", doc.read_text(encoding="utf-8"))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor in the same file
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            bad.append(target)
    assert not bad, f"{doc.relative_to(REPO)}: links to missing files: {bad}"
