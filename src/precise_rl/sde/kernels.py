"""The transition kernels of ``docs/math.md`` section 3, reduced to coefficients.

Every kernel is linear in ``(x_t, v)``: ``mean = a * x_t + b * v`` and ``x_s = mean + std * z``.
``kernel(name, sigmas, eta)`` computes the per-step vectors ``(a, b, std)`` once per grid, in
float64. The sampling step, the log-prob, the guard term ``|d mean / d v| = |b|`` and the
fidelity lab all read these same numbers.

With ``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v``, the coefficients are:

- Euler-Maruyama (``flow_grpo``, ``dance_grpo``):
  ``mean = x - d v - std^2 / (2 t) * eps_hat``
  so ``a = 1 - std^2 / (2 t)``, ``b = -d - std^2 (1 - t) / (2 t)``.
- the ``cps`` / ``precise`` family, ``mean = (1 - s) x0_hat + c eps_hat`` with ``c = sqrt(s^2 - std^2)``
  so ``a = (1 - s) + c``, ``b = -t (1 - s) + c (1 - t)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.integrate import quad

from .grids import validate_sigmas

__all__ = [
    "SAMPLERS",
    "DEFAULT_ETA",
    "STD_FLOOR",
    "Kernel",
    "kernel",
    "precise_rho",
    "logsnr_schedule",
    "constant_schedule",
    "resolve_schedule",
]

#: Default ``eta`` of each sampler in the reference recipes.
DEFAULT_ETA: dict[str, float] = {
    "ode": 0.0,
    "flow_grpo": 0.7,
    "dance_grpo": 0.3,
    "cps": 0.7,
    "precise": 1.5,
    "dance_precise": 0.3,
}
SAMPLERS: tuple[str, ...] = tuple(DEFAULT_ETA)
#: ``std`` is clamped from below by this only where a log-prob is formed.
STD_FLOOR = 1e-6

ScheduleFn = Callable[[np.ndarray], np.ndarray]


def logsnr_schedule(t: np.ndarray) -> np.ndarray:
    """Shape of Flow-GRPO's exploration schedule: ``g(t) / eta = sqrt(t / (1 - t))``."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.sqrt(t / (1.0 - t))


def constant_schedule(t: np.ndarray) -> np.ndarray:
    """Shape of DanceGRPO's exploration schedule: ``g(t) / eta = 1``."""
    return np.ones_like(np.asarray(t, dtype=np.float64))


_NAMED_SCHEDULES: dict[str, ScheduleFn] = {"logsnr": logsnr_schedule, "constant": constant_schedule}


def resolve_schedule(schedule: str | ScheduleFn | None, default: str = "logsnr") -> tuple[str, ScheduleFn]:
    """Return ``(name, shape_fn)``; a callable keeps the name ``"custom"``."""
    if schedule is None:
        schedule = default
    if isinstance(schedule, str):
        if schedule not in _NAMED_SCHEDULES:
            raise ValueError(
                f"unknown exploration schedule {schedule!r}; choose one of {sorted(_NAMED_SCHEDULES)} "
                "or pass a callable g(t)"
            )
        return schedule, _NAMED_SCHEDULES[schedule]
    if callable(schedule):
        return "custom", schedule
    raise ValueError(f"schedule must be a name or a callable g(t), got {type(schedule).__name__}")


