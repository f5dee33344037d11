"""The Wan adapter on tiny pipelines (Wan2.1, Wan2.2 TI2V-5B, the two-expert Wan2.2 A14B) saved to disk and loaded
back through ``from_pretrained``.

The ODE rollout gives the diffusers pipeline's own frames for the same seed and steps (with and without
guidance; the pipeline run with a FlowMatchEulerDiscreteScheduler of its shift, as our samplers are our
own); A14B's steps on each side of the boundary run the expert the pipeline runs, with its guidance
scale; the time grid and timesteps are those of the checkpoints' UniPC scheduler; text is encoded once
per distinct prompt and padded as the pipeline pads; bad frame counts and sizes are one sentence.
Training is ``test_wan_training.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.policies.diffusers_base import detect_adapter
from precise_rl.policies.wan import WAN_NEGATIVE_PROMPT, WanExperts, WanPolicy
from precise_rl.sde import rollout

from . import diffusers_checks as dc
from . import tiny_video_pipelines as tv

diffusers_logging.disable_progress_bar()

KINDS = ["wan21", "wan22_5b", "wan22_a14b"]


def options(kind: str, **extra) -> dict:
    return tv.adapter_options(kind, **extra)


pipeline_dirs, policies = dc.pipeline_fixtures("wan_pipelines", tv.save_pipeline, KINDS, lambda k: WanPolicy, options)


def _euler_policy(policy: WanPolicy, kind: str, **extra) -> WanPolicy:
    """The adapter over the same modules with the FlowMatchEuler scheduler of the pipeline's shift."""
    return WanPolicy(tv.euler_twin(policy.pipe), **options(kind, **extra))


def _pipeline_frames(policy: WanPolicy, prompts: list[str], seed: int, steps: int, **kw) -> torch.Tensor:
    return policy.pipe(
        prompt=prompts,
        negative_prompt=policy.negative_prompt,
        num_frames=policy.num_frames,
        height=policy.height,
        width=policy.width,
        num_inference_steps=steps,
        guidance_scale=policy.guidance_scale,
        max_sequence_length=policy.max_sequence_length,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kw,
    ).frames


