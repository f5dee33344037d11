"""Score a trained run on held-out prompts: ``precise-rl eval RUN_DIR [--samplers ode,precise] [--steps 10,20]``.

Loads the newest checkpoint (EMA weights) of RUN_DIR, or the one given with ``--checkpoint``,
and writes ``eval.json`` beside it with the reward of every (sampler, steps) pair.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from ..config import MAX_BATCH, MAX_PROMPTS, MAX_STEPS, check_at_most
from ..errors import UserError
from .paths import path_arg

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
    p.add_argument("run_dir", type=path_arg, help="a run directory written by precise-rl train")
    p.add_argument("--checkpoint", type=path_arg, default=None, help="a checkpoint directory (default: the newest)")
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
    p.add_argument("--output", type=path_arg, default=None, help="JSON file to write (default: RUN_DIR/eval.json)")


def check_output_file(out: Path, flag: str = "--output") -> None:
    """Fail before any work when ``out`` cannot be written as a file (the results would be lost after it)."""
    import os
    import tempfile

    if out.is_dir():
        raise UserError(f"{flag} {str(out)!r} is a directory; give a JSON file path such as {str(out / 'eval.json')!r}")
    parent = out.parent
    if not parent.exists():
        raise UserError(f"{flag} {str(out)!r}: the directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise UserError(f"{flag} {str(out)!r}: {str(parent)!r} is not a directory")
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"{flag} {str(out)!r} is not writable (permission denied)")
    try:  # a probe file in the same directory: permissions, a read-only mount, quotas
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag} {str(out)!r} cannot be written: {exc.strerror or exc}") from None


def write_json_atomically(out: Path, data: object) -> None:
    """Write ``out`` whole or not at all: an earlier file is replaced only by a complete new one."""
    import os

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    import contextlib

    from ..rl.rundir import command_line, is_main_launch_process, lock_run_dir

    if not args.samplers:
        raise UserError("--samplers names no sampler; give a comma-separated list such as ode,train")
    if args.steps is not None and not args.steps:
        raise UserError("--steps names no step count; give a comma-separated list such as 10,20")
    run_dir = Path(args.run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} is not a directory; give the --output of a train run")
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {str(args.checkpoint)!r} does not exist")
    out = args.output or (run_dir / "eval.json")
    # The lock keeps a training run (or another eval) from writing the directory meanwhile.
    main = is_main_launch_process()
    with lock_run_dir(run_dir, command_line(), if_writable=True) if main else contextlib.nullcontext():
        return _run_locked(args, out)


def check_own_checkpoint(run_dir: Path, ckpt: Path) -> None:
    """Refuse a ``--checkpoint`` of another run whose results would replace ``run_dir``'s ``eval.json``.

    A checkpoint under ``run_dir/checkpoints`` is the run's own; one elsewhere is taken as the run's
    when its recorded config is the run's ``config.yaml`` (a copy), the epoch count aside (a resume
    may extend it). Otherwise the sentence names the keys that differ.
    """
    from ..config import config_from_dict, config_to_dict, load_yaml

    try:
        if ckpt.resolve().parent == (run_dir / "checkpoints").resolve():
            return
        theirs = json.loads((ckpt / "state.json").read_text())["config"]
        ours = load_yaml((run_dir / "config.yaml").read_text())
        plain = [json.loads(json.dumps(config_to_dict(config_from_dict(c)))) for c in (theirs, ours)]
    except (OSError, ValueError, KeyError, TypeError, UserError):
        plain = None
    if plain is not None:
        theirs_flat, ours_flat = (_flat(c) for c in plain)
        keys = set(theirs_flat) | set(ours_flat)
        differ = sorted(k for k in keys if k != "train.epochs" and theirs_flat.get(k) != ours_flat.get(k))
        if not differ:
            return
        why = f"its config differs in {', '.join(differ[:5])}{' and more' if len(differ) > 5 else ''}"
    else:
        why = f"its config cannot be compared with {str(run_dir / 'config.yaml')!r}"
    raise UserError(
        f"--checkpoint {str(ckpt)!r} is not a checkpoint of run {str(run_dir)!r} ({why}); its results would "
        f"replace that run's eval.json: evaluate its own run directory, or give --output FILE"
    )


def _flat(data: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(data, dict) or not data:
        return {prefix[:-1]: data}
    out: dict[str, object] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _run_locked(args: argparse.Namespace, out: Path) -> int:
    from tqdm.auto import tqdm

    from ..rl import dist, setup, state
    from ..rl.checkpoint import latest_checkpoint
    from ..rl.evaluate import EvalInputs, evaluate
    from ..rl.run_config import resolve_config
    from ..rl.threads import resolve_threads, using_threads
    from ..sde import SAMPLERS, time_grid
    from ..tasks.registry import build_task

    args.samplers = ["own" if s == "train" else s for s in args.samplers]  # 'train': the former name of 'own'
    for s in args.samplers:
        if s != "own" and s not in SAMPLERS:
            raise UserError(f"--samplers has unknown sampler {s!r}; choose from own, {', '.join(SAMPLERS)}")
    if args.steps is not None and any(n < 1 for n in args.steps):
        raise UserError("--steps must be positive integers")
    for n in args.steps or []:
        check_at_most("--steps", n, MAX_STEPS, " steps")
    for flag, limit in (("samples_per_prompt", MAX_BATCH), ("max_prompts", MAX_PROMPTS)):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        if value is not None:
            check_at_most(f"--{flag.replace('_', '-')}", value, limit)
    ckpt = latest_checkpoint(args.checkpoint or args.run_dir)
    if args.checkpoint is not None and args.output is None:
        check_own_checkpoint(Path(args.run_dir), ckpt)
    check_output_file(out)
    cfg = resolve_config([], ckpt)
    # The run's model, rewards and held-out prompts, with the weights its evaluations used (EMA).
    acc = dist.make_accelerator(cfg.train.mixed_precision)
    task = build_task(cfg.model, acc.device)
    policy = task.policy
    prompts = setup.read_prompts(policy, cfg.prompts.eval, task.eval_prompts, "prompts.eval")
    rewards = setup.build_rewards(cfg, task, acc.device)
    trainable = setup.trainable_module(policy, cfg)
    saved = state.load_evaluated_weights(ckpt, trainable.names, trainable.params, cfg.train.ema.enabled)
    s = cfg.sampler
    inputs = EvalInputs(
        policy,
        trainable.module,
        rewards,
        prompts,
        task.metadata,
        acc,
        s,
        lambda n: time_grid(n, s.grid, shift=s.shift, model=policy.time_grid),
        cfg.seed,
        cfg.train.rollout_batch_size,
    )
    results = []
    step_counts = args.steps or [cfg.eval.num_steps]
    # the threads the run trained with (or what train.threads: auto picks for its model), as it evaluated
    threads = resolve_threads(cfg.train.threads, policy, acc.device)
    # on a terminal only (disable=None); each step count is one full evaluation
    for n in tqdm(step_counts, desc="evaluating", unit="step count", disable=None if acc.is_main_process else True):
        ecfg = copy.deepcopy(cfg.eval)
        ecfg.samplers = list(args.samplers)
        ecfg.num_steps = n
        if args.samples_per_prompt:
            ecfg.samples_per_prompt = args.samples_per_prompt
        if args.max_prompts:
            ecfg.max_prompts = args.max_prompts
        with using_threads(threads):
            result = evaluate(inputs, ecfg, with_grid=False)
        for key, r in result.protocols.items():
            row = {"sampler": r.sampler, "protocol": key, "steps": n, "reward": r.reward, **r.components}
            results.append(row)
            print(f"{row['sampler']:>14} {n:>5} steps  reward {row['reward']:.4f}")
    if acc.is_main_process:
        write_json_atomically(out, {"checkpoint": str(ckpt), "epoch": int(saved["epoch"]), "results": results})
        print(f"wrote {out}")
    return 0
