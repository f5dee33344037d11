"""The README describes what exists: its Python examples run, its commands and files are real.

The site's pages are checked the same way in ``tests/test_docs_site.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from precise_rl.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    """The Python examples of the README and of the site's pages (not the files a page includes)."""
    pages = [README, *(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))]
    blocks = [b for text in pages for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)]
    return [b for b in blocks if not b.startswith("--8<--")]


def test_the_pages_have_python_examples() -> None:
    assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_python_example_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_python_blocks()[index])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr


def test_every_command_named_exists_and_every_command_is_named() -> None:
    named = set(re.findall(r"precise-rl ([a-z][a-z-]*)", README))
    assert named - set(COMMANDS) == set(), "the README names commands the CLI does not have"
    assert set(COMMANDS) - named == set(), "the README leaves out commands of the CLI"


def test_every_file_named_exists() -> None:
    paths = set(re.findall(r"`((?:configs|benchmarks|src|tests|docs)/[\w./-]+)`", README))
    paths |= set(re.findall(r"\]\(((?:docs|configs)/[\w./-]+)\)", README))
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


def test_every_config_is_documented() -> None:
    pages = README + "".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert sorted(c for c in configs if c not in pages) == []
