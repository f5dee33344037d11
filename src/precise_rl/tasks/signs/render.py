"""Procedural signs: one line of capital letters in a DejaVu font (the fonts matplotlib ships) on a plain ground.

Each render draws its look from a ``random.Random``: the font (five DejaVu faces), the text size (70-100%
of the largest that fits 90% of the image), the position (anywhere the text stays inside), a dark text
colour and a light ground colour. The text always stays one line that fills much of the image: the
``ocr`` reward reads such images whole, without text detection (see :mod:`precise_rl.rewards.ocr`).
"""

from __future__ import annotations

import random
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["FONTS", "HEIGHT", "WIDTH", "render_sign", "render_signs"]

HEIGHT, WIDTH = 32, 128
#: (family, weight) of the DejaVu faces used
FONTS: tuple[tuple[str, str], ...] = (
    ("DejaVu Sans", "normal"),
    ("DejaVu Sans", "bold"),
    ("DejaVu Serif", "normal"),
    ("DejaVu Serif", "bold"),
    ("DejaVu Sans Mono", "normal"),
)
_REFERENCE_SIZE = 100


@cache
def _font(index: int, size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    family, weight = FONTS[index]
    props = font_manager.FontProperties(family=family, weight=weight)
    return ImageFont.truetype(font_manager.findfont(props, fallback_to_default=False), size)


def _fitting_size(word: str, font: int, fill: float) -> int:
    # the ink box scales with the size: measure once at a large size and scale down
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=_font(font, _REFERENCE_SIZE))
    scale = min(fill * WIDTH / (right - left), fill * HEIGHT / (bottom - top))
    return max(6, int(_REFERENCE_SIZE * scale))


def render_sign(word: str, rng: random.Random) -> np.ndarray:
    """``word`` drawn with a look drawn from ``rng``: ``(3, 32, 128)`` ``uint8``."""
    font = rng.randrange(len(FONTS))
    size = max(6, int(_fitting_size(word, font, 0.9) * rng.uniform(0.7, 1.0)))
    fg = tuple(rng.randrange(0, 90) for _ in range(3))
    bg = tuple(rng.randrange(170, 256) for _ in range(3))
    pil = Image.new("RGB", (WIDTH, HEIGHT), bg)
    draw = ImageDraw.Draw(pil)
    f = _font(font, size)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=f)
    x = rng.uniform(0, max(0.0, WIDTH - (right - left))) - left
    y = rng.uniform(0, max(0.0, HEIGHT - (bottom - top))) - top
    draw.text((x, y), word, font=f, fill=fg)
    return np.ascontiguousarray(np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1))


def render_signs(words: list[str] | tuple[str, ...], rng: random.Random) -> np.ndarray:
    """One render per word: ``(N, 3, 32, 128)`` ``uint8``."""
    out = np.empty((len(words), 3, HEIGHT, WIDTH), dtype=np.uint8)
    for k, word in enumerate(words):
        out[k] = render_sign(word, rng)
    return out
