"""The interface of an algorithm: what it adds to the shared update engine.

The engine (:mod:`precise_rl.rl.update`) owns everything every algorithm needs: micro-batching
and ``train.forward_batch`` (``auto`` included), the same number of forward/backward passes on
every process, the agreed skip of an update with a NaN or infinite loss or gradient, gradient
clipping, the optimizer and EMA steps. An algorithm says only:

* :meth:`Algorithm.targets`: how the epoch's reward components (every process's, in global row
  order) become its training targets (advantages, optimality, pairs);
* :meth:`Algorithm.plan`: which units (rows, or pairs of rows) each optimizer update trains, as
  micro-batches of global unit ids, and :meth:`Algorithm.unit_rows`: the row that places each unit
  on a process (a group lives whole on one process);
* :meth:`Algorithm.items`: how many forward rows one unit makes (its trained steps, or the times at
  which it is noised), and :meth:`Algorithm.loss`: the per-row loss of a chunk of ``(unit, item)``
  rows with its statistics;
* :meth:`Algorithm.after_step`, :meth:`Algorithm.state_tensors`: what it does after an optimizer
  step and what it keeps in checkpoints (an "old" policy updated by EMA, say).

An algorithm computes with explicit inputs (:class:`RunContext`), not with the trainer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn

from ...config import ExperimentConfig
from ...policies import Policy
from ...policies.lora import adapters_disabled
from ...sde import Kernel
from ..advantages import advantages, update_plan
from ..rollouts import RolloutBatch

__all__ = [
    "Algorithm",
    "GroupAdvantageAlgorithm",
    "LossOutput",
    "RunContext",
    "reference_weights",
    "swapped_weights",
]


@dataclass
class RunContext:
    """What an algorithm reads of a run: the policy, its trained module and parameters, the config."""

    cfg: ExperimentConfig
    policy: Policy
    model: nn.Module
    params: list[torch.Tensor]
    param_names: list[str]
    accelerator: Accelerator
    #: a frozen copy of the initial weights (full fine-tune with a reference term); None with LoRA,
    #: whose reference is the model with its adapters off
    reference: nn.Module | None = None
    world: int = 1
    rank: int = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class LossOutput:
    """The per-row loss of one forward chunk, and per-row statistics by name (each ``(R,)``)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def reference_weights(ctx: RunContext) -> Iterator[None]:
    """Inside it, the policy computes with the reference weights (the initial ones).

    With LoRA the reference is the model with its adapters off; a full fine-tune keeps a frozen
    copy (``ctx.reference``), which the policy computes with for the time of the block. With
    ``train.reference_on_cpu`` that copy lives in CPU memory and is on the device only inside the block
    (moving weights copies them exactly: the same numbers).
    """
    if ctx.reference is None:
        with adapters_disabled(ctx.model):
            yield
        return
    offloaded = ctx.cfg.train.reference_on_cpu
    if offloaded:
        ctx.reference.to(ctx.device)
    live = ctx.policy.transformer
    ctx.policy.transformer = ctx.reference
    try:
        yield
    finally:
        ctx.policy.transformer = live
        if offloaded:
            ctx.reference.to("cpu")


