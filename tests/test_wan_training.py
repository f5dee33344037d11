"""Training the Wan adapter on tiny pipelines: the trainer's recomputed log-probs equal the rollout's for every
stochastic sampler; one GRPO epoch with LoRA changes only the LoRA weights (A14B: only the chosen experts'),
and the saved adapter reproduces the trained videos' frames in ``precise-rl sample``; a full fine-tune of
one A14B expert trains that expert alone.

The reward is a function of the decoded videos ``(B, F, C, H, W)`` registered here (their mean brightness).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from precise_rl.cli import main
from precise_rl.config import config_from_dict
from precise_rl.rewards.base import RewardSet, register_reward
from precise_rl.rl import setup
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices
from precise_rl.sde import SAMPLERS, kernel

from . import diffusers_checks as dc
from . import tiny_video_pipelines as tv

diffusers_logging.disable_progress_bar()

STOCHASTIC = [s for s in SAMPLERS if s != "ode"]
FROZEN = ("vae", "text_encoder")


@register_reward("test_video_brightness")
def _video_brightness(images, prompts, metadata):
    """Each video's mean pixel value; only a 5-D batch of videos is accepted."""
    assert images.ndim == 5 and images.shape[1] == tv.FRAMES, images.shape
    return images.float().mean(dim=(1, 2, 3, 4))


@pytest.fixture(autouse=True)
def _reward_sets_take_videos(monkeypatch: pytest.MonkeyPatch) -> None:
    """RewardSet checks batches as images ``(B, C, H, W)``; here it checks a video batch by its first frames and
    hands the rewards the videos themselves (no-op where RewardSet takes videos)."""
    original = getattr(RewardSet, "_check_batch", None)
    if original is None:
        return

    def check(self, images, prompts, metadata):
        return original(self, images[:, 0] if images.ndim == 5 else images, prompts, metadata)

    monkeypatch.setattr(RewardSet, "_check_batch", check)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan_training")
    return {kind: tv.save_pipeline(kind, root / kind) for kind in ("wan21", "wan22_5b", "wan22_a14b")}


def _trainer(path: Path, out: Path, sampler: str = "precise", options: dict | None = None, **train) -> GRPOTrainer:
    """GRPO with LoRA of rank 2 on ``sampler`` (3 steps), the brightness of the videos as the reward."""
    cfg: dict = {
        "seed": int(torch.randint(0, 1000, ())),
        "model": {"name": "wan", "path": str(path), "options": options or tv.adapter_options("wan21")},
        "sampler": {"name": sampler, "num_steps": 3},
        "reward": {"weights": {"test_video_brightness": 1.0}},
        "train": {
            "groups_per_epoch": 2,
            "group_size": 2,
            "lora": {"enabled": True, "rank": 2, "alpha": 2},
            "ema": {"enabled": False},
            **train,
        },
        "eval": {"every": 0},
        "checkpoint": {"every": 1},
        "logging": {"tensorboard": False, "progress": False},
    }
    return GRPOTrainer(config_from_dict(cfg), out)


@pytest.mark.parametrize("kind", ["wan21", "wan22_5b", "wan22_a14b"])
def test_importance_ratio_is_one_for_every_sampler(kind: str, pipeline_dirs, tmp_path: Path) -> None:
    """The trainer's recompute (all (sample, step) pairs in one batch, A14B's rows on both experts) reproduces
    the rollout's log-probs for every stochastic sampler on the model's own grid."""
    opts = tv.adapter_options(kind)
    trainer = _trainer(pipeline_dirs[kind], tmp_path / "run", STOCHASTIC[0], opts)
    dc.perturb_lora_b(trainer)
    if kind == "wan22_a14b":
        assert set(trainer.policy.experts_for(trainer.sigmas[:-1])) == {"high", "low"}
    for sampler in STOCHASTIC:
        trainer.base_kernel = kernel(sampler, trainer.sigmas)
        batch = trainer.collect(epoch=0)
        steps = train_step_indices(batch.kernel, 0.99)
        assert steps and batch.kernel.name == sampler
        assert batch.images.shape == (4, tv.FRAMES, 3, opts["height"], opts["width"])
        out, ratio, rows, idx = dc.recompute_ratio(trainer, batch, steps)
        assert torch.isfinite(ratio).all(), sampler
        # a video's log-prob sums 4 x 3 x 8 x 16 float32 terms (a tiny image's 4 x 8 x 8): batches of other
        # shapes round it apart by a few 1e-5
        assert (ratio - 1).abs().max().item() < 1e-4, (sampler, (ratio - 1).abs().max().item())
        torch.testing.assert_close(out.mean, batch.means[rows, idx], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("kind", "experts"), [("wan21", None), ("wan22_a14b", ["low"]), ("wan22_a14b", None)])
