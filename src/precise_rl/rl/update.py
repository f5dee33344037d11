"""The training pass: PPO updates on one epoch's samples, following the global update plan.

Each process computes the (sample, trained step) pairs of its own samples, ``train.forward_batch``
pairs per forward pass, recomputing each step's log-prob from the stored trajectory with the
current parameters. Its loss is scaled by ``num_processes / pairs in the update`` so that the
gradient DDP/FSDP average over processes is the mean over the whole update; only the last pass of
an update reduces the gradients (:func:`.sharding.gradient_sync`), the others accumulate. Every
process runs the same number of forward/backward passes per update (idle ones have weight 0), which
FSDP's collectives need. Under FSDP the gradients are shards and the clipping norm is the global one
(the shards' norms combined over the processes).

Faults: an update whose loss or gradient is NaN or infinite on any process is skipped on all of
them and counted (``skipped_updates``); an epoch in which no image got a finite reward counts
the same way. After ``train.max_nonfinite`` such updates in a row the run stops, naming the last
checkpoint, which no skipped update touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator

from ..errors import UserError
from ..policies import index_cond
from ..policies.lora import adapters_disabled
from ..sde import Kernel, StepOutput, step
from .checkpoint import list_checkpoints
from .losses import guard_loss, kl_penalty, ppo_clip_loss
from .memory import budget_bytes, fit_line, live_bytes, peak_bytes
from .rollouts import RolloutBatch
from .sharding import gradient_sync

if TYPE_CHECKING:
    from .trainer import GRPOTrainer

__all__ = ["choose_forward_batch", "count_nonfinite", "recompute", "reference_policy", "train_on", "train_step_indices"]


def train_step_indices(kern: Kernel, timestep_fraction: float) -> list[int]:
    """The steps trained per trajectory: stochastic ones among the first ``floor(f * N)``."""
    n_train = max(1, math.floor(timestep_fraction * kern.num_steps)) if timestep_fraction < 1 else kern.num_steps
    return [j for j in range(n_train) if bool(kern.stochastic[j])]


class _StatSums:
    """Sums, counts and maxima of per-pair statistics on the device; reduced over processes at the end."""

    MEAN_KEYS = ("loss", "policy_loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref")
    MAX_KEYS = ("ratio_max_dev",)

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2 * len(self.MEAN_KEYS), dtype=torch.float64, device=device)
        self.maxima = torch.full((len(self.MAX_KEYS),), -math.inf, dtype=torch.float64, device=device)

    def add(self, key: str, values: torch.Tensor) -> None:
        i = self.MEAN_KEYS.index(key)
        self.sums[i] += values.detach().double().sum()
        self.sums[len(self.MEAN_KEYS) + i] += values.numel()

    def maximum(self, key: str, values: torch.Tensor) -> None:
        i = self.MAX_KEYS.index(key)
        self.maxima[i] = torch.maximum(self.maxima[i], values.detach().double().max())

    def means(self, accelerator: Accelerator | None = None) -> dict[str, float]:
        """Means over every pair of every process (``accelerator`` given: a collective)."""
        sums, maxima = self.sums, self.maxima
        if accelerator is not None:
            sums = accelerator.reduce(sums.clone(), "sum")
            maxima = accelerator.gather(maxima[None]).amax(dim=0)
        n = len(self.MEAN_KEYS)
        out = {k: float(sums[i] / sums[n + i]) for i, k in enumerate(self.MEAN_KEYS) if sums[n + i] > 0}
        out.update({k: float(maxima[i]) for i, k in enumerate(self.MAX_KEYS) if math.isfinite(maxima[i])})
        return out


def _n_passes(n_rows: int, n_steps: int, forward_batch: int) -> int:
    """Forward passes over the pairs of ``n_rows`` samples (the length of :func:`_forward_chunks`)."""
    pairs = n_rows * n_steps
    return 0 if pairs == 0 else math.ceil(pairs / (forward_batch or pairs))


def _forward_chunks(rows: torch.Tensor, n_steps: int, forward_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, step positions)`` of each forward pass over the pairs of ``rows`` (one micro-batch)."""
    if len(rows) == 0:
        return []
    sample_all = rows.repeat_interleave(n_steps)
    step_all = torch.arange(n_steps).repeat(len(rows))
    chunk = forward_batch or len(sample_all)
    return [(sample_all[lo : lo + chunk], step_all[lo : lo + chunk]) for lo in range(0, len(sample_all), chunk)]


def recompute(
    trainer: GRPOTrainer, batch: RolloutBatch, sample_idx: torch.Tensor, step_idx: torch.Tensor
) -> StepOutput:
    """Mean and log-prob of the stored transitions ``(sample, step)`` under the current parameters."""
    x_t = batch.latents[sample_idx, step_idx]
    x_s = batch.latents[sample_idx, step_idx + 1]
    sig = batch.kernel.sigmas.to(device=x_t.device, dtype=torch.float32)
    with trainer.accelerator.autocast():
        v = trainer.policy.velocity(x_t, sig[step_idx], index_cond(batch.cond, sample_idx))
    return step(batch.kernel, step_idx, x_t, v, x_s=x_s, validate=False)


