"""Evaluation: held-out prompts scored for each evaluation protocol, on fixed noise.

Protocols (``eval.samplers``): a sampler name evaluates with that sampler at its default eta
(``ode`` is the deterministic measure); ``own`` is the training sampler at its training eta, the
reference's in-domain measure. Besides the training rewards, the held-out ones (``reward.eval_only``
and the task's own) are scored and logged; ``eval_reward_ceiling`` is the best the weighted reward
could be on these prompts, where the rewards know it. The eval samples are spread over processes in
equal shares (the last share padded with repeats of the last sample, dropped after gathering);
sample ``i`` draws its noise from a generator seeded by ``(seed, i)``, so the scores do not depend
on the number of processes. A reward that fails on one process stops every process (:mod:`.dist`).

:func:`evaluate` is the one evaluator: the trainer calls it on its live (EMA) weights, and
``precise-rl eval`` on the weights of a checkpoint (:class:`EvalInputs` holds what it needs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import EvalConfig, SamplerConfig
from ..policies import Policy
from ..rewards.base import weighted_raw
from ..sde import SAMPLER_TABLE, kernel
from . import dist
from . import seeds as streams
from .ema import EMA
from .rollouts import sample
from .setup import RunRewards

__all__ = ["EvalInputs", "EvalResult", "ProtocolResult", "evaluate", "eval_weights"]


def eval_weights(ema: EMA | None) -> AbstractContextManager:
    """The weights evaluated (and saved as the LoRA adapter): the EMA's while it is on, else the live ones."""
    return ema.swapped_in() if ema is not None else nullcontext()


@dataclass
class EvalInputs:
    """What an evaluation reads: the policy and its weights, the rewards, the held-out prompts, the processes."""

    policy: Policy
    #: the module put in eval mode (the policy's transformer, possibly wrapped for DDP)
    model: nn.Module
    rewards: RunRewards
    prompts: list[str]
    metadata: Callable[[list[str]], list[dict]]
    accelerator: Any
    #: the training sampler (``own``) and the time grid's kind and shift
    sampler: SamplerConfig
    #: the model's grid for ``num_steps`` steps under ``sampler.grid``
    time_grid: Callable[[int], torch.Tensor]
    seed: int
    rollout_batch_size: int
    #: entered around the rollouts: the weights evaluated (the EMA's, swapped in) or nothing
    weights: Callable[[], AbstractContextManager] = nullcontext


@dataclass
class ProtocolResult:
    """One protocol's scores: the weighted reward and each reward's mean over the held-out samples."""

    protocol: str
    sampler: str
    eta: float
    reward: float
    components: dict[str, float]


@dataclass
class EvalResult:
    """Every protocol's scores, the reward ceiling where known, and the images of the sample grid."""

    protocols: dict[str, ProtocolResult]
    ceiling: float | None = None
    #: the first ``grid_prompts x samples_per_prompt`` images or videos (main process) of the first protocol, and
    #: their prompts
    grid: tuple[torch.Tensor, list[str], str] | None = field(default=None, repr=False)

    def metrics(self) -> dict[str, float]:
        """``eval_reward_ceiling``, ``eval_<protocol>_reward`` and ``eval_<protocol>/<reward>``, as logged."""
        out: dict[str, float] = {} if self.ceiling is None else {"eval_reward_ceiling": self.ceiling}
        for key, r in self.protocols.items():
            out[f"eval_{key}_reward"] = r.reward
            out.update({f"eval_{key}/{k}": v for k, v in r.components.items()})
        return out


def _score_sets(inputs: EvalInputs, images: torch.Tensor, prompts: list[str], meta: list[dict]) -> dict[str, Any]:
    """Every component of every reward set on one batch."""
    return {k: v for rewards in inputs.rewards.sets for k, v in rewards.score(images, prompts, meta).items()}


def evaluate(inputs: EvalInputs, e: EvalConfig, *, with_grid: bool = True) -> EvalResult:
    """Score the held-out prompts under every protocol of ``e.samplers`` (a collective), at ``e.height`` x
    ``e.width`` where they are set (training at a lower resolution than evaluation)."""
    if e.height is None:
        return _evaluate(inputs, e, with_grid)
    with inputs.policy.at_resolution(e.height, e.width):
        return _evaluate(inputs, e, with_grid)


def _evaluate(inputs: EvalInputs, e: EvalConfig, with_grid: bool) -> EvalResult:
    acc = inputs.accelerator
    world, rank = acc.num_processes, acc.process_index
    prompts_base = inputs.prompts[: e.max_prompts]
    prompts_all = [p for p in prompts_base for _ in range(e.samples_per_prompt)]
    n_all = len(prompts_all)
    per = math.ceil(n_all / world)
    idx = [min(i, n_all - 1) for i in range(rank * per, (rank + 1) * per)]
    mine = [prompts_all[i] for i in idx]
    seeds = [streams.eval_seed(inputs.seed, i) for i in idx]
    n_grid = min(e.grid_prompts, len(prompts_base)) * e.samples_per_prompt
    ceiling = inputs.rewards.train.max_weighted_raw(prompts_all, inputs.metadata(prompts_all))
    # the best the weighted reward could be on these prompts: the curves' headroom
    result = EvalResult({}, None if ceiling is None else float(ceiling.mean()))
    sigmas = inputs.time_grid(e.num_steps)
    weights = inputs.rewards.weights
    s = inputs.sampler
    with inputs.weights():
        inputs.model.eval()
        for key in e.samplers:
            name = s.name if key == "own" else key
            eta = s.eta if name == s.name else None
            kern = kernel(name, sigmas, eta, s.schedule if SAMPLER_TABLE[name].takes_schedule else None)
            same = next((r for r in result.protocols.values() if r.sampler == name and r.eta == kern.eta), None)
            if same is not None and not SAMPLER_TABLE[name].stochastic:
                # ``own`` of a run whose sampler is the ODE (the algorithms on final samples): the same
                # deterministic rollouts with the same noise, so the same scores; not computed twice
                result.protocols[key] = ProtocolResult(key, name, same.eta, same.reward, dict(same.components))
                continue
            _, latents, _, _ = sample(
                inputs.policy, mine, kern, seeds, chunk=inputs.rollout_batch_size, autocast=acc.autocast, store=False
            )
            with torch.no_grad():
                images = inputs.policy.decode(latents)
            meta = inputs.metadata(mine)
            comps = dist.score_agreed(functools.partial(_score_sets, inputs, images, mine, meta), world)
            comps = dist.same_fields(comps, len(mine), world, acc.device)
            comps = dist.gather_rows(acc, world, comps)
            comps = {k: v[:n_all].cpu() for k, v in comps.items()}
            raw = weighted_raw({k: comps[k] for k in weights}, weights)
            result.protocols[key] = ProtocolResult(
                key, name, kern.eta, float(raw.nanmean()), {k: float(v.nanmean()) for k, v in comps.items()}
            )
            if with_grid and result.grid is None:
                shown = _grid_images(acc, images, n_grid, per)
                result.grid = (shown, prompts_all[: len(shown)], key)
    return result


def _grid_images(acc: Any, images: torch.Tensor, n_grid: int, per: int) -> torch.Tensor:
    """The first ``n_grid`` eval images of all processes, on the main process (a collective)."""
    world, rank = acc.num_processes, acc.process_index
    if world == 1:
        return images[:n_grid].detach().cpu()
    take = max(0, min(per, n_grid - rank * per))
    return torch.cat(dist.gather_objects(images[:take].detach().cpu(), world))[:n_grid]
