"""Train one recipe with every sampler side by side: ``precise-rl compare [CONFIG] [key=value ...] --seeds N``.

With ``--algorithms grpo,nft,...`` every algorithm trains with every sampler it accepts (GRPO needs a
stochastic one; the algorithms that train on final samples take ``ode`` too), each at its default
knobs (the config's own for the config's algorithm); runs are labelled ``algorithm/sampler``.

Each sampler runs at its reference eta over N seeds, one after another in this process, on the
same prompts, rewards and evaluation noise. Every evaluation scores the held-out prompts (EMA
weights, fixed noise) under both protocols:

* ``own``: each sampler's own stochastic rollouts at its training eta, the reference's
  "in-domain reward" (excess noise a sampler leaves lowers its own score);
* ``ode``: the deterministic ODE sampler on the same weights.

For each protocol the target is the best final reward among the prior samplers (flow_grpo,
dance_grpo, cps), and each sampler's time to reach it is read off its seed-mean curve (linear
between evaluations) in epochs, optimizer steps and training wall-clock. The samplers' step costs
are equal, so the wall-clock used for the ratios is the robust one: epochs times the median
training seconds per epoch over the epochs of every sampler and seed (on a shared machine the
per-sampler medians differ by noise alone); each sampler's own median and the measured cumulative
wall-clock are reported beside it; the robust clock pools each algorithm's epochs apart, as algorithms
cost differently per epoch. Reward is also read against model evaluations spent (rollout forwards,
one per sample and step, plus the training passes' forwards and backwards, one each per row), the
cost that does not depend on the machine. Writes ``compare.json``, ``compare.md`` (the table) and ``compare.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..algorithm_table import ALGORITHM_TABLE
from ..errors import UserError
from ..rl.compare import RATIO_BASIS, compare_runs, parse_algorithms, parse_samplers, print_summary
from ..sde.samplers import trainable_samplers
from .paths import path_arg

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG | key=value", help="an optional YAML file, then overrides")
    p.add_argument("--seeds", type=int, default=3, help="seeds per sampler (default 3)")
    p.add_argument(
        "--samplers",
        default=",".join(trainable_samplers()),
        help=f"comma-separated samplers (default: {','.join(trainable_samplers())})",
    )
    p.add_argument(
        "--algorithms",
        default=None,
        help=f"comma-separated algorithms to compare across (of {', '.join(ALGORITHM_TABLE)}; default: the config's)",
    )
    p.add_argument("--output", "-o", type=path_arg, default=Path("runs/compare"), help="directory for runs and results")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the runs an earlier compare left in the output directory"
    )


def run(args: argparse.Namespace) -> int:
    algorithms = parse_algorithms(args.algorithms) if args.algorithms is not None else None
    any_sampler = algorithms is not None and any(ALGORITHM_TABLE[a].samplers == "any" for a in algorithms)
    samplers = parse_samplers(args.samplers, any_sampler=any_sampler)
    if args.seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {args.seeds}")
    result = compare_runs(args.items, args.seeds, samplers, args.output, args.overwrite, algorithms)
    print(f"evaluations every {result['eval_every']} epochs; wall-clock ratios use {RATIO_BASIS}")
    for protocol, summary in result["protocols"].items():
        print_summary(summary, protocol, args.seeds)
    if result.get("ema_note"):
        print(f"\nnote: {result['ema_note']}")
    print(f"\nwrote {args.output / 'compare.json'}, {args.output / 'compare.md'} and {args.output / 'compare.png'}")
    return 0
