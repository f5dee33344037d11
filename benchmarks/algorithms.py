"""Algorithms side by side: epoch time and peak training memory of each algorithm of the table against GRPO,
with the same number of samples, in one run.

Run with ``python benchmarks/algorithms.py`` (``--quick`` for a smoke run, ``--repeats N`` for the timed
epochs, ``--json PATH`` to write the numbers, ``--models digits,klein``, ``--samplers both|default|precise``,
``--size``/``--heads`` for the tiny FLUX.2 Klein, ``--threads N`` for ``torch.set_num_threads``; on a GPU
where there is one).

Two models, each with the same ``groups_per_epoch x group_size`` samples for every algorithm:

- ``digits``: the built-in default run (``load_config(None, ...)``: the digits task, 8 groups x 8
  samples, 10 steps, full fine-tune, EMA on);
- ``klein``: the tiny FLUX.2 Klein of the tests with the wider transformer of
  ``benchmarks/training_memory.py`` (two double and one single block of ``--heads`` heads of 16),
  ``--size`` pixels, LoRA rank 8, 2 groups x 8 samples, 4 steps, the JPEG-incompressibility reward.

Variants: every algorithm of the table (:data:`precise_rl.algorithm_table.ALGORITHM_TABLE`) at its
default knobs. GRPO rolls out with its reference sampler, ``precise``. An algorithm that trains on
final samples (NFT, AWM, DPO) runs with its own default sampler (``ode``) and, for a like-for-like
rollout, with ``precise`` too (``--samplers`` picks one of the two). Ratios are to GRPO.

Measured per variant, for one epoch:

- rollout s, train s, epoch s: :meth:`Trainer.collect`, :meth:`Trainer.train_on`, and collect +
  score + train_on (the epoch :meth:`Trainer.run` times, without evaluation, logging and
  checkpoints); medians of repeats interleaved over the variants after a warm-up epoch each;
- peak MB: the training pass's peak live memory, :func:`precise_rl.rl.memory.live_bytes` just
  before ``train_on`` (weights, gradients, AdamW moments, the epoch's rollout batch...) plus
  :func:`precise_rl.rl.memory.peak_bytes` of ``train_on`` (the CUDA allocator's peak, or the
  profiler's record of CPU allocations); measured with one trainer alive at a time, after a warm-up
  epoch, in an epoch of its own without the timer. Every run keeps ``train.forward_batch: 0`` (a
  micro-batch's rows in one forward), so the peak follows the forward rows of a micro-batch: samples
  x trained steps for GRPO, samples x noised times for NFT and AWM, pairs x times x 2 for DPO;
- store MB: what the :class:`RolloutBatch` holds for training, the ``nbytes`` of its latents, means
  and log-probs: GRPO keeps every step's latent and mean (``(B, N + 1, ...)`` and ``(B, N, ...)``),
  the algorithms on final samples the final latents alone (``(B, 1, ...)``);
- evals: model evaluations of the epoch, rollout rows x steps plus the ``model_evals_train`` that
  ``train_on`` reports (a forward with gradient and its backward count as two).

A variant that fails to build or run (an algorithm still being written, say) is left out with a note.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _results import write
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' tiny pipelines

from precise_rl.algorithm_table import ALGORITHM_TABLE  # noqa: E402
from precise_rl.config import config_from_dict, load_config  # noqa: E402
from precise_rl.rl import seeds  # noqa: E402
from precise_rl.rl.memory import live_bytes, peak_bytes  # noqa: E402
from precise_rl.rl.rollouts import RolloutBatch  # noqa: E402
from precise_rl.rl.trainer import Trainer  # noqa: E402

BASELINE = ("grpo", "precise")
#: what every run leaves out: it measures epochs, not evaluation, logs or checkpoints
QUIET = {"eval": {"every": 0}, "checkpoint": {"every": 0}, "logging": {"tensorboard": False, "progress": False}}
#: (key, label, unit format) of the table's columns, each followed by its ratio to GRPO
COLUMNS = [
    ("rollout_s", "rollout s", "{:9.3f}"),
    ("train_s", "train s", "{:9.3f}"),
    ("epoch_s", "epoch s", "{:9.3f}"),
    ("peak_mb", "peak MB", "{:9.2f}"),
    ("store_mb", "store MB", "{:9.3f}"),
    ("evals", "evals", "{:9.0f}"),
]

Variant = tuple[str, str]  # (algorithm, sampler)


@dataclass
class Bench:
    """One model's runs: how to build a trainer of a variant, and what the table's title says of it."""

    name: str
    title: str
    build: Callable[[Variant, Path], Trainer]
    results: dict[Variant, dict[str, float]] = field(default_factory=dict)
    skipped: dict[Variant, str] = field(default_factory=dict)
    #: every timed epoch's figures, for the JSON file
    samples: dict[Variant, list[dict[str, float]]] = field(default_factory=dict)


# --------------------------------------------------------------------------- the models


def digits_bench(quick: bool) -> Bench:
    """The built-in default run (``precise-rl train`` with no config), one algorithm and sampler at a time."""
    # --quick: 2 groups of 4, 3 steps, so a whole sweep takes seconds
    small = ["train.groups_per_epoch=2", "train.group_size=4", "train.batch_size=8", "sampler.num_steps=3"]
    extra = small if quick else []

    def build(variant: Variant, out: Path) -> Trainer:
        algo, sampler = variant
        quiet = ["eval.every=0", "checkpoint.every=0", "logging.tensorboard=false", "logging.progress=false"]
        overrides = [f"algorithm.name={algo}", f"sampler.name={sampler}", *quiet, *extra]
        return Trainer(load_config(None, overrides), out)

    cfg = load_config(None, extra)
    t = cfg.train
    title = (
        f"digits (built-in default run): {t.groups_per_epoch} groups x {t.group_size} samples, "
        f"{cfg.sampler.num_steps} steps, full fine-tune"
    )
    return Bench("digits", title, build)


def save_klein(directory: Path, heads: int) -> Path:
    """The tiny FLUX.2 Klein with the wider transformer of ``training_memory.py`` (2 double, 1 single block)."""
    from tests import tiny_pipelines as tp

    pipe = tp.flux2_klein_pipeline()
    pipe.transformer = tp.flux2_transformer(48, False, 0, num_layers=2, heads=heads)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def klein_bench(tmp: Path, size: int, heads: int, quick: bool) -> Bench:
    """The tiny FLUX.2 Klein trained with LoRA, as ``benchmarks/training_memory.py`` sets it up."""
    import diffusers
    import transformers

    from tests import tiny_pipelines as tp

    # the loaders' bars, once per trainer built, would drown the benchmark's own
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    path = save_klein(tmp / "klein", heads)
    groups, group_size, steps = (2, 4, 2) if quick else (2, 8, 4)

    def build(variant: Variant, out: Path) -> Trainer:
        algo, sampler = variant
        cfg = {
            "seed": 0,
            "model": {
                "name": "flux2_klein",
                "path": str(path),
                "options": tp.adapter_options("flux2_klein", height=size, width=size),
            },
            "algorithm": {"name": algo},
            "sampler": {"name": sampler, "num_steps": steps},
            "reward": {"weights": {"jpeg_incompressibility": 1.0}},
            "train": {
                "groups_per_epoch": groups,
                "group_size": group_size,
                "batch_size": groups * group_size,
                "lora": {"enabled": True, "rank": 8, "alpha": 8},
                "ema": {"enabled": False},
            },
            **QUIET,
        }
        return Trainer(config_from_dict(cfg), out)

    title = (
        f"FLUX.2 Klein (tiny, {heads} heads), {size}x{size}: {groups} groups x {group_size} samples, "
        f"{steps} steps, LoRA rank 8"
    )
    return Bench("klein", title, build)


# --------------------------------------------------------------------------- one epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def store_bytes(batch: RolloutBatch) -> int:
    """Bytes of what a rollout keeps for training: latents, means (GRPO only) and log-probs."""
    tensors = [batch.latents, batch.means, batch.log_probs]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def epoch(trainer: Trainer, e: int, memory: bool = False) -> dict[str, float]:
    """Epoch ``e`` as :meth:`Trainer.run` runs it (no eval, logs or checkpoints): its times, store and evaluations.

    ``memory``: the training pass runs under :func:`peak_bytes` instead (its time is then not meaningful).
    """
    device = trainer.accelerator.device
    trainer.epoch = e  # the algorithms' targets and schedules read the trainer's epoch
    torch.manual_seed(seeds.epoch_torch_seed(trainer.cfg.seed, e, trainer.rank))  # as run() does
    _sync(device)
    t0 = time.perf_counter()
    batch = trainer.collect(e)
    _sync(device)
    t1 = time.perf_counter()
    _, targets, raw = trainer.score(batch)
    _sync(device)
    t2 = time.perf_counter()
    out: dict[str, float] = {}
    if memory:
        gc.collect()  # the CPU count walks the garbage collector's objects: drop the dead ones first
        live = live_bytes(device)
        stats: dict[str, float] = {}
        peak = peak_bytes(lambda: stats.update(trainer.train_on(batch, targets, e)), device)
        out["peak_mb"] = (live + peak) / 1e6
    else:
        stats = trainer.train_on(batch, targets, e)
    _sync(device)
    t3 = time.perf_counter()
    out.update(
        rollout_s=t1 - t0,
        train_s=t3 - t2,
        epoch_s=t3 - t0,
        store_mb=store_bytes(batch) / 1e6,
        # one velocity evaluation per sample and step of the rollouts, as run() counts them
        evals=len(raw) * batch.kernel.num_steps + stats["model_evals_train"],
    )
    return out


def _skip(bench: Bench, variant: Variant, exc: BaseException) -> None:
    """Leave ``variant`` out of ``bench`` with a note (the last frame says where it failed)."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    bench.skipped[variant] = f"{type(exc).__name__}: {exc}{at}"
    tqdm.write(f"note: {bench.name}: skipping {' '.join(variant)}: {bench.skipped[variant]}")


