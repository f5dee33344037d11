"""The exact numbers a study reports beside each run, from the fidelity lab: nothing here trains.

Per run on a cell's grid: the eta it runs at, its effective precise eta (:mod:`precise_rl.sde.precise_family`)
and its output std over the target std on sharp and on broad Gaussian data (:mod:`precise_rl.fidelity.gaussian`).
"""

from __future__ import annotations

from typing import Any

from ..sde.samplers import SAMPLERS
from .study_runs import parse_run, run_eta

__all__ = ["FIDELITY_MEAN", "FIDELITY_STD", "BROAD_FIDELITY_STD", "fidelity_std_ratios", "cell_fidelity"]

#: the fidelity lab's sharp data: N(FIDELITY_MEAN, FIDELITY_STD^2), the thin manifold of clean images
FIDELITY_MEAN = 0.5
FIDELITY_STD = 0.02
#: the broad data beside it, N(FIDELITY_MEAN, BROAD_FIDELITY_STD^2): where cps's bias shows at 20-30 steps
BROAD_FIDELITY_STD = 0.5


def fidelity_std_ratios(
    samplers: list[str], sigmas: Any, precise_schedule: str = "logsnr", std: float = FIDELITY_STD
) -> dict[str, float]:
    """Output std / target std of each sampler (default eta) on ``N(0.5, std^2)`` data over ``sigmas``, exact."""
    from ..fidelity.gaussian import GaussianTarget, propagate_gaussian
    from ..sde import kernel

    target = GaussianTarget(FIDELITY_MEAN, std)
    out = {}
    for name in samplers:
        kern = kernel(name, sigmas, None, precise_schedule if name == "precise" else None)
        out[name] = float(propagate_gaussian(kern, target).std_ratio)
    return out


def cell_fidelity(labels: list[str], sigmas: Any, precise_schedule: str = "logsnr") -> dict[str, dict[str, Any]]:
    """Per run, and per other sampler of the table at its reference eta, on the grid ``sigmas``.

    Each gets the eta it runs at, its effective precise eta (median, min, max over the steps, see
    :mod:`precise_rl.sde.precise_family`) and the exact output std / target std on sharp (``FIDELITY_STD``)
    and broad (``BROAD_FIDELITY_STD``) Gaussian data.
    """
    from ..fidelity.gaussian import GaussianTarget, propagate_gaussian
    from ..sde import kernel
    from ..sde.precise_family import effective_eta

    sharp, broad = GaussianTarget(FIDELITY_MEAN, FIDELITY_STD), GaussianTarget(FIDELITY_MEAN, BROAD_FIDELITY_STD)
    out: dict[str, dict[str, Any]] = {}
    # every sampler of the table at its reference eta too, as a reference row: exact numbers cost nothing
    for label in [*labels, *(s for s in SAMPLERS if s not in labels)]:
        if label in out:
            continue
        name = parse_run(label)[0]
        eta = run_eta(label, sigmas)
        schedule = precise_schedule if name == "precise" else None
        kern = kernel(name, sigmas, eta, schedule)
        out[label] = {
            "sampler": name,
            "eta": eta,
            "effective_eta": effective_eta(name, sigmas, eta, schedule).summary(),
            "std_ratio_sharp": float(propagate_gaussian(kern, sharp).std_ratio),
            "std_ratio_broad": float(propagate_gaussian(kern, broad).std_ratio),
        }
    return out
