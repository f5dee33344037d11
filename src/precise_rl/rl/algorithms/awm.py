"""AWM, Advantage Weighted Matching (scxue/advantage_weighted_matching, ``scripts/train_sd3_awm.py``).

A unit is a sample (a row of the epoch); its items are ``train_timesteps`` times at which its
final clean latent ``x0`` is noised afresh, ``x_t = (1 - t) x0 + t eps`` (forward.py). At each
the flow-matching error ``mean (v_theta(x_t, t) - (eps - x0))^2`` is shaped into a "log-prob"
(:func:`awm_log_prob`; the recipes' generalised Huber power 0.25, times ``t``) and weighted by the
sample's group advantage through the reference's PPO-clip form (:func:`awm_loss`). The reference
trains on policy, so the ratio ``exp(lp - lp.detach())`` is exactly 1 and the gradient is
``-A * grad lp``: advantage-weighted flow matching. With ``kl_beta > 0`` two velocity-space KL
terms are added, to the reference weights and to an EMA of the policy that follows the trained
weights once per epoch with decay ``min(ema_decay_max, ema_decay_rate * optimizer steps)``.

Where this differs from the reference on purpose:

* Times are drawn per sample, not per micro-batch. The reference draws the ``T`` stratified grid
  indices once per micro-batch and shares them by its samples; here each row draws its own from a
  generator seeded by (run seed, epoch, pass, row) (:func:`.forward.row_generator`), so that a row
  trains at the same times whatever micro-batch, forward chunk or process computes it, and a
  resumed run repeats an uninterrupted one. Each row's times are still one per stratum, exactly
  the reference's strata; only their correlation across the samples of a micro-batch is gone.
* The noise of each (row, time) comes from its own generator (:func:`.forward.noise_for`), for the
  same reason.
* Only the on-policy form is implemented (the reference's ``off_policy=False``, which every
  recipe uses): no old log-prob is stored and rollouts use the current weights. The EMA policy is
  therefore needed only for its KL term, and is kept only when that term is on
  (``kl_beta > 0`` and ``ema_kl_beta > 0``).
* The reference skips epochs 0 and 1 (no sampling, no training); here every epoch trains.
* The eval EMA (the reference's ``ema_decay`` 0.99) is the run's ``train.ema``, not a knob here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...errors import UserError
from ..rollouts import RolloutBatch
from .base import GroupAdvantageAlgorithm, LossOutput, RunContext, reference_weights
from .forward import OldWeights, forward_noised, noise_for, row_generator, velocity

__all__ = ["AWM", "AWMLoss", "awm_log_prob", "awm_loss", "ema_decay", "row_time_indices", "strata"]

#: the prefix of the EMA policy's weights in a checkpoint's algorithm tensors
EMA_PREFIX = "ema_policy."


def strata(time_type: str, num_steps: int, timestep_fraction: float, train_timesteps: int) -> torch.Tensor:
    """``(T, 2)``: the ``[lower, upper)`` grid-index bounds of each stratum (train_sd3_awm.py L1172-1205).

    ``discrete``: ``linspace(0, int(N * f), T + 1).long()``; ``discrete_wo_init``: from 1, so the
    first grid time (pure noise) is never trained. A stratum whose bounds are equal always gives its
    lower bound, as in the reference.
    """
    top = int(num_steps * timestep_fraction)
    if time_type == "discrete":
        bounds = torch.linspace(0, top, steps=train_timesteps + 1).long()
    elif time_type == "discrete_wo_init":
        bounds = torch.linspace(1, top, steps=train_timesteps + 1).long()
    else:
        raise ValueError(f"unknown AWM time_type {time_type!r}")
    lower, upper = bounds[:-1], bounds[1:]
    # The largest index a draw can give: upper - 1 in a proper stratum, lower in an empty one.
    highest = int(torch.where(upper > lower, upper - 1, lower).max())
    lowest = int(lower.min())
    if lowest < 0 or highest >= num_steps:
        raise UserError(
            f"AWM's {time_type} times over a grid of {num_steps} steps with timestep_fraction "
            f"{timestep_fraction:g} reach index {highest}, beyond the grid: use more sampler steps or discrete"
        )
    return torch.stack([lower, upper], dim=1)


def row_time_indices(bounds: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(T,)``: one grid index per stratum, ``lower + floor(u * (upper - lower))`` with ``u ~ U[0, 1)``."""
    u = torch.rand(len(bounds), generator=generator)
    lower, upper = bounds[:, 0], bounds[:, 1]
    return lower + (u * (upper - lower)).long()


