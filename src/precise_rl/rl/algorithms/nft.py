"""DiffusionNFT: a forward-process, likelihood-free objective on the rollouts' final samples.

As NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` (commit 24af555) computes it:

* the rewards become group advantages (the epoch's std by default, the reference's global_std),
  clipped to ``[-c, c]`` and mapped to an optimality ``r = clip(A / c / 2 + 1/2, 0, 1)``;
* each sample is trained at ``floor(f N)`` of the rollout grid's ``N`` times, a random choice
  without replacement per sample, noised afresh: ``x_t = (1 - t) x0 + t eps``;
* with the current velocity ``v`` and the old policy's ``v_old``, the positive velocity
  ``beta v + (1 - beta) v_old`` and the implicit negative one ``(1 + beta) v_old - beta v`` each give
  an x0 prediction ``x_t - t v+-``, regressed on ``x0`` with the adaptive weight ``1 / mean|x0_pred - x0|``
  (detached, float64, floor 1e-5); the loss is ``c (r L+ + (1 - r) L-) / beta`` plus ``kl_beta`` times
  the velocity-space KL to the reference weights;
* rollouts are drawn with the old policy, which follows the trained weights after every epoch
  with the decay ``return_decay`` of the optimizer steps taken (``old_decay_*`` knobs);
* no classifier-free guidance is needed (the recipes set the model's guidance to 1).

Deliberate differences, each for process-count invariance or a cleaner seam: a sample's times and
noise are drawn from generators seeded per (row, time) instead of the global RNG, so a run gives
the same numbers on any number of processes; the old policy is a copy of the trained weights
(LoRA or full) instead of a second LoRA adapter, which computes the same; and any sampler of the
table may roll out (the reference's deterministic DPM-Solver-2 is not in the table: ``ode``, its
first-order counterpart, is this algorithm's default).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..rollouts import RolloutBatch
from .base import GroupAdvantageAlgorithm, LossOutput, RunContext, reference_weights
from .forward import OldWeights, forward_noised, noise_for, row_generator, velocity

__all__ = ["NFT", "nft_loss", "old_decay", "optimality"]


def optimality(adv: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """``r = clip(clip(A, -c, c) / c / 2 + 1/2, 0, 1)``: an advantage as the probability of being optimal."""
    clipped = torch.clamp(adv, -adv_clip, adv_clip)
    return torch.clamp(clipped / adv_clip / 2.0 + 0.5, 0.0, 1.0)


def old_decay(global_step: int, flat: int, rate: float, most: float) -> float:
    """The old policy's decay after ``global_step`` optimizer steps: 0 before ``flat``, then a ramp up to ``most``."""
    if global_step < flat:
        return 0.0
    return min((global_step - flat) * rate, most)


