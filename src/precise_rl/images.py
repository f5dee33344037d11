"""Images as people look at them: PNG files and labelled grids of ``(B, C, H, W)`` tensors in [0, 1].

Shared by the run logs (sample grids of every evaluation) and ``precise-rl sample``; like
``config.py`` it sits outside the layers and imports none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = ["MAX_LABEL", "image_grid", "labelled_grid", "save_png", "to_uint8"]


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
