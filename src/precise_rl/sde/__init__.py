"""The math layer: time grids, transition kernels, steps with log-probs and batched rollouts.

Pure tensor code: no model, no I/O. See ``docs/math.md`` for the formulas.
"""

from .grids import (
    flux1_mu,
    flux2_empirical_mu,
    flux_sigmas,
    shift_sigmas,
    shifted_sigmas,
    time_grid,
    uniform_sigmas,
    validate_sigmas,
)
from .kernels import (
    DEFAULT_ETA,
    SAMPLERS,
    STD_FLOOR,
    Kernel,
    constant_schedule,
    kernel,
    logsnr_schedule,
    precise_rho,
    resolve_schedule,
    window_mask,
)
from .rollout import NonFiniteRollout, Trajectory, rollout, sde_window, sliding_window
from .step import StepOutput, draw_noise, gaussian_log_prob, log_prob, step

__all__ = [
    "DEFAULT_ETA",
    "SAMPLERS",
    "STD_FLOOR",
    "Kernel",
    "NonFiniteRollout",
    "StepOutput",
    "Trajectory",
    "constant_schedule",
    "draw_noise",
    "flux1_mu",
    "flux2_empirical_mu",
    "flux_sigmas",
    "gaussian_log_prob",
    "kernel",
    "log_prob",
    "logsnr_schedule",
    "precise_rho",
    "resolve_schedule",
    "rollout",
    "sde_window",
    "shift_sigmas",
    "shifted_sigmas",
    "sliding_window",
    "step",
    "time_grid",
    "uniform_sigmas",
    "validate_sigmas",
    "window_mask",
]
