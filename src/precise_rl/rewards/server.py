"""Serve a registered reward over HTTP: ``precise-rl serve-reward NAME [--set key=value ...]``.

Any reward the registry builds (``pickscore``, ``hpsv2``, ``imagereward``, ``geneval_detector``, an
import path ``package.module:Name``...) answers ``POST /score`` (protocol in
:mod:`precise_rl.rewards.protocol`) for the ``remote`` reward client of a training run. The server
binds to 127.0.0.1 unless told otherwise; with a token (``--token-file`` or the
``PRECISE_RL_REWARD_TOKEN`` environment variable) every scoring request must carry
``Authorization: Bearer TOKEN`` (the scheme in any case); bodies over ``--max-request-mb`` are refused
with 413 before they are read whole, and so are requests of more than ``--max-images`` images or of
images over ``--max-image-pixels`` each or ``--max-request-pixels`` together (checked from the PNG
headers, before decoding). A request is parsed and decoded in a worker thread, never on the event
loop, so ``/health`` answers while large requests are read; at most ``--max-decoding`` requests are
decoded or scored at once, which bounds the memory they take. Requests are scored one at a time (the
model is loaded once, on the first request or at start with ``--preload``). Needs the ``serve`` extra:
``pip install 'precise-rl[serve]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
import yaml

from ..errors import UserError
from .base import Reward, build_reward
from .protocol import (
    DEFAULT_PORT,
    PROTOCOL,
    TOKEN_ENV,
    Limits,
    ProtocolError,
    RequestTooLarge,
    build_response,
    parse_request,
    read_token,
)

__all__ = ["create_app", "serve", "read_token", "add_arguments", "run", "TOKEN_ENV", "DEFAULT_PORT"]

DEFAULT_MAX_MB = 64.0
#: images per request (the client sends 16 by default and splits a request answered 413)
DEFAULT_MAX_IMAGES = 1024
#: pixels of one image: 4096 x 4096
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: pixels of one request's images together: 32 images of 1024 x 1024 (about 0.4 GB as float32 RGB)
DEFAULT_MAX_REQUEST_PIXELS = 32 * 1024 * 1024
#: requests decoded or scored at the same time (each holds at most the pixels above)
DEFAULT_MAX_DECODING = 2


def _require_fastapi() -> Any:
    try:
        import fastapi
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("the reward server needs FastAPI and uvicorn: pip install 'precise-rl[serve]'") from None
    return fastapi


def create_app(
    reward: Reward,
    token: str | None = None,
    max_request_bytes: int = int(DEFAULT_MAX_MB * 2**20),
    concurrent: bool = False,
    limits: Limits | None = None,
    max_decoding: int | None = None,
) -> Any:
    """The FastAPI app serving ``reward``: one request at a time, or ``concurrent`` ones (thread-safe rewards).

    ``limits`` bounds what one request may decode (default: the module's ``DEFAULT_MAX_*``);
    ``max_decoding`` requests at most are parsed, decoded or scored at once (default 2, or 8 with
    ``concurrent``).
    """
    import asyncio

    fastapi = _require_fastapi()
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    if max_request_bytes < 1:
        raise UserError(f"the request size limit must be positive, got {max_request_bytes}")
    limits = limits or Limits(DEFAULT_MAX_IMAGES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS)
    for name in ("max_images", "max_image_pixels", "max_request_pixels"):
        value = getattr(limits, name)
        if value is not None and value < 1:
            raise UserError(f"the server limit {name} must be positive, got {value}")
    slots_n = max_decoding if max_decoding is not None else (8 if concurrent else DEFAULT_MAX_DECODING)
    if slots_n < 1:
        raise UserError(f"the number of requests decoded at once must be positive, got {slots_n}")
    slots = asyncio.Semaphore(slots_n)  # made here, used on the server's loop (asyncio binds it on first use)
    app = fastapi.FastAPI(title=f"precise-rl reward server: {reward.name}", docs_url=None, redoc_url=None)
    lock = contextlib.nullcontext() if concurrent else threading.Lock()
    expected = token.encode() if token else None

    def authorised(header: str) -> bool:
        # RFC 9110: the scheme is case-insensitive ("bearer", "BEARER"); the token itself is not.
        scheme, _, credentials = header.strip().partition(" ")
        given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, expected or b"")

    def parse(body: bytes) -> tuple[torch.Tensor, list[str], list[dict]]:
        # Runs in a worker thread: JSON parsing and PNG decoding of a large request take seconds.
        try:
            decoded = json.loads(body)
        except RecursionError:
            raise ProtocolError("the JSON is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, and bytes that are not UTF-8
            raise ProtocolError(f"the body is not JSON ({exc})") from None
        try:
            return parse_request(decoded, limits)
        except RecursionError:
            raise ProtocolError("the metadata is nested too deeply") from None

    def error(status: int, detail: str) -> Any:
        return JSONResponse({"detail": detail}, status_code=status)

    def score(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict:
        with lock, torch.no_grad():
            out = reward(images, prompts, metadata)
        if not isinstance(out, Mapping):
            out = {reward.name: out}
        if reward.name not in out:
            if len(out) != 1:
                raise UserError(f"reward {reward.name!r} returned fields {sorted(out)} and none named after it")
            out = {reward.name: next(iter(out.values()))}
        scores = {}
        for key, value in out.items():
            t = torch.as_tensor(value).detach().double().reshape(-1)
            if t.numel() != images.shape[0]:
                raise UserError(f"reward field {key!r} has {t.numel()} scores for {images.shape[0]} images")
            scores[key] = t
        return build_response(reward.name, scores)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "protocol": PROTOCOL}

    async def score_endpoint(request: Any) -> Any:
        if expected is not None and not authorised(request.headers.get("authorization", "")):
            return error(401, "missing or wrong bearer token")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            return error(413, f"request body of {int(length)} bytes is over the limit of {max_request_bytes}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_request_bytes:
                return error(413, f"request body is over the limit of {max_request_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        del chunks
        async with slots:  # bounds the decoded images held at once, whatever the number of clients
            try:
                images, prompts, metadata = await run_in_threadpool(parse, body)
            except RequestTooLarge as exc:
                return error(413, f"request too large: {exc}")
            except ProtocolError as exc:
                return error(400, f"malformed request: {exc}")
            except Exception as exc:  # noqa: BLE001 - e.g. a PNG that breaks the decoder: still the request's fault
                return error(400, f"malformed request: it could not be decoded ({type(exc).__name__})")
            del body
            try:
                return await run_in_threadpool(score, images, prompts, metadata)
            except Exception as exc:  # noqa: BLE001 - the client marks these images; the server stays up
                return error(500, f"reward {reward.name!r} failed: {type(exc).__name__}: {exc}")

    # the annotation FastAPI reads to pass the raw request (a string under postponed annotations)
    score_endpoint.__annotations__["request"] = fastapi.Request
    app.post("/score")(score_endpoint)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    reward: Reward,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_request_bytes: int = int(DEFAULT_MAX_MB * 2**20),
    allow_open: bool = False,
    log_level: str = "info",
    concurrent: bool = False,
    limits: Limits | None = None,
    max_decoding: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run the server until interrupted; ``on_ready()`` is called once the address is bound.

    The socket is bound here, before uvicorn starts, so that an address in use is one sentence
    (a :class:`UserError`) and nothing claims to be serving before it is.
    """
    _require_fastapi()
    import socket

    import uvicorn

    if not _is_loopback(host) and token is None and not allow_open:
        raise UserError(
            f"binding to {host} without a token lets anyone on the network use this reward; set a token "
            f"(--token-file or {TOKEN_ENV}) or pass --allow-open"
        )
    app = create_app(reward, token, max_request_bytes, concurrent, limits, max_decoding)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise UserError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host"
        ) from None
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
        if on_ready is not None:
            on_ready()
        server.run(sockets=[sock])
    finally:
        sock.close()


