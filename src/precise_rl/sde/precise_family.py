"""Every sampler written as a member of the precise family: the eta a ``precise`` step would need.

A ``precise`` step (``docs/math.md`` section 3, logSNR schedule) keeps the share
``rho = exp(-(eta^2 / 2) * dlambda)`` of the current noise estimate, ``dlambda = lambda_s - lambda_t``
the step's gain in log-SNR ``lambda = log((1 - t) / t)``, and replaces the rest by fresh noise:
``std = s * sqrt(1 - rho^2)``. So a step of any sampler that injects fresh noise of std ``std`` from
``t`` to ``s`` is, in fresh noise, a precise step at

    eta_eff = sqrt(-log(1 - (std / s)^2) / dlambda).

For the samplers whose mean is ``(1 - s) x0_hat + sqrt(s^2 - std^2) eps_hat`` (``cps``,
``dance_precise``, ``precise`` with any schedule) that precise step is the same Gaussian transition,
mean included: the mapping is exact. ``cps`` keeps ``rho = cos(eta pi / 2)`` on every step, so its
effective eta is ``sqrt(-2 log cos(eta pi / 2) / dlambda)``: it grows as the grid is refined. The
Euler-Maruyama samplers (``flow_grpo``, ``dance_grpo``) have the mean ``(1 - s) x0_hat +
(s - std^2 / (2 t)) eps_hat`` and a total variance ``(s - std^2 / (2 t))^2 + std^2 > s^2``: the
precise step at their effective eta injects the same fresh noise (same std) but keeps
``s * rho`` of ``eps_hat`` instead, so for them the mapping is a match of the fresh-noise variance
only (the two means agree to first order in the step size).

A step has no effective eta (NaN) where no single precise step stands for it: at ``s = 0`` every
eta gives the same deterministic step (and the Euler-Maruyama samplers add noise there that no
precise step adds); at ``t = 1`` every eta > 0 keeps none of the initial noise, so a sampler that
keeps a share ``0 < rho < 1`` there (``cps``) has no match; and a step whose ``std >= s`` keeps
nothing. A deterministic step (``std = 0``, ``s > 0``) is precise at eta 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .kernels import kernel
from .samplers import get_sampler

__all__ = ["EffectiveEta", "effective_eta", "matched_precise_eta", "precise_step_coefficients"]

#: relative tolerance under which the precise step at the effective eta counts as the same mean
_EXACT_RTOL = 1e-9


def precise_step_coefficients(t: np.ndarray, s: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(a, b, std)`` of one precise step (logSNR schedule) per ``(t, s, eta)`` triple, float64.

    The per-step form of ``kernel("precise", ...)``, which takes one eta for the whole grid.
    """
    t, s, eta = (np.asarray(x, dtype=np.float64) for x in (t, s, eta))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = s * (1.0 - t) / (t * (1.0 - s))
        rho = np.where(eta == 0.0, 1.0, np.where(ratio > 0, np.maximum(ratio, 1e-300) ** (eta**2 / 2), 0.0))
    std = s * np.sqrt(np.clip(1.0 - rho**2, 0.0, None))
    c = s * rho
    return (1.0 - s) + c, -t * (1.0 - s) + c * (1.0 - t), std


@dataclass(frozen=True)
class EffectiveEta:
    """One sampler's effective precise eta on one grid: ``values`` per step (NaN where none matches).

    ``exact`` per step: the precise step at ``values[i]`` is the same transition (mean and std);
    where False (the Euler-Maruyama samplers) only the fresh-noise std is matched.
    """

    sampler: str
    eta: float
    sigmas: np.ndarray
    values: np.ndarray
    exact: np.ndarray

    @property
    def matched(self) -> np.ndarray:
        """Steps that have an effective eta."""
        return np.isfinite(self.values)

    @property
    def match(self) -> str:
        """``exact`` if every matched step is the same transition, ``variance`` if only the std matches."""
        if not self.matched.any():
            return "none"
        return "exact" if bool(self.exact[self.matched].all()) else "variance"

    def summary(self) -> dict[str, Any]:
        """Median, min and max over the matched steps, how many steps matched, and the kind of match."""
        v = self.values[self.matched]
        stats = (float(np.median(v)), float(v.min()), float(v.max())) if v.size else (None, None, None)
        return {
            "sampler": self.sampler,
            "eta": self.eta,
            "steps": int(self.values.size),
            "matched_steps": int(v.size),
            "median": stats[0],
            "min": stats[1],
            "max": stats[2],
            "match": self.match,
        }


