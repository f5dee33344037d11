"""The hub reward models on tiny models built from configs here, loaded through the scorers' own loaders.

References are computed independently: preprocessing with Pillow and numpy from the published CLIP
constants; open_clip's and BLIP's forward passes written out from their original parameter names
(torch's own multi-head attention for open_clip, plain softmax attention for BLIP).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from precise_rl.errors import UserError
from precise_rl.rewards import RewardSet, build_reward
from precise_rl.rewards.clip_models import ClipPreprocess

# the published constants, written out here rather than imported from the code under test
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])

# ----------------------------------------------------------------------------- references


def _u8(images: torch.Tensor) -> list[np.ndarray]:
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [np.repeat(a, 3, axis=0).transpose(1, 2, 0) if a.shape[0] == 1 else a.transpose(1, 2, 0) for a in x]


def _pil_shortest_crop(img: np.ndarray, size: int, crop: int, rounding: str) -> np.ndarray:
    h, w = img.shape[:2]
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nh, nw = size, int(size * w / h)
    out = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC)) if (nh, nw) != (h, w) else img
    if rounding == "floor":
        top, left = (nh - crop) // 2, (nw - crop) // 2
    else:
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return out[top : top + crop, left : left + crop]


def _pil_longest_pad(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / max(h, w)
    if scale == 1.0:  # not resized, as open_clip's ResizeMaxSize; padded to square all the same
        nh, nw, out = h, w, img
    else:
        nh, nw = round(h * scale), round(w * scale)
        out = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    ph, pw = size - nh, size - nw
    return np.pad(out, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def _normalise(u8: np.ndarray) -> torch.Tensor:
    x = (u8.astype(np.float64) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy()).float()


def _reference_pixels(images: torch.Tensor, size: int, mode: str, rounding: str = "floor") -> torch.Tensor:
    out = []
    for img in _u8(images):
        u8 = _pil_shortest_crop(img, size, size, rounding) if mode == "shortest" else _pil_longest_pad(img, size)
        out.append(_normalise(u8))
    return torch.stack(out)


def _smooth_images(gen: torch.Generator, n: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    low = torch.rand(n, c, max(2, h // 4), max(2, w // 4), generator=gen)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("rounding", ["floor", "round"])
@pytest.mark.parametrize("shape", [(3, 40, 40), (3, 23, 37), (1, 57, 30), (3, 16, 16), (3, 11, 9)])
def test_shortest_side_pipeline_matches_pillow(shape: tuple[int, int, int], rounding: str) -> None:
    gen = torch.Generator().manual_seed(hash((shape, rounding)) % 2**31)
    images = torch.rand(4, *shape, generator=gen)
    got = ClipPreprocess(16, 16, "shortest", rounding)(images)
    ref = _reference_pixels(images, 16, "shortest", rounding)
    assert got.shape == ref.shape == (4, 3, 16, 16)
    # PIL's fixed-point filter weights against float ones: at most a level or two on a few pixels
    level = 1.0 / 255.0 / STD.min()
    diff = (got - ref).abs()
    assert diff.max().item() <= 2 * level + 1e-5
    assert (diff > 1e-5).float().mean().item() < 0.03


@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_centre_crop_offsets_follow_each_original(rounding: str) -> None:
    # no resize needed (short side already 16): the crop alone decides, and it must match exactly
    images = torch.rand(2, 3, 16, 21, generator=torch.Generator().manual_seed(5))
    got = ClipPreprocess(16, 16, "shortest", rounding)(images)
    ref = _reference_pixels(images, 16, "shortest", rounding)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # width 21 -> offset 2 (floor of 2.5) for transformers, 2 (2.5 rounds half to even) for torchvision;
    # width 24 -> offsets 4 and 4; width 19 -> 1 (floor) against 2 (round(1.5))
    odd = torch.rand(1, 3, 16, 19, generator=torch.Generator().manual_seed(6))
    left = 1 if rounding == "floor" else 2
    expected = _normalise(_u8(odd)[0][:, left : left + 16])
    torch.testing.assert_close(ClipPreprocess(16, 16, "shortest", rounding)(odd)[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 30, 50), (3, 50, 30), (1, 17, 64), (3, 40, 40), (3, 16, 9)])
def test_longest_side_pad_matches_open_clip_resize_max_size(shape: tuple[int, int, int]) -> None:
    images = torch.rand(3, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    got = ClipPreprocess(16, 16, "longest")(images)
    ref = _reference_pixels(images, 16, "longest")
    level = 1.0 / 255.0 / STD.min()
    diff = (got - ref).abs()
    assert got.shape == ref.shape == (3, 3, 16, 16)  # square even when the longer side is already 16
    assert diff.max().item() <= 2 * level + 1e-5
    assert (diff > 1e-5).float().mean().item() < 0.03


# ----------------------------------------------------------------------------- tiny CLIP models

IMAGE, PATCH, CTX = 32, 8, 16


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_tokenizer(directory: Path) -> Path:
    """A byte-level CLIP BPE tokenizer with no merges (every character a token), saved like a hub repo."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!")
    tok.save_pretrained(str(directory))
    return directory


