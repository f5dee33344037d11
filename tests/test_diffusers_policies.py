"""The diffusers adapters on tiny pipelines saved to disk and loaded back through ``from_pretrained``.

Each test states the property it protects: parity with diffusers' own pipelines (ODE), the
pipelines' time grids against closed forms, train-inference consistency of every sampler,
CFG as the model defines it, prompt caching, and one clear error per bad input.
"""

from __future__ import annotations

import copy
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies.diffusers_base import detect_adapter
from precise_rl.policies.flux import Flux1Policy
from precise_rl.policies.flux2 import Flux2KleinPolicy
from precise_rl.policies.sd3 import SD3Policy
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices
from precise_rl.sde import SAMPLERS, shift_sigmas
from precise_rl.tasks.registry import build_task

from . import diffusers_checks as dc
from . import tiny_pipelines as tp

diffusers_logging.disable_progress_bar()

KINDS = ["flux2_klein", "sd3", "flux1"]
CLASSES = {"flux2_klein": Flux2KleinPolicy, "sd3": SD3Policy, "flux1": Flux1Policy}
STOCHASTIC = [s for s in SAMPLERS if s != "ode"]  # every sampler with a log-prob
HEIGHT, WIDTH = tp.HEIGHT, tp.WIDTH
options = tp.adapter_options


def pipeline_call_kwargs(kind: str, policy) -> dict:
    kw = {"height": HEIGHT, "width": WIDTH, "guidance_scale": policy.guidance_scale}
    kw["max_sequence_length"] = policy.max_sequence_length
    if kind == "flux2_klein":
        kw["text_encoder_out_layers"] = (1, 2, 3)
    return kw