# ----------------------------------------------------------------------------- command line


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
        "--max-decoding", type=int, default=None, help="requests decoded or scored at once (default 2; 8 concurrent)"
    )
    p.add_argument("--preload", action="store_true", help="load the model before accepting requests")
    p.add_argument("--allow-open", action="store_true", help="allow a non-loopback address without a token")
    p.add_argument("--concurrent", action="store_true", help="score requests in parallel (thread-safe rewards only)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    _require_fastapi()
    options = _parse_sets(args.sets)
    from .base import _accepts, _resolve

    if "device" not in options and _accepts(_resolve(args.reward), "device"):
        options["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device is not None and "device" not in options:
        raise UserError(f"reward {args.reward!r} takes no device")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_request_mb > 0:
        raise UserError(f"--max-request-mb must be positive, got {args.max_request_mb}")
    for flag in ("max_images", "max_image_pixels", "max_request_pixels", "max_decoding"):
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

    serve(
        reward,
        args.host,
        args.port,
        token,
        int(args.max_request_mb * 2**20),
        allow_open=args.allow_open,
        log_level=args.log_level,
        concurrent=args.concurrent,
        limits=Limits(args.max_images, args.max_image_pixels, args.max_request_pixels),
        max_decoding=args.max_decoding,
        on_ready=announce,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m precise_rl.rewards.server NAME ...``: the same as ``precise-rl serve-reward``."""
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
