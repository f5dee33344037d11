"""A registered reward served over HTTP (``POST /score``, ``GET /health``) for ``remote`` reward clients.

``create_app`` builds the FastAPI app: bearer-token check, request-size and pixel limits read before
decoding, decoding and scoring off the event loop with a bound on concurrent requests; ``serve``
runs it with uvicorn. The command line is ``precise-rl serve-reward`` (:mod:`precise_rl.cli.serve_reward`,
whose help says the limits); the protocol is :mod:`precise_rl.rewards.protocol`.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import UserError
from ..server_defaults import (  # kept apart: serve-reward --help reads them without torch
    DEFAULT_MAX_DECODING,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_MB,
    DEFAULT_MAX_REQUEST_PIXELS,
)
from .base import Reward
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

__all__ = ["create_app", "serve", "read_token", "TOKEN_ENV", "DEFAULT_PORT", "DEFAULT_MAX_MB", "DEFAULT_MAX_IMAGES"]
__all__ += ["DEFAULT_MAX_FRAMES"]


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
    limits = limits or Limits(
        DEFAULT_MAX_IMAGES, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_MAX_FRAMES
    )
    for name in ("max_images", "max_image_pixels", "max_request_pixels", "max_frames"):
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
            if images.ndim == 5 and not getattr(reward, "accepts_video", False):
                return error(
                    415,
                    f"reward {reward.name!r} scores images, not videos: start the server with --set "
                    "frames=first,middle,last (or all, or frame indices) to score frames of each video, or send images",
                )
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
