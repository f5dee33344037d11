"""``precise-rl eval`` rebuilds a checkpoint's model and rewards (no trainer) and scores what training scored.

The run's own final evaluation (EMA weights, both protocols, fixed evaluation noise) is the
independent reference: evaluating the final checkpoint with the same steps must give the same
numbers, for full fine-tuning and for LoRA (whose adapters are injected before the weights load).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from precise_rl.cli import main

BASE = [
    "seed=3",
    "train.epochs=2",
    "train.groups_per_epoch=2",
    "train.group_size=4",
    "train.batch_size=4",
    "train.lr=2e-3",
    "sampler.num_steps=4",
    "eval.every=2",
    "eval.num_steps=4",
    "eval.max_prompts=4",
    "eval.samples_per_prompt=2",
    "eval.samplers=[ode,own,cps]",
    "train.ema.every=1",
    "logging.tensorboard=false",
    "logging.progress=false",
]


@pytest.mark.parametrize(
    "extra", [[], ["train.lora.enabled=true", "train.lora.rank=4", "train.ema.enabled=false"]], ids=["full", "lora"]
)
def test_eval_of_the_final_checkpoint_repeats_the_runs_final_evaluation(tmp_path: Path, extra: list[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", *BASE, *extra, "--output", str(run)]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--samplers", "ode,own,cps", "--steps", "4", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["epoch"] == 2
    rows = {r["protocol"]: r for r in data["results"]}
    assert sorted(rows) == ["cps", "ode", "own"] and rows["own"]["sampler"] == "precise"
    for protocol, row in rows.items():
        assert row["reward"] == pytest.approx(last[f"eval_{protocol}_reward"], rel=1e-6, abs=1e-7), protocol
        for name in ("ink_style", "digit_recognised"):
            assert row[name] == pytest.approx(last[f"eval_{protocol}/{name}"], rel=1e-6, abs=1e-7), (protocol, name)
