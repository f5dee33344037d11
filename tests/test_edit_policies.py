"""The instruction-editing adapters on tiny pipelines: parity with diffusers' own editing pipelines (ODE, with
source images of several sizes in one batch), the source image's resize, train-inference consistency of every
sampler, encoding each distinct instruction and image once, the source image in the rewards' metadata, and one
clear error per bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies.diffusers_base import detect_adapter
from precise_rl.policies.edit import EditPrompt, source_image
from precise_rl.policies.flux import Flux1Policy
from precise_rl.policies.flux_kontext import FluxKontextPolicy
from precise_rl.policies.qwen_image_edit import QwenImageEditPlusPolicy
from precise_rl.rewards.base import register_reward
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices
from precise_rl.sde import SAMPLERS, rollout
from precise_rl.tasks.registry import build_task, read_prompt_file

from . import diffusers_checks as dc
from . import tiny_edit_pipelines as te
from . import tiny_pipelines as tp

diffusers_logging.disable_progress_bar()

KINDS = ["flux1_kontext", "qwen_image_edit"]
CLASSES = {"flux1_kontext": FluxKontextPolicy, "qwen_image_edit": QwenImageEditPlusPolicy}
STOCHASTIC = [s for s in SAMPLERS if s != "ode"]
HEIGHT, WIDTH = te.HEIGHT, te.WIDTH
options = te.adapter_options
#: source images of three sizes (one the output's, one transposed, one square): one batch, three token grids
SOURCES = [("make it red", (32, 16)), ("make it blue", (16, 32)), ("make it red", (24, 24))]


@pytest.fixture(scope="module", autouse=True)
def _qwen_processor_loads():
    with te.processor_without_video():
        yield


@pytest.fixture
def qwen_pipeline_areas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny tests' source areas in diffusers' Qwen-Image-Edit pipeline module (the adapter takes them as
    model options; the pipeline reads them from its module)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    monkeypatch.setattr(module, "CONDITION_IMAGE_SIZE", te.QWEN_EDIT_AREAS["condition_area"])
    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", te.QWEN_EDIT_AREAS["vae_area"])


pipeline_dirs, policies = dc.pipeline_fixtures("edit_pipelines", te.save_pipeline, KINDS, CLASSES.__getitem__, options)


@pytest.fixture(scope="module")
def edit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return te.write_edit_prompts(tmp_path_factory.mktemp("edits"), SOURCES)


@pytest.fixture(scope="module")
def prompts(edit_file: Path) -> list[EditPrompt]:
    return read_prompt_file(edit_file)


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", KINDS)
def test_loading_detects_the_adapter_and_builds_the_task(kind: str, pipeline_dirs) -> None:
    assert detect_adapter(str(pipeline_dirs[kind])) == kind
    for name in (kind, "diffusers"):
        cfg = config_from_dict({"model": {"name": name, "path": str(pipeline_dirs[kind]), "options": options(kind)}})
        task = build_task(cfg.model, "cpu")
        assert isinstance(task.policy, CLASSES[kind])
        # the built-in prompts of an editing model: drawn scenes with an edit each
        assert all(isinstance(p, EditPrompt) for p in [*task.train_prompts, *task.eval_prompts])
    policy = task.policy
    assert not any(p.requires_grad for p in policy.pipe.vae.parameters())
    names = policy.lora_target_modules()
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.attn.add_k_proj" in names
    assert ("single_transformer_blocks.0.attn.to_q" in names) == (kind == "flux1_kontext")
    assert ("transformer_blocks.0.img_mlp.net.2" in names) == (kind == "qwen_image_edit")


# ---------------------------------------------------------------------------------------- parity

#: (adapter, model options, pipeline variant): FLUX.1 Kontext dev (guidance embedding), with true CFG against a
#: negative prompt, and without a guidance embedding; Qwen-Image-Edit with its true CFG (4 against " "), without,
#: and a 2511-style transformer (``zero_cond_t``: the source tokens at timestep 0)
PARITY = {
    "flux1_kontext": ("flux1_kontext", {}, None),
    "flux1_kontext-true-cfg": ("flux1_kontext", {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}, None),
    "flux1_kontext-no-guidance-embeds": ("flux1_kontext", {}, {"guidance_embeds": False}),
    "qwen_image_edit-cfg4": ("qwen_image_edit", {}, None),
    "qwen_image_edit-nocfg": ("qwen_image_edit", {"guidance_scale": 1.0}, None),
    "qwen_image_edit-2511-zero-cond-t": ("qwen_image_edit", {"negative_prompt": "blurry"}, {"zero_cond_t": True}),
}


def _pipeline_edit(kind: str, policy, prompt: EditPrompt, seed: int, steps: int) -> torch.Tensor:
    """One edit by diffusers' own pipeline (which takes one source image per call)."""
    kw: dict = {"height": HEIGHT, "width": WIDTH}
    if kind == "flux1_kontext":
        kw.update(max_area=HEIGHT * WIDTH, _auto_resize=policy.auto_resize, guidance_scale=policy.guidance_scale)
        kw.update(max_sequence_length=policy.max_sequence_length)
        if policy.do_cfg:
            kw.update(true_cfg_scale=policy.true_cfg_scale, negative_prompt=policy.negative_prompt)
    else:  # Qwen-Image-Edit: guidance_scale is its true CFG weight
        kw.update(
            true_cfg_scale=policy.guidance_scale, negative_prompt=policy.negative_prompt if policy.do_cfg else None
        )
    return policy.pipe(
        image=source_image(prompt),
        prompt=str(prompt),
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kw,
    ).images


