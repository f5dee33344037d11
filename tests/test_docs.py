"""The math page the code cites is in the repository and has every section that is cited."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
#: "docs/math.md section 3", "``docs/math.md`` section 5", "docs/math.md sections 1 and 3"
CITATION = re.compile(r"math\.md`{0,2}\s+sections?\s+(\d+(?:\s*(?:,|and)\s*\d+)*)")


def _citing_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in ("src", "tests", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def _citations() -> list[tuple[Path, int]]:
    found = []
    for path in _citing_files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            found += [(path, int(n)) for n in re.findall(r"\d+", match.group(1))]
    return found


def test_the_math_page_is_in_the_repository_with_numbered_sections() -> None:
    headings = re.findall(r"^## (\d+)\. ", MATH.read_text(encoding="utf-8"), flags=re.M)
    assert [int(h) for h in headings] == list(range(1, len(headings) + 1)) and len(headings) >= 7


def test_every_cited_section_exists() -> None:
    sections = {int(h) for h in re.findall(r"^## (\d+)\. ", MATH.read_text(encoding="utf-8"), flags=re.M)}
    cited = _citations()
    assert len({n for _, n in cited}) >= 3  # the kernels (3), the losses (5), the conventions (1) at least
    missing = [(str(p.relative_to(ROOT)), n) for p, n in cited if n not in sections]
    assert not missing, f"citations of sections docs/math.md does not have: {missing}"


def test_nothing_cites_the_math_page_outside_the_repository() -> None:
    old_name = "sampler" + "-math.md"  # the page's name outside the repository (split: this file is scanned too)
    stale = [str(p.relative_to(ROOT)) for p in _citing_files() if old_name in p.read_text(encoding="utf-8")]
    assert not stale, stale
