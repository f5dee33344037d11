"""The sampler table: a sampler is one coefficient function plus one :class:`Sampler` entry.

A coefficient function turns a time grid and ``eta`` into the per-step coefficients of
``docs/math.md`` section 3, ``x_s = a x_t + b v + std z``. The entry says what the rest of the
project needs to know without running it: the reference ``eta``, the ``eta`` it accepts,
whether it takes an exploration schedule, whether it draws noise (and so can be trained), and
whether it is one of the prior samplers a comparison measures against. :func:`~.kernels.kernel`,
the config keys ``sampler.name`` / ``eval.samplers`` and every command line read this table.

Adding a sampler is one function and one :func:`register_sampler` call, in any module.

This module imports no torch when it loads: the config is checked, and ``--help`` answered,
before torch is imported. The coefficient functions work on the float64 tensors ``kernel``
hands them, through tensor methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..registries import add_entry

if TYPE_CHECKING:
    import torch

__all__ = [
    "Sampler",
    "SAMPLER_TABLE",
    "SAMPLERS",
    "DEFAULT_ETA",
    "register_sampler",
    "get_sampler",
    "trainable_samplers",
    "prior_samplers",
]

#: ``(sigmas, eta, schedule) -> (a, b, std)``: ``sigmas`` float64 with N + 1 points, each output N values.
#: ``schedule`` is the exploration schedule (a name or a callable ``g(t) / eta``) for samplers that
#: take one, else None.
CoefficientFn = Callable[["torch.Tensor", float, Any], tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class Sampler:
    """One row of the sampler table."""

    name: str
    coefficients: CoefficientFn
    #: ``eta`` of the reference recipes, used where none is given
    default_eta: float
    #: the largest ``eta`` accepted (the smallest is 0)
    eta_max: float = math.inf
    #: what bounds ``eta``, said when one above ``eta_max`` is refused
    eta_rule: str = ""
    #: whether ``kernel(..., schedule=...)`` may choose the exploration schedule
    takes_schedule: bool = False
    #: the schedule this sampler always uses (named in ``Kernel.schedule``), or None
    fixed_schedule: str | None = None
    #: False for a deterministic sampler: it has no log-prob and cannot be trained with
    stochastic: bool = True
    #: one of the prior samplers a comparison measures against
    prior: bool = False
    #: upper end of the fidelity lab's ``eta`` sweep
    sweep_eta_max: float = 1.0
    #: one line for listings
    summary: str = ""

    def check_eta(self, eta: Any) -> float:
        """``eta`` as a float within ``[0, eta_max]``; ``ValueError`` naming the bound otherwise."""
        try:
            value = float(eta)
        except (TypeError, ValueError):
            raise ValueError(f"eta must be a number, got {eta!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if value > self.eta_max:
            rule = f" ({self.eta_rule})" if self.eta_rule else ""
            raise ValueError(f"{self.name} needs eta in [0, {self.eta_max:g}]{rule}, got {eta!r}")
        return value


#: sampler name -> entry, in the order listings show them
SAMPLER_TABLE: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    """Add ``sampler`` to the table (a name may be registered once, by one entry)."""
    if not isinstance(sampler.name, str) or not sampler.name.isidentifier():
        raise ValueError(f"a sampler name must be an identifier, got {sampler.name!r}")
    if sampler.name in ("own",):  # ``own`` names the training sampler in eval.samplers
        raise ValueError(f"{sampler.name!r} is reserved")
    if not (math.isfinite(sampler.default_eta) and 0 <= sampler.default_eta <= sampler.eta_max):
        raise ValueError(f"sampler {sampler.name!r}: default eta {sampler.default_eta!r} is outside [0, eta_max]")
    return add_entry(SAMPLER_TABLE, sampler.name, sampler, "a sampler")


def get_sampler(name: str) -> Sampler:
    """The entry of ``name``; ``ValueError`` listing the known samplers otherwise."""
    entry = SAMPLER_TABLE.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_TABLE)}")
    return entry


def trainable_samplers() -> list[str]:
    """The samplers that draw noise (a log-prob to train with), in table order."""
    return [name for name, s in SAMPLER_TABLE.items() if s.stochastic]


def prior_samplers() -> list[str]:
    """The prior samplers a comparison's target comes from, in table order."""
    return [name for name, s in SAMPLER_TABLE.items() if s.prior]


class _Names(Sequence[str]):
    """The table's names as a sequence that follows later registrations."""

    def __getitem__(self, index: Any) -> Any:
        return list(SAMPLER_TABLE)[index]

    def __len__(self) -> int:
        return len(SAMPLER_TABLE)

    def __repr__(self) -> str:
        return repr(tuple(SAMPLER_TABLE))