def test_grpo_epoch_trains_only_lora_and_the_adapter_reloads_into_sample(
    kind: str, experts: list[str] | None, pipeline_dirs, tmp_path: Path
) -> None:
    path = pipeline_dirs[kind]
    opts = tv.adapter_options(kind, **({} if experts is None else {"train_experts": experts}))
    trainer = _trainer(path, tmp_path / "run", "precise", opts, epochs=1, batch_size=4, lr=1e-2, clip_range=0.2)
    names = [n for n, _ in trainer.model.named_parameters() if "lora_" in n]
    if kind == "wan22_a14b":  # LoRA on the chosen experts only
        chosen = tuple(f"{e}." for e in (experts or ["high", "low"]))
        assert names and all(n.startswith(chosen) for n in names)
        assert {n.split(".")[0] for n in names} == {c[:-1] for c in chosen}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    dc.run_and_check_only_lora_trains(trainer, FROZEN)
    assert trainer.global_step == 1
    if kind == "wan22_a14b" and experts is None:  # both experts' LoRA learnt (the grid crosses the boundary)
        moved = {
            n.split(".")[0]
            for n, p in trainer.model.named_parameters()
            if n in before and not torch.equal(p, before[n])
        }
        assert moved == {"high", "low"}

    out = tmp_path / "samples"
    argv = ["sample", "--model", str(path), "--lora", str(tmp_path / "run"), "--prompt", "a cat"]
    argv += ["--steps", "3", "--num-images", "2", "--seed", "5", "-o", str(out), "--device", "cpu"]
    assert main([*argv, *dc.option_flags(opts)]) == 0
    dc.check_samples_are_the_policys(trainer, "a cat", out / "a_cat")


def test_full_fine_tune_of_one_a14b_expert_trains_that_expert_alone(pipeline_dirs, tmp_path: Path) -> None:
    opts = tv.adapter_options("wan22_a14b", train_experts=["high"])
    cfg = config_from_dict(
        {
            "model": {"name": "wan", "path": str(pipeline_dirs["wan22_a14b"]), "options": opts},
            "train": {"lora": {"enabled": False}, "full_finetune": True},
        }
    )
    from precise_rl.tasks.registry import build_task

    policy = build_task(cfg.model, torch.device("cpu")).policy
    trainable = setup.trainable_module(policy, cfg)
    total = sum(1 for _ in policy.transformer.high.parameters())
    assert len(trainable.names) == total and all(n.startswith("high.") for n in trainable.names)
    assert not any(p.requires_grad for p in policy.transformer.low.parameters())


def _lora_policy(pipeline_dirs, experts: list[str]):
    opts = tv.adapter_options("wan22_a14b", guidance_scale=1.0, train_experts=experts)
    cfg = config_from_dict(
        {
            "model": {"name": "wan", "path": str(pipeline_dirs["wan22_a14b"]), "options": opts},
            "train": {"lora": {"enabled": True, "rank": 2, "alpha": 2}},
        }
    )
    from precise_rl.tasks.registry import build_task

    policy = build_task(cfg.model, torch.device("cpu")).policy
    return policy, setup.trainable_module(policy, cfg)