@contextmanager
def swapped_weights(params: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside it, ``params`` hold ``weights`` (e.g. an old policy's), restored after (no autograd)."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup, strict=True):
                p.copy_(b)


class Algorithm:
    """The base of every algorithm; see the module docstring for what each method is for."""

    #: statistics averaged over every trained row of an epoch (logged under these names)
    MEAN_KEYS: ClassVar[tuple[str, ...]] = ("loss",)
    #: statistics whose maximum over the epoch is logged
    MAX_KEYS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, knobs: Any, ctx: RunContext) -> None:
        self.knobs = knobs
        self.ctx = ctx

    # ---------------------------------------------------------------- rollouts

    def rollout_kernel(self, kern: Kernel, epoch: int) -> Kernel:
        """The kernel epoch ``epoch`` rolls out with (default: the run's, with ``sampler.window`` applied)."""
        return kern

    def rollout_weights(self) -> AbstractContextManager:
        """The weights rollouts are drawn with, entered around sampling (default: the current ones)."""
        return nullcontext()

    def initial_seeds(self, row_seeds: Sequence[int], group_size: int) -> list[int] | None:
        """Seeds of the rollouts' initial latents when they are not the rows' own (default: None, their own)."""
        return None

    # ---------------------------------------------------------------- from scores to targets (global, pure)

    def targets(self, comps: Mapping[str, torch.Tensor], weights: Mapping[str, float], epoch: int) -> Any:
        """The epoch's training targets from the reward components of every row (global order, CPU)."""
        raise NotImplementedError

    def unit_rows(self, targets: Any) -> torch.Tensor:
        """``(U,)``: the global row that places each unit (default: units are rows)."""
        raise NotImplementedError

    def plan(self, targets: Any, epoch: int, inner: int) -> list[list[torch.Tensor]]:
        """The optimizer updates of pass ``inner``: each a list of micro-batches of global unit ids."""
        raise NotImplementedError

    def epoch_stats(self, targets: Any, plan: list[list[torch.Tensor]]) -> dict[str, float]:
        """Statistics of the epoch's targets and first plan, logged with the training statistics."""
        return {}

    # ---------------------------------------------------------------- the training pass (this process)

    def begin(self, batch: RolloutBatch, targets: Any, epoch: int, inner: int) -> None:
        """Called before pass ``inner`` over this process's ``batch``: keep what :meth:`loss` reads."""
        self.batch, self.targets_, self.epoch, self.inner = batch, targets, epoch, inner

    def items(self) -> int:
        """Forward rows per unit (trained steps, or noised times)."""
        raise NotImplementedError

    def loss(self, units: torch.Tensor, items: torch.Tensor, idle: bool = False) -> LossOutput:
        """Per-row loss of the rows ``(units[i], items[i])`` (global unit ids, item positions).

        ``idle``: a pass of weight 0 that only keeps this process in step with the others (its
        gradient is dropped); ``units`` is then :meth:`placeholder`'s.
        """
        raise NotImplementedError

    def placeholder(self) -> int:
        """A unit of this process for passes of weight 0 (idle passes, the memory probe)."""
        raise NotImplementedError

    def forwards_per_row(self) -> tuple[int, int]:
        """Model evaluations per forward row: (with gradient, without: an old or reference policy's)."""
        return 1, 0

    # ---------------------------------------------------------------- after an optimizer step; checkpoints

    def after_step(self, global_step: int) -> None:
        """Called after every optimizer step."""

    def after_epoch(self, global_step: int) -> None:
        """Called after an epoch's updates, with the optimizer steps taken so far (e.g. to move an old policy)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of its own to checkpoint (whole, by name); empty for a stateless algorithm."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` from a checkpoint."""


class GroupAdvantageAlgorithm(Algorithm):
    """An algorithm whose units are the epoch's samples and whose targets are their group advantages.

    GRPO, DiffusionNFT and AWM: the knobs ``adv_std`` and ``adv_clip`` shape the advantages
    (:func:`.advantages.advantages`), the plan is :func:`.advantages.update_plan`'s, and :meth:`begin`
    keeps, for the loss, where each global row sits in this process's batch (``local_of``) and the
    advantages of this process's rows in batch order (``adv``).
    """

    #: train groups whose advantages are all 0 (their loss still acts, e.g. a KL term or NFT's pull to the old policy)
    KEEP_FLAT: ClassVar[bool] = False

    def targets(self, comps: Mapping[str, torch.Tensor], weights: Mapping[str, float], epoch: int) -> torch.Tensor:
        """Group advantages of every row (NaN where no weighted reward scored the image)."""
        k, t = self.knobs, self.ctx.cfg.train
        return advantages(comps, weights, t.group_size, k.adv_std, k.adv_clip)[0]

    def unit_rows(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(targets))

    def plan(self, targets: torch.Tensor, epoch: int, inner: int) -> list[list[torch.Tensor]]:
        t = self.ctx.cfg.train
        return update_plan(
            targets, t.group_size, t.batch_size, t.grad_accum, self.ctx.cfg.seed, epoch, inner, self.KEEP_FLAT
        )

    def begin(self, batch: RolloutBatch, targets: torch.Tensor, epoch: int, inner: int) -> None:
        super().begin(batch, targets, epoch, inner)
        n_rows = self.ctx.cfg.train.groups_per_epoch * self.ctx.cfg.train.group_size
        self.local_of = torch.full((n_rows,), -1, dtype=torch.long)
        self.local_of[batch.row_ids] = torch.arange(len(batch.row_ids))
        self.adv = targets[batch.row_ids].to(device=self.ctx.device, dtype=torch.float32)

    def placeholder(self) -> int:
        return int(self.batch.row_ids[0])
