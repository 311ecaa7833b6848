"""The README is a front door into docs/: every link in README.md and docs/*.md leads somewhere, a file of the
repository (relative to the page, or to the repository's root when it starts with /) and, for a markdown page, a
heading of it (GitHub's anchors); and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.*)$")


def outside_code(text: str) -> list[str]:
    lines, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(page: Path) -> set[str]:
    found = set()
    for line in outside_code(page.read_text()):
        m = HEADING.match(line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", re.sub(r"<[^>]+>", "", m.group(1).strip().lower()))
            found.add(slug.replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_leads_somewhere(page):
    broken = []
    for line in outside_code(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = page if not path else (ROOT / path.lstrip("/") if path.startswith("/") else page.parent / path)
            if not dest.exists():
                broken.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, broken


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert text.startswith("# ExpertMesh\n\n```bash\nmake run") and "make test" in text.split("```")[1]
    assert "![" in text and (ROOT / "docs" / "architecture.png").exists() and (ROOT / "docs" / "architecture_diagram.py").exists()
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(text) if t.startswith("docs/")}
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= linked, "every docs page is linked from the README"
