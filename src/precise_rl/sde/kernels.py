"""The transition kernels of ``docs/math.md`` section 3, reduced to coefficients.

Every kernel is linear in ``(x_t, v)``: ``mean = a * x_t + b * v`` and ``x_s = mean + std * z``.
``kernel(name, sigmas, eta)`` computes the per-step vectors ``(a, b, std)`` once per grid, in
float64, from the sampler's coefficient function in the sampler table (``samplers.py``). The
sampling step, the log-prob, the guard term ``|d mean / d v| = |b|`` and the fidelity lab all
read these same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .grids import validate_sigmas
from .samplers import DEFAULT_ETA, SAMPLER_TABLE, SAMPLERS, get_sampler
from .schedules import ScheduleFn, constant_schedule, logsnr_schedule, precise_rho, resolve_schedule

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
    "window_mask",
]

#: ``std`` is clamped from below by this only where a log-prob is formed.
STD_FLOOR = 1e-6


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


def kernel(
    name: str,
    sigmas: torch.Tensor | Sequence[float],
    eta: float | None = None,
    schedule: str | ScheduleFn | None = None,
    *,
    quadrature: bool = False,
) -> Kernel:
    """Coefficients ``(a, b, std)`` of sampler ``name`` on the grid ``sigmas``.

    ``eta`` defaults to the sampler's reference value. ``schedule`` (for samplers that take one:
    ``precise``) is the shape of the exploration schedule ``g(t) / eta``: ``"logsnr"`` (default),
    ``"constant"`` (which makes it ``dance_precise``) or any callable on float64 arrays, integrated
    by quadrature. ``quadrature=True`` forces the quadrature path for the named schedules too.
    """
    spec = get_sampler(name)
    eta = spec.default_eta if eta is None else spec.check_eta(eta)
    sig = validate_sigmas(sigmas)
    if schedule is not None and not spec.takes_schedule and schedule != spec.fixed_schedule:
        if spec.fixed_schedule is not None:
            others = [n for n, s in SAMPLER_TABLE.items() if s.takes_schedule]
            raise ValueError(
                f"{name} is {'/'.join(others)} with the {spec.fixed_schedule} schedule; use {others[0]!r} instead"
            )
        takers = " or ".join(repr(n) for n, s in SAMPLER_TABLE.items() if s.takes_schedule)
        raise ValueError(f"a custom exploration schedule applies to {takers} only, not {name!r}")
    sched_name: str | None = None
    if spec.takes_schedule or spec.fixed_schedule is not None:
        sched_name, shape = resolve_schedule(spec.fixed_schedule or schedule)
        # a callable takes the quadrature path: quadrature=True hands the named shape over as one
        schedule = shape if quadrature else (spec.fixed_schedule or schedule)
    else:
        schedule = None
    a, b, std = spec.coefficients(sig, eta, schedule)
    return Kernel(name=name, eta=eta, sigmas=sig, a=a, b=b, std=std, schedule=sched_name)
