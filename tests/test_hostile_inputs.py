"""Hostile and careless inputs to the command line: one sentence naming what to fix, exit code 2, nothing written.

Each test builds its bad input afresh (random bytes, random keys and values) and checks the
sentence against the facts of that input: the key and the lines it is on, the limit that was
passed, what the path really is.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from precise_rl.cli import main

from . import toy_task

toy_task.register()

ROOT = Path(__file__).resolve().parents[1]


def _toy_yaml(tmp_path: Path, **train: object) -> Path:
    cfg = json.loads(json.dumps(toy_task.TOY_CONFIG))
    cfg["train"].update(train)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"precise-rl {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- YAML read as written


def test_a_key_given_twice_is_named_with_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(os.urandom(8))
    key = rng.choice(["lr", "epochs", "group_size", "batch_size"])
    pad = rng.randint(0, 5)
    lines = ["seed: 1", "train:", *[f"  # {i}" for i in range(pad)], f"  {key}: 2", f"  {key}: 3"]
    path = tmp_path / "dup.yaml"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out)]) == 2
    line = _one_error(capsys, "train")
    first = lines.index(f"  {key}: 2") + 1
    assert f"key {key!r} appears twice (lines {first} and {first + 1})" in line, line
    assert not out.exists()
    assert main(["train", f"train.x={{{key}: 1, {key}: 2}}", "--output", str(out)]) == 2
    assert f"key {key!r} appears twice on line 1" in _one_error(capsys, "train")


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_an_empty_config_file_is_refused_not_run_as_the_default_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out)]) == 2
    assert "is empty" in _one_error(capsys, "train")
    assert not out.exists()


@pytest.mark.parametrize("depth", [65, 5000])
def test_a_config_nested_thousands_deep_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], depth: int
) -> None:
    path = tmp_path / "deep.yaml"
    block = rng_nest(depth)
    path.write_text(f"train:\n  lr: {block}\n")
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    assert "more than 64 levels deep" in _one_error(capsys, "train")


def rng_nest(depth: int) -> str:
    """A flow value nesting lists and mappings ``depth`` levels deep, in a random order."""
    rng = random.Random(os.urandom(8))
    opens = [rng.choice(["[", "{k: "]) for _ in range(depth - 1)]
    closes = ["]" if o == "[" else "}" for o in reversed(opens)]
    return "".join(opens) + "[]" + "".join(closes)
