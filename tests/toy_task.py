"""A tiny task for trainer tests: a random conditional velocity MLP over 1x2x2 "images".

Registered as model ``toy`` and reward ``toy_brightness`` by :func:`register`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from precise_rl.policies import Policy
from precise_rl.rewards import register_reward
from precise_rl.tasks.registry import TaskSpec, register_task

PROMPTS = [f"prompt {k}" for k in range(4)]


class ToyNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(PROMPTS), width)
        self.inp = nn.Linear(4 + 1, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x.flatten(1), t[:, None]], dim=1)) + self.embed(cond)
        h = self.hidden(torch.tanh(h))
        return self.out(torch.tanh(h)).view_as(x)


class ToyPolicy(Policy):
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu") -> None:
        torch.manual_seed(seed)
        self.transformer = ToyNet().to(device)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, 2, 2)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([PROMPTS.index(p) for p in prompts], device=self.device)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.transformer(x, t, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    def lora_target_modules(self) -> list[str]:
        return ["inp", "hidden", "out"]


def _toy_task(model_cfg: Any, device: torch.device) -> TaskSpec:
    return TaskSpec(
        policy=ToyPolicy(**model_cfg.options, device=device),
        train_prompts=PROMPTS[:3],
        eval_prompts=PROMPTS[3:],
        default_rewards={"toy_brightness": 1.0},
    )


def toy_brightness(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
    """Mean pixel value: a reward a 4-pixel model can learn in a few updates."""
    return images.flatten(1).mean(dim=1)


def register() -> None:
    """Add the toy model and its reward to the registries (idempotent)."""
    register_task("toy")(_toy_task)
    register_reward("toy_brightness")(toy_brightness)


TOY_CONFIG: dict[str, Any] = {
    "seed": 3,
    "model": {"name": "toy"},
    "sampler": {"name": "precise", "num_steps": 4},
    "reward": {"weights": {"toy_brightness": 1.0}},
    "algorithm": {"clip_range": 0.2},
    "train": {
        "epochs": 4,
        "groups_per_epoch": 3,
        "group_size": 4,
        "batch_size": 4,
        "lr": 1e-2,
        "ema": {"enabled": True, "decay": 0.5, "every": 1},
    },
    "eval": {"every": 2, "samples_per_prompt": 2, "samplers": ["ode"], "num_steps": 4},
    "checkpoint": {"every": 2, "keep": 2},
    "logging": {"tensorboard": False, "progress": False},
}
