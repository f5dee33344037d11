"""GRPO: PPO-clip on each trained step's log-probability with group advantages (docs/math.md section 5).

A unit is a sample (a row of the epoch); its items are the trained steps of its trajectory, each
a Gaussian action whose log-prob is recomputed under the current weights from the stored
trajectory. The loss is PPO-clip (or the ratio-normalised guard loss) plus ``kl_beta`` times the
KL term to the reference weights.

Flow-GRPO-Fast (``fast_window > 0``; yifan123/flow_grpo ``scripts/train_sd3_fast.py``): each epoch's
rollouts draw noise on ``fast_window`` consecutive steps only, starting at a step drawn uniformly
from ``0 .. fast_start_max`` (the reference's range ``(0, N/2)``), and take the deterministic ODE step
elsewhere; only the window's steps are trained (the others have no log-prob). Any stochastic sampler
of the table fills the window, precise included. Deliberate difference: the start is drawn once per
epoch from the run's seed, the same on every process, where the reference draws it per sampling
batch and process with Python's ``random``; so a run gives the same numbers on any number of
processes. ``fast_shared_start`` gives a group's samples one initial noise, so that they share one
deterministic trajectory up to the window and branch there, as the earlier Flow-GRPO-Fast did.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import UserError
from ...policies import index_cond
from ...sde import Kernel, StepOutput, sde_window, step
from .. import seeds
from ..losses import guard_loss, kl_penalty, ppo_clip_loss
from ..rollouts import RolloutBatch, stored_rows
from .base import GroupAdvantageAlgorithm, LossOutput, RunContext, reference_weights

__all__ = ["GRPO", "fast_window_start", "recompute", "train_step_indices"]


def train_step_indices(kern: Kernel, timestep_fraction: float) -> list[int]:
    """The steps trained per trajectory: stochastic ones among the first ``floor(f * N)``."""
    n_train = max(1, math.floor(timestep_fraction * kern.num_steps)) if timestep_fraction < 1 else kern.num_steps
    return [j for j in range(n_train) if bool(kern.stochastic[j])]


def recompute(ctx: RunContext, batch: RolloutBatch, sample_idx: torch.Tensor, step_idx: torch.Tensor) -> StepOutput:
    """Mean and log-prob of the stored transitions ``(sample, step)`` (local rows) under the current weights."""
    x_t = stored_rows(batch.latents, ctx.device, sample_idx, step_idx)
    x_s = stored_rows(batch.latents, ctx.device, sample_idx, step_idx + 1)
    sig = batch.kernel.sigmas.to(device=x_t.device, dtype=torch.float32)
    with ctx.accelerator.autocast():
        v = ctx.policy.velocity(x_t, sig[step_idx], index_cond(batch.cond, sample_idx))
    return step(batch.kernel, step_idx, x_t, v, x_s=x_s, validate=False)


def fast_window_start(seed: int, epoch: int, start_max: int) -> int:
    """Flow-GRPO-Fast's window start in epoch ``epoch``: uniform over ``0 .. start_max``, the same on every process."""
    gen = torch.Generator().manual_seed(seeds.fast_window_seed(seed, epoch))
    return int(torch.randint(start_max + 1, (1,), generator=gen))


