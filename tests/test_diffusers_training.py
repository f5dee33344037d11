"""One GRPO epoch with LoRA on each tiny diffusers pipeline, then the saved adapter in ``precise-rl sample``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.utils import logging as diffusers_logging

from precise_rl.cli import main
from precise_rl.config import load_config
from precise_rl.rl.trainer import GRPOTrainer

from . import diffusers_checks as dc
from . import tiny_pipelines as tp
from .judge_server import JudgeServer

diffusers_logging.disable_progress_bar()

KINDS = ["flux2_klein", "sd3", "flux1"]
FROZEN = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.mark.parametrize("kind", KINDS)
def test_grpo_step_trains_only_lora_and_the_adapter_reloads_into_sample(kind: str, tmp_path: Path) -> None:
    path = tp.save_pipeline(kind, tmp_path / "pipe")
    opts = tp.adapter_options(kind)
    trainer = dc.lora_trainer({"name": kind, "path": str(path), "options": opts}, tmp_path / "run", **dc.LORA_EPOCH)
    dc.run_and_check_only_lora_trains(trainer, FROZEN)
    assert trainer.global_step >= 1

    # The adapter saved with the checkpoint reloads into `precise-rl sample` (given the run directory).
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(path), "--lora", str(tmp_path / "run"), "--prompt", "a cat"]
    argv += ["--steps", "3", "--num-images", "2", "--seed", "5", "-o", str(out), "--device", "cpu"]
    assert main([*argv, *dc.option_flags(opts)]) == 0
    # ... with the trained weights: its images are those of the trained policy in memory.
    dc.check_samples_are_the_policys(trainer, "a cat", out / "a_cat")


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*.yaml"))
RECIPES = [p for p in CONFIGS if p.name.startswith(("flux2_klein_", "sd35_"))]
#: the reference's FLUX.2 Klein reward ``mix``: PickScore + CLIPScore + HPSv2.1, weight 1 each
MIX = {"pickscore": 1.0, "clipscore": 1.0, "hpsv2": 1.0}
#: reward sets a recipe's file name gives by one word: the mix, and UnifiedReward-2.0 (a judge) beside PickScore
NAMED_REWARDS = {"mix": MIX, "unifiedreward": {"vlm_judge": 1.0, "pickscore": 1.0}}
# The recipes' knobs are checked against docs/reproduction.md in test_recipes.py; here they run.


def _recipe(path: Path) -> tuple[str, str, str]:
    """(model, what trains: the sampler for GRPO, else the algorithm, reward) of a recipe."""
    cfg = load_config(path)
    weights = dict(cfg.reward.weights)
    named = [name for name, w in NAMED_REWARDS.items() if w == weights]
    reward = named[0] if named else "+".join(sorted(weights))
    method = cfg.sampler.name if cfg.algorithm.name == "grpo" else cfg.algorithm.name
    return cfg.model.name, method, reward


def test_every_documented_recipe_exists() -> None:
    """The paper's setups (the main table's mix reward on FLUX.2 Klein with each sampler, PickScore and HPSv2.1
    alone, PickScore on SD3.5 with Precise and with Flow-GRPO side by side) and the JPEG tasks, one file per
    (model, sampler, reward); a recipe of another algorithm than GRPO is named for its algorithm in place of
    the sampler (its rollouts' sampler is the reference's)."""
    found = [_recipe(p) for p in RECIPES]
    assert len(found) == len(set(found))
    required = {("flux2_klein", s, "mix") for s in ("precise", "flow_grpo", "dance_grpo", "cps")}
    required |= {("flux2_klein", "precise", r) for r in ("pickscore", "hpsv2")}
    required |= {("sd3", "precise", "pickscore"), ("sd3", "flow_grpo", "pickscore")}
    required |= {
        (m, "precise", r) for m in ("flux2_klein", "sd3") for r in ("jpeg_compressibility", "jpeg_incompressibility")
    }
    required |= {("sd3", "nft", "pickscore"), ("flux2_klein", "nft", "pickscore"), ("sd3", "awm", "pickscore")}
    required |= {("sd3", "precise", "ocr"), ("sd3", "flow_grpo", "ocr"), ("flux2_klein", "precise", "ocr")}
    assert required <= set(found)
    for path in RECIPES:  # the file name says what it runs
        model, sampler, reward = _recipe(path)
        assert path.stem == f"{'sd35' if model == 'sd3' else model}_{sampler}_{reward}"


def test_sd35_precise_and_flow_grpo_recipes_differ_only_in_the_sampler() -> None:
    precise = yaml.safe_load((ROOT / "configs" / "sd35_precise_pickscore.yaml").read_text())
    flow = yaml.safe_load((ROOT / "configs" / "sd35_flow_grpo_pickscore.yaml").read_text())
    assert precise.pop("sampler") != flow.pop("sampler")
    assert precise == flow


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_pipeline_with_its_own_rewards(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    kind = cfg.model.name
    text = path.read_text()  # the launch commands, on N GPUs through the DDP accelerate config, and on one
    assert "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes" in text
    assert (ROOT / "configs" / "accelerate" / "ddp.yaml").is_file()
    assert f"-m precise_rl.cli train configs/{path.name} --output runs/{path.stem}" in text
    assert f"precise-rl train configs/{path.name}" in text and f"--lora runs/{path.stem}" in text

    pipe = tp.save_pipeline(kind, tmp_path / "pipe")
    small = tp.adapter_options(kind)
    overrides = [f"model.path={pipe}", "model.dtype=float32", "train.mixed_precision='no'", "train.epochs=1"]
    overrides += ["train.groups_per_epoch=2", "train.group_size=2", "sampler.num_steps=3", "eval.num_steps=2"]
    overrides += ["eval.max_prompts=1", "eval.samples_per_prompt=2", "logging.tensorboard=false"]
    overrides += ["logging.progress=false", "train.memory_budget_gb=1", "prompts.train=builtin", "prompts.eval=builtin"]
    overrides += [f"model.options.{k}={v}" for k, v in small.items()]
    # the recipe's own trained rewards, on tiny models instead of the hub weights
    overrides += ["reward.options={}", "reward.eval_only=[]"]
    for reward in cfg.reward.weights:
        if reward in tp.TINY_REWARDS:
            tiny = tp.TINY_REWARDS[reward](tmp_path / reward)
            overrides += [f"reward.options.{reward}.{k}={v}" for k, v in tiny.items()]
    if "ocr" in cfg.reward.weights:  # the OCR reward reads the prompt's quoted text: prompts that have one
        words = tmp_path / "ocr_prompts.txt"
        words.write_text("".join(f'a sign that says "{w}"\n' for w in ("CAT", "OPEN", "RIVER")))
        overrides += [f"prompts.train={words}", f"prompts.eval={words}"]
    with contextlib.ExitStack() as stack:
        if "vlm_judge" in cfg.reward.weights:  # the recipe's own judge settings, against the loopback judge
            judge = stack.enter_context(JudgeServer(models=(cfg.reward.options["vlm_judge"]["model"],)))
            options = {**cfg.reward.options["vlm_judge"], "url": judge.url}
            overrides += [f"reward.options.vlm_judge.{k}={json.dumps(v)}" for k, v in options.items()]
        summary = GRPOTrainer(load_config(path, overrides), tmp_path / "run").run()
    assert summary["epochs"] == 1
    assert np.isfinite(summary["reward_before"]) and np.isfinite(summary["reward_after"])
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    for reward in cfg.reward.weights:  # trained on, and evaluated under both protocols
        assert np.isfinite(record[f"reward/{reward}"]) and np.isfinite(record[f"eval_ode/{reward}"])
        assert np.isfinite(record[f"eval_own/{reward}"])
    assert (tmp_path / "run" / "checkpoints" / "epoch_000001" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_weights_with_checkpointing_and_kl_train(kind: str, tmp_path: Path) -> None:
    """bf16 weights under bf16 autocast, gradient checkpointing and a KL term (adapters off) run an epoch."""
    path = tp.save_pipeline(kind, tmp_path / "pipe")
    model = {"name": kind, "path": str(path), "options": tp.adapter_options(kind, gradient_checkpointing=True)}
    trainer = dc.bf16_kl_trainer(model, tmp_path / "run")
    assert trainer.policy.pipe.transformer.dtype == torch.bfloat16
    assert trainer.policy.transformer.is_gradient_checkpointing
    batch = trainer.collect(epoch=0)
    assert batch.latents.dtype == torch.float32 and batch.images.dtype == torch.float32
    assert torch.isfinite(batch.log_probs[:, :2]).all() and batch.images.min() >= 0 and batch.images.max() <= 1
    trainer.run()
    assert trainer.global_step == 1
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert np.isfinite(record["loss"]) and record["kl_ref"] >= 0 and record["ratio_max_dev"] < 1e-3


def test_train_command_ends_bad_models_in_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through ``precise-rl train``: a missing model, an unsupported pipeline class and a resolution the
    model cannot take each exit with code 2 and one error line."""
    recipe = str(ROOT / "configs" / "sd35_precise_jpeg_compressibility.yaml")
    pipe = tp.save_pipeline("sd3", tmp_path / "pipe")
    small = [f"model.options.{k}={v}" for k, v in tp.adapter_options("sd3").items()]
    other = tp.save_pipeline("sd3", tmp_path / "other")
    tp.set_pipeline_class(other, "StableDiffusionXLPipeline")
    cases = [
        ([f"model.path={tmp_path / 'missing'}"], "does not exist"),
        ([f"model.path={other}"], "is a StableDiffusionXLPipeline but this adapter needs a StableDiffusion3Pipeline"),
        ([f"model.path={pipe}", *small, "model.options.height=30"], "SD3 cannot take a 30x16 image"),
        ([f"model.path={pipe}", *small, "model.options.width=128"], "at most 64 pixels per side"),
    ]
    for k, (overrides, message) in enumerate(cases):
        capsys.readouterr()
        assert main(["train", recipe, "--output", str(tmp_path / f"run{k}"), *overrides]) == 2
        line = dc.one_error_line(capsys, "train")
        assert message in line, line


