"""Rewards scored by a reward server (``precise-rl serve-reward``): the ``remote`` and ``geneval`` clients.

A batch is split into requests of ``max_batch`` images sent concurrently by a pool of ``workers``
threads (the server queues them; the client's encoding, the network and the scoring overlap).
Each request has a ``timeout``, a deadline for the whole exchange (connecting, sending, the answer's
headers and body), and is retried ``retries`` times with exponential backoff
(``backoff * 2**k`` seconds, at most ``backoff_max``) when the server cannot be reached, times out,
answers 5xx/429 or answers something that is not the protocol (an answer over ``max_response_mb`` is
not read past that size and counts as such). A request still failing after its
retries leaves its images unscored: their score is NaN and the field ``unscored`` is 1, so the
trainer leaves them out of the advantages and counts them. A request the server calls malformed
(400) is not retried; a body over the server's limit (413) is split in halves. Three things stop
training instead (the trainer saves a checkpoint first): a server that refuses the token (401/403,
:class:`RewardServerRejected`), a server whose reward cannot take the requests (415, 422: a
:class:`UserError` with the server's sentence) and a server from which ``stop_after`` calls in a
row got no score at all (:class:`RewardServerDown`).

The token comes from the environment variable ``token_env`` (default ``PRECISE_RL_REWARD_TOKEN``)
or ``token_file``; it is never part of the config, which runs save with their checkpoints, and
never part of a message (a token that cannot go in an HTTP header is refused without quoting it).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .base import Reward, register_reward
from .failures import RewardServerDown, RewardServerRejected
from .protocol import (
    DEFAULT_PORT,
    TOKEN_ENV,
    ProtocolError,
    build_request,
    encode_images,
    parse_response,
    read_token,
)

__all__ = ["RemoteReward", "GenEvalRemote", "PendingScores", "UNSCORED", "read_prompt_metadata"]

#: the extra field, 1.0 for each image a remote reward could not score
UNSCORED = "unscored"


@dataclass
class _Outcome:
    """One request's result: scores by field, or why it failed (``kind``: unreachable, rejected, invalid)."""

    scores: dict[str, list[float]] | None = None
    reward: str | None = None
    kind: str = ""
    reason: str = ""


class _Retryable(Exception):
    pass


class _Expired(Exception):
    """The request's deadline passed (its socket was shut down under it)."""


#: bytes read from the socket at a time while an answer is read against its size cap
_READ_CHUNK = 1 << 16


def _positive(value: Any, name: str, integer: bool = False, zero: bool = False) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        kind = "integer" if integer else "number"
        raise UserError(f"remote reward option {name} must be a {'non-negative' if zero else 'positive'} {kind}")
    return value


class PendingScores:
    """Scores being fetched: ``result()`` waits for them (see :meth:`RemoteReward.submit`)."""

    def __init__(self, owner: RemoteReward, futures: list[tuple[slice, Future]], batch: int, device: torch.device):
        self._owner, self._futures, self._batch, self._device = owner, futures, batch, device
        self._result: dict[str, torch.Tensor] | None = None

    def done(self) -> bool:
        """True once every request of the batch has its answer (or has given up)."""
        return all(future.done() for _, future in self._futures)

    def result(self) -> dict[str, torch.Tensor]:
        """Wait for the scores (computed once; a second call returns the same dict)."""
        if self._result is None:
            self._result = self._owner._assemble(self._futures, self._batch, self._device)
        return self._result


