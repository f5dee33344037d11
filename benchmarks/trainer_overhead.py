"""Trainer overhead: one GRPO epoch's wall-clock against the bare model work it contains.

Run with ``python benchmarks/trainer_overhead.py`` (``--quick`` for a smoke run, ``--threads N``
for ``torch.set_num_threads``, ``--widths 128,1024`` for the velocity-network widths, ``--device
cuda`` on a GPU, ``--profile`` to print where an epoch's time goes).

The epoch is what :meth:`GRPOTrainer.run` times as ``train_elapsed_s``: ``collect`` (rollouts),
``score`` (rewards and advantages) and ``train_on`` (PPO updates), on the built-in ``digits``
task with the default recipe (``configs/digits_precise.yaml``; periodic evaluation, logging and
checkpoints are outside the epoch). The bare model work is timed alone with the same shapes, on a
copy of the trainer's module and a fresh AdamW of the same settings:

- rollout forwards: ``num_steps`` velocity calls of the policy over each rollout chunk
  (``train.rollout_batch_size`` rows; the whole epoch's batch by default), without autograd;
- training forwards and backwards: one forward of the policy and one backward per micro-batch
  (``train.batch_size`` samples times the trained steps, split by ``train.forward_batch``), as
  many micro-batches as the trainer runs, with the cheapest loss that reaches every output;
- optimizer steps: ``AdamW.step`` plus ``zero_grad`` on filled gradients, as many as the trainer takes.

Overhead = epoch / bare - 1, at the shipped width (128) and with a much wider velocity network
(``DigitsPolicy.from_config({"width": W})``, registered here as the benchmark-only model
``digits_width``), where model work dominates as it does on real models. Goal: <= 25% at the wide
size. Epochs and bare parts are timed interleaved after a warm-up; figures are medians.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _results import write

from precise_rl.config import ExperimentConfig, apply_overrides, config_from_dict
from precise_rl.policies import index_cond
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices
from precise_rl.tasks.registry import TaskSpec, digits_task, register_task

GOAL = 0.25
SHIPPED_WIDTH = 128
BENCH_MODEL = "digits_width"


def _digits_width(model_cfg: Any, device: torch.device) -> TaskSpec:
    """The digits task with a freshly initialised velocity network of ``model.options.width``."""
    from precise_rl.tasks import digits

    return digits_task(digits.DigitsPolicy.from_config(dict(model_cfg.options), device=device, seed=0))


register_task(BENCH_MODEL)(_digits_width)


def bench_config(width: int, overrides: list[str]) -> ExperimentConfig:
    """The default recipe on the shipped model (``width == 128``) or on a fresh one of ``width``."""
    model: dict[str, Any] = {"name": "digits"} if width == SHIPPED_WIDTH else {"name": BENCH_MODEL}
    if width != SHIPPED_WIDTH:
        model["options"] = {"width": width}
    data: dict[str, Any] = {
        "model": model,
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "progress": False},
    }
    return config_from_dict(apply_overrides(data, overrides))


class BareWork:
    """The model work of one epoch, with the trainer's shapes, on a copy of its module."""

    def __init__(self, trainer: GRPOTrainer) -> None:
        cfg = trainer.cfg.train
        self.trainer = trainer
        self.policy = trainer.policy
        self.module = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        device = trainer.accelerator.device
        n = cfg.groups_per_epoch // trainer.world * cfg.group_size
        prompts = [trainer.train_prompts[k % len(trainer.train_prompts)] for k in range(n)]
        self.cond = self.policy.encode_prompts(prompts)
        gen = torch.Generator(device=device).manual_seed(0)
        self.x = self.policy.sample_noise(n, generator=gen)
        self.sigmas = trainer.base_kernel.sigmas.to(device=device, dtype=torch.float32)
        self.num_steps = trainer.base_kernel.num_steps
        self.rollout_chunk = cfg.rollout_batch_size
        algo = trainer.cfg.algorithm  # GRPO's knobs (trained steps, KL) live in the algorithm section
        self.steps = train_step_indices(trainer.kernel_for_epoch(0), algo.timestep_fraction)
        self.batch_size = cfg.batch_size
        self.forward_batch = cfg.forward_batch
        self.kl = algo.kl_beta > 0
        self.n = n
        self.set_live_rows(n)

    def set_live_rows(self, rows: int) -> None:
        """Micro-batches and optimizer steps for ``rows`` trained samples (zero-advantage groups left out)."""
        cfg = self.trainer.cfg.train
        self.live_rows = rows
        n_micro = math.ceil(rows / self.batch_size)
        self.micro_sizes = [min(self.batch_size, rows - k * self.batch_size) for k in range(n_micro)]
        self.n_updates = math.ceil(n_micro / cfg.grad_accum) * cfg.inner_epochs
        self.n_micro_total = n_micro * cfg.inner_epochs

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        live = self.policy.transformer
        self.policy.transformer = self.module
        try:
            return self.policy.velocity(x, t, cond)
        finally:
            self.policy.transformer = live

    def rollout_forwards(self) -> None:
        self.module.eval()
        with torch.no_grad():
            for lo in range(0, self.n, self.rollout_chunk):
                sl = slice(lo, lo + self.rollout_chunk)
                x, cond = self.x[sl], index_cond(self.cond, sl)
                for i in range(self.num_steps):
                    self._velocity(x, self.sigmas[i].expand(x.shape[0]), cond)

    def train_forwards_backwards(self) -> None:
        self.module.train()
        device = self.x.device
        t_count = len(self.steps)
        steps_t = torch.tensor(self.steps, device=device)
        for k in range(self.n_micro_total):
            size = self.micro_sizes[k % len(self.micro_sizes)]
            rows = torch.arange(size, device=device) % self.n
            sample_all = rows.repeat_interleave(t_count)
            step_all = steps_t.repeat(size)
            chunk = self.forward_batch or len(sample_all)
            for lo in range(0, len(sample_all), chunk):
                s_idx, j_idx = sample_all[lo : lo + chunk], step_all[lo : lo + chunk]
                cond = index_cond(self.cond, s_idx)
                x, t = self.x[s_idx], self.sigmas[j_idx]
                v = self._velocity(x, t, cond)
                if self.kl:
                    with torch.no_grad():
                        self._velocity(x, t, cond)
                v.sum().backward()

    def optimizer_steps(self) -> None:
        for _ in range(self.n_updates):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run_epoch(trainer: GRPOTrainer, sync: Callable[[], None]) -> dict[str, float]:
    """One epoch exactly as :meth:`GRPOTrainer.run` runs it (without eval, logging and checkpoints)."""
    epoch = trainer.epoch
    sync()
    t0 = time.perf_counter()
    batch = trainer.collect(epoch)
    sync()
    t1 = time.perf_counter()
    comps, adv, raw = trainer.score(batch)
    sync()
    t2 = time.perf_counter()
    stats = trainer.train_on(batch, adv, epoch)
    sync()
    t3 = time.perf_counter()
    trainer.epoch += 1
    zero = stats.get("zero_adv_groups", 0.0)
    return {
        "epoch": t3 - t0,
        "collect": t1 - t0,
        "score": t2 - t1,
        "train_on": t3 - t2,
        "zero_adv_groups": zero,
        "reward": float(raw.mean()),
    }


