"""An algorithm of one's own: flow matching on each group's better-than-average samples (one file, one registration).

Each final sample whose group advantage is positive is noised afresh at a uniform time and trained
with the flow-matching loss, weighted by its advantage (a filtered, advantage-weighted behaviour
cloning in the manner of RAFT/ReST). It trains on final samples, so any sampler may roll out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from precise_rl.algorithm_table import Algorithm as Entry
from precise_rl.algorithm_table import register_algorithm
from precise_rl.rl.advantages import advantages
from precise_rl.rl.algorithms.base import GroupAdvantageAlgorithm, LossOutput
from precise_rl.rl.algorithms.forward import forward_noised, noise_for, row_generator, velocity


@dataclass
class FilteredFMKnobs:
    times: int = 2  #: noised times per sample


class FilteredFM(GroupAdvantageAlgorithm):  # units: the epoch's samples; the plan of update_plan
    MEAN_KEYS = ("loss", "fm_error")

    def targets(self, comps: Mapping[str, torch.Tensor], weights: Mapping[str, float], epoch: int) -> torch.Tensor:
        adv = advantages(comps, weights, self.ctx.cfg.train.group_size, "group", 5.0)[0]
        return torch.where(adv > 0, adv, torch.where(torch.isnan(adv), adv, torch.zeros_like(adv)))

    def items(self) -> int:
        return self.knobs.times

    def loss(self, units: torch.Tensor, items: torch.Tensor, idle: bool = False) -> LossOutput:
        batch, ctx = self.batch, self.ctx
        local = self.local_of[units]
        x0 = batch.latents[local, -1]
        rows, its = units.tolist(), items.tolist()
        t = torch.tensor(
            [
                float(torch.rand((), generator=row_generator(ctx.cfg.seed, self.epoch, self.inner, r, 1000 + j)))
                for r, j in zip(rows, its, strict=True)
            ]
        )  # the times from streams of their own (items 1000 + j), the noise from (row, j)
        eps = noise_for(rows, its, tuple(x0.shape[1:]), ctx.cfg.seed, self.epoch, self.inner).to(x0.device)
        t = t.to(x0.device)
        v = velocity(ctx, batch, local, forward_noised(x0, eps, t), t)
        err = (v - (eps - x0)).pow(2).flatten(1).mean(dim=1)
        w = torch.zeros_like(err) if idle else self.adv[local]
        return LossOutput(w * err, {"loss": w * err, "fm_error": err.detach()})


register_algorithm(
    Entry("filtered_fm", FilteredFMKnobs, FilteredFM, samplers="any", keeps="final", default_sampler="ode")
)
