"""Training-pass memory: peak live memory and time of one PPO pass against ``train.forward_batch`` and
gradient checkpointing, beside the reference implementation's loop on the same work.

Run with ``python benchmarks/training_memory.py`` (``--quick`` for a smoke run; on a GPU where there is
one; ``--size 128`` for the image side, ``--heads 8`` for the transformer's width, ``--budget-gb`` for the
``auto`` line).

The model is the tiny FLUX.2 Klein of the tests (tests/tiny_pipelines.py) with a wider transformer (two
double and one single block of ``--heads`` heads of 16), so that activations, not weights, fill the
memory as on the real model. The work: one epoch's 16 samples (2 prompts x 8) of a 4-step Precise
rollout, trained with LoRA (rank 8) in one micro-batch of 16 samples, one optimizer step.

- ours: :func:`precise_rl.rl.update.train_on`, the trainer's pass, with ``forward_batch`` (sample, step)
  rows per transformer forward;
- reference: the loop of Tencent-Hunyuan/Precise ``precise_sde/train/rl_trainer.py``: micro-batches of
  2 images (its ``train.batch_size``), and for each trained step one forward of those 2 images at that
  step and a backward, one optimizer step at the end; written here over the same recomputation and
  clipped loss, so the two differ only in how the rows are grouped into forwards.

Peak live memory is what :func:`precise_rl.rl.memory.peak_bytes` reads (the CUDA allocator's peak,
or the profiler's record of CPU tensor allocations) plus the bytes live before the pass. Times are
medians of interleaved repeats after a warm-up, measured without the profiler. The last line is the
count ``forward_batch: auto`` chooses for ``--budget-gb`` (default: the reference's peak).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _results import write
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' tiny pipelines

from precise_rl.config import config_from_dict  # noqa: E402
from precise_rl.rl.memory import live_bytes, peak_bytes  # noqa: E402
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices  # noqa: E402
from tests import tiny_pipelines as tp  # noqa: E402

REFERENCE_IMAGES_PER_FORWARD = 2  # config/flux2_klein.py: train.batch_size


def save_bench_pipeline(directory: Path, heads: int) -> Path:
    """The tiny FLUX.2 Klein with a wider transformer of 2 double and 1 single block."""
    pipe = tp.flux2_klein_pipeline()
    pipe.transformer = tp.flux2_transformer(48, False, 0, num_layers=2, heads=heads)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def make_trainer(path: Path, out: Path, size: int, forward_batch: Any, checkpointing: bool, **train) -> GRPOTrainer:
    """The benchmark's run on the bench pipeline (on the GPU where there is one, as the trainer chooses)."""
    opts = tp.adapter_options("flux2_klein", height=size, width=size, gradient_checkpointing=checkpointing)
    cfg = {
        "seed": 0,
        "model": {"name": "flux2_klein", "path": str(path), "options": opts},
        "sampler": {"name": "precise", "num_steps": 4},
        "reward": {"weights": {"jpeg_incompressibility": 1.0}},
        "train": {
            "groups_per_epoch": 2,
            "group_size": 8,
            "batch_size": 16,
            "forward_batch": forward_batch,
            "clip_range": 0.2,
            "lora": {"enabled": True, "rank": 8, "alpha": 8},
            "ema": {"enabled": False},
            **train,
        },
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "progress": False},
    }
    return GRPOTrainer(config_from_dict(cfg), out)


