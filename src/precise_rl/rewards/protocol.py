"""The reward server's HTTP protocol (version 1): JSON with PNG images, shared by server and client.

``POST /score`` with ``Authorization: Bearer TOKEN`` when the server has a token, body::

    {"protocol": 1, "images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [object, ...]}

Images are 8-bit PNGs (grey or RGB), all the same size; the scores of image ``i`` belong to
``prompts[i]`` and ``metadata[i]``. A 200 answer is::

    {"protocol": 1, "reward": NAME, "scores": {FIELD: [number or null, ...], ...}}

with one list per field, as long as ``images``; field ``NAME`` is the reward itself, others are
extra measurements; ``null`` marks an image the reward could not score. Errors answer
``{"detail": sentence}`` with 400 (a malformed request), 401 (missing or wrong token), 413 (body, image
count or decoded pixels over the server's limits) or 500 (the reward raised). ``GET /health`` answers
``{"status": "ok", "protocol": 1}``.

Decoding is bounded before it starts: a PNG's width and height are read from its header (IHDR)
and checked against the limits per image and per request, so that a small compressed file cannot
decode to gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UserError

__all__ = ["PROTOCOL", "ProtocolError", "RequestTooLarge", "Limits", "png_size"]
__all__ += ["encode_images", "decode_images", "build_request", "parse_request"]
__all__ += ["build_response", "parse_response", "read_token", "TOKEN_ENV", "DEFAULT_PORT"]

PROTOCOL = 1
TOKEN_ENV = "PRECISE_RL_REWARD_TOKEN"
DEFAULT_PORT = 18085


def read_token(token_file: str | Path | None = None, token_env: str | None = TOKEN_ENV) -> str | None:
    """The bearer token from a file (first line) or else an environment variable; None when neither is set."""
    if token_file is not None:
        try:
            lines = Path(token_file).expanduser().read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise UserError(f"cannot read the token file {str(token_file)!r} ({reason})") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise UserError(f"the token file {str(token_file)!r} is empty")
        return token
    if token_env:
        token = os.environ.get(token_env, "").strip()
        return token or None
    return None


class ProtocolError(ValueError):
    """A request or a response that does not follow the protocol."""


class RequestTooLarge(ProtocolError):
    """A request over one of the server's bounds (images, pixels): answered 413, and split by the client."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may make the server decode (None: no bound)."""

    #: images in one request
    max_images: int | None = None
    #: width x height of one image
    max_image_pixels: int | None = None
    #: width x height summed over the request's images
    max_request_pixels: int | None = None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR chunk, or None when ``data`` does not start like a PNG."""
    # signature (8 bytes), then the first chunk: length (4), type "IHDR" (4), width (4), height (4)
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def encode_images(images: torch.Tensor) -> list[str]:
    """``(B, 1 or 3, H, W)`` in [0, 1] to base64 PNGs of ``round(255 x)``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ProtocolError(f"images must be shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    out = []
    for img in pixels:
        arr = np.ascontiguousarray(img.transpose(1, 2, 0))
        pil = Image.fromarray(arr[:, :, 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_images(encoded: Sequence[Any], limits: Limits | None = None) -> torch.Tensor:
    """Base64 PNGs back to ``(B, C, H, W)`` float32 in [0, 1]; ProtocolError on anything else.

    With ``limits``, :class:`RequestTooLarge` is raised before any pixel is decoded past a bound.
    """
    limits = limits or Limits()
    if not isinstance(encoded, list) or not encoded:
        raise ProtocolError("'images' must be a non-empty list of base64 PNG strings")
    if limits.max_images is not None and len(encoded) > limits.max_images:
        raise RequestTooLarge(
            f"the request has {len(encoded)} images, over the limit of {limits.max_images} per request"
        )
    arrays = []
    total = 0
    for k, item in enumerate(encoded):
        if not isinstance(item, str):
            raise ProtocolError(f"image {k} is not a base64 string")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"image {k} is not a readable base64 PNG: its text is not valid base64") from None
        size = png_size(data)
        if size is None:
            raise ProtocolError(f"image {k} is not a PNG: its {len(data)} bytes do not start with a PNG header")
        w, h = size
        if limits.max_image_pixels is not None and w * h > limits.max_image_pixels:
            raise RequestTooLarge(
                f"image {k} is {w}x{h} pixels, over the limit of {limits.max_image_pixels} pixels per image"
            )
        total += w * h
        if limits.max_request_pixels is not None and total > limits.max_request_pixels:
            raise RequestTooLarge(
                f"the request's images add up to over {limits.max_request_pixels} pixels (the limit per request)"
            )
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as pil:
                if pil.mode not in ("L", "RGB"):
                    pil = pil.convert("RGB")
                arr = np.asarray(pil, dtype=np.uint8)
        except Image.DecompressionBombError:
            raise RequestTooLarge(f"image {k} is {w}x{h} pixels, more than this server decodes") from None
        except (OSError, ValueError, SyntaxError) as exc:  # a truncated or corrupt PNG body
            reason = str(exc).split(" <", 1)[0] if "BytesIO" in str(exc) else str(exc)
            raise ProtocolError(f"image {k} is not a readable PNG ({reason or type(exc).__name__})") from None
        arrays.append(arr[:, :, None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ProtocolError(f"all images of a request must have one size and mode, got {sorted(shapes)}")
    stacked = np.stack(arrays).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked)).float() / 255.0


def build_request(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> dict:
    return {
        "protocol": PROTOCOL,
        "images": encode_images(images),
        "prompts": list(prompts),
        "metadata": [dict(m) for m in metadata],
    }


def parse_request(body: Any, limits: Limits | None = None) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A decoded JSON request to (images, prompts, metadata); ProtocolError naming what is wrong."""
    if not isinstance(body, Mapping):
        raise ProtocolError("the request body must be a JSON object")
    version = body.get("protocol", PROTOCOL)
    # exactly the integer: true and 1.0 compare equal to 1 in Python but are not this protocol's number
    if type(version) is not int or version != PROTOCOL:
        raise ProtocolError(f"this server speaks protocol {PROTOCOL}, the request says {version!r}")
    images = decode_images(body.get("images"), limits)
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("'prompts' must be a list of strings")
    metadata = body.get("metadata", [{} for _ in prompts])
    if not isinstance(metadata, list) or not all(isinstance(m, Mapping) for m in metadata):
        raise ProtocolError("'metadata' must be a list of JSON objects")
    if not len(prompts) == len(metadata) == images.shape[0]:
        raise ProtocolError(f"got {images.shape[0]} images, {len(prompts)} prompts and {len(metadata)} metadata")
    return images, prompts, [dict(m) for m in metadata]


def _number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def build_response(name: str, scores: Mapping[str, torch.Tensor]) -> dict:
    return {
        "protocol": PROTOCOL,
        "reward": name,
        "scores": {k: [_number(x) for x in v.detach().double().cpu().tolist()] for k, v in scores.items()},
    }


def parse_response(body: Any, batch: int) -> tuple[str, dict[str, list[float]]]:
    """A decoded 200 answer to (reward name, field -> floats with NaN for null); ProtocolError if malformed."""
    if not isinstance(body, Mapping) or not isinstance(body.get("scores"), Mapping):
        raise ProtocolError("the answer is not a JSON object with 'scores'")
    name = body.get("reward")
    scores = body["scores"]
    if not isinstance(name, str) or name not in scores:
        raise ProtocolError(f"the answer names reward {name!r} but has no scores under that name")
    out: dict[str, list[float]] = {}
    for field, values in scores.items():
        if not isinstance(values, list) or len(values) != batch:
            raise ProtocolError(f"field {field!r} of the answer has no list of {batch} scores")
        row = []
        for v in values:
            if v is None:
                row.append(math.nan)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                row.append(float(v))
            else:
                raise ProtocolError(f"field {field!r} of the answer holds {v!r}, not a finite number or null")
        out[str(field)] = row
    return name, out