@dataclass(frozen=True)
class Kernel:
    """Per-step coefficients of one sampler on one grid: ``x_s = a x_t + b v + std z``.

    ``a``, ``b``, ``std`` and ``stochastic`` have length N (the number of steps);
    ``sigmas`` has N + 1 points. All float tensors are float64 on the CPU.
    """

    name: str
    eta: float
    sigmas: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    std: torch.Tensor
    schedule: str | None = None
    _device_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def on_device(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, std)`` as float32 tensors on ``device``, converted once and cached."""
        key = str(torch.device(device))
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                c.to(device=device, dtype=torch.float32) for c in (self.a, self.b, self.std)
            )
        return self._device_cache[key]

    @property
    def num_steps(self) -> int:
        return int(self.a.numel())

    @property
    def stochastic(self) -> torch.Tensor:
        """Boolean mask of the steps that draw noise (and so have a log-prob)."""
        return self.std > 0

    @property
    def guard(self) -> torch.Tensor:
        """``|d mean / d v|`` per step, the divisor of the ratio-normalised loss."""
        return self.b.abs()

    def with_window(self, window: torch.Tensor | Sequence[int] | Sequence[bool] | None) -> Kernel:
        """This kernel on the steps of ``window`` (indices or a boolean mask), the ODE elsewhere."""
        if window is None:
            return self
        mask = window_mask(window, self.num_steps)
        d = self.sigmas[:-1] - self.sigmas[1:]
        return Kernel(
            name=self.name,
            eta=self.eta,
            sigmas=self.sigmas,
            a=torch.where(mask, self.a, torch.ones_like(self.a)),
            b=torch.where(mask, self.b, -d),
            std=torch.where(mask, self.std, torch.zeros_like(self.std)),
            schedule=self.schedule,
        )


def window_mask(window: torch.Tensor | Sequence[int] | Sequence[bool], num_steps: int) -> torch.Tensor:
    """A boolean mask of length ``num_steps`` from step indices or a mask."""
    w = torch.as_tensor(window)
    if w.dtype == torch.bool:
        if w.shape != (num_steps,):
            raise ValueError(f"a boolean SDE window must have length {num_steps}, got shape {tuple(w.shape)}")
        return w
    if w.numel() == 0:
        return torch.zeros(num_steps, dtype=torch.bool)
    if w.dtype.is_floating_point or w.ndim != 1:
        raise ValueError("an SDE window must be a 1-D list of integer step indices or a boolean mask")
    if (w < 0).any() or (w >= num_steps).any():
        raise ValueError(f"SDE window indices must lie in [0, {num_steps - 1}], got {w.tolist()}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[w.long()] = True
    return mask


def _check_eta(name: str, eta: float) -> float:
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number, got {eta!r}") from None
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if name == "cps" and eta > 1:
        raise ValueError(f"cps needs eta in [0, 1] (std = s * sin(eta * pi / 2)), got {eta!r}")
    return eta


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


def kernel(
    name: str,
    sigmas: torch.Tensor | Sequence[float],
    eta: float | None = None,
    schedule: str | ScheduleFn | None = None,
    *,
    quadrature: bool = False,
) -> Kernel:
    """Coefficients ``(a, b, std)`` of sampler ``name`` on the grid ``sigmas``.

    ``eta`` defaults to the sampler's reference value. ``schedule`` (``precise`` only) is the
    shape of the exploration schedule ``g(t) / eta``: ``"logsnr"`` (default), ``"constant"``
    (which makes it ``dance_precise``) or any callable on float64 arrays, integrated by
    quadrature. ``quadrature=True`` forces the quadrature path for the named schedules too.
    """
    if name not in DEFAULT_ETA:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    eta = DEFAULT_ETA[name] if eta is None else _check_eta(name, eta)
    sig = validate_sigmas(sigmas)
    t, s = sig[:-1], sig[1:]
    d = t - s
    sched_name: str | None = None

    if schedule is not None and name not in ("precise", "dance_precise"):
        raise ValueError(f"a custom exploration schedule applies to 'precise' only, not {name!r}")

    if name == "ode":
        a, b, std = torch.ones_like(t), -d, torch.zeros_like(t)
    elif name in ("flow_grpo", "dance_grpo"):
        if name == "flow_grpo":
            # t / (1 - t) is infinite at t = 1: the reference uses 1 - t_1 as denominator there.
            denom = torch.where(t >= 1.0, 1.0 - sig[1], 1.0 - t)
            g = eta * torch.sqrt(t / denom)
        else:
            g = torch.full_like(t, eta)
        std = g * torch.sqrt(d)
        var_over_2t = std**2 / (2 * t)
        a = 1.0 - var_over_2t
        b = -d - var_over_2t * (1.0 - t)
    else:
        if name == "cps":
            std = s * math.sin(eta * math.pi / 2)
            c = s * math.cos(eta * math.pi / 2)
        else:
            if name == "dance_precise":
                if schedule not in (None, "constant"):
                    raise ValueError("dance_precise is precise with the constant schedule; use 'precise' instead")
                schedule = "constant"
            sched_name, _ = resolve_schedule(schedule)
            rho = precise_rho(sig, eta, schedule, quadrature=quadrature)
            std = s * torch.sqrt((1.0 - rho**2).clamp_min(0.0))
            c = s * rho  # = sqrt(s^2 - std^2), without the cancellation
        a = (1.0 - s) + c
        b = -t * (1.0 - s) + c * (1.0 - t)
    return Kernel(name=name, eta=eta, sigmas=sig, a=a, b=b, std=std, schedule=sched_name)