@contextmanager
def reference_policy(trainer: GRPOTrainer) -> Iterator[None]:
    """Inside it, the policy computes with the reference weights of the KL term.

    With LoRA the reference is the model with its adapters off; a full fine-tune keeps a frozen
    copy (``trainer.ref_module``), which the policy computes with for the time of the block.
    """
    if trainer.ref_module is None:
        with adapters_disabled(trainer.model):
            yield
        return
    live = trainer.policy.transformer
    trainer.policy.transformer = trainer.ref_module
    try:
        yield
    finally:
        trainer.policy.transformer = live


def _pairs_step(
    trainer: GRPOTrainer,
    batch: RolloutBatch,
    adv: torch.Tensor,
    sample_idx: torch.Tensor,
    step_idx: torch.Tensor,
    std_all: torch.Tensor,
    guard_all: torch.Tensor,
    scale: float,
    sums: _StatSums | None,
) -> bool:
    """Forward and backward of the loss summed over the pairs ``(sample, step)``, times ``scale``.

    ``adv``: this process's rows. Returns whether the loss was finite; ``sums`` (None for an idle
    pass) collects statistics.
    """
    cfg = trainer.cfg.train
    old_lp = batch.log_probs[sample_idx, step_idx]
    a = adv[sample_idx]
    out = recompute(trainer, batch, sample_idx, step_idx)
    if cfg.guard:
        old_mean = batch.means[sample_idx, step_idx]
        res = guard_loss(
            out.log_prob, old_lp, a, cfg.clip_range, out.mean, old_mean, std_all[step_idx], guard_all[step_idx]
        )
    else:
        res = ppo_clip_loss(out.log_prob, old_lp, a, cfg.clip_range)
    loss_rows = res.loss
    kl = None
    if cfg.kl_beta > 0:
        with torch.no_grad(), reference_policy(trainer):
            ref = recompute(trainer, batch, sample_idx, step_idx)
        kl = kl_penalty(out.mean, ref.mean)
        loss_rows = loss_rows + cfg.kl_beta * kl
    loss = loss_rows.sum() * scale
    if not bool(torch.isfinite(loss)):
        # Still run backward (zeroed) so that every process joins the same collectives.
        trainer.accelerator.backward(loss_rows.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0)
        return False
    trainer.accelerator.backward(loss)
    if sums is not None:
        with torch.no_grad():
            diff = (out.log_prob - old_lp).float()
            sums.add("loss", loss_rows)
            sums.add("policy_loss", res.loss)
            sums.add("clip_frac", res.clipped.float())
            sums.add("approx_kl", 0.5 * diff.square())
            sums.add("ratio_mean", res.ratio)
            sums.maximum("ratio_max_dev", (res.ratio - 1).abs())
            if kl is not None:
                sums.add("kl_ref", kl)
    return True


def choose_forward_batch(
    trainer: GRPOTrainer, batch: RolloutBatch, steps_t: torch.Tensor, std_all: torch.Tensor, guard_all: torch.Tensor
) -> int:
    """``train.forward_batch: auto``: the most rows per forward that keep a training pass within the budget.

    Measures two passes of weight 0 (one row, then two: the first trained step of this process's first
    sample) with the loss, precision and checkpointing of the run, fits :class:`.memory.MemoryLine`
    and takes the largest count up to a micro-batch's pairs. The passes change no weight: their
    gradients (zero) are dropped, no gradient is synchronised, and every process runs the same two, so
    the collectives of sharded weights stay matched. Processes take the smallest of their choices.
    """
    cfg = trainer.cfg.train
    acc, device = trainer.accelerator, trainer.accelerator.device
    zero_adv = torch.zeros(len(batch.row_ids), device=device)
    trainer.model.train()  # the mode of the pass itself (dropout, and checkpointing in modules that ask for it)
    live = live_bytes(device)
    peaks = []
    for rows in (1, 2):
        idx = torch.zeros(rows, dtype=torch.long, device=device)

        def one_pass(idx: torch.Tensor = idx) -> None:
            ctx = gradient_sync(acc, trainer.model, False) if trainer.world > 1 else nullcontext()
            with ctx:
                _pairs_step(trainer, batch, zero_adv, idx, steps_t[:1].expand(len(idx)), std_all, guard_all, 0.0, None)

        peaks.append(peak_bytes(one_pass, device))
        trainer.optimizer.zero_grad(set_to_none=True)
    # AdamW's two moments per trainable weight come with the first optimizer step
    moments = 0 if trainer.optimizer.state else 2 * sum(p.numel() * p.element_size() for p in trainer.params)
    line = fit_line(live, peaks[0], peaks[1], moments)
    most = cfg.batch_size * len(steps_t)
    chosen = line.largest(budget_bytes(cfg.memory_budget_gb, device), most)
    if trainer.world > 1:
        chosen = int(acc.gather(torch.tensor([chosen], device=device)).min())
    return chosen


