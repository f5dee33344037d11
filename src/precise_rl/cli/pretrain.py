"""Regenerate a built-in task's shipped weights from scratch (deterministic: fixed seeds and thread count).

``precise-rl pretrain digits --output DIR`` trains the digits flow model, the reward classifier
and the held-out evaluation classifier; ``precise-rl pretrain signs --output DIR`` trains the signs
text-to-image model and scores it on the held-out words with the ``ocr`` reward. Each writes its files
with a JSON report to DIR; with ``--output src/precise_rl/assets`` (the default seed and steps) it
rewrites the shipped files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..tasks import PRETRAIN_TASKS
from .paths import path_arg

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``precise-rl pretrain``."""
    parser.add_argument("task", choices=sorted(PRETRAIN_TASKS), help="the built-in task whose weights to regenerate")
    parser.add_argument(
        "--output",
        "-o",
        type=path_arg,
        default=None,
        help="output directory (default: pretrained-TASK, e.g. pretrained-digits)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and of training (default: 0)")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimiser steps of the flow model (default: digits 2000, signs 1000)"
    )
    parser.add_argument(
        "--classifier-steps",
        type=int,
        default=None,
        help="digits only: optimiser steps of each classifier (default: 1500)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads; part of what makes the bytes reproducible (default: 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Train, write the files and print the headline metrics."""
    if args.task not in PRETRAIN_TASKS:
        raise UserError(f"no pretraining recipe for task {args.task!r}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.classifier_steps is not None and args.classifier_steps < 1:
        raise UserError(f"--classifier-steps must be at least 1, got {args.classifier_steps}")
    if args.task == "signs" and args.classifier_steps is not None:
        raise UserError("--classifier-steps is for the digits task; the signs task trains no classifier")
    output = Path(args.output if args.output is not None else f"pretrained-{args.task}")
    start = time.perf_counter()
    summary: dict[str, Any]
    if args.task == "digits":
        from ..tasks.digits import pretrain_digits

        report = pretrain_digits(
            output,
            seed=args.seed,
            steps=args.steps,
            classifier_steps=args.classifier_steps,
            threads=args.threads,
            progress=not args.no_progress,
        )
        m = report["metrics"]
        summary = {
            "output": str(output),
            "wall_clock_s": round(time.perf_counter() - start, 1),
            "reward_classifier_test_accuracy": round(report["reward_classifier"]["test_accuracy"], 4),
            "eval_classifier_test_accuracy": round(report["eval_classifier"]["test_accuracy"], 4),
            f"ode_{m['num_steps']}_steps_recognised_by_eval_classifier": round(m["eval_classifier_recognition"], 4),
            "ode_mean_ink_by_style": {k: round(v, 4) for k, v in m["mean_ink_by_style"].items()},
        }
    else:
        from ..tasks.signs import REPORT_FILE, pretrain_signs

        report = pretrain_signs(
            output, seed=args.seed, steps=args.steps, threads=args.threads, progress=not args.no_progress
        )
        m = report["metrics"]
        elapsed = time.perf_counter() - start
        # the one field of the report that differs between two runs: kept apart from what the bytes reproduce
        path = output / REPORT_FILE
        path.write_text(
            json.dumps({**json.loads(path.read_text()), "measured": _measured(elapsed)}, indent=1, sort_keys=True)
            + "\n"
        )
        summary = {
            "output": str(output),
            "wall_clock_s": round(elapsed, 1),
            "final_train_loss": round(report["flow"]["final_train_loss"], 4),
            f"ode_{m['num_steps']}_steps_held_out_ocr": round(m["held_out_ocr"], 4),
            f"ode_{m['num_steps']}_steps_held_out_exact": round(m["held_out_exact"], 4),
        }
    print(json.dumps(summary, indent=1))
    return 0


def _measured(elapsed: float) -> dict[str, Any]:
    """Wall-clock of a pretraining command and the machine it ran on (its load included: a shared CPU is slower)."""
    import os
    import platform

    return {
        "wall_clock_s": round(elapsed, 1),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
    }