@pytest.mark.parametrize("case", list(PARITY))
def test_ode_rollout_reproduces_the_diffusers_editing_pipeline(
    case: str, policies, prompts, qwen_pipeline_areas
) -> None:
    """Same seed, steps and source image: our batched Euler rollout (three source sizes in one batch) gives
    diffusers' edits, each made by the pipeline alone."""
    kind, opts, variant = PARITY[case]
    pipe = policies[kind].pipe if variant is None else te.BUILDERS[kind](**variant)
    policy = CLASSES[kind](pipe, **options(kind, **opts))
    assert policy.do_cfg == ("true_cfg_scale" in opts or kind == "qwen_image_edit" and "guidance_scale" not in opts)
    seed, steps = int(torch.randint(0, 2**31 - 8, ())), 3
    x1 = torch.cat([policy.sample_noise(1, generator=torch.Generator().manual_seed(seed + i)) for i in range(3)])
    traj = rollout(policy.velocity, x1, policy.time_grid(steps), "ode", cond=policy.encode_prompts(prompts))
    ours = policy.decode(traj.sample)
    assert ours.shape == (3, 3, HEIGHT, WIDTH)
    for i, prompt in enumerate(prompts):
        theirs = _pipeline_edit(kind, policy, prompt, seed + i, steps)
        torch.testing.assert_close(ours[i : i + 1], theirs.float(), rtol=0, atol=1e-5)
    # the source image conditions the edit: the same instruction and noise on another image gives another image
    other = EditPrompt(str(prompts[0]), prompts[1].image)
    again = rollout(policy.velocity, x1[:1], policy.time_grid(steps), "ode", cond=policy.encode_prompts([other]))
    assert (again.sample[0] - traj.sample[0]).abs().max() > 1e-4  # far above float rounding (~1e-7)


def test_kontext_source_size_is_the_pipelines_resize(policies) -> None:
    """With ``auto_resize`` the source goes to the preferred Kontext resolution of the nearest aspect ratio,
    without it keeps its size floored to the packing multiple: each as the pipeline resizes it (read off the
    pipeline's own call, stopped before any denoising)."""
    pipe = policies["flux1_kontext"].pipe

    class Seen(Exception):
        pass

    def pipeline_size(image, auto: bool) -> tuple[int, ...]:
        seen: list[tuple[int, ...]] = []

        def capture(image, *args, **kw):
            seen.append(tuple(image.shape[-2:]))
            raise Seen

        pipe.prepare_latents = capture
        try:
            with pytest.raises(Seen):
                pipe(image=image, prompt="x", height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH, _auto_resize=auto)
        finally:
            del pipe.prepare_latents
        return seen[0]

    for h, w in ((300, 150), (101, 130), (64, 64)):
        image = te.source_image(h, w, seed=h)
        for auto in (True, False):
            policy = FluxKontextPolicy(pipe, **options("flux1_kontext", auto_resize=auto))
            assert policy.source_size(image) == pipeline_size(image, auto), (h, w, auto)
    assert FluxKontextPolicy(pipe, **options("flux1_kontext", auto_resize=True)).source_size(image) == (1024, 1024)