def measure(bench: Bench, variants: list[Variant], tmp: Path, repeats: int) -> None:
    """Memory (one trainer alive at a time), then times (all alive, repeats interleaved) of every variant."""
    # Memory first, each trainer alone: on the CPU live_bytes counts every tensor of the process, so
    # another variant's trainer alive beside it would count too.
    for v in tqdm(variants, desc=f"{bench.name}: memory", unit="variant"):
        trainer: Trainer | None = None
        try:
            trainer = bench.build(v, tmp / f"{bench.name}-mem-{'-'.join(v)}")
            epoch(trainer, 0)  # warm-up: AdamW's moments exist from the first step on, as in a run
            bench.results[v] = epoch(trainer, 1, memory=True)
        except Exception as exc:  # an algorithm still being written: leave it out, say so
            _skip(bench, v, exc)
        trainer = None  # freed before the next one is measured
        gc.collect()
    alive = [v for v in variants if v not in bench.skipped]
    trainers: dict[Variant, Trainer] = {}
    samples: dict[Variant, list[dict[str, float]]] = {v: [] for v in alive}
    for v in tqdm(alive, desc=f"{bench.name}: warm-up", unit="variant"):
        try:
            trainers[v] = bench.build(v, tmp / f"{bench.name}-time-{'-'.join(v)}")
            epoch(trainers[v], 0)
        except Exception as exc:
            _skip(bench, v, exc)
            trainers.pop(v, None)
    # Interleaved: each repeat runs one epoch of every variant, so a slow spell of a shared machine
    # falls on all of them rather than on one.
    with tqdm(total=repeats * len(trainers), desc=f"{bench.name}: timed epochs", unit="epoch") as bar:
        for r in range(repeats):
            for v in list(trainers):
                try:
                    samples[v].append(epoch(trainers[v], 1 + r))
                except Exception as exc:
                    _skip(bench, v, exc)
                    del trainers[v]
                bar.update()
    for v in variants:
        if v in bench.skipped:
            bench.results.pop(v, None)
            continue
        for key in ("rollout_s", "train_s", "epoch_s"):
            bench.results[v][key] = statistics.median(s[key] for s in samples[v])
        bench.samples[v] = samples[v]
    trainers.clear()
    gc.collect()


