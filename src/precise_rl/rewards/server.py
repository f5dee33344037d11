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
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import UserError
from ..server_defaults import (  # kept apart: serve-reward --help reads them without torch
    DEFAULT_BODIES_FACTOR,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_DECODING,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_JSON_VALUES,
    DEFAULT_MAX_MB,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_RECEIVE_TIMEOUT_S,
)
from .base import Reward
from .connections import LOG, bounded_protocol
from .protocol import (
    DEFAULT_PORT,
    PROTOCOL,
    TOKEN_ENV,
    Limits,
    ProtocolError,
    RequestTooLarge,
    build_response,
    check_json_budget,
    parse_request,
    read_token,
    text_reserve,
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


class _Budget:
    """Bytes of request bodies held at once (being received, or waiting to be decoded); used on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


def create_app(
    reward: Reward,
    token: str | None = None,
    max_request_bytes: int = int(DEFAULT_MAX_MB * 2**20),
    concurrent: bool = False,
    limits: Limits | None = None,
    max_decoding: int | None = None,
    max_bodies_bytes: int | None = None,
    receive_timeout: float = DEFAULT_RECEIVE_TIMEOUT_S,
) -> Any:
    """The FastAPI app serving ``reward``: one request at a time, or ``concurrent`` ones (thread-safe rewards).

    ``limits`` bounds what one request may decode (default: the module's ``DEFAULT_MAX_*``);
    ``max_decoding`` requests at most are parsed, decoded or scored at once (default 2, or 8 with
    ``concurrent``). ``max_bodies_bytes`` bounds the bytes of all bodies held at once, being
    received or waiting to be decoded (default ``DEFAULT_BODIES_FACTOR`` request bodies); a body
    that would go past it is answered 503 before it is read. A body must arrive within
    ``receive_timeout`` seconds (408 after).
    """
    import asyncio

    fastapi = _require_fastapi()
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    if max_request_bytes < 1:
        raise UserError(f"the request size limit must be positive, got {max_request_bytes}")
    if max_bodies_bytes is None:
        max_bodies_bytes = DEFAULT_BODIES_FACTOR * max_request_bytes
    if max_bodies_bytes < max_request_bytes:
        raise UserError(
            f"the bytes of bodies held at once ({max_bodies_bytes}) must be at least the request size limit "
            f"({max_request_bytes}), else a request of that size could never be taken"
        )
    if not (isinstance(receive_timeout, (int, float)) and math.isfinite(receive_timeout) and receive_timeout > 0):
        raise UserError(f"the time to receive a request must be a positive number of seconds, got {receive_timeout}")
    limits = limits or Limits(
        DEFAULT_MAX_IMAGES,
        DEFAULT_MAX_IMAGE_PIXELS,
        DEFAULT_MAX_REQUEST_PIXELS,
        DEFAULT_MAX_FRAMES,
        DEFAULT_MAX_JSON_VALUES,
    )
    for name in ("max_images", "max_image_pixels", "max_request_pixels", "max_frames", "max_json_values"):
        value = getattr(limits, name)
        if value is not None and value < 1:
            raise UserError(f"the server limit {name} must be positive, got {value}")
    slots_n = max_decoding if max_decoding is not None else (8 if concurrent else DEFAULT_MAX_DECODING)
    if slots_n < 1:
        raise UserError(f"the number of requests decoded at once must be positive, got {slots_n}")
    slots = asyncio.Semaphore(slots_n)  # made here, used on the server's loop (asyncio binds it on first use)
    bodies = _Budget(max_bodies_bytes)
    # no /docs, /redoc or /openapi.json: the protocol is documented in the package, and a schema
    # served without the token would describe a server that asks for one
    app = fastapi.FastAPI(
        title=f"precise-rl reward server: {reward.name}", docs_url=None, redoc_url=None, openapi_url=None
    )
    lock = contextlib.nullcontext() if concurrent else threading.Lock()
    expected = token.encode() if token else None

    def authorised(header: str) -> bool:
        # RFC 9110: the scheme is case-insensitive ("bearer", "BEARER"); the token itself is not.
        scheme, _, credentials = header.strip().partition(" ")
        given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, expected or b"")

    def parse(body: bytearray) -> tuple[torch.Tensor, list[str], list[dict]] | tuple[int, str]:
        """The request, or the error answer's (status, sentence); runs in a worker thread.

        No exception leaves this thread: one that did would reach the event loop through a future
        whose traceback holds this frame and ``body`` in a reference cycle, which only the cyclic
        garbage collector frees, long after the body was given back to ``bodies``. Memory held that
        way is counted by no bound, so each error is made a sentence here and its traceback dropped.
        """
        try:
            check_json_budget(body, limits)  # before parsing: what parsing may allocate is bounded by it
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
        except RequestTooLarge as exc:
            return 413, f"request too large: {exc}"
        except ProtocolError as exc:
            return 400, f"malformed request: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. a PNG that breaks the decoder: still the request's fault
            return 400, f"malformed request: it could not be decoded ({type(exc).__name__})"

    def error(status: int, detail: str, close: bool = False) -> Any:
        # close: the rest of a body is not read, so the connection cannot carry another request
        headers = {"Connection": "close"} if close else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def score(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict | tuple[int, str]:
        """The answer, or the error answer's (status, sentence); runs in a worker thread (see ``parse``)."""
        try:
            with lock, torch.no_grad():
                try:
                    out = reward(images, prompts, metadata)
                except UserError as exc:  # the reward's own sentence on what it cannot take
                    return 422, f"reward {reward.name!r} cannot take this request: {exc}"
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
        except Exception as exc:  # noqa: BLE001 - the client marks these images; the server stays up
            return 500, f"reward {reward.name!r} failed: {type(exc).__name__}: {exc}"

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "protocol": PROTOCOL}

    async def receive_body(request: Any, body: bytearray, held: int) -> tuple[Any, int]:
        """The body read into ``body``: None, or the error answer; and the bytes reserved for it in ``bodies``.

        ``body`` grows in place (a large buffer by mremap, without a copy): joining chunks would hold
        the body twice for a moment, outside what ``bodies`` counts.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + receive_timeout
        total = 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                detail = f"the body did not arrive within {receive_timeout:g} s ({total} bytes came)"
                # one line per disconnect: the connection's own deadline (connections.py) leaves a
                # request whose body the app is reading to the app, and the two may fire together
                LOG.warning("answered 408 to %s and closed the connection: %s", _client(request), detail)
                return error(408, detail, close=True), held
            total += len(chunk)
            if total > max_request_bytes:
                return error(413, f"request body is over the limit of {max_request_bytes} bytes", close=True), held
            if total > held:  # a body without Content-Length, or longer than it said
                if not bodies.take(total - held):
                    return error(503, busy, close=True), held
                held = total
            body += chunk
        return None, held

    busy = "the server holds as many request bodies as it may at once (--max-bodies-mb); retry later"

    async def score_endpoint(request: Any) -> Any:
        if expected is not None and not authorised(request.headers.get("authorization", "")):
            return error(401, "missing or wrong bearer token", close=True)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            return error(
                413, f"request body of {int(length)} bytes is over the limit of {max_request_bytes}", close=True
            )
        held = int(length) if length is not None and length.isdigit() else 0
        if not bodies.take(held):  # refused before a byte of it is read
            return error(503, busy, close=True)
        body = bytearray()
        try:
            try:
                refused, held = await receive_body(request, body, held)
            except ClientDisconnect:
                LOG.warning("client %s went away while sending its request body", _client(request))
                return error(400, "the client went away", close=True)
            if refused is not None:
                return refused
            async with slots:  # bounds the decoded images held at once, whatever the number of clients
                # Characters wider than a byte make the parsed text and strings up to 4 times as large
                # (an emoji in 15 MB of base64): the excess is reserved in ``bodies`` before parsing.
                extra = await run_in_threadpool(text_reserve, body)
                if extra:
                    if held + extra > max_bodies_bytes:
                        return error(
                            413,
                            f"request too large: its text holds characters wider than a byte, so parsing it may "
                            f"take {held + extra} bytes, over the {max_bodies_bytes} of --max-bodies-mb",
                        )
                    if not bodies.take(extra):
                        return error(503, busy)
                    held += extra
                parsed = await run_in_threadpool(parse, body)
                body.clear()
                bodies.give(held)  # parsed: the pixels are bounded by the decoding slots from here
                held = 0
                if len(parsed) == 2:  # (status, sentence)
                    return error(*parsed)
                images, prompts, metadata = parsed
                del parsed
                if images.ndim == 5 and not getattr(reward, "accepts_video", False):
                    return error(
                        415,
                        f"reward {reward.name!r} scores images, not videos: start the server with --set "
                        "frames=first,middle,last (or all, or frame indices) to score frames of each video, or "
                        "send images",
                    )
                answer = await run_in_threadpool(score, images, prompts, metadata)
                return error(*answer) if isinstance(answer, tuple) else answer
        finally:
            # Emptied here, the buffer is freed as its bytes are given back, even where a reference
            # to it outlives the request (an exception's traceback in a cycle, freed only by the
            # cyclic garbage collector): what ``bodies`` counts is what is held.
            body.clear()
            bodies.give(held)

    # the annotation FastAPI reads to pass the raw request (a string under postponed annotations)
    score_endpoint.__annotations__["request"] = fastapi.Request
    app.post("/score")(score_endpoint)
    return app


def _client(request: Any) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "a client"


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
    max_bodies_bytes: int | None = None,
    receive_timeout: float = DEFAULT_RECEIVE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Run the server until interrupted; ``on_ready()`` is called once the address is bound.

    The socket is bound here, before uvicorn starts, so that an address in use is one sentence
    (a :class:`UserError`) and nothing claims to be serving before it is. At most ``max_connections``
    are open at once and each request must arrive within ``receive_timeout`` seconds
    (:mod:`precise_rl.rewards.connections`).
    """
    _require_fastapi()
    import socket

    import uvicorn

    if not _is_loopback(host) and token is None and not allow_open:
        raise UserError(
            f"binding to {host} without a token lets anyone on the network use this reward; set a token "
            f"(--token-file or {TOKEN_ENV}) or pass --allow-open"
        )
    if max_connections < 1:
        raise UserError(f"the number of open connections must be positive, got {max_connections}")
    app = create_app(
        reward, token, max_request_bytes, concurrent, limits, max_decoding, max_bodies_bytes, receive_timeout
    )
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise UserError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host"
        ) from None
    try:
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            http=bounded_protocol(max_connections, receive_timeout),
        )
        server = uvicorn.Server(config)
        if on_ready is not None:
            on_ready()
        server.run(sockets=[sock])
    finally:
        sock.close()
