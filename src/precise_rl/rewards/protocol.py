"""The reward server's HTTP protocol (version 1): JSON with PNG images, shared by server and client.

``POST /score`` with ``Authorization: Bearer TOKEN`` when the server has a token, body::

    {"protocol": 1, "images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [object, ...]}

Images are 8-bit PNGs (grey or RGB), all the same size; the scores of image ``i`` belong to
``prompts[i]`` and ``metadata[i]``. Videos go instead of images as ``"videos": [[base64 PNG, ...],
...]``, each video its frames in order as PNGs, every video of a request with the same number of
frames of one size (the server's reward gets ``(B, F, C, H, W)``). Frames travel as PNGs rather than
an MP4 for three reasons: the server scores exactly the 8-bit frames the client has (no codec loss),
its bounds are read from each PNG's header before any pixel is decoded (a video container says its
frame count only as it is decoded), and neither side needs a video codec. A 200 answer is::

    {"protocol": 1, "reward": NAME, "scores": {FIELD: [number or null, ...], ...}}

with one list per field, as long as ``images``; field ``NAME`` is the reward itself, others are
extra measurements; ``null`` marks an image the reward could not score. Errors answer
``{"detail": sentence}`` with 400 (a malformed request), 401 (missing or wrong token), 408 (the body
did not arrive in time), 413 (body, JSON values, what parsing its text may take, image or video
count, frames per video or decoded pixels over the server's limits), 415 (videos sent to a server
whose reward scores images only), 422 (the reward refused the request in a sentence of its own), 503
(the server holds as many bodies as it may; retry later) or 500 (the reward raised). ``GET /health``
answers ``{"status": "ok", "protocol": 1}``.

A 16-bit PNG is read as its 8 high bits. A metadata value that is an image (an edit's source image)
travels as a base64 PNG string and reaches the served reward as a ``(C, H, W)`` tensor in [0, 1];
its pixels count in the request's bound.

Decoding is bounded before it starts: a PNG's width and height are read from its header (IHDR)
and checked against the limits per image (per frame) and per request (all frames of all videos
together), so that a small compressed file cannot decode to gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..server_defaults import DEFAULT_PORT, TOKEN_ENV  # kept apart: serve-reward --help reads them without torch

__all__ = [
    "PROTOCOL",
    "ProtocolError",
    "RequestTooLarge",
    "Limits",
    "png_size",
    "count_json_values",
    "check_json_budget",
    "text_width",
    "text_reserve",
]
__all__ += ["encode_images", "decode_images", "encode_videos", "decode_videos", "build_request", "parse_request"]
__all__ += ["build_response", "parse_response", "read_token", "TOKEN_ENV", "DEFAULT_PORT"]

PROTOCOL = 1


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
        return _checked_token(token, f"the token file {str(token_file)!r}")
    if token_env:
        token = os.environ.get(token_env, "").strip()
        return _checked_token(token, f"${token_env}") if token else None
    return None


def _checked_token(token: str, source: str) -> str:
    """``token`` if it can travel in an HTTP header; else one sentence naming ``source``, never the token."""
    # Visible ASCII only (RFC 9110 field values without spaces): a newline or a control character
    # would make the HTTP library refuse the header with a message that quotes it.
    if not all("!" <= ch <= "~" for ch in token):
        raise UserError(
            f"the reward server token from {source} holds a space, a control character (such as a newline) "
            "or a non-ASCII character, which cannot go in an HTTP header: use printable ASCII only"
        )
    return token


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
    #: width x height summed over the request's images (every frame of every video)
    max_request_pixels: int | None = None
    #: frames of one video
    max_frames: int | None = None
    #: JSON values (arrays, objects, keys, scalars) of one body, counted before it is parsed
    max_json_values: int | None = None


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


def _decode_png(item: Any, label: str, limits: Limits, total: int) -> tuple[np.ndarray, int]:
    """One base64 PNG to an ``(H, W, C)`` uint8 array, its pixels added to the request's ``total`` first."""
    if not isinstance(item, str):
        raise ProtocolError(f"{label} is not a base64 string")
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{label} is not a readable base64 PNG: its text is not valid base64") from None
    size = png_size(data)
    if size is None:
        raise ProtocolError(f"{label} is not a PNG: its {len(data)} bytes do not start with a PNG header")
    w, h = size
    if limits.max_image_pixels is not None and w * h > limits.max_image_pixels:
        raise RequestTooLarge(
            f"{label} is {w}x{h} pixels, over the limit of {limits.max_image_pixels} pixels per image"
        )
    total += w * h
    if limits.max_request_pixels is not None and total > limits.max_request_pixels:
        raise RequestTooLarge(
            f"the request's images add up to over {limits.max_request_pixels} pixels (the limit per request) "
            f"with {label}"
        )
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as pil:
            if pil.mode.startswith("I"):
                # 16-bit grey: Pillow's conversion to RGB would clip every level over 255 to white.
                # Keep its 8 high bits, as Pillow itself reads 16-bit RGB PNGs.
                levels = np.asarray(pil).astype(np.uint32) >> max(0, data[24] - 8)
                arr = np.minimum(levels, 255).astype(np.uint8)
            else:
                if pil.mode not in ("L", "RGB"):
                    pil = pil.convert("RGB")
                arr = np.asarray(pil, dtype=np.uint8)
    except Image.DecompressionBombError:
        raise RequestTooLarge(f"{label} is {w}x{h} pixels, more than this server decodes") from None
    except (OSError, ValueError, SyntaxError) as exc:  # a truncated or corrupt PNG body
        reason = str(exc).split(" <", 1)[0] if "BytesIO" in str(exc) else str(exc)
        raise ProtocolError(f"{label} is not a readable PNG ({reason or type(exc).__name__})") from None
    return (arr[:, :, None] if arr.ndim == 2 else arr), total