def _ode_frames(policy: WanPolicy, prompts: list[str], seed: int, steps: int) -> torch.Tensor:
    x1 = policy.sample_noise(len(prompts), generator=torch.Generator().manual_seed(seed))
    traj = rollout(policy.velocity, x1, policy.time_grid(steps), "ode", cond=policy.encode_prompts(prompts))
    return policy.decode(traj.sample)


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", KINDS)
def test_model_index_picks_the_wan_adapter_and_loading_freezes_everything(kind: str, pipeline_dirs, policies) -> None:
    assert detect_adapter(str(pipeline_dirs[kind])) == "wan"
    policy = policies[kind]
    assert not any(p.requires_grad for p in policy.transformer.parameters())
    assert not any(p.requires_grad for p in policy.pipe.text_encoder.parameters())
    assert policy.latent_shape == (
        4,
        3,
        *(s // (4 if kind == "wan22_5b" else 2) for s in (policy.height, policy.width)),
    )
    assert isinstance(policy.transformer, WanExperts) == (kind == "wan22_a14b")
    assert policy.negative_prompt == WAN_NEGATIVE_PROMPT and policy.fps == 16


# ---------------------------------------------------------------------------------------- parity

#: case -> (tiny pipeline, model options); each compared with the pipeline called with the same scales
PARITY = {
    "wan21_cfg": ("wan21", {}),
    "wan21_no_cfg": ("wan21", {"guidance_scale": 1.0}),
    "wan22_5b_cfg": ("wan22_5b", {}),
    "wan22_a14b_two_scales": ("wan22_a14b", {"guidance_scale": 4.0, "guidance_scale_2": 2.5}),
    "wan22_a14b_no_cfg": ("wan22_a14b", {"guidance_scale": 1.0}),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_ode_rollout_reproduces_the_diffusers_pipeline(case: str, policies) -> None:
    """Same seed, steps and sigmas: our Euler rollout decoded gives the pipeline's frames ``(B, F, C, H, W)``."""
    kind, extra = PARITY[case]
    policy = _euler_policy(policies[kind], kind, **extra)
    prompts = ["a red fox", "two cats"]
    seed = int(torch.randint(0, 2**31, ()))
    ours = _ode_frames(policy, prompts, seed, 4)
    kw = {"guidance_scale_2": extra["guidance_scale_2"]} if "guidance_scale_2" in extra else {}
    theirs = _pipeline_frames(policy, prompts, seed, 4, **kw)
    assert ours.shape == theirs.shape == (2, tv.FRAMES, 3, policy.height, policy.width)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two prompts (and noises) really differ
    assert (ours[0, 0] - ours[0, -1]).abs().max() > 1e-3  # and the frames differ in time


@contextlib.contextmanager
def _recording(pipe) -> Iterator[list]:
    """Inside it, each call of the pipeline's transformers appends ``(expert, timesteps)`` to the list yielded."""
    calls: list = []
    handles = []
    for expert, module in (("high", pipe.transformer), ("low", pipe.transformer_2)):

        def hook(mod, args, kwargs, expert=expert):
            calls.append((expert, kwargs["timestep"].detach().float().clone()))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def test_a14b_steps_on_each_side_of_the_boundary_run_the_pipelines_expert(policies) -> None:
    """A grid crossing ``boundary_ratio * 1000``: each step of our rollout calls the expert the pipeline calls at
    it, with the same timestep, and both experts are used."""
    policy = _euler_policy(policies["wan22_a14b"], "wan22_a14b", guidance_scale=1.0)
    steps, seed = 5, int(torch.randint(0, 2**31, ()))
    grid = policy.time_grid(steps)
    with _recording(policy.pipe) as ours:
        _ode_frames(policy, ["a red fox"], seed, steps)
    with _recording(policy.pipe) as theirs:
        _pipeline_frames(policy, ["a red fox"], seed, steps)
    expected = ["high" if float(s) * 1000 >= 875 else "low" for s in grid[:-1].float()]
    assert "high" in expected and "low" in expected
    assert [e for e, _ in ours] == [e for e, _ in theirs] == expected
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)


def test_a14b_rows_at_different_steps_use_their_own_expert_and_scale(policies) -> None:
    """One batch with rows on both sides of the boundary: each row's velocity is its expert's guided prediction,
    computed here from the diffusers transformers directly (``guidance_scale`` high, ``guidance_scale_2`` low)."""
    policy = WanPolicy(policies["wan22_a14b"].pipe, **options("wan22_a14b", guidance_scale=4.0, guidance_scale_2=2.0))
    prompts = ["a red fox", "two cats", "a boat", "a red fox"]
    t = torch.tensor([0.95, 0.4, 0.875, 0.874])  # UniPC truncates 1000 t (float32): 949, 400, 875 (high), 873 (low)
    x = torch.randn(len(prompts), *policy.latent_shape)
    cond = policy.encode_prompts(prompts)
    v = policy.velocity(x, t, cond)
    assert policy.experts_for(t) == ["high", "low", "high", "low"]
    pipe = policy.pipe
    pos, neg = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, max_sequence_length=16, negative_prompt=[policy.negative_prompt] * 4
    )
    for i, (model, scale) in enumerate(
        [(pipe.transformer, 4.0), (pipe.transformer_2, 2.0), (pipe.transformer, 4.0), (pipe.transformer_2, 2.0)]
    ):
        ts = torch.tensor([int(t[i].double() * 1000)])
        with torch.no_grad():
            c = model(hidden_states=x[i : i + 1], timestep=ts, encoder_hidden_states=pos[i : i + 1], return_dict=False)[
                0
            ]
            u = model(hidden_states=x[i : i + 1], timestep=ts, encoder_hidden_states=neg[i : i + 1], return_dict=False)[
                0
            ]
        torch.testing.assert_close(v[i : i + 1], u + scale * (c - u), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["wan21", "wan22_5b"])