@pytest.mark.parametrize("experts", [["low"], ["high", "low"]])
def test_a_backward_through_one_expert_reaches_every_trained_weight(experts, pipeline_dirs) -> None:
    """Rows at high-noise steps only: the loss still has a graph to the low expert's LoRA (zero gradients there),
    so that training one expert, or DDP over two, never meets a step without some trained weight's gradient."""
    policy, trainable = _lora_policy(pipeline_dirs, experts)
    lora_b = {n: p for n, p in zip(trainable.names, trainable.params, strict=True) if "lora_B" in n}
    with torch.no_grad():
        for p in lora_b.values():
            p.normal_(0, 0.05)
    x = torch.randn(2, *policy.latent_shape)
    t = torch.tensor([0.95, 0.9])
    assert policy.experts_for(t) == ["high", "high"]
    v = policy.velocity(x, t, policy.encode_prompts(["a", "b"]))
    v.square().mean().backward()
    for n, p in zip(trainable.names, trainable.params, strict=True):
        assert p.grad is not None, n
        if n.startswith("low."):
            assert torch.equal(p.grad, torch.zeros_like(p.grad)), n
    if "high" in experts:
        assert any(
            p.grad.abs().max() > 0
            for n, p in zip(trainable.names, trainable.params, strict=True)
            if n.startswith("high.") and "lora_A" in n
        )
    with torch.no_grad():  # a rollout's forward adds nothing
        torch.testing.assert_close(policy.velocity(x, t, policy.encode_prompts(["a", "b"])), v.detach(), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "experts"), [("ddp", None), ("fsdp", None), ("fsdp", ["low"])])
def test_a14b_on_two_processes_trains_with_one_expert_idle(
    launcher: str, experts: list[str] | None, pipeline_dirs, tmp_path: Path
) -> None:
    """Two CPU processes through ``configs/accelerate/{ddp,fsdp}.yaml`` (FSDP2: each expert's blocks sharded),
    training the first step only (the high-noise expert's), with LoRA on both experts or on the low one alone:
    every backward reaches the idle expert's LoRA (zero gradients; with the low expert alone trained, the
    only graph there is), both processes end with the same weights, the high expert's LoRA learnt and the
    low one's did not move."""
    import json
    import socket
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    cfg = {
        "seed": 3,
        "model": {"name": "wan", "path": str(pipeline_dirs["wan22_a14b"]),
                  "options": tv.adapter_options("wan22_a14b", **({"train_experts": experts} if experts else {}))},
        "sampler": {"name": "flow_grpo", "num_steps": 3, "window": {"size": 1, "start": 0}},
        "reward": {"weights": {"test_video_brightness": 1.0}},
        "train": {"epochs": 1, "groups_per_epoch": 2, "group_size": 2, "batch_size": 4, "lr": 1e-2,
                  "clip_range": 0.2, "lora": {"enabled": True, "rank": 2, "alpha": 2}, "ema": {"enabled": False},
                  "fsdp": launcher == "fsdp"},
        "eval": {"every": 0},
        "checkpoint": {"every": 1},
        "logging": {"tensorboard": False, "progress": False},
    }  # fmt: skip
    config = tmp_path / "wan.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{launcher}.yaml"]
    cmd += ["--num_processes", "2", "--main_process_port", str(port), "-m", "tests.wan_dist_entry", "train"]
    cmd += [str(config), "--output", str(tmp_path / "run")]
    env = {**__import__("os").environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / "run" / f"rank{k}.safetensors")) for k in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    names = [n for n in rank0 if ".lora_B." in n]
    assert {n.split("/")[1].split(".")[0] for n in names} == set(experts or ["high", "low"])
    if experts is None:
        assert any(rank0[n].abs().max() > 0 for n in names if n.startswith("trainable/high."))
    assert all(torch.equal(rank0[n], torch.zeros_like(rank0[n])) for n in names if n.startswith("trainable/low."))
    if launcher == "fsdp":  # sharded block by block, each expert's blocks apart
        from safetensors import safe_open

        with safe_open(str(tmp_path / "run" / "rank0.safetensors"), "pt") as f:
            units = json.loads(f.metadata()["fsdp_units"])
        assert units == ["", "high.blocks.0", "low.blocks.0"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wan21", "wan22_a14b"])
def test_bf16_weights_with_checkpointing_and_kl_train_an_epoch(kind: str, pipeline_dirs, tmp_path: Path) -> None:
    """bf16 weights under bf16 autocast, gradient checkpointing (both A14B experts) and a KL term: finite
    log-probs, videos in [0, 1], the recomputed ratio within bf16 rounding of 1."""
    import json

    opts = tv.adapter_options(kind, gradient_checkpointing=True)
    cfg = {
        "model": {"name": "wan", "path": str(pipeline_dirs[kind]), "dtype": "bfloat16", "options": opts},
        "sampler": {"num_steps": 3},
        "reward": {"weights": {"test_video_brightness": 1.0}},
        "train": {"epochs": 1, "groups_per_epoch": 2, "group_size": 2, "mixed_precision": "bf16", "kl_beta": 0.01,
                  "lora": {"enabled": True, "rank": 2, "alpha": 2}},
        "eval": {"every": 0},
        "logging": {"tensorboard": False, "progress": False},
    }  # fmt: skip
    trainer = GRPOTrainer(config_from_dict(cfg), tmp_path / "run")
    experts = [trainer.policy.pipe.transformer]
    if kind == "wan22_a14b":
        experts.append(trainer.policy.pipe.transformer_2)
    assert all(t.dtype == torch.bfloat16 and t.is_gradient_checkpointing for t in experts)
    batch = trainer.collect(epoch=0)
    assert torch.isfinite(batch.log_probs[:, :2]).all() and batch.images.min() >= 0 and batch.images.max() <= 1
    trainer.run()
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert np.isfinite(record["loss"]) and record["kl_ref"] >= 0 and record["ratio_max_dev"] < 1e-3


WAN_RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("wan*.yaml"))
#: the tiny pipeline that stands for each recipe's model
RECIPE_KIND = {"wan21_1_3b": "wan21", "wan22_5b": "wan22_5b", "wan22_a14b": "wan22_a14b"}