def _delta_logsnr(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``lambda_s - lambda_t`` per step; inf where ``t = 1`` or ``s = 0``."""
    with np.errstate(divide="ignore"):
        lam_t = np.log1p(-t) - np.log(t)
        lam_s = np.log1p(-s) - np.log(s)
    return lam_s - lam_t


def effective_eta(
    name: str, sigmas: torch.Tensor | Sequence[float], eta: float | None = None, schedule: Any = None
) -> EffectiveEta:
    """The eta of the precise step that injects the same fresh noise as each step of sampler ``name``.

    ``eta`` defaults to the sampler's reference value; ``schedule`` is passed to ``kernel`` (for
    ``precise``). See the module's docstring for the formula and where a step has none.
    """
    kern = kernel(name, sigmas, eta, schedule if get_sampler(name).takes_schedule else None)
    sig = kern.sigmas.numpy()
    t, s = sig[:-1], sig[1:]
    std = kern.std.numpy()
    a, b = kern.a.numpy(), kern.b.numpy()
    dlam = _delta_logsnr(t, s)
    values = np.full(t.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep2 = 1.0 - (std / s) ** 2  # rho^2 of the precise step with this std
        stochastic = (s > 0) & (t < 1) & (std > 0) & (keep2 > 0)
        values[stochastic] = np.sqrt(-np.log(keep2[stochastic]) / dlam[stochastic])
    values[(s > 0) & (std == 0)] = 0.0  # a deterministic step is precise at eta 0 (the Euler step)
    pa, pb, pstd = precise_step_coefficients(t, s, np.nan_to_num(values))
    scale = np.maximum(np.abs(a) + np.abs(b), 1.0)
    exact = (np.abs(pa - a) <= _EXACT_RTOL * scale) & (np.abs(pb - b) <= _EXACT_RTOL * scale)
    exact &= np.abs(pstd - std) <= _EXACT_RTOL * np.maximum(std, 1.0)
    return EffectiveEta(sampler=name, eta=kern.eta, sigmas=sig.copy(), values=values, exact=exact & np.isfinite(values))


def matched_precise_eta(
    sigmas: torch.Tensor | Sequence[float], sampler: str = "cps", eta: float | None = None
) -> float:
    """The one eta at which ``precise`` explores as much as ``sampler`` (at ``eta``) over the grid.

    The match is of the total noise forgotten: over the steps where ``sampler`` has an effective eta,
    precise at the returned eta keeps the same product of kept shares ``prod rho_i`` of the noise
    estimate as ``sampler`` does. Since ``-log rho_i = (eta_i^2 / 2) dlambda_i``, that eta is the
    log-SNR-weighted root mean square of the per-step effective etas,
    ``sqrt(sum eta_i^2 dlambda_i / sum dlambda_i)``. Raises ``ValueError`` if no step matches.
    """
    eff = effective_eta(sampler, sigmas, eta)
    ok = eff.matched
    if not ok.any():
        raise ValueError(f"no step of {sampler} on this {eff.values.size}-step grid has an effective precise eta")
    dlam = _delta_logsnr(eff.sigmas[:-1], eff.sigmas[1:])[ok]
    return float(math.sqrt(float(np.sum(eff.values[ok] ** 2 * dlam) / np.sum(dlam))))