def test_time_grid_and_timesteps_are_the_unipc_schedulers(kind: str, policies) -> None:
    """The checkpoints' UniPC scheduler: the grid is its sigmas for N steps (flow shift included, then 0) and the
    transformer gets its int64 timesteps."""
    policy = policies[kind]
    for steps in (3, 10, 20, 50):
        sched = UniPCMultistepScheduler.from_config(policy.pipe.scheduler.config)
        sched.set_timesteps(steps)
        grid = policy.time_grid(steps)
        torch.testing.assert_close(grid, sched.sigmas.double(), rtol=0, atol=0)
        assert torch.equal(policy.timesteps(grid[:-1].float()), sched.timesteps.float())
    shift = policy.pipe.scheduler.config.flow_shift
    s = torch.linspace(1, 1 / 1000, 11, dtype=torch.float64)[:-1]
    torch.testing.assert_close(policy.time_grid(10)[1:-1], (shift * s / (1 + (shift - 1) * s))[1:], rtol=1e-6, atol=0)


def test_5b_gets_one_timestep_per_latent_token(policies) -> None:
    policy = policies["wan22_5b"]
    seen = []
    handle = policy.pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True
    )
    try:
        policy.velocity(
            torch.randn(2, *policy.latent_shape), torch.tensor([0.75, 0.25]), policy.encode_prompts(["a", "b"])
        )
    finally:
        handle.remove()
    c, f, h, w = policy.latent_shape
    (ts,) = seen
    assert ts.shape == (4, f * (h // 2) * (w // 2))  # 2 rows and their unconditional twins
    assert torch.equal(ts[:, 0], torch.tensor([750.0, 250.0, 750.0, 250.0])) and (ts == ts[:, :1]).all()


# ---------------------------------------------------------------------------------------- text and batching


@pytest.mark.parametrize("kind", ["wan21", "wan22_a14b"])
def test_repeated_prompts_are_encoded_once_and_padded_as_the_pipeline_pads(kind: str, policies) -> None:
    policy = WanPolicy(policies[kind].pipe, **options(kind))  # a fresh policy: nothing cached yet
    seen, (cond, _) = dc.encode_with_spy(policy, ["b", "a", "b", "b", "a"], ["a"])
    assert seen == [["b", "a"], [policy.negative_prompt], ["a"]]
    pe = cond["prompt_embeds"]
    assert pe.shape[:2] == (5, 16) and torch.equal(pe[0], pe[3]) and torch.equal(pe[1], pe[4])
    ref, _ = policy.pipe.encode_prompt(["b", "a"], do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(pe[:2], ref, rtol=0, atol=0)
    assert (pe[1, 2:] == 0).all() and (pe[1, :2] != 0).any()  # "a" and its end token, then zeros


@pytest.mark.parametrize("kind", KINDS)
def test_batched_velocity_equals_row_by_row(kind: str, policies) -> None:
    """A group in one forward gives each row's own velocity (A14B: rows at random t use either expert)."""
    policy = policies[kind]
    batched = dc.check_batched_velocity_is_row_by_row(policy, ["a red fox", "two cats on a mat", "a red fox", "x"])
    assert (batched[0] - batched[2]).abs().max() > 1e-4


def test_decoding_in_chunks_gives_the_whole_batchs_videos(policies) -> None:
    policy = policies["wan21"]
    z = torch.randn(3, *policy.latent_shape)
    one = WanPolicy(policy.pipe, **options("wan21", decode_batch=1)).decode(z)
    all_ = WanPolicy(policy.pipe, **options("wan21", decode_batch=3)).decode(z)
    assert one.shape == (3, tv.FRAMES, 3, tv.HEIGHT, tv.WIDTH) and 0 <= one.min() and one.max() <= 1
    torch.testing.assert_close(one, all_, rtol=0, atol=1e-5)  # batched convolutions: float32 rounding


def test_vae_tiling_is_turned_on_by_its_option() -> None:
    pipe = tv.wan_pipeline("wan21")
    assert not pipe.vae.use_tiling
    WanPolicy(pipe, **options("wan21", vae_tiling=True))
    assert pipe.vae.use_tiling


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"num_frames": 6},
            r"cannot make a video of 6 frames: num_frames - 1 must be a multiple of 2 .* e\.g\. 5 or 7",
        ),
        ({"num_frames": 0}, r"'num_frames' must be a positive integer"),
        ({"height": 24}, r"cannot take a 24x32 video: height must be a multiple of 16 and width of 16 pixels"),
        ({"fps": 0}, r"'fps' must be a positive integer"),
        ({"guidance_scale_2": 3.0}, r"'guidance_scale_2' is for a two-expert Wan2.2"),
        ({"train_experts": ["low"]}, r"'train_experts' is for a two-expert Wan2.2"),
    ],
)
def test_bad_wan21_options_are_one_sentence(extra: dict, message: str, policies) -> None:
    with pytest.raises(UserError, match=message):
        WanPolicy(policies["wan21"].pipe, **options("wan21", **extra))


