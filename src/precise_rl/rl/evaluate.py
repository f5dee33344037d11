"""Evaluation: held-out prompts scored with the EMA weights, for each evaluation sampler, on fixed noise.

Protocols (``eval.samplers``): a sampler name evaluates with that sampler (``ode`` is the
deterministic measure); ``own`` is the training sampler at its training eta, the reference's
in-domain measure. Besides the training rewards, the held-out ones (``reward.eval_only`` and the
task's own) are scored and logged; ``eval_reward_ceiling`` is the best the weighted reward could be
on these prompts, where the rewards know it. The eval samples are spread over processes in equal
shares (the last share padded with repeats of the last sample, dropped after gathering); sample
``i`` draws its noise from a generator seeded by ``(seed, i)``, so the scores do not depend on the
number of processes. A reward that fails on one process stops every process (:mod:`.dist`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from ..rewards.base import RewardSet, weighted_raw
from ..sde import SAMPLER_TABLE, kernel
from . import dist
from .ema import EMA
from .rollouts import _seed_for, sample

if TYPE_CHECKING:
    from .trainer import GRPOTrainer

__all__ = ["Evaluator", "eval_weights"]


def _score_sets(
    sets: Sequence[RewardSet], images: torch.Tensor, prompts: list[str], metadata: list[dict]
) -> dict[str, torch.Tensor]:
    """Every component of every reward set on one batch."""
    return {k: v for rewards in sets for k, v in rewards.score(images, prompts, metadata).items()}


def eval_weights(ema: EMA | None) -> AbstractContextManager:
    """The weights evaluated (and saved as the LoRA adapter): the EMA's while it is on, else the live ones."""
    return ema.swapped_in() if ema is not None else nullcontext()


class Evaluator:
    """The evaluation of a trainer's current weights; reads the trainer's config at each call.

    Made for each evaluation and not kept by the trainer: a trainer that referred to it would form a
    cycle, freed only at interpreter shutdown, after torch.distributed is torn down (an abort there).
    """

    def __init__(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer

    def __call__(self, epoch: int, write_grid: bool = True) -> dict[str, float]:
        """``eval_<protocol>_reward`` and ``eval_<protocol>/<reward>`` of every protocol (a collective)."""
        tr = self.trainer
        cfg, e, world, rank = tr.cfg, tr.cfg.eval, tr.world, tr.rank
        prompts_base = tr.eval_prompts[: e.max_prompts]
        prompts_all = [p for p in prompts_base for _ in range(e.samples_per_prompt)]
        n_all = len(prompts_all)
        per = math.ceil(n_all / world)
        idx = [min(i, n_all - 1) for i in range(rank * per, (rank + 1) * per)]
        mine = [prompts_all[i] for i in idx]
        seeds = [_seed_for(cfg.seed, 7, i) for i in idx]
        n_grid = min(e.grid_prompts, len(prompts_base)) * e.samples_per_prompt
        out: dict[str, float] = {}
        ceiling = tr.rewards.max_weighted_raw(prompts_all, tr.task.metadata(prompts_all))
        if ceiling is not None:  # the best the weighted reward could be on these prompts: the curves' headroom
            out["eval_reward_ceiling"] = float(ceiling.mean())
        sigmas = tr._sigmas(e.num_steps)
        sets = [tr.rewards] if tr.eval_rewards is None else [tr.rewards, tr.eval_rewards]
        grid = None
        with eval_weights(tr.ema):
            for key in e.samplers:
                sampler = cfg.sampler.name if key == "own" else key
                eta = cfg.sampler.eta if sampler == cfg.sampler.name else None
                sched = cfg.sampler.schedule if SAMPLER_TABLE[sampler].takes_schedule else None
                _, latents, _, _ = sample(tr, mine, kernel(sampler, sigmas, eta, sched), seeds, store=False)
                with torch.no_grad():
                    images = tr.policy.decode(latents)
                meta = tr.task.metadata(mine)
                comps = dist.score_agreed(functools.partial(_score_sets, sets, images, mine, meta), world)
                comps = dist.same_fields(comps, len(mine), world, tr.accelerator.device)
                comps = dist.gather_rows(tr.accelerator, world, comps)
                comps = {k: v[:n_all].cpu() for k, v in comps.items()}
                raw = weighted_raw({k: comps[k] for k in tr.reward_weights}, tr.reward_weights)
                out[f"eval_{key}_reward"] = float(raw.nanmean())
                for k, v in comps.items():
                    out[f"eval_{key}/{k}"] = float(v.nanmean())
                if write_grid and grid is None:
                    grid = (self._grid_images(images, n_grid, per), key)
        if grid is not None and tr.is_main:
            images, key = grid
            shown = prompts_all[: len(images)]
            tr.logger.sample_grid(images, shown, epoch, key, e.grid_prompts, e.samples_per_prompt)
        return out

    def _grid_images(self, images: torch.Tensor, n_grid: int, per: int) -> torch.Tensor:
        """The first ``n_grid`` eval images of all processes, on the main process (a collective)."""
        tr = self.trainer
        if tr.world == 1:
            return images[:n_grid].detach().cpu()
        take = max(0, min(per, n_grid - tr.rank * per))
        return torch.cat(dist.gather_objects(images[:take].detach().cpu(), tr.world))[:n_grid]
