"""Checks of a resolved config that need more than its schema, made before a run directory is touched.

The schema (:mod:`precise_rl.config`) checks each key alone. These checks combine keys with the
machine: a time grid that an extreme ``sampler.shift`` rounds away, a step count that leaves no
stochastic step to train, a half precision that this machine would ignore while ``config.yaml``
recorded it. Each ends in one sentence naming the keys to change (a :class:`UserError`), so that
``train`` fails before it makes the run directory, not after its first rollout.
"""

from __future__ import annotations

import math
import os

from ..algorithm_table import ALGORITHM_TABLE
from ..config import ExperimentConfig
from ..errors import UserError

__all__ = ["check_config", "runs_on_cpu"]


def runs_on_cpu() -> bool:
    """Whether accelerate would put this process on the CPU (no usable CUDA GPU, or ACCELERATE_USE_CPU)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes"):
        return True
    import torch

    return not torch.cuda.is_available()


def _check_grid(cfg: ExperimentConfig) -> None:
    from ..sde import shifted_sigmas

    s = cfg.sampler
    if s.grid != "shifted":
        return
    for key, n in (("sampler.num_steps", s.num_steps), ("eval.num_steps", cfg.eval.num_steps)):
        try:
            shifted_sigmas(n, s.shift)
        except ValueError as exc:
            raise UserError(f"config key 'sampler.shift' gives no usable time grid for {key}={n}: {exc}") from None


def _check_trained_steps(cfg: ExperimentConfig) -> None:
    """Some stochastic step must be trained: the last step (to t = 0) of every sampler draws no noise."""
    from ..sde import kernel, sde_window, shifted_sigmas, uniform_sigmas
    from .algorithms.grpo import train_step_indices

    s, t = cfg.sampler, cfg.algorithm.knobs
    if not hasattr(t, "timestep_fraction") or ALGORITHM_TABLE[cfg.algorithm.name].keeps != "trajectory":
        return  # an algorithm that trains on final samples trains no step of the trajectory
    n = s.num_steps
    # The stochastic steps depend on where the grid ends, not on its inner points: the uniform grid
    # stands for the model's own grid (known only once the model is loaded; the trainer checks it again).
    sigmas = shifted_sigmas(n, s.shift) if s.grid == "shifted" else uniform_sigmas(n)
    kern = kernel(s.name, sigmas, s.eta, s.schedule if s.name == "precise" else None)
    if s.window.size and not s.window.slide_every:
        kern = kern.with_window(sde_window(n, s.window.size, s.window.start))
    if s.window.size and s.window.slide_every:
        return  # the window moves each epoch: some epochs may train steps others do not
    if train_step_indices(kern, t.timestep_fraction):
        return
    kept = max(1, math.floor(t.timestep_fraction * n)) if t.timestep_fraction < 1 else n
    noisy = [j for j in range(n) if bool(kern.stochastic[j])]
    if n == 1:
        why = "the only step ends at t = 0 and draws no noise (the last step of every sampler is deterministic)"
        fix = "use sampler.num_steps >= 2"
    elif t.timestep_fraction < 1 and noisy:
        why = (
            f"algorithm.timestep_fraction {t.timestep_fraction:g} keeps the first "
            f"max(1, floor({t.timestep_fraction:g} x {n})) = {kept} steps, and the stochastic steps are {noisy}"
        )
        fix = "raise algorithm.timestep_fraction or move sampler.window"
    else:
        why = "no step draws noise (sampler.window and the grid's last step leave none)"
        fix = "widen sampler.window or use more sampler.num_steps"
    raise UserError(f"no stochastic step would be trained with sampler.num_steps={n}: {why}; {fix}")


def _check_precision(cfg: ExperimentConfig) -> None:
    """Refuse a precision this machine would not use, so that config.yaml records what runs."""
    if cfg.model.name == "digits" and cfg.model.dtype != "float32":
        raise UserError(
            f"config key 'model.dtype' is {cfg.model.dtype}, but the digits model always runs in float32 "
            "(it would be ignored); drop the key or set model.dtype=float32"
        )
    if cfg.train.mixed_precision == "fp16" and runs_on_cpu():
        raise UserError(
            "config key 'train.mixed_precision' is fp16, which needs a CUDA GPU; this run would be on the CPU, "
            "where fp16 autocast is not applied: use train.mixed_precision=bf16 or no"
        )


#: micro-batches per update from which the per-pass cost is worth a warning
MANY_MICRO_BATCHES = 8


def accumulation_warning(cfg: ExperimentConfig) -> str | None:
    """A warning for many small micro-batches per update, or None.

    Measured on the digits model (CPU): 64 micro-batches of one sample took 10x the time of the
    same 64 samples in one pass. Each forward/backward pass has a fixed cost (some ten tensor
    calls per layer and the autograd engine's start), which does not shrink with the rows; on a
    small model it is most of the pass. The gradient of an update does not depend on how it is cut
    (the loss is the update's sum scaled by its number of pairs), so a larger ``batch_size`` gives
    the same update; ``forward_batch`` bounds the rows of one pass when memory is what
    ``grad_accum`` was for.
    """
    t = cfg.train
    if t.grad_accum < MANY_MICRO_BATCHES or t.forward_batch:
        return None
    return (
        f"warning: train.grad_accum={t.grad_accum} runs {t.grad_accum} forward/backward passes of "
        f"train.batch_size={t.batch_size} samples for each update, and every pass has a fixed cost that "
        f"dominates on small models; train.batch_size={t.batch_size * t.grad_accum} with train.grad_accum=1 "
        "computes the same update in fewer passes (set train.forward_batch to bound the rows of a pass)"
    )


def check_config(cfg: ExperimentConfig, warn: bool = True) -> None:
    """Every check of this module, cheapest first; warnings go to stderr (``warn``: commands that check
    many variants of one config, such as compare, warn for the first only)."""
    import sys

    _check_precision(cfg)
    _check_grid(cfg)
    _check_trained_steps(cfg)
    warning = accumulation_warning(cfg) if warn else None
    if warning:
        print(warning, file=sys.stderr)
