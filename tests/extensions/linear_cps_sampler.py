"""A sampler of one's own: coefficients-preserving sampling with ``std = eta * s`` (linear in eta).

It is ``cps`` reparameterised (``cps`` has ``std = s * sin(eta' * pi / 2)``), so a test can check it
against ``cps`` at ``eta' = 2 * asin(eta) / pi``.
"""

from __future__ import annotations

import math

import torch

from precise_rl.sde.samplers import Sampler, register_sampler


def linear_cps_coefficients(sigmas: torch.Tensor, eta: float, schedule: object) -> tuple[torch.Tensor, ...]:
    """``mean = (1 - s) x0_hat + sqrt(s^2 - std^2) eps_hat`` with ``std = eta s``, as ``(a, b, std)``."""
    t, s = sigmas[:-1], sigmas[1:]
    std = eta * s
    c = s * math.sqrt(1.0 - eta**2)
    # x0_hat = x - t v and eps_hat = x + (1 - t) v, collected into a x + b v
    return (1.0 - s) + c, -t * (1.0 - s) + c * (1.0 - t), std


register_sampler(Sampler("linear_cps", linear_cps_coefficients, default_eta=0.6, eta_max=1.0, eta_rule="std = eta * s"))
