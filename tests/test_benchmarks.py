"""The benchmarks keep working, and the tables the documentation shows are theirs.

Each script of ``benchmarks/`` runs its ``--quick`` smoke mode here (a benchmark is code too: one that
no test runs breaks unseen when the code under it changes), and a smoke run leaves the published
tables alone. Each script's published table, ``benchmarks/results/NAME.md``, exists, says which command
measured it on which machine, and is included by a page of the documentation; nothing here asserts
on a time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
OPT_IN = sorted((ROOT / "benchmarks" / "opt_in").glob("*.py"))
INCLUDE = re.compile(r'^--8<-- "(benchmarks/results/[\w./-]+)"$', re.M)


def _included() -> set[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return {m for p in pages for m in INCLUDE.findall(p.read_text())}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_each_benchmark_runs_its_smoke_mode_and_leaves_the_published_table(script: Path) -> None:
    before = {p: p.read_bytes() for p in RESULTS.rglob("*") if p.is_file()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{script.name} --quick failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    after = {p: p.read_bytes() for p in RESULTS.rglob("*") if p.is_file()}
    assert after == before, f"{script.name} --quick changed the published tables"


@pytest.mark.parametrize("script", SCRIPTS + OPT_IN, ids=lambda p: p.stem)
def test_each_benchmarks_table_is_published_with_its_command_and_machine(script: Path) -> None:
    table = RESULTS / f"{script.stem}.md"
    assert table.is_file(), f"run python {script.relative_to(ROOT)} to write {table.relative_to(ROOT)}"
    first = table.read_text().splitlines()[0]
    command = re.match(r"Measured by `python (\S+)[^`]*` on (\d{4}-\d\d-\d\d) \((.+)\):$", first)
    assert command, f"{table.name} does not open with the command, date and machine: {first!r}"
    assert command.group(1) == str(script.relative_to(ROOT))
    assert "cores" in command.group(3) and "torch" in command.group(3)
    assert str(table.relative_to(ROOT)) in _included(), f"no page of the documentation includes {table.name}"


def test_every_included_table_exists() -> None:
    included = _included()
    assert included, "the documentation includes no benchmark table"
    assert all((ROOT / path).is_file() for path in included)
