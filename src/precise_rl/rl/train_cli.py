"""Train a policy with GRPO: ``precise-rl train [CONFIG] [key.path=value ...] [--output DIR] [--resume DIR]``.

With no config it trains the built-in task (digits, precise sampler) offline. Overrides use
dotted keys, e.g. ``train.lr=1e-4 sampler.name=cps``. ``--resume`` continues a run from its
newest checkpoint (or a given checkpoint directory) exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ExperimentConfig, apply_overrides, config_from_dict, load_config
from ..errors import UserError

__all__ = ["add_arguments", "run", "split_config_and_overrides", "resolve_config"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG | key=value",
        help="an optional YAML experiment file, then dotted overrides such as train.lr=1e-4",
    )
    p.add_argument(
        "--output", "-o", type=Path, default=None, help="run directory (default: runs/<model>-<sampler>-<time>)"
    )
    p.add_argument("--resume", type=Path, default=None, help="run directory or checkpoint to continue from")


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the config file; the rest are overrides."""
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UserError(f"unexpected argument {item!r}: give one config file, then key.path=value overrides")
    return config, overrides


def resolve_config(items: list[str], resume: Path | None) -> ExperimentConfig:
    """The experiment config from a file (or the default, or the resumed run's own) plus overrides."""
    config_path, overrides = split_config_and_overrides(items)
    if config_path is None and resume is not None:
        from .checkpoint import CheckpointError, latest_checkpoint, older_checkpoint_hint, verify_checkpoint

        ckpt = latest_checkpoint(resume)
        try:
            verify_checkpoint(ckpt, only=["state.json"])  # the trainer checks every file before loading
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}{older_checkpoint_hint(ckpt)}") from None
        try:
            saved = json.loads((ckpt / "state.json").read_text())["config"]
            if not isinstance(saved, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} holds no readable config in state.json{older_checkpoint_hint(ckpt)}"
            ) from None
        return config_from_dict(apply_overrides(saved, overrides))
    return load_config(config_path, overrides)


def _run_dir_of(resume: Path) -> Path:
    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(resume)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def run(args: argparse.Namespace) -> int:
    from .trainer import GRPOTrainer, default_output_dir

    cfg = resolve_config(args.items, args.resume)
    out = args.output or (_run_dir_of(args.resume) if args.resume else default_output_dir(cfg))
    trainer = GRPOTrainer(cfg, out, resume=args.resume)
    summary = trainer.run()
    if trainer.is_main:
        shown = {p: r for p, r in summary.get("protocols", {}).items() if None not in (r["before"], r["after"])}
        if shown:
            parts = [f"{p} {r['before']:.4f} -> {r['after']:.4f}" for p, r in shown.items()]
            head = f"held-out reward before -> after training (EMA weights): {', '.join(parts)}"
        else:
            head = (
                f"train reward {summary.get('train_reward_first', float('nan')):.4f} -> "
                f"{summary.get('train_reward_last', float('nan')):.4f}"
            )
        print(
            f"{head}; {summary.get('elapsed_s', 0):.0f} s; "
            f"plots: {summary['reward_curve']} and {summary['samples_dir']}/"
        )
    return 0
