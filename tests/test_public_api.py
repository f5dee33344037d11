"""The public face: ``from precise_rl import GRPOTrainer, ExperimentConfig, load_config`` and a task of one's own.

A model and a reward defined here are trained through ``GRPOTrainer(cfg, dir, task=TaskSpec(...))``
with no registry entry for either (the reward is named by import path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import precise_rl
from precise_rl import GRPOTrainer, TaskSpec, config_from_dict
from precise_rl.policies import Policy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["dim", "bright"]


class TwoPixelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(PROMPTS), 16)
        self.inp = nn.Linear(2 + 1, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None]], dim=1)) + self.embed(cond))
        return self.out(h).view_as(x)


class TwoPixelPolicy(Policy):
    def __init__(self) -> None:
        torch.manual_seed(0)
        self.transformer = TwoPixelNet()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, 1, 2)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([PROMPTS.index(p) for p in prompts], device=self.device)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.transformer(x, t, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def lora_target_modules(self) -> list[str]:
        return ["inp", "out"]


def brightness(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
    return images.flatten(1).mean(dim=1)


def _registries() -> tuple[list[str], list[str]]:
    from precise_rl.rewards.base import _REGISTRY
    from precise_rl.tasks.registry import model_names

    return model_names(), sorted(_REGISTRY)


def test_the_public_names_import() -> None:
    from precise_rl import ExperimentConfig, kernel, load_config, rollout, shifted_sigmas, step, uniform_sigmas
    from precise_rl.policies import DiffusersPolicy, Flux1Policy, Flux2KleinPolicy, SD3Policy

    assert isinstance(load_config(), ExperimentConfig)
    assert all(callable(f) for f in (kernel, rollout, step, shifted_sigmas, uniform_sigmas))
    assert all(
        issubclass(c, DiffusersPolicy) and issubclass(c, Policy) for c in (Flux1Policy, Flux2KleinPolicy, SD3Policy)
    )
    assert set(precise_rl.__all__) <= set(dir(precise_rl))
    for name in precise_rl.__all__:
        getattr(precise_rl, name)


def test_importing_the_package_imports_no_torch() -> None:
    code = "import sys, precise_rl; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr


def test_a_model_and_a_reward_of_ones_own_train_without_a_registry(tmp_path: Path) -> None:
    before = _registries()
    cfg = config_from_dict(
        {
            "seed": 1,
            "sampler": {"name": "precise", "num_steps": 3},
            "reward": {"weights": {f"{__name__}:brightness": 1.0}},
            "train": {"epochs": 2, "groups_per_epoch": 2, "group_size": 4, "batch_size": 4, "lr": 1e-2},
            "eval": {"every": 0},
            "checkpoint": {"every": 2, "keep": 1},
            "logging": {"tensorboard": False, "progress": False},
        }
    )
    policy = TwoPixelPolicy()
    task = TaskSpec(policy=policy, train_prompts=PROMPTS, eval_prompts=PROMPTS)
    trainer = GRPOTrainer(cfg, tmp_path / "run", task=task)
    assert trainer.policy is policy and trainer.train_prompts == PROMPTS
    start = [p.detach().clone() for p in trainer.params]
    trainer.run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "brightness" in lines[0]
    assert not all(torch.equal(a, b) for a, b in zip(start, trainer.params, strict=True))  # it trained
    assert _registries() == before  # neither the model nor the reward was registered


def test_the_pipeline_class_table_is_derived_from_the_adapter_registry() -> None:
    from precise_rl.policies.registry import ADAPTERS, PIPELINE_ADAPTERS
    from precise_rl.tasks.registry import model_names

    assert {
        "flux2_klein",
        "flux2_dev",
        "qwen_image",
        "z_image",
        "sd3",
        "flux1",
        "flux1_kontext",
        "qwen_image_edit",
    } <= set(ADAPTERS)
    assert PIPELINE_ADAPTERS == {cls.pipeline_class: name for name, cls in ADAPTERS.items()}
    assert set(ADAPTERS) <= set(model_names())  # each adapter is a model name
