"""Text rendered with PIL in the DejaVu fonts that ship with matplotlib: known images for the OCR reward.

Used by ``tests/test_ocr_reward.py`` and ``benchmarks/ocr_reward.py``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

#: (family, weight) pairs of the DejaVu fonts matplotlib ships
FONTS = [("DejaVu Sans", "normal"), ("DejaVu Sans", "bold"), ("DejaVu Serif", "normal"), ("DejaVu Sans Mono", "normal")]
WORDS = ["MOON", "hello", "coffee", "OPEN 24 HOURS", "Precise", "river stone", "ZEBRA", "quantum leap", "bakery"]
WORDS += ["North Star"]
#: image sizes (width, height): one-line images and square ones
LINE_SHAPES = [(256, 64), (384, 128), (512, 128)]
SQUARE_SHAPES = [(256, 256), (512, 512)]


@functools.cache
def font(family: str = "DejaVu Sans", weight: str = "normal", size: int = 40) -> ImageFont.FreeTypeFont:
    """A DejaVu font of matplotlib's at ``size`` pixels (no fallback: a missing font is an error)."""
    props = font_manager.FontProperties(family=family, weight=weight)
    return ImageFont.truetype(font_manager.findfont(props, fallback_to_default=False), size)


def fitting_size(text: str, width: int, height: int, family: str, weight: str, fill: float = 0.9) -> int:
    """The largest font size (even) whose ink box fits ``fill`` of the width and ``fill`` of the height."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = 8
    while True:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font(family, weight, size + 2))
        if right - left > fill * width or bottom - top > fill * height:
            return size
        size += 2


def render(
    text: str,
    width: int,
    height: int,
    size: int | None = None,
    family: str = "DejaVu Sans",
    weight: str = "normal",
    fg: tuple[int, int, int] = (0, 0, 0),
    bg: tuple[int, int, int] = (255, 255, 255),
) -> torch.Tensor:
    """``text`` centred on a ``width x height`` plain ground, as a ``(3, H, W)`` image in [0, 1]."""
    size = size or fitting_size(text, width, height, family, weight)
    pil = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(pil)
    f = font(family, weight, size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    draw.text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), text, font=f, fill=fg)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@dataclass
class Render:
    text: str
    shape: tuple[int, int]
    image: torch.Tensor


def render_set(shapes: list[tuple[int, int]], per_shape: int = 12, seed: int = 0) -> list[Render]:
    """``per_shape`` random renders of each shape: a word of :data:`WORDS`, a font of :data:`FONTS`, dark text
    on a light ground, at between half and all of the font size that fits 90% of the width and height."""
    rng = random.Random(seed)
    out = []
    for width, height in shapes:
        for _ in range(per_shape):
            text = rng.choice(WORDS)
            family, weight = rng.choice(FONTS)
            fg = tuple(rng.randrange(0, 100) for _ in range(3))
            bg = tuple(rng.randrange(160, 256) for _ in range(3))
            size = max(10, int(fitting_size(text, width, height, family, weight) * rng.uniform(0.5, 1.0)))
            image = render(text, width, height, size, family, weight, fg, bg)  # type: ignore[arg-type]
            out.append(Render(text, (width, height), image))
    return out
