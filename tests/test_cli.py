"""The ``precise-rl`` entry point: every subcommand has --help, overrides may follow flags, bad flags exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from precise_rl.cli import COMMANDS, main

from . import toy_task

toy_task.register()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"precise-rl {command}" in capsys.readouterr().out


def test_overrides_may_follow_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1", "eval.every=0"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1
    assert resolved["eval"]["every"] == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