def _stack(arrays: list[np.ndarray], what: str) -> torch.Tensor:
    """Same-shaped ``(H, W, C)`` uint8 arrays as ``(N, C, H, W)`` float32 in [0, 1]."""
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ProtocolError(f"all {what} of a request must have one size and mode, got {sorted(shapes)}")
    stacked = np.stack(arrays).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked)).float() / 255.0


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
        arr, total = _decode_png(item, f"image {k}", limits, total)
        arrays.append(arr)
    return _stack(arrays, "images")


def encode_videos(videos: torch.Tensor) -> list[list[str]]:
    """``(B, F, 1 or 3, H, W)`` in [0, 1] to one list of base64 PNG frames per video."""
    if videos.ndim != 5 or videos.shape[2] not in (1, 3) or videos.shape[1] < 1:
        raise ProtocolError(f"videos must be shaped (B, F, 1 or 3, H, W), got {tuple(videos.shape)}")
    return [encode_images(v) for v in videos]


def decode_videos(encoded: Sequence[Any], limits: Limits | None = None) -> torch.Tensor:
    """Lists of base64 PNG frames back to ``(B, F, C, H, W)`` float32 in [0, 1]; ProtocolError otherwise.

    The video count (``max_images``), the frames of each video (``max_frames``) and every frame's
    pixels (per frame, and summed over the request) are checked before the frames are decoded.
    """
    limits = limits or Limits()
    if not isinstance(encoded, list) or not encoded:
        raise ProtocolError("'videos' must be a non-empty list of videos, each a list of base64 PNG frames")
    if limits.max_images is not None and len(encoded) > limits.max_images:
        raise RequestTooLarge(
            f"the request has {len(encoded)} videos, over the limit of {limits.max_images} per request"
        )
    for k, video in enumerate(encoded):  # every count first: nothing is decoded for a request over a bound
        if not isinstance(video, list) or not video:
            raise ProtocolError(f"video {k} is not a non-empty list of base64 PNG frames")
        if limits.max_frames is not None and len(video) > limits.max_frames:
            raise RequestTooLarge(
                f"video {k} has {len(video)} frames, over the limit of {limits.max_frames} frames per video"
            )
    counts = {len(v) for v in encoded}
    if len(counts) != 1:
        raise ProtocolError(f"all videos of a request must have the same number of frames, got {sorted(counts)}")
    arrays = []
    total = 0
    for k, video in enumerate(encoded):
        for j, item in enumerate(video):
            arr, total = _decode_png(item, f"frame {j} of video {k}", limits, total)
            arrays.append(arr)
    frames = _stack(arrays, "frames")
    return frames.reshape(len(encoded), counts.pop(), *frames.shape[1:])


