"""The docs cite only what the repository holds: section citations and relative links resolve."""

from __future__ import annotations

import os
import re
from pathlib import Path

from helpers import ROOT

TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".sh", ".toml", ".txt", ".cfg", ".ini"}
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache"}
# the fixtures' own READMEs describe how the fixtures were made, in the terms of their makers
FIXTURES = ROOT / "tests" / "data"
CITATION = re.compile(r"\bdocs/([\w-]+\.md)#([\w-]+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def text_files() -> list[Path]:
    """Every text file of the checkout; symlinked folders (configs/, examples/) are read once, where they live."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = [
            d
            for d in dirs
            if d not in SKIPPED_DIRS
            and not d.endswith(".egg-info")
            and here / d != FIXTURES
            and not (here / d).is_symlink()
        ]
        found += [here / name for name in files if Path(name).suffix in TEXT_SUFFIXES]
    return found


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_no_citation_of_a_file_outside_the_repository():
    """The algorithm is docs/algorithm.md; a "SPEC" citation names a file no reader has."""
    here = Path(__file__).resolve()
    citing = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in text_files()
        if path != here
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if re.search(r"\bSPEC\b", line)
    ]
    assert not citing, f"cite docs/algorithm.md#<section> instead of SPEC: {citing}"


def test_every_section_citation_resolves():
    cited = [
        (path, page, anchor)
        for path in text_files()
        for page, anchor in CITATION.findall(path.read_text(errors="replace"))
    ]
    assert len(cited) > 40  # code, configs and tests cite the algorithm's sections
    broken = sorted(
        {
            f"{path.relative_to(ROOT)}: docs/{page}#{anchor}"
            for path, page, anchor in cited
            if not (ROOT / "docs" / page).is_file() or anchor not in anchors(ROOT / "docs" / page)
        }
    )
    assert not broken, f"citations of missing pages or headings: {broken}"


def test_every_relative_link_of_the_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or anchor and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files or headings: {broken}"


def test_the_readme_leads_to_every_docs_page():
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", (ROOT / "README.md").read_text()))
    pages = {page.name for page in (ROOT / "docs").glob("*.md")}
    assert pages and not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"
