"""The HunyuanVideo 1.5 text-to-video adapter on a tiny pipeline saved to disk and loaded back through
``from_pretrained``.

As for the image models (``test_t2i_policies.py``): the ODE rollout gives the diffusers pipeline's own frames for
the same seed and steps, under each guidance mode of its guider; the trainer's recomputed log-probs equal the
rollout's for every stochastic sampler; one GRPO epoch with LoRA changes only the LoRA weights and the saved
adapter reproduces the trained video in ``precise-rl sample``; a frame count or resolution the model cannot take is
one sentence and exit code 2; ``model_index.json`` picks the adapter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ClassifierFreeGuidance
from diffusers.utils import logging as diffusers_logging

from precise_rl.cli import main
from precise_rl.cli.models import model_rows
from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies.diffusers_base import detect_adapter
from precise_rl.policies.hunyuan_video15 import HunyuanVideo15Policy
from precise_rl.rewards.base import register_reward
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices
from precise_rl.sde import SAMPLERS, kernel, rollout

from . import diffusers_checks as dc
from . import tiny_hunyuan_video as th

diffusers_logging.disable_progress_bar()

KINDS = ["hunyuan_video15", "hunyuan_video15_distilled"]
STOCHASTIC = [s for s in SAMPLERS if s != "ode"]
FRAMES, HEIGHT, WIDTH = th.FRAMES, th.HEIGHT, th.WIDTH
FROZEN = ("vae", "text_encoder", "text_encoder_2")


def options(kind: str = "hunyuan_video15", **extra) -> dict:
    return th.adapter_options(kind, **extra)


pipeline_dirs, policies = dc.pipeline_fixtures(
    "hunyuan_video15_pipelines", th.save_pipeline, KINDS, lambda kind: HunyuanVideo15Policy, options
)


@register_reward("test_hunyuan_video15.motion")
def motion_reward(videos: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """A video reward: the mean change between consecutive frames of ``(B, F, C, H, W)`` videos."""
    assert videos.ndim == 5 and videos.shape[1:] == (FRAMES, 3, HEIGHT, WIDTH), videos.shape
    return (videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4))


motion_reward.accepts_video = True  # it scores whole videos (an image reward would score chosen frames)


def pipeline_frames(policy: HunyuanVideo15Policy, prompts: list[str], seed: int, steps: int) -> torch.Tensor:
    """diffusers' own pipeline on ``prompts``, with the policy's guidance scale given to its guider.

    The VAE decodes one video per call (its causal attention mask does not broadcast over a batch), so the
    pipeline's VAE slices the batch for this call.
    """
    pipe = policy.pipe
    guider, pipe.guider = pipe.guider, pipe.guider.new(guidance_scale=policy.guidance_scale)
    pipe.vae.enable_slicing()
    try:
        return pipe(
            prompt=prompts,
            negative_prompt=[policy.negative_prompt] * len(prompts),  # one per prompt, as the pipeline asks
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
        ).frames
    finally:
        pipe.guider = guider
        pipe.vae.disable_slicing()


def ode_frames(policy: HunyuanVideo15Policy, prompts: list[str], seed: int, steps: int) -> torch.Tensor:
    x1 = policy.sample_noise(len(prompts), generator=torch.Generator().manual_seed(seed))
    traj = rollout(policy.velocity, x1, policy.time_grid(steps), "ode", cond=policy.encode_prompts(prompts))
    return policy.decode(traj.sample)


# ---------------------------------------------------------------------------------------- loading and layout


@pytest.mark.parametrize("kind", KINDS)
def test_model_index_picks_the_adapter_and_loading_freezes_everything(kind: str, pipeline_dirs, policies) -> None:
    policy = policies[kind]
    assert detect_adapter(str(pipeline_dirs[kind])) == "hunyuan_video15"
    assert type(policy) is HunyuanVideo15Policy and type(policy.pipe).__name__ == policy.pipeline_class
    for name in ("transformer", *FROZEN):
        assert not any(p.requires_grad for p in getattr(policy.pipe, name).parameters()), name
    # LoRA goes into both streams of the double-stream blocks, not into the text refiner's look-alike layers
    names = policy.lora_target_modules()
    assert len(names) == 2 * 12 and all(n.startswith("transformer_blocks.") for n in names)
    assert "transformer_blocks.1.attn.add_q_proj" in names and "transformer_blocks.0.ff_context.net.2" in names


def test_latents_are_the_pipelines_noise_and_the_video_convention_holds(policies) -> None:
    """Latents ``(B, C, F, h, w)`` with the pipeline's frame and pixel compression; ``fps`` is the model's 24."""
    policy = policies["hunyuan_video15"]
    assert policy.latent_shape == (4, (FRAMES - 1) // 4 + 1, HEIGHT // 4, WIDTH // 4)
    assert isinstance(policy.fps, int) and policy.fps == 24
    assert policy.num_frames == FRAMES and (policy.height, policy.width) == (HEIGHT, WIDTH)
    latents = policy.pipe.prepare_latents(
        2, 4, HEIGHT, WIDTH, FRAMES, torch.float32, "cpu", torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(policy.sample_noise(2, torch.Generator().manual_seed(3)), latents, rtol=0, atol=0)
    frames = policy.decode(torch.randn(3, *policy.latent_shape))
    assert frames.shape == (3, FRAMES, 3, HEIGHT, WIDTH) and frames.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1
    assert HunyuanVideo15Policy(policy.pipe, fps=16, **options()).fps == 16


def test_default_size_is_the_pipelines_own(policies) -> None:
    """Without height and width the pipeline draws its 16:9 bucket of the transformer's target size."""
    pipe = policies["hunyuan_video15"].pipe
    policy = HunyuanVideo15Policy(pipe, num_frames=FRAMES)
    assert (policy.height, policy.width) == pipe.video_processor.calculate_default_height_width(9, 16, 32)
    assert policy.width > policy.height