pipeline_dirs, policies = dc.pipeline_fixtures("pipelines", tp.save_pipeline, KINDS, CLASSES.__getitem__, options)


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", KINDS)
def test_loading_freezes_everything_and_detects_the_adapter(kind: str, pipeline_dirs, policies) -> None:
    policy = policies[kind]
    assert detect_adapter(str(pipeline_dirs[kind])) == kind
    assert type(policy.pipe).__name__ == policy.pipeline_class
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(policy.pipe, name, None)
        if module is not None:
            assert not any(p.requires_grad for p in module.parameters()), name
    assert policy.latent_shape[1:] in {
        (HEIGHT // 4, WIDTH // 4),  # FLUX.2 Klein: 2x2 patches folded into channels
        (HEIGHT // 2, WIDTH // 2),  # SD3 and FLUX.1: the VAE's latent grid
    }
    names = policy.lora_target_modules()
    linear = {n for n, m in policy.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names and set(names) <= linear  # exact names of linear layers: peft cannot hit a ModuleList
    assert "transformer_blocks.0.attn.to_q" in names and not any("embed" in n for n in names)
    if kind == "flux2_klein":  # the reference's list: ``attn.to_out.0`` of the double-stream blocks only
        assert "transformer_blocks.0.attn.to_out.0" in names
        assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in names
        assert "single_transformer_blocks.0.attn.to_out" not in names


def test_lora_targets_option_takes_suffixes_and_globs(policies) -> None:
    pipe = policies["flux2_klein"].pipe
    chosen = Flux2KleinPolicy(pipe, **options("flux2_klein", lora_targets=["ff.linear_in", "single_*.to_qkv_mlp_proj"]))
    assert chosen.lora_target_modules() == [
        "transformer_blocks.0.ff.linear_in",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
    ]


def test_flux2_lora_targets_default_to_the_reference_list_and_presets_add_the_single_stream_output(policies) -> None:
    """The default is the reference recipe's 13 suffixes (Tencent-Hunyuan/Precise, precise_sde/train/adapters.py);
    the ``reference+single_out`` preset adds the single-stream blocks' ``attn.to_out`` (a Linear there, while in
    the double-stream blocks ``attn.to_out`` is a ModuleList whose ``[0]`` the reference list names)."""
    from precise_rl.policies.flux2 import LORA_TARGET_PRESETS, REFERENCE_LORA_TARGETS, SINGLE_STREAM_OUT_TARGET

    reference = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj", "attn.add_k_proj",
        "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out",
        "ff_context.linear_in", "ff_context.linear_out",
    )  # fmt: skip
    assert REFERENCE_LORA_TARGETS == reference == Flux2KleinPolicy.default_lora_suffixes
    pipe = policies["flux2_klein"].pipe
    default = policies["flux2_klein"].lora_target_modules()
    named = Flux2KleinPolicy(pipe, **options("flux2_klein", lora_targets="reference")).lora_target_modules()
    explicit = Flux2KleinPolicy(pipe, **options("flux2_klein", lora_targets=list(reference))).lora_target_modules()
    assert default == named == explicit
    wider = Flux2KleinPolicy(pipe, **options("flux2_klein", lora_targets="reference+single_out")).lora_target_modules()
    mixed = Flux2KleinPolicy(
        pipe, **options("flux2_klein", lora_targets=["reference", SINGLE_STREAM_OUT_TARGET])
    ).lora_target_modules()
    assert sorted(wider) == sorted(mixed) == sorted([*default, "single_transformer_blocks.0.attn.to_out"])
    assert LORA_TARGET_PRESETS["reference+single_out"][-1] == SINGLE_STREAM_OUT_TARGET


def test_registry_builds_each_adapter_and_the_auto_detecting_one(pipeline_dirs) -> None:
    for name in [*KINDS, "diffusers"]:
        for kind in KINDS if name == "diffusers" else [name]:
            cfg = config_from_dict(
                {"model": {"name": name, "path": str(pipeline_dirs[kind]), "options": options(kind)}}
            )
            task = build_task(cfg.model, "cpu")
            assert isinstance(task.policy, CLASSES[kind])
            assert task.train_prompts and task.eval_prompts
            assert not set(task.train_prompts) & set(task.eval_prompts)


# ---------------------------------------------------------------------------------------- time grids


def test_flux2_klein_grid_is_the_empirical_mu_shift(policies) -> None:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    policy = policies["flux2_klein"]
    for n in (1, 4, 20):
        mu = compute_empirical_mu(policy.image_seq_len, n)
        t = np.append(np.linspace(1.0, 1.0 / n, n), 0.0)
        expected = math.exp(mu) * t / (1 + (math.exp(mu) - 1) * t)
        np.testing.assert_allclose(policy.time_grid(n).numpy(), expected, rtol=0, atol=1e-6)


def test_flux1_grid_is_the_sequence_length_shift(policies) -> None:
    policy = policies["flux1"]
    cfg = policy.pipe.scheduler.config
    seq = policy.image_seq_len
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + slope * (seq - cfg.base_image_seq_len)
    for n in (2, 10):
        t = np.append(np.linspace(1.0, 1.0 / n, n), 0.0)
        expected = math.exp(mu) * t / (1 + (math.exp(mu) - 1) * t)
        np.testing.assert_allclose(policy.time_grid(n).numpy(), expected, rtol=0, atol=1e-6)


def test_sd3_grid_is_the_schedulers_default_static_shift(policies) -> None:
    # diffusers' default for SD3: linspace from 1 to the shifted smallest training sigma, shifted again.
    policy = policies["sd3"]
    a = policy.pipe.scheduler.config.shift
    sigma_min = a * 1e-3 / (1 + (a - 1) * 1e-3)
    for n in (3, 10):
        base = torch.tensor(np.linspace(1.0, sigma_min, n), dtype=torch.float64)
        expected = torch.cat([shift_sigmas(base, a), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(policy.time_grid(n), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- parity


#: (adapter, guidance_scale option, tiny-pipeline variant built in memory): with and without CFG, and
#: the guidance embedding present or not (FLUX.1 schnell has none; Klein's pipeline never feeds one)
PARITY = {
    "flux2_klein": ("flux2_klein", None, None),
    "flux2_klein-cfg4": ("flux2_klein", 4.0, None),
    "flux2_klein-guidance-embeds": ("flux2_klein", None, {"guidance_embeds": True}),
    "sd3-cfg4.5": ("sd3", None, None),
    "sd3-nocfg": ("sd3", 1.0, None),
    "sd3-no-t5": ("sd3", None, {"with_t5": False}),
    "sd3-dynamic-shift": ("sd3", None, {"dynamic_shift": True}),
    "flux1-dev": ("flux1", None, None),
    "flux1-schnell": ("flux1", None, {"guidance_embeds": False}),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_ode_rollout_reproduces_the_diffusers_pipeline(case: str, policies) -> None:
    """Same seed, steps and sigmas: our batched Euler rollout gives diffusers' images."""
    kind, guidance, variant = PARITY[case]
    policy = policies[kind]
    if guidance is not None or variant is not None:
        variant = dict(variant or {})
        dynamic = variant.pop("dynamic_shift", False)
        pipe = policy.pipe if not variant and not dynamic else tp.BUILDERS[kind](**variant)
        if dynamic:  # a resolution-dependent shift in SD3's pipeline (mu from the image token count)
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.register_modules(
                scheduler=FlowMatchEulerDiscreteScheduler(
                    use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.3, max_shift=1.4
                )
            )
        policy = CLASSES[kind](pipe, **options(kind, **({} if guidance is None else {"guidance_scale": guidance})))
    assert policy.do_cfg == (kind == "sd3" and guidance is None or kind == "flux2_klein" and guidance == 4.0)
    if case == "sd3-dynamic-shift":  # really another grid than the static shift's
        assert (policy.time_grid(4) - policies["sd3"].time_grid(4)).abs().max() > 1e-2
    prompts = ["a red fox", "two cats"]
    seed = int(torch.randint(0, 2**31, ()))
    ours, theirs = dc.ode_and_pipeline_images(policy, prompts, seed, 4, **pipeline_call_kwargs(kind, policy))
    assert ours.shape == theirs.shape == (2, 3, HEIGHT, WIDTH)
    assert ours.min() >= 0 and ours.max() <= 1
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two prompts (and noises) really differ


# ---------------------------------------------------------------------------------------- consistency


def _trainer(kind: str, path: Path, sampler: str, out: Path, **model_options) -> GRPOTrainer:
    cfg = config_from_dict(
        {
            "seed": int(torch.randint(0, 1000, ())),
            "model": {"name": kind, "path": str(path), "options": options(kind, **model_options)},
            "sampler": {"name": sampler, "num_steps": 4},
            "reward": {"weights": {"jpeg_compressibility": 1.0}},
            "train": {"groups_per_epoch": 2, "group_size": 2, "lora": {"enabled": True, "rank": 2, "alpha": 2}},
            "eval": {"every": 0},
            "logging": {"tensorboard": False, "progress": False},
        }
    )
    return GRPOTrainer(cfg, out)


@pytest.mark.parametrize("kind", KINDS)
def test_importance_ratio_is_one_for_every_sampler(kind: str, pipeline_dirs, tmp_path: Path) -> None:
    """The trainer's recompute (all (sample, step) pairs in one batch) reproduces the rollout's log-probs."""
    for sampler in STOCHASTIC:
        trainer = _trainer(kind, pipeline_dirs[kind], sampler, tmp_path / sampler)
        dc.perturb_lora_b(trainer)
        batch = trainer.collect(epoch=0)
        steps = train_step_indices(batch.kernel, 0.99)
        assert steps
        out, ratio, rows, idx = dc.recompute_ratio(trainer, batch, steps)
        assert torch.isfinite(ratio).all(), sampler
        assert (ratio - 1).abs().max().item() < 1e-5, (sampler, (ratio - 1).abs().max().item())
        torch.testing.assert_close(out.mean, batch.means[rows, idx], rtol=0, atol=1e-5)


def test_sd3_velocity_is_the_cfg_combination(pipeline_dirs) -> None:
    """With guidance w the velocity is v_u + w (v_c - v_u), each branch computed on its own here."""
    path = str(pipeline_dirs["sd3"])
    w = 1.0 + 6.0 * float(torch.rand(()))
    guided = SD3Policy.from_pretrained(path, **options("sd3", guidance_scale=w, negative_prompt="blurry"))
    plain = SD3Policy(copy.deepcopy(guided.pipe), **options("sd3", guidance_scale=1.0))
    x = torch.randn(3, *guided.latent_shape)
    t = torch.rand(3)
    prompts = ["a cat", "a dog", "a cat"]
    v = guided.velocity(x, t, guided.encode_prompts(prompts))
    v_c = plain.velocity(x, t, plain.encode_prompts(prompts))
    v_u = plain.velocity(x, t, plain.encode_prompts(["blurry"] * 3))
    torch.testing.assert_close(v, v_u + w * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert (v - v_c).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_prompts_are_encoded_once(kind: str, policies) -> None:
    """Each distinct prompt of a batch goes through the text encoders once; CFG's negative prompt once per policy."""
    policy = CLASSES[kind](policies[kind].pipe, **options(kind))  # a fresh policy: nothing cached yet
    seen, (cond, single) = dc.encode_with_spy(policy, ["b", "a", "b", "b", "a"], ["a"])
    assert seen == ([["b", "a"], [""], ["a"]] if policy.do_cfg else [["b", "a"], ["a"]])
    for k, v in cond.items():
        assert v.shape[0] == 5
        torch.testing.assert_close(v[1], single[k][0])
        torch.testing.assert_close(v[4], single[k][0])
        torch.testing.assert_close(v[0], v[3])
    assert (cond["prompt_embeds"][0] - cond["prompt_embeds"][1]).abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_is_one_pass_or_two_as_the_model_defines_it(kind: str, policies) -> None:
    """FLUX.2 Klein base: no CFG (one pass); SD3.5: CFG (negative and positive rows in one pass of 2B);
    FLUX.1: its guidance embedding (one pass, the scale fed to the transformer)."""
    policy = policies[kind]
    calls: list[tuple[int, torch.Tensor | None]] = []

    def hook(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs.get("guidance")))

    cond = policy.encode_prompts(["a cat", "a dog", "a cat"])
    assert any(k.startswith("negative_") for k in cond) == (kind == "sd3")
    handle = policy.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        policy.velocity(torch.randn(3, *policy.latent_shape), torch.rand(3), cond)
    finally:
        handle.remove()
    assert [n for n, _ in calls] == [6 if kind == "sd3" else 3]
    guidance = calls[0][1]
    if kind == "flux1":
        torch.testing.assert_close(guidance, torch.full((3,), 3.5))
    else:
        assert guidance is None


@pytest.mark.parametrize("kind", KINDS)
def test_batched_velocity_equals_row_by_row(kind: str, policies) -> None:
    """A whole group in one forward gives each row's own velocity (padding, packing and CFG are per row)."""
    policy = policies[kind]
    prompts = ["a red fox", "two cats", "a red fox", "x"]
    batched = dc.check_batched_velocity_is_row_by_row(policy, prompts)
    assert (batched[0] - batched[2]).abs().max() > 1e-4  # same prompt, other x and t


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_gives_the_same_gradients(kind: str, pipeline_dirs) -> None:
    """Checkpointed blocks recompute in backward: a weight inside a block gets the gradient it gets without."""
    path = str(pipeline_dirs[kind])
    grads = []
    shape = CLASSES[kind].from_pretrained(path, **options(kind)).latent_shape
    x = torch.randn(2, *shape)
    t = torch.rand(2)
    for ckpt in (False, True):
        policy = CLASSES[kind].from_pretrained(path, **options(kind, gradient_checkpointing=ckpt))
        assert policy.transformer.is_gradient_checkpointing == ckpt
        cond = policy.encode_prompts(["a", "b"])
        policy.transformer.train()
        w = policy.transformer.get_submodule("transformer_blocks.0.attn.to_q").weight.requires_grad_(True)
        policy.velocity(x, t, cond).square().mean().backward()
        assert w.grad is not None
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().max() > 0


# ---------------------------------------------------------------------------------------- errors


def test_bad_model_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Flux2KleinPolicy.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model_index.json"):
        SD3Policy.from_pretrained(str(tmp_path / "empty"))


def test_unreachable_hub_model_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not read model_index.json of hub model 'nobody/no-such-model'"):
        Flux1Policy.from_pretrained("nobody/no-such-model", revision="0123abc")


def test_hub_revision_reaches_every_download_and_an_unpinned_one_is_noted(
    pipeline_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id loads at ``revision`` (model_index.json and the pipeline alike); without a commit hash a
    warning names the commit the hub resolved to, once per model."""
    import diffusers
    import huggingface_hub

    from precise_rl.policies import loading

    commit = "".join(np.random.default_rng().choice(list("0123456789abcdef"), 40))
    snapshot = tmp_path / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text((pipeline_dirs["flux1"] / "model_index.json").read_text())
    asked: list[tuple[str, str, str | None]] = []

    def download(repo_id, filename, revision=None, **kw):
        asked.append(("index", repo_id, revision))
        return str(snapshot / filename)

    original = diffusers.FluxPipeline.from_pretrained

    def load(path, revision=None, **kw):
        asked.append(("pipeline", path, revision))
        return original(str(pipeline_dirs["flux1"]), **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", load)
    monkeypatch.setattr(loading, "_unpinned_noted", set())
    with pytest.warns(UserWarning, match=f"'someone/flux' is not pinned .* resolved to commit {commit}"):
        Flux1Policy.from_pretrained("someone/flux", **options("flux1"))
    assert asked == [("index", "someone/flux", None), ("pipeline", "someone/flux", None)]
    asked.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy = Flux1Policy.from_pretrained("someone/flux", revision=commit, **options("flux1"))
        Flux1Policy.from_pretrained("someone/flux", **options("flux1"))  # noted once already
    assert asked == [("index", "someone/flux", commit), ("pipeline", "someone/flux", commit)] + [
        ("index", "someone/flux", None),
        ("pipeline", "someone/flux", None),
    ]
    assert isinstance(policy, Flux1Policy)


def test_unsupported_pipeline_class_is_a_user_error(tmp_path: Path) -> None:
    path = tp.save_pipeline("sd3", tmp_path / "p")
    with pytest.raises(UserError, match=r"is a StableDiffusion3Pipeline but .*\(use model name 'sd3'\)"):
        Flux2KleinPolicy.from_pretrained(str(path))
    tp.set_pipeline_class(path, "StableDiffusionXLPipeline")
    with pytest.raises(UserError, match="pipeline class 'StableDiffusionXLPipeline' .* not supported"):
        detect_adapter(str(path))
    cfg = config_from_dict({"model": {"name": "diffusers", "path": str(path)}})
    with pytest.raises(UserError, match="Flux2KleinPipeline"):
        build_task(cfg.model, "cpu")


@pytest.mark.parametrize("kind", KINDS)
def test_resolution_the_model_cannot_take_is_a_user_error(kind: str, policies) -> None:
    pipe = policies[kind].pipe
    cls = CLASSES[kind]
    multiple = {"flux2_klein": 4, "sd3": 4, "flux1": 4}[kind]  # VAE factor 2 x patch 2
    with pytest.raises(UserError, match=f"cannot take a 30x16 image: .* multiples of {multiple} pixels"):
        cls(pipe, **options(kind, height=30, width=16))
    with pytest.raises(UserError, match="positive integer"):
        cls(pipe, **options(kind, height=0))
    side = 4096 + multiple * random.Random(os.urandom(8)).randint(1, 10**6)  # a multiple the model could take
    with pytest.raises(UserError, match=f"'width' is {side} pixels, more than the limit of 4096 pixels"):
        cls(pipe, **options(kind, height=16, width=side))
    if kind == "sd3":  # position embedding of 16 patches x 2 x VAE factor 2
        with pytest.raises(UserError, match="at most 64 pixels"):
            cls(pipe, **options(kind, height=128, width=64))


def test_bad_model_options_are_user_errors(pipeline_dirs) -> None:
    cfg = config_from_dict(
        {"model": {"name": "sd3", "path": str(pipeline_dirs["sd3"]), "options": {"no_such_option": 1}}}
    )
    with pytest.raises(UserError, match="model.options"):
        build_task(cfg.model, "cpu")
    pipe = copy.deepcopy(
        Flux2KleinPolicy.from_pretrained(str(pipeline_dirs["flux2_klein"]), **options("flux2_klein")).pipe
    )
    with pytest.raises(UserError, match="text_encoder_out_layers"):
        Flux2KleinPolicy(pipe, **options("flux2_klein", text_encoder_out_layers=[9, 18, 27]))
    with pytest.raises(UserError, match="lora_targets"):
        Flux2KleinPolicy(pipe, **options("flux2_klein", lora_targets=["no_such_layer"]))
    pipe.register_to_config(is_distilled=True)
    with pytest.raises(UserError, match="step-distilled"):
        Flux2KleinPolicy(pipe, **options("flux2_klein", guidance_scale=4.0))
