"""What a fidelity report depends on: its settings (:class:`LabConfig`) and the time grids it takes.

Loads without torch, so that ``precise-rl fidelity --help`` (which shows these defaults) and its
argument errors answer before the report's heavy imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ..sde.samplers import SAMPLER_TABLE, SAMPLERS, trainable_samplers

__all__ = ["GRIDS", "LabConfig", "sweep_eta_max"]


def sweep_eta_max() -> dict[str, float]:
    """Upper end of each stochastic sampler's eta sweep, from the sampler table (the sweep runs from 0)."""
    return {name: SAMPLER_TABLE[name].sweep_eta_max for name in trainable_samplers()}


GRIDS: tuple[str, ...] = ("uniform", "shifted")


@dataclass(frozen=True)
class LabConfig:
    """Everything the report depends on (recorded in the JSON's ``meta``)."""

    nfe: tuple[int, ...] = (6, 10, 20, 30, 100, 1000)
    grids: tuple[str, ...] = GRIDS
    shift: float = 3.0
    target_mean: float = 0.5
    target_stds: tuple[float, ...] = (0.02, 2.0)
    samplers: tuple[str, ...] = field(default_factory=lambda: tuple(SAMPLERS))
    eta_points: int = 13
    eta_max: Mapping[str, float] = field(default_factory=sweep_eta_max)
    samples: int = 1500
    modes: int = 5
    seed: int = 0
    scatter_nfe: int | None = None
    frontier_nfe: int | None = None

    def validated(self) -> LabConfig:
        """Check the settings and fill in the defaults that depend on others; raises ``ValueError``."""
        if not self.nfe or any(not isinstance(n, int) or n < 1 for n in self.nfe):
            raise ValueError(f"NFE values must be positive integers, got {list(self.nfe)}")
        for g in self.grids:
            if g not in GRIDS:
                raise ValueError(f"unknown grid {g!r}; choose from {', '.join(GRIDS)}")
        if not self.grids:
            raise ValueError("at least one time grid is needed")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"the grid shift must be a positive number, got {self.shift}")
        if not self.target_stds or any(not (math.isfinite(c) and c > 0) for c in self.target_stds):
            raise ValueError(f"target stds must be positive numbers, got {list(self.target_stds)}")
        if not math.isfinite(self.target_mean):
            raise ValueError(f"the target mean must be finite, got {self.target_mean}")
        for s in self.samplers:
            if s not in SAMPLERS:
                raise ValueError(f"unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")
        if not self.samplers:
            raise ValueError("at least one sampler is needed")
        if self.eta_points < 2:
            raise ValueError(f"the eta sweep needs at least 2 points, got {self.eta_points}")
        if self.samples < 10:
            raise ValueError(f"Monte Carlo needs at least 10 samples, got {self.samples}")
        if self.modes < 1:
            raise ValueError(f"the mixture needs at least one mode, got {self.modes}")
        nfe = tuple(sorted(set(self.nfe)))
        picks = {}
        for name in ("scatter_nfe", "frontier_nfe"):
            value = getattr(self, name)
            if value is None:
                value = 10 if 10 in nfe else nfe[len(nfe) // 2]
            elif value not in nfe:
                raise ValueError(f"{name.replace('_', ' ')} {value} is not one of the NFE values {list(nfe)}")
            picks[name] = value
        return LabConfig(**{**asdict(self), "nfe": nfe, "grids": tuple(dict.fromkeys(self.grids)), **picks})