@pytest.mark.slow
def test_recipe_on_two_processes_as_its_launch_command_says_matches_one_process(tmp_path: Path) -> None:
    """The FLUX.2 Klein PickScore recipe's own command (accelerate launch through configs/accelerate/ddp.yaml,
    ``-m precise_rl.cli train``) on two CPU processes, on a tiny pipeline with gradient checkpointing, LoRA
    and EMA as the recipe sets them, trains the LoRA weights a one-process run trains."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    name = "flux2_klein_precise_pickscore"
    recipe = ROOT / "configs" / f"{name}.yaml"
    text = recipe.read_text()
    assert "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 \\" in text
    assert f"#       -m precise_rl.cli train configs/{name}.yaml --output runs/{name}" in text
    pipe = tp.save_pipeline("flux2_klein", tmp_path / "pipe")
    overrides = [f"model.path={pipe}", "model.dtype=float32", "train.mixed_precision='no'", "train.epochs=2"]
    overrides += ["train.groups_per_epoch=2", "train.group_size=2", "train.batch_size=2", "train.grad_accum=2"]
    overrides += ["train.rollout_batch_size=1", "train.forward_batch=3", "train.lr=1e-2", "train.ema.every=1"]
    overrides += ["sampler.num_steps=3", "eval.every=0", "logging.tensorboard=false", "logging.progress=false"]
    overrides += ["prompts.train=builtin", "prompts.eval=builtin"]  # the PickScore prompt files are not shipped
    overrides += [f"model.options.{k}={v}" for k, v in tp.adapter_options("flux2_klein").items()]
    overrides += [f"reward.options.pickscore.{k}={v}" for k, v in tp.tiny_pickscore(tmp_path / "ps").items()]
    cfg = load_config(recipe, overrides)
    assert cfg.model.options["gradient_checkpointing"] and cfg.train.ema.enabled and cfg.train.lora.enabled

    one = GRPOTrainer(cfg, tmp_path / "one")
    initial = {n: t.clone() for n, t in one._trainable_state().items()}
    one.run()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml"]
    cmd += ["--num_processes", "2", "--main_process_port", port, "-m", "precise_rl.cli", "train", str(recipe)]
    cmd += ["--output", str(tmp_path / "two"), *overrides]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    def final(run: Path) -> dict[str, torch.Tensor]:
        return load_file(str(sorted((run / "checkpoints").glob("epoch_*"))[-1] / "trainable.safetensors"))

    want, got = final(tmp_path / "one"), final(tmp_path / "two")
    assert want.keys() == got.keys() == initial.keys() and all(".lora_" in n for n in want)
    moved = torch.cat([(want[n] - initial[n]).flatten() for n in want])
    diff = torch.cat([(got[n] - want[n]).flatten() for n in want])
    assert moved.norm() > 0
    assert diff.norm() <= 1e-3 * moved.norm(), (float(diff.norm()), float(moved.norm()))
    rewards = [
        [json.loads(x)["reward/pickscore"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (tmp_path / "one", tmp_path / "two")
    ]
    assert rewards[0] == pytest.approx(rewards[1], rel=1e-4, abs=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "epoch_000002" / "adapter" / "adapter_config.json").is_file()
