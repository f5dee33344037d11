"""A generic batched rollout over any ``velocity_fn(x, t, cond)``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .kernels import Kernel, kernel
from .transition import Generators, gaussian_log_prob, step

__all__ = ["Trajectory", "NonFiniteRollout", "rollout", "sde_window", "sliding_window"]


class NonFiniteRollout(ValueError):
    """A rollout that cannot give finite numbers: coefficients past float32, or NaN/inf in the latents.

    Its own type, so that the trainer can stop on it with the last good checkpoint rather than a traceback.
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class Trajectory:
    """One batched rollout, in float32 (``latents`` in the rollout's ``store_dtype``).

    ``latents`` is ``(B, N + 1, ...)`` (``latents[:, 0]`` is the initial noise, ``latents[:, -1]``
    the sample); ``means`` is ``(B, N, ...)`` (``None`` when not stored); ``log_probs`` is
    ``(B, N)``, NaN on the steps that draw no noise; ``std`` is the kernel's ``(N,)`` std in float32;
    ``stochastic`` is the ``(N,)`` mask of steps with a log-prob. ``kernel`` holds the coefficients that produced it.
    """

    latents: torch.Tensor
    means: torch.Tensor | None
    log_probs: torch.Tensor
    std: torch.Tensor
    stochastic: torch.Tensor
    kernel: Kernel

    @property
    def sample(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def sigmas(self) -> torch.Tensor:
        return self.kernel.sigmas


def sde_window(num_steps: int, size: int, start: int = 0) -> torch.Tensor:
    """Boolean mask of ``size`` consecutive stochastic steps from ``start`` (clipped to the grid)."""
    if size < 0 or start < 0:
        raise ValueError(f"SDE window size and start must be >= 0, got size={size} start={start}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start : start + size] = True
    return mask


def sliding_window(num_steps: int, size: int, epoch: int, shift_every: int = 1, stride: int = 1) -> torch.Tensor:
    """A window that slides toward the data end as training goes on (MixGRPO-style).

    It starts at step 0 and moves ``stride`` steps every ``shift_every`` epochs, wrapping
    around once it reaches the end of the trajectory.
    """
    if size < 1 or size > num_steps:
        raise ValueError(f"SDE window size must be in [1, {num_steps}], got {size}")
    if shift_every < 1 or stride < 1:
        raise ValueError("shift_every and stride must be >= 1")
    positions = num_steps - size + 1
    start = ((epoch // shift_every) * stride) % positions
    return sde_window(num_steps, size, start)


def rollout(
    velocity_fn: VelocityFn,
    x1: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    sampler: str | Kernel = "precise",
    eta: float | None = None,
    *,
    cond: Any = None,
    schedule: Any = None,
    window: torch.Tensor | Sequence[int] | None = None,
    generator: Generators = None,
    store_means: bool = True,
    store_latents: bool = True,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    store_dtype: torch.dtype = torch.float32,
    store_device: torch.device | str | None = None,
) -> Trajectory:
    """Sample from ``x1`` (noise, ``(B, ...)``) down the grid ``sigmas`` with a stochastic sampler.

    ``sampler`` is a name (with ``eta`` and ``schedule`` as in :func:`kernel`) or a prebuilt
    :class:`Kernel`; ``window`` restricts the noise to those steps (the ODE elsewhere).
    ``velocity_fn`` gets ``x`` in float32 and ``t`` as a ``(B,)`` float32 tensor of sigmas.
    Runs without autograd; every row advances in one batched call per step. ``store_latents=False``
    keeps the final latent only (``latents`` is then ``(B, 1, ...)``): what an algorithm that trains
    on final samples needs, without the ``N + 1`` latents of every row.

    ``store_dtype`` (bfloat16: half the bytes) is the dtype the latents are kept in. Below float32 the
    chain itself goes on from each step's sample rounded to it, and that step's log-prob is the density of
    the rounded sample: the stored transitions are exactly the ones sampled, so a recomputation from
    them with the same weights gives the same log-prob (a ratio of exactly 1 on the first pass).
    ``store_device`` keeps the latents and means there (the CPU: pinned when the rollout runs on CUDA,
    each step copied out as it is made), so the device holds one step's latents, not the trajectory.
    """
    kern = sampler if isinstance(sampler, Kernel) else kernel(sampler, sigmas, eta, schedule)
    if isinstance(sampler, Kernel) and sigmas is not None:
        sig = torch.as_tensor(sigmas, dtype=torch.float64)
        if sig.shape != kern.sigmas.shape or not torch.allclose(sig, kern.sigmas):
            raise ValueError("the sigmas passed to rollout differ from those of the given kernel")
    kern = kern.with_window(window)
    if x1.ndim < 1 or x1.shape[0] < 1:
        raise ValueError(f"x1 must be a batch (B, ...), got shape {tuple(x1.shape)}")
    if not bool(torch.isfinite(x1).all()):
        raise ValueError("x1 contains NaN or inf")

    n = kern.num_steps
    batch = x1.shape[0]
    device = x1.device
    # The steps run in float32: a coefficient finite in float64 but past float32's range (eta=1e200)
    # would otherwise fail inside a step with "value cannot be converted to type float".
    for label, coeff in (("noise std", kern.std), ("coefficient a", kern.a), ("coefficient b", kern.b)):
        if not bool(torch.isfinite(coeff.to(torch.float32)).all()):
            k = int(torch.nonzero(~torch.isfinite(coeff.to(torch.float32)))[0])
            raise NonFiniteRollout(
                f"the {kern.name} sampler's {label} at step {k} is {coeff[k].item():.3g}, beyond float32 "
                f"(eta {kern.eta:g} on this grid); lower eta",
                step=k,
            )
    rounded = store_dtype != torch.float32
    x = x1.to(store_dtype).float() if rounded else x1.float()
    kept = n + 1 if store_latents else 1
    where = torch.device(store_device) if store_device is not None else device
    pin = where.type == "cpu" and device.type == "cuda"
    latents = torch.empty((batch, kept, *x.shape[1:]), dtype=store_dtype, device=where, pin_memory=pin)
    means = (
        torch.empty((batch, n, *x.shape[1:]), dtype=torch.float32, device=where, pin_memory=pin)
        if store_means
        else None
    )
    log_probs = torch.full((batch, n), math.nan, dtype=torch.float32, device=device)
    if store_latents:
        latents[:, 0] = x
    stochastic = kern.stochastic
    t_values = kern.sigmas.to(torch.float32)

    with torch.no_grad():
        for i in range(n):
            t = t_values[i].to(device).expand(batch)
            v = velocity_fn(x, t, cond)
            if v.shape != x.shape:
                raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for input of shape {tuple(x.shape)}")
            out = step(kern, i, x, v, generator=generator, validate=False)
            x = out.sample
            if rounded:  # go on from the sample as it is stored, and give its density
                x = x.to(store_dtype).float()
            if store_latents:
                latents[:, i + 1].copy_(x, non_blocking=pin)
            if means is not None:
                means[:, i].copy_(out.mean, non_blocking=pin)
            if stochastic[i]:
                log_probs[:, i] = gaussian_log_prob(x, out.mean, out.std) if rounded else out.log_prob
            if callback is not None:
                callback(i, x)
    # NaN or inf anywhere propagates to the end: one check instead of one per step.
    if pin:
        torch.cuda.synchronize(device)  # the copies out of the device are done before anyone reads them
    if not store_latents:
        latents[:, 0] = x
    if not bool(torch.isfinite(x).all()):
        if not store_latents:
            raise NonFiniteRollout("the rollout produced NaN or inf: check velocity_fn and the inputs", step=n - 1)
        bad = int(torch.nonzero(~torch.isfinite(latents.flatten(2)).any(dim=2).any(dim=0))[0]) - 1
        raise NonFiniteRollout(
            f"the rollout produced NaN or inf at step {bad}: check velocity_fn and the inputs", step=bad
        )
    return Trajectory(
        latents=latents,
        means=means,
        log_probs=log_probs,
        std=kern.std.to(torch.float32),
        stochastic=stochastic,
        kernel=kern,
    )
