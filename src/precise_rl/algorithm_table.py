"""The algorithm table: an algorithm is one implementation class plus one :class:`Algorithm` entry.

The entry says what the rest of the project needs to know without running the algorithm: its
knobs (a dataclass, the config's ``algorithm:`` section: ``name`` plus these keys), which samplers
it can train with (``stochastic``: it needs per-step log-probabilities; ``any``: it trains on the
final samples, so the deterministic ``ode`` sampler is allowed too), what a rollout must keep
(``trajectory``: every step's latent, mean and log-prob; ``final``: the final latent only), whether
it needs groups of several samples per prompt, and where its implementation is (a class, or
``"module:Class"`` loaded when a run is built). The config check, ``precise-rl --help``, ``compare``
and ``study`` read this table; the update engine (:mod:`precise_rl.rl.engine`) runs any entry.

Adding an algorithm is one class (:class:`precise_rl.rl.algorithms.base.Algorithm`) and one
:func:`register_algorithm` call, in any module. Like ``config.py`` this module stands below the
layers and imports no torch: the config is checked, and ``--help`` answered, before torch loads.
The knobs of the built-in algorithms are here for that reason, beside their entries.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UserError
from .registries import add_entry, check_name

__all__ = [
    "Algorithm",
    "ALGORITHM_TABLE",
    "register_algorithm",
    "get_algorithm",
    "GRPOKnobs",
]


@dataclass(frozen=True)
class Algorithm:
    """One row of the algorithm table."""

    name: str
    #: the dataclass of its ``algorithm:`` keys (besides ``name``); its defaults are the reference's
    knobs: type
    #: the implementation: a subclass of ``precise_rl.rl.algorithms.base.Algorithm`` or ``"module:Class"``
    impl: Any
    #: ``stochastic``: trains on per-step log-probabilities (a stochastic sampler); ``any``: every sampler
    samplers: Literal["stochastic", "any"] = "stochastic"
    #: what a rollout keeps for training: every step (``trajectory``) or the final latent (``final``)
    keeps: Literal["trajectory", "final"] = "trajectory"
    #: the least ``train.group_size`` it works with (group statistics need 2)
    min_group_size: int = 2
    #: one line for listings
    summary: str = ""
    #: where its formulas come from (listings and the docs)
    reference: str = ""

    def load(self) -> type:
        """The implementation class (imported on first use when given as ``"module:Class"``)."""
        if isinstance(self.impl, str):
            module, _, attr = self.impl.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.impl


ALGORITHM_TABLE: dict[str, Algorithm] = {}


def register_algorithm(entry: Algorithm) -> Algorithm:
    """Add ``entry`` to the table (a name already taken by another entry is refused)."""
    check_name(entry.name, "an algorithm", "=.,: ")
    if not isinstance(entry.knobs, type) or not hasattr(entry.knobs, "__dataclass_fields__"):
        raise ValueError(f"algorithm {entry.name!r}: knobs must be a dataclass, got {entry.knobs!r}")
    if "name" in entry.knobs.__dataclass_fields__:
        raise ValueError(f"algorithm {entry.name!r}: 'name' is the section's own key, not a knob")
    if entry.samplers not in ("stochastic", "any") or entry.keeps not in ("trajectory", "final"):
        raise ValueError(f"algorithm {entry.name!r}: samplers must be stochastic/any and keeps trajectory/final")
    if entry.samplers == "any" and entry.keeps == "trajectory":
        raise ValueError(f"algorithm {entry.name!r}: training on trajectories needs a stochastic sampler")
    return add_entry(ALGORITHM_TABLE, entry.name, entry, "an algorithm")


def get_algorithm(name: str) -> Algorithm:
    """The entry named ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return ALGORITHM_TABLE[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHM_TABLE)}") from None


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    """A knob that must be > 0 (or >= 0): one sentence naming ``key`` otherwise."""
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def in_range(key: str, value: float, lo: float, hi: float, lo_open: bool = True) -> None:
    """A knob in ``(lo, hi]`` (``[lo, hi]`` with ``lo_open=False``): one sentence naming ``key`` otherwise."""
    if not ((lo < value) if lo_open else (lo <= value)) or value > hi:
        raise UserError(f"config key '{key}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")


# --------------------------------------------------------------------------- GRPO


@dataclass
class GRPOKnobs:
    """GRPO (Flow-GRPO's objective): PPO-clip on per-step log-probabilities with group advantages."""

    clip_range: float = 1e-4  #: PPO clip range of the ratio
    guard: bool = False  #: ratio-normalised loss (docs/math.md section 5)
    kl_beta: float = 0.0  #: weight of the KL term to the reference (the initial weights)
    adv_clip: float = 5.0  #: advantages clipped to [-adv_clip, adv_clip]
    #: ``group``: each group's std; ``batch``: the epoch's std (Flow-GRPO's global_std)
    adv_std: Literal["group", "batch"] = "group"
    timestep_fraction: float = 0.99  #: share of the steps trained per trajectory, floor(f * N)

    def check(self, prefix: str) -> None:
        positive(prefix + "clip_range", self.clip_range)
        positive(prefix + "adv_clip", self.adv_clip)
        positive(prefix + "kl_beta", self.kl_beta, allow_zero=True)
        in_range(prefix + "timestep_fraction", self.timestep_fraction, 0.0, 1.0)

    def needs_reference(self) -> bool:
        """A full fine-tune keeps a frozen copy of the initial weights for the KL term."""
        return self.kl_beta > 0


register_algorithm(
    Algorithm(
        "grpo",
        GRPOKnobs,
        "precise_rl.rl.algorithms.grpo:GRPO",
        samplers="stochastic",
        keeps="trajectory",
        summary="PPO-clip on each step's log-prob with group advantages (Flow-GRPO, DanceGRPO)",
        reference="yifan123/flow_grpo scripts/train_sd3.py",
    )
)
