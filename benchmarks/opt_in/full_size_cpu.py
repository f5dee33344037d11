"""Full size on the CPU, once: FLUX.2 Klein 4B at its real size in bfloat16 with random weights, one GRPO step.

Run with ``python benchmarks/opt_in/full_size_cpu.py`` (opt-in: not in the test suite nor in
``./dev.sh bench``; it needs about 14 GB of free memory and some minutes). ``--threads`` sets torch's
CPU threads (default 2).

It builds the real transformer (3.9 B parameters) and VAE from the shipped config
``src/precise_rl/assets/model_configs/flux2_klein_4b.json`` with random weights (nothing is
downloaded), with the prompts cached as random conditioning of the text encoder's shape and the
text encoder never built (what ``cache_prompts`` + ``free_text_encoders`` leave on the device), and
runs, through the trainer's own stages (:func:`precise_rl.rl.bench.run_case`), one rollout of one
group of two 256x256 images (GRPO's smallest group) with the 2-step Precise sampler, their decode
and reward, and one LoRA (rank 32) training step on them (one trained step per image, one row per
forward). It prints the peak resident memory of each stage beside the bytes that
``precise-rl models --memory`` counts for the weights that stay (transformer and VAE), the time of
each stage, and writes ``full_size_cpu.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: where results are written
from _results import write  # noqa: E402

from precise_rl.cli.models import memory_rows
from precise_rl.rl.bench import BenchSettings, peak_rss_bytes, reset_peak_rss, run_case

GB = 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-sequence-length", type=int, default=512, help="text tokens (FLUX.2 Klein's default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="the memory option, off by default")
    p.add_argument("--out", default="full_size_cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reset_peak_rss()
    start_rss = peak_rss_bytes()
    settings = BenchSettings(
        models=("flux2_klein_4b",),
        device="cpu",
        dtype="bfloat16",
        resolution=args.resolution,
        sampler="precise",
        steps=args.steps,
        groups=1,
        group_size=2,
        forward_batch=1,
        lora_rank=32,
        max_sequence_length=args.max_sequence_length,
        trainings=("lora",),
        memories=("on" if args.gradient_checkpointing else "off",),
        warmup=0,
        repeats=1,
    )
    settings.check()
    row = run_case(settings, "flux2_klein_4b", "lora", settings.memories[0], log=lambda s: print(s, flush=True))
    if row.error:
        sys.exit(f"the full-size step failed: {row.error}")
    predicted = next(r for r in memory_rows() if r["checkpoint"] == "black-forest-labs/FLUX.2-klein-base-4B")
    weights = predicted["transformer_bytes"] + predicted["vae_bytes"]
    report = {
        "settings": asdict(settings),
        "threads": args.threads,
        "torch": torch.__version__,
        "rss_before_build_gb": start_rss / GB,
        "predicted_weights_gb": weights / GB,
        "predicted_text_encoder_gb_not_built": predicted["text_encoders_bytes"] / GB,
        "build_s": row.build_s,
        "rollout_s": row.rollout_s,
        "train_s": row.train_s,
        "build_peak_rss_gb": row.build_peak_bytes / GB,
        "rollout_peak_rss_gb": row.rollout_peak_bytes / GB,
        "train_peak_rss_gb": row.train_peak_bytes / GB,
        "trainable_parameters": row.trainable_parameters,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "full_size_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"FLUX.2 Klein 4B, bfloat16, CPU ({args.threads} threads), {args.resolution}x{args.resolution}, "
        f"{args.steps}-step precise, 2 images, LoRA rank 32 ({row.trainable_parameters / 1e6:.1f} M parameters)"
    )
    print(f"{'stage':<22} {'seconds':>8} {'peak RSS GB':>12}")
    print(f"{'(before the build)':<22} {'':>8} {start_rss / GB:12.2f}")
    print(f"{'build + trainer':<22} {row.build_s:8.1f} {row.build_peak_bytes / GB:12.2f}")
    print(f"{'rollout+decode+reward':<22} {row.rollout_s:8.1f} {row.rollout_peak_bytes / GB:12.2f}")
    print(f"{'LoRA training step':<22} {row.train_s:8.1f} {row.train_peak_bytes / GB:12.2f}")
    print(
        f"models --memory predicts {weights / GB:.2f} GB of bf16 weights that stay (transformer + VAE); "
        f"the text encoder's {predicted['text_encoders_bytes'] / GB:.2f} GB is never built"
    )
    table = [
        "| stage | seconds | peak resident memory (GB) |",
        "| --- | --- | --- |",
        f"| before the build | | {start_rss / GB:.2f} |",
        f"| build (transformer, VAE, trainer) | {row.build_s:.1f} | {row.build_peak_bytes / GB:.2f} |",
        f"| rollout + decode + reward (2 images) | {row.rollout_s:.1f} | {row.rollout_peak_bytes / GB:.2f} |",
        f"| LoRA training step | {row.train_s:.1f} | {row.train_peak_bytes / GB:.2f} |",
        "",
        f"`precise-rl models --memory` counts {weights / GB:.2f} GB of bf16 weights that stay (transformer "
        f"{predicted['transformer_bytes'] / GB:.2f} + VAE {predicted['vae_bytes'] / GB:.2f}); the text encoder's "
        f"{predicted['text_encoders_bytes'] / GB:.2f} GB is never built. LoRA trains "
        f"{row.trainable_parameters / 1e6:.1f}M parameters.",
    ]
    write("full_size_cpu", "\n".join(table))


if __name__ == "__main__":
    main()
