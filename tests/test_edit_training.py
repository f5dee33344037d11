"""One GRPO epoch with LoRA on each tiny editing pipeline, the saved adapter in ``precise-rl sample --image``, and
bad editing input through ``precise-rl train`` and ``precise-rl sample``: one sentence, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.utils import logging as diffusers_logging

from precise_rl.cli import main
from precise_rl.policies.edit import EditPrompt
from precise_rl.rl.trainer import GRPOTrainer

from . import diffusers_checks as dc
from . import tiny_edit_pipelines as te
from . import tiny_pipelines as tp

diffusers_logging.disable_progress_bar()

KINDS = ["flux1_kontext", "qwen_image_edit"]
FROZEN = ("vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", autouse=True)
def _qwen_processor_loads():
    with te.processor_without_video():
        yield


@pytest.mark.parametrize("kind", KINDS)
def test_grpo_step_trains_only_lora_and_the_adapter_reloads_into_sample(kind: str, tmp_path: Path) -> None:
    path = te.save_pipeline(kind, tmp_path / "pipe")
    edits = te.write_edit_prompts(tmp_path / "data", [("make it red", (32, 16)), ("make it blue", (16, 16))])
    opts = te.adapter_options(kind)
    model = {"name": kind, "path": str(path), "options": opts}
    prompts = {"train": str(edits), "eval": str(edits)}
    trainer = dc.lora_trainer(model, tmp_path / "run", prompts=prompts, **dc.LORA_EPOCH)
    dc.run_and_check_only_lora_trains(trainer, FROZEN)
    assert trainer.global_step >= 1

    # The adapter saved with the checkpoint reloads into `precise-rl sample`, the source image given by --image.
    image = tmp_path / "data" / "images" / "source1.png"
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(path), "--lora", str(tmp_path / "run"), "--prompt", "make it blue"]
    argv += ["--image", str(image), "--steps", "3", "--num-images", "2", "--seed", "5", "-o", str(out)]
    argv += ["--device", "cpu", *dc.option_flags(opts)]
    assert main(argv) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["prompts"][0]["image"] == str(image.resolve())
    # ... with the trained weights: its images are those of the trained policy in memory, on that source.
    dc.check_samples_are_the_policys(trainer, EditPrompt("make it blue", image.resolve()), out / "make_it_blue")
    # A JSON-lines --prompt-file samples every edit of the file, each on its own source.
    out2 = tmp_path / "samples2"
    argv = ["sample", "--model", str(path), "--prompt-file", str(edits), "--steps", "2", "--num-images", "1"]
    assert main([*argv, "-o", str(out2), "--device", "cpu", *dc.option_flags(opts)]) == 0
    record = json.loads((out2 / "samples.json").read_text())
    assert [(e["prompt"], Path(e["image"]).name) for e in record["prompts"]] == [
        ("make it red", "source0.png"),
        ("make it blue", "source1.png"),
    ]


def _config_file(tmp_path: Path, kind: str, path: Path, prompts: str, **options) -> Path:
    small = te.adapter_options(kind) if kind in te.BUILDERS else tp.adapter_options(kind)
    cfg = {
        "model": {"name": kind, "path": str(path), "options": {**small, **options}},
        "prompts": {"train": prompts, "eval": prompts},
        "sampler": {"num_steps": 2},
        "reward": {"weights": {"jpeg_compressibility": 1.0}},
        "train": {"epochs": 1, "groups_per_epoch": 1, "group_size": 2, "lora": {"enabled": True, "rank": 2}},
        "eval": {"every": 0},
        "logging": {"tensorboard": False, "progress": False},
    }
    out = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_train_command_ends_bad_editing_input_in_one_sentence(kind: str, tmp_path: Path, capsys) -> None:
    """A source image missing or unreadable, a plain prompt file for an editing model, a JSON-lines file for a
    text-to-image model and a resolution the model cannot take: exit code 2 and one error line each."""
    path = te.save_pipeline(kind, tmp_path / "pipe")
    t2i = tp.save_pipeline("flux1", tmp_path / "t2i")
    good = te.write_edit_prompts(tmp_path / "good", [("make it red", (16, 16))])
    missing = good.parent / "missing.jsonl"
    missing.write_text(good.read_text() + json.dumps({"prompt": "x", "image": "images/nope.png"}) + "\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "x", "image": "images/broken.png"}) + "\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("a cat\n")
    cases = [
        (
            _config_file(tmp_path, kind, path, str(missing)),
            f"line 2 of prompt file '{missing}': source image '{good.parent / 'images' / 'nope.png'}' does not exist",
        ),
        (_config_file(tmp_path, kind, path, str(broken)), "line 1 of prompt file"),
        (_config_file(tmp_path, kind, path, str(plain)), "edits a source image but prompt 'a cat' comes without one"),
        (_config_file(tmp_path, kind, path, "builtin", height=30), "cannot take a 30x16 image"),
        (
            _config_file(tmp_path, "flux1", t2i, str(good)),
            f"generates from text alone but prompt 'make it red' ({good}:1) comes with a source image",
        ),
    ]
    for k, (config, message) in enumerate(cases):
        capsys.readouterr()
        assert main(["train", str(config), "--output", str(tmp_path / f"run{k}")]) == 2, message
        line = dc.one_error_line(capsys, "train")
        assert message in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_sample_command_ends_bad_editing_input_in_one_sentence(kind: str, tmp_path: Path, capsys) -> None:
    path = te.save_pipeline(kind, tmp_path / "pipe")
    image = tmp_path / "src.png"
    te.source_image(16, 16, seed=0).save(image)
    base = ["sample", "--model", str(path), "--device", "cpu", "--steps", "1", "-o", str(tmp_path / "out")]
    base += dc.option_flags(te.adapter_options(kind))
    cases = [
        (["--prompt", "x", "--image", str(tmp_path / "nope.png")], "--image: source image"),
        (["--image", str(image)], "--image needs a --prompt"),
        (["--prompt", "x"], "edits a source image but prompt 'x' comes without one"),
        (["--prompt", "x", "--image", str(image), "--height", "30"], "cannot take a 30x16 image"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, message
        assert message in dc.one_error_line(capsys, "sample")
    assert not (tmp_path / "out").exists()  # nothing written


ROOT = Path(__file__).resolve().parents[1]
RECIPES = [p for p in sorted(ROOT.glob("configs/*.yaml")) if p.name.startswith(("flux1_kontext_", "qwen_image_edit_"))]


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_pipeline(path: Path, tmp_path: Path) -> None:
    """Each editing recipe, its launch commands as the other recipes', runs an epoch on its tiny pipeline with
    a prompt file of drawn sources; its rewards: image_similarity on a tiny CLIP (GenEval needs a server)."""
    from precise_rl.config import load_config

    assert {p.stem.split("_flow_grpo")[0] for p in RECIPES} == set(KINDS)
    text = path.read_text()
    assert "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes" in text
    assert f"-m precise_rl.cli train configs/{path.name} --output runs/{path.stem}" in text
    assert f"--lora runs/{path.stem}" in text and "--image" in text
    cfg = load_config(path)
    kind = cfg.model.name
    assert "image_similarity" in cfg.reward.weights
    pipe = te.save_pipeline(kind, tmp_path / "pipe")
    edits = te.write_edit_prompts(tmp_path / "data", [("make it red", (32, 16)), ("make it blue", (16, 16))])
    overrides = [f"model.path={pipe}", "model.dtype=float32", "train.mixed_precision='no'", "train.epochs=1"]
    overrides += ["train.groups_per_epoch=2", "train.group_size=2", "train.batch_size=2", "train.grad_accum=2"]
    overrides += ["sampler.num_steps=3", "eval.num_steps=2", "eval.max_prompts=1", "eval.samples_per_prompt=2"]
    overrides += ["logging.tensorboard=false", "logging.progress=false", f"prompts.train={edits}"]
    overrides += [f"prompts.eval={edits}", "reward.options={}", "reward.weights={image_similarity: 1.0}"]
    overrides += ["train.memory_budget_gb=1"]  # the recipe's forward_batch: auto, within a CPU budget
    overrides += [f"model.options.{k}={v}" for k, v in te.adapter_options(kind).items()]
    overrides += [f"reward.options.image_similarity.{k}={v}" for k, v in tp.tiny_clip(tmp_path / "clip").items()]
    if cfg.sampler.window.size:
        overrides += ["sampler.window.size=2"]
    summary = GRPOTrainer(load_config(path, overrides), tmp_path / "run").run()
    assert summary["epochs"] == 1 and np.isfinite(summary["reward_after"])
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert np.isfinite(record["reward/image_similarity"]) and np.isfinite(record["eval_ode/image_similarity"])
    assert (tmp_path / "run" / "checkpoints" / "epoch_000001" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_weights_with_checkpointing_and_kl_train(kind: str, tmp_path: Path) -> None:
    """bf16 weights under bf16 autocast, gradient checkpointing and a KL term (adapters off) run an epoch on
    editing prompts, with CFG (two branches sharing the source tokens)."""
    path = te.save_pipeline(kind, tmp_path / "pipe")
    edits = te.write_edit_prompts(tmp_path / "data", [("make it red", (32, 16)), ("make it blue", (16, 16))])
    cfg_option = {"true_cfg_scale": 2.0} if kind == "flux1_kontext" else {}
    options = te.adapter_options(kind, gradient_checkpointing=True, **cfg_option)
    model = {"name": kind, "path": str(path), "options": options}
    trainer = dc.bf16_kl_trainer(model, tmp_path / "run", prompts={"train": str(edits), "eval": str(edits)})
    assert trainer.policy.pipe.transformer.dtype == torch.bfloat16 and trainer.policy.do_cfg
    trainer.run()
    assert trainer.global_step == 1
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert np.isfinite(record["loss"]) and record["kl_ref"] >= 0 and record["ratio_max_dev"] < 1e-3
