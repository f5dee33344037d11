"""Score a trained run on held-out prompts: ``precise-rl eval RUN_DIR [--samplers ode,precise] [--steps 10,20]``.

Loads the newest checkpoint (EMA weights) of RUN_DIR, or the one given with ``--checkpoint``,
and writes ``eval.json`` beside it with the reward of every (sampler, steps) pair.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from ..errors import UserError
from ..sde import SAMPLERS

__all__ = ["add_arguments", "run"]


def _csv(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="a run directory written by precise-rl train")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory (default: the newest)")
    p.add_argument(
        "--samplers",
        type=_csv(str),
        default=["ode", "own"],
        help="comma-separated; 'own' = the run's sampler at its training eta",
    )
    p.add_argument(
        "--steps", type=_csv(int), default=None, help="comma-separated step counts (default: the run's eval steps)"
    )
    p.add_argument("--samples-per-prompt", type=int, default=None)
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--output", type=Path, default=None, help="JSON file to write (default: RUN_DIR/eval.json)")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import latest_checkpoint
    from .train_cli import resolve_config
    from .trainer import GRPOTrainer

    args.samplers = ["own" if s == "train" else s for s in args.samplers]  # 'train': the former name of 'own'
    for s in args.samplers:
        if s != "own" and s not in SAMPLERS:
            raise UserError(f"--samplers has unknown sampler {s!r}; choose from own, {', '.join(SAMPLERS)}")
    if args.steps is not None and any(n < 1 for n in args.steps):
        raise UserError("--steps must be positive integers")
    for flag in ("samples_per_prompt", "max_prompts"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    ckpt = latest_checkpoint(args.checkpoint or args.run_dir)
    cfg = resolve_config([], ckpt)
    cfg.logging.tensorboard = False
    cfg.logging.progress = False
    trainer = GRPOTrainer(cfg, args.run_dir, resume=ckpt, read_only=True)
    results = []
    for n in args.steps or [cfg.eval.num_steps]:
        ecfg = copy.deepcopy(cfg.eval)
        ecfg.samplers = list(args.samplers)
        ecfg.num_steps = n
        if args.samples_per_prompt:
            ecfg.samples_per_prompt = args.samples_per_prompt
        if args.max_prompts:
            ecfg.max_prompts = args.max_prompts
        trainer.cfg.eval = ecfg
        scores = trainer.evaluate(trainer.epoch, write_grid=False)
        for s in args.samplers:
            key = s
            row = {"sampler": cfg.sampler.name if s == "own" else s, "protocol": s, "steps": n}
            row.update(
                {
                    k.split("/", 1)[1] if "/" in k else "reward": v
                    for k, v in scores.items()
                    if k.startswith(f"eval_{key}")
                }
            )
            results.append(row)
            print(f"{row['sampler']:>14} {n:>5} steps  reward {row['reward']:.4f}")
    out = args.output or (Path(args.run_dir) / "eval.json")
    if trainer.is_main:
        out.write_text(json.dumps({"checkpoint": str(ckpt), "epoch": trainer.epoch, "results": results}, indent=1))
        print(f"wrote {out}")
    return 0
