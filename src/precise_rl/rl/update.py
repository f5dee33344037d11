"""The update engine: one epoch's optimizer updates for any algorithm, following its global plan.

The algorithm (:mod:`.algorithms.base`) gives the plan (micro-batches of global unit ids per
update), the forward rows each unit makes and the per-row loss; the engine does the rest, the same
for every algorithm. Each process runs the rows of its own units, ``train.forward_batch`` rows per
forward pass. Its loss is scaled by ``num_processes / rows in the update`` so that the gradient
DDP/FSDP average over processes is the mean over the whole update; only the last pass of an update
reduces the gradients (:func:`.sharding.gradient_sync`), the others accumulate. Every process runs
the same number of forward/backward passes per update (idle ones have weight 0), which FSDP's
collectives need. Under FSDP the gradients are shards and the clipping norm is the global one (the
shards' norms combined over the processes).

Faults: an update whose loss or gradient is NaN or infinite on any process is skipped on all of
them and counted (``skipped_updates``); an epoch in which no image got a finite reward counts
the same way. After ``train.max_nonfinite`` such updates in a row the run stops, naming the last
checkpoint, which no skipped update touched.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from .algorithms.base import Algorithm
from .checkpoint import list_checkpoints
from .ema import EMA
from .memory import MemoryLine, budget_bytes, fit_line, human_bytes, live_bytes, peak_bytes
from .rollouts import RolloutBatch
from .sharding import gradient_sync, is_dtensor
from .train_state import TrainState

__all__ = ["Engine", "check_forward_batch", "choose_forward_batch", "count_nonfinite", "forward_chunks", "n_passes"]


class _StatSums:
    """Sums, counts and maxima of per-row statistics on the device; reduced over processes at the end."""

    def __init__(self, mean_keys: tuple[str, ...], max_keys: tuple[str, ...], device: torch.device) -> None:
        self.MEAN_KEYS, self.MAX_KEYS = mean_keys, max_keys
        self.sums = torch.zeros(2 * len(mean_keys), dtype=torch.float64, device=device)
        self.maxima = torch.full((len(max_keys),), -math.inf, dtype=torch.float64, device=device)

    def add_all(self, stats: dict[str, torch.Tensor]) -> None:
        n = len(self.MEAN_KEYS)
        for key, values in stats.items():
            if key in self.MEAN_KEYS:
                i = self.MEAN_KEYS.index(key)
                self.sums[i] += values.detach().double().sum()
                self.sums[n + i] += values.numel()
            elif key in self.MAX_KEYS:
                i = self.MAX_KEYS.index(key)
                self.maxima[i] = torch.maximum(self.maxima[i], values.detach().double().max())

    def means(self, accelerator: Accelerator | None = None) -> dict[str, float]:
        """Means over every row of every process (``accelerator`` given: a collective)."""
        sums, maxima = self.sums, self.maxima
        if accelerator is not None:
            sums = accelerator.reduce(sums.clone(), "sum")
            maxima = accelerator.gather(maxima[None]).amax(dim=0)
        n = len(self.MEAN_KEYS)
        out = {k: float(sums[i] / sums[n + i]) for i, k in enumerate(self.MEAN_KEYS) if sums[n + i] > 0}
        out.update({k: float(maxima[i]) for i, k in enumerate(self.MAX_KEYS) if math.isfinite(maxima[i])})
        return out


def n_passes(n_units: int, items: int, forward_batch: int) -> int:
    """Forward passes over the rows of ``n_units`` units (the length of :func:`forward_chunks`)."""
    rows = n_units * items
    return 0 if rows == 0 else math.ceil(rows / (forward_batch or rows))


def forward_chunks(units: torch.Tensor, items: int, forward_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(units, item positions)`` of each forward pass over the rows of ``units`` (one micro-batch)."""
    if len(units) == 0:
        return []
    unit_all = units.repeat_interleave(items)
    item_all = torch.arange(items).repeat(len(units))
    chunk = forward_batch or len(unit_all)
    return [(unit_all[lo : lo + chunk], item_all[lo : lo + chunk]) for lo in range(0, len(unit_all), chunk)]


