"""An OpenAI-compatible judge on loopback with scripted judgements, for the ``vlm_judge`` tests and benchmark.

``JudgeServer`` answers ``GET /health``, ``GET /v1/models`` and ``POST /v1/chat/completions`` on
127.0.0.1 (the real ``openai`` client talks to it over HTTP). By default it judges the way a careful
judge of brightness would: each image's score is its mean pixel value (decoded from the request's data
URL), so that a test can tell which row a score belongs to. A test sets ``script`` to change the answer
of each request (malformed text, a delay, 500, 429) and reads ``requests`` (what each request carried).
``max_in_flight`` makes it rate limited, as a loaded server is: a chat request that arrives while that
many are being answered is refused with 429 and a ``Retry-After`` of ``retry_after`` seconds.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Reply:
    """What the server does with one chat request: wait ``delay`` s, then answer ``text`` or fail with ``status``."""

    text: str = ""
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    """One chat request as the server saw it."""

    model: str
    text: str
    brightness: list[float]  # each image's mean pixel value in [0, 1]
    authorization: str
    started: float
    finished: float = 0.0
    videos: int = 0  # how many of the media were videos (``video_url`` parts)
    media: list[tuple[str, int, int]] = field(default_factory=list)  # each image's (MIME type, width, height)


def image_format(url: str) -> tuple[str, int, int]:
    """The MIME type, width and height of an image (or of an MP4's first frame) sent as a data URL."""
    mime = url.split(";", 1)[0].removeprefix("data:")
    data = base64.b64decode(url.split(",", 1)[1])
    if mime.startswith("video/"):
        from precise_rl.videos import read_mp4

        frames = read_mp4(data)[0]
        return mime, int(frames.shape[-1]), int(frames.shape[-2])
    width, height = Image.open(io.BytesIO(data)).size
    return mime, width, height


def image_brightness(url: str) -> float:
    """The mean pixel value in [0, 1] of an image (or an MP4 video) sent as a ``data:...;base64,`` URL."""
    data = base64.b64decode(url.split(",", 1)[1])
    if url.startswith("data:video/"):
        from precise_rl.videos import read_mp4

        return float(read_mp4(data)[0].double().mean())
    return float(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64).mean() / 255.0)


def unifiedreward_answer(alignment: float, coherence: float, style: float) -> str:
    """A well-formed UnifiedReward-v2 answer (the three lines its template asks for)."""
    return (
        "Some reasoning first.\n"
        f"Alignment Score (1-5): {alignment:.4f}\n"
        f"Coherence Score (1-5): {coherence:.4f}\n"
        f"Style Score (1-5): {style:.4f}"
    )


def brightness_judgement(seen: Seen) -> Reply:
    """The default judge: pointwise, scores ``1 + 4 b`` (alignment), ``2 + 2 b`` (coherence), ``3`` (style) for
    brightness ``b``; ``Score: 1 + 9 b`` for the generic template; pairwise, the brighter image is better."""
    if len(seen.brightness) == 2 and "two generated images" in seen.text:
        a, b = seen.brightness
        return Reply("Both images are equally good." if a == b else f"Image {1 if a > b else 2} is better.")
    b = float(np.mean(seen.brightness))
    if "Score: N" in seen.text:
        return Reply(f"Score: {1 + 9 * b:.4f}")
    return Reply(unifiedreward_answer(1 + 4 * b, 2 + 2 * b, 3.0))


class JudgeServer:
    """The server (see the module's text); use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, models: tuple[str, ...] = ("UnifiedReward",), api_key: str | None = None) -> None:
        self.models = models
        self.api_key = api_key  # when set, requests without "Bearer <key>" are answered 401
        self.script: Callable[[Seen], Reply] = brightness_judgement
        self.requests: list[Seen] = []
        self.health_status = 200
        self.max_in_flight: int | None = None
        self.retry_after = 0.0
        self.refused = 0  # chat requests refused for the rate limit (not in ``requests``)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url = ""

    @property
    def url(self) -> str:
        """Its address (kept once stopped, for messages that name it)."""
        assert self._url, "the server has not started"
        return self._url

    def start(self) -> JudgeServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(owner.health_status, {})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in owner.models]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                auth = self.headers.get("Authorization", "")
                if owner.api_key is not None and auth != f"Bearer {owner.api_key}":
                    self._send(401, {"error": {"message": "invalid api key"}})
                    return
                if body.get("model") not in owner.models:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                    return
                with owner._lock:
                    limited = owner.max_in_flight is not None and owner._in_flight >= owner.max_in_flight
                    owner.refused += limited
                    owner._in_flight += not limited
                if limited:
                    retry = {"Retry-After": f"{owner.retry_after:g}"}
                    self._send(429, {"error": {"message": "rate limited"}}, retry)
                    return
                try:
                    self._judge(body, auth)
                finally:
                    with owner._lock:
                        owner._in_flight -= 1

            def _judge(self, body: dict, auth: str) -> None:
                content = body["messages"][0]["content"]
                text = next(c["text"] for c in content if c["type"] == "text")
                urls = [c[c["type"]]["url"] for c in content if c["type"] in ("image_url", "video_url")]
                seen_videos = sum(c["type"] == "video_url" for c in content)
                seen = Seen(body["model"], text, [image_brightness(u) for u in urls], auth, time.perf_counter())
                seen.videos = seen_videos
                seen.media = [image_format(u) for u in urls]
                with owner._lock:
                    owner.requests.append(seen)
                reply = owner.script(seen)
                if reply.delay:
                    time.sleep(reply.delay)
                seen.finished = time.perf_counter()
                if reply.status != 200:
                    self._send(reply.status, {"error": {"message": f"scripted {reply.status}"}}, reply.headers)
                    return
                self._send(
                    200,
                    {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply.text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
