"""Image preprocessing of the CLIP-family reward models, in torch, on images in [0, 1].

Each original model takes PIL images (8 bits per channel) and resizes them with PIL's bicubic
filter. Here the same happens on tensors, on any device, without torchvision:

- the image is quantised to 8 bits (``round(255 x)``), as saving it to a PIL image does;
- resizing is separable like PIL's: first along the width, then along the height, each pass an
  antialiased bicubic (``a = -0.5``, PIL's kernel; torch uses it when ``antialias=True``) whose
  result is rounded and clipped to 8 bits, as PIL stores its intermediate and final images;
- the crop and the padding follow the original code's integer arithmetic (transformers' image
  processors floor the crop offset, torchvision rounds it half to even);
- then ``x / 255`` and ``(x - mean) / std`` per channel.

Against PIL on the same 8-bit input, a pixel differs by at most one 8-bit level (fixed-point versus
float rounding of the filter weights), on a small fraction of pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "as_rgb_255",
    "resize_bicubic_255",
    "shortest_side_size",
    "center_crop",
    "resize_shortest_and_crop",
    "resize_longest_and_pad",
    "normalize",
]

#: the published CLIP normalisation constants (OpenAI CLIP, used by every model here)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_rgb_255(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1 or 3, H, W)`` in [0, 1] to float32 RGB in 8-bit levels ``{0, ..., 255}`` (grey repeated)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = (images.detach().float().clamp(0.0, 1.0) * 255.0).round()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0.0, 255.0)


def resize_bicubic_255(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's ``Image.resize((width, height), BICUBIC)`` on 8-bit levels: width pass, then height pass."""
    if x.shape[-1] != width:
        x = _quantise(F.interpolate(x, size=(x.shape[-2], width), mode="bicubic", antialias=True, align_corners=False))
    if x.shape[-2] != height:
        x = _quantise(F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False))
    return x


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The output size when the shorter side becomes ``size``: the longer one is ``int(size * long / short)``.

    The same integer arithmetic in transformers' ``get_resize_output_image_size`` and torchvision's ``Resize``.
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop(x: torch.Tensor, height: int, width: int, rounding: str) -> torch.Tensor:
    """Centre crop; ``rounding="floor"`` (transformers: ``(H - h) // 2``) or ``"round"`` (torchvision)."""
    h, w = x.shape[-2], x.shape[-1]
    if h < height or w < width:
        raise ValueError(f"cannot crop {height}x{width} out of {h}x{w}")
    if rounding == "floor":
        top, left = (h - height) // 2, (w - width) // 2
    elif rounding == "round":
        top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    else:
        raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
    return x[..., top : top + height, left : left + width]


def resize_shortest_and_crop(x: torch.Tensor, size: int, crop: int, rounding: str) -> torch.Tensor:
    """Resize (bicubic) so the shorter side is ``size``, then centre-crop ``crop x crop`` (8-bit levels)."""
    new_h, new_w = shortest_side_size(x.shape[-2], x.shape[-1], size)
    return center_crop(resize_bicubic_255(x, new_h, new_w), crop, crop, rounding)


def resize_longest_and_pad(x: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize``: the longer side becomes ``size`` (``round(dim * scale)``), then pad to square.

    An image whose longer side already is ``size`` is not resized, as in the original; unlike the
    original, it is still padded to square when its other side is shorter (the original passes it on
    unpadded, and the vision transformer cannot take it).
    """
    h, w = x.shape[-2], x.shape[-1]
    scale = size / float(max(h, w))
    if scale == 1.0:
        new_h, new_w = h, w
    else:
        new_h, new_w = round(h * scale), round(w * scale)
        x = resize_bicubic_255(x, new_h, new_w)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(
    x: torch.Tensor, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
) -> torch.Tensor:
    """8-bit levels to the model's input: ``(x / 255 - mean) / std`` per channel, float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s