def test_guidance_follows_the_pipelines_guider_unless_given(policies) -> None:
    pipe = th.BUILDERS["hunyuan_video15"]()
    assert HunyuanVideo15Policy(pipe, **options()).guidance_scale == 6.0
    assert HunyuanVideo15Policy(pipe, **options(guidance_scale=3.0)).guidance_scale == 3.0
    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, enabled=False)  # the pipeline then runs one pass
    assert not HunyuanVideo15Policy(pipe, **options()).do_cfg
    pipe.guider = ClassifierFreeGuidance(guidance_scale=0.0, use_original_formulation=True)  # x_c + 0 (x_c - x_u)
    assert not HunyuanVideo15Policy(pipe, **options()).do_cfg
    assert not policies["hunyuan_video15_distilled"].do_cfg and policies["hunyuan_video15"].do_cfg


def test_vae_tiling_is_the_vaes_own_and_memory_options_keep_the_numbers(policies) -> None:
    """``vae_tiling`` switches the VAE's tiled decoding; offloading and the prompt cache leave the conditioning
    (both text encoders' rows) and the frames as they are."""
    plain = policies["hunyuan_video15"]
    assert HunyuanVideo15Policy(plain.pipe, **options(vae_tiling=False)).pipe.vae.use_tiling is False
    assert HunyuanVideo15Policy(plain.pipe, **options()).pipe.vae.use_tiling is True
    pipe = th.BUILDERS["hunyuan_video15"]()
    memory = {"offload_text_encoders": True, "offload_vae": True, "cache_prompts": True}
    cached = HunyuanVideo15Policy(pipe, **options(**memory))
    prompts = ['a "B" sign', "a fox", 'a "B" sign']
    want, got = plain.encode_prompts(prompts), cached.encode_prompts(prompts)
    assert want.keys() == got.keys() and len(got) == 8  # both encoders, each with its mask, and the negatives
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    z = torch.randn(2, *plain.latent_shape)
    torch.testing.assert_close(cached.decode(z), plain.decode(z), rtol=0, atol=0)


def test_time_grid_is_the_static_shift_of_the_pipelines_linspace(policies) -> None:
    """``shift s / (1 + (shift - 1) s)`` of ``linspace(1, 0, N + 1)[:-1]``, shift 5, then the terminal 0."""
    policy = policies["hunyuan_video15"]
    for n in (3, 8):
        s = np.linspace(1.0, 0.0, n + 1)[:-1]
        np.testing.assert_allclose(policy.time_grid(n).numpy(), np.append(5 * s / (1 + 4 * s), 0.0), atol=1e-6)


# ---------------------------------------------------------------------------------------- parity