def _processor_dir(directory: Path, size: int = IMAGE) -> Path:
    """A CLIP processor directory: tokenizer files and the image processor's preprocessor_config.json."""
    _clip_tokenizer(directory)
    config = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": MEAN.tolist(),
        "image_std": STD.tolist(),
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


def _tiny_clip(directory: Path, seed: int, act: str = "quick_gelu") -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": 514,
            "max_position_embeddings": CTX,
            "bos_token_id": 512,
            "eos_token_id": 513,
            "pad_token_id": 0,
            "hidden_act": act,
        },
        vision_config={**common, "image_size": IMAGE, "patch_size": PATCH, "hidden_act": act},
        projection_dim=24,
    )
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    model.save_pretrained(str(directory))
    return directory


def _clip_reference_cosine(model_dir: Path, tok_dir: Path, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(image, text) of every pair, straight from transformers' CLIPModel (float64)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(model_dir)).double().eval()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tokens = tok(prompts, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels.double()).pooler_output)
        txt = model.text_projection(
            model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        )
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return img @ txt.T


PROMPTS = ["a red cat", "two dogs on a sofa", "a photo of the sea at night", "x", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    return {
        "processor": _processor_dir(root / "processor"),
        "model": _tiny_clip(root / "model", seed=1),
        "openai": _processor_dir(root / "openai"),
    }


def test_pickscore_is_scaled_cosine_on_pillow_preprocessed_images(clip_dirs: dict[str, Path]) -> None:
    gen = torch.Generator().manual_seed(11)
    images = _smooth_images(gen, 5, 49, 40)
    scorer = build_reward("pickscore", model=str(clip_dirs["model"]), processor=str(clip_dirs["processor"]))
    assert not scorer._model.loaded  # lazy: nothing is read before the first call
    scores = scorer(images, PROMPTS, [{}] * 5)["pickscore"]
    assert scorer._model.loaded
    cos = _clip_reference_cosine(
        clip_dirs["model"], clip_dirs["processor"], _reference_pixels(images, IMAGE, "shortest"), PROMPTS
    )
    expected = 50.0 * cos.diagonal()
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    # Pillow's and torch's bicubic differ by a level on a few pixels: a small tolerance on the score
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=2e-2)
    # with images already at the model's size there is no resize, and the scores agree to float precision
    exact = _smooth_images(gen, 5, IMAGE, IMAGE)
    cos = _clip_reference_cosine(
        clip_dirs["model"], clip_dirs["processor"], _reference_pixels(exact, IMAGE, "shortest"), PROMPTS
    )
    torch.testing.assert_close(
        scorer(exact, PROMPTS, [{}] * 5)["pickscore"].double(), 50.0 * cos.diagonal(), rtol=0, atol=1e-4
    )


def test_batching_and_pairing_do_not_change_scores(clip_dirs: dict[str, Path]) -> None:
    gen = torch.Generator().manual_seed(12)
    images = _smooth_images(gen, 5, IMAGE, IMAGE)
    kw = {"model": str(clip_dirs["model"]), "processor": str(clip_dirs["processor"])}
    whole = build_reward("pickscore", batch_size=8, **kw)(images, PROMPTS, [{}] * 5)["pickscore"]
    ones = build_reward("pickscore", batch_size=1, **kw)(images, PROMPTS, [{}] * 5)["pickscore"]
    twos = build_reward("pickscore", batch_size=2, **kw)(images, PROMPTS, [{}] * 5)["pickscore"]
    torch.testing.assert_close(ones, whole, rtol=0, atol=1e-4)
    torch.testing.assert_close(twos, whole, rtol=0, atol=1e-4)
    # a joint permutation of images and prompts permutes the scores; prompts never drift to other images
    perm = torch.randperm(5, generator=gen)
    scorer = build_reward("pickscore", batch_size=2, **kw)
    permuted = scorer(images[perm], [PROMPTS[i] for i in perm], [{}] * 5)["pickscore"]
    torch.testing.assert_close(permuted, whole[perm], rtol=0, atol=1e-4)
    # every score is the matching entry of the full image-by-prompt matrix, not a neighbour's
    matrix = 50.0 * _clip_reference_cosine(
        clip_dirs["model"], clip_dirs["processor"], _reference_pixels(images, IMAGE, "shortest"), PROMPTS
    )
    shifted = PROMPTS[1:] + PROMPTS[:1]
    got = scorer(images, shifted, [{}] * 5)["pickscore"].double()
    torch.testing.assert_close(got, matrix[torch.arange(5), (torch.arange(5) + 1) % 5], rtol=0, atol=1e-4)
    assert (matrix.diagonal() - matrix[torch.arange(5), (torch.arange(5) + 1) % 5]).abs().max() > 1e-2


def test_clipscore_is_clamped_hundred_cosine(clip_dirs: dict[str, Path]) -> None:
    gen = torch.Generator().manual_seed(13)
    images = _smooth_images(gen, 5, IMAGE + 8, IMAGE, c=1)  # grey images are repeated to RGB
    # CLIPScore's model directory holds its processor files too, as openai/clip-vit-large-patch14 does
    both = clip_dirs["openai"]
    if not (both / "config.json").exists():
        _tiny_clip(both, seed=1)
    scores = build_reward("clipscore", model=str(both))(images, PROMPTS, [{}] * 5)["clipscore"]
    cos = _clip_reference_cosine(both, both, _reference_pixels(images, IMAGE, "shortest"), PROMPTS).diagonal()
    torch.testing.assert_close(scores.double(), (100.0 * cos).clamp_min(0.0), rtol=0, atol=5e-2)
    assert (scores >= 0).all()


def _aesthetic_head(path: Path, dim: int, seed: int) -> torch.nn.Sequential:
    """The original predictor's layer stack, built here independently and saved as its .pth state dict."""
    torch.manual_seed(seed)
    head = torch.nn.Sequential(
        torch.nn.Linear(dim, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    return head


def test_aesthetic_is_the_mlp_on_normalised_image_embeddings(clip_dirs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import CLIPModel

    head = _aesthetic_head(tmp_path / "aesthetic-model.pth", 24, seed=3)
    gen = torch.Generator().manual_seed(14)
    scorer = build_reward("aesthetic", clip_model=str(clip_dirs["model"]), head=str(tmp_path), batch_size=3)
    clip = CLIPModel.from_pretrained(str(clip_dirs["model"])).eval()

    def expected(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pixels = _reference_pixels(images, IMAGE, "shortest", rounding="round")  # clip.load's torchvision crop
            emb = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
            return head(emb / emb.norm(dim=-1, keepdim=True))[:, 0]

    # 43 x 32: no resize, and the crop offset is round(5.5) = 6 (torchvision), not 5 (transformers)
    images = _smooth_images(gen, 4, 43, 32)
    scores = scorer(images, ["ignored"] * 4, [{}] * 4)["aesthetic"]
    torch.testing.assert_close(scores, expected(images), rtol=0, atol=1e-5)
    resized = _smooth_images(gen, 4, 45, 33)
    torch.testing.assert_close(scorer(resized, ["x"] * 4, [{}] * 4)["aesthetic"], expected(resized), rtol=0, atol=5e-3)
    # the prompt plays no part
    again = scorer(images, ["something else entirely"] * 4, [{}] * 4)["aesthetic"]
    torch.testing.assert_close(again, scores, rtol=0, atol=1e-6)


def test_half_precision_tracks_float32(clip_dirs: dict[str, Path]) -> None:
    images = _smooth_images(torch.Generator().manual_seed(15), 3, IMAGE, IMAGE)
    kw = {"model": str(clip_dirs["model"]), "processor": str(clip_dirs["processor"])}
    full = build_reward("pickscore", **kw)(images, PROMPTS[:3], [{}] * 3)["pickscore"]
    half = build_reward("pickscore", dtype="bfloat16", **kw)
    got = half(images, PROMPTS[:3], [{}] * 3)["pickscore"]
    assert half.model.model.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, full, rtol=0, atol=0.05 * 50)


# ----------------------------------------------------------------------------- HPSv2 (open_clip checkpoint)

HPS_HEADS = 4


def _open_clip_state(seed: int, width: int = 32, layers: int = 2, embed: int = 24) -> dict[str, torch.Tensor]:
    """A random open_clip ViT CLIP state dict with open_clip's parameter names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd: dict[str, torch.Tensor] = {}

    def blocks(prefix: str) -> None:
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = 1 + r(width), r(width)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * width, width), r(3 * width)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(width, width), r(width)
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = 1 + r(width), r(width)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * width, width), r(4 * width)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(width, 4 * width), r(width)

    grid = IMAGE // PATCH
    sd["visual.class_embedding"] = r(width)
    sd["visual.positional_embedding"] = r(grid * grid + 1, width)
    sd["visual.proj"] = r(width, embed)
    sd["visual.conv1.weight"] = r(width, 3, PATCH, PATCH, scale=0.05)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = 1 + r(width), r(width)
    blocks("visual.")
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = 1 + r(width), r(width)
    sd["positional_embedding"] = r(CTX, width)
    sd["text_projection"] = r(width, embed)
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    sd["token_embedding.weight"] = r(514, width)
    blocks("")
    sd["ln_final.weight"], sd["ln_final.bias"] = 1 + r(width), r(width)
    sd["attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)
    return sd


def _open_clip_block(sd: dict, p: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    width = x.shape[-1]
    y = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]).transpose(0, 1)  # (L, B, W)
    attn, _ = F.multi_head_attention_forward(
        y, y, y, width, HPS_HEADS, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False,
        0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask,
    )  # fmt: skip
    x = x + attn.transpose(0, 1)
    y = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    y = F.gelu(F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
    y = F.linear(y, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x + y


def _open_clip_cosine(sd: dict, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.forward (ViT image tower, text tower pooled at argmax token), cos of matching pairs."""
    sd = {k: v.double() for k, v in sd.items()}
    width = sd["ln_final.weight"].shape[0]
    x = F.conv2d(pixels.double(), sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(2):
        x = _open_clip_block(sd, f"visual.transformer.resblocks.{i}.", x, None)
    img = F.layer_norm(x[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    for i in range(2):
        t = _open_clip_block(sd, f"transformer.resblocks.{i}.", t, sd["attn_mask"])
    t = F.layer_norm(t, (width,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(t.shape[0]), tokens.argmax(dim=-1)] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


def test_hpsv2_converts_open_clip_and_scores_like_it(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    sd = _open_clip_state(seed=21)
    ckpt_dir = tmp_path / "hps"
    ckpt_dir.mkdir()
    torch.save({"state_dict": sd}, ckpt_dir / "HPS_v2.1_compressed.pt")
    tok_dir = _clip_tokenizer(tmp_path / "tok")
    gen = torch.Generator().manual_seed(22)
    prompts = ["a red cat", "two dogs", "the sea"]
    scorer = build_reward(
        "hpsv2", checkpoint=str(ckpt_dir), tokenizer=str(tok_dir), vision_heads=HPS_HEADS, text_heads=HPS_HEADS
    )
    # open_clip's tokenizer pads with zeros to the context length; the tower pools at the argmax token
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tokens = tok(prompts, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")["input_ids"]
    assert (tokens[tokens != 513] < 513).all()
    # at the model's size nothing is resized: agreement to float precision
    images = _smooth_images(gen, 3, IMAGE, IMAGE)
    expected = _open_clip_cosine(sd, _reference_pixels(images, IMAGE, "longest"), tokens)
    torch.testing.assert_close(scorer(images, prompts, [{}] * 3)["hpsv2"].double(), expected, rtol=0, atol=1e-4)
    # a non-square image is resized and padded (Pillow against torch: a small tolerance)
    images = _smooth_images(gen, 3, 40, 24)
    expected = _open_clip_cosine(sd, _reference_pixels(images, IMAGE, "longest"), tokens)
    torch.testing.assert_close(scorer(images, prompts, [{}] * 3)["hpsv2"].double(), expected, rtol=0, atol=1e-2)
    # v2.0 picks the other file of the same directory
    with pytest.raises(UserError, match="HPS_v2_compressed.pt"):
        build_reward("hpsv2", checkpoint=str(ckpt_dir), version="2.0", tokenizer=str(tok_dir))(
            images, prompts, [{}] * 3
        )


def test_hpsv2_rejects_a_checkpoint_that_is_not_open_clip(tmp_path: Path) -> None:
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "HPS_v2.1_compressed.pt")
    tok_dir = _clip_tokenizer(tmp_path / "tok")
    scorer = build_reward("hpsv2", checkpoint=str(tmp_path), tokenizer=str(tok_dir))
    with pytest.raises(UserError, match="not an open_clip ViT checkpoint"):
        scorer(torch.rand(1, 3, 8, 8), ["a"], [{}])


# ----------------------------------------------------------------------------- ImageReward (BLIP checkpoint)

BERT_WORDS = ["a", "red", "cat", "two", "dogs", "on", "the", "sea", "photo", "of"]


def _bert_tokenizer(directory: Path) -> Path:
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS, *"bcdefghijklmnopqrstuvwxyz"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    return directory


def _blip_checkpoint(directory: Path, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """A random ImageReward checkpoint with BLIP's parameter names, and its med_config.json."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    vw, tw, grid = 48, 32, IMAGE // PATCH
    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    # small embeddings: the first LayerNorm's eps (BLIP's ViT: 1e-6) then visibly matters
    sd[v + "cls_token"], sd[v + "pos_embed"] = r(1, 1, vw, scale=2e-3), r(1, grid * grid + 1, vw, scale=2e-3)
    sd[v + "patch_embed.proj.weight"] = r(vw, 3, PATCH, PATCH, scale=1e-4)
    sd[v + "patch_embed.proj.bias"] = r(vw, scale=2e-3)
    for i in range(2):
        p = f"{v}blocks.{i}."
        for n, shape in (("norm1", (vw,)), ("norm2", (vw,))):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(*shape), r(*shape)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = r(3 * vw, vw), r(3 * vw)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(vw, vw), r(vw)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * vw, vw), r(4 * vw)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(vw, 4 * vw), r(vw)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = 1 + r(vw), r(vw)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = r(vocab, tw)
    sd[t + "embeddings.position_embeddings.weight"] = r(64, tw)
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = 1 + r(tw), r(tw)
    sd[t + "embeddings.position_ids"] = torch.arange(64)[None]
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", tw), ("crossattention", vw)):
            sd[p + att + ".self.query.weight"], sd[p + att + ".self.query.bias"] = r(tw, tw), r(tw)
            sd[p + att + ".self.key.weight"], sd[p + att + ".self.key.bias"] = r(tw, kv), r(tw)
            sd[p + att + ".self.value.weight"], sd[p + att + ".self.value.bias"] = r(tw, kv), r(tw)
            sd[p + att + ".output.dense.weight"], sd[p + att + ".output.dense.bias"] = r(tw, tw), r(tw)
            sd[p + att + ".output.LayerNorm.weight"], sd[p + att + ".output.LayerNorm.bias"] = 1 + r(tw), r(tw)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(4 * tw, tw), r(4 * tw)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(tw, 4 * tw), r(tw)
        sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"] = 1 + r(tw), r(tw)
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = r(16, vw), r(16)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = r(16, tw), r(16)
    dims = [tw, 1024, 128, 64, 16, 1]
    for idx, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:], strict=True), strict=True):
        sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"] = r(b, a, scale=1 / math.sqrt(a)), r(b)
    torch.save(sd, directory / "ImageReward.pt")
    med = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": tw, "initializer_range": 0.02, "intermediate_size": 4 * tw,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 4,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab,
        "encoder_width": 768, "add_cross_attention": True,
    }  # fmt: skip
    (directory / "med_config.json").write_text(json.dumps(med))
    return sd


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor | None) -> torch.Tensor:
    b, n, w = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, w // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, w)


def _image_reward_reference(sd: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BLIP's ViT (vit.py) and BERT with cross-attention (med.py), then ImageReward's MLP and standardisation."""
    sd = {k: v.double() for k, v in sd.items() if v.is_floating_point()}
    lin = lambda x, p: F.linear(x, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    ln = lambda x, p, eps: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)  # noqa: E731
    v = "blip.visual_encoder."
    x = F.conv2d(pixels.double(), sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"]
    for i in range(2):
        p = f"{v}blocks.{i}."
        y = ln(x, p + "norm1", 1e-6)
        q, k, val = lin(y, p + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attend(q, k, val, 4, None), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    h = (
        sd[t + "embeddings.word_embeddings.weight"][ids]
        + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - mask.double())[:, None, None, :] * torch.finfo(torch.float64).min
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        qkv = [lin(h, p + f"attention.self.{n}") for n in ("query", "key", "value")]
        a = _attend(*qkv, 4, pad_bias)
        h = ln(lin(a, p + "attention.output.dense") + h, p + "attention.output.LayerNorm", 1e-12)
        q = lin(h, p + "crossattention.self.query")
        c = _attend(q, lin(image, p + "crossattention.self.key"), lin(image, p + "crossattention.self.value"), 4, None)
        h = ln(lin(c, p + "crossattention.output.dense") + h, p + "crossattention.output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm", 1e-12)
    f = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        f = lin(f, f"mlp.layers.{idx}")
    return (f[:, 0] - 0.16717362830052426) / 1.0333394966054072


def test_image_reward_on_blip_classes_matches_the_original_forward(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok_dir = _bert_tokenizer(tmp_path / "bert")
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir))) + 2  # BLIP adds [DEC] and [ENC]
    model_dir = tmp_path / "imagereward"
    model_dir.mkdir()
    sd = _blip_checkpoint(model_dir, vocab, seed=31)
    gen = torch.Generator().manual_seed(32)
    prompts = ["a red cat", "two dogs on the sea", "a photo of a photo of a photo of the sea", "zebra"]
    scorer = build_reward("imagereward", model=str(model_dir), tokenizer=str(tok_dir), vision_heads=4, batch_size=3)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tokens = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"][:, 0].eq(tok.cls_token_id).all()
    resized = _smooth_images(gen, 4, 44, 36)
    expected = _image_reward_reference(
        sd, _reference_pixels(resized, IMAGE, "shortest", "round"), tokens["input_ids"], tokens["attention_mask"]
    )
    torch.testing.assert_close(scorer(resized, prompts, [{}] * 4)["imagereward"].double(), expected, rtol=0, atol=2e-2)
    images = _smooth_images(gen, 4, IMAGE, IMAGE)
    scores = scorer(images, prompts, [{}] * 4)["imagereward"]
    expected = _image_reward_reference(
        sd, _reference_pixels(images, IMAGE, "shortest", "round"), tokens["input_ids"], tokens["attention_mask"]
    )
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-4)
    # batching and pairing
    one = build_reward("imagereward", model=str(model_dir), tokenizer=str(tok_dir), vision_heads=4, batch_size=1)
    torch.testing.assert_close(one(images, prompts, [{}] * 4)["imagereward"], scores, rtol=0, atol=1e-4)
    rev = scorer(images.flip(0), prompts[::-1], [{}] * 4)["imagereward"]
    torch.testing.assert_close(rev, scores.flip(0), rtol=0, atol=1e-4)


def test_image_reward_rejects_a_foreign_checkpoint(tmp_path: Path) -> None:
    tok_dir = _bert_tokenizer(tmp_path / "bert")
    torch.save({"unet.conv.weight": torch.zeros(1)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({"add_cross_attention": True}))
    scorer = build_reward("imagereward", model=str(tmp_path), tokenizer=str(tok_dir))
    with pytest.raises(UserError, match="not part of the model"):
        scorer(torch.rand(1, 3, 8, 8), ["a"], [{}])


# ----------------------------------------------------------------------------- loading and configs


def test_missing_weights_fail_on_first_use_with_one_sentence(tmp_path: Path) -> None:
    scorer = build_reward("pickscore", model=str(tmp_path / "nowhere"), processor=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="neither a directory nor a hub id"):
        scorer(torch.rand(1, 3, 8, 8), ["a"], [{}])
    with pytest.raises(UserError, match="dtype"):
        build_reward("clipscore", dtype="float8")
    with pytest.raises(UserError, match="batch_size"):
        build_reward("aesthetic", batch_size=0)


def test_a_config_mixes_hub_scorers_with_weights(clip_dirs: dict[str, Path], tmp_path: Path) -> None:
    _aesthetic_head(tmp_path / "aesthetic-model.pth", 24, seed=4)
    both = clip_dirs["openai"]
    if not (both / "config.json").exists():
        _tiny_clip(both, seed=1)
    rs = RewardSet(
        {"pickscore": 1.0, "clipscore": 0.5, "aesthetic": 0.25, "jpeg_compressibility": 0.0},
        "cpu",
        pickscore={"model": str(clip_dirs["model"]), "processor": str(clip_dirs["processor"])},
        clipscore={"model": str(both)},
        aesthetic={"clip_model": str(clip_dirs["model"]), "head": str(tmp_path)},
    )
    images = _smooth_images(torch.Generator().manual_seed(41), 5, IMAGE, IMAGE)
    comps = rs.score(images, PROMPTS)
    assert sorted(comps) == ["aesthetic", "clipscore", "jpeg_compressibility", "pickscore"]
    combined = rs.combine(comps)
    z = lambda r: (r.double() - r.double().mean()) / (r.double().std(correction=0) + 1e-8)  # noqa: E731
    expected = z(comps["pickscore"]) + 0.5 * z(comps["clipscore"]) + 0.25 * z(comps["aesthetic"])
    torch.testing.assert_close(combined.double(), expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- every hub scorer alike

HUB_SCORERS = ["pickscore", "clipscore", "aesthetic", "hpsv2", "imagereward"]
PAIR_PROMPTS = ["a red cat", "two dogs on the sea", "a photo of the sea", "red red red", "the cat of the dogs"]


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny weights of every hub scorer, laid out as the hub repos they stand for.

    ``repos`` maps each default hub id to its directory; ``kwargs`` builds each scorer from the
    directories (the heads of the tiny models are given, as a state dict cannot tell them).
    """
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("hub")
    processor = _processor_dir(root / "laion-clip-h")
    pick = _tiny_clip(root / "pickscore", seed=2)
    openai = _tiny_clip(_processor_dir(root / "openai-clip-l"), seed=3)
    (root / "aesthetic").mkdir()
    _aesthetic_head(root / "aesthetic" / "aesthetic-model.pth", 24, seed=4)
    (root / "hps").mkdir()
    torch.save({"state_dict": _open_clip_state(seed=5)}, root / "hps" / "HPS_v2.1_compressed.pt")
    bert = _bert_tokenizer(root / "bert")
    (root / "imagereward").mkdir()
    _blip_checkpoint(root / "imagereward", len(AutoTokenizer.from_pretrained(str(bert))) + 2, seed=6)
    repos = {
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": processor,
        "yuvalkirstain/PickScore_v1": pick,
        "openai/clip-vit-large-patch14": openai,
        "trl-lib/ddpo-aesthetic-predictor": root / "aesthetic",
        "xswu/HPSv2": root / "hps",
        "THUDM/ImageReward": root / "imagereward",
        "google-bert/bert-base-uncased": bert,
    }
    heads = {"hpsv2": {"vision_heads": HPS_HEADS, "text_heads": HPS_HEADS}, "imagereward": {"vision_heads": 4}}
    kwargs = {
        "pickscore": {"model": str(pick), "processor": str(processor)},
        "clipscore": {"model": str(openai)},
        "aesthetic": {"clip_model": str(openai), "head": str(root / "aesthetic")},
        "hpsv2": {"checkpoint": str(root / "hps"), "tokenizer": str(processor), **heads["hpsv2"]},
        "imagereward": {"model": str(root / "imagereward"), "tokenizer": str(bert), **heads["imagereward"]},
    }
    return {"repos": repos, "kwargs": kwargs, "heads": heads}


@pytest.mark.parametrize("name", HUB_SCORERS)
def test_every_hub_scorer_keeps_images_with_their_prompts_whatever_the_batching(
    name: str, hub_models: dict[str, Any]
) -> None:
    gen = torch.Generator().manual_seed(50 + HUB_SCORERS.index(name))
    images = _smooth_images(gen, 5, IMAGE + 9, IMAGE)  # resized and cropped (or padded) on the way
    scorer = build_reward(name, batch_size=1, **hub_models["kwargs"][name])
    # every (image, prompt) pair scored on its own: no batch in which a prompt could drift
    alone = torch.tensor(
        [[scorer(images[i : i + 1], [PAIR_PROMPTS[j]], [{}])[name].item() for j in range(5)] for i in range(5)]
    )
    rows = torch.arange(5)
    shift = (rows + 1) % 5
    perm = torch.randperm(5, generator=gen)
    for batch_size in (2, 3, 8):
        scorer.batch_size = batch_size
        got = scorer(images, PAIR_PROMPTS, [{}] * 5)[name]
        assert got.dtype == torch.float32 and got.shape == (5,)
        torch.testing.assert_close(got, alone.diagonal(), rtol=1e-5, atol=1e-4)
        # images and prompts shuffled together: the scores follow the pairs
        shuffled = scorer(images[perm], [PAIR_PROMPTS[i] for i in perm], [{}] * 5)[name]
        torch.testing.assert_close(shuffled, alone.diagonal()[perm], rtol=1e-5, atol=1e-4)
        # prompts shifted by one: image i is scored with prompt i + 1, as alone
        shifted = scorer(images, PAIR_PROMPTS[1:] + PAIR_PROMPTS[:1], [{}] * 5)[name]
        torch.testing.assert_close(shifted, alone[rows, shift], rtol=1e-5, atol=1e-4)
    if name == "aesthetic":  # looks alone: the prompt plays no part
        torch.testing.assert_close(alone, alone[:, :1].expand(5, 5), rtol=0, atol=1e-6)
    else:  # the prompts matter, so the checks above could tell a drifted pairing
        assert (alone.diagonal() - alone[rows, shift]).abs().min() > 1e-4
    assert (alone.diagonal() - alone.diagonal()[0]).abs().max() > 1e-4  # and so do the images


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", HUB_SCORERS)
def test_every_hub_scorer_runs_in_half_precision(name: str, dtype: str, hub_models: dict[str, Any]) -> None:
    images = _smooth_images(torch.Generator().manual_seed(60), 6, IMAGE, IMAGE + 5)
    kw = hub_models["kwargs"][name]
    full = build_reward(name, **kw)(images, PAIR_PROMPTS + ["a cat"], [{}] * 6)[name].double()
    half = build_reward(name, dtype=dtype, **kw)
    got = half(images, PAIR_PROMPTS + ["a cat"], [{}] * 6)[name]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    model = half.model
    # the encoders run in half precision; the small MLP heads stay in float32, on float32 features
    nets = {"aesthetic": lambda: [model[0]], "imagereward": lambda: [model[0].vision, model[0].text]}
    nets = nets.get(name, lambda: [model.model])()
    assert all(p.dtype == getattr(torch, dtype) for net in nets for p in net.parameters())
    # within a small part of how much the scores vary over the images (bfloat16 keeps 8 bits of mantissa)
    tol = {"float16": 0.03, "bfloat16": 0.25}[dtype]
    assert (got.double() - full).abs().max() <= tol * full.std()


class FakeHub:
    """``snapshot_download`` / ``hf_hub_download`` over local directories, as the hub lays out a snapshot.

    A fetch copies the repo's files that ``allow_patterns`` admit into ``snapshots/<commit>``, so a
    scorer whose patterns miss a file it needs fails here as it would against the hub.
    """

    def __init__(self, repos: dict[str, Path], cache: Path) -> None:
        self.repos, self.cache, self.calls = repos, cache, []

    @staticmethod
    def commit(repo: str, revision: str | None) -> str:
        if revision is not None and len(revision) == 40:
            return revision
        return hashlib.sha1(f"{repo}@{revision or 'main'}".encode()).hexdigest()

    def _snapshot(self, repo: str, revision: str | None, patterns: list[str] | None) -> Path:
        if repo not in self.repos:
            raise OSError(f"404 Client Error: repository {repo} not found")
        out = self.cache / repo.replace("/", "--") / "snapshots" / self.commit(repo, revision)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.repos[repo].iterdir():
            if f.is_file() and (patterns is None or any(fnmatch.fnmatch(f.name, p) for p in patterns)):
                shutil.copy(f, out / f.name)
        return out

    def snapshot_download(self, repo_id: str, revision: str | None = None, allow_patterns: Any = None) -> str:
        self.calls.append(("snapshot", repo_id, revision))
        return str(self._snapshot(repo_id, revision, allow_patterns))

    def hf_hub_download(self, repo_id: str, filename: str, revision: str | None = None) -> str:
        self.calls.append(("file", repo_id, revision))
        path = self._snapshot(repo_id, revision, [filename]) / filename
        if not path.is_file():
            raise OSError(f"404 Client Error: {filename} not found in {repo_id}")
        return str(path)


@pytest.mark.parametrize("name", HUB_SCORERS)
def test_hub_scorers_load_their_default_hub_ids_at_a_pinned_revision(
    name: str, hub_models: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from precise_rl.rewards import hub

    fake = FakeHub(hub_models["repos"], tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(hub, "_warned", set())
    revision_keys = {
        "pickscore": ["model_revision", "processor_revision"],
        "clipscore": ["revision"],
        "aesthetic": ["clip_revision", "head_revision"],
        "hpsv2": ["checkpoint_revision", "tokenizer_revision"],
        "imagereward": ["revision", "tokenizer_revision"],
    }[name]
    pins = {key: hashlib.sha1(key.encode()).hexdigest() for key in revision_keys}
    images = _smooth_images(torch.Generator().manual_seed(70), 3, IMAGE, IMAGE)
    local = build_reward(name, **hub_models["kwargs"][name])(images, PAIR_PROMPTS[:3], [{}] * 3)[name]
    # only the default hub ids (no local paths): every fetch asks for its pinned commit, nothing warns
    heads = hub_models["heads"].get(name, {})
    pinned = build_reward(name, **heads, **pins)
    assert not fake.calls  # lazily: nothing is fetched before the first batch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = pinned(images, PAIR_PROMPTS[:3], [{}] * 3)[name]
    assert not [w for w in caught if "pinned" in str(w.message)]
    torch.testing.assert_close(got, local, rtol=0, atol=1e-5)
    assert {call[1] for call in fake.calls} <= set(fake.repos)
    assert {call[2] for call in fake.calls} == set(pins.values())
    # unpinned: the hub's main is used and the commit it resolved to is named once, to pin it afterwards
    fake.calls.clear()
    with pytest.warns(UserWarning, match=r"is not pinned \(revision 'main' resolved to commit [0-9a-f]{40}\)"):
        build_reward(name, **heads)(images, PAIR_PROMPTS[:3], [{}] * 3)
    assert {call[2] for call in fake.calls} == {None}
    # a revision the hub does not have (or no network) is one sentence naming the id and the revision
    first = revision_keys[0]
    source_key = {"pickscore": "model", "clipscore": "model", "aesthetic": "clip_model", "hpsv2": "checkpoint"}
    broken = build_reward(name, **heads, **{source_key.get(name, "model"): "nobody/elsewhere", first: "v0"})
    with pytest.raises(UserError, match=r"cannot fetch .*'nobody/elsewhere'.* at revision 'v0' from the hub"):
        broken(images, PAIR_PROMPTS[:3], [{}] * 3)