def build_request(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> dict:
    """The request body for images ``(B, C, H, W)`` or videos ``(B, F, C, H, W)``."""
    media = {"videos": encode_videos(images)} if images.ndim == 5 else {"images": encode_images(images)}
    return {
        "protocol": PROTOCOL,
        **media,
        "prompts": list(prompts),
        "metadata": [dict(m) for m in metadata],
    }


def count_json_values(body: bytes) -> int:
    """An upper bound on the JSON values in ``body`` (arrays, objects, object keys, scalars), without parsing it.

    Every value but the first of an array or object follows a comma, every key precedes a colon and
    every array or object opens with a bracket, so the count of those four bytes (plus the top-level
    value) bounds the values; bytes inside strings only make the bound looser.
    """
    return sum(body.count(ch) for ch in (b"[", b"{", b",", b":")) + 1


def check_json_budget(body: bytes, limits: Limits) -> None:
    """RequestTooLarge when ``body`` could parse to more JSON values than ``limits.max_json_values``.

    Parsed, each value is a Python object of some 50 to 150 bytes: 60 MB of ``[],`` would become
    about 1.3 GB of empty lists. Counting first bounds what parsing may take.
    """
    if limits.max_json_values is None:
        return
    n = count_json_values(body)
    if n > limits.max_json_values:
        raise RequestTooLarge(
            f"the body could hold up to {n} JSON values (its brackets, braces, commas and colons), over the "
            f"limit of {limits.max_json_values} per request"
        )


# a \\u escape of a character past U+00FF (so not \\u00XX), and one of a surrogate (a character past U+FFFF)
_WIDE_ESCAPE = re.compile(rb"\\u(?!00[0-9a-fA-F]{2})")
_ASTRAL_ESCAPE = re.compile(rb"\\u[dD][89abAB]")


def text_width(body: bytes | bytearray) -> int:
    """The most bytes a character of ``body``'s text or strings can take in Python: 1, 2 or 4.

    Python stores a string at 1, 2 or 4 bytes a character, by its widest character: one emoji,
    raw or escaped (``\\ud83d\\ude00``), makes a string of 15 MB of base64 take 60 MB. Raw UTF-8
    lead bytes F0-F4 start characters past U+FFFF, C4-EF characters past U+00FF. An escaped
    backslash followed by a ``u`` counts as an escape too: the width is never under-estimated.
    """
    if body.isascii():
        if b"\\u" not in body:
            return 1
        return 4 if _ASTRAL_ESCAPE.search(body) else 2 if _WIDE_ESCAPE.search(body) else 1
    if re.search(rb"[\xf0-\xff]", body) or _ASTRAL_ESCAPE.search(body):
        return 4
    return 2 if re.search(rb"[\xc4-\xef]", body) or _WIDE_ESCAPE.search(body) else 1


def text_reserve(body: bytes | bytearray) -> int:
    """Bytes that parsing ``body`` may take beyond twice its size (its text, and strings as long as it).

    A body of characters that fit in a byte and no escapes parses to a text of its size and strings
    of at most its size. A string holding an escape is built piece by piece with room to grow, and
    one holding wider characters is widened as it is built, the narrow copy and the wide one held at
    once: measured, up to 3.5, 4.75 and 8 bytes a body byte for widths 1, 2 and 4, where
    ``2 + 2 width`` are counted (``tests/test_reward_server_bounds.py``).
    """
    width = text_width(body)
    if width == 1 and b"\\" not in body:
        return 0
    return 2 * width * len(body)


_PNG_BASE64 = base64.b64encode(_PNG_SIGNATURE).decode("ascii")[:10]  # "iVBORw0KGg": any PNG's first 7 bytes


def _metadata_images(metadata: list[dict], limits: Limits, total: int) -> list[dict]:
    """Metadata values that are base64 PNGs (a source image, sent as the images are) as ``(C, H, W)`` tensors.

    Their pixels count in the request's pixel bound, after the images' ``total``.
    """
    out = []
    for k, meta in enumerate(metadata):
        entry = dict(meta)
        for key, value in entry.items():
            if isinstance(value, str) and value.startswith(_PNG_BASE64):
                arr, total = _decode_png(value, f"metadata {key!r} of image {k}", limits, total)
                entry[key] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 255.0
        out.append(entry)
    return out


def parse_request(body: Any, limits: Limits | None = None) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A decoded JSON request to (images or videos, prompts, metadata); ProtocolError naming what is wrong.

    Metadata values that are base64 PNGs come back as ``(C, H, W)`` tensors in [0, 1].
    """
    if not isinstance(body, Mapping):
        raise ProtocolError("the request body must be a JSON object")
    version = body.get("protocol", PROTOCOL)
    # exactly the integer: true and 1.0 compare equal to 1 in Python but are not this protocol's number
    if type(version) is not int or version != PROTOCOL:
        raise ProtocolError(f"this server speaks protocol {PROTOCOL}, the request says {version!r}")
    if "images" in body and "videos" in body:
        raise ProtocolError("a request carries 'images' or 'videos', not both")
    if "videos" in body:
        images = decode_videos(body.get("videos"), limits)
    else:
        images = decode_images(body.get("images"), limits)
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("'prompts' must be a list of strings")
    metadata = body.get("metadata", [{} for _ in prompts])
    if not isinstance(metadata, list) or not all(isinstance(m, Mapping) for m in metadata):
        raise ProtocolError("'metadata' must be a list of JSON objects")
    if not len(prompts) == len(metadata) == images.shape[0]:
        what = "videos" if images.ndim == 5 else "images"
        raise ProtocolError(f"got {images.shape[0]} {what}, {len(prompts)} prompts and {len(metadata)} metadata")
    pixels = math.prod(images.shape[:-3]) * images.shape[-2] * images.shape[-1]
    return images, prompts, _metadata_images([dict(m) for m in metadata], limits or Limits(), pixels)


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
