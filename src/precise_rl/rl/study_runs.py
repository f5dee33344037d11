"""What a study run is: a sampler at an eta, written ``NAME``, ``NAME@ETA`` or ``precise@OTHER``.

``NAME`` trains at the sampler's reference eta, ``NAME@ETA`` at that eta (an eta sweep is one such run
per eta), and ``precise@OTHER`` is precise at the eta matched to sampler OTHER's exploration on each
cell's grid (:func:`precise_rl.sde.matched_precise_eta`). Loads without torch: ``precise-rl study``
checks its flags with it before the heavy imports.
"""

from __future__ import annotations

from typing import Any

from ..sde.samplers import DEFAULT_ETA, get_sampler, trainable_samplers

__all__ = ["MATCHED_CONTROL", "LEFT_OUT_BY_DEFAULT", "default_runs", "parse_run", "run_eta", "sweep_runs"]

#: the eta-matched control: precise at the eta that matches cps's exploration on the cell's grid
MATCHED_CONTROL = "precise@cps"

#: trainable samplers the default study does not train (``--samplers`` still runs them; the fidelity table
#: lists them at their reference eta all the same). Why: a 30-step run costs about 3 times a 10-step one
#: (7.9 s and 24.8 s of training and evaluation, one run each, on the 2-core development machine), so steps
#: 6-30 cost 1.9 times steps 6-20, and the earlier 90-run default took 19-27 minutes; six runs per cell
#: would take the full digits study to 35-50 minutes, four keep it at about 28-40. The two left out were the
#: slowest learners in every cell of that study (the constant schedule), and neither is cps or precise.
LEFT_OUT_BY_DEFAULT = ("dance_grpo", "dance_precise")


def default_runs() -> list[str]:
    """The study's default runs: the trainable samplers at their reference eta, then the eta-matched control."""
    return [*(s for s in trainable_samplers() if s not in LEFT_OUT_BY_DEFAULT), MATCHED_CONTROL]


def parse_run(label: str) -> tuple[str, float | str | None]:
    """``(sampler, eta)`` of a run: ``NAME`` (eta None: the reference), ``NAME@ETA`` (a number) or
    ``precise@OTHER`` (a sampler name: precise at the eta matching OTHER's exploration, per cell).

    ``label`` may carry an ``algorithm/`` prefix. ``ValueError`` for an eta the sampler refuses.
    """
    run = label.rsplit("/", 1)[-1]
    name, _, spec = run.partition("@")
    if not spec:
        return name, None
    try:
        eta = float(spec)
    except ValueError:
        eta = None
    if eta is not None:
        return name, get_sampler(name).check_eta(eta)
    if name != "precise":
        raise ValueError(f"{run!r}: only precise runs at the eta matched to another sampler (precise@{spec})")
    if spec not in trainable_samplers() or spec == "precise":
        raise ValueError(f"{run!r}: precise@OTHER matches another stochastic sampler, got {spec!r}")
    return name, spec


def run_eta(label: str, sigmas: Any) -> float:
    """The eta a run trains at on the grid ``sigmas``: its reference, its number, or the matched eta."""
    from ..sde.precise_family import matched_precise_eta

    name, spec = parse_run(label)
    if spec is None:
        return float(DEFAULT_ETA[name])
    if isinstance(spec, float):
        return spec
    return matched_precise_eta(sigmas, spec)


def sweep_runs(labels: list[str]) -> dict[str, float]:
    """The runs of ``labels`` that train at a number (``NAME@ETA``): label -> eta."""
    out = {}
    for label in labels:
        spec = parse_run(label)[1]
        if isinstance(spec, float):
            out[label] = spec
    return out
