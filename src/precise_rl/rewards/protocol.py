"""The reward server's HTTP protocol (version 1): JSON with PNG images, shared by server and client.

``POST /score`` with ``Authorization: Bearer TOKEN`` when the server has a token, body::

    {"protocol": 1, "images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [object, ...]}

Images are 8-bit PNGs (grey or RGB), all the same size; the scores of image ``i`` belong to
``prompts[i]`` and ``metadata[i]``. A 200 answer is::

    {"protocol": 1, "reward": NAME, "scores": {FIELD: [number or null, ...], ...}}

with one list per field, as long as ``images``; field ``NAME`` is the reward itself, others are
extra measurements; ``null`` marks an image the reward could not score. Errors answer
``{"detail": sentence}`` with 400 (a malformed request), 401 (missing or wrong token), 413 (body over
the size limit) or 500 (the reward raised). ``GET /health`` answers ``{"status": "ok", "protocol": 1}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UserError

__all__ = ["PROTOCOL", "ProtocolError", "encode_images", "decode_images", "build_request", "parse_request"]
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


def decode_images(encoded: Sequence[Any]) -> torch.Tensor:
    """Base64 PNGs back to ``(B, C, H, W)`` float32 in [0, 1]; ProtocolError on anything else."""
    if not isinstance(encoded, list) or not encoded:
        raise ProtocolError("'images' must be a non-empty list of base64 PNG strings")
    arrays = []
    for k, item in enumerate(encoded):
        if not isinstance(item, str):
            raise ProtocolError(f"image {k} is not a base64 string")
        try:
            with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as pil:
                if pil.format != "PNG":
                    raise ProtocolError(f"image {k} is a {pil.format}, not a PNG")
                if pil.mode not in ("L", "RGB"):
                    pil = pil.convert("RGB")
                arr = np.asarray(pil, dtype=np.uint8)
        except (binascii.Error, OSError, ValueError) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"image {k} is not a readable base64 PNG ({exc})") from None
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


def parse_request(body: Any) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A decoded JSON request to (images, prompts, metadata); ProtocolError naming what is wrong."""
    if not isinstance(body, Mapping):
        raise ProtocolError("the request body must be a JSON object")
    if body.get("protocol", PROTOCOL) != PROTOCOL:
        raise ProtocolError(f"this server speaks protocol {PROTOCOL}, the request says {body.get('protocol')!r}")
    images = decode_images(body.get("images"))
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
