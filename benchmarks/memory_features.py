"""Bytes each memory feature saves, measured on a reduced-width FLUX.2 Klein 4B (random weights).

Run with ``python benchmarks/memory_features.py`` (``--width-scale``, ``--resolution``, ``--steps``
to change the model and the work; ``--quick`` for a smoke run). The model is the bench's
(:func:`precise_rl.policies.random_pipeline.random_pipeline`): the real architecture with every width
divided by ``--width-scale``, in float32 on the CPU; one GRPO epoch of 2 prompts x 4 images.

- ``train.latents_dtype: bfloat16``: the bytes of the epoch's stored latents, float32 against bfloat16;
- ``train.latents_on_cpu``: the bytes of the stored trajectories (latents and means) the device holds
  between rollout and update; with the option they are in CPU memory (on the CPU run here the bytes
  are those that leave the device on a GPU);
- training at a lower resolution than evaluation (``eval.height``/``eval.width``): the stored
  trajectories and the training pass's peak (the profiler's record of tensor allocations,
  :func:`precise_rl.rl.memory.peak_bytes`) at ``--resolution`` against twice it;
- ``train.reference_on_cpu``: the parameter bytes of the KL term's frozen copy of a full fine-tune,
  which stay off the device but for its forwards.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from _results import write

from precise_rl.policies.random_pipeline import fill_prompt_cache, random_pipeline
from precise_rl.policies.registry import ADAPTERS
from precise_rl.rl.bench import BenchSettings, bench_config
from precise_rl.rl.dist import make_accelerator
from precise_rl.rl.memory import peak_bytes
from precise_rl.rl.trainer import Trainer
from precise_rl.tasks.registry import TaskSpec

MB = 1e6


def trainer(s: BenchSettings, training: str, out: Path, **train: Any) -> Trainer:
    pipe, adapter = random_pipeline("flux2_klein_4b", torch.float32, "cpu", s.width_scale, s.seed)
    opts = {"height": s.resolution, "width": s.resolution, "cache_prompts": True, "free_text_encoders": True}
    policy = ADAPTERS[adapter](pipe, max_sequence_length=s.max_sequence_length, **opts)
    prompts = [f"prompt {i}" for i in range(s.groups)]
    fill_prompt_cache(policy, adapter, prompts, s.seed)
    cfg = bench_config(s, adapter, training, "off", **train)
    task = TaskSpec(policy, prompts, prompts[:1], default_rewards={"jpeg_incompressibility": 1.0})
    return Trainer(cfg, out, task=task, accelerator=make_accelerator("no", cpu=True))


def stored_bytes(batch: Any) -> tuple[int, int]:
    """(latents bytes, latents + means bytes) of an epoch's stored trajectories."""
    lat = batch.latents.numel() * batch.latents.element_size()
    means = 0 if batch.means is None else batch.means.numel() * batch.means.element_size()
    return lat, lat + means


def train_peak(tr: Trainer) -> int:
    batch = tr.collect(0)
    _, targets, _ = tr.score(batch)
    return peak_bytes(lambda: tr.train_on(batch, targets, 0), torch.device("cpu"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width-scale", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a smoke run: 32x32, 2 steps; writes no table")
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.steps = 32, 2
    s = BenchSettings(
        device="cpu",
        dtype="float32",
        resolution=args.resolution,
        steps=args.steps,
        groups=2,
        group_size=4,
        forward_batch=4,
        max_sequence_length=16,
        width_scale=args.width_scale,
        kl_beta=0.1,
    )
    tmp = Path(tempfile.mkdtemp(prefix="memory_features_"))
    rows = []

    full = trainer(s, "lora", tmp / "f32").collect(0)
    half = trainer(s, "lora", tmp / "bf16", latents_dtype="bfloat16").collect(0)
    rows.append(("train.latents_dtype: bfloat16", "stored latents", stored_bytes(full)[0], stored_bytes(half)[0]))
    rows.append(("train.latents_on_cpu: true", "trajectories on the device", stored_bytes(full)[1], 0))

    high = BenchSettings(**{**s.__dict__, "resolution": 2 * s.resolution})
    big = trainer(high, "lora", tmp / "high")
    small = trainer(s, "lora", tmp / "low")
    rows.append(
        (
            f"train at {s.resolution}, evaluate at {high.resolution}",
            "stored trajectories",
            stored_bytes(big.collect(0))[1],
            stored_bytes(small.collect(0))[1],
        )
    )
    rows.append(
        (
            f"train at {s.resolution}, evaluate at {high.resolution}",
            "training pass peak",
            train_peak(big),
            train_peak(small),
        )
    )
    del big, small

    ref = trainer(s, "full", tmp / "ref").ref_module
    ref_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    rows.append(("train.reference_on_cpu: true", "KL reference copy on the device", ref_bytes, 0))

    print(
        f"FLUX.2 Klein 4B at width / {s.width_scale}, float32, {s.resolution}x{s.resolution}, {s.steps} steps, "
        f"{s.groups} prompts x {s.group_size} images"
    )
    table = ["| feature | what | without (MB) | with (MB) | saved |", "| --- | --- | --- | --- | --- |"]
    for feature, what, before, after in rows:
        name = f"`{feature}`" if feature.startswith("train.") else feature
        table.append(f"| {name} | {what} | {before / MB:.2f} | {after / MB:.2f} | {1 - after / before:.0%} |")
    print("\n".join(table))
    if not args.quick:
        write("memory_features", "\n".join(table))


if __name__ == "__main__":
    main()
