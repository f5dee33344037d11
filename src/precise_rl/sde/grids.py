"""Time grids (diffusers' ``sigmas``): decreasing from noise (t = 1) to data (t = 0).

A grid of N steps is a 1-D float64 tensor of N + 1 points ``t_0 > t_1 > ... > t_N``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "uniform_sigmas",
    "shifted_sigmas",
    "flux_sigmas",
    "shift_sigmas",
    "validate_sigmas",
    "time_grid",
    "GRID_KINDS",
    "flux2_empirical_mu",
    "flux1_mu",
]


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def uniform_sigmas(num_steps: int) -> torch.Tensor:
    """``t_i = 1 - i / N`` for ``i = 0..N``."""
    _check_steps(num_steps)
    return 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3-style shift ``t' = a t / (1 + (a - 1) t)``; keeps 0 and 1 fixed."""
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    out = shift * s / (1.0 + (shift - 1.0) * s)
    # An extreme shift rounds the grid away in float64 (1e-300: 1 + (shift - 1) = 0 at t = 1, so inf;
    # 1e300: every point rounds to 1): a grid that is not finite and decreasing is no grid.
    if s.ndim == 1 and s.numel() >= 2 and bool((s[1:] < s[:-1]).all()):
        if not bool(torch.isfinite(out).all()) or not bool((out[1:] < out[:-1]).all()):
            raise ValueError(
                f"shift {shift:g} rounds the {s.numel() - 1}-step grid to points that are not finite and "
                "strictly decreasing in float64; choose a shift closer to 1 (SD3.5 uses 3.0)"
            )
    return out


def shifted_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """Uniform grid passed through the SD3-style shift (3.0 for SD3.5)."""
    return shift_sigmas(uniform_sigmas(num_steps), shift)


def flux_sigmas(num_steps: int, mu: float) -> torch.Tensor:
    """FLUX-style resolution-dependent shift: the SD3 shift with ``exp(mu)`` as ``a``."""
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu!r}")
    return shift_sigmas(uniform_sigmas(num_steps), math.exp(mu))


def flux1_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's ``mu``: linear in the packed image sequence length (diffusers' ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's ``mu`` from sequence length and step count (diffusers' ``compute_empirical_mu``)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def validate_sigmas(sigmas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Return user-given sigmas as float64 after checking they are a usable grid.

    Raises ``ValueError`` unless there are at least two points, all finite, within [0, 1]
    and strictly decreasing.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 points, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("sigmas must be finite (found NaN or inf)")
    if (s < 0).any() or (s > 1).any():
        raise ValueError(f"sigmas must lie within [0, 1], got min {s.min().item():.6g} max {s.max().item():.6g}")
    diffs = s[1:] - s[:-1]
    if (diffs >= 0).any():
        k = int(torch.nonzero(diffs >= 0)[0])
        raise ValueError(
            f"sigmas must be strictly decreasing, but sigmas[{k}]={s[k].item():.6g} "
            f"<= sigmas[{k + 1}]={s[k + 1].item():.6g}"
        )
    return s


#: the kinds of :func:`time_grid`
GRID_KINDS: tuple[str, ...] = ("model", "uniform", "shifted", "flux", "custom")


def time_grid(
    num_steps: int,
    kind: str = "uniform",
    *,
    shift: float = 3.0,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
    model: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The one resolver of time grids, for the trainer, evaluation, ``sample`` and the fidelity lab.

    ``kind`` is ``model`` (the model's own grid: ``model(num_steps)``, e.g. ``policy.time_grid``),
    ``uniform``, ``shifted`` (by ``shift``), ``flux`` (shifted by ``exp(mu)``) or ``custom``
    (``sigmas``, checked).
    """
    if kind == "model":
        if model is None:
            raise ValueError("the 'model' time grid needs the model's grid function")
        return validate_sigmas(model(num_steps))
    if kind == "uniform":
        return uniform_sigmas(num_steps)
    if kind == "shifted":
        return shifted_sigmas(num_steps, shift)
    if kind == "flux":
        if mu is None:
            raise ValueError("the 'flux' time grid needs mu (e.g. from flux2_empirical_mu)")
        return flux_sigmas(num_steps, mu)
    if kind == "custom":
        if sigmas is None:
            raise ValueError("the 'custom' time grid needs sigmas")
        s = validate_sigmas(sigmas)
        if s.numel() - 1 != num_steps:
            raise ValueError(f"custom sigmas have {s.numel() - 1} steps but num_steps={num_steps}")
        return s
    raise ValueError(f"unknown time grid {kind!r}; choose one of {', '.join(GRID_KINDS)}")
