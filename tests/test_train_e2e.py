"""End to end on the built-in digits task: GRPO raises the held-out reward, and the default command's outputs.

Both tests train the shipped model on the CPU (tens of seconds together), hence ``slow``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from precise_rl.cli import main
from precise_rl.config import config_from_dict
from precise_rl.rl.checkpoint import latest_checkpoint
from precise_rl.rl.trainer import GRPOTrainer

pytestmark = pytest.mark.slow

#: the default recipe (digits, ``precise``), shortened; evaluated at the start and at the end only
SHORT_EPOCHS = 30
QUIET = {"tensorboard": False, "progress": False}
SPREAD_SEEDS = [1, 2, 3, 4, 5]


def _short_config(seed: int) -> object:
    return config_from_dict(
        {
            "seed": seed,
            "train": {"epochs": SHORT_EPOCHS},
            "eval": {"every": SHORT_EPOCHS, "samplers": ["ode"]},
            "checkpoint": {"every": 0, "keep": 1},
            "logging": QUIET,
        }
    )


def _untrained_eval_reward(seed: int, tmp_path: Path) -> float:
    """The held-out ODE reward of the shipped model, with the evaluation noise of ``seed``."""
    trainer = GRPOTrainer(_short_config(seed), tmp_path / f"untrained-{seed}", read_only=True)
    return trainer.evaluate(0, write_grid=False)["eval_ode_reward"]


def test_short_run_raises_reward_beyond_seed_spread_of_untrained_model(tmp_path: Path) -> None:
    trainer = GRPOTrainer(_short_config(0), tmp_path / "run")
    summary = trainer.run()
    before, after = summary["reward_before"], summary["reward_after"]
    assert summary["eval_key"] == "eval_ode_reward"
    assert summary["epochs"] == SHORT_EPOCHS
    # The same untrained model under other evaluation noise: how far the score moves by chance.
    untrained = [before] + [_untrained_eval_reward(s, tmp_path) for s in SPREAD_SEEDS]
    spread = max(untrained) - min(untrained)
    assert spread > 0  # the seeds do change the evaluation samples
    gain = after - before
    assert gain > spread, f"reward {before:.4f} -> {after:.4f} (gain {gain:.4f}) within the seed spread {spread:.4f}"
    # The trained weights beat every untrained evaluation, not only the one with the same noise.
    assert after > max(untrained)
    # The per-epoch training reward (rollouts of the training sampler) rose too.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["reward_mean"] for r in records if "reward_mean" in r]
    assert len(train) == SHORT_EPOCHS
    k = SHORT_EPOCHS // 3
    assert sum(train[-k:]) / k > sum(train[:k]) / k


def test_default_train_command_writes_its_outputs_and_one_summary_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "default"
    assert main(["train", "--output", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    summary = json.loads((out / "summary.json").read_text())
    m = re.fullmatch(
        r"held-out reward before -> after training \(EMA weights\): ode (-?\d+\.\d{4}) -> (-?\d+\.\d{4}), "
        r"own (-?\d+\.\d{4}) -> (-?\d+\.\d{4}); (\d+) s; plots: (.+) and (.+)/",
        lines[0],
    )
    assert m is not None, lines[0]
    assert float(m.group(1)) == pytest.approx(summary["reward_before"], abs=6e-5)
    assert float(m.group(2)) == pytest.approx(summary["reward_after"], abs=6e-5)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert float(m.group(1)) == pytest.approx(first["eval_ode_reward"], abs=6e-5)
    assert float(m.group(3)) == pytest.approx(first["eval_own_reward"], abs=6e-5)
    assert summary["protocols"]["own"]["after"] == pytest.approx(float(m.group(4)), abs=6e-5)
    assert Path(m.group(6)) == out / "reward_curve.png"
    assert Path(m.group(7)) == out / "samples"
    # The built-in default: digits with the precise sampler, 100 epochs, evaluated every 10.
    assert summary["sampler"] == "precise" and summary["epochs"] == 100
    assert summary["reward_after"] > summary["reward_before"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(101))
    for key in ("elapsed_s", "reward_mean", "reward/ink_style", "reward/digit_alignment", "loss", "clip_frac"):
        assert all(key in r for r in records[1:]), key
    assert [r["epoch"] for r in records if "eval_ode_reward" in r] == list(range(0, 101, 10))
    with Image.open(out / "reward_curve.png") as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100
    grids = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert "epoch_0000_ode.png" in grids and "epoch_0100_ode.png" in grids
    newest = latest_checkpoint(out)
    assert newest.parent == out / "checkpoints" and newest.name.endswith("100")
    assert len([p for p in (out / "checkpoints").iterdir() if p.is_dir()]) == 3  # checkpoint.keep
