"""Measure rollout and training speed and peak memory of real architectures with random weights: ``precise-rl bench``.

Writes ``bench.json`` and ``bench.md`` (the Markdown table) to ``--out`` and prints the table. See
:mod:`precise_rl.rl.bench` for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["add_arguments", "run"]


def _forward_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 0, got {text!r}")
    return value


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least``, refused before any heavy import."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
        return value

    return parse


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        nargs="+",
        default=["flux2_klein_4b"],
        metavar="NAME",
        help="shipped model configs to build (flux2_klein_4b, flux2_klein_9b, sd35_medium, sd35_large)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is a GPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="model dtype")
    p.add_argument("--resolution", type=_count(1), default=512, help="image side in pixels")
    p.add_argument("--sampler", default="precise", help="rollout sampler")
    p.add_argument("--steps", type=_count(1), default=10, help="sampler steps")
    p.add_argument("--groups", type=_count(1), default=2, help="prompts per step (train.groups_per_epoch)")
    p.add_argument("--group-size", type=_count(1), default=4, help="images per prompt (train.group_size)")
    p.add_argument(
        "--forward-batch",
        type=_forward_batch,
        default=None,
        help="train.forward_batch: rows per training forward, 0 or auto (default: auto on a GPU, 2 on the CPU)",
    )
    p.add_argument("--memory-budget-gb", type=float, default=None, help="train.memory_budget_gb (for auto)")
    p.add_argument("--lora-rank", type=_count(1), default=32)
    p.add_argument(
        "--kl-beta",
        type=_weight,
        default=0.0,
        help="GRPO's KL weight (> 0: a full fine-tune keeps a frozen reference copy, on the CPU with --memory on)",
    )
    p.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default: the model's)")
    p.add_argument(
        "--width-scale",
        type=_count(1),
        default=1,
        help="divide every width of the transformer and VAE by this (8: a reduced model for a CPU check)",
    )
    p.add_argument("--trainings", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--memory", nargs="+", default=["off", "on"], choices=["off", "on"], dest="memories")
    p.add_argument("--warmup", type=_count(0), default=1, help="untimed steps first")
    p.add_argument("--repeats", type=_count(1), default=1, help="timed steps (their mean is reported)")
    p.add_argument("--threads", type=_count(1), default=None, help="torch's CPU threads (default: torch's)")
    p.add_argument("--out", default="bench", help="directory for bench.json and bench.md")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..rl.bench import BenchSettings, bench_table, run_bench, write_results

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fb = args.forward_batch if args.forward_batch is not None else ("auto" if device.startswith("cuda") else 2)
    settings = BenchSettings(
        models=tuple(args.models),
        device=device,
        dtype=args.dtype,
        resolution=args.resolution,
        sampler=args.sampler,
        steps=args.steps,
        groups=args.groups,
        group_size=args.group_size,
        forward_batch=fb,
        memory_budget_gb=args.memory_budget_gb,
        lora_rank=args.lora_rank,
        kl_beta=args.kl_beta,
        max_sequence_length=args.max_sequence_length,
        width_scale=args.width_scale,
        trainings=tuple(args.trainings),
        memories=tuple(args.memories),
        warmup=args.warmup,
        repeats=args.repeats,
    )
    rows = run_bench(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    js, md = write_results(rows, settings, args.out)
    print(bench_table(rows))
    for r in rows:
        if r.error:
            print(f"{r.model} {r.training} memory {r.memory_options}: {r.error}", file=sys.stderr)
    print(f"wrote {js} and {md}", file=sys.stderr)
    return 1 if all(r.error for r in rows) else 0
