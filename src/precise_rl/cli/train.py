"""Train a policy: ``precise-rl train [CONFIG] [key.path=value ...] [--output DIR] [--resume DIR]``.

With no config it trains the built-in task (digits, GRPO with the precise sampler) offline. Overrides
use dotted keys, e.g. ``train.lr=1e-4 sampler.name=cps``. ``algorithm.name`` picks the algorithm
(``grpo``, the default; ``nft``, DiffusionNFT; ``awm``, Advantage Weighted Matching; ``dpo``, online
Diffusion-DPO; ``precise-rl --help`` lists them) and its knobs sit beside it (``algorithm.beta=0.1``);
``algorithm.fast_window=3`` makes GRPO Flow-GRPO-Fast. ``--resume`` continues a run from its newest
checkpoint (or a given checkpoint directory) exactly where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..rl.run_config import resolve_config, split_config_and_overrides
from ..rl.rundir import discard_unresumable, resume_hint
from .paths import path_arg

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG | key=value",
        help="an optional YAML experiment file, then dotted overrides such as train.lr=1e-4",
    )
    p.add_argument(
        "--output", "-o", type=path_arg, default=None, help="run directory (default: runs/<model>-<sampler>-<time>)"
    )
    p.add_argument("--resume", type=path_arg, default=None, help="run directory or checkpoint to continue from")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --output (its metrics, checkpoints, samples) and whatever else a run "
        "writes there; without it a directory holding a run, or files precise-rl did not write, is refused",
    )


def _run_dir_of(resume: Path) -> Path:
    from ..rl.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(resume)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    import contextlib

    from ..rl.rundir import command_line, is_main_launch_process, lock_run_dir, prepare_run_dir

    cfg = resolve_config(args.items, args.resume, honour_edits=True)  # config errors come before torch is even imported
    from ..rl.preflight import check_config

    check_config(cfg)
    from ..rl.trainer import Trainer, default_output_dir
    from ..sde.trajectory import NonFiniteRollout

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
            config_path, _ = split_config_and_overrides(args.items)
            keep = [Path(config_path)] if config_path else []
            prepare_run_dir(out, resuming=resuming, overwrite=args.overwrite, keep=keep)
        try:
            trainer = Trainer(cfg, out, resume=args.resume)
            # A run killed after its last checkpoint but before its summary is finished below (run()
            # trains nothing more and writes the summary and plots); only a summarised run is complete.
            if args.resume is not None and trainer.epoch >= cfg.train.epochs and (out / "summary.json").is_file():
                if trainer.is_main:
                    # a run may have trained beyond a train.epochs given on this resume: propose more than it did
                    done = trainer.epoch
                    asked = f"{done} of {cfg.train.epochs}" if done == cfg.train.epochs else f"{done}"
                    print(
                        f"the run in {out} is already complete ({asked} epochs); nothing was trained. To train "
                        f"longer: precise-rl train --resume {out} train.epochs={max(done, cfg.train.epochs) * 2}"
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