def measure(width: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = bench_config(width, args.set)
    sync = _sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        from accelerate import Accelerator

        acc = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.train.mixed_precision)
        trainer = GRPOTrainer(cfg, Path(tmp) / "run", accelerator=acc)
        bare = BareWork(trainer)
        n_params = sum(p.numel() for p in bare.params)
        parts = {
            "rollout forwards": bare.rollout_forwards,
            "train fwd+bwd": bare.train_forwards_backwards,
            "optimizer steps": bare.optimizer_steps,
        }
        for _ in range(args.warmup):
            run_epoch(trainer, sync)
            for fn in parts.values():
                fn()
        samples: dict[str, list[float]] = {k: [] for k in ("epoch", "collect", "score", "train_on", *parts)}
        for _ in range(args.epochs):
            ep = run_epoch(trainer, sync)
            group_size = cfg.train.group_size
            groups = bare.n // group_size
            bare.set_live_rows(round(groups * (1.0 - ep["zero_adv_groups"])) * group_size)
            for k in ("epoch", "collect", "score", "train_on"):
                samples[k].append(ep[k])
            for name, fn in parts.items():  # in this order: the optimizer steps on the gradients just computed
                samples[name].append(_timed(fn, sync))
        if args.profile:
            profile_epoch(trainer, args.profile_rows)
    med = {k: statistics.median(v) for k, v in samples.items()}
    med["bare"] = med["rollout forwards"] + med["train fwd+bwd"] + med["optimizer steps"]
    med["overhead"] = med["epoch"] / med["bare"] - 1.0
    # The fastest of each, less sensitive to other work on a shared machine than the median.
    best = {k: min(v) for k, v in samples.items()}
    best["bare"] = best["rollout forwards"] + best["train fwd+bwd"] + best["optimizer steps"]
    best["overhead"] = best["epoch"] / best["bare"] - 1.0
    return {
        "width": width,
        "params": n_params,
        "rows": bare.n,
        "steps": bare.num_steps,
        "trained_steps": len(bare.steps),
        "micro": bare.n_micro_total,
        "updates": bare.n_updates,
        "median": med,
        "best": best,
    }


