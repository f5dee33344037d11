"""Serve a registered reward over HTTP: ``precise-rl serve-reward NAME [--set key=value ...]``.

Any reward the registry builds (``pickscore``, ``hpsv2``, ``imagereward``, ``ocr``, ``geneval_detector``, an
import path ``package.module:Name``...) answers ``POST /score`` (protocol in
:mod:`precise_rl.rewards.protocol`) for the ``remote`` reward client of a training run. The server
binds to 127.0.0.1 unless told otherwise; with a token (``--token-file`` or the
``PRECISE_RL_REWARD_TOKEN`` environment variable) every scoring request must carry
``Authorization: Bearer TOKEN`` (the scheme in any case); bodies over ``--max-request-mb`` are refused
with 413 before they are read whole, and so are requests of more than ``--max-images`` images or of
images over ``--max-image-pixels`` each or ``--max-request-pixels`` together (checked from the PNG
headers, before decoding). Videos travel as PNG frames: ``--max-images`` bounds the videos of a request,
``--max-frames`` the frames of each, and every frame counts in the pixel bounds; an image reward
serves videos with ``--set frames=first,middle,last`` (see :mod:`precise_rl.rewards.video`).
A request is parsed and decoded in a worker thread, never on the event
loop, so ``/health`` answers while large requests are read; at most ``--max-decoding`` requests are
decoded or scored at once, which bounds the memory they take. Bodies being received or waiting to be
decoded are bounded together (``--max-bodies-mb``, 503 past it), a body's JSON values are counted
before it is parsed (``--max-json-values``, 413 past it), a request must arrive within
``--receive-timeout`` seconds and at most ``--max-connections`` are open at once. Requests are scored one at a time (the
model is loaded once, on the first request or at start with ``--preload``). Needs the ``serve`` extra:
``pip install 'precise-rl[serve]'``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import yaml

from ..errors import UserError
from ..server_defaults import (  # not the server's module: --help and argument errors import no torch
    DEFAULT_BODIES_FACTOR,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_JSON_VALUES,
    DEFAULT_MAX_MB,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_PORT,
    DEFAULT_RECEIVE_TIMEOUT_S,
    TOKEN_ENV,
)

__all__ = ["add_arguments", "run", "main"]


def _parse_sets(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes key=value, got {item!r}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot read the value {value!r}") from None
    return options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reward", help="registered reward name (e.g. hpsv2, pickscore) or import path package.module:Name")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the reward (repeatable), e.g. --set dtype=float16 --set checkpoint=/models/hps",
    )
    p.add_argument("--device", default=None, help="device for rewards that take one (default: cuda if available)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--token-file", default=None, help=f"file holding the bearer token (else ${TOKEN_ENV}, if set)")
    p.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_MB, help="largest request body accepted")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="most images in one request")
    p.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="most pixels (w x h) of one image"
    )
    p.add_argument(
        "--max-request-pixels",
        type=int,
        default=DEFAULT_MAX_REQUEST_PIXELS,
        help="most pixels of one request's images together",
    )
    p.add_argument(
        "--max-frames", type=int, default=DEFAULT_MAX_FRAMES, help="most frames of one video (videos count as images)"
    )
    p.add_argument(
        "--max-decoding", type=int, default=None, help="requests decoded or scored at once (default 2; 8 concurrent)"
    )
    p.add_argument(
        "--max-json-values",
        type=int,
        default=DEFAULT_MAX_JSON_VALUES,
        help="most JSON values (arrays, objects, keys, scalars) in one body, counted before it is parsed",
    )
    p.add_argument(
        "--max-bodies-mb",
        type=float,
        default=None,
        help=f"request bodies held at once, being received or waiting to be decoded "
        f"(default {DEFAULT_BODIES_FACTOR} x --max-request-mb); past it a request is answered 503 before it is read",
    )
    p.add_argument(
        "--receive-timeout",
        type=float,
        default=DEFAULT_RECEIVE_TIMEOUT_S,
        help="seconds a request (headers and body) may take to arrive; the connection is closed after",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections open at once; past it the oldest one still sending its request is closed",
    )
    p.add_argument("--preload", action="store_true", help="load the model before accepting requests")
    p.add_argument("--allow-open", action="store_true", help="allow a non-loopback address without a token")
    p.add_argument("--concurrent", action="store_true", help="score requests in parallel (thread-safe rewards only)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    from ..rewards.base import _accepts, _resolve, build_reward
    from ..rewards.protocol import Limits, read_token
    from ..rewards.server import _require_fastapi, serve

    _require_fastapi()
    options = _parse_sets(args.sets)

    if "device" not in options and _accepts(_resolve(args.reward), "device"):
        import torch

        options["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device is not None and "device" not in options:
        raise UserError(f"reward {args.reward!r} takes no device")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    for flag in ("max_request_mb", "max_bodies_mb", "receive_timeout"):
        value = getattr(args, flag)
        # inf and nan pass a plain "> 0" test (nan fails it, but says nothing useful); a byte count needs a finite size
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag.replace('_', '-')} must be a positive finite number, got {value:g}")
    max_request_bytes = int(args.max_request_mb * 2**20)
    if max_request_bytes < 1:
        raise UserError(f"--max-request-mb {args.max_request_mb:g} is under one byte")
    max_bodies_bytes = None if args.max_bodies_mb is None else int(args.max_bodies_mb * 2**20)
    if max_bodies_bytes is not None and max_bodies_bytes < max_request_bytes:
        raise UserError(
            f"--max-bodies-mb ({args.max_bodies_mb:g}) must be at least --max-request-mb ({args.max_request_mb:g}), "
            "else a request of the largest size could never be taken"
        )
    for flag in (
        "max_images",
        "max_image_pixels",
        "max_request_pixels",
        "max_frames",
        "max_decoding",
        "max_json_values",
        "max_connections",
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    token = read_token(args.token_file)
    reward = build_reward(args.reward, **options)
    if args.preload and hasattr(reward, "model"):
        reward.model  # noqa: B018 - loads it now

    def announce() -> None:  # only once the address is bound: a refused bind prints nothing but the error
        print(
            f"serving reward {reward.name!r} on http://{args.host}:{args.port} "
            f"({'bearer token required' if token else 'no token'}; limit {args.max_request_mb:g} MB, "
            f"{args.max_images} images and {args.max_request_pixels} pixels per request)",
            flush=True,
        )

    limits = Limits(
        args.max_images, args.max_image_pixels, args.max_request_pixels, args.max_frames, args.max_json_values
    )
    serve(
        reward,
        args.host,
        args.port,
        token,
        max_request_bytes,
        allow_open=args.allow_open,
        log_level=args.log_level,
        concurrent=args.concurrent,
        limits=limits,
        max_decoding=args.max_decoding,
        on_ready=announce,
        max_bodies_bytes=max_bodies_bytes,
        receive_timeout=args.receive_timeout,
        max_connections=args.max_connections,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m precise_rl.cli.serve_reward NAME ...``: the same as ``precise-rl serve-reward``."""
    import sys

    parser = argparse.ArgumentParser(prog="precise-rl serve-reward", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"precise-rl serve-reward: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
