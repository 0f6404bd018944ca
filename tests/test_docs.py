"""The README and the docs/ pages link only to files and headings that exist."""
from __future__ import annotations

import glob
import os
import re

import pytest

from conftest import ROOT

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: str) -> set[str]:
    """GitHub's anchors of the headings of a markdown file."""
    with open(path, encoding="utf-8") as f:
        headings = re.findall(r"(?m)^#+ (.+)$", f.read())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_existing_files_and_headings(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    targets = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    assert targets or page != "README.md", "the README links to no docs page"
    for target in targets:
        file, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), file)) if file else os.path.join(ROOT, page)
        assert os.path.exists(path), f"{page} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(path), f"{page} links to {target}: no such heading"


def test_readme_stays_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250, "move reference material to a docs/ page"
