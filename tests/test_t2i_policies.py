"""The newer text-to-image adapters on tiny pipelines saved to disk and loaded back through ``from_pretrained``.

For each model as for the first three (``test_diffusers_policies.py``, ``test_diffusers_training.py``):
the ODE rollout gives the diffusers pipeline's own images for the same seed and steps; the trainer's
recomputed log-probs equal the rollout's for every stochastic sampler; one GRPO epoch with LoRA changes
only the LoRA weights and the saved adapter reproduces the trained images in ``precise-rl sample``; a
resolution the model cannot take is one sentence and exit code 2; ``model_index.json`` picks the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file

from precise_rl.cli import main
from precise_rl.config import load_config
from precise_rl.errors import UserError
from precise_rl.policies.diffusers_base import detect_adapter
from precise_rl.policies.flux2 import Flux2KleinPolicy
from precise_rl.policies.flux2_dev import Flux2DevPolicy
from precise_rl.policies.registry import ADAPTERS
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices
from precise_rl.sde import SAMPLERS, kernel

from . import diffusers_checks as dc
from . import tiny_t2i_pipelines as tp

diffusers_logging.disable_progress_bar()

#: tiny pipelines (see tiny_t2i_pipelines.py); ``flux2_klein_9b`` is the Klein adapter on the 9B's shape
KINDS = ["flux2_dev", "flux2_klein_9b", "qwen_image", "z_image", "z_image_turbo"]
STOCHASTIC = [s for s in SAMPLERS if s != "ode"]
HEIGHT, WIDTH = tp.HEIGHT, tp.WIDTH
FROZEN = ("vae", "text_encoder")


def options(kind: str, **extra) -> dict:
    return tp.adapter_options(kind, **extra)


def adapter(kind: str) -> type:
    return ADAPTERS[tp.ADAPTER[kind]]


pipeline_dirs, policies = dc.pipeline_fixtures("t2i_pipelines", tp.save_pipeline, KINDS, adapter, options)


def pipeline_call_kwargs(kind: str, policy, prompts: list[str]) -> dict:
    """The diffusers ``__call__`` arguments that match the policy's options."""
    kw = {"height": HEIGHT, "width": WIDTH, "max_sequence_length": policy.max_sequence_length}
    if kind in ("flux2_dev", "flux2_klein_9b"):
        kw.update(guidance_scale=policy.guidance_scale, text_encoder_out_layers=tuple(policy.text_encoder_out_layers))
    elif kind == "qwen_image":  # true CFG needs a negative prompt; without one the pipeline runs no CFG
        kw.update(
            true_cfg_scale=policy.guidance_scale, negative_prompt=policy.negative_prompt if policy.do_cfg else None
        )
    elif kind in ("z_image", "z_image_turbo"):  # one negative prompt per prompt, as the pipeline asks
        kw.update(guidance_scale=policy.guidance_scale, negative_prompt=[policy.negative_prompt] * len(prompts))
        kw.update(cfg_normalization=policy.cfg_normalization, cfg_truncation=policy.cfg_truncation)
    return kw


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", KINDS)
def test_model_index_picks_the_adapter_and_loading_freezes_everything(kind: str, pipeline_dirs, policies) -> None:
    policy = policies[kind]
    assert detect_adapter(str(pipeline_dirs[kind])) == tp.ADAPTER[kind]
    assert type(policy) is adapter(kind) and type(policy.pipe).__name__ == policy.pipeline_class
    for name in ("transformer", *FROZEN):
        assert not any(p.requires_grad for p in getattr(policy.pipe, name).parameters()), name
    names = policy.lora_target_modules()
    linear = {n for n, m in policy.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names and set(names) <= linear and not any("embed" in n for n in names)


def test_flux2_dev_and_klein_9b_follow_the_flux2_klein_layout(policies) -> None:
    """FLUX.2 dev's transformer and VAE are Klein's: the same latent layout, LoRA layers and time grid rule;
    the 9B's double-stream blocks (two here) all get the reference's LoRA layers."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    dev, k9 = policies["flux2_dev"], policies["flux2_klein_9b"]
    assert dev.latent_shape == k9.latent_shape == (8, HEIGHT // 4, WIDTH // 4)
    assert dev.default_lora_suffixes == Flux2KleinPolicy.default_lora_suffixes
    assert {f"transformer_blocks.{i}.attn.to_q" for i in (0, 1)} <= set(k9.lora_target_modules())
    assert isinstance(dev, Flux2DevPolicy) and dev.text_encoder_out_layers == (1, 2, 3)
    assert Flux2DevPolicy.__init__.__kwdefaults__["text_encoder_out_layers"] == (10, 20, 30)  # the pipeline's
    mu = compute_empirical_mu(dev.image_seq_len, 6)
    t = np.append(np.linspace(1.0, 1.0 / 6, 6), 0.0)
    np.testing.assert_allclose(dev.time_grid(6).numpy(), np.exp(mu) * t / (1 + (np.exp(mu) - 1) * t), atol=1e-6)


# ---------------------------------------------------------------------------------------- parity


#: (tiny pipeline, model options, variant built in memory): each guidance mode the model has
PARITY = {
    "flux2_dev": ("flux2_dev", {}, None),
    "flux2_dev-guidance2.5": ("flux2_dev", {"guidance_scale": 2.5}, None),
    "flux2_dev-no-guidance-embedding": ("flux2_dev", {}, {"guidance_embeds": False}),
    "flux2_klein_9b": ("flux2_klein_9b", {}, None),
    "flux2_klein_9b-cfg4": ("flux2_klein_9b", {"guidance_scale": 4.0}, None),
    "flux2_klein_9b-distilled": ("flux2_klein_9b", {}, {"is_distilled": True}),
    "qwen_image-true-cfg4": ("qwen_image", {}, None),
    "qwen_image-true-cfg2.5-negative": ("qwen_image", {"guidance_scale": 2.5, "negative_prompt": "blurry, dark"}, None),
    "qwen_image-nocfg": ("qwen_image", {"guidance_scale": 1.0}, None),
    "z_image-cfg5": ("z_image", {}, None),
    "z_image-cfg3-negative-normalised-truncated": (
        "z_image",
        {"guidance_scale": 3.0, "negative_prompt": "blurry", "cfg_normalization": 1.0, "cfg_truncation": 0.5},
        None,
    ),
    "z_image_turbo": ("z_image_turbo", {}, None),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_ode_rollout_reproduces_the_diffusers_pipeline(case: str, policies) -> None:
    """Same seed, steps and sigmas: our batched Euler rollout gives diffusers' images."""
    kind, extra, variant = PARITY[case]
    policy = policies[kind]
    if extra or variant:
        pipe = policy.pipe if variant is None else tp.BUILDERS[kind](**variant)
        policy = adapter(kind)(pipe, **options(kind, **extra))
    prompts = ["a red fox", "two cats"]
    seed = int(torch.randint(0, 2**31, ()))
    ours, theirs = dc.ode_and_pipeline_images(policy, prompts, seed, 3, **pipeline_call_kwargs(kind, policy, prompts))
    assert ours.shape == theirs.shape == (2, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two prompts (and noises) really differ


def test_flux2_dev_guidance_reaches_the_embedding_in_one_pass(policies) -> None:
    """FLUX.2 dev is guidance-distilled: no negative prompt, one forward of B rows with the scale as guidance."""
    policy = policies["flux2_dev"]
    calls: list[tuple[int, torch.Tensor | None]] = []

    def hook(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs.get("guidance")))

    cond = policy.encode_prompts(["a cat", "a dog", "a cat"])
    assert not any(k.startswith("negative_") for k in cond)
    handle = policy.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        x, t = torch.randn(3, *policy.latent_shape), torch.rand(3)
        v = policy.velocity(x, t, cond)
    finally:
        handle.remove()
    assert [n for n, _ in calls] == [3]
    torch.testing.assert_close(calls[0][1], torch.full((3,), 4.0))
    other = Flux2DevPolicy(policy.pipe, **options("flux2_dev", guidance_scale=1.5)).velocity(x, t, cond)
    assert (v - other).abs().max() > 1e-4  # the embedding really uses the scale


def test_qwen_image_grid_is_the_sequence_length_shift_stretched_to_the_terminal_sigma(policies) -> None:
    """mu linear in the image tokens between (256, 0.5) and (8192, 0.9), exp(mu) shift, then 1 - sigma scaled
    so that the last sigma is shift_terminal (0.02): the pipeline's grid, from the closed form."""
    policy = policies["qwen_image"]
    cfg = policy.pipe.scheduler.config
    mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (policy.image_seq_len - 256)
    for n in (2, 7):
        t = np.linspace(1.0, 1.0 / n, n)
        shifted = np.exp(mu) * t / (1 + (np.exp(mu) - 1) * t)
        stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - cfg.shift_terminal))
        np.testing.assert_allclose(policy.time_grid(n).numpy(), np.append(stretched, 0.0), rtol=0, atol=1e-6)


