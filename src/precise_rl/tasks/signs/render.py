"""Procedural signs: one line of capital letters in a DejaVu font (the fonts matplotlib ships) on a plain ground.

Each render draws its look from a ``random.Random``: the font (the regular and bold DejaVu Sans Mono
faces), the text size (95-100% of the largest that fits 90% of the image), the position (centred, moved
by up to a pixel each way), a dark text colour and a light ground colour. The faces are monospaced and
the text is centred, so where each letter goes depends on the word's length alone, and the two faces
share every letter's skeleton: what the model must draw for a word is nearly one image up to its
colours, which a small model learns within minutes on a CPU. Wider choices left it drawing letter-like
strokes no letter could be read from: five faces anywhere in the image after 6000 steps, the two faces
at 85-100% of the size moved by up to 4 pixels after 1000 (an ODE sample then blends the places a
letter may take). The text always stays one line that fills much of the image:
the ``ocr`` reward reads such images whole, without text detection (see :mod:`precise_rl.rewards.ocr`).
"""

from __future__ import annotations

import random
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["FONTS", "HEIGHT", "WIDTH", "letter_advance", "render_sign", "render_signs"]

HEIGHT, WIDTH = 32, 128
#: (family, weight) of the DejaVu faces used
FONTS: tuple[tuple[str, str], ...] = (
    ("DejaVu Sans Mono", "normal"),
    ("DejaVu Sans Mono", "bold"),
)
#: largest move of the text from the centre, pixels across and down
JITTER_X, JITTER_Y = 1, 1
_REFERENCE_SIZE = 100
#: the text size is this share (drawn uniformly) of the largest that fits 90% of the image
SIZE_RANGE = (0.95, 1.0)


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


@cache
def letter_advance(letters: int) -> float:
    """Mean width in pixels that one letter takes in a word of ``letters`` letters (both faces, the mean size).

    The faces are monospaced and the text centred, so letter ``k`` of ``n`` sits near
    ``WIDTH / 2 + (k - n / 2) * letter_advance(n)``: the model's layout (:mod:`.models`) starts from this.
    """
    letters = max(1, letters)
    mean_share = sum(SIZE_RANGE) / 2
    advances = []
    for font in range(len(FONTS)):
        size = _fitting_size("H" * letters, font, 0.9)
        advances.append(_font(font, size).getlength("H" * letters) / letters * mean_share)
    return sum(advances) / len(advances)


def render_sign(word: str, rng: random.Random) -> np.ndarray:
    """``word`` drawn with a look drawn from ``rng``: ``(3, 32, 128)`` ``uint8``."""
    font = rng.randrange(len(FONTS))
    size = max(6, int(_fitting_size(word, font, 0.9) * rng.uniform(*SIZE_RANGE)))
    fg = tuple(rng.randrange(0, 90) for _ in range(3))
    bg = tuple(rng.randrange(170, 256) for _ in range(3))
    pil = Image.new("RGB", (WIDTH, HEIGHT), bg)
    draw = ImageDraw.Draw(pil)
    f = _font(font, size)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=f)
    # centred, then moved a little, never past an edge
    x = min(max((WIDTH - (right - left)) / 2 + rng.uniform(-JITTER_X, JITTER_X), 0.0), WIDTH - (right - left)) - left
    y = min(max((HEIGHT - (bottom - top)) / 2 + rng.uniform(-JITTER_Y, JITTER_Y), 0.0), HEIGHT - (bottom - top)) - top
    draw.text((x, y), word, font=f, fill=fg)
    return np.ascontiguousarray(np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1))


def render_signs(words: list[str] | tuple[str, ...], rng: random.Random) -> np.ndarray:
    """One render per word: ``(N, 3, 32, 128)`` ``uint8``."""
    out = np.empty((len(words), 3, HEIGHT, WIDTH), dtype=np.uint8)
    for k, word in enumerate(words):
        out[k] = render_sign(word, rng)
    return out
