"""One stochastic step and its log-probability, from a kernel's coefficients.

All step math runs in float32 whatever the dtype of ``x_t`` and ``v`` (bf16 overflows in the
log-prob); results come back in float32.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kernels import STD_FLOOR, Kernel

__all__ = ["StepOutput", "step", "log_prob", "gaussian_log_prob", "draw_noise"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class StepOutput:
    """``sample`` and ``mean`` are ``(B, ...)``; ``std`` and ``log_prob`` are ``(B,)``; float32."""

    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Section 4's log-density: mean over the non-batch elements of the Normal log-pdf.

    ``std`` is a float or a ``(B,)`` tensor, clamped from below by ``STD_FLOOR``.
    """
    x = x.float()
    mean = mean.float()
    std_row = torch.as_tensor(std, dtype=torch.float32, device=x.device).clamp_min(STD_FLOOR)
    if std_row.ndim == 0:
        std_row = std_row.expand(x.shape[0])
    std_b = std_row.view(-1, *([1] * (x.ndim - 1)))
    z2 = ((x - mean) / std_b).square().flatten(1).mean(dim=1)
    return -0.5 * z2 - torch.log(std_row) - _HALF_LOG_2PI


def draw_noise(shape: Sequence[int], device: torch.device, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` in float32: one generator for the batch, or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; pass one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=torch.float32) for g in gens])


def _shared_index(kern: Kernel, index: int | torch.Tensor) -> int | None:
    """The step of a shared (scalar) index, range-checked; ``None`` for per-sample indices."""
    if isinstance(index, numbers.Integral) or (isinstance(index, torch.Tensor) and index.ndim == 0):
        i = int(index)
        if not 0 <= i < kern.num_steps:
            raise ValueError(f"step index {i} is out of range for a kernel of {kern.num_steps} steps")
        return i
    return None


def _step_constants(kern: Kernel, device: torch.device) -> list[tuple[float, float, float, float, torch.Tensor]]:
    """Per step ``(a, b, std, q, c)``: Python floats, except ``c``, a 0-d float32 tensor on ``device``.

    A drawn step's log-prob is ``c + q * mean(z^2)`` with ``q = -(std / std_c)^2 / 2`` and
    ``c = -log(std_c) - log(2 pi) / 2`` (``std_c`` the floored std), in float32 as before.
    Computed once per kernel and device: reading them per call costs more than the step's
    arithmetic on small tensors.
    """
    key = ("step_constants", device)
    consts = kern._device_cache.get(key)
    if consts is None:
        std32 = kern.std.float()
        std_c = std32.clamp_min(STD_FLOOR)
        q = (-0.5 * (std32 / std_c).square()).tolist()
        c = (-torch.log(std_c) - _HALF_LOG_2PI).to(device)
        consts = list(zip(kern.a.tolist(), kern.b.tolist(), kern.std.tolist(), q, c.unbind(), strict=True))
        kern._device_cache[key] = consts
    return consts


def _per_sample_coefficients(kern: Kernel, index: torch.Tensor, x: torch.Tensor):
    """``(a, b, std)`` as ``(B, 1, ...)`` float32 tensors for per-sample step indices."""
    n = kern.num_steps
    idx = torch.as_tensor(index)
    # A boolean tensor would index the steps as a mask, not per sample.
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.ndim != 1 or idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"per-sample step indices must be an integer tensor of shape ({x.shape[0]},), got "
            f"{idx.dtype} of shape {tuple(idx.shape)}"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"step indices must lie in [0, {n - 1}], got min {lo} max {hi}")
    coeffs = kern.on_device(x.device)
    view = (-1,) + (1,) * (x.ndim - 1)
    idx = idx.to(x.device)
    return tuple(c[idx].view(view) for c in coeffs)


def _check_inputs(x_t: torch.Tensor, v: torch.Tensor, x_s: torch.Tensor | None) -> None:
    if x_t.ndim < 1 or x_t.shape != v.shape:
        raise ValueError(f"x_t and v must have the same shape (B, ...), got {tuple(x_t.shape)} and {tuple(v.shape)}")
    if x_s is not None and x_s.shape != x_t.shape:
        raise ValueError(f"x_s must have the shape of x_t {tuple(x_t.shape)}, got {tuple(x_s.shape)}")
    for name, tensor in (("x_t", x_t), ("v", v), ("x_s", x_s)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or inf")


def step(
    kern: Kernel,
    index: int | torch.Tensor,
    x_t: torch.Tensor,
    v: torch.Tensor,
    *,
    generator: Generators = None,
    noise: torch.Tensor | None = None,
    x_s: torch.Tensor | None = None,
    validate: bool = True,
) -> StepOutput:
    """Step ``index`` of ``kern`` from ``x_t`` with velocity ``v``.

    Draws ``x_s = mean + std * z`` (``z`` from ``noise``, else from ``generator``: one
    ``torch.Generator`` or one per sample), or, when ``x_s`` is given, evaluates its log-prob
    instead of sampling. ``index`` is an int or a ``(B,)`` integer tensor of per-sample steps.
    ``validate=False`` skips the shape and finiteness checks (the rollout does its own).
    """
    if validate:
        _check_inputs(x_t, v, x_s)
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise must have the shape of x_t {tuple(x_t.shape)}, got {tuple(noise.shape)}")
    x = x_t.float()
    vel = v.float()
    i = _shared_index(kern, index)
    if i is None:
        return _step_per_sample(kern, index, x, vel, generator, noise, x_s)

    a, b, std, q, c = _step_constants(kern, x.device)[i]
    batch = x.shape[0]
    # In place on the fresh product: one buffer fewer than torch.add(x * a, vel, alpha=b), same numbers.
    mean = (x * a).add_(vel, alpha=b)
    std_row = torch.full((batch,), std, dtype=torch.float32, device=x.device)
    if x_s is not None:
        return StepOutput(x_s.float(), mean, std_row, gaussian_log_prob(x_s, mean, std_row))
    if std == 0.0:
        # Deterministic step (ODE, or the last step of the cps/precise family): no draw.
        return StepOutput(mean, mean, std_row, c.expand(batch).clone())
    z = draw_noise(x.shape, x.device, generator) if noise is None else noise.float()
    # (x_s - mean) / std_c = (std / std_c) z exactly, so the density needs only sum(z^2).
    z_norm = torch.linalg.vector_norm(z.reshape(batch, -1), dim=1)
    log_p = torch.addcmul(c, z_norm, z_norm, value=q * batch / z.numel())
    # Write the sample over our own noise buffer (never the caller's, nor under autograd).
    reuse = noise is None and not (mean.requires_grad and torch.is_grad_enabled())
    sample = torch.add(mean, z, alpha=std, out=z) if reuse else torch.add(mean, z, alpha=std)
    return StepOutput(sample, mean, std_row, log_p)


def _step_per_sample(
    kern: Kernel,
    index: torch.Tensor,
    x: torch.Tensor,
    vel: torch.Tensor,
    generator: Generators,
    noise: torch.Tensor | None,
    x_s: torch.Tensor | None,
) -> StepOutput:
    """``step`` with a ``(B,)`` tensor of per-sample step indices (float32 x and v)."""
    a, b, std = _per_sample_coefficients(kern, index, x)
    mean = torch.addcmul(x * a, vel, b)
    std_row = std.flatten()
    if x_s is not None:
        return StepOutput(x_s.float(), mean, std_row, gaussian_log_prob(x_s, mean, std_row))
    std_c = std_row.clamp_min(STD_FLOOR)
    z = draw_noise(x.shape, x.device, generator) if noise is None else noise.float()
    sample = torch.addcmul(mean, z, std)
    z2 = torch.linalg.vector_norm(z.flatten(1), dim=1).square() / z[0].numel()
    log_p = -0.5 * (std_row / std_c).square() * z2 - torch.log(std_c) - _HALF_LOG_2PI
    return StepOutput(sample, mean, std_row, log_p)


def log_prob(
    kern: Kernel, index: int | torch.Tensor, x_t: torch.Tensor, v: torch.Tensor, x_s: torch.Tensor
) -> torch.Tensor:
    """``log p(x_s | x_t)`` under step ``index`` of ``kern`` with velocity ``v``; ``(B,)`` float32.

    Differentiable in ``v``: this is what training recomputes with the current parameters.
    """
    return step(kern, index, x_t, v, x_s=x_s).log_prob
