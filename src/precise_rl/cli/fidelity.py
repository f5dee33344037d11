"""How faithfully does each sampler reproduce a known data distribution?

Exact numbers on Gaussian data N(m, c^2) (a sharp and a broad target): output std / target std,
KL(output || target) and the exploration share E[Var(x0|x1)]/Var(x0), for every sampler at its
default eta and over an eta sweep, on the uniform and the shifted time grid. Then Monte Carlo
rollouts on a 2-D Gaussian mixture with its exact velocity: W2 to fresh target samples,
mode-weight error and residual noise. And each sampler written as a member of the precise family:
per grid and NFE, the effective eta of each step (the eta of the precise step that injects the same
fresh noise; the same transition for cps and the precise family, a match of the fresh-noise variance
only for the Euler-Maruyama samplers), its median, min and max, and the precise eta that keeps cps's
total share of the noise estimate (the eta of ``precise-rl study``'s control ``precise@cps``).
Writes fidelity.json and PNG plots into --output and prints the tables.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UserError
from ..fidelity.lab import GRIDS, LabConfig  # no torch: --help and argument errors answer at once
from ..sde.samplers import SAMPLERS
from .paths import path_arg

_QUICK = {"nfe": (6, 10, 30), "samples": 500, "eta_points": 7}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``precise-rl fidelity`` flags."""
    default = LabConfig()
    parser.add_argument("--output", "-o", type=path_arg, default=Path("fidelity-report"), help="report folder")
    parser.add_argument(
        "--nfe", type=int, nargs="+", default=None, help=f"step counts (default: {' '.join(map(str, default.nfe))})"
    )
    parser.add_argument(
        "--samples", type=int, default=None, help=f"Monte Carlo samples on the mixture (default {default.samples})"
    )
    parser.add_argument("--seed", type=int, default=default.seed, help="random seed of the Monte Carlo part")
    parser.add_argument(
        "--samplers", nargs="+", default=list(default.samplers), metavar="NAME", help=f"from {', '.join(SAMPLERS)}"
    )
    parser.add_argument(
        "--grids", nargs="+", default=list(default.grids), metavar="GRID", help=f"from {', '.join(GRIDS)}"
    )
    parser.add_argument("--shift", type=float, default=default.shift, help="shift of the shifted grid")
    parser.add_argument(
        "--target-stds",
        type=float,
        nargs="+",
        default=list(default.target_stds),
        metavar="C",
        help="stds c of the Gaussian targets N(m, c^2)",
    )
    parser.add_argument("--target-mean", type=float, default=default.target_mean, help="mean m of the Gaussian targets")
    parser.add_argument(
        "--eta-points",
        type=int,
        default=None,
        help=f"points of each sampler's eta sweep (default {default.eta_points})",
    )
    parser.add_argument("--modes", type=int, default=default.modes, help="modes of the 2-D mixture")
    parser.add_argument("--scatter-nfe", type=int, default=None, help="NFE of the scatter plot (default 10)")
    parser.add_argument("--frontier-nfe", type=int, default=None, help="NFE of the frontier plot (default 10)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller defaults: NFE {' '.join(map(str, _QUICK['nfe']))}, {_QUICK['samples']} samples, "
        f"{_QUICK['eta_points']} eta points",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> LabConfig:
    base = LabConfig()
    quick = _QUICK if args.quick else {}
    cfg = LabConfig(
        nfe=tuple(args.nfe) if args.nfe is not None else quick.get("nfe", base.nfe),
        grids=tuple(args.grids),
        shift=args.shift,
        target_mean=args.target_mean,
        target_stds=tuple(args.target_stds),
        samplers=tuple(dict.fromkeys(args.samplers)),
        eta_points=args.eta_points if args.eta_points is not None else quick.get("eta_points", base.eta_points),
        samples=args.samples if args.samples is not None else quick.get("samples", base.samples),
        modes=args.modes,
        seed=args.seed,
        scatter_nfe=args.scatter_nfe,
        frontier_nfe=args.frontier_nfe,
    )
    try:
        return cfg.validated()
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run the lab, print the tables, write the JSON and the plots."""
    cfg = _config(args)
    out: Path = args.output
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    from ..fidelity.report import format_tables, run_lab, write_report  # torch, once the arguments are good

    start = time.perf_counter()
    results, scatter = run_lab(cfg, progress=not args.no_progress)
    try:
        paths = write_report(results, scatter, out)
    except OSError as exc:
        raise UserError(f"cannot write the report into {out}: {exc.strerror or exc}") from None
    print(format_tables(results))
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    print(f"fidelity report took {time.perf_counter() - start:.1f} s")
    return 0