def train_on(trainer: GRPOTrainer, batch: RolloutBatch, adv: torch.Tensor, epoch: int) -> dict[str, float]:
    """Inner epochs of PPO updates on one epoch's samples (``adv``: every row of the epoch); returns statistics.

    Follows :meth:`GRPOTrainer.update_plan`, which every process derives alone from the global
    advantages; this process takes its own rows of them once.
    """
    cfg = trainer.cfg.train
    acc = trainer.accelerator
    device = acc.device
    world, rank = trainer.world, trainer.rank
    kern = batch.kernel
    steps = train_step_indices(kern, cfg.timestep_fraction)
    if not steps:
        raise UserError("no stochastic step is trained: check sampler.window and train.timestep_fraction")
    n_groups, size = cfg.groups_per_epoch, cfg.group_size
    # Which process holds each global sample, and where in this process's batch.
    owner = (torch.arange(n_groups * size) // size) % world
    local_of = torch.full((n_groups * size,), -1, dtype=torch.long)
    local_of[batch.row_ids] = torch.arange(len(batch.row_ids))
    adv_dev = adv[batch.row_ids].to(device=device, dtype=torch.float32)
    zero_adv = torch.zeros_like(adv_dev)
    coeffs = kern.on_device(device)
    std_all = coeffs[2]
    guard_all = coeffs[1].abs()
    steps_t = torch.tensor(steps, device=device)
    if trainer.forward_batch is None:
        trainer.forward_batch = choose_forward_batch(trainer, batch, steps_t, std_all, guard_all)
    fb = trainer.forward_batch
    sums = _StatSums(device)
    grad_norms: list[float] = []
    skipped = 0
    live_groups = 0
    trainer.model.train()
    for inner in range(cfg.inner_epochs):
        plan = trainer.update_plan(batch, adv, epoch, inner)
        if inner == 0:
            live_groups = len(torch.unique(torch.cat([m for u in plan for m in u]) // size)) if plan else 0
        for update in plan:
            total_pairs = sum(len(m) for m in update) * len(steps)
            scale = world / total_pairs
            # Forward passes per process (all derive the same counts alone) and this process's own.
            per_process = [
                sum(_n_passes(int((owner[m] == p).sum()), len(steps), fb) for m in update) for p in range(world)
            ]
            mine = [c for m in update for c in _forward_chunks(local_of[m[owner[m] == rank]], len(steps), fb)]
            n_passes = max(1, max(per_process))
            finite = True
            for c in range(n_passes):
                sync = c == n_passes - 1
                ctx = gradient_sync(acc, trainer.model, sync) if world > 1 else nullcontext()
                with ctx:
                    if c < len(mine):
                        rows_c, steps_c = mine[c]
                        s_idx = rows_c.to(device)
                        t_idx = steps_t[steps_c.to(device)]
                        finite &= _pairs_step(trainer, batch, adv_dev, s_idx, t_idx, std_all, guard_all, scale, sums)
                    else:  # an idle pass of weight 0 keeps this process in step with the others
                        one = torch.zeros(1, dtype=torch.long, device=device)
                        _pairs_step(trainer, batch, zero_adv, one, steps_t[:1], std_all, guard_all, 0.0, None)
            gn = acc.clip_grad_norm_(trainer.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            finite &= math.isfinite(gn)
            if world > 1:
                flag = torch.tensor([1.0 if finite else 0.0], device=device)
                finite = bool(acc.gather(flag).min() > 0)
            if not finite:
                skipped += 1
                trainer.optimizer.zero_grad(set_to_none=True)
                trainer.skipped_updates += 1
                count_nonfinite(trainer)
                continue
            trainer.nonfinite_streak = 0
            grad_norms.append(gn)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.global_step += 1
            if trainer.ema is not None:
                trainer.ema.step()
    out = sums.means(acc if world > 1 else None)
    out["zero_adv_groups"] = 1.0 - live_groups / n_groups
    if grad_norms:
        out["grad_norm"] = float(np.mean(grad_norms))
    out["skipped_updates"] = float(skipped)
    out["forward_batch"] = float(fb)  # rows per training forward (chosen by the budget with ``auto``)
    out["updates"] = float(len(grad_norms))  # optimizer steps taken this epoch
    out["optimizer_steps"] = float(trainer.global_step)  # since the start of the run (the paper's "iteration")
    return out


def count_nonfinite(trainer: GRPOTrainer) -> None:
    """One more update lost to a bad number (NaN/inf loss or gradient, or no finite reward at all).

    After ``train.max_nonfinite`` in a row (no good update between them) the run stops on every
    process with a message naming the last checkpoint, which no skipped update has touched.
    """
    trainer.nonfinite_streak += 1
    limit = trainer.cfg.train.max_nonfinite
    if trainer.nonfinite_streak >= limit:
        ckpts = list_checkpoints(trainer.out / "checkpoints")
        where = (
            f"the last good checkpoint is {str(ckpts[-1])!r} (continue with --resume {str(trainer.out)!r})"
            if ckpts
            else "no checkpoint was written yet"
        )
        raise UserError(
            f"training stopped: {limit} updates in a row had a NaN or infinite loss or gradient, "
            f"or rewards that scored no image (train.max_nonfinite); {where}"
        )