def profile_epoch(trainer: GRPOTrainer, rows: int) -> None:
    """cProfile of one epoch, sorted by own time, then by cumulative time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_epoch(trainer, lambda: None)
    prof.disable()
    stats = pstats.Stats(prof)
    print(f"\n--- cProfile of one epoch (model {trainer.cfg.model.name}), by own time")
    stats.sort_stats("tottime").print_stats(rows)
    print("--- by cumulative time")
    stats.sort_stats("cumulative").print_stats(rows)


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:10.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,1024", help="velocity-network widths, comma-separated (128 ships)")
    parser.add_argument("--epochs", type=int, default=None, help="timed epochs per width (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up epochs (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one more epoch per width")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()
    args.epochs = args.epochs or (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}; "
        f"{args.warmup} warm-up + {args.epochs} timed epochs per width; medians"
    )
    results = []
    for w in widths:
        r = measure(w, args, device)
        results.append(r)
        print(
            f"width {w}: {r['params'] / 1e6:.2f} M trainable parameters, {r['rows']} rollouts x {r['steps']} steps, "
            f"{r['trained_steps']} trained steps, {r['micro']} micro-batches, {r['updates']} optimizer steps",
            flush=True,
        )
    print()
    heads = [f"width {r['width']}" for r in results]
    print(f"{'':<34}" + "".join(f"{h:>16}" for h in heads))
    rows = [
        ("epoch (collect+score+train_on)", "epoch"),
        ("  collect (rollouts)", "collect"),
        ("  score (rewards, advantages)", "score"),
        ("  train_on (updates)", "train_on"),
        ("bare model work", "bare"),
        ("  rollout forwards", "rollout forwards"),
        ("  train forwards + backwards", "train fwd+bwd"),
        ("  optimizer steps", "optimizer steps"),
    ]
    for label, key in rows:
        print(f"{label:<34}" + "".join(f"{fmt(r['median'][key]):>16}" for r in results))
    print(f"{'epoch / bare':<34}" + "".join(f"{r['median']['epoch'] / r['median']['bare']:>15.3f}x" for r in results))
    print(
        f"{'collect / rollout forwards':<34}"
        + "".join(f"{r['median']['collect'] / r['median']['rollout forwards']:>15.3f}x" for r in results)
    )
    print(
        f"{'train_on / (fwd+bwd + optimizer)':<34}"
        + "".join(
            f"{r['median']['train_on'] / (r['median']['train fwd+bwd'] + r['median']['optimizer steps']):>15.3f}x"
            for r in results
        )
    )
    print()
    table = ["| | " + " | ".join(f"width {r['width']} ({r['params'] / 1e6:.2f}M params)" for r in results) + " |"]
    table.append("| --- " * (len(results) + 1) + "|")
    for label, key in rows:
        name = f"of which {label.strip()}" if label.startswith(" ") else label
        table.append(f"| {name} | " + " | ".join(f"{r['median'][key] * 1e3:.1f} ms" for r in results) + " |")
    verdicts = []
    for r in results:
        ov = r["median"]["overhead"]
        if r["width"] == SHIPPED_WIDTH:
            verdict = "reported"
        else:
            verdict = "met" if ov <= GOAL else "MISSED"
        print(
            f"width {r['width']:>5}: overhead {ov * 100:6.1f}% of medians, {r['best']['overhead'] * 100:6.1f}% of "
            f"fastest times (goal <= {GOAL * 100:.0f}% at the wide size, on medians: {verdict})"
        )
        verdicts.append(f"{ov:.1%} ({verdict}; {r['best']['overhead']:.1%} on the fastest epochs)")
    table.append(f"| overhead: epoch / bare - 1 (goal <= {GOAL:.0%} at the wide size) | " + " | ".join(verdicts) + " |")
    if not args.quick:
        write("trainer_overhead", "\n".join(table), device)


if __name__ == "__main__":
    main()
