"""Map where Precise wins: ``precise-rl study [CONFIG] [key=value ...]`` trains every sampler over a grid of cells.

A cell is a step count N and a time grid (``uniform``; ``shiftA``, the SD3 shift with ``a = A``; ``model``,
the policy's own grid). In each cell every sampler of ``--samplers`` trains at its reference eta over
``--seeds`` seeds, with ``sampler.num_steps`` and ``eval.num_steps`` both N and the evaluations of
``precise-rl compare`` (both protocols, ``own`` and ``ode``, as often as compare evaluates a run of that
length). Cells whose time grids are identical (for the built-in digits model, ``model`` is the shift3
grid) are run once.

Per cell and protocol the study reports what ``compare`` does (the target: the best final prior reward;
each sampler's final reward and epochs to target; precise's epoch ratio against the best prior sampler,
with its per-seed spread) and the headroom the target leaves below the reward's ceiling; a cell with
headroom under 0.1 is marked saturated (its ratio says little). Beside it stands the fidelity lab's
number for the same grid: each sampler's output std over the target std on sharp Gaussian data
(std 0.02), exact, the excess noise the sampler leaves. Jobs run in a pool of ``--workers`` processes
(one torch thread each); a job whose run directory holds a finished run is not run again, so a killed
study resumes where it stopped. Writes ``study.json``, ``study.md``, ``study_heatmap.png`` and
``study_curves.png``.

The default study is 3 seeds x steps 6, 10, 20 x grids uniform, shift3, model x 5 samplers, 100 epochs
per run: 90 runs on the built-in task, whose ``model`` grid is the shift3 grid. Its runs evaluate 2 samples
per held-out prompt and keep one checkpoint, at the end (``eval.samples_per_prompt=2 checkpoint.every=0
checkpoint.keep=1``, before your overrides, which win). It takes about 20 minutes on a 2-core CPU.
``--quick`` is 30 epochs, steps 6 and 10, 2 seeds and 16 held-out prompts: 40 runs, a few minutes.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..algorithm_table import ALGORITHM_TABLE
from ..config import MAX_STEPS, check_at_most
from ..errors import UserError
from ..rl.compare import parse_algorithms, parse_samplers
from ..rl.run_config import split_config_and_overrides
from ..rl.rundir import command_line, lock_run_dir
from ..rl.study import DEFAULT_GRIDS, DEFAULT_SEEDS, DEFAULT_STEPS, QUICK, STUDY_OVERRIDES, format_markdown, run_study
from ..sde.samplers import trainable_samplers
from .paths import path_arg

__all__ = ["add_arguments", "run", "parse_steps", "parse_grids"]


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
        default=DEFAULT_GRIDS,
        help=f"comma-separated time grids: uniform, model, shiftA for any A > 0 (default {DEFAULT_GRIDS})",
    )
    p.add_argument(
        "--samplers",
        default=",".join(trainable_samplers()),
        help=f"comma-separated samplers (default: {','.join(trainable_samplers())})",
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
        f"{' '.join(QUICK['overrides'])} (each unless given): 40 runs, 2-5 minutes on 2 cores depending on their load",
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


def run(args: argparse.Namespace) -> int:
    algorithms = parse_algorithms(args.algorithms) if args.algorithms is not None else None
    any_sampler = algorithms is not None and any(ALGORITHM_TABLE[a].samplers == "any" for a in algorithms)
    samplers = parse_samplers(args.samplers, any_sampler=any_sampler)
    steps = parse_steps(args.steps) if args.steps is not None else None
    grids = parse_grids(args.grids)
    seeds = args.seeds
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {seeds}")
    if args.workers < 1:
        raise UserError(f"--workers must be a positive integer, got {args.workers}")
    config, overrides = split_config_and_overrides(args.items)
    extra = list(STUDY_OVERRIDES)
    if args.quick:
        steps = steps or list(QUICK["steps"])
        seeds = seeds or QUICK["seeds"]
        extra += QUICK["overrides"]
    steps = steps or list(DEFAULT_STEPS)
    seeds = seeds or DEFAULT_SEEDS
    items = ([config] if config else []) + extra + overrides  # the user's overrides come last and win
    with lock_run_dir(args.output, command_line()):  # one study at a time writes the output directory
        result = run_study(items, seeds, steps, grids, samplers, args.workers, args.output, algorithms)
    print()
    print(format_markdown(result))
    out = args.output
    print(
        f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study_heatmap.png'} and {out / 'study_curves.png'} "
        f"({result['timings']['wall_s']:.0f} s)"
    )
    return 0
