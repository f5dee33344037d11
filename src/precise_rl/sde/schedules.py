"""Exploration schedules ``g(t) / eta`` and the noise fraction ``rho`` of the exact kernels.

``docs/math.md`` section 2 (the schedules) and section 3 (``rho`` of ``precise``): closed forms for
the named schedules, quadrature in log-SNR for any callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import quad

__all__ = ["ScheduleFn", "logsnr_schedule", "constant_schedule", "resolve_schedule", "precise_rho", "SCHEDULES"]

ScheduleFn = Callable[[np.ndarray], np.ndarray]


def logsnr_schedule(t: np.ndarray) -> np.ndarray:
    """Shape of Flow-GRPO's exploration schedule: ``g(t) / eta = sqrt(t / (1 - t))``."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.sqrt(t / (1.0 - t))


def constant_schedule(t: np.ndarray) -> np.ndarray:
    """Shape of DanceGRPO's exploration schedule: ``g(t) / eta = 1``."""
    return np.ones_like(np.asarray(t, dtype=np.float64))


SCHEDULES: dict[str, ScheduleFn] = {"logsnr": logsnr_schedule, "constant": constant_schedule}


def resolve_schedule(schedule: str | ScheduleFn | None, default: str = "logsnr") -> tuple[str, ScheduleFn]:
    """Return ``(name, shape_fn)``; a callable keeps the name ``"custom"``."""
    if schedule is None:
        schedule = default
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"unknown exploration schedule {schedule!r}; choose one of {sorted(SCHEDULES)} or pass a callable g(t)"
            )
        return schedule, SCHEDULES[schedule]
    if callable(schedule):
        return "custom", schedule
    raise ValueError(f"schedule must be a name or a callable g(t), got {type(schedule).__name__}")


def _exploration_integral(shape: ScheduleFn, eta: float, s: float, t: float) -> float:
    """``integral_s^t g(tau)^2 / (2 tau^2) dtau`` with ``g = eta * shape``, by quadrature.

    Integrated in log-SNR ``lambda = log((1 - tau) / tau)``, where it reads
    ``integral g^2 (1 - tau) / (2 tau) dlambda``: the noise injected per unit of log-SNR,
    bounded for the usual schedules, so QUADPACK handles the unbounded ends (t = 1 or s = 0).
    Returns ``inf`` where the integral diverges.
    """
    if eta == 0.0:
        return 0.0
    if s <= 0.0:
        return math.inf

    def integrand(lam: float) -> float:
        tau = 1.0 / (1.0 + math.exp(lam)) if lam > -700 else 1.0
        if tau >= 1.0:
            tau = np.nextafter(1.0, 0.0)
        g = eta * float(shape(np.asarray(tau)))
        return g * g * (1.0 - tau) / (2.0 * tau)

    lam_s = math.log((1.0 - s) / s)
    lam_t = -math.inf if t >= 1.0 else math.log((1.0 - t) / t)
    out = quad(integrand, lam_t, lam_s, full_output=1, limit=200, epsabs=1e-13, epsrel=1e-11)
    value = out[0]
    if len(out) > 3:  # QUADPACK returned a warning message
        msg = str(out[3]).lower()
        if "divergent" in msg or not math.isfinite(value):
            return math.inf
    return float(value)


def precise_rho(
    sigmas: torch.Tensor, eta: float, schedule: str | ScheduleFn | None = "logsnr", quadrature: bool = False
) -> torch.Tensor:
    """``rho(t -> s) = exp(-integral_s^t g^2 / (2 tau^2))`` per step (section 3).

    Closed forms for the named schedules; quadrature for a callable (or when ``quadrature``).
    """
    name, shape = resolve_schedule(schedule)
    t, s = sigmas[:-1], sigmas[1:]
    if eta == 0.0:
        # g = 0: nothing is forgotten (rho = 1, the ODE). The closed forms would give 0 ** 0 -> 0
        # at t = 1 and 0 * inf -> NaN at s = 0.
        return torch.ones_like(t)
    if name == "logsnr" and not quadrature:
        with torch.no_grad():
            ratio = (s * (1 - t)) / (t * (1 - s))
            return torch.where(ratio > 0, ratio.clamp_min(1e-300) ** (eta**2 / 2), torch.zeros_like(ratio))
    if name == "constant" and not quadrature:
        with torch.no_grad():
            inv_s = torch.where(s > 0, 1.0 / s.clamp_min(1e-300), torch.full_like(s, math.inf))
            return torch.exp(-(eta**2 / 2) * (inv_s - 1.0 / t))
    integrals = [_exploration_integral(shape, eta, float(si), float(ti)) for ti, si in zip(t, s, strict=True)]
    return torch.exp(-torch.tensor(integrals, dtype=torch.float64))
