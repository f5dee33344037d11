"""Map where Precise wins, and why: ``precise-rl study [CONFIG] [key=value ...]`` trains every run over cells.

A cell is a step count N and a time grid (``uniform``; ``shiftA``, the SD3 shift with ``a = A``; ``model``,
the policy's own grid). In each cell every run of ``--samplers`` trains over ``--seeds`` seeds, with
``sampler.num_steps`` and ``eval.num_steps`` both N and the evaluations of ``precise-rl compare`` (both
protocols, ``own`` and ``ode``, as often as compare evaluates a run of that length, and once before
training). Cells whose time grids are identical (for the built-in digits model, ``model`` is the shift3
grid) are run once. A run is ``NAME`` (the sampler at its reference eta), ``NAME@ETA`` (at that eta), or
``precise@OTHER``: precise at the one eta that matches sampler OTHER's exploration on the cell's grid.
``--etas 0.5,1,1.5,2,3 --samplers precise`` sweeps one sampler's eta, one run per eta.

Why a matched control: written as a member of the precise family, each step of cps is a precise step
at the effective eta sqrt(-2 log cos(eta pi / 2) / dlambda), dlambda the step's gain in log-SNR; it
grows as the grid is refined, while precise's eta is fixed. So "precise against cps" mixes two things:
consistency and the amount of exploration. ``precise@cps`` has cps's exploration and precise's
consistency. Its eta keeps, over the steps where cps has an effective eta, the same product of kept
shares of the noise estimate as cps (the log-SNR-weighted root mean square of cps's per-step effective
etas; about 1.40, 1.70, 2.20, 2.56 on the uniform grid at 6, 10, 20, 30 steps), not the median per-step
eta (1.41, 1.80, 2.51, 3.04): on broad Gaussian data (std 0.5) precise at the matched eta ends with an
output spread closer to cps's than at the median.

Per cell and protocol the study reports what ``compare`` does (the target: the best final prior reward;
each run's final reward and epochs to target; precise's epoch ratio against the best prior sampler,
with its per-seed spread) and the headroom the target leaves below the reward's ceiling; a cell with
headroom under 0.1 is marked saturated (its ratio says little). Where precise, cps and precise@cps all
ran, a second table splits precise - cps (final reward, seed pair by seed pair) into precise -
precise@cps, the effect of the exploration level, and precise@cps - cps, the effect of consistency at
cps's exploration. The last table gives, per cell and run: the eta it ran at; its effective precise
eta (median and range over the steps; a match of the fresh-noise variance only for the Euler-Maruyama
samplers, whose means differ); the fidelity lab's exact output std over the target std on sharp
Gaussian data (std 0.02: the excess noise a sampler leaves) and on broad data (std 0.5: the
contraction, where cps's bias shows at 20-30 steps); and the untrained model's held-out reward under
each protocol (the offset each sampler's own rollouts start from) with the gain over it, so that a lead
that is only a starting offset is not read as faster learning.

Jobs run in a pool of ``--workers`` processes (one torch thread each); a job whose run directory holds a
finished run is not run again, so a killed study resumes where it stopped. Writes ``study.json``,
``study.md``, ``study_heatmap.png`` and ``study_curves.png`` (one series per run), and for an eta sweep
``study_etas.png`` (final and untrained reward against eta).

The default study is 3 seeds x steps 6, 10, 20, 30 x grids uniform, shift3, model x the runs precise,
flow_grpo, cps and precise@cps, 100 epochs per run: 96 runs on the built-in task, whose ``model`` grid is
the shift3 grid (dance_grpo and dance_precise train only when named; the second table lists them, exact,
all the same). Its runs evaluate 2 samples per held-out prompt and keep one checkpoint, at the end
(``eval.samples_per_prompt=2 checkpoint.every=0 checkpoint.keep=1``, before your overrides, which win).
Estimated from single runs on the 2-core development machine (a 30-step run costs about 3 times a 10-step
one) and the 19-27 minutes of the earlier 90-run study of steps 6-20: about 28-40 minutes on 2 cores,
depending on their load. ``--quick`` is 30 epochs, steps 6 and 10, 2 seeds and 16 held-out prompts:
32 runs, 3 min 4 s on the 2-core development machine at load 8.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from ..algorithm_table import ALGORITHM_TABLE
from ..config import MAX_STEPS, check_at_most
from ..errors import UserError
from ..rl.compare import parse_algorithms, parse_samplers
from ..rl.run_config import split_config_and_overrides
from ..rl.rundir import command_line, lock_run_dir
from ..rl.study import (
    DEFAULT_GRIDS,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    QUICK,
    STUDY_OVERRIDES,
    TASK_SIZES,
    default_runs,
    format_markdown,
    parse_run,
    run_study,
)
from .paths import path_arg

__all__ = ["add_arguments", "run", "parse_steps", "parse_grids", "parse_runs", "parse_etas"]


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG | key=value", help="an optional YAML file, then overrides")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per sampler and cell (default {DEFAULT_SEEDS})")
    p.add_argument(
        "--steps",
        default=None,
        help=f"comma-separated step counts N (default {','.join(map(str, DEFAULT_STEPS))})",
    )
    p.add_argument(
        "--grids",
        default=None,
        help=f"comma-separated time grids: uniform, model, shiftA for any A > 0 (default {DEFAULT_GRIDS}; "
        "the signs task: model)",
    )
    p.add_argument(
        "--samplers",
        default=None,
        help="comma-separated runs: NAME (the sampler at its reference eta), NAME@ETA (at that eta) or "
        f"precise@OTHER (precise at the eta that matches sampler OTHER's exploration on each cell's grid) "
        f"(default: {','.join(default_runs())})",
    )
    p.add_argument(
        "--etas",
        default=None,
        help="comma-separated etas: an eta sweep of the one sampler --samplers names, each eta a run "
        "(NAME@ETA) in the tables and figures, e.g. --etas 0.5,1,1.5,2,3 --samplers precise",
    )
    p.add_argument(
        "--algorithms",
        default=None,
        help="comma-separated algorithms to study across (every pair with a sampler it accepts; default: the "
        "config's algorithm)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=_default_workers(),
        help="training processes at once, one torch thread each; 1 runs in this process (default: 2, or the CPU "
        "count if smaller)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a short study: --steps {','.join(map(str, QUICK['steps']))}, --seeds {QUICK['seeds']}, "
        f"{' '.join(QUICK['overrides'])} (each unless given): 32 runs "
        "on the built-in task, 2-5 minutes on 2 cores depending on their load (3 min 4 s at load 8); with "
        "configs/signs_precise.yaml the signs task's own sizes: 4 runs at 10 steps, 6 epochs (3 min 20 s at load 3)",
    )
    p.add_argument("--output", "-o", type=path_arg, default=Path("runs/study"), help="directory for runs and results")


# --------------------------------------------------------------------------- flags


def parse_steps(text: str) -> list[int]:
    """``--steps``: positive integers, each once, in the order given."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            n = int(part)
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"--steps takes comma-separated positive integers, got {part!r}")
        check_at_most("--steps", n, MAX_STEPS, " steps")
        if n not in out:
            out.append(n)
    if not out:
        raise UserError("--steps names no step count; give comma-separated positive integers such as 6,10,20")
    return out