class GRPO(GroupAdvantageAlgorithm):
    """GRPO over the update engine (knobs: :class:`precise_rl.algorithm_table.GRPOKnobs`)."""

    MEAN_KEYS = ("loss", "policy_loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref")
    MAX_KEYS = ("ratio_max_dev",)

    def __init__(self, knobs: Any, ctx: RunContext) -> None:
        super().__init__(knobs, ctx)
        if knobs.fast_window and ctx.cfg.sampler.window.size:
            raise UserError(
                "algorithm.fast_window (Flow-GRPO-Fast) and sampler.window both choose the stochastic steps; set one"
            )

    def _fast_start_max(self, n: int) -> int:
        k = self.knobs
        start_max = n // 2 - k.fast_window if k.fast_start_max is None else k.fast_start_max
        # the last step ends at t = 0 and draws no noise: a window must end before it
        if start_max < 0 or start_max + k.fast_window > n - 1:
            raise UserError(
                f"algorithm.fast_window={k.fast_window} with fast_start_max={k.fast_start_max} does not fit in "
                f"sampler.num_steps={n} (the window must end before the last step; by default it starts in "
                f"0 .. num_steps // 2 - fast_window): lower fast_window or raise sampler.num_steps"
            )
        return start_max

    def rollout_kernel(self, kern: Kernel, epoch: int) -> Kernel:
        if not self.knobs.fast_window:
            return kern
        n = kern.num_steps
        start = fast_window_start(self.ctx.cfg.seed, epoch, self._fast_start_max(n))
        return kern.with_window(sde_window(n, self.knobs.fast_window, start))

    def initial_seeds(self, row_seeds: list[int], group_size: int) -> list[int] | None:
        if not (self.knobs.fast_window and self.knobs.fast_shared_start):
            return None
        # a process holds whole groups, in order: the group's first sample's seed starts every member
        return [row_seeds[(i // group_size) * group_size] for i in range(len(row_seeds))]

    def epoch_stats(self, targets: torch.Tensor, plan: list[list[torch.Tensor]]) -> dict[str, float]:
        t = self.ctx.cfg.train
        size = t.group_size
        live = len(torch.unique(torch.cat([m for u in plan for m in u]) // size)) if plan else 0
        return {"zero_adv_groups": 1.0 - live / t.groups_per_epoch}

    def begin(self, batch: RolloutBatch, targets: torch.Tensor, epoch: int, inner: int) -> None:
        super().begin(batch, targets, epoch, inner)
        device = self.ctx.device
        self.steps = train_step_indices(batch.kernel, self.knobs.timestep_fraction)
        if not self.steps:
            raise UserError("no stochastic step is trained: check sampler.window and algorithm.timestep_fraction")
        self.steps_t = torch.tensor(self.steps, device=device)
        coeffs = batch.kernel.on_device(device)
        self.std_all = coeffs[2]
        self.guard_all = coeffs[1].abs()

    def items(self) -> int:
        return len(self.steps)

    def forwards_per_row(self) -> tuple[int, int]:
        return 1, int(self.knobs.kl_beta > 0)

    def loss(self, units: torch.Tensor, items: torch.Tensor, idle: bool = False) -> LossOutput:
        k, ctx, batch = self.knobs, self.ctx, self.batch
        sample_idx = self.local_of[units].to(ctx.device)
        step_idx = self.steps_t[items.to(ctx.device)]
        old_lp = batch.log_probs[sample_idx, step_idx]
        a = torch.zeros_like(self.adv[sample_idx]) if idle else self.adv[sample_idx]
        out = recompute(ctx, batch, sample_idx, step_idx)
        if k.guard:
            old_mean = stored_rows(batch.means, ctx.device, sample_idx, step_idx)
            res = guard_loss(
                out.log_prob,
                old_lp,
                a,
                k.clip_range,
                out.mean,
                old_mean,
                self.std_all[step_idx],
                self.guard_all[step_idx],
            )
        else:
            res = ppo_clip_loss(out.log_prob, old_lp, a, k.clip_range)
        loss_rows = res.loss
        kl = None
        if k.kl_beta > 0:
            with torch.no_grad(), reference_weights(ctx):
                ref = recompute(ctx, batch, sample_idx, step_idx)
            kl = kl_penalty(out.mean, ref.mean)
            loss_rows = loss_rows + k.kl_beta * kl
        if idle:
            return LossOutput(loss_rows)
        with torch.no_grad():
            diff = (out.log_prob - old_lp).float()
            stats: dict[str, Any] = {
                "loss": loss_rows,
                "policy_loss": res.loss,
                "clip_frac": res.clipped.float(),
                "approx_kl": 0.5 * diff.square(),
                "ratio_mean": res.ratio,
                "ratio_max_dev": (res.ratio - 1).abs(),
            }
            if kl is not None:
                stats["kl_ref"] = kl
        return LossOutput(loss_rows, stats)
