"""Rewards on the image alone, for any model: JPEG (in)compressibility, as in DDPO and Flow-GRPO.

Each image is quantised to 8 bits (``round(255 x)``), upscaled with nearest-neighbour so its
short side is at least ``min_side`` pixels, and encoded with Pillow's JPEG encoder at a fixed
``quality``; the score is the file size in kB (1000 bytes), negated for compressibility.
The upscaling matters for tiny images: an 8x8 image is a single JPEG block whose file is almost
all header, so its size barely changes; at 64x64 every source pixel becomes an 8x8 block and
the size follows the image's edges and texture.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .base import Reward, register_reward

__all__ = ["jpeg_sizes_kb", "JpegSize", "JpegCompressibility", "JpegIncompressibility"]


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95, min_side: int = 64) -> torch.Tensor:
    """JPEG file size in kB of each image ``(B, C, H, W)`` in [0, 1] (C = 1 grey or 3 RGB), ``(B,)`` float32."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"JPEG rewards need images shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    height, width = images.shape[2], images.shape[3]
    factor = max(1, math.ceil(min_side / min(height, width)))
    pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    sizes = []
    for img in pixels:
        # nearest-neighbour upscaling by an integer factor is exactly a repeat of each pixel
        arr = np.ascontiguousarray(img.repeat(factor, axis=1).repeat(factor, axis=2).transpose(1, 2, 0))
        pil = Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegSize(Reward):
    """The JPEG file size in kB as a reward, signed by :attr:`sign` and named :attr:`key`.

    The registered variants only choose the sign: ``jpeg_compressibility`` scores minus the size
    (higher for smooth, flat images), ``jpeg_incompressibility`` the size (higher for edges and texture).
    """

    key: ClassVar[str]
    sign: ClassVar[float]

    def __init__(self, quality: int = 95, min_side: int = 64) -> None:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise UserError(f"JPEG quality must be an integer in [1, 95], got {quality!r}")
        if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1:
            raise UserError(f"min_side must be a positive integer, got {min_side!r}")
        self.quality, self.min_side = quality, min_side

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        return {self.key: self.sign * jpeg_sizes_kb(images, self.quality, self.min_side)}


@register_reward("jpeg_compressibility")
class JpegCompressibility(JpegSize):
    """Minus the JPEG file size in kB: higher for images that compress well (smooth, flat)."""

    key, sign = "jpeg_compressibility", -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegSize):
    """The JPEG file size in kB: higher for images with more edges and texture."""

    key, sign = "jpeg_incompressibility", 1.0
