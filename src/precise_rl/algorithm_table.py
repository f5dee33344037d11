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
    "NFTKnobs",
    "AWMKnobs",
    "DPOKnobs",
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
    #: the sampler its rollouts use when ``sampler.name`` is not given (the reference's)
    default_sampler: str = "precise"
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
    #: Flow-GRPO-Fast: the number of consecutive stochastic steps per trajectory, the ODE elsewhere, only
    #: those steps trained; 0 = off (every step of ``sampler.window`` or of the grid is stochastic)
    fast_window: int = 0
    #: the last step a Fast window may start at (its start is drawn uniformly from 0 .. this each epoch,
    #: the same on every process); null = ``num_steps // 2 - fast_window``, the reference's range (0, N/2)
    fast_start_max: int | None = None
    #: Fast: the samples of a group share their initial noise, so they follow one deterministic trajectory
    #: until the window and branch there (the earlier Flow-GRPO-Fast); false: each sample its own start
    fast_shared_start: bool = False

    def check(self, prefix: str) -> None:
        positive(prefix + "clip_range", self.clip_range)
        positive(prefix + "adv_clip", self.adv_clip)
        positive(prefix + "kl_beta", self.kl_beta, allow_zero=True)
        in_range(prefix + "timestep_fraction", self.timestep_fraction, 0.0, 1.0)
        positive(prefix + "fast_window", self.fast_window, allow_zero=True)
        if self.fast_start_max is not None:
            positive(prefix + "fast_start_max", self.fast_start_max, allow_zero=True)

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


# --------------------------------------------------------------------------- DiffusionNFT


@dataclass
class NFTKnobs:
    """DiffusionNFT (NVlabs/DiffusionNFT): forward-process training toward positive and away from implicit
    negative velocities, weighted by each sample's normalised optimality; rollouts by an old policy."""

    beta: float = 1.0  #: the implicit-policy mixing strength (``config.beta``); 0.1 in the OCR recipe
    kl_beta: float = 1e-4  #: weight of the velocity-space KL to the reference (``train.beta``)
    adv_clip: float = 5.0  #: advantages clipped to [-adv_clip, adv_clip], then mapped to optimality in [0, 1]
    #: ``batch``: group mean, the epoch's std (the reference's global_std); ``group``: each group's std
    adv_std: Literal["group", "batch"] = "batch"
    #: share of the rollout grid's times trained per sample: each sample trains on floor(f * N) of its N grid
    #: times, drawn without replacement in a random order
    timestep_fraction: float = 0.99
    #: the old policy follows the trained one after every epoch with decay ``d(s) = 0`` for ``s < old_decay_flat``,
    #: else ``min((s - old_decay_flat) * old_decay_rate, old_decay_max)`` at ``s`` optimizer steps (``return_decay``)
    old_decay_flat: int = 0
    old_decay_rate: float = 0.001  #: growth of the old policy's decay per optimizer step past ``old_decay_flat``
    old_decay_max: float = 0.5  #: the old policy's largest decay (< 1)
    #: rollouts drawn with the old policy (the reference); false: with the current weights
    rollout_with_old: bool = True

    def check(self, prefix: str) -> None:
        positive(prefix + "beta", self.beta)
        positive(prefix + "kl_beta", self.kl_beta, allow_zero=True)
        positive(prefix + "adv_clip", self.adv_clip)
        in_range(prefix + "timestep_fraction", self.timestep_fraction, 0.0, 1.0)
        positive(prefix + "old_decay_flat", self.old_decay_flat, allow_zero=True)
        positive(prefix + "old_decay_rate", self.old_decay_rate, allow_zero=True)
        in_range(prefix + "old_decay_max", self.old_decay_max, 0.0, 1.0, lo_open=False)
        if self.old_decay_max >= 1.0:
            raise UserError(f"config key '{prefix}old_decay_max' must be < 1 (the old policy would never move)")

    def needs_reference(self) -> bool:
        return self.kl_beta > 0


register_algorithm(
    Algorithm(
        "nft",
        NFTKnobs,
        "precise_rl.rl.algorithms.nft:NFT",
        samplers="any",
        keeps="final",
        default_sampler="ode",
        summary="DiffusionNFT: forward-process loss on final samples, toward positive, away from negative velocities",
        reference="NVlabs/DiffusionNFT scripts/train_nft_sd3.py",
    )
)


# --------------------------------------------------------------------------- AWM


