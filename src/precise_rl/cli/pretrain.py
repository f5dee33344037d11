"""Regenerate a built-in task's shipped weights from scratch (deterministic: fixed seeds and thread count).

``precise-rl pretrain digits --output DIR`` trains the digits flow model, the reward classifier
and the held-out evaluation classifier, and writes them with a JSON report to DIR. With
``--output src/precise_rl/assets`` (the default seed and steps) it rewrites the shipped files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import UserError
from ..tasks import PRETRAIN_TASKS
from .paths import path_arg

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``precise-rl pretrain``."""
    parser.add_argument("task", choices=sorted(PRETRAIN_TASKS), help="the built-in task whose weights to regenerate")
    parser.add_argument(
        "--output", "-o", type=path_arg, default="pretrained-digits", help="output directory (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and of training (default: 0)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of the flow model (default: 2000)")
    parser.add_argument(
        "--classifier-steps", type=int, default=None, help="optimiser steps of each classifier (default: 1500)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads; part of what makes the bytes reproducible (default: 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Train, write the files and print the headline metrics."""
    from ..tasks.digits import pretrain_digits

    if args.task != "digits":
        raise UserError(f"no pretraining recipe for task {args.task!r}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.classifier_steps is not None and args.classifier_steps < 1:
        raise UserError(f"--classifier-steps must be at least 1, got {args.classifier_steps}")
    start = time.perf_counter()
    report = pretrain_digits(
        Path(args.output),
        seed=args.seed,
        steps=args.steps,
        classifier_steps=args.classifier_steps,
        threads=args.threads,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - start
    m = report["metrics"]
    summary = {
        "output": str(args.output),
        "wall_clock_s": round(elapsed, 1),
        "reward_classifier_test_accuracy": round(report["reward_classifier"]["test_accuracy"], 4),
        "eval_classifier_test_accuracy": round(report["eval_classifier"]["test_accuracy"], 4),
        f"ode_{m['num_steps']}_steps_recognised_by_eval_classifier": round(m["eval_classifier_recognition"], 4),
        "ode_mean_ink_by_style": {k: round(v, 4) for k, v in m["mean_ink_by_style"].items()},
    }
    print(json.dumps(summary, indent=1))
    return 0
