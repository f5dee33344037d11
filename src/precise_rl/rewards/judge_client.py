"""Requests to vision-language judges behind OpenAI-compatible APIs (vLLM, SGLang), on the ``openai`` client.

:class:`JudgeClient` sends one chat request (images as base64 data URLs, then the instruction) to one of
several servers in turn (round-robin, as the reference's ``unifiedreward_score_v2`` does), with at most
``concurrency`` requests in flight per server. A request that times out, cannot connect, or is answered
5xx or 429 (rate limited) is retried ``retries`` times after ``backoff * 2**k`` seconds (at most
``backoff_max``; a 429's ``Retry-After`` is waited for when it is longer), each retry going to the next
server. A 4xx answer is not retried: 401/403 (the key refused) and 404 (no such model or route) are
returned as such, for the reward to stop on; others leave the request unanswered.

The API key comes from the environment variable ``api_key_env`` or the file ``api_key_file``; it is never
an option's value, so it is never in a run's saved config, and it appears in no message.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

__all__ = ["JudgeClient", "Answer", "encode_image", "encode_video", "normalize_url", "read_api_key", "API_KEY_ENV"]

#: the environment variable the judge's API key is read from by default
API_KEY_ENV = "PRECISE_RL_JUDGE_API_KEY"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Answer:
    """One request's outcome: the judge's text, or why there is none.

    ``kind``: "" (answered), "failed" (no answer after the retries, or a 4xx other than those below),
    "rejected" (401/403), "missing" (404: the server has no such model).
    """

    text: str | None = None
    kind: str = ""
    reason: str = ""
    server: str = ""


def normalize_url(url: str) -> str:
    """A server's root URL from its root or ``/v1`` URL (as the reference's ``normalize_unifiedreward_base_url``)."""
    root = url.strip().rstrip("/")
    return root[:-3] if root.endswith("/v1") else root


def read_api_key(api_key_env: str | None, api_key_file: str | None) -> str | None:
    """The key from ``api_key_file`` (its first line) or else the environment variable ``api_key_env``."""
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).expanduser().read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UserError(f"cannot read the judge's api_key_file {str(api_key_file)!r} ({reason})") from None
        if not lines or not lines[0].strip():
            raise UserError(f"the judge's api_key_file {str(api_key_file)!r} is empty")
        return lines[0].strip()
    if api_key_env is None:
        return None
    if not isinstance(api_key_env, str) or not _ENV_NAME.fullmatch(api_key_env):
        # the value itself may be a key put in the wrong option: never repeat it
        raise UserError(
            "the judge's api_key_env must be the name of an environment variable (letters, digits, '_'); "
            "put the key itself in that variable or in a file named by api_key_file, never in the config"
        )
    return os.environ.get(api_key_env, "").strip() or None


def encode_video(frames: torch.Tensor, resolution: int | None, fps: int) -> str:
    """A video ``(F, C, H, W)`` in [0, 1] as a ``data:video/mp4;base64,`` URL (H.264), longer side ``resolution``."""
    from ..videos import mp4_bytes

    frames = frames.detach().float().clamp(0, 1).cpu()
    frames = frames.expand(-1, 3, -1, -1) if frames.shape[1] == 1 else frames
    h, w = frames.shape[-2:]
    if resolution is not None and max(h, w) != resolution:
        scale = resolution / max(h, w)
        size = (max(2, round(h * scale)), max(2, round(w * scale)))
        frames = torch.nn.functional.interpolate(frames, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return f"data:video/mp4;base64,{base64.b64encode(mp4_bytes(frames, fps)).decode('ascii')}"


def encode_image(image: torch.Tensor, resolution: int | None, fmt: str) -> str:
    """A ``(C, H, W)`` image in [0, 1] as a ``data:image/...;base64,`` URL, its longer side ``resolution``."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = array.expand(3, *array.shape[1:]) if array.shape[0] == 1 else array
    pil = Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")
    if resolution is not None and max(pil.size) != resolution:
        scale = resolution / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.BICUBIC)
    buffer = io.BytesIO()
    if fmt == "png":
        pil.save(buffer, format="PNG")
    else:
        pil.save(buffer, format="JPEG", quality=95)  # the reference's encoding
    mime = "png" if fmt == "png" else "jpeg"
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


