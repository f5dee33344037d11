"""The math layer: time grids, the sampler table, transition kernels, steps with log-probs, rollouts.

Pure tensor code: no model, no I/O. See ``docs/math.md`` for the formulas. The names load on
first use (PEP 562), so that the sampler table (``samplers.py``, no torch) can be read, by the
config check and ``--help``, without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module of this package that defines it
_HOME: dict[str, str] = {
    **dict.fromkeys(
        [
            "GRID_KINDS",
            "flux1_mu",
            "flux2_empirical_mu",
            "flux_sigmas",
            "shift_sigmas",
            "shifted_sigmas",
            "time_grid",
            "uniform_sigmas",
            "validate_sigmas",
        ],
        "grids",
    ),
    **dict.fromkeys(
        [
            "DEFAULT_ETA",
            "SAMPLERS",
            "SAMPLER_TABLE",
            "Sampler",
            "get_sampler",
            "prior_samplers",
            "register_sampler",
            "trainable_samplers",
        ],
        "samplers",
    ),
    **dict.fromkeys(
        ["SCHEDULES", "constant_schedule", "logsnr_schedule", "precise_rho", "resolve_schedule"], "schedules"
    ),
    **dict.fromkeys(["STD_FLOOR", "Kernel", "kernel", "window_mask"], "kernels"),
    **dict.fromkeys(
        ["EffectiveEta", "effective_eta", "matched_precise_eta", "precise_step_coefficients"], "precise_family"
    ),
    **dict.fromkeys(["NonFiniteRollout", "Trajectory", "rollout", "sde_window", "sliding_window"], "trajectory"),
    **dict.fromkeys(["StepOutput", "draw_noise", "gaussian_log_prob", "log_prob", "step"], "transition"),
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
