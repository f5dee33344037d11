"""From the epoch's scores to the update plan, on global rows (pure functions, the same on every process).

Row ``r`` of an epoch is sample ``r % group_size`` of group ``r // group_size``. The scores of every
process are gathered and put in this order before anything is computed, because the z-scored
combination of several rewards and ``adv_std: batch`` need statistics of the whole epoch, not of one
process's share, and a group is never split. Each process takes its own rows of the advantages once,
in the update (:mod:`.update`).

An image to which any weighted reward gave NaN or inf (a remote reward that got no answer, a broken
score) is left out of its group's statistics and gets a NaN advantage, which keeps it out of the plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..rewards.base import combine_rewards, weighted_raw
from . import seeds
from .losses import group_advantages

__all__ = ["advantages", "global_order", "update_plan", "usable_rows"]


def global_order(comps: Mapping[str, torch.Tensor], rows: torch.Tensor, n_rows: int) -> dict[str, torch.Tensor]:
    """``comps`` (rows ``rows`` in any order, gathered from every process) sorted by row, on the CPU.

    Raises RuntimeError unless the rows are ``0 .. n_rows - 1`` exactly once each.
    """
    order = torch.argsort(rows)
    if not torch.equal(rows[order].cpu(), torch.arange(n_rows)):
        raise RuntimeError("the processes' samples do not cover the epoch exactly once")
    return {k: v[order].cpu() for k, v in comps.items()}


def advantages(
    comps: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_size: int, adv_std: str, adv_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, raw weighted reward) of every row; NaN advantage where the combined reward is not finite."""
    combined = combine_rewards(comps, weights)
    scored = torch.isfinite(combined)
    adv = torch.full_like(combined, math.nan)
    if bool(scored.any()):
        gids = torch.arange(len(combined)) // group_size
        adv[scored] = group_advantages(combined[scored], gids[scored], adv_std, adv_clip)
    return adv, weighted_raw(comps, weights)


def usable_rows(adv: torch.Tensor, group_size: int, keep_flat: bool = False) -> torch.Tensor:
    """Mask of the rows trained this epoch: finite advantage, in a group with some non-zero advantage.

    A group of equal rewards (all advantages 0) carries no signal for GRPO; ``keep_flat`` keeps it
    (an algorithm whose loss still regularises such rows, as DiffusionNFT's and AWM's do).
    """
    adv = adv.detach().cpu().reshape(-1, group_size)
    ok = torch.isfinite(adv)
    if keep_flat:
        return ok.flatten()
    live = (ok & (adv != 0)).any(dim=1, keepdim=True)
    return (ok & live).flatten()


def update_plan(
    adv: torch.Tensor,
    group_size: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    inner: int,
    keep_flat: bool = False,
) -> list[list[torch.Tensor]]:
    """The optimizer updates of pass ``inner``: each a list of micro-batches of global row ids.

    Samples are visited slot by slot (member ``j`` of every trained group, in a fresh random member
    order per group and pass), ``batch_size`` per micro-batch, ``grad_accum`` micro-batches per update.
    ``keep_flat``: see :func:`usable_rows`.
    """
    usable = usable_rows(adv, group_size, keep_flat)
    n_groups = len(usable) // group_size
    gen = torch.Generator().manual_seed(seeds.plan_seed(seed, epoch, inner))
    members = torch.argsort(torch.rand(n_groups, group_size, generator=gen), dim=1)
    order = (torch.arange(n_groups)[:, None] * group_size + members).t().flatten()
    order = order[usable[order]]
    micro = list(order.split(batch_size)) if len(order) else []
    return [micro[u : u + grad_accum] for u in range(0, len(micro), grad_accum)]