class _DefaultEtas(Mapping[str, float]):
    """Sampler name -> reference eta, read from the table."""

    def __getitem__(self, name: str) -> float:
        return SAMPLER_TABLE[name].default_eta

    def __iter__(self) -> Iterator[str]:
        return iter(SAMPLER_TABLE)

    def __len__(self) -> int:
        return len(SAMPLER_TABLE)

    def __repr__(self) -> str:
        return repr(dict(self))


#: every sampler name, in table order
SAMPLERS: Sequence[str] = _Names()
#: sampler name -> its reference eta
DEFAULT_ETA: Mapping[str, float] = _DefaultEtas()


# --------------------------------------------------------------------------- the built-in samplers


def ode_coefficients(sigmas: torch.Tensor, eta: float, schedule: Any) -> tuple[torch.Tensor, ...]:
    """Euler: ``x_s = x_t - d v``."""
    t, s = sigmas[:-1], sigmas[1:]
    return t.new_ones(t.shape), -(t - s), t.new_zeros(t.shape)


def _euler_maruyama(sigmas: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``mean = x - d v - std^2 / (2 t) eps_hat`` with ``std = g sqrt(d)``."""
    t, s = sigmas[:-1], sigmas[1:]
    d = t - s
    std = g * d.sqrt()
    var_over_2t = std**2 / (2 * t)
    return 1.0 - var_over_2t, -d - var_over_2t * (1.0 - t), std


def flow_grpo_coefficients(sigmas: torch.Tensor, eta: float, schedule: Any) -> tuple[torch.Tensor, ...]:
    """Euler-Maruyama with Flow-GRPO's ``g = eta sqrt(t / (1 - t))``."""
    t = sigmas[:-1]
    # t / (1 - t) is infinite at t = 1: the reference uses 1 - t_1 as denominator there.
    denom = (1.0 - t).where(t < 1.0, 1.0 - sigmas[1])
    return _euler_maruyama(sigmas, eta * (t / denom).sqrt())


def dance_grpo_coefficients(sigmas: torch.Tensor, eta: float, schedule: Any) -> tuple[torch.Tensor, ...]:
    """Euler-Maruyama with DanceGRPO's constant ``g = eta``."""
    t = sigmas[:-1]
    return _euler_maruyama(sigmas, t.new_full(t.shape, float(eta)))


def _posterior_family(sigmas: torch.Tensor, std: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``mean = (1 - s) x0_hat + c eps_hat`` with ``c = sqrt(s^2 - std^2)``."""
    t, s = sigmas[:-1], sigmas[1:]
    return (1.0 - s) + c, -t * (1.0 - s) + c * (1.0 - t), std


def cps_coefficients(sigmas: torch.Tensor, eta: float, schedule: Any) -> tuple[torch.Tensor, ...]:
    """Coefficients-preserving sampling: ``std = s sin(eta pi / 2)``."""
    s = sigmas[1:]
    return _posterior_family(sigmas, s * math.sin(eta * math.pi / 2), s * math.cos(eta * math.pi / 2))


def precise_coefficients(sigmas: torch.Tensor, eta: float, schedule: Any) -> tuple[torch.Tensor, ...]:
    """The exact finite-step transition under a frozen ``x0_hat``: ``std = s sqrt(1 - rho^2)``."""
    from .schedules import precise_rho  # torch and scipy: loaded only when a kernel is computed

    s = sigmas[1:]
    rho = precise_rho(sigmas, eta, schedule)
    return _posterior_family(sigmas, s * (1.0 - rho**2).clamp_min(0.0).sqrt(), s * rho)


register_sampler(
    Sampler("ode", ode_coefficients, default_eta=0.0, stochastic=False, summary="Euler ODE (deterministic)")
)
register_sampler(
    Sampler(
        "precise",
        precise_coefficients,
        default_eta=1.5,
        takes_schedule=True,
        sweep_eta_max=3.0,
        summary="exact transition under a frozen posterior mean, logSNR schedule (or any schedule)",
    )
)
register_sampler(
    Sampler(
        "flow_grpo",
        flow_grpo_coefficients,
        default_eta=0.7,
        prior=True,
        sweep_eta_max=1.2,
        summary="Euler-Maruyama, logSNR schedule (Flow-GRPO)",
    )
)
register_sampler(
    Sampler(
        "dance_grpo",
        dance_grpo_coefficients,
        default_eta=0.3,
        prior=True,
        summary="Euler-Maruyama, constant schedule (DanceGRPO)",
    )
)
register_sampler(
    Sampler(
        "cps",
        cps_coefficients,
        default_eta=0.7,
        eta_max=1.0,
        eta_rule="std = s * sin(eta * pi / 2)",
        prior=True,
        summary="coefficients-preserving sampling",
    )
)
register_sampler(
    Sampler(
        "dance_precise",
        precise_coefficients,
        default_eta=0.3,
        fixed_schedule="constant",
        summary="precise with DanceGRPO's constant schedule",
    )
)
