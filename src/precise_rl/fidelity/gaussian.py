"""Exact fidelity on Gaussian data: every sampler maps Gaussians to Gaussians.

For data ``x0 ~ N(m, c^2)`` (per dimension) the posterior means are linear in ``x_t``:

    x0_hat  = m + (1 - t) c^2 / D(t) * (x_t - (1 - t) m)
    eps_hat =         t     / D(t) * (x_t - (1 - t) m),     D(t) = (1 - t)^2 c^2 + t^2

so the exact velocity ``v = eps_hat - x0_hat = alpha(t) x_t + beta(t)`` is affine. A kernel step
``x_s = a x_t + b v + std z`` is then affine in ``x_t`` plus independent noise, and the mean and
variance of the sample follow from the kernel's ``(a, b, std)`` exactly, with no Monte Carlo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..sde import Kernel

__all__ = ["GaussianTarget", "GaussianPropagation", "propagate_gaussian", "kl_gaussian"]


@dataclass(frozen=True)
class GaussianTarget:
    """Data distribution ``N(mean, std^2)`` in every dimension (dimensions independent)."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"a Gaussian target needs a finite mean and a std > 0, got N({self.mean}, {self.std}^2)")

    def marginal(self, t: float) -> tuple[float, float]:
        """Mean and variance of ``x_t = (1 - t) x0 + t eps``."""
        return (1.0 - t) * self.mean, (1.0 - t) ** 2 * self.std**2 + t**2

    def velocity_coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)`` with the exact velocity ``v = alpha(t) x_t + beta(t)``, in float64."""
        t = torch.as_tensor(t, dtype=torch.float64)
        c2 = self.std**2
        denom = (1.0 - t) ** 2 * c2 + t**2
        alpha = (t - (1.0 - t) * c2) / denom
        beta = -alpha * (1.0 - t) * self.mean - self.mean
        return alpha, beta

    def posterior(self, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` at ``x`` (shape ``(B, ...)``) and time ``t`` (scalar or ``(B,)``), float64."""
        x = x.to(torch.float64)
        t = _batch_time(t, x)
        c2 = self.std**2
        denom = (1.0 - t) ** 2 * c2 + t**2
        centred = x - (1.0 - t) * self.mean
        return self.mean + (1.0 - t) * c2 / denom * centred, t / denom * centred

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, cond: object = None) -> torch.Tensor:
        """The exact velocity ``E[eps - x0 | x_t = x]``, as a ``velocity_fn`` for :func:`precise_rl.sde.rollout`."""
        x0_hat, eps_hat = self.posterior(x, t)
        return (eps_hat - x0_hat).to(x.dtype)


def _batch_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``t`` as float64, broadcastable against ``x`` (a scalar or one value per row)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 1:
        t = t.view(-1, *([1] * (x.ndim - 1)))
    return t


def kl_gaussian(mean_p: float, var_p: float, mean_q: float, var_q: float) -> float:
    """``KL(N(mean_p, var_p) || N(mean_q, var_q))`` in nats (one dimension); ``inf`` if ``var_p = 0``."""
    if var_p <= 0.0:
        return math.inf
    return 0.5 * (math.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / var_q - 1.0)


@dataclass(frozen=True)
class GaussianPropagation:
    """Exact per-step marginals of one sampler on Gaussian data (one dimension).

    ``means``, ``variances`` and ``noise_variances`` have one entry per grid point (N + 1):
    ``noise_variances`` is ``E[Var(x_t | x_1)]``, the part of the variance injected by the
    sampler itself (the same variance propagated from an initial variance of 0).
    """

    target: GaussianTarget
    sigmas: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    noise_variances: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.means[-1])

    @property
    def std(self) -> float:
        return math.sqrt(max(float(self.variances[-1]), 0.0))

    @property
    def std_ratio(self) -> float:
        """Output std over target std (1 for a faithful sampler)."""
        return self.std / self.target.std

    @property
    def mean_error(self) -> float:
        """Output mean minus target mean, in units of the target std."""
        return (self.mean - self.target.mean) / self.target.std

    @property
    def kl(self) -> float:
        """``KL(output || target)`` per dimension, in nats."""
        return kl_gaussian(self.mean, float(self.variances[-1]), self.target.mean, self.target.std**2)

    @property
    def exploration(self) -> float:
        """Share of the output variance caused by the sampler's own noise, ``E[Var(x0 | x1)] / Var(x0)``."""
        var = float(self.variances[-1])
        return float(self.noise_variances[-1]) / var if var > 0 else math.nan


def propagate_gaussian(
    kern: Kernel, target: GaussianTarget, init_mean: float = 0.0, init_var: float = 1.0
) -> GaussianPropagation:
    """Push ``N(init_mean, init_var)`` at ``t = sigmas[0]`` through every step of ``kern`` exactly.

    With ``v = alpha x + beta`` the step is ``x_s = (a + b alpha) x_t + b beta + std z``, so
    ``mean_s = A mean_t + b beta`` and ``var_s = A^2 var_t + std^2`` with ``A = a + b alpha``.
    """
    alpha, beta = target.velocity_coefficients(kern.sigmas[:-1])
    gain = (kern.a + kern.b * alpha).tolist()
    shift = (kern.b * beta).tolist()
    step_var = (kern.std**2).tolist()
    n = kern.num_steps
    means = np.empty(n + 1)
    variances = np.empty(n + 1)
    noise = np.empty(n + 1)
    mean, var, nvar = float(init_mean), float(init_var), 0.0
    means[0], variances[0], noise[0] = mean, var, nvar
    for i in range(n):
        g = gain[i]
        mean = g * mean + shift[i]
        var = g * g * var + step_var[i]
        nvar = g * g * nvar + step_var[i]
        means[i + 1], variances[i + 1], noise[i + 1] = mean, var, nvar
    return GaussianPropagation(
        target=target,
        sigmas=kern.sigmas.numpy().copy(),
        means=means,
        variances=variances,
        noise_variances=noise,
    )