@register_reward("remote")
class RemoteReward(Reward):
    """A reward computed by a reward server at ``url``, e.g. ``http://127.0.0.1:18085``.

    Returns the server reward's own score under this reward's name (e.g. ``remote@hps``), its extra
    fields, and ``unscored`` (1 where no score could be had, the score being NaN there).
    ``metadata_file`` (JSON lines, each an object with a ``"prompt"``) adds each prompt's entry to
    the metadata sent with its images, e.g. GenEval's ``evaluation_metadata.jsonl``. Videos
    ``(B, F, C, H, W)`` are sent as videos (their frames as PNGs) for a server whose reward scores
    videos; with option ``frames`` the chosen frames go as images to a server of an image reward.
    """

    may_fail = True
    accepts_video = True

    def __init__(
        self,
        url: str | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 2.0,
        backoff_max: float = 30.0,
        max_batch: int = 16,
        workers: int = 4,
        stop_after: int = 2,
        token_env: str | None = TOKEN_ENV,
        token_file: str | None = None,
        metadata_file: str | None = None,
        max_response_mb: float = 16.0,
    ) -> None:
        if url is None:
            # Without a url the client would retry the default address for minutes before giving up:
            # say where it looks, once, so that a forgotten option is seen at the start.
            url = f"http://127.0.0.1:{DEFAULT_PORT}"
            import sys

            print(
                f"warning: remote reward has no url; using {url}, where precise-rl serve-reward listens by "
                "default (set reward.options.<name>.url to the server's address)",
                file=sys.stderr,
            )
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UserError(f"remote reward url must look like http://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self._scheme, self._host = parsed.scheme, parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._path = parsed.path.rstrip("/") + "/score"
        self.timeout = float(_positive(timeout, "timeout"))
        self.retries = _positive(retries, "retries", integer=True, zero=True)
        self.backoff = float(_positive(backoff, "backoff", zero=True))
        self.backoff_max = float(_positive(backoff_max, "backoff_max", zero=True))
        self.max_batch = _positive(max_batch, "max_batch", integer=True)
        self.workers = _positive(workers, "workers", integer=True)
        self.stop_after = _positive(stop_after, "stop_after", integer=True)
        self.max_response_mb = float(_positive(max_response_mb, "max_response_mb"))
        self._max_response_bytes = max(1, int(self.max_response_mb * 2**20))
        self._token = read_token(token_file, token_env)
        self.metadata_file = metadata_file
        self._by_prompt = read_prompt_metadata(metadata_file) if metadata_file is not None else {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self.down_streak = 0  #: calls in a row that got no score at all
        self.fields: list[str] = []  #: the extra fields the server has answered so far (NaN in calls without)
        self.stats = {"requests": 0, "retries": 0, "unscored": 0}
        self._stats_lock = threading.Lock()  # the worker threads count requests and retries

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    # ------------------------------------------------------------------ transport

    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """One exchange, all of it within ``timeout`` seconds: (status, answer body of at most the size cap)."""
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        conn = self._connection()
        expired = threading.Event()

        def expire() -> None:
            # A socket timeout bounds each read alone: a server sending a byte every few seconds would
            # hold the request for ever. Shutting the socket down ends whatever read is under way.
            expired.set()
            if conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            try:
                conn.request("POST", self._path, body=body, headers=headers)
            except OSError as exc:
                # A server may answer before it has read the body (413 past its size limit, 503 when it
                # holds as many bodies as it may) and close the connection: the send fails, but the
                # answer is there to be read, and a 413 must reach the caller, which splits the request.
                if expired.is_set() or conn.sock is None:  # never connected: there is no answer
                    raise
                try:
                    response = conn.getresponse()
                except (OSError, http.client.HTTPException):
                    raise exc from None
            else:
                response = conn.getresponse()
            data = self._read_capped(response)
            if expired.is_set():  # the read ended because the socket was shut down, not with the answer
                raise _Expired()
            return response.status, data
        except (OSError, http.client.HTTPException):
            if expired.is_set():
                raise _Expired() from None
            raise
        finally:
            timer.cancel()
            conn.close()

    def _read_capped(self, response: http.client.HTTPResponse) -> bytes:
        """The answer's body, refused (retryable) once past ``max_response_mb`` without reading the rest."""
        cap = self._max_response_bytes
        too_large = _Retryable(
            f"an answer over {self.max_response_mb:g} MB, the remote reward option max_response_mb; raise it "
            "if the server's answers are that large"
        )
        length = response.getheader("Content-Length", "")
        if length.strip().isdigit() and int(length) > cap:
            raise too_large
        chunks, total = [], 0
        while True:
            chunk = response.read1(_READ_CHUNK)
            if not chunk:
                if response.length:  # the connection ended before the length the headers announced
                    raise http.client.IncompleteRead(b"", response.length)
                return b"".join(chunks)
            total += len(chunk)
            if total > cap:
                raise too_large
            chunks.append(chunk)

    def _detail(self, data: bytes) -> str:
        try:
            detail = json.loads(data).get("detail")
            return str(detail) if detail else data[:200].decode("utf-8", "replace")
        except (ValueError, AttributeError):
            return data[:200].decode("utf-8", "replace")

    def _attempt(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> _Outcome:
        """One request with its retries; splits itself in halves on 413."""
        body = json.dumps(build_request(images, prompts, metadata), allow_nan=False).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(min(self.backoff_max, self.backoff * 2 ** (attempt - 1)))
            self._count("requests")
            try:
                status, data = self._post(body)
                if status in (401, 403):
                    return _Outcome(kind="rejected", reason=f"HTTP {status}: {self._detail(data)}")
                if status in (415, 422):  # e.g. videos sent to an image reward: no retry, no split helps
                    return _Outcome(kind="unsupported", reason=f"HTTP {status}: {self._detail(data)}")
                if status == 413:
                    if images.shape[0] == 1:
                        what = "video" if images.ndim == 5 else "image"
                        return _Outcome(kind="invalid", reason=f"one {what} is over the server's request limit")
                    half = images.shape[0] // 2
                    first = self._attempt(images[:half], prompts[:half], metadata[:half])
                    second = self._attempt(images[half:], prompts[half:], metadata[half:])
                    return _merge(first, second, half, images.shape[0] - half)
                if status == 400:
                    return _Outcome(kind="invalid", reason=f"HTTP {status}: {self._detail(data)}")
                if status != 200:
                    raise _Retryable(f"HTTP {status}: {self._detail(data)}")
                try:
                    reward, scores = parse_response(json.loads(data), images.shape[0])
                except (ValueError, ProtocolError) as exc:
                    raise _Retryable(f"an answer that is not the protocol ({exc})") from None
                return _Outcome(scores=scores, reward=reward)
            except _Retryable as exc:
                last = str(exc)
            except (TimeoutError, _Expired):  # socket.timeout is TimeoutError
                last = f"no answer within {self.timeout:g} s (the remote reward option timeout)"
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return _Outcome(kind="unreachable", reason=f"{last} (after {self.retries + 1} attempts)")

    # ------------------------------------------------------------------ scoring

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"reward-{self.name or 'remote'}")
            return self._pool

    def submit(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> PendingScores:
        """Start scoring in the background; ``.result()`` gives what ``__call__`` returns."""
        channels = images.shape[2] if images.ndim == 5 else images.shape[1] if images.ndim == 4 else 0
        if channels not in (1, 3):
            raise UserError(
                f"reward {self.name!r} needs images shaped (B, 1 or 3, H, W) or videos (B, F, 1 or 3, H, W), "
                f"got {tuple(images.shape)}"
            )
        batch = images.shape[0]
        if len(prompts) != batch or len(metadata) != batch:
            raise UserError(
                f"reward {self.name!r} got {batch} images, {len(prompts)} prompts, {len(metadata)} metadata"
            )
        if self._by_prompt:  # the file's entry of each prompt, under what the batch's own metadata says
            metadata = [{**self._by_prompt.get(p, {}), **dict(m)} for p, m in zip(prompts, metadata, strict=True)]
        metadata = [_images_as_png(m) for m in metadata]
        self._check_metadata(metadata)
        cpu = images.detach().cpu()
        pool = self._executor()
        futures = []
        for lo in range(0, batch, self.max_batch):
            sl = slice(lo, min(batch, lo + self.max_batch))
            meta = [dict(m) for m in metadata[sl]]
            futures.append((sl, pool.submit(self._attempt, cpu[sl], list(prompts[sl]), meta)))
        return PendingScores(self, futures, batch, images.device)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        return self.submit(images, prompts, metadata).result()

    def _check_metadata(self, metadata: Sequence[Mapping[str, Any]]) -> None:
        for k, meta in enumerate(metadata):
            try:
                json.dumps(dict(meta), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise UserError(f"reward {self.name!r}: the metadata of image {k} is not JSON ({exc})") from None

    def _assemble(self, futures: list[tuple[slice, Future]], batch: int, device: torch.device) -> dict:
        name = self.name or "remote"
        fields: dict[str, torch.Tensor] = {name: torch.full((batch,), math.nan, dtype=torch.float64)}
        unscored = torch.ones(batch, dtype=torch.float64)
        unreachable: list[str] = []
        scored_any = False
        rejected = unsupported = None
        for sl, future in futures:
            out = future.result()
            if out.kind == "rejected":
                rejected = out.reason
            if out.kind == "unsupported":
                unsupported = out.reason
            if out.kind == "unreachable":
                unreachable.append(out.reason)
            if out.scores is None:
                continue
            scored_any = True
            for field, values in out.scores.items():
                key = name if field == out.reward else field
                if key == UNSCORED:
                    continue
                if key not in fields:
                    fields[key] = torch.full((batch,), math.nan, dtype=torch.float64)
                fields[key][sl] = torch.tensor(values, dtype=torch.float64)
            unscored[sl] = torch.isnan(fields[name][sl]).double()
        # a call whose requests all failed still has every field seen before, NaN, so that its chunk
        # joins the others of the rollout
        self.fields += [k for k in fields if k != name and k not in self.fields]
        for key in self.fields:
            fields.setdefault(key, torch.full((batch,), math.nan, dtype=torch.float64))
        if unsupported is not None:
            what = "score videos" if unsupported.startswith("HTTP 415") else "take these requests"
            raise UserError(f"reward server {self.url} cannot {what} ({unsupported})")
        if rejected is not None:
            raise RewardServerRejected(f"reward server {self.url} refused the token ({rejected}); set {TOKEN_ENV}")
        if scored_any:
            self.down_streak = 0
        elif unreachable:  # nothing came back, and not because the server judged the requests malformed
            self.down_streak += 1
            if self.down_streak >= self.stop_after:
                raise RewardServerDown(
                    f"reward server {self.url} gave no score in {self.down_streak} calls in a row ({unreachable[-1]})"
                )
        self._count("unscored", int(unscored.sum()))
        out = {k: v.float().to(device) for k, v in fields.items()}
        out[UNSCORED] = unscored.float().to(device)
        return out

    def close(self) -> None:
        """Stop the worker threads (they also stop when the process ends)."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def _merge(first: _Outcome, second: _Outcome, n1: int, n2: int) -> _Outcome:
    """Two halves of a split request as one outcome (a failed half becomes NaN scores)."""
    if first.scores is None and second.scores is None:
        return first if first.kind == "rejected" else second
    if "rejected" in (first.kind, second.kind):
        return first if first.kind == "rejected" else second
    reward = first.reward or second.reward
    keys = set(first.scores or {}) | set(second.scores or {})
    scores = {}
    for key in keys:
        a = (first.scores or {}).get(key, [math.nan] * n1)
        b = (second.scores or {}).get(key, [math.nan] * n2)
        scores[key] = list(a) + list(b)
    return _Outcome(scores=scores, reward=reward)


def _images_as_png(meta: Mapping[str, Any]) -> dict[str, Any]:
    """An image tensor ``(C, H, W)`` in the metadata (an edit's ``source_image``) as a base64 PNG, as the images go."""
    return {
        k: encode_images(v[None])[0] if isinstance(v, torch.Tensor) and v.ndim == 3 and v.shape[0] in (1, 3) else v
        for k, v in meta.items()
    }


def read_prompt_metadata(path: str | Path) -> dict[str, dict]:
    """A JSON-lines file of per-prompt metadata (``{"prompt": ..., key: value, ...}`` a line): prompt -> keys."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise UserError(f"metadata_file must be the path of a JSON-lines file, got {path!r}")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(f"cannot read the metadata file {str(path)!r} ({reason})") from None
    entries: dict[str, dict] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise UserError(f"line {number} of the metadata file {str(path)!r} is not JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise UserError(f"line {number} of the metadata file {str(path)!r} is not an object with a 'prompt'")
        prompt = entry.pop("prompt")
        if prompt in entries and entries[prompt] != entry:
            raise UserError(f"the metadata file {str(path)!r} gives prompt {prompt!r} two different entries")
        entries[prompt] = entry
    if not entries:
        raise UserError(f"the metadata file {str(path)!r} holds no entries")
    return entries


# ----------------------------------------------------------------------------- GenEval

_GENEVAL_TAGS = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


@register_reward("geneval")
class GenEvalRemote(RemoteReward):
    """GenEval-style prompt alignment from a reward server running an object detector (``geneval_detector``).

    Every image's metadata must be its prompt's GenEval entry: ``{"tag": ..., "include": [{"class":
    "dog", "count": 2, "color": "red", "position": ["left of", 0]}, ...], "exclude": [...]}``, given
    with the batch or looked up by prompt in ``metadata_file`` (GenEval's ``evaluation_metadata.jsonl``). The
    server answers the fraction of the entry's requirements met (this reward's score) and ``strict``
    (1 when all are, GenEval's own metric).
    """

    accepts_video = False  # GenEval judges images: videos need the frames option

    def _check_metadata(self, metadata: Sequence[Mapping[str, Any]]) -> None:
        super()._check_metadata(metadata)
        for k, meta in enumerate(metadata):
            tag, include = meta.get("tag"), meta.get("include")
            if tag not in _GENEVAL_TAGS or not isinstance(include, list) or not include:
                hint = "" if self.metadata_file else " (or give the reward a metadata_file)"
                raise UserError(
                    f"reward {self.name!r}: image {k} needs GenEval metadata with a 'tag' in {sorted(_GENEVAL_TAGS)} "
                    f"and a non-empty 'include' list{hint}, got {dict(meta)!r}"
                )