def test_qwen_source_sizes_are_the_pipelines_resizes(policies, qwen_pipeline_areas) -> None:
    """The condition image (text encoder) and the VAE image take the pipeline's sizes for each aspect ratio, read
    off the pipeline's own call (stopped before any denoising)."""
    pipe = policies["qwen_image_edit"].pipe

    class Seen(Exception):
        pass

    for h, w in ((32, 16), (20, 50), (40, 40)):
        image = te.source_image(h, w, seed=h)
        seen: dict[str, tuple[int, int]] = {}
        original = pipe.encode_prompt

        def encode(image, _seen=seen, _original=original, **kw):
            _seen["condition"] = (image[0].height, image[0].width)
            return _original(image=image, **kw)

        def latents(images, *args, _seen=seen, **kw):
            _seen["vae"] = tuple(images[0].shape[-2:])
            raise Seen

        pipe.encode_prompt, pipe.prepare_latents = encode, latents
        try:
            with pytest.raises(Seen):
                pipe(image=image, prompt="x", height=HEIGHT, width=WIDTH, true_cfg_scale=1.0)
        finally:
            del pipe.encode_prompt, pipe.prepare_latents
        assert policies["qwen_image_edit"].source_sizes(image) == (seen["condition"], seen["vae"]), (h, w)


