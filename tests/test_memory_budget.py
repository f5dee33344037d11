"""A hand-set ``train.forward_batch`` and the rollouts' VAE decode checked against the memory budget up front."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies.flux2 import Flux2KleinPolicy
from precise_rl.rl.memory import GB, peak_bytes
from precise_rl.rl.trainer import GRPOTrainer
from precise_rl.tasks.registry import TaskSpec

from . import tiny_pipelines as tp
from . import toy_task

toy_task.register()


def _toy(**train) -> object:
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["train"].update({"epochs": 1, "ema": {"enabled": False}, **train})
    data["eval"]["every"] = 0
    return config_from_dict(data)


def test_a_hand_set_forward_batch_over_the_budget_stops_before_any_update(tmp_path: Path) -> None:
    trainer = GRPOTrainer(_toy(forward_batch=4, memory_budget_gb=1e-6), tmp_path / "tight")
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(UserError, match=r"train\.forward_batch 4 \(4 rows per training forward\) takes .* lower"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_a_forward_batch_within_the_budget_trains_as_without_one(tmp_path: Path) -> None:
    runs = []
    for budget in (None, 100.0):
        trainer = GRPOTrainer(_toy(forward_batch=3, memory_budget_gb=budget), tmp_path / str(budget))
        trainer.run()
        runs.append([p.detach().clone() for p in trainer.params])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def _klein_task(decode_batch: int) -> TaskSpec:
    pipe = tp.flux2_klein_pipeline(seed=int(torch.randint(0, 1000, ())))
    policy = Flux2KleinPolicy(pipe, **tp.adapter_options("flux2_klein", decode_batch=decode_batch))
    return TaskSpec(policy, ["a red cube", "a blue ball"], ["a cat"], default_rewards={"jpeg_incompressibility": 1.0})


def _klein_cfg(budget: float) -> object:
    return config_from_dict(
        {
            "model": {"name": "flux2_klein"},
            "sampler": {"name": "precise", "num_steps": 2},
            "train": {"groups_per_epoch": 2, "group_size": 2, "rollout_batch_size": 4, "memory_budget_gb": budget},
            "eval": {"every": 0},
            "logging": {"tensorboard": False, "progress": False},
        }
    )


def test_the_rollout_decode_over_the_budget_names_decode_batch_before_any_rollout(tmp_path: Path) -> None:
    task = _klein_task(decode_batch=4)
    # what decoding takes beyond what is live, measured the way the trainer measures it
    policy = task.policy
    one = peak_bytes(lambda: policy.decode(torch.zeros((1, *policy.latent_shape))), torch.device("cpu"))
    assert one > 0
    with pytest.raises(UserError, match=r"decode of 4 images at once .* lower model option 'decode_batch'"):
        GRPOTrainer(_klein_cfg(budget=one / 2 / GB), tmp_path / "tight", task=task)
    GRPOTrainer(_klein_cfg(budget=100.0), tmp_path / "roomy", task=_klein_task(decode_batch=4))