def ema_decay(global_step: int, rate: float, most: float) -> float:
    """The EMA policy's decay after an epoch: ``min(most, rate * global_step)`` (the reference's ``linear``)."""
    return min(most, rate * global_step)


def awm_log_prob(
    v: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, weighting: str, ghuber_power: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``lp``, flow-matching error) per row, float64 (train_sd3_awm.py L234-252).

    The error is ``mean over non-batch dims (v - (eps - x0))^2``; ``lp = -error`` shaped by
    ``weighting``: ``uniform`` as is, ``t`` times t, ``t2`` times t^2, ``ghuber``
    ``-((error + 1e-10)^p - (1e-10)^p) * t / p``. ``t``: ``(R,)``.
    """
    err = (v.double() - (eps.double() - x0.double())).square()
    err = err.mean(dim=tuple(range(1, err.ndim)))
    tt = t.reshape(-1)  # in its own dtype, promoted by the products as in the reference
    lp = -err
    if weighting == "uniform":
        pass
    elif weighting == "t":
        lp = lp * tt
    elif weighting == "t2":
        lp = lp * tt**2
    elif weighting == "ghuber":
        p = ghuber_power
        # The reference subtracts the offset's own power so that a perfect prediction gives lp = 0.
        lp = -((-lp + 1e-10) ** p - torch.tensor(1e-10, dtype=lp.dtype, device=lp.device) ** p) * tt / p
    else:
        raise ValueError(f"unknown AWM weighting {weighting!r}")
    return lp, err


@dataclass
class AWMLoss:
    """Per-row terms of the AWM loss (each ``(R,)``, float64); a KL is None when its term is off."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    log_prob: torch.Tensor
    fm_error: torch.Tensor
    kl_ref: torch.Tensor | None = None
    kl_ema: torch.Tensor | None = None


def awm_loss(
    v: torch.Tensor,
    eps: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    adv: torch.Tensor,
    *,
    v_ref: torch.Tensor | None = None,
    v_ema: torch.Tensor | None = None,
    weighting: str = "ghuber",
    ghuber_power: float = 0.25,
    adv_clip: float = 5.0,
    advantage_max: float = 1.0,
    clip_range: float = 1.0,
    kl_beta: float = 1e-4,
    ema_kl_beta: float = 1.0,
) -> AWMLoss:
    """The AWM loss of each row (train_sd3_awm.py L1285-1354, on policy; the mean over rows is the reference's).

    ``adv``: each row's raw group advantage, clipped to ``[-adv_clip, adv_clip]`` and scaled by
    ``advantage_max / adv_clip``. The KL terms are ``mean (v - v_ref)^2`` and ``mean (v - v_ema)^2``
    (the reference's ``Uniform`` weighting), both only with ``kl_beta > 0`` as in the reference;
    ``v_ref``/``v_ema`` are detached here.
    """
    lp, err = awm_log_prob(v, eps, x0, t, weighting, ghuber_power)
    a = adv.double().clamp(-adv_clip, adv_clip) / adv_clip * advantage_max
    # On policy the old log-prob is the current one detached: the ratio is 1 and carries grad lp.
    ratio = torch.exp(lp - lp.detach())
    policy = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    out = AWMLoss(policy, policy, lp, err)
    if kl_beta > 0:
        if v_ref is None:
            raise ValueError("kl_beta > 0 needs the reference velocity v_ref")
        dims = tuple(range(1, v.ndim))
        vd = v.double()
        out.kl_ref = (vd - v_ref.detach().double()).square().mean(dim=dims)
        out.loss = out.loss + kl_beta * out.kl_ref
        if ema_kl_beta > 0:
            if v_ema is None:
                raise ValueError("ema_kl_beta > 0 needs the EMA policy's velocity v_ema")
            out.kl_ema = (vd - v_ema.detach().double()).square().mean(dim=dims)
            out.loss = out.loss + ema_kl_beta * out.kl_ema
    return out


