"""The fidelity lab: how faithfully each sampler reproduces a known data distribution.

Exact mean/variance propagation on Gaussian data (:mod:`.gaussian`), Monte Carlo rollouts on
2-D Gaussian mixtures with their exact velocity (:mod:`.mixture`), and the report that ties
them together (:mod:`.report`, ``precise-rl fidelity``).
"""

from .gaussian import GaussianPropagation, GaussianTarget, kl_gaussian, propagate_gaussian
from .mixture import (
    GaussianMixture,
    default_mixture,
    mode_frequencies,
    mode_w2,
    residual_median,
    residual_noise,
    wasserstein2,
    weight_error,
)

__all__ = [
    "GaussianMixture",
    "GaussianPropagation",
    "GaussianTarget",
    "default_mixture",
    "kl_gaussian",
    "mode_frequencies",
    "mode_w2",
    "propagate_gaussian",
    "residual_median",
    "residual_noise",
    "wasserstein2",
    "weight_error",
]
