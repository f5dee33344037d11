"""Online Diffusion-DPO: pairs of one group's samples, the Diffusion-DPO loss against the initial weights.

Flow-Factory's on-policy form (X-GenGroup/Flow-Factory ``src/flow_factory/trainers/dpo.py`` at
a0b2bc5a; the loss is also yifan123/flow_grpo ``scripts/train_sd3_dpo.py`` L873-931 at 9745241c):
each epoch's samples are rolled out by the current policy; every group gives (winner, loser) pairs
by its rewards; both samples of a pair are noised with one time ``t`` and one noise ``eps``,
``x_t = (1 - t) x0 + t eps``, and the loss of a pair is

    mse_*  = mean over the non-batch dims of (v_theta(x_t*) - (eps - x0*))^2     (ref_* with the reference)
    inside = -0.5 * beta * ((mse_w - ref_w) - (mse_l - ref_l))
    loss   = -logsigmoid(inside)

where the reference is the frozen initial weights (:func:`.base.reference_weights`: the model
with its LoRA adapters off, or a frozen copy in a full fine-tune). A unit of the update engine is
a pair (its global index in :attr:`DPOTargets.pairs`), its items the ``train_timesteps`` times at
which it is noised; a forward row is one (pair, time) and makes two model rows, winner and loser,
evaluated in one batched call with gradient and one under the reference weights without.

Where this differs from the references, deliberately:

* Pairs come from the combined reward (:func:`precise_rl.rewards.base.combine_rewards`: the
  weighted sum of each reward z-scored over the epoch; FF pairs on its ``gdpo`` advantages, FG on
  the raw average reward; within a group of one reward the three order the samples alike). Rows a
  weighted reward could not score (NaN) take no part. A group with fewer than two scored rows or
  whose scored rewards are all equal gives no pair: FG then forces the pair (1, 0) and FF forms the
  degenerate pair (i, i) (zero gradient, but counted in its mean); here it is simply left out.
* ``pairs: all`` (every ordered pair whose combined rewards differ by more than ``margin``, in the
  combined reward's z-score units) is ours; both references train the best/worst pair only.
* Each (pair, item) draws its own time and noise from a generator seeded by
  ``(seed, epoch, inner, pair, item)`` (:func:`.forward.row_generator`): a pair trains on the same
  ``x_t`` whatever the micro-batching or the number of processes, and a resumed run repeats an
  uninterrupted one. FF draws one time per micro-batch and time index (shared by its pairs) and its
  noise from the global RNG; FG one per pair from the global RNG.
* The time is FF's logit-normal sampler at ``time_shift = 1`` and ``timestep_range = 0.99``,
  ``t = 1 - 0.99 clamp(sigmoid(z), 0.01, 1 - 1e-6)``, ``z ~ N(0, 1)``, used as the flow time
  directly (FG instead looks ``sigmoid(z)`` up on SD3's shifted 1000-step training grid).
* ``train.batch_size`` counts pairs per micro-batch (each makes two model rows per time) and
  ``train.grad_accum`` micro-batches per optimizer step; an update's loss is the mean over all of
  its (pair, time) rows, as the engine does for every algorithm. FF and FG step once per batch of
  pairs after accumulating over its times, which is this with ``grad_accum: 1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...rewards.base import combine_rewards
from .. import seeds
from ..rollouts import RolloutBatch
from .base import Algorithm, LossOutput, reference_weights
from .forward import forward_noised, row_generator, velocity

__all__ = [
    "DPO",
    "DPOLoss",
    "DPOTargets",
    "PLACEHOLDER",
    "all_pairs",
    "best_worst_pairs",
    "diffusion_dpo_loss",
    "logit_normal_time",
    "pair_draws",
    "pair_plan",
]

#: the unit of passes of weight 0 (:meth:`DPO.placeholder`): this process's first row paired with
#: itself. Not a pair index, so that it exists on a process with no pair this epoch.
PLACEHOLDER = -1


# --------------------------------------------------------------------------- the loss (pure)


@dataclass
class DPOLoss:
    """The Diffusion-DPO loss of a batch of pairs and its parts, each ``(P,)``."""

    loss: torch.Tensor  #: ``-logsigmoid(inside)`` per pair
    inside: torch.Tensor  #: ``-0.5 beta ((mse_w - ref_w) - (mse_l - ref_l))``
    mse_w: torch.Tensor  #: the trained model's squared error on the winners
    mse_l: torch.Tensor
    ref_w: torch.Tensor  #: the reference's squared error on the winners
    ref_l: torch.Tensor


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared error over the non-batch dims, in float32 (the references' ``.float()``)."""
    return (pred.float() - target.float()).square().flatten(1).mean(dim=1)