@pytest.mark.parametrize("kind", KINDS)
def test_time_grid_is_the_pipelines_on_the_output_tokens(kind: str, policies, prompts, qwen_pipeline_areas) -> None:
    """The sigmas are those the pipeline's scheduler steps through (its shift from the output tokens alone,
    not the source's), read off the pipeline after a call."""
    policy = policies[kind]
    for n in (2, 5):
        _pipeline_edit(kind, policy, prompts[2], seed=0, steps=n)
        torch.testing.assert_close(policy.time_grid(n), policy.pipe.scheduler.sigmas.double(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- consistency


def _trainer(kind: str, path: Path, edit_file: Path, sampler: str, out: Path, rewards: dict | None = None, **opts):
    cfg = config_from_dict(
        {
            "seed": int(torch.randint(0, 1000, ())),
            "model": {"name": kind, "path": str(path), "options": options(kind, **opts)},
            "prompts": {"train": str(edit_file), "eval": str(edit_file)},
            "sampler": {"name": sampler, "num_steps": 3},
            "reward": {"weights": rewards or {"jpeg_compressibility": 1.0}},
            "train": {"groups_per_epoch": 2, "group_size": 2, "lora": {"enabled": True, "rank": 2, "alpha": 2}},
            "eval": {"every": 0},
            "logging": {"tensorboard": False, "progress": False},
        }
    )
    return GRPOTrainer(cfg, out)


@pytest.mark.parametrize("kind", KINDS)
def test_importance_ratio_is_one_for_every_sampler(kind: str, pipeline_dirs, edit_file, tmp_path: Path) -> None:
    """The trainer's recompute (all (sample, step) pairs, mixed source sizes, in one batch) reproduces the
    rollout's log-probs; with true CFG too."""
    for k, sampler in enumerate(STOCHASTIC):
        # CFG (two branches in one pass) with the first sampler, one branch with the others
        if kind == "flux1_kontext":
            extra = {"true_cfg_scale": 2.0} if k == 0 else {}
        else:
            extra = {} if k == 0 else {"guidance_scale": 1.0}
        trainer = _trainer(kind, pipeline_dirs[kind], edit_file, sampler, tmp_path / sampler, **extra)
        dc.perturb_lora_b(trainer)
        batch = trainer.collect(epoch=0)
        steps = train_step_indices(batch.kernel, 0.99)
        _, ratio, _, _ = dc.recompute_ratio(trainer, batch, steps)
        assert torch.isfinite(ratio).all(), sampler
        assert (ratio - 1).abs().max().item() < 1e-5, (sampler, (ratio - 1).abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_each_distinct_instruction_and_source_image_is_encoded_once(kind: str, policies, prompts) -> None:
    """A batch repeating prompts runs the text encoders once per distinct instruction (Qwen-Image-Edit: per
    distinct instruction and image, the image being part of its text, and with CFG the negative prompt once
    per image) and the VAE once per distinct image; the same instruction on two images stays two
    conditionings (not one cached by its text)."""
    policy = CLASSES[kind](policies[kind].pipe, **options(kind))  # a fresh policy: nothing cached yet
    texts: list[list[str]] = []
    encoded: list[tuple[int, ...]] = []
    original_text, original_vae = policy.pipe.encode_prompt, policy.pipe._encode_vae_image

    def spy_text(prompt, **kw):
        texts.append(list(prompt) + ([hash(kw["image"][0].tobytes())] if "image" in kw else []))
        return original_text(prompt=prompt, **kw)

    def spy_vae(image, generator):
        encoded.append(tuple(image.shape))
        return original_vae(image, generator)

    policy.pipe.encode_prompt, policy.pipe._encode_vae_image = spy_text, spy_vae
    a, b, c = prompts  # a and c: one instruction, two images
    try:
        cond = policy.encode_prompts([a, b, a, c, b, a])
        single = policy.encode_prompts([c])
    finally:
        del policy.pipe.encode_prompt, policy.pipe._encode_vae_image
    if kind == "flux1_kontext":
        assert texts == [["make it red", "make it blue"], ["make it red"]]
    else:  # each text with its source's condition image (told apart by their pixels)
        im = [t[1] for t in texts[:3]]
        assert len(set(im)) == 3
        assert texts == [
            ["make it red", im[0]], ["make it blue", im[1]], ["make it red", im[2]],
            [" ", im[0]], [" ", im[1]], [" ", im[2]], ["make it red", im[2]],
        ]  # fmt: skip
    assert len(encoded) == 3  # each image once, and not again for the second call
    for v in cond.values():
        assert v.shape[0] == 6
        torch.testing.assert_close(v[0], v[2])
        torch.testing.assert_close(v[0], v[5])
    n = int(cond["image_grid"][3].prod())
    torch.testing.assert_close(cond["image_latents"][3, :n], single["image_latents"][0, :n])
    if kind == "flux1_kontext":  # the same instruction, the same text embeddings
        torch.testing.assert_close(cond["prompt_embeds"][0], cond["prompt_embeds"][3])
    assert cond["image_grid"][0].tolist() != cond["image_grid"][3].tolist()  # other image, other tokens


@pytest.mark.parametrize("kind", KINDS)
def test_batched_velocity_equals_row_by_row(kind: str, policies, prompts) -> None:
    """A batch mixing source sizes (and text lengths, under the mask) gives each row's own velocity, with CFG."""
    cfg = {"true_cfg_scale": 2.5} if kind == "flux1_kontext" else {"guidance_scale": 2.5}
    policy = CLASSES[kind](policies[kind].pipe, **options(kind, **cfg))
    batch = [prompts[0], prompts[1], prompts[2], prompts[0]]
    dc.check_batched_velocity_is_row_by_row(policy, batch)


_SEEN: list[list[dict]] = []


@register_reward("test_edit_source_seen")
def _source_seen(images, prompts, metadata):
    """Records the metadata it is given; scores the mean absolute difference to the source (resized)."""
    _SEEN.append([dict(m) for m in metadata])
    scores = []
    for img, meta in zip(images, metadata, strict=True):
        src = torch.nn.functional.interpolate(meta["source_image"][None], size=img.shape[-2:], mode="bilinear")
        scores.append(-(img - src[0]).abs().mean())
    return torch.stack(scores)


@pytest.mark.parametrize("kind", KINDS)
def test_a_reward_sees_each_images_source_in_its_metadata(kind: str, pipeline_dirs, edit_file, tmp_path) -> None:
    _SEEN.clear()
    trainer = _trainer(
        kind, pipeline_dirs[kind], edit_file, "precise", tmp_path / "run", rewards={"test_edit_source_seen": 1.0}
    )
    batch = trainer.collect(epoch=0)
    components, _, _ = trainer.score(batch)
    assert torch.isfinite(components["test_edit_source_seen"]).all()
    seen = [m for call in _SEEN for m in call]
    assert len(seen) == len(batch.prompts)
    for prompt, meta in zip(batch.prompts, seen, strict=True):
        pixels = np.asarray(source_image(prompt), dtype=np.float32) / 255
        torch.testing.assert_close(meta["source_image"], torch.from_numpy(pixels).permute(2, 0, 1))
        assert meta["source_image_path"] == str(prompt.image)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", KINDS)
def test_plain_prompts_for_an_editing_model_and_images_for_a_text_model_are_user_errors(kind, policies, prompts):
    with pytest.raises(UserError, match="edits a source image but prompt 'a cat' comes without one"):
        policies[kind].encode_prompts(["a cat"])
    text_only = Flux1Policy(tp.flux1_pipeline(), **tp.adapter_options("flux1"))
    with pytest.raises(UserError, match=r"generates from text alone but prompt 'make it red' \(.*edits.jsonl:1\)"):
        text_only.check_prompts(prompts)


@pytest.mark.parametrize("kind", KINDS)
def test_resolution_and_options_the_model_cannot_take_are_user_errors(kind: str, policies) -> None:
    pipe = policies[kind].pipe
    with pytest.raises(UserError, match="cannot take a 30x16 image: .* multiples of 4 pixels"):
        CLASSES[kind](pipe, **options(kind, height=30))
    if kind == "flux1_kontext":
        with pytest.raises(UserError, match="true_cfg_scale"):
            CLASSES[kind](pipe, **options(kind, true_cfg_scale=-1))
        with pytest.raises(UserError, match="auto_resize"):
            CLASSES[kind](pipe, **options(kind, auto_resize="yes"))
        with pytest.raises(UserError, match="cannot take a source image of 2x40 pixels: it must be at least 4"):
            CLASSES[kind](pipe, **options(kind)).source_size(te.source_image(2, 40, seed=0))
    else:
        with pytest.raises(UserError, match="'vae_area' must be a number of pixels"):
            CLASSES[kind](pipe, **options(kind, vae_area=100))
        with pytest.raises(UserError, match="cannot take a source image of 4x64 pixels: its aspect ratio"):
            CLASSES[kind](pipe, **options(kind)).source_sizes(te.source_image(4, 64, seed=0))


def test_image_similarity_scores_an_edit_against_its_source(tmp_path: Path) -> None:
    """The CLIP cosine of each image and its own source (sources of several sizes in one batch): 1 for the source
    itself, as CLIP's own ``get_image_features`` gives it otherwise; one sentence without a source."""
    from transformers import CLIPModel

    from precise_rl.rewards.base import build_reward
    from precise_rl.rewards.clip_models import load_clip_preprocess

    opts = tp.tiny_clip(tmp_path)
    reward = build_reward("image_similarity", **opts)
    sources = [torch.rand(3, 40, 24), torch.rand(3, 16, 16), torch.rand(3, 30, 30)]
    images = torch.rand(3, 3, HEIGHT, WIDTH)
    images[1] = torch.nn.functional.interpolate(sources[1][None], size=(HEIGHT, WIDTH), mode="nearest")[0]
    meta = [{"source_image": s} for s in sources]
    score = reward(images, ["a", "b", "c"], meta)["image_similarity"]
    itself = reward(sources[2][None], ["c"], meta[2:])["image_similarity"]
    torch.testing.assert_close(itself, torch.ones(1), rtol=0, atol=1e-5)
    clip = CLIPModel.from_pretrained(opts["model"]).eval()
    prep = load_clip_preprocess(Path(opts["model"]))
    with torch.no_grad():
        for i in range(3):
            a = clip.get_image_features(pixel_values=prep(images[i : i + 1]))
            b = clip.get_image_features(pixel_values=prep(sources[i][None]))
            a, b = getattr(a, "pooler_output", a), getattr(b, "pooler_output", b)
            want = torch.nn.functional.cosine_similarity(a, b)[0]
            torch.testing.assert_close(score[i], want, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="scores an edit against its source image, but an image came without one"):
        reward(images, ["a", "b", "c"], [{}, *meta[1:]])