class AWM(GroupAdvantageAlgorithm):
    """AWM over the update engine (knobs: :class:`precise_rl.algorithm_table.AWMKnobs`)."""

    MEAN_KEYS = ("loss", "policy_loss", "log_prob", "fm_error", "kl_ref", "kl_ema")
    #: the reference trains zero-advantage samples too (their KL terms still act)
    KEEP_FLAT = True

    def __init__(self, knobs: object, ctx: RunContext) -> None:
        super().__init__(knobs, ctx)
        k = self.knobs
        # Only its KL term reads the EMA policy (on policy it samples nothing): no copy without it.
        self.ema_policy = OldWeights(ctx.params) if k.kl_beta > 0 and k.ema_kl_beta > 0 else None

    # ---------------------------------------------------------------- the training pass

    def begin(self, batch: RolloutBatch, targets: torch.Tensor, epoch: int, inner: int) -> None:
        super().begin(batch, targets, epoch, inner)
        k, cfg = self.knobs, self.ctx.cfg
        grid = batch.kernel.sigmas[:-1].detach().cpu()  # the N rollout times; the terminal 0 is not trained
        bounds = strata(k.time_type, len(grid), k.timestep_fraction, k.train_timesteps)
        # (B, T): each local row's times, from its own generator (the module docstring says why per row).
        idx = torch.stack(
            [row_time_indices(bounds, row_generator(cfg.seed, epoch, inner, int(r))) for r in batch.row_ids]
        )
        self.times = grid[idx].to(device=self.ctx.device, dtype=torch.float32)

    def items(self) -> int:
        return int(self.knobs.train_timesteps)

    def forwards_per_row(self) -> tuple[int, int]:
        return 1, int(self.knobs.kl_beta > 0) + int(self.ema_policy is not None)

    def loss(self, units: torch.Tensor, items: torch.Tensor, idle: bool = False) -> LossOutput:
        k, ctx, batch = self.knobs, self.ctx, self.batch
        device = ctx.device
        local = self.local_of[units]
        x0 = batch.latents[local, -1].to(device=device, dtype=torch.float32)
        t = self.times[local.to(device), items.to(device)]
        eps = noise_for(units.tolist(), items.tolist(), tuple(x0.shape[1:]), ctx.cfg.seed, self.epoch, self.inner)
        x_t = forward_noised(x0, eps.to(device), t)
        rows = local.to(device)
        # The no-grad forwards come first: swapping the EMA weights in writes the parameters in place,
        # which would invalidate what a grad forward had saved for its backward.
        v_ref = v_ema = None
        if k.kl_beta > 0:
            with torch.no_grad(), reference_weights(ctx):
                v_ref = velocity(ctx, batch, rows, x_t, t)
            if self.ema_policy is not None:
                with torch.no_grad(), self.ema_policy.swapped_in():
                    v_ema = velocity(ctx, batch, rows, x_t, t)
        v = velocity(ctx, batch, rows, x_t, t)
        # An idle pass only keeps this process in step: a zero advantage, no real row's target read.
        adv = torch.zeros(len(units), device=device) if idle else self.adv[rows]
        out = awm_loss(
            v,
            eps.to(device),
            x0,
            t,
            adv,
            v_ref=v_ref,
            v_ema=v_ema,
            weighting=k.weighting,
            ghuber_power=k.ghuber_power,
            adv_clip=k.adv_clip,
            advantage_max=k.advantage_max,
            clip_range=k.clip_range,
            kl_beta=k.kl_beta,
            ema_kl_beta=k.ema_kl_beta,
        )
        if idle:
            return LossOutput(out.loss)
        stats = {
            "loss": out.loss.detach(),
            "policy_loss": out.policy_loss.detach(),
            "log_prob": out.log_prob.detach(),
            "fm_error": out.fm_error.detach(),
        }
        if out.kl_ref is not None:
            stats["kl_ref"] = out.kl_ref.detach()
        if out.kl_ema is not None:
            stats["kl_ema"] = out.kl_ema.detach()
        return LossOutput(out.loss, stats)

    # ---------------------------------------------------------------- after the epoch; checkpoints

    def after_epoch(self, global_step: int) -> None:
        """The EMA policy follows the trained weights (the reference: once per epoch, after training)."""
        if self.ema_policy is not None:
            k = self.knobs
            self.ema_policy.follow(ema_decay(global_step, k.ema_decay_rate, k.ema_decay_max))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.ema_policy is None:
            return {}
        return self.ema_policy.state_tensors(self.ctx.param_names, EMA_PREFIX)

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if self.ema_policy is not None:
            self.ema_policy.load_state_tensors(self.ctx.param_names, EMA_PREFIX, tensors)