def diffusion_dpo_loss(
    pred_w: torch.Tensor,
    pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    beta: float,
) -> DPOLoss:
    """The per-pair Diffusion-DPO loss from velocity predictions and their targets ``eps - x0``.

    FF trainers/dpo.py L597-617 / FG train_sd3_dpo.py L925-931, per pair instead of their mean.
    """
    mse_w, mse_l = _mse(pred_w, target_w), _mse(pred_l, target_l)
    ref_w, ref_l = _mse(ref_pred_w, target_w), _mse(ref_pred_l, target_l)
    inside = -0.5 * beta * ((mse_w - ref_w) - (mse_l - ref_l))
    return DPOLoss(-F.logsigmoid(inside), inside, mse_w, mse_l, ref_w, ref_l)


# --------------------------------------------------------------------------- pairs (pure, global)


def best_worst_pairs(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(P, 2)`` global (winner, loser) rows: each group's best scored row against its worst.

    ``reward``: ``(N,)`` per row, NaN where unscored. A group with fewer than two scored rows or
    whose scored rewards are all equal gives no pair. Ties for best or worst go to the first row.
    """
    r = reward.detach().double().cpu().reshape(-1, group_size)
    scored = torch.isfinite(r)
    best = torch.where(scored, r, -math.inf).argmax(dim=1)
    worst = torch.where(scored, r, math.inf).argmin(dim=1)
    groups = torch.arange(len(r))
    live = (scored.sum(dim=1) >= 2) & (r[groups, best] > r[groups, worst])
    base = groups * group_size
    return torch.stack([base + best, base + worst], dim=1)[live].long()


def all_pairs(reward: torch.Tensor, group_size: int, margin: float) -> torch.Tensor:
    """``(P, 2)`` global (winner, loser) rows: every ordered pair of one group with ``r_w - r_l > margin``.

    Unscored rows (NaN) take no part. Ordered by group, then winner, then loser.
    """
    r = reward.detach().double().cpu().reshape(-1, group_size)
    gap = r[:, :, None] - r[:, None, :]  # (G, w, l); NaN wherever a row is unscored, and NaN > m is False
    g, w, lo = torch.nonzero(gap > margin, as_tuple=True)
    return torch.stack([g * group_size + w, g * group_size + lo], dim=1).long()


@dataclass
class DPOTargets:
    """An epoch's pairs: what :meth:`DPO.targets` gives the update engine."""

    pairs: torch.Tensor  #: ``(P, 2)`` global (winner, loser) rows; unit ``u`` is pair ``u``
    reward: torch.Tensor  #: ``(N,)`` the combined reward of every row (NaN: unscored)

    @property
    def gap(self) -> torch.Tensor:
        """``(P,)`` each pair's combined-reward difference ``r_w - r_l`` (> 0)."""
        return self.reward[self.pairs[:, 0]] - self.reward[self.pairs[:, 1]]


def pair_plan(
    n_pairs: int, batch_size: int, grad_accum: int, seed: int, epoch: int, inner: int
) -> list[list[torch.Tensor]]:
    """The updates of pass ``inner``: every pair once in a random order, ``batch_size`` pairs per
    micro-batch and ``grad_accum`` micro-batches per update (global pair ids, the same on every process)."""
    gen = torch.Generator().manual_seed(seeds.plan_seed(seed, epoch, inner))
    order = torch.randperm(n_pairs, generator=gen)
    micro = list(order.split(batch_size)) if n_pairs else []
    return [micro[u : u + grad_accum] for u in range(0, len(micro), grad_accum)]


# --------------------------------------------------------------------------- times and noise (per pair and item)


def logit_normal_time(z: torch.Tensor) -> torch.Tensor:
    """FF's logit-normal time at ``time_shift = 1``, ``timestep_range = 0.99``, as a flow time in (0, 1).

    ``t = 1 - 0.99 clamp(sigmoid(z), 0.01, 1 - 1e-6)`` (FF utils/noise_schedule.py L82-154, divided by 1000).
    """
    return 1.0 - 0.99 * torch.sigmoid(z).clamp(0.01, 1.0 - 1e-6)


def pair_draws(
    seed: int, epoch: int, inner: int, unit: int, item: int, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair ``unit``'s time (a 0-dim tensor) and noise ``shape`` for its item ``item``, float32, CPU.

    One generator per (pair, item), the time drawn before the noise; winner and loser share both.
    """
    gen = row_generator(seed, epoch, inner, unit, item)
    z = torch.randn((), generator=gen)
    eps = torch.randn(shape, generator=gen)
    return logit_normal_time(z), eps


# --------------------------------------------------------------------------- the algorithm


class DPO(Algorithm):
    """Online Diffusion-DPO over the update engine (knobs: :class:`precise_rl.algorithm_table.DPOKnobs`)."""

    MEAN_KEYS = (
        "loss",
        "implicit_acc",
        "implicit_reward_winner",
        "implicit_reward_loser",
        "mse_winner",
        "mse_loser",
        "ref_mse_winner",
        "ref_mse_loser",
    )

    # ---------------------------------------------------------------- targets and plan (global, pure)

    def targets(self, comps: Mapping[str, torch.Tensor], weights: Mapping[str, float], epoch: int) -> DPOTargets:
        """The epoch's pairs, from the combined reward of every row (global order)."""
        reward = combine_rewards(comps, weights).detach().cpu()
        reward = torch.where(torch.isfinite(reward), reward, math.nan)
        size = self.ctx.cfg.train.group_size
        if self.knobs.pairs == "all":
            pairs = all_pairs(reward, size, self.knobs.margin)
        else:
            pairs = best_worst_pairs(reward, size)
        return DPOTargets(pairs, reward)

    def unit_rows(self, targets: DPOTargets) -> torch.Tensor:
        # The winner places its pair; the loser is of the same group, so on the same process.
        return targets.pairs[:, 0]

    def plan(self, targets: DPOTargets, epoch: int, inner: int) -> list[list[torch.Tensor]]:
        t = self.ctx.cfg.train
        return pair_plan(len(targets.pairs), t.batch_size, t.grad_accum, self.ctx.cfg.seed, epoch, inner)

    def epoch_stats(self, targets: DPOTargets, plan: list[list[torch.Tensor]]) -> dict[str, float]:
        out = {"pairs": float(len(targets.pairs))}
        if len(targets.pairs):
            out["pair_reward_gap"] = float(targets.gap.mean())
        return out

    # ---------------------------------------------------------------- the training pass (this process)

    def begin(self, batch: RolloutBatch, targets: DPOTargets, epoch: int, inner: int) -> None:
        super().begin(batch, targets, epoch, inner)
        n_rows = len(targets.reward)
        local_of = torch.full((n_rows,), -1, dtype=torch.long)
        local_of[batch.row_ids.cpu()] = torch.arange(len(batch.row_ids))
        # Local (winner, loser) rows of every pair, then the placeholder's (row 0 with itself) last,
        # so that index PLACEHOLDER = -1 picks it.
        # (Every process holds rows: the engine's placeholder of every algorithm assumes it.)
        self.local_pairs = torch.cat([local_of[targets.pairs], torch.zeros((1, 2), dtype=torch.long)])
        self.x0 = batch.latents[:, -1]  # keeps="final": the clean latent a rollout ended in

    def items(self) -> int:
        return self.knobs.train_timesteps

    def placeholder(self) -> int:
        return PLACEHOLDER

    def forwards_per_row(self) -> tuple[int, int]:
        # winner and loser with the trained weights, and both again with the reference's
        return 2, 2

    def loss(self, units: torch.Tensor, items: torch.Tensor, idle: bool = False) -> LossOutput:
        ctx, x0_all = self.ctx, self.x0
        units, items = units.cpu(), items.cpu()
        local = self.local_pairs[units]  # (R, 2)
        if not idle and bool((local < 0).any()):
            raise RuntimeError("a pair of another process was given to this one")
        shape = tuple(x0_all.shape[1:])
        seed = ctx.cfg.seed
        draws = [
            pair_draws(seed, self.epoch, self.inner, int(u), int(j), shape) for u, j in zip(units, items, strict=True)
        ]
        t = torch.stack([d[0] for d in draws]).to(ctx.device)
        eps = torch.stack([d[1] for d in draws]).to(device=ctx.device, dtype=x0_all.dtype)
        rows = torch.cat([local[:, 0], local[:, 1]]).to(ctx.device)  # winners, then losers
        x0 = x0_all[rows]
        eps2, t2 = torch.cat([eps, eps]), torch.cat([t, t])
        x_t = forward_noised(x0, eps2, t2)
        target = eps2 - x0
        v = velocity(ctx, self.batch, rows, x_t, t2)
        with torch.no_grad(), reference_weights(ctx):
            v_ref = velocity(ctx, self.batch, rows, x_t, t2)
        r = len(units)
        res = diffusion_dpo_loss(v[:r], v[r:], v_ref[:r], v_ref[r:], target[:r], target[r:], self.knobs.beta)
        if idle:
            return LossOutput(res.loss)
        with torch.no_grad():
            scale = -0.5 * self.knobs.beta
            stats = {
                "loss": res.loss,
                "implicit_acc": (res.inside > 0).float(),
                # FF's implicit rewards: the DPO reward each sample is given, -0.5 beta (mse - ref)
                "implicit_reward_winner": scale * (res.mse_w - res.ref_w),
                "implicit_reward_loser": scale * (res.mse_l - res.ref_l),
                "mse_winner": res.mse_w,
                "mse_loser": res.mse_l,
                "ref_mse_winner": res.ref_w,
                "ref_mse_loser": res.ref_l,
            }
        return LossOutput(res.loss, stats)
