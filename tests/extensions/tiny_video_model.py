"""A video model of one's own: an MLP velocity over ``(3, F, H, W)`` latents, decoded to ``(F, 3, H, W)`` frames.

It follows the video convention: latents ``(B, C, F, H, W)`` as the video VAEs lay them out, ``decode``
returns ``(B, F, C, H, W)`` in [0, 1], and the policy has an int ``fps``. Frames 5 x 7 (odd, so an
MP4 needs padding) and 4 of them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from precise_rl.policies import Policy
from precise_rl.policies.registry import register_policy

BUCKETS = 8
SHAPE = (3, 4, 5, 7)  # channels, frames, height, width


class TinyVideoNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        n = SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3]
        self.embed = nn.Embedding(BUCKETS, width)
        self.inp = nn.Linear(n + 1, width)
        self.out = nn.Linear(width, n)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(torch.cat([x.flatten(1), t[:, None]], dim=1)) + self.embed(cond))
        return self.out(h).view_as(x)


@register_policy("tiny_video")
class TinyVideoPolicy(Policy):
    fps = 8

    def __init__(self, device: torch.device | str = "cpu") -> None:
        gen = torch.Generator().manual_seed(0)
        self.transformer = TinyVideoNet()
        with torch.no_grad():
            for p in self.transformer.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        self.transformer.to(device)

    @classmethod
    def from_pretrained(
        cls, path: str | None, revision: str | None, dtype: str, device: torch.device, **options: Any
    ) -> TinyVideoPolicy:
        return cls(device)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return SHAPE

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([zlib.crc32(p.encode()) % BUCKETS for p in prompts], device=self.device)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.transformer(x, t, cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)

    def lora_target_modules(self) -> list[str]:
        return ["inp", "out"]