def parse_grids(text: str) -> list[tuple[str, float | None]]:
    """``--grids``: ``(label, shift)`` pairs; ``uniform`` and ``model`` have no shift, ``shiftA`` has ``A``."""
    out: list[tuple[str, float | None]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in ("uniform", "model"):
            grid: tuple[str, float | None] = (part, None)
        else:
            shift = None
            if part.startswith("shift"):
                try:
                    shift = float(part[len("shift") :])
                except ValueError:
                    shift = None
            if shift is None or not (math.isfinite(shift) and shift > 0):
                raise UserError(f"--grids: unknown grid {part!r}; choose from uniform, model, shiftA with A > 0")
            grid = (f"shift{shift:g}", shift)
        if grid[0] not in [g for g, _ in out]:
            out.append(grid)
    if not out:
        raise UserError("--grids names no grid; choose from uniform, model, shiftA with A > 0")
    return out


def parse_runs(text: str, any_sampler: bool = False) -> list[str]:
    """``--samplers``: runs ``NAME``, ``NAME@ETA`` or ``precise@OTHER``, each once; UserError naming a bad one."""
    parts = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    parse_samplers(",".join(p.split("@", 1)[0] for p in parts) or text, any_sampler=any_sampler)
    out: list[str] = []
    for part in parts:
        try:
            name, spec = parse_run(part)
        except ValueError as exc:
            raise UserError(f"--samplers: {exc}") from None
        label = name if spec is None else f"{name}@{spec:g}" if isinstance(spec, float) else f"{name}@{spec}"
        if label not in out:
            out.append(label)
    return out


def parse_etas(text: str, runs: list[str]) -> list[str]:
    """``--etas`` over the one sampler of ``runs``: the runs ``NAME@ETA``, each eta once, in the order given."""
    if len(runs) != 1 or "@" in runs[0]:
        raise UserError(
            f"--etas sweeps one sampler at a time: give one sampler name with --samplers, not {','.join(runs)}"
        )
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part and f"{runs[0]}@{part}" not in out:
            try:
                float(part)
            except ValueError:
                raise UserError(f"--etas takes comma-separated numbers, got {part!r}") from None
            out.extend(r for r in parse_runs(f"{runs[0]}@{part}") if r not in out)
    if not out:
        raise UserError("--etas names no eta; give comma-separated numbers such as 0.5,1,1.5,2,3")
    return out


def _task_sizes(config: str | None, overrides: list[str]) -> dict[str, Any]:
    """The study sizes of the config's built-in task (:data:`TASK_SIZES`), or none: the digits defaults."""
    from ..rl.run_config import resolve_config

    name = resolve_config(([config] if config else []) + overrides, None).model.name
    return TASK_SIZES.get(name, {})


def run(args: argparse.Namespace) -> int:
    algorithms = parse_algorithms(args.algorithms) if args.algorithms is not None else None
    any_sampler = algorithms is not None and any(ALGORITHM_TABLE[a].samplers == "any" for a in algorithms)
    if args.samplers is not None:
        samplers = parse_runs(args.samplers, any_sampler=any_sampler)
    elif args.etas is not None:
        raise UserError("--etas sweeps one sampler at a time: name it with --samplers, e.g. --samplers precise")
    else:
        samplers = default_runs()
    if args.etas is not None:
        samplers = parse_etas(args.etas, samplers)
    steps = parse_steps(args.steps) if args.steps is not None else None
    config, overrides = split_config_and_overrides(args.items)
    sizes = _task_sizes(config, overrides)
    grids = parse_grids(args.grids if args.grids is not None else sizes.get("grids", DEFAULT_GRIDS))
    seeds = args.seeds
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {seeds}")
    if args.workers < 1:
        raise UserError(f"--workers must be a positive integer, got {args.workers}")
    extra = list(STUDY_OVERRIDES) + list(sizes.get("overrides", []))
    if args.quick:
        quick = sizes.get("quick", QUICK)
        steps = steps or list(quick["steps"])
        seeds = seeds or quick["seeds"]
        extra += quick["overrides"]
    steps = steps or list(DEFAULT_STEPS)
    seeds = seeds or sizes.get("seeds", DEFAULT_SEEDS)
    items = ([config] if config else []) + extra + overrides  # the user's overrides come last and win
    with lock_run_dir(args.output, command_line()):  # one study at a time writes the output directory
        result = run_study(items, seeds, steps, grids, samplers, args.workers, args.output, algorithms)
    print()
    print(format_markdown(result))
    out = args.output
    figures = [out / n for n in ("study_heatmap.png", "study_curves.png", "study_etas.png", "study_algorithms.png")]
    written = [str(p) for p in (out / "study.json", out / "study.md", *figures) if p.is_file()]
    print(f"wrote {', '.join(written[:-1])} and {written[-1]} ({result['timings']['wall_s']:.0f} s)")
    return 0