@pytest.mark.slow
@pytest.mark.parametrize("path", WAN_RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_pipeline(path: Path, pipeline_dirs, tmp_path: Path) -> None:
    """The recipe as shipped (its sampler and window, LoRA targets and experts, guidance, memory options) on
    its model's tiny pipeline for one epoch with a checkpoint; the reward is this file's video brightness (the
    recipes' PickScore scores videos through the reward package's video path) and evaluation is off."""
    import json

    from precise_rl.config import load_config

    assert len(WAN_RECIPES) == 3
    cfg = load_config(path)
    kind = RECIPE_KIND[path.stem.rsplit("_flow_grpo", 1)[0]]
    overrides = [f"model.path={pipeline_dirs[kind]}", "model.dtype=float32", "train.mixed_precision='no'"]
    overrides += ["train.epochs=1", "train.groups_per_epoch=2", "train.group_size=2", "train.batch_size=4"]
    overrides += ["train.grad_accum=1", "sampler.num_steps=4", "eval.every=0", "logging.tensorboard=false"]
    overrides += ["logging.progress=false", "prompts.train=builtin", "prompts.eval=builtin", "reward.options={}"]
    overrides += ["reward.weights={test_video_brightness: 1.0}", "train.memory_budget_gb=1"]  # forward_batch: auto
    overrides += [f"model.options.{k}={v}" for k, v in tv.adapter_options(kind).items()]
    trainer = GRPOTrainer(load_config(path, overrides), tmp_path / "run")
    assert trainer.policy.cache_prompts and trainer.policy.offload_text_encoders
    summary = trainer.run()
    assert summary["epochs"] == 1
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert np.isfinite(record["loss"]) and np.isfinite(record["reward/test_video_brightness"])
    from safetensors.torch import load_file

    adapter = tmp_path / "run" / "checkpoints" / "epoch_000001" / "adapter"
    layers = {k.split(".lora_")[0] for k in load_file(str(adapter / "adapter_model.safetensors"))}
    assert layers == {n.removeprefix("base_model.model.") for n in layers}  # plain module names
    assert all(any(n.endswith(s) for s in cfg.model.options["lora_targets"]) for n in layers)
    experts = cfg.model.options.get("train_experts")
    if experts:  # both experts' layers
        assert {n.split(".")[0] for n in layers} == set(experts)