# --------------------------------------------------------------------------- the table


def markdown(bench: Bench, repeats: int) -> str:
    """The same numbers as :func:`table`, as the Markdown table the documentation includes."""
    base = bench.results.get(BASELINE)
    head = ["algorithm (sampler)"] + [f"{label} | x GRPO" for _, label, _ in COLUMNS]
    lines = [f"{bench.title}, medians of {repeats} epochs:", "", "| " + " | ".join(head) + " |"]
    lines.append("| --- " * (1 + 2 * len(COLUMNS)) + "|")
    for (algorithm, sampler), res in bench.results.items():
        cells = [f"`{algorithm}` ({sampler})"]
        for key, _, form in COLUMNS:
            ratio = f"{res[key] / base[key]:.2f}" if base and base[key] else "-"
            cells += [form.format(res[key]).strip(), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(bench: Bench, device: str, repeats: int) -> str:
    """One line per variant: each measure and its ratio to GRPO's."""
    base = bench.results.get(BASELINE)
    lines = [f"{bench.title}, {device}, medians of {repeats} epochs"]
    head = f"{'algorithm sampler':<18}" + "".join(f"{label:>9} {'x grpo':>6}" for _, label, _ in COLUMNS)
    lines += [head, "-" * len(head)]
    for v, res in bench.results.items():
        cells = []
        for key, _, form in COLUMNS:
            ratio = f"{res[key] / base[key]:6.2f}" if base and base[key] else f"{'-':>6}"
            cells.append(f"{form.format(res[key])} {ratio}")
        lines.append(f"{' '.join(v):<18}" + "".join(cells))
    if base is None:
        lines.append("(no GRPO baseline: ratios left out)")
    for v, why in bench.skipped.items():
        lines.append(f"skipped {' '.join(v)}: {why}")
    return "\n".join(lines)


def variants_for(samplers: str) -> list[Variant]:
    """GRPO on precise first (the baseline), then every other algorithm on its default sampler and/or precise."""
    out: list[Variant] = [BASELINE]
    for name, entry in ALGORITHM_TABLE.items():
        wanted = {"default": [entry.default_sampler], "precise": ["precise"]}.get(
            samplers, [entry.default_sampler, "precise"]
        )
        out += [(name, s) for s in dict.fromkeys(wanted) if (name, s) not in out]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per variant (after a warm-up)")
    p.add_argument("--models", default="digits,klein", help="comma-separated: digits, klein")
    p.add_argument(
        "--samplers",
        choices=["both", "default", "precise"],
        default="both",
        help="the final-sample algorithms' rollouts: their default sampler (ode), precise (GRPO's), or both",
    )
    p.add_argument("--size", type=int, default=32, help="Klein image side in pixels")
    p.add_argument("--heads", type=int, default=8, help="Klein transformer heads of 16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers to this file")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny epochs, one repeat, 16x16 Klein of 2 heads")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.size, args.heads = 1, 16, 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - {"digits", "klein"}:
        p.error(f"unknown models {sorted(unknown)}; known: digits, klein")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = variants_for(args.samplers)
    tmp = Path(tempfile.mkdtemp(prefix="bench_algorithms_"))
    benches: list[Bench] = []
    try:
        for name in models:
            bench = (
                digits_bench(args.quick) if name == "digits" else klein_bench(tmp, args.size, args.heads, args.quick)
            )
            measure(bench, variants, tmp, args.repeats)
            benches.append(bench)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print()
    print("\n\n".join(table(b, device, args.repeats) for b in benches))
    if not args.quick:
        write("algorithms", "\n\n".join(markdown(b, args.repeats) for b in benches), device)
    if args.json is not None:
        data: dict[str, Any] = {
            "device": device,
            "repeats": args.repeats,
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "baseline": " ".join(BASELINE),
            "models": {
                b.name: {
                    "title": b.title,
                    "variants": {" ".join(v): res for v, res in b.results.items()},
                    "timed_epochs": {" ".join(v): s for v, s in b.samples.items()},
                    "skipped": {" ".join(v): why for v, why in b.skipped.items()},
                }
                for b in benches
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