def test_qwen_image_true_cfg_keeps_each_tokens_conditional_norm_in_one_pass(policies) -> None:
    """The guided velocity is v_u + w (v_c - v_u) rescaled to |v_c| token by token (the pipeline's 2x2 patch
    tokens): one forward of 2B rows, negative and positive texts of different lengths padded under the mask."""
    from diffusers import QwenImagePipeline

    guided = policies["qwen_image"]
    plain = type(guided)(guided.pipe, **options("qwen_image", guidance_scale=1.0))
    prompts = ["a cat", "a dog on a long red sofa", "a cat"]
    x, t = torch.randn(3, *guided.latent_shape), torch.rand(3)
    rows: list[int] = []
    handle = guided.transformer.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        v = guided.velocity(x, t, guided.encode_prompts(prompts))
    finally:
        handle.remove()
    assert rows == [6]
    v_c = plain.velocity(x, t, plain.encode_prompts(prompts))
    v_u = plain.velocity(x, t, plain.encode_prompts([guided.negative_prompt] * 3))

    def tokens(z: torch.Tensor) -> torch.Tensor:
        c, h, w = guided.latent_shape
        return QwenImagePipeline._pack_latents(z, 3, c, h, w)

    w = guided.guidance_scale
    combined = tokens(v_u) + w * (tokens(v_c) - tokens(v_u))
    expected = combined * tokens(v_c).norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(tokens(v), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens(v).norm(dim=-1), tokens(v_c).norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert (v - v_c).abs().max() > 1e-3


def test_z_image_turbo_grid_is_the_static_shift_of_a_float32_linspace(policies) -> None:
    """Z-Image-Turbo's scheduler shifts the pipeline's float32 linspace(1, 1/N, N) by 3: 3t / (1 + 2t)."""
    policy = policies["z_image_turbo"]
    for n in (3, 8):
        t = torch.linspace(1.0, 1.0 / n, n).double().numpy()
        np.testing.assert_allclose(policy.time_grid(n).numpy(), np.append(3 * t / (1 + 2 * t), 0.0), atol=1e-6)
    assert (policies["z_image"].time_grid(4) - policy.time_grid(4)).abs().max() > 1e-2  # the dynamic one differs


@pytest.mark.parametrize("kind", ["z_image", "z_image_turbo"])
def test_z_image_guides_in_one_forward_of_2b_rows_and_turbo_in_one_of_b(kind: str, policies) -> None:
    """Z-Image (guidance 5): each row with its negative prompt, one transformer call of 2B samples; the
    distilled Turbo (guidance 0): no negative prompt, B samples."""
    policy = policies[kind]
    calls: list[int] = []
    handle = policy.transformer.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    cond = policy.encode_prompts(["a cat", "a dog", "a cat"])
    try:
        policy.velocity(torch.randn(3, *policy.latent_shape), torch.rand(3), cond)
    finally:
        handle.remove()
    assert any(k.startswith("negative_") for k in cond) == (kind == "z_image")
    assert calls == [6 if kind == "z_image" else 3]


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_prompts_are_encoded_once(kind: str, policies) -> None:
    """Each distinct prompt of a batch goes through the text encoder once; the negative prompt once per policy."""
    policy = adapter(kind)(policies[kind].pipe, **options(kind))  # a fresh policy: nothing cached yet
    seen, (cond, _) = dc.encode_with_spy(policy, ["b", "a", "b", "b", "a"], ["a"])
    assert seen == ([["b", "a"], [policy.negative_prompt], ["a"]] if policy.do_cfg else [["b", "a"], ["a"]])
    for v in cond.values():
        assert v.shape[0] == 5 and torch.equal(v[0], v[3]) and torch.equal(v[1], v[4])
    assert (cond["prompt_embeds"][0] - cond["prompt_embeds"][1]).abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_batched_velocity_equals_row_by_row(kind: str, policies) -> None:
    """A whole group in one forward gives each row's own velocity (text padding under the mask, packing and
    guidance are per row)."""
    policy = policies[kind]
    prompts = ["a red fox", "two cats on a mat", "a red fox", "x"]
    batched = dc.check_batched_velocity_is_row_by_row(policy, prompts)
    assert (batched[0] - batched[2]).abs().max() > 1e-4  # same prompt, other x and t


# ---------------------------------------------------------------------------------------- consistency


def _trainer(kind: str, path: Path, sampler: str, out: Path, **train) -> GRPOTrainer:
    model = {"name": tp.ADAPTER[kind], "path": str(path), "options": options(kind)}
    return dc.lora_trainer(model, out, sampler, **train)


@pytest.mark.parametrize("kind", KINDS)
def test_importance_ratio_is_one_for_every_sampler(kind: str, pipeline_dirs, tmp_path: Path) -> None:
    """The trainer's recompute (all (sample, step) pairs in one batch) reproduces the rollout's log-probs,
    for every stochastic sampler on the model's own grid."""
    trainer = _trainer(kind, pipeline_dirs[kind], STOCHASTIC[0], tmp_path / "run")
    dc.perturb_lora_b(trainer)
    for sampler in STOCHASTIC:
        trainer.base_kernel = kernel(sampler, trainer.sigmas)  # the sampler at its reference noise level
        batch = trainer.collect(epoch=0)
        steps = train_step_indices(batch.kernel, 0.99)
        assert steps and batch.kernel.name == sampler
        out, ratio, rows, idx = dc.recompute_ratio(trainer, batch, steps)
        assert torch.isfinite(ratio).all(), sampler
        assert (ratio - 1).abs().max().item() < 1e-5, (sampler, (ratio - 1).abs().max().item())
        torch.testing.assert_close(out.mean, batch.means[rows, idx], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_grpo_epoch_trains_only_lora_and_the_adapter_reloads_into_sample(
    kind: str, pipeline_dirs, tmp_path: Path
) -> None:
    path = pipeline_dirs[kind]
    trainer = _trainer(kind, path, "precise", tmp_path / "run", epochs=1, batch_size=4, lr=1e-2, clip_range=0.2)
    dc.run_and_check_only_lora_trains(trainer, FROZEN, optional=False)
    assert trainer.global_step == 1

    # The adapter saved with the checkpoint reloads into `precise-rl sample` (given the run directory) ...
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(path), "--lora", str(tmp_path / "run"), "--prompt", "a cat"]
    argv += ["--steps", "3", "--num-images", "2", "--seed", "5", "-o", str(out), "--device", "cpu"]
    assert main([*argv, *dc.option_flags(options(kind))]) == 0
    # ... with the trained weights: its images are those of the trained policy in memory.
    dc.check_samples_are_the_policys(trainer, "a cat", out / "a_cat")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flux2_dev", "qwen_image", "z_image"])  # one per new adapter
def test_bf16_weights_with_checkpointing_train_an_epoch(kind: str, tmp_path: Path) -> None:
    """bf16 weights under bf16 autocast with gradient checkpointing and a KL term: finite log-probs, images in
    [0, 1], the recomputed ratio within bf16 rounding of 1."""
    path = tp.save_pipeline(kind, tmp_path / "pipe")
    model = {"name": tp.ADAPTER[kind], "path": str(path), "options": options(kind, gradient_checkpointing=True)}
    trainer = dc.bf16_kl_trainer(model, tmp_path / "run")
    assert (
        trainer.policy.pipe.transformer.dtype == torch.bfloat16 and trainer.policy.transformer.is_gradient_checkpointing
    )
    batch = trainer.collect(epoch=0)
    assert torch.isfinite(batch.log_probs[:, :2]).all() and batch.images.min() >= 0 and batch.images.max() <= 1
    trainer.run()
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert np.isfinite(record["loss"]) and record["kl_ref"] >= 0 and record["ratio_max_dev"] < 1e-3


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", KINDS)
def test_a_resolution_the_model_cannot_take_is_one_sentence(
    kind: str, pipeline_dirs, policies, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(UserError, match=r"cannot take a 30x16 image: .* multiples of 4 pixels"):
        adapter(kind)(policies[kind].pipe, **options(kind, height=30))
    base = ["sample", "--model", str(pipeline_dirs[kind]), "--prompt", "x", "--device", "cpu"]
    base += ["-o", str(tmp_path / "out"), *dc.option_flags(options(kind), size=False)]
    capsys.readouterr()
    assert main([*base, "--height", "30", "--width", "16"]) == 2
    assert "cannot take a 30x16 image" in dc.one_error_line(capsys, "sample")
    assert not (tmp_path / "out").exists()


def test_flux2_text_layers_that_do_not_make_the_transformers_text_width_are_one_sentence(policies) -> None:
    """Klein 9B's transformer takes 3 x 4096 (Qwen3-8B) where the 4B takes 3 x 2560: two layers, or the 4B's
    layer choice on a text encoder of another width, cannot feed it."""
    pipe = policies["flux2_klein_9b"].pipe
    with pytest.raises(UserError, match=r"names 2 hidden states of width 24, .* text of width 72 .*: name 3 layers"):
        Flux2KleinPolicy(pipe, **options("flux2_klein_9b", text_encoder_out_layers=[1, 2]))
    distilled = tp.BUILDERS["flux2_klein_9b"](is_distilled=True)
    with pytest.raises(UserError, match="step-distilled"):
        Flux2KleinPolicy(distilled, **options("flux2_klein_9b", guidance_scale=4.0))


def test_qwen_image_text_longer_than_the_pipeline_takes_is_one_sentence(policies) -> None:
    with pytest.raises(UserError, match="'max_sequence_length' must be at most 1024 for Qwen-Image, got 2048"):
        type(policies["qwen_image"])(policies["qwen_image"].pipe, **options("qwen_image", max_sequence_length=2048))


def test_z_image_guidance_options_are_checked(policies) -> None:
    pipe = policies["z_image"].pipe
    with pytest.raises(UserError, match="'cfg_normalization' must be a finite number >= 0, got -1"):
        type(policies["z_image"])(pipe, **options("z_image", cfg_normalization=-1))
    with pytest.raises(UserError, match="'cfg_truncation' must be a finite number >= 0"):
        type(policies["z_image"])(pipe, **options("z_image", cfg_truncation="late"))


# ---------------------------------------------------------------------------------------- recipes

ROOT = Path(__file__).resolve().parents[1]
NEW_MODELS = {"flux2_dev", "qwen_image", "z_image"}
# by the model a recipe trains, not its file name: qwen_image_edit_* recipes train the editing model
RECIPES = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if load_config(p).model.name in NEW_MODELS]


def test_each_new_model_has_a_recipe() -> None:
    assert {load_config(p).model.name for p in RECIPES} == NEW_MODELS


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_pipeline_with_its_own_rewards(path: Path, pipeline_dirs, tmp_path: Path) -> None:
    """The recipe as shipped (its sampler and window, LoRA targets, guidance, rewards), on the model's tiny
    pipeline and tiny reward models, one epoch with evaluation under both protocols and a checkpoint."""
    from .tiny_pipelines import TINY_REWARDS

    text = path.read_text()
    cfg = load_config(path)
    launcher = "fsdp" if cfg.train.fsdp else "ddp"  # a sharded recipe launches through the plain multi-GPU config
    assert f"accelerate launch --config_file configs/accelerate/{launcher}.yaml --num_processes" in text
    assert f"-m precise_rl.cli train configs/{path.name} --output runs/{path.stem}" in text
    kind = cfg.model.name
    overrides = [f"model.path={pipeline_dirs[kind]}", "model.dtype=float32", "train.mixed_precision='no'"]
    overrides += ["train.epochs=1", "train.groups_per_epoch=2", "train.group_size=2", "train.batch_size=4"]
    overrides += ["train.grad_accum=1", "sampler.num_steps=4", "eval.num_steps=2", "eval.max_prompts=1"]
    overrides += ["eval.samples_per_prompt=2", "logging.tensorboard=false", "logging.progress=false"]
    overrides += ["prompts.train=builtin", "prompts.eval=builtin", "reward.options={}"]
    overrides += ["train.memory_budget_gb=1"]  # the recipe's forward_batch: auto, within a CPU budget
    overrides += [f"model.options.{k}={v}" for k, v in options(kind).items() if k != "guidance_scale"]
    for reward in cfg.reward.weights:
        overrides += [f"reward.options.{reward}.{k}={v}" for k, v in TINY_REWARDS[reward](tmp_path / reward).items()]
    summary = GRPOTrainer(load_config(path, overrides), tmp_path / "run").run()
    assert summary["epochs"] == 1
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["forward_batch"] >= 1  # chosen by the budget
    for reward in cfg.reward.weights:
        assert np.isfinite(record[f"reward/{reward}"]) and np.isfinite(record[f"eval_ode/{reward}"])
        assert np.isfinite(record[f"eval_own/{reward}"])
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_000001"
    if cfg.train.lora.enabled:
        assert (ckpt / "adapter" / "adapter_config.json").is_file()
    else:  # a full fine-tune (on one process here, held whole): every transformer weight is in the checkpoint
        trained = load_file(str(ckpt / "trainable.safetensors"))
        base = load_file(str(next((Path(pipeline_dirs[kind]) / "transformer").glob("*.safetensors"))))
        assert trained.keys() == base.keys() and all(w.dtype == torch.float32 for w in trained.values())
        assert any(not torch.equal(trained[k], base[k].float()) for k in base)