#: (tiny pipeline, model options, guider of a variant): each guidance mode of the pipeline's guider
PARITY = {
    "cfg6": ("hunyuan_video15", {}, None),
    "cfg2.5-negative": ("hunyuan_video15", {"guidance_scale": 2.5, "negative_prompt": "blurry, dark"}, None),
    "distilled": ("hunyuan_video15_distilled", {}, None),
    "original-formulation-rescaled": (
        "hunyuan_video15",
        {},
        {"guidance_scale": 3.0, "use_original_formulation": True, "guidance_rescale": 0.7},
    ),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_ode_rollout_reproduces_the_diffusers_pipeline(case: str, policies) -> None:
    """Same seed, steps and sigmas: our batched Euler rollout gives diffusers' frames (one prompt with quoted
    text, which the ByT5 glyph encoder reads, one without)."""
    kind, extra, guider = PARITY[case]
    policy = policies[kind]
    if extra or guider:
        pipe = policy.pipe
        if guider is not None:
            pipe = th.BUILDERS[kind]()
            pipe.guider = ClassifierFreeGuidance(**guider)
        policy = HunyuanVideo15Policy(pipe, **options(kind, **extra))
    assert policy.do_cfg == (kind != "hunyuan_video15_distilled")
    prompts = ['a neon sign that reads "OPEN"', "a red fox running"]
    seed = int(torch.randint(0, 2**31, ()))
    ours, theirs = ode_frames(policy, prompts, seed, 3), pipeline_frames(policy, prompts, seed, 3)
    assert ours.shape == theirs.shape == (2, FRAMES, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two prompts (and noises) really differ


@pytest.mark.parametrize("kind, rows", [("hunyuan_video15", 6), ("hunyuan_video15_distilled", 3)])
def test_guidance_runs_one_forward_of_2b_rows_and_the_distilled_model_one_of_b(kind: str, rows: int, policies) -> None:
    policy = policies[kind]
    calls: list[int] = []
    handle = policy.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    cond = policy.encode_prompts(["a cat", "a dog", "a cat"])
    try:
        policy.velocity(torch.randn(3, *policy.latent_shape), torch.rand(3), cond)
    finally:
        handle.remove()
    assert any(k.startswith("negative_") for k in cond) == (rows == 6)
    assert calls == [rows]


def test_repeated_prompts_are_encoded_once_by_both_text_encoders(policies) -> None:
    """Each distinct prompt goes through the Qwen2.5-VL and the ByT5 encoders once; the negative prompt once per
    policy."""
    policy = HunyuanVideo15Policy(policies["hunyuan_video15"].pipe, **options())  # nothing cached yet
    pipe = policy.pipe
    seen: dict[str, list[list[str]]] = {"mllm": [], "byt5": []}
    originals = {"mllm": pipe._get_mllm_prompt_embeds, "byt5": pipe._get_byt5_prompt_embeds}

    def spy(which: str):
        def encode(**kw):
            seen[which].append(list(kw["prompt"]))
            return originals[which](**kw)

        return encode

    pipe._get_mllm_prompt_embeds, pipe._get_byt5_prompt_embeds = spy("mllm"), spy("byt5")
    try:
        cond = policy.encode_prompts(['a "B" sign', "a", 'a "B" sign', 'a "B" sign', "a"])
        policy.encode_prompts(["a"])
    finally:
        del pipe._get_mllm_prompt_embeds, pipe._get_byt5_prompt_embeds
    assert seen["mllm"] == seen["byt5"] == [['a "B" sign', "a"], [""], ["a"]]
    for v in cond.values():
        assert v.shape[0] == 5 and torch.equal(v[0], v[3]) and torch.equal(v[1], v[4])
    assert cond["prompt_embeds_mask_2"][0].sum() > 0 and cond["prompt_embeds_mask_2"][1].sum() == 0  # glyphs


def test_batched_velocity_equals_row_by_row(policies) -> None:
    batched = dc.check_batched_velocity_is_row_by_row(
        policies["hunyuan_video15"], ["a red fox", 'a sign "HI"', "a red fox", "x"]
    )
    assert (batched[0] - batched[2]).abs().max() > 1e-4  # same prompt, other x and t


# ---------------------------------------------------------------------------------------- training


def _trainer(path: Path, out: Path, sampler: str = "precise", **train) -> GRPOTrainer:
    """GRPO with LoRA of rank 2 on ``sampler`` (3 steps), the motion reward above, a checkpoint each epoch."""
    cfg = {
        "seed": int(torch.randint(0, 1000, ())),
        "model": {"name": "hunyuan_video15", "path": str(path), "options": options()},
        "sampler": {"name": sampler, "num_steps": 3},
        "reward": {"weights": {"test_hunyuan_video15.motion": 1.0}},
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


def test_importance_ratio_is_one_for_every_sampler(pipeline_dirs, tmp_path: Path) -> None:
    """The trainer's recompute (all (sample, step) pairs in one batch) reproduces the rollout's log-probs, for
    every stochastic sampler on the model's own grid."""
    trainer = _trainer(pipeline_dirs["hunyuan_video15"], tmp_path / "run", STOCHASTIC[0])
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


def test_grpo_epoch_trains_only_lora_and_the_adapter_reloads_into_sample(pipeline_dirs, tmp_path: Path) -> None:
    path = pipeline_dirs["hunyuan_video15"]
    trainer = _trainer(path, tmp_path / "run", epochs=1, batch_size=4, lr=1e-2, clip_range=0.2)
    dc.run_and_check_only_lora_trains(trainer, FROZEN, optional=False)
    assert trainer.global_step == 1

    # The adapter saved with the checkpoint reloads into `precise-rl sample` (given the run directory) ...
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(path), "--lora", str(tmp_path / "run"), "--prompt", "a cat"]
    argv += ["--steps", "3", "--num-images", "2", "--seed", "5", "-o", str(out), "--device", "cpu"]
    assert main([*argv, *dc.option_flags(options())]) == 0
    # ... with the trained weights: its videos are those of the trained policy in memory.
    dc.check_samples_are_the_policys(trainer, "a cat", out / "a_cat")


@pytest.mark.slow
def test_bf16_weights_with_checkpointing_roll_out_and_recompute(pipeline_dirs, tmp_path: Path) -> None:
    """bf16 weights under bf16 autocast with gradient checkpointing: finite log-probs, frames in [0, 1], the
    recomputed ratio within bf16 rounding of 1, and a training step with a KL term that stays finite."""
    model = {"name": "hunyuan_video15", "path": str(pipeline_dirs["hunyuan_video15"]), "dtype": "bfloat16"}
    model["options"] = options(gradient_checkpointing=True)
    cfg = {
        "model": model,
        "sampler": {"num_steps": 3},
        "reward": {"weights": {"test_hunyuan_video15.motion": 1.0}},
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
    trainer = GRPOTrainer(config_from_dict(cfg), tmp_path / "run")
    assert trainer.policy.pipe.transformer.dtype == torch.bfloat16
    assert trainer.policy.transformer.is_gradient_checkpointing
    batch = trainer.collect(epoch=0)
    assert torch.isfinite(batch.log_probs[:, :2]).all()
    assert batch.images.shape == (4, FRAMES, 3, HEIGHT, WIDTH)
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    _, ratio, _, _ = dc.recompute_ratio(trainer, batch, [0, 1])
    assert (ratio - 1).abs().max().item() < 1e-2
    summary = trainer.run()
    assert summary["epochs"] == 1 and np.isfinite(trainer.global_step)


# ---------------------------------------------------------------------------------------- bad input


def test_frames_the_model_cannot_take_are_one_sentence(
    pipeline_dirs, policies, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pipe = policies["hunyuan_video15"].pipe
    with pytest.raises(
        UserError, match=r"cannot make a video of 6 frames: num_frames - 1 must be a multiple of 4 .*, e\.g\. 5 or 9"
    ):
        HunyuanVideo15Policy(pipe, **options(num_frames=6))
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="'num_frames' must be a positive integer"):
            HunyuanVideo15Policy(pipe, **options(num_frames=bad))
    with pytest.raises(UserError, match="'fps' must be a positive integer, got 0"):
        HunyuanVideo15Policy(pipe, **options(fps=0))
    with pytest.raises(UserError, match="'height' and 'width' go together"):
        HunyuanVideo15Policy(pipe, num_frames=FRAMES, height=HEIGHT)
    base = ["sample", "--model", str(pipeline_dirs["hunyuan_video15"]), "--prompt", "x", "--device", "cpu"]
    base += ["-o", str(tmp_path / "out"), "--height", str(HEIGHT), "--width", str(WIDTH)]
    capsys.readouterr()
    assert main([*base, "--option", "num_frames=6"]) == 2
    assert "cannot make a video of 6 frames" in dc.one_error_line(capsys, "sample")
    assert not (tmp_path / "out").exists()


def test_a_resolution_the_model_cannot_take_is_one_sentence(
    pipeline_dirs, policies, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(
        UserError, match=r"cannot take a 30x8 video: height must be a multiple of 4 and width of 4 pixels"
    ):
        HunyuanVideo15Policy(policies["hunyuan_video15"].pipe, **options(height=30))
    base = ["sample", "--model", str(pipeline_dirs["hunyuan_video15"]), "--prompt", "x", "--device", "cpu"]
    base += ["-o", str(tmp_path / "out"), f"--option=num_frames={FRAMES}"]
    capsys.readouterr()
    assert main([*base, "--height", "30", "--width", "16"]) == 2
    assert "cannot take a 30x16 video" in dc.one_error_line(capsys, "sample")
    assert not (tmp_path / "out").exists()


def test_a_guider_that_skips_steps_or_a_batched_decode_is_one_sentence(policies) -> None:
    pipe = th.BUILDERS["hunyuan_video15"]()
    with pytest.raises(UserError, match="'decode_batch' must be 1 for HunyuanVideo 1.5"):
        HunyuanVideo15Policy(pipe, **options(decode_batch=4))
    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, start=0.2)
    with pytest.raises(UserError, match="guides only between 0.2 and 1.0 of the steps"):
        HunyuanVideo15Policy(pipe, **options())


def test_models_listing_names_the_adapter() -> None:
    row = next(r for r in model_rows() if r["name"] == "hunyuan_video15")
    assert row["pipeline"] == "HunyuanVideo15Pipeline"
    assert row["default_model"] == "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v"
    assert "guider" in row["guidance"] and "shift" in row["time_grid"]
