"""What the algorithms that train on final samples share: noising them again, and an old policy.

DiffusionNFT, AWM and DPO train on the clean latents a rollout ends in, noised afresh at sampled
times along the forward process ``x_t = (1 - t) x0 + t eps`` (docs/math.md's interpolation), where
the velocity target is ``eps - x0``. Their times and noise come from generators seeded per
(row, item) (:func:`.seeds.train_noise_seed`), so that a row trains on the same ``x_t`` on any
number of processes and in any micro-batch, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from ...policies import index_cond
from .. import seeds
from ..rollouts import RolloutBatch
from .base import RunContext, swapped_weights

__all__ = ["OldWeights", "forward_noised", "noise_for", "row_generator", "velocity"]


def row_generator(seed: int, epoch: int, inner: int, row: int, item: int = seeds.ROW_ITEM) -> torch.Generator:
    """A CPU generator of unit ``row``'s draws (``item``: one of its trained times; default: its per-row draws)."""
    return torch.Generator().manual_seed(seeds.train_noise_seed(seed, epoch, inner, row, item))


def noise_for(
    rows: Sequence[int], items: Sequence[int], shape: tuple[int, ...], seed: int, epoch: int, inner: int
) -> torch.Tensor:
    """``(R, *shape)`` standard normal noise (float32, CPU), row ``i`` for (unit ``rows[i]``, item ``items[i]``)."""
    out = torch.empty((len(rows), *shape), dtype=torch.float32)
    for i, (r, j) in enumerate(zip(rows, items, strict=True)):
        out[i] = torch.randn(shape, generator=row_generator(seed, epoch, inner, int(r), int(j)))
    return out


def forward_noised(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` with ``t`` per row (``(R,)``)."""
    tt = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * eps


def velocity(ctx: RunContext, batch: RolloutBatch, local_rows: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """The policy's velocity at ``(x_t, t)`` for the prompts of ``local_rows`` (this process's rows), in autocast."""
    with ctx.accelerator.autocast():
        return ctx.policy.velocity(x_t, t.to(torch.float32), index_cond(batch.cond, local_rows))


class OldWeights:
    """A copy of the trained weights that follows them by EMA: DiffusionNFT's old policy, AWM's EMA reference."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self.weights = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def follow(self, decay: float) -> None:
        """``old <- decay * old + (1 - decay) * current``."""
        for w, p in zip(self.weights, self.params, strict=True):
            w.copy_(w * decay + p.detach().float() * (1.0 - decay))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside it, the parameters hold the old weights."""
        with swapped_weights(self.params, self.weights):
            yield

    def state_tensors(self, names: Sequence[str], prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + n: w for n, w in zip(names, self.weights, strict=True)}

    def load_state_tensors(self, names: Sequence[str], prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, w in zip(names, self.weights, strict=True):
                w.copy_(tensors[prefix + n])