def _adaptive_sq(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-row ``mean((x0_pred - x0)^2 / w)`` with ``w = max(mean|x0_pred - x0|, 1e-5)`` detached, in float64."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        w = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    return ((x0_pred - x0) ** 2 / w).mean(dim=dims)


def nft_loss(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    v_old: torch.Tensor,
    adv: torch.Tensor,
    beta: float,
    adv_clip: float,
    v_ref: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's per-row loss (float64) and its parts; ``v`` carries the gradient, ``v_old`` and ``v_ref`` none."""
    tt = t.to(x_t.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    v_old = v_old.detach()
    r = optimality(adv, adv_clip)
    positive = beta * v + (1 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v
    pos_loss = _adaptive_sq(x_t - tt * positive, x0)
    neg_loss = _adaptive_sq(x_t - tt * negative, x0)
    policy = (r * pos_loss / beta + (1.0 - r) * neg_loss / beta) * adv_clip
    parts = {"policy_loss": policy, "positive_loss": pos_loss, "negative_loss": neg_loss, "optimality": r}
    loss = policy
    if v_ref is not None:
        kl = (v - v_ref.detach()).pow(2).mean(dim=tuple(range(1, x0.ndim)))
        loss = loss + kl_beta * kl
        parts["kl_ref"] = kl
    return loss, parts


class NFT(GroupAdvantageAlgorithm):
    """DiffusionNFT over the update engine (knobs: :class:`precise_rl.algorithm_table.NFTKnobs`)."""

    MEAN_KEYS = ("loss", "policy_loss", "positive_loss", "negative_loss", "optimality", "kl_ref", "old_gap")
    #: a group of equal rewards still trains (r = 1/2 pulls the policy toward the old one), as in the reference
    KEEP_FLAT = True

    def __init__(self, knobs: Any, ctx: RunContext) -> None:
        super().__init__(knobs, ctx)
        self.old = OldWeights(ctx.params)  # the old policy starts as the initial weights

    # ---------------------------------------------------------------- rollouts

    def rollout_weights(self) -> AbstractContextManager:
        return self.old.swapped_in() if self.knobs.rollout_with_old else nullcontext()

    # ---------------------------------------------------------------- the pass

    def begin(self, batch: RolloutBatch, targets: torch.Tensor, epoch: int, inner: int) -> None:
        super().begin(batch, targets, epoch, inner)
        n = batch.kernel.num_steps
        self.n_train = max(1, int(n * self.knobs.timestep_fraction))
        self.grid = batch.kernel.sigmas[:-1].to(torch.float32)  # the rollout's N times (the last, 0, is no time)
        self._times: dict[int, torch.Tensor] = {}

    def _row_times(self, row: int) -> torch.Tensor:
        """Row ``row``'s trained times: a random order of the grid's times, the first ``n_train`` of it."""
        if row not in self._times:
            gen = row_generator(self.ctx.cfg.seed, self.epoch, self.inner, row)
            perm = torch.randperm(len(self.grid), generator=gen)
            self._times[row] = self.grid[perm[: self.n_train]]
        return self._times[row]

    def items(self) -> int:
        return self.n_train

    def forwards_per_row(self) -> tuple[int, int]:
        return 1, 1 + int(self.knobs.kl_beta > 0)

    def loss(self, units: torch.Tensor, items: torch.Tensor, idle: bool = False) -> LossOutput:
        k, ctx, batch = self.knobs, self.ctx, self.batch
        device = ctx.device
        rows = units.tolist()
        local = self.local_of[units].to(device)
        x0 = batch.latents[local, -1].float()
        t = torch.stack([self._row_times(r)[j] for r, j in zip(rows, items.tolist(), strict=True)]).to(device)
        eps = noise_for(rows, items.tolist(), tuple(x0.shape[1:]), ctx.cfg.seed, self.epoch, self.inner).to(device)
        x_t = forward_noised(x0, eps, t)
        with torch.no_grad(), self.old.swapped_in():
            v_old = velocity(ctx, batch, local, x_t, t).float()
        v_ref = None
        if k.kl_beta > 0:
            with torch.no_grad(), reference_weights(ctx):
                v_ref = velocity(ctx, batch, local, x_t, t).float()
        v = velocity(ctx, batch, local, x_t, t).float()
        adv = torch.zeros(len(rows), device=device) if idle else self.adv[local]
        loss, parts = nft_loss(x0, x_t, t, v, v_old, adv, k.beta, k.adv_clip, v_ref, k.kl_beta)
        if idle:
            return LossOutput(loss)
        with torch.no_grad():
            parts["loss"] = loss
            parts["old_gap"] = (v.detach() - v_old).pow(2).flatten(1).mean(dim=1)
        return LossOutput(loss, parts)

    # ---------------------------------------------------------------- after the epoch; checkpoints

    def after_epoch(self, global_step: int) -> None:
        k = self.knobs
        self.old.follow(old_decay(global_step, k.old_decay_flat, k.old_decay_rate, k.old_decay_max))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.old.state_tensors(self.ctx.param_names, "old_policy.")

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.old.load_state_tensors(self.ctx.param_names, "old_policy.", tensors)