class JudgeClient:
    """Chat requests with images to one or more OpenAI-compatible servers (see the module's text)."""

    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        api_key: str | None,
        *,
        concurrency: int,
        timeout: float,
        retries: int,
        backoff: float,
        backoff_max: float,
        max_tokens: int,
        temperature: float,
    ) -> None:
        self.urls = [normalize_url(u) for u in urls]
        self.model = model
        self._api_key = api_key or "EMPTY"  # vLLM without --api-key takes any key; the client needs one
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.backoff_max = backoff, backoff_max
        self.max_tokens, self.temperature = max_tokens, temperature
        self._clients: list[Any] | None = None
        self._lock = threading.Lock()
        self._ring = itertools.cycle(range(len(self.urls)))
        self._slots = [threading.BoundedSemaphore(concurrency) for _ in self.urls]
        self.stats = {"requests": 0, "retries": 0}

    def __getstate__(self) -> dict[str, Any]:  # a copy (e.g. a forked worker) builds its own connections
        state = dict(self.__dict__)
        state.update(_clients=None, _lock=None, _ring=None, _slots=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._ring = itertools.cycle(range(len(self.urls)))
        self._slots = [threading.BoundedSemaphore(self.concurrency) for _ in self.urls]

    def clients(self) -> list[Any]:
        """One ``openai.OpenAI`` client per server (built on first use; they are thread-safe)."""
        with self._lock:
            if self._clients is None:
                try:
                    import openai
                except ImportError:
                    raise UserError(
                        "the vlm_judge reward needs the openai package: pip install 'precise-rl[judge]'"
                    ) from None
                self._clients = [
                    openai.OpenAI(base_url=f"{u}/v1", api_key=self._api_key, timeout=self.timeout, max_retries=0)
                    for u in self.urls
                ]
            return self._clients

    def next_server(self) -> int:
        """The index of the server the next request goes to (round-robin)."""
        with self._lock:
            return next(self._ring)

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def ask(self, images: Sequence[str], text: str, server: int) -> Answer:
        """One chat request (``images``: data URLs, shown in order before ``text``) with its retries."""
        import openai

        clients = self.clients()
        # a video (an MP4 data URL) goes as vLLM's and SGLang's "video_url" part, an image as "image_url"
        content: list[dict[str, Any]] = [
            {"type": "video_url", "video_url": {"url": url}}
            if url.startswith("data:video/")
            else {"type": "image_url", "image_url": {"url": url}}
            for url in images
        ]
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        last, last_exc, k = "", None, server
        for attempt in range(self.retries + 1):
            k = (server + attempt) % len(clients)  # a retry tries the next server
            if attempt:
                self._count("retries")
                time.sleep(min(self.backoff_max, max(self.backoff * 2 ** (attempt - 1), _retry_after(last_exc))))
            self._count("requests")
            last_exc = None
            try:
                with self._slots[k]:
                    response = clients[k].chat.completions.create(
                        model=self.model,
                        messages=messages,
                        max_tokens=self.max_tokens,
                        temperature=self.temperature,
                    )
                choices = response.choices or []
                message = choices[0].message.content if choices else None
                return Answer(text=message if isinstance(message, str) else "", server=self.urls[k])
            except openai.APIStatusError as exc:
                last_exc = exc
                status = exc.status_code
                detail = _detail(exc)
                if status in (401, 403):
                    return Answer(kind="rejected", reason=f"HTTP {status}: {detail}", server=self.urls[k])
                if status == 404:
                    return Answer(kind="missing", reason=f"HTTP 404: {detail}", server=self.urls[k])
                last = f"HTTP {status}: {detail}"
                if status < 500 and status not in (408, 429):
                    return Answer(kind="failed", reason=last, server=self.urls[k])
            except openai.APITimeoutError:
                last = f"no answer within {self.timeout:g} s"
            except openai.APIConnectionError as exc:
                cause = exc.__cause__
                last = f"cannot connect ({type(cause).__name__ if cause else 'connection error'})"
            except (IndexError, AttributeError, TypeError) as exc:  # an answer that is not a chat completion
                last = f"an answer that is not a chat completion ({type(exc).__name__})"
        return Answer(kind="failed", reason=f"{last} (after {self.retries + 1} attempts)", server=self.urls[k])

    def close(self) -> None:
        """Close the connections (new ones are made on the next request)."""
        with self._lock:
            for client in self._clients or []:
                client.close()
            self._clients = None


def _detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return str(message)[:200]
    return str(getattr(exc, "message", "") or type(exc).__name__)[:200]


def _retry_after(exc: Any) -> float:
    """The seconds a 429's ``Retry-After`` header asks for (0 when there is none)."""
    response = getattr(exc, "response", None)
    try:
        return max(0.0, float(response.headers.get("retry-after", 0))) if response is not None else 0.0
    except (TypeError, ValueError):
        return 0.0
