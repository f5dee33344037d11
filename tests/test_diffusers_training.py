"""One GRPO epoch with LoRA on each tiny diffusers pipeline, then the saved adapter in ``precise-rl sample``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from precise_rl import sample_cli
from precise_rl.cli import main
from precise_rl.config import config_from_dict, load_config
from precise_rl.rl.trainer import GRPOTrainer

from . import tiny_pipelines as tp

diffusers_logging.disable_progress_bar()

KINDS = ["flux2_klein", "sd3", "flux1"]
FROZEN = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _state(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_grpo_step_trains_only_lora_and_the_adapter_reloads_into_sample(kind: str, tmp_path: Path) -> None:
    path = tp.save_pipeline(kind, tmp_path / "pipe")
    opts = tp.adapter_options(kind)
    cfg = config_from_dict(
        {
            "seed": int(torch.randint(0, 1000, ())),
            "model": {"name": kind, "path": str(path), "options": opts},
            "sampler": {"name": "precise", "num_steps": 3},
            "reward": {"weights": {"jpeg_incompressibility": 1.0}},
            "train": {
                "epochs": 1,
                "groups_per_epoch": 2,
                "group_size": 4,
                "batch_size": 4,
                "lr": 1e-2,
                "clip_range": 0.2,
                "lora": {"enabled": True, "rank": 2, "alpha": 2},
                "ema": {"enabled": False},
            },
            "eval": {"every": 0},
            "checkpoint": {"every": 1},
            "logging": {"tensorboard": False, "progress": False},
        }
    )
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    pipe = trainer.policy.pipe
    params_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    frozen_before = {name: _state(getattr(pipe, name, None)) for name in FROZEN}
    trainer.run()
    assert trainer.global_step >= 1
    params_after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    changed = [n for n in params_before if not torch.equal(params_before[n], params_after[n])]
    assert changed, "the update changed no parameter"
    assert all(".lora_A." in n or ".lora_B." in n for n in changed), [n for n in changed if "lora" not in n][:3]
    assert any(".lora_B." in n for n in changed)
    for name in FROZEN:
        after = _state(getattr(pipe, name, None))
        assert after.keys() == frozen_before[name].keys()
        assert all(torch.equal(after[k], frozen_before[name][k]) for k in after), name

    # The adapter saved with the checkpoint reloads into `precise-rl sample` (given the run directory).
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(path), "--lora", str(tmp_path / "run"), "--prompt", "a cat"]
    argv += ["--steps", "3", "--num-images", "2", "--seed", "5", "-o", str(out), "--device", "cpu"]
    argv += ["--height", str(opts["height"]), "--width", str(opts["width"])]
    argv += [f"--option=max_sequence_length={opts['max_sequence_length']}"]
    if kind == "flux2_klein":
        argv += ["--option=text_encoder_out_layers=[1, 2, 3]"]
    assert main(argv) == 0
    # ... with the trained weights: its images are those of the trained policy in memory.
    trainer.model.eval()
    expected = sample_cli.generate(trainer.policy, "a cat", "precise", trainer.policy.time_grid(3), None, [5, 6])
    for k, seed in enumerate((5, 6)):
        png = np.asarray(Image.open(out / "a_cat" / f"precise_seed{seed}.png")).astype(np.float32) / 255.0
        png = png[::4, ::4]  # small images are written enlarged 4 times
        ref = expected[k].permute(1, 2, 0).numpy()
        assert png.shape == ref.shape
        assert np.abs(png - ref).max() <= 1.0 / 255 + 1e-6


CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
RECIPES = [p for p in CONFIGS if p.name.startswith(("flux2_klein_", "sd35_"))]

#: section 7 of the math page, per model name: (steps, group size, lr, LoRA rank/alpha, clip, guard, KL, EMA, CFG)
SECTION_7 = {
    "flux2_klein": (20, 8, 8e-5, (16, 16.0), 4e-6, True, 0.0, (True, 0.9, 8), 1.0),
    "sd3": (10, 16, 3e-4, (32, 64.0), 1e-4, False, 0.04, (False, None, None), 4.5),
}


def test_every_model_and_jpeg_reward_has_a_recipe() -> None:
    pairs = {(load_config(p).model.name, tuple(load_config(p).reward.weights)) for p in RECIPES}
    for model in ("flux2_klein", "sd3"):
        for reward in ("jpeg_compressibility", "jpeg_incompressibility"):
            assert (model, (reward,)) in pairs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_config_has_section_7_defaults_and_runs_on_a_tiny_pipeline(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    kind = cfg.model.name
    steps, group, lr, (rank, alpha), clip, guard, kl, (ema_on, decay, every), cfg_scale = SECTION_7[kind]
    t = cfg.train
    assert (cfg.sampler.name, cfg.sampler.eta, cfg.sampler.num_steps, cfg.sampler.grid) == (
        "precise",
        1.5,
        steps,
        "model",
    )
    assert (t.group_size, t.lr, t.lora.enabled, t.lora.rank, t.lora.alpha, t.lora.init) == (
        group, lr, True, rank, alpha, "gaussian"
    )  # fmt: skip
    assert (t.clip_range, t.guard, t.kl_beta, t.timestep_fraction) == (clip, guard, kl, 0.99)
    assert t.ema.enabled == ema_on and (not ema_on or (t.ema.decay, t.ema.every) == (decay, every))
    assert cfg.model.options["guidance_scale"] == cfg_scale
    assert f"-m precise_rl.cli train configs/{path.name}" in path.read_text()  # the launch command

    pipe = tp.save_pipeline(kind, tmp_path / "pipe")
    small = tp.adapter_options(kind)
    overrides = [f"model.path={pipe}", "model.dtype=float32", "train.mixed_precision='no'", "train.epochs=1"]
    overrides += ["train.groups_per_epoch=2", "train.group_size=2", "sampler.num_steps=3", "eval.num_steps=2"]
    overrides += ["eval.max_prompts=1", "eval.samples_per_prompt=2", "logging.tensorboard=false"]
    overrides += ["logging.progress=false", "train.forward_batch=4"]
    overrides += [f"model.options.{k}={v}" for k, v in small.items()]
    summary = GRPOTrainer(load_config(path, overrides), tmp_path / "run").run()
    assert summary["epochs"] == 1
    assert np.isfinite(summary["reward_before"]) and np.isfinite(summary["reward_after"])
    assert (tmp_path / "run" / "checkpoints" / "epoch_000001" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_weights_with_checkpointing_and_kl_train(kind: str, tmp_path: Path) -> None:
    """bf16 weights under bf16 autocast, gradient checkpointing and a KL term (adapters off) run an epoch."""
    path = tp.save_pipeline(kind, tmp_path / "pipe")
    cfg = config_from_dict(
        {
            "model": {
                "name": kind,
                "path": str(path),
                "dtype": "bfloat16",
                "options": tp.adapter_options(kind, gradient_checkpointing=True),
            },
            "sampler": {"num_steps": 3},
            "reward": {"weights": {"jpeg_compressibility": 1.0}},
            "train": {
                "epochs": 1,
                "groups_per_epoch": 2,
                "group_size": 2,
                "mixed_precision": "bf16",
                "kl_beta": 0.01,
                "lora": {"enabled": True, "rank": 2, "alpha": 2},
            },
            "eval": {"every": 0},
            "logging": {"tensorboard": False, "progress": False},
        }
    )
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    assert trainer.policy.pipe.transformer.dtype == torch.bfloat16
    assert trainer.policy.transformer.is_gradient_checkpointing
    batch = trainer.collect(epoch=0)
    assert batch.latents.dtype == torch.float32 and batch.images.dtype == torch.float32
    assert torch.isfinite(batch.log_probs[:, :2]).all() and batch.images.min() >= 0 and batch.images.max() <= 1
    trainer.run()
    assert trainer.global_step == 1
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert np.isfinite(record["loss"]) and record["kl_ref"] >= 0 and record["ratio_max_dev"] < 1e-3