@dataclass
class Engine:
    """What the update engine works with: the trained weights, the optimizer, the EMA and the processes."""

    train: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    ema: EMA | None
    world: int
    rank: int
    #: where the run's checkpoints are (named when too many updates in a row were not finite)
    checkpoints: Path
    #: whether a hand-set ``train.forward_batch`` was checked against the budget (once per process)
    _budget_checked: bool = False

    def _idle_pass(self, algo: Algorithm, sync: bool) -> None:
        ctx = gradient_sync(self.accelerator, self.model, sync) if self.world > 1 else nullcontext()
        with ctx:
            one = torch.tensor([algo.placeholder()])
            out = algo.loss(one, torch.zeros(1, dtype=torch.long), idle=True)
            self.accelerator.backward(out.loss.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0)

    def _pass(self, algo: Algorithm, units: torch.Tensor, items: torch.Tensor, scale: float, sums: _StatSums) -> bool:
        """Forward and backward of the loss summed over the rows, times ``scale``; whether it was finite."""
        out = algo.loss(units, items)
        loss = out.loss.sum() * scale
        if not bool(torch.isfinite(loss)):
            # Still run backward (zeroed) so that every process joins the same collectives.
            self.accelerator.backward(out.loss.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0)
            return False
        self.accelerator.backward(loss)
        sums.add_all(out.stats)
        return True

    def run(
        self, algo: Algorithm, batch: RolloutBatch, targets: Any, epoch: int, state: TrainState
    ) -> dict[str, float]:
        """The epoch's updates of ``algo`` on this process's ``batch`` (``targets``: every unit); returns statistics.

        Every process derives the same plan from the global targets and takes its own units of it.
        """
        acc, world, rank = self.accelerator, self.world, self.rank
        size = self.train.group_size
        unit_rows = algo.unit_rows(targets)
        # Which process holds each unit: its row's group is rolled out whole on process group % world.
        owner = (unit_rows // size) % world
        sums = _StatSums(algo.MEAN_KEYS, algo.MAX_KEYS, acc.device)
        grad_norms: list[float] = []
        skipped = 0
        extra: dict[str, float] = {}
        fb = 0
        evals = 0  # model evaluations of the epoch's training passes, every process's (a backward counts as one)
        self.model.train()
        for inner in range(self.train.inner_epochs):
            plan = algo.plan(targets, epoch, inner)
            algo.begin(batch, targets, epoch, inner)
            items = algo.items()
            if inner == 0:
                extra = algo.epoch_stats(targets, plan)
            if state.forward_batch is None:
                state.forward_batch = choose_forward_batch(self, algo)
            elif not self._budget_checked:
                check_forward_batch(self, algo, state.forward_batch)
            self._budget_checked = True
            fb = state.forward_batch
            grad, no_grad = algo.forwards_per_row()
            evals += sum(len(m) for u in plan for m in u) * items * (2 * grad + no_grad)
            for update in plan:
                scale = world / (sum(len(m) for m in update) * items)
                # Forward passes per process (all derive the same counts alone) and this process's own.
                per_process = [
                    sum(n_passes(int((owner[m] == p).sum()), items, fb) for m in update) for p in range(world)
                ]
                mine = [c for m in update for c in forward_chunks(m[owner[m] == rank], items, fb)]
                count = max(1, max(per_process))
                finite = True
                for c in range(count):
                    sync = c == count - 1
                    if c < len(mine):
                        ctx = gradient_sync(acc, self.model, sync) if world > 1 else nullcontext()
                        with ctx:
                            finite &= self._pass(algo, mine[c][0], mine[c][1], scale, sums)
                    else:  # an idle pass of weight 0 keeps this process in step with the others
                        self._idle_pass(algo, sync)
                gn = acc.clip_grad_norm_(self.params, self.train.grad_clip if self.train.grad_clip > 0 else math.inf)
                gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                finite &= math.isfinite(gn)
                if world > 1:
                    flag = torch.tensor([1.0 if finite else 0.0], device=acc.device)
                    finite = bool(acc.gather(flag).min() > 0)
                if not finite:
                    skipped += 1
                    if getattr(acc, "scaler", None) is not None:
                        # fp16: clipping unscaled the gradients; without the scaler's update (which a step
                        # would make) the next update's unscale would fail, and the scale would never back off
                        acc.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    state.skipped_updates += 1
                    count_nonfinite(state, self.train.max_nonfinite, self.checkpoints)
                    continue
                state.nonfinite_streak = 0
                grad_norms.append(gn)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                if self.ema is not None:
                    self.ema.step()
                algo.after_step(state.global_step)
        algo.after_epoch(state.global_step)
        out = sums.means(acc if world > 1 else None)
        out.update(extra)
        if grad_norms:
            out["grad_norm"] = float(np.mean(grad_norms))
        out["skipped_updates"] = float(skipped)
        out["forward_batch"] = float(fb)  # rows per training forward (chosen by the budget with ``auto``)
        out["updates"] = float(len(grad_norms))  # optimizer steps taken this epoch
        out["optimizer_steps"] = float(state.global_step)  # since the start of the run (the paper's "iteration")
        out["model_evals_train"] = float(evals)
        return out


def _training_line(engine: Engine, algo: Algorithm) -> MemoryLine:
    """The memory line of this run's training pass: two passes of weight 0 measured (one row, then two: the first
    item of this process's placeholder unit) with the loss, precision and checkpointing of the run.

    The passes change no weight: their gradients (zero) are dropped, no gradient is synchronised, and every
    process runs the same two, so the collectives of sharded weights stay matched.
    """
    acc, device = engine.accelerator, engine.accelerator.device
    engine.model.train()  # the mode of the pass itself (dropout, and checkpointing in modules that ask for it)
    live = live_bytes(device)
    peaks = []
    unit = algo.placeholder()
    for rows in (1, 2):

        def one_pass(rows: int = rows) -> None:
            ctx = gradient_sync(acc, engine.model, False) if engine.world > 1 else nullcontext()
            with ctx:
                out = algo.loss(torch.full((rows,), unit), torch.zeros(rows, dtype=torch.long), idle=True)
                acc.backward(out.loss.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0)

        peaks.append(peak_bytes(one_pass, device))
        engine.optimizer.zero_grad(set_to_none=True)
    # AdamW's two moments per trainable weight come with the first optimizer step
    # (this process's share: an FSDP shard's numel() is the whole weight's)
    local = [p.to_local() if is_dtensor(p) else p for p in engine.params]
    moments = 0 if engine.optimizer.state else 2 * sum(p.numel() * p.element_size() for p in local)
    return fit_line(live, peaks[0], peaks[1], moments)


def choose_forward_batch(engine: Engine, algo: Algorithm) -> int:
    """``train.forward_batch: auto``: the most rows per forward that keep a training pass within the budget.

    Fits :class:`.memory.MemoryLine` (:func:`_training_line`) and takes the largest count up to a micro-batch's
    rows. Processes take the smallest of their choices.
    """
    acc, device = engine.accelerator, engine.accelerator.device
    line = _training_line(engine, algo)
    most = engine.train.batch_size * algo.items()
    chosen = line.largest(budget_bytes(engine.train.memory_budget_gb, device), most)
    if engine.world > 1:
        chosen = int(acc.gather(torch.tensor([chosen], device=device)).min())
    return chosen


def check_forward_batch(engine: Engine, algo: Algorithm, forward_batch: int) -> None:
    """A hand-set ``train.forward_batch`` against the budget, measured as ``auto`` measures it, at the first
    training pass (before any update): one sentence naming the knob if its pass would not fit, instead of running
    out of memory in the middle of the run. Only where there is a budget (a GPU, or ``train.memory_budget_gb``)."""
    device = engine.accelerator.device
    if device.type != "cuda" and engine.train.memory_budget_gb is None:
        return
    budget = budget_bytes(engine.train.memory_budget_gb, device)
    most = engine.train.batch_size * algo.items()
    rows = min(forward_batch or most, most)
    line = _training_line(engine, algo)
    need = line.peak(rows)
    if engine.world > 1:
        need = int(engine.accelerator.gather(torch.tensor([need], device=device)).max())
    if need > budget:
        fits = max(0, (budget - line.fixed) // line.per_row) if line.per_row > 0 else 0
        hint = f"at most {fits} fit" if fits >= 1 else "not even one row fits: turn on gradient_checkpointing"
        raise UserError(
            f"train.forward_batch {forward_batch} ({rows} rows per training forward) takes {human_bytes(need)}, more "
            f"than the budget of {human_bytes(budget)} (train.memory_budget_gb, or 90% of the GPU): lower "
            f"train.forward_batch ({hint}) or set it to auto"
        )


def count_nonfinite(state: TrainState, limit: int, checkpoints: Path) -> None:
    """One more update lost to a bad number (NaN/inf loss or gradient, or no finite reward at all).

    After ``limit`` (``train.max_nonfinite``) in a row (no good update between them) the run stops on
    every process with a message naming the last checkpoint, which no skipped update has touched.
    """
    state.nonfinite_streak += 1
    if state.nonfinite_streak >= limit:
        ckpts = list_checkpoints(checkpoints)
        run = checkpoints.parent
        where = (
            f"the last good checkpoint is {str(ckpts[-1])!r} (continue with --resume {str(run)!r})"
            if ckpts
            else "no checkpoint was written yet"
        )
        raise UserError(
            f"training stopped: {limit} updates in a row had a NaN or infinite loss or gradient, "
            f"or rewards that scored no image (train.max_nonfinite); {where}"
        )