@dataclass
class AWMKnobs:
    """Advantage Weighted Matching (scxue/advantage_weighted_matching): the flow-matching loss on final samples,
    shaped by a generalised Huber power and weighted by group advantages, with KL terms to the reference and
    to an EMA of the policy."""

    adv_clip: float = 5.0  #: advantages clipped to [-adv_clip, adv_clip], then divided by it
    advantage_max: float = 1.0  #: the clipped advantages' scale after the division
    adv_std: Literal["group", "batch"] = "batch"  #: ``batch``: the reference's global_std
    clip_range: float = 1.0  #: PPO clip of the (on-policy, hence 1) ratio; kept for the reference's formula
    #: how the squared error becomes a log-prob: ``ghuber`` (the reference's recipes), ``uniform``, ``t``, ``t2``
    weighting: Literal["ghuber", "uniform", "t", "t2"] = "ghuber"
    ghuber_power: float = 0.25  #: the power of the ``ghuber`` weighting
    train_timesteps: int = 6  #: times trained per sample, one per stratum of the grid
    timestep_fraction: float = 0.9  #: the strata cover grid indices up to floor(f * N)
    #: ``discrete``: strata over grid indices 0 .. floor(f N); ``discrete_wo_init``: from 1 (the noise end left out)
    time_type: Literal["discrete", "discrete_wo_init"] = "discrete"
    kl_beta: float = 1e-4  #: weight of the velocity KL to the reference (``beta``)
    ema_kl_beta: float = 1.0  #: weight of the velocity KL to the EMA policy (``ema_beta``; only with kl_beta > 0)
    ema_decay_max: float = 0.3  #: the EMA policy's decay ``min(ema_decay_max, ema_decay_rate * optimizer steps)``
    ema_decay_rate: float = 0.001  #: growth of the EMA policy's decay per optimizer step

    def check(self, prefix: str) -> None:
        positive(prefix + "adv_clip", self.adv_clip)
        positive(prefix + "advantage_max", self.advantage_max)
        positive(prefix + "clip_range", self.clip_range)
        positive(prefix + "ghuber_power", self.ghuber_power)
        positive(prefix + "train_timesteps", self.train_timesteps)
        in_range(prefix + "timestep_fraction", self.timestep_fraction, 0.0, 1.0)
        positive(prefix + "kl_beta", self.kl_beta, allow_zero=True)
        positive(prefix + "ema_kl_beta", self.ema_kl_beta, allow_zero=True)
        in_range(prefix + "ema_decay_max", self.ema_decay_max, 0.0, 1.0, lo_open=False)
        if self.ema_decay_max >= 1.0:
            raise UserError(f"config key '{prefix}ema_decay_max' must be < 1")
        positive(prefix + "ema_decay_rate", self.ema_decay_rate, allow_zero=True)

    def needs_reference(self) -> bool:
        return self.kl_beta > 0


register_algorithm(
    Algorithm(
        "awm",
        AWMKnobs,
        "precise_rl.rl.algorithms.awm:AWM",
        samplers="any",
        keeps="final",
        default_sampler="ode",
        summary="Advantage Weighted Matching: advantage-weighted flow-matching loss on final samples",
        reference="scxue/advantage_weighted_matching advantage_weighted_matching/scripts/train_sd3_awm.py",
    )
)


# --------------------------------------------------------------------------- online DPO


@dataclass
class DPOKnobs:
    """Online Diffusion-DPO: pairs drawn from each group, the Diffusion-DPO loss against the frozen initial
    weights (Flow-Factory trainers/dpo.py; flow_grpo scripts/train_sd3_dpo.py)."""

    beta: float = 100.0  #: the DPO temperature (``train.beta``)
    #: ``best_worst``: one pair per group, its best against its worst sample; ``all``: every ordered pair whose
    #: rewards differ by more than ``margin``
    pairs: Literal["best_worst", "all"] = "best_worst"
    margin: float = 0.0  #: with ``pairs: all``, the least reward difference of a pair
    train_timesteps: int = 1  #: noised times per pair (a logit-normal draw each; winner and loser share it)

    def check(self, prefix: str) -> None:
        positive(prefix + "beta", self.beta)
        positive(prefix + "margin", self.margin, allow_zero=True)
        positive(prefix + "train_timesteps", self.train_timesteps)

    def needs_reference(self) -> bool:
        return True


register_algorithm(
    Algorithm(
        "dpo",
        DPOKnobs,
        "precise_rl.rl.algorithms.dpo:DPO",
        samplers="any",
        keeps="final",
        default_sampler="ode",
        summary="online Diffusion-DPO on pairs from each group against the frozen initial weights",
        reference="X-GenGroup/Flow-Factory src/flow_factory/trainers/dpo.py",
    )
)