def test_frames_beyond_the_transformers_position_table_are_refused_and_the_most_it_takes_runs(policies) -> None:
    """The rotary table covers ``rope_max_seq_len`` latent frames: the most frames allowed give a velocity, one
    latent frame more is one sentence at construction (it used to be a reshape error inside the transformer)."""
    pipe = policies["wan21"].pipe
    cfg = pipe.transformer.config
    t = int(pipe.vae_scale_factor_temporal)
    most = (int(cfg.rope_max_seq_len) * int(cfg.patch_size[0]) - 1) * t + 1
    policy = WanPolicy(pipe, **options("wan21", num_frames=most))
    x = policy.sample_noise(1, torch.Generator().manual_seed(0))
    v = policy.velocity(x, torch.full((1,), 0.5), policy.encode_prompts(["a fox"]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    with pytest.raises(UserError, match=f"cannot make a video of {most + t} frames: .* at most {most} frames"):
        WanPolicy(pipe, **options("wan21", num_frames=most + t))
    with pytest.raises(UserError, match="'num_frames' of .* is 100001 frames, more than the limit of 1025 frames"):
        WanPolicy(pipe, **options("wan21", num_frames=100001))
    with pytest.raises(UserError, match="'height' of .* is 8192 pixels, more than the limit of 4096 pixels"):
        WanPolicy(pipe, **options("wan21", height=8192))


@pytest.mark.parametrize("experts", [[], ["mid"], "low", ["low", "low"]])
def test_bad_train_experts_are_one_sentence(experts, policies) -> None:
    with pytest.raises(UserError, match=r"'train_experts' must list some of \['high', 'low'\]"):
        WanPolicy(policies["wan22_a14b"].pipe, **options("wan22_a14b", train_experts=experts))


def test_5b_size_is_a_multiple_of_its_vae_times_its_patch(policies) -> None:
    with pytest.raises(UserError, match=r"cannot take a 16x24 video: height must be a multiple of 16 and width of 16"):
        WanPolicy(policies["wan22_5b"].pipe, **options("wan22_5b", height=16, width=24))


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--option=num_frames=4"], "cannot make a video of 4 frames"),
        (["--height", "20", "--width", "32"], "cannot take a 20x32 video"),
    ],
)
def test_sample_ends_bad_video_options_in_one_sentence_and_exit_code_2(
    flags: list[str], said: str, pipeline_dirs, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["sample", "--model", str(pipeline_dirs["wan21"]), "--prompt", "x", "--device", "cpu"]
    base += ["-o", str(tmp_path / "out"), "--option=max_sequence_length=16"]
    capsys.readouterr()
    assert main([*base, *flags]) == 2
    assert said in dc.one_error_line(capsys, "sample")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- memory options


def test_memory_options_give_the_same_videos_and_free_the_text_encoder(pipeline_dirs) -> None:
    """Offloaded text encoder and VAE, cached prompts and a freed text encoder: the same conditioning and frames,
    bit for bit, as the default options; a prompt not precomputed is then one sentence."""
    path = str(pipeline_dirs["wan22_a14b"])
    plain = WanPolicy.from_pretrained(path, **options("wan22_a14b"))
    lean = WanPolicy.from_pretrained(
        path,
        **options("wan22_a14b", offload_text_encoders=True, offload_vae=True, cache_prompts=True),
        free_text_encoders=True,
    )
    prompts = ["a red fox", "two cats", "a red fox"]
    lean.precompute_prompts(["two cats", "a red fox"])
    assert lean.pipe.text_encoder is None
    a, b = plain.encode_prompts(prompts), lean.encode_prompts(prompts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seed = int(torch.randint(0, 2**31, ()))
    assert torch.equal(_ode_frames(plain, prompts, seed, 3), _ode_frames(lean, prompts, seed, 3))
    with pytest.raises(UserError, match="was not precomputed before the text encoders were freed"):
        lean.encode_prompts(["a boat"])