def reference_pass(trainer: GRPOTrainer, batch, adv: torch.Tensor) -> None:
    """The reference's loop: per micro-batch of 2 images, one forward and backward per trained step."""
    cfg = trainer.cfg.train
    algo = trainer.cfg.algorithm  # GRPO's knobs (clip range, trained steps) live in the algorithm section
    steps = train_step_indices(batch.kernel, algo.timestep_fraction)
    device = trainer.accelerator.device
    adv = adv.to(device)
    n = len(batch.row_ids)
    scale = 1.0 / (n * len(steps))
    trainer.model.train()
    for lo in range(0, n, REFERENCE_IMAGES_PER_FORWARD):
        rows = torch.arange(lo, min(n, lo + REFERENCE_IMAGES_PER_FORWARD), device=device)
        for j in steps:
            out = trainer.recompute(batch, rows, torch.full_like(rows, j))
            ratio = torch.exp(out.log_prob - batch.log_probs[rows, j])
            a = adv[rows]
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - algo.clip_range, 1 + algo.clip_range)).sum() * scale
            trainer.accelerator.backward(loss)
    trainer.accelerator.clip_grad_norm_(trainer.params, cfg.grad_clip)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def measure(trainer: GRPOTrainer, run, repeats: int) -> tuple[float, float]:
    """(peak live MB, median seconds) of ``run(trainer, batch, adv)`` on the trainer's first rollouts."""
    device = trainer.accelerator.device
    batch = trainer.collect(epoch=0)
    adv = torch.linspace(-1.5, 1.5, len(batch.row_ids))
    run(trainer, batch, adv)  # warm-up (and ``auto``'s probe)
    live = live_bytes(device)
    peak = live + peak_bytes(lambda: run(trainer, batch, adv), device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run(trainer, batch, adv)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return peak / 1e6, statistics.median(times)


def ours(trainer: GRPOTrainer, batch, adv: torch.Tensor) -> None:
    trainer.train_on(batch, adv, 0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--heads", type=int, default=8, help="transformer heads of 16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-gb", type=float, default=None, help="budget of the auto line (default: the reference's)")
    p.add_argument("--quick", action="store_true", help="64x64 pixels, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeats = 64, 1
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="training_memory_"))
    path = save_bench_pipeline(tmp / "klein", args.heads)
    results: dict[tuple[str, bool], tuple[float, float]] = {}
    counts = [1, 2, 4, 8, 16, 32] if not args.quick else [2, 8, 32]
    cases = [(key, ckpt) for ckpt in (False, True) for key in ["reference", *map(str, counts)]]
    for key, ckpt in tqdm(cases, desc="training passes", unit="case"):
        forward_batch = 0 if key == "reference" else int(key)
        tr = make_trainer(path, tmp / f"{key}{ckpt}", args.size, forward_batch, ckpt)
        results[(key, ckpt)] = measure(tr, reference_pass if key == "reference" else ours, args.repeats)
        del tr
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"one training pass: 16 samples x 3 trained steps, FLUX.2 Klein (tiny, {args.heads} heads), "
        f"{args.size}x{args.size}, {device}"
    )
    print(f"{'rows per forward':>22} {'checkpointing':>13} {'peak MB':>9} {'x ref':>6} {'time s':>8} {'x ref':>6}")
    table = ["| rows per forward | checkpointing | peak MB | x reference | time s | x reference |"]
    table.append("| --- | --- | --- | --- | --- | --- |")
    for ckpt in (False, True):
        ref_mb, ref_s = results[("reference", ckpt)]
        for key in ["reference", *map(str, counts)]:
            mb, s = results[(key, ckpt)]
            label = f"reference ({REFERENCE_IMAGES_PER_FORWARD} images)" if key == "reference" else f"ours {key}"
            print(f"{label:>22} {'on' if ckpt else 'off':>13} {mb:9.1f} {mb / ref_mb:6.2f} {s:8.3f} {s / ref_s:6.2f}")
            on = "on" if ckpt else "off"
            table.append(f"| {label} | {on} | {mb:.1f} | {mb / ref_mb:.2f} | {s:.2f} | {s / ref_s:.2f} |")
    budget = args.budget_gb if args.budget_gb is not None else results[("reference", False)][0] / 1e3
    tr = make_trainer(path, tmp / "auto", args.size, "auto", False, memory_budget_gb=budget)
    mb, s = measure(tr, ours, args.repeats)
    rows = f"{tr.forward_batch} row" + ("s" if tr.forward_batch != 1 else "")
    auto = f"auto within {budget * 1e3:.1f} MB chooses {rows} per forward: peak {mb:.1f} MB, {s:.3f} s"
    print(f"forward_batch: {auto}")
    if not args.quick:
        write("training_memory", "\n".join([*table, "", f"`forward_batch`: {auto}."]), device)


if __name__ == "__main__":
    main()
