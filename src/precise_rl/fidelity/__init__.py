"""The fidelity lab: how faithfully each sampler reproduces a known data distribution.

Exact mean/variance propagation on Gaussian data (:mod:`.gaussian`), Monte Carlo rollouts on
2-D Gaussian mixtures with their exact velocity (:mod:`.mixture`), and the report that ties
them together (:mod:`.report`, ``precise-rl fidelity``). The names load on first use (PEP 562),
as in :mod:`precise_rl.sde`: the report's settings (:mod:`.lab`) are read by ``--help`` without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module of this package that defines it
_HOME: dict[str, str] = {
    **dict.fromkeys(["GaussianPropagation", "GaussianTarget", "kl_gaussian", "propagate_gaussian"], "gaussian"),
    **dict.fromkeys(
        [
            "GaussianMixture",
            "default_mixture",
            "mode_frequencies",
            "mode_w2",
            "residual_median",
            "residual_noise",
            "wasserstein2",
            "weight_error",
        ],
        "mixture",
    ),
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
