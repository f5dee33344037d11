"""Tiny instruction-editing pipelines built offline from config classes, and small source images.

The components come from :mod:`tests.tiny_pipelines` where the model shares them (FLUX.1 Kontext is
FLUX.1's transformer, text encoders and VAE under another pipeline class). ``source_images`` draws
small RGB images (no download) and ``write_edit_prompts`` a JSON-lines prompt file pairing them with
instructions, as a user's would be.
"""

from __future__ import annotations

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


BUILDERS = {"flux1_kontext": flux_kontext_pipeline}


def save_pipeline(kind: str, directory: str | Path, **kwargs) -> Path:
    """Build the tiny editing pipeline ``kind`` and save it (safetensors) to ``directory``."""
    directory = Path(directory)
    BUILDERS[kind](**kwargs).save_pretrained(str(directory), safe_serialization=True)
    return directory


def adapter_options(kind: str, **extra) -> dict:
    """Model options that fit the tiny editing pipelines (short text; source images kept at their size)."""
    opts = {"height": HEIGHT, "width": WIDTH, "max_sequence_length": 16}
    if kind == "flux1_kontext":
        opts["auto_resize"] = False  # the preferred Kontext resolutions (~1 megapixel) are too large here
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
