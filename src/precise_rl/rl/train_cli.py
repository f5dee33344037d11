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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --output (its metrics, checkpoints, samples); without it such a "
        "directory is refused",
    )


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


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    import contextlib

    from .rundir import command_line, is_main_launch_process, lock_run_dir, prepare_run_dir

    cfg = resolve_config(args.items, args.resume)  # config errors come before torch is even imported
    from .preflight import check_config

    check_config(cfg)
    from ..sde.rollout import NonFiniteRollout
    from .trainer import GRPOTrainer, default_output_dir

    own_dir = _run_dir_of(args.resume) if args.resume else None
    out = args.output or own_dir or default_output_dir(cfg)
    # Continuing a run in its own directory is the only way to write into a directory holding a run
    # without --overwrite; --resume with another --output starts a new directory from that checkpoint.
    resuming = own_dir is not None and _same_dir(own_dir, out)
    if resuming and args.overwrite:
        raise UserError(
            f"--overwrite would delete the run that --resume continues in {str(out)!r}; drop one of the two"
        )
    args._run_dir = out  # named by the CLI's Ctrl-C message with the checkpoint to resume from
    main = is_main_launch_process()
    existed = out.exists()
    with lock_run_dir(out, command_line()) if main else contextlib.nullcontext():
        if main:
            prepare_run_dir(out, resuming=resuming, overwrite=args.overwrite)
        try:
            trainer = GRPOTrainer(cfg, out, resume=args.resume)
            # A run killed after its last checkpoint but before its summary is finished below (run()
            # trains nothing more and writes the summary and plots); only a summarised run is complete.
            if args.resume is not None and trainer.epoch >= cfg.train.epochs and (out / "summary.json").is_file():
                if trainer.is_main:
                    print(
                        f"the run in {out} is already complete ({trainer.epoch} of {cfg.train.epochs} epochs); "
                        f"nothing was trained. To train longer: precise-rl train --resume {out} "
                        f"train.epochs={cfg.train.epochs * 2}"
                    )
                return 0
            summary = trainer.run()
        except NonFiniteRollout as exc:
            # In training the velocity is the model's: what overflows is its weights or the sampler's noise.
            why = str(exc).replace(
                "check velocity_fn and the inputs", "the model's output or the sampler's noise overflowed"
            )
            raise UserError(f"training stopped: {why}; lower train.lr or sampler.eta; {resume_hint(out)}") from None
        except BaseException:
            if main and not resuming:
                discard_unresumable(out, existed)
            raise
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


def resume_hint(out: Path) -> str:
    """Where training can go on from: the newest checkpoint and the command, or that there is none."""
    from .checkpoint import list_checkpoints

    ckpts = list_checkpoints(Path(out) / "checkpoints")
    if not ckpts:
        return "no checkpoint was written yet"
    return f"the last checkpoint is {str(ckpts[-1])!r}; continue with: precise-rl train --resume {out}"


def discard_unresumable(out: Path, existed: bool) -> None:
    """After a failed start in a directory this command made: remove it when it holds no run.

    A start that stopped before it trained anything left only its config and empty folders; the
    directory would otherwise stay behind half-made. A directory that was there before is left as
    it is (its leftovers are cleared by the next start), and so is any run with something to keep.
    """
    import shutil

    from .rundir import holds_run

    if existed:
        return
    try:
        if not holds_run(out):
            shutil.rmtree(out, ignore_errors=True)
    except (OSError, UserError):
        pass  # best effort: the error being raised matters more
