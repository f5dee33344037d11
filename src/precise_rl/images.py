"""Images as people look at them: PNG files and labelled grids of ``(B, C, H, W)`` tensors in [0, 1].

Shared by the run logs (sample grids of every evaluation) and ``precise-rl sample``; like
``config.py`` it sits outside the layers and imports none of them. :func:`read_rgb8` reads a
user's image file (an editing prompt's source image) as 8-bit RGB whatever its bit depth, or
refuses it in one sentence.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

__all__ = [
    "MAX_LABEL",
    "MAX_SOURCE_PIXELS",
    "image_grid",
    "labelled_grid",
    "save_png",
    "to_uint8",
    "to_rgb8",
    "read_rgb8",
    "not_a_file",
]

#: the most pixels an image read from the user may have (8192 x 8192): a header claiming more is refused
#: before any pixel is decoded (a 30000 x 30000 PNG of a few kilobytes would take gigabytes)
MAX_SOURCE_PIXELS = 8192 * 8192


def not_a_file(path: Path) -> str | None:
    """What ``path`` is when it is no regular file ("does not exist", "is a directory", "is a FIFO"...), else None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket")]
    kinds += [(stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return "is " + next((name for test, name in kinds if test(mode)), "not a regular file") + ", not an image file"


def to_rgb8(img: Any, what: str) -> Any:
    """A PIL image as 8-bit RGB, its values scaled from the file's bit depth (``what`` names it in errors).

    ``Image.convert("RGB")`` clips 16-bit and float pixels instead of scaling them (a 16-bit grey
    PNG turns white, a float TIFF in [0, 1] black): 16-bit integers are scaled by 255/65535, floats in
    [0, 1] by 255; float pixels outside [0, 1] and 32-bit integers have no agreed white and are refused.
    """
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64) / 257.0  # 65535 / 257 = 255
        return Image.fromarray(np.round(arr).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(arr).all() and lo >= 0.0 and hi <= 1.0):
            raise UserError(
                f"{what} holds floating-point pixels in [{lo:g}, {hi:g}], not [0, 1]; save it as an 8- or 16-bit PNG"
            )
        return Image.fromarray(np.round(arr * 255.0).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "I;32", "I;32B", "I;32L"):
        raise UserError(
            f"{what} holds 32-bit integer pixels, which have no agreed white; save it as an 8- or 16-bit PNG"
        )
    return img.convert("RGB")


def read_rgb8(path: str | Path, what: str) -> Any:
    """The image file ``path`` as an 8-bit RGB ``PIL.Image`` (see :func:`to_rgb8`), or one sentence why not.

    ``what`` names the image in messages (e.g. "line 3 of prompt file 'edits.jsonl': source image 'a.png'").
    A path that is no regular file is named for what it is (a FIFO is never opened: reading it would
    wait for a writer); a header claiming more than :data:`MAX_SOURCE_PIXELS` pixels is refused before decoding.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    why = not_a_file(path)
    if why is not None:
        raise UserError(f"{what} {why}")
    limit = f"the {MAX_SOURCE_PIXELS} pixels (8192 x 8192) an image may have"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_SOURCE_PIXELS:
                    raise UserError(f"{what} is {w} x {h} pixels, more than {limit}; make it smaller")
                img.load()
                return to_rgb8(img, what)
    except Image.DecompressionBombError:
        raise UserError(f"{what} has a header claiming more than {limit}; make it smaller") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"{what} is not a readable image ({exc})") from None


def to_uint8(image: torch.Tensor, scale: int = 1) -> np.ndarray:
    """One ``(C, H, W)`` image in [0, 1] (C = 1 or 3) as an ``(H, W, 3)`` uint8 array, enlarged ``scale`` times."""
    img = image.detach().float().clamp(0, 1).cpu()
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    arr = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    if scale > 1:  # nearest neighbour: tiny images stay sharp
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    return arr


def save_png(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """One ``(C, H, W)`` image in [0, 1] as PNG, enlarged ``scale`` times (nearest neighbour)."""
    from PIL import Image

    Image.fromarray(to_uint8(image, scale)).save(path)


def image_grid(images: torch.Tensor, rows: int, cols: int, scale: int = 1) -> np.ndarray:
    """Tile ``(B, C, H, W)`` images in [0, 1] into one ``(rows*H, cols*W, 3)`` uint8 array."""
    imgs = images.detach().float().clamp(0, 1).cpu()
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    b, _, h, w = imgs.shape
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32) * 0.5
    for k in range(min(b, rows * cols)):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = imgs[k].permute(1, 2, 0).numpy()
    out = (grid * 255).round().astype(np.uint8)
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


#: the longest row label of a sample grid, in characters
MAX_LABEL = 48


def labelled_grid(
    images: torch.Tensor,
    labels: Sequence[str],
    cols: int,
    scale: int = 1,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """``image_grid`` with one row per label and the label written at the left of its row (uint8 RGB).

    Labels longer than ``MAX_LABEL`` characters are cut there, ending in an ellipsis. With
    ``col_labels`` (e.g. each column's seed) a band above the grid names every column; with ``title``
    (e.g. the epoch and the sampler) a line above everything says what the grid shows, the canvas
    widened to hold it.
    """
    from PIL import Image, ImageDraw

    rows = len(labels)
    labels = [lb if len(lb) <= MAX_LABEL else lb[: MAX_LABEL - 3] + "..." for lb in labels]
    grid = Image.fromarray(image_grid(images, rows, cols, scale=scale))
    draw = ImageDraw.Draw(grid)
    margin = 8 + max((int(draw.textlength(label)) for label in labels), default=0)
    head = 18 if title else 0
    top = head + (16 if col_labels else 0)
    width = max(grid.width + margin, 8 + int(draw.textlength(title)) if title else 0)
    canvas = Image.new("RGB", (width, grid.height + top), (255, 255, 255))
    canvas.paste(grid, (margin, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, head / 2), title, fill=(0, 0, 0), anchor="lm")
    row_h = grid.height / max(1, rows)
    for k, label in enumerate(labels):
        draw.text((4, top + row_h * (k + 0.5)), label, fill=(0, 0, 0), anchor="lm")
    if col_labels:
        col_w = grid.width / max(1, cols)
        for k, label in enumerate(list(col_labels)[:cols]):
            draw.text((margin + col_w * (k + 0.5), head + (top - head) / 2), label, fill=(0, 0, 0), anchor="mm")
    return np.asarray(canvas)
