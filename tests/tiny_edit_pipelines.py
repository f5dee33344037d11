"""Tiny instruction-editing pipelines built offline from config classes, and small source images.

The components come from :mod:`tests.tiny_pipelines` (FLUX.1 Kontext is FLUX.1's transformer, text
encoders and VAE under another pipeline class; Qwen-Image-Edit has Qwen-Image's transformer, VAE and
scheduler, and a Qwen2.5-VL with the vision tokens' ids); its tokenizer and processor are built here.
``processor_without_video`` must wrap any loading of a saved Qwen-Image-Edit pipeline (see there).
``source_image`` draws small RGB images (no download) and ``write_edit_prompts`` a JSON-lines prompt
file pairing them with instructions, as a user's would be.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from . import tiny_pipelines as tp

#: the output size of the tests (tiny_pipelines' 32x16: not square, so a transposed layout would show)
HEIGHT, WIDTH = tp.HEIGHT, tp.WIDTH


def flux_kontext_pipeline(vae_scale: int = 2, guidance_embeds: bool = True, seed: int = 0):
    """FLUX.1 Kontext in miniature: the tiny FLUX.1's components in a ``FluxKontextPipeline``."""
    from diffusers import FluxKontextPipeline

    flux = tp.flux1_pipeline(vae_scale=vae_scale, guidance_embeds=guidance_embeds, seed=seed)
    return FluxKontextPipeline(**{k: v for k, v in flux.components.items() if v is not None})


def save_pipeline(kind: str, directory: str | Path, **kwargs) -> Path:
    """Build the tiny editing pipeline ``kind`` and save it (safetensors) to ``directory``."""
    with processor_without_video():
        return tp.save_pipeline(kind, directory, builders=BUILDERS, **kwargs)


def adapter_options(kind: str, **extra) -> dict:
    """Model options that fit the tiny editing pipelines (short text, small source images)."""
    opts: dict = {"height": HEIGHT, "width": WIDTH}
    if kind == "flux1_kontext":  # the preferred Kontext resolutions (~1 megapixel) are too large here
        opts.update(max_sequence_length=16, auto_resize=False)
    elif kind == "qwen_image_edit":
        opts.update(QWEN_EDIT_AREAS)
    opts.update(extra)
    return opts


def source_image(height: int, width: int, seed: int) -> Image.Image:
    """A smooth random RGB image: colour gradients plus a rectangle, so the VAE sees structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 1, 3)[None, None] + rng.uniform(-0.5, 0.5, 3)[None, None] * (yy / height)[..., None]
    base = base + rng.uniform(-0.5, 0.5, 3)[None, None] * (xx / width)[..., None]
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    base[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.uniform(0, 1, 3)
    return Image.fromarray((np.clip(base, 0, 1) * 255).round().astype(np.uint8), mode="RGB")


def write_edit_prompts(directory: str | Path, entries: list[tuple[str, tuple[int, int]]], name: str = "edits.jsonl"):
    """A JSON-lines prompt file in ``directory`` with one image per entry ``(instruction, (height, width))``.

    Images go to ``directory/images/`` and the file names them relative to itself; returns its path.
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, (h, w)) in enumerate(entries):
        path = directory / "images" / f"source{i}.png"
        source_image(h, w, seed=i).save(path)
        lines.append(json.dumps({"prompt": prompt, "image": f"images/{path.name}"}))
    out = directory / name
    out.write_text("\n".join(lines) + "\n")
    return out


#: the vision tokens of Qwen2.5-VL's vocabulary that the editing template uses
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
#: source-image areas of the tiny Qwen-Image-Edit tests (the pipeline's are 384^2 for the text encoder and
#: 1024^2 for the VAE): both sizes round to 32-pixel multiples of the aspect ratio, as the pipeline rounds them
QWEN_EDIT_AREAS = {"condition_area": 32 * 32, "vae_area": 64 * 64}


@contextlib.contextmanager
def processor_without_video():
    """Build, save or load a ``Qwen2VLProcessor`` without its video processor, which the editing pipelines
    never use.

    transformers resolves every part of a processor, and the video processor's base class needs
    torchvision, which this CPU environment lacks (its PyPI wheels are CUDA builds): inside this context
    ``Qwen2VLProcessor`` has two parts, the image processor and the tokenizer, each checked as before.
    """
    from transformers import Qwen2VLProcessor

    original = Qwen2VLProcessor.__dict__.get("get_attributes")

    def parts(cls):
        return ["image_processor", "tokenizer"]

    Qwen2VLProcessor.get_attributes = classmethod(parts)
    try:
        yield
    finally:
        if original is None:
            del Qwen2VLProcessor.get_attributes
        else:
            Qwen2VLProcessor.get_attributes = original


def qwen_vl_tokenizer():
    """Qwen's one-token-per-byte tokenizer (:func:`tiny_pipelines.qwen_tokenizer`) with the vision tokens."""
    tok = tp.qwen_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS]})
    return tok


def qwen_image_edit_plus_pipeline(seed: int = 0, zero_cond_t: bool = False):
    """Qwen-Image-Edit (2509/2511) in miniature: a Qwen2.5-VL with a vision tower of 4-pixel patches (its
    image processor sized to match), the Qwen-Image transformer (2x2 patches of 4 latent channels), the
    Qwen-Image video VAE with per-channel statistics, and Qwen-Image's scheduler config."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = qwen_vl_tokenizer()
    transformer = tp.qwen_image_transformer(seed, zero_cond_t=zero_cond_t)
    text_encoder = tp.qwen2_5_vl_text_encoder(
        tok, seed + 1, max_position_embeddings=1024, vision_ids=True, window_size=16, fullatt_block_indexes=[0]
    )
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, temporal_patch_size=1, merge_size=1, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    )
    with processor_without_video():
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok)
    return QwenImageEditPlusPipeline(
        scheduler=tp.qwen_image_scheduler(),
        vae=tp.qwen_image_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tok,
        processor=processor,
        transformer=transformer,
    )


BUILDERS = {"flux1_kontext": flux_kontext_pipeline, "qwen_image_edit": qwen_image_edit_plus_pipeline}
