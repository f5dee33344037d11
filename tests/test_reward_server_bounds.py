"""The reward server's bounds on time, connections and memory, and the remote client's bounds on what it waits for.

Servers here are real (uvicorn in a thread, or ``precise-rl serve-reward`` in a process) or small
hand-written socket servers that misbehave on purpose (trickling a byte at a time, announcing a
1.5 GB answer), all on 127.0.0.1. Times appear only as generous limits that detect a hang.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from precise_rl.cli.serve_reward import main as server_main
from precise_rl.errors import UserError
from precise_rl.rewards import Reward, build_reward
from precise_rl.rewards.failures import RewardServerDown
from precise_rl.rewards.protocol import Limits, read_token

from . import tiny_pipelines as tp
from .test_reward_server import thread_server
from .test_reward_server_hostile import MeanPixel, _free_port

ROOT = Path(__file__).resolve().parents[1]


def _b64_png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _request(images: list[str], metadata: list[Any] | None = None) -> bytes:
    meta = metadata if metadata is not None else [{}] * len(images)
    return json.dumps({"protocol": 1, "images": images, "prompts": ["p"] * len(images), "metadata": meta}).encode()


def _post(port: int, body: bytes, path: str = "/score", timeout: float = 60, **headers: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, {"raw": raw.decode(errors="replace")}
    finally:
        conn.close()


def _get(port: int, path: str, timeout: float = 30) -> tuple[int, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0
    finally:
        conn.close()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@contextlib.contextmanager
def server_process(reward: str, *options: str, log: Path) -> Iterator[tuple[int, subprocess.Popen]]:
    """``precise-rl serve-reward`` in a process logging warnings to ``log``, once /health answers."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    cmd = [sys.executable, "-m", "precise_rl.cli.serve_reward", reward, "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as err:
        proc = subprocess.Popen([*cmd, *options], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the reward server process did not come up"
            try:
                if _get(port, "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield port, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _closed_by_peer(sock: socket.socket, wait: float) -> bool:
    """True when the other end has closed ``sock`` (EOF or reset) within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- the client: deadline, size, token


@contextlib.contextmanager
def _raw_server(handle: Any) -> Iterator[tuple[int, dict]]:
    """A socket server on 127.0.0.1 running ``handle(conn, state)`` for each connection in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    state: dict[str, Any] = {"sent": [], "stop": threading.Event()}

    def accept() -> None:
        while not state["stop"].is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn, state), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1], state
    finally:
        state["stop"].set()
        listener.close()


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += conn.recv(65536)


def _trickle(where: str) -> Any:
    """A server that sends its answer a byte every 0.2 s, for at most 30 s: in the headers or in the body."""

    def handle(conn: socket.socket, state: dict) -> None:
        with conn:
            _read_request(conn)
            answer = b'{"protocol": 1, "reward": "r", "scores": {"r": [0.5]}}'
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n"
            if where == "body":
                conn.sendall(head.encode())
            slow = (head.encode() if where == "headers" else b"") + answer
            until = time.monotonic() + 30
            try:
                for k in range(len(slow)):
                    if state["stop"].is_set() or time.monotonic() > until:
                        return
                    conn.sendall(slow[k : k + 1])
                    time.sleep(0.2)
            except OSError:
                return

    return handle


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_server_trickling_its_answer_is_cut_off_at_the_request_deadline(where: str) -> None:
    """A byte every 0.2 s never trips a per-read timeout of 1.5 s: the deadline covers the whole exchange."""
    with _raw_server(_trickle(where)) as (port, _):
        reward = build_reward("remote", url=f"http://127.0.0.1:{port}", timeout=1.5, retries=0, stop_after=1)
        t0 = time.monotonic()
        with pytest.raises(RewardServerDown, match=r"no answer within 1.5 s \(the remote reward option timeout\)"):
            reward(torch.rand(1, 3, 8, 8), ["p"], [{}])
        elapsed = time.monotonic() - t0
    print(f"\ntrickling {where}: the client gave up after {elapsed:.2f} s (deadline 1.5 s)")
    assert elapsed < 15, elapsed  # the whole answer would take 11 s or more at a byte per 0.2 s


def _huge(announce: bool) -> Any:
    """A server answering 200 with an endless body (1 MB blocks, 256 MB at most), announced as 1.5 GB or chunked."""

    def handle(conn: socket.socket, state: dict) -> None:
        with conn:
            _read_request(conn)
            block = b" " * 2**20
            if announce:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % int(1.5 * 2**30))
                frame = block
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                frame = b"%x\r\n" % len(block) + block + b"\r\n"
            sent = 0
            try:
                for _ in range(256):
                    conn.sendall(frame)
                    sent += len(block)
            except OSError:
                pass
            state["sent"].append(sent)

    return handle


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
def test_an_answer_over_the_size_cap_is_not_read(announce: bool) -> None:
    with _raw_server(_huge(announce)) as (port, state):
        reward = build_reward(
            "remote", url=f"http://127.0.0.1:{port}", max_response_mb=1, timeout=60, retries=0, stop_after=1
        )
        with pytest.raises(RewardServerDown, match=r"an answer over 1 MB, the remote reward option max_response_mb"):
            reward(torch.rand(1, 3, 8, 8), ["p"], [{}])
        deadline = time.monotonic() + 60
        while not state["sent"] and time.monotonic() < deadline:
            time.sleep(0.05)
    # the client closed the connection after (at most) its cap and the socket buffers: the server
    # could not send its 256 MB
    print(f"\nanswer of 256 MB offered ({'announced' if announce else 'chunked'}): {state['sent'][0] >> 20} MB sent")
    assert state["sent"] and state["sent"][0] < 64 * 2**20, state["sent"]
    with pytest.raises(UserError, match="max_response_mb"):
        build_reward("remote", url=f"http://127.0.0.1:{port}", max_response_mb=float("inf"))


@pytest.mark.parametrize("token", ["s3cret\ninjected", "s3cret injected", "s3cret\tinjected", "s3crét"])
def test_a_token_that_cannot_go_in_a_header_is_refused_without_being_shown(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRECISE_RL_TEST_TOKEN", token)
    with pytest.raises(UserError) as caught:
        build_reward("remote", url="http://127.0.0.1:9", token_env="PRECISE_RL_TEST_TOKEN")
    message = str(caught.value)
    assert "$PRECISE_RL_TEST_TOKEN" in message and "HTTP header" in message, message
    assert "s3cr" not in message and "injected" not in message, message
    if "\n" not in token:  # a token file's first line is the token
        (tmp_path / "token").write_text(token + "\n")
        with pytest.raises(UserError, match="from the token file") as caught:
            read_token(tmp_path / "token")
        assert "s3cr" not in str(caught.value)


# --------------------------------------------------------------------------- the server: what it answers


def test_no_schema_or_docs_are_served_by_a_server_with_a_token() -> None:
    with thread_server(MeanPixel(), token="s3cret") as url:
        for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
            status, _ = _get(_port(url), path)
            assert status == 404, (path, status)
        assert _get(_port(url), "/health")[0] == 200


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "-inf", "1e-9"])
def test_max_request_mb_must_be_a_positive_finite_size(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert server_main(["jpeg_compressibility", "--port", str(_free_port()), f"--max-request-mb={value}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("precise-rl serve-reward: error: --max-request-mb"), lines


def test_server_options_of_the_bounds_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    for args, words in (
        (["--max-bodies-mb", "1"], "--max-bodies-mb (1) must be at least --max-request-mb (64)"),
        (["--receive-timeout", "inf"], "--receive-timeout must be a positive finite number"),
        (["--max-connections", "0"], "--max-connections must be a positive integer"),
        (["--max-json-values", "0"], "--max-json-values must be a positive integer"),
    ):
        assert server_main(["jpeg_compressibility", "--port", str(_free_port()), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines


def test_sixteen_bit_pngs_are_scaled_not_clipped() -> None:
    rng = np.random.default_rng()
    grey = rng.integers(0, 65536, (12, 10), dtype=np.uint16)  # Pillow writes a uint16 array as a 16-bit grey PNG
    with thread_server(MeanPixel()) as url:
        status, body = _post(_port(url), _request([_b64_png(grey)]))
    assert status == 200, body
    got = body["scores"]["mean_pixel"][0]
    assert got == pytest.approx(float((grey >> 8).mean()) / 255.0, abs=1e-6)  # its 8 high bits
    assert got == pytest.approx(float(grey.mean()) / 65535.0, abs=1 / 255)  # the level it had


def test_an_image_that_is_not_a_png_is_a_400_naming_it() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng().random((6, 6), dtype=np.float32) * 3.0, mode="F").save(buf, "TIFF")
    with thread_server(MeanPixel()) as url:
        status, body = _post(_port(url), _request([base64.b64encode(buf.getvalue()).decode()]))
    assert status == 400 and "image 0 is not a PNG" in body["detail"], body


def test_a_body_refused_before_it_is_read_is_split_by_the_client() -> None:
    """A 413 answered on the ``Content-Length`` alone, the connection closed under the client's send, is split.

    16 images of noise make a body of some 4 MB against a limit of 512 kB: the server answers 413
    and closes before reading it, so the client's send fails; the answer is read all the same, and
    the halves, then quarters... are sent until each fits. With no retries, every image is scored.
    """
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    images = torch.rand(16, 3, 256, 256, generator=gen)
    want = ((images * 255).round() / 255).flatten(1).double().mean(1)
    with thread_server(MeanPixel(), max_request_bytes=2**19) as url:
        client = build_reward("remote", url=url, retries=0, max_batch=16, stop_after=1)
        out = client(images, [f"p{k}" for k in range(16)], [{}] * 16)
    assert out["unscored"].sum() == 0, out["unscored"]
    torch.testing.assert_close(out["remote"].double(), want, rtol=0, atol=1e-5)


def test_images_sent_to_a_video_reward_are_a_422_and_stop_the_client() -> None:
    with thread_server(build_reward("motion_smoothness")) as url:
        status, body = _post(_port(url), _request([_b64_png(np.zeros((8, 8, 3), np.uint8))]))
        assert status == 422, body
        assert body["detail"].startswith("reward 'motion_smoothness' cannot take this request:"), body
        client = build_reward("remote", url=url, retries=3, backoff=0.0)
        with pytest.raises(UserError, match="cannot take these requests .*HTTP 422"):
            client(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])
        assert client.stats["retries"] == 0


def test_image_similarity_is_served_with_its_source_images(tmp_path: Path) -> None:
    """The served reward gets each source image as a tensor, as the local one does: the same scores at 8 bits."""
    opts = tp.tiny_clip(tmp_path)
    local = build_reward("image_similarity", **opts)
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**31)))
    images = (torch.rand(3, 3, 16, 16, generator=gen) * 255).round() / 255  # 8-bit levels: exact on the wire
    sources = [(torch.rand(3, h, w, generator=gen) * 255).round() / 255 for h, w in ((20, 12), (16, 16), (9, 14))]
    meta = [{"source_image": s} for s in sources]
    want = local(images, ["a", "b", "c"], meta)["image_similarity"]
    served = build_reward("image_similarity", **opts)
    with thread_server(served) as url:
        client = build_reward("remote", url=url, retries=0)
        out = client(images, ["a", "b", "c"], meta)
        assert out["unscored"].tolist() == [0.0, 0.0, 0.0]
        torch.testing.assert_close(out["remote"], want.float(), rtol=0, atol=1e-5)
        # without a source: the reward's own sentence, a 4xx, and the client stops with it
        with pytest.raises(UserError, match="cannot take these requests .*came without one"):
            client(images[:1], ["a"], [{}])


def test_source_images_count_in_the_pixel_bound() -> None:
    img = _b64_png(np.zeros((10, 10, 3), np.uint8))
    with thread_server(MeanPixel(), limits=Limits(max_request_pixels=150)) as url:
        status, body = _post(_port(url), _request([img], [{"source_image": img}]))
    assert status == 413 and "source_image" in body["detail"] and "over 150 pixels" in body["detail"], body


# --------------------------------------------------------------------------- the server: JSON that expands


def _random_json(rng: np.random.Generator, depth: int = 0) -> Any:
    kind = rng.integers(0, 7 if depth < 4 else 4)
    if kind == 0:
        return int(rng.integers(-(10**6), 10**6))
    if kind == 1:
        return float(rng.normal())
    if kind == 2:
        return "".join(rng.choice(list('ab ,:[]{}"\\é'), size=int(rng.integers(0, 8))))
    if kind == 3:
        return [None, True, False][int(rng.integers(0, 3))]
    if kind in (4, 5):
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))]
    return {f"k{j}": _random_json(rng, depth + 1) for j in range(int(rng.integers(0, 5)))}


def _values(doc: Any) -> int:
    """JSON values of a parsed document, keys included, counted by walking it."""
    if isinstance(doc, list):
        return 1 + sum(_values(v) for v in doc)
    if isinstance(doc, dict):
        return 1 + sum(1 + _values(v) for v in doc.values())
    return 1


def test_the_count_before_parsing_bounds_the_values_parsed() -> None:
    from precise_rl.rewards.protocol import count_json_values

    rng = np.random.default_rng()
    for _ in range(300):
        doc = _random_json(rng)
        for text in (json.dumps(doc), json.dumps(doc, separators=(",", ":"), ensure_ascii=False)):
            assert count_json_values(text.encode()) >= _values(doc), text


def test_json_that_expands_when_parsed_is_refused_before_parsing() -> None:
    good = _b64_png(np.full((4, 4, 3), 51, np.uint8))
    # 3 MB of empty lists in the metadata: a million Python lists (some 60 MB) if it were parsed
    amplifying = _request([good], [{"x": [[]] * 1_000_000}])
    with thread_server(MeanPixel(), limits=Limits(max_json_values=10_000)) as url:
        status, body = _post(_port(url), amplifying)
        assert status == 413, body
        assert "over the limit of 10000 per request" in body["detail"] and "JSON values" in body["detail"], body
        status, body = _post(_port(url), _request([good], [{"x": [[]] * 100}]))
        assert status == 200 and body["scores"]["mean_pixel"] == [pytest.approx(0.2)], body


# --------------------------------------------------------------------------- the server: bodies and connections


_POOLS = {
    1: 'abcXYZ019+/= "\\\n\u00e9\u00ff',  # ASCII and Latin-1: a byte a character
    2: "\u0100\u4e2d\u6587\uffff",  # past U+00FF: two bytes
    4: "\U0001f600\U00010000",  # past U+FFFF: four bytes
}


def _width(text: str) -> int:
    top = max(map(ord, text), default=0)
    return 1 if top < 256 else 2 if top < 65536 else 4


def _strings(doc: Any) -> Iterator[str]:
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)


def test_text_width_bounds_the_widest_string_parsed() -> None:
    """``text_width`` of a body is at least the width of every string Python parses from it, raw or escaped."""
    from precise_rl.rewards.protocol import text_width

    rng = np.random.default_rng()
    for _ in range(300):
        widths = [w for w in (1, 2, 4) if rng.random() < 0.5] or [1]
        chars = "".join(_POOLS[w] for w in widths)
        doc = {
            "prompts": ["".join(rng.choice(list(chars), size=rng.integers(0, 12))) for _ in range(rng.integers(1, 4))],
            "metadata": [{"".join(rng.choice(list(chars), size=3)): "x"}],
        }
        for ascii_only in (True, False):
            body = json.dumps(doc, ensure_ascii=ascii_only).encode()
            widest = max(_width(t) for t in _strings(json.loads(body)))
            assert text_width(body) >= widest, (body, widest)
            if widest == 1 and "\\" not in "".join(_strings(doc)):  # no escaped backslash to mislead the count
                assert text_width(body) == 1, body


def test_parsing_a_wide_body_stays_within_what_is_reserved_for_it() -> None:
    """The memory json.loads takes for a body, measured, is at most twice its size plus ``text_reserve``.

    Bodies of 1 to 2 MB of base64 with one escape or one character of each width put at a random
    place, raw or escaped: the string is built piece by piece, and widened as it is built.
    """
    from precise_rl.rewards.protocol import text_reserve

    rng = np.random.default_rng()
    for width, char in ((1, "\n"), (1, "\u00e9"), (2, "\u4e2d"), (4, "\U0001f600")):
        for ascii_only in (True, False):
            n = int(rng.integers(2**20, 2**21))
            at = int(rng.integers(0, n))
            text = "A" * at + char + "A" * (n - at)
            body = json.dumps({"protocol": 1, "prompts": [text]}, ensure_ascii=ascii_only).encode()
            tracemalloc.start()
            try:
                parsed = json.loads(body)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert _width(parsed["prompts"][0]) == width
            reserve = text_reserve(body)
            assert (reserve == 0) == (b"\\" not in body and width == 1), (width, reserve)  # none for plain text
            assert peak <= 2 * len(body) + reserve + 2**16, (width, ascii_only, peak, len(body), reserve)


def test_a_body_of_wide_text_is_reserved_before_it_is_parsed() -> None:
    """An emoji in a prompt of an otherwise small request: the excess its text may take is held in --max-bodies-mb.

    Within the budget the request is scored; past it, 413 in one sentence (a client splits it).
    """
    good = _b64_png(np.full((4, 4, 3), 51, np.uint8))
    with thread_server(MeanPixel(), max_request_bytes=2**20, max_bodies_bytes=2**22) as url:
        port = _port(url)
        for prompt in ("plain", "caf\u00e9", "\u4e2d" + "a" * 200_000, "\U0001f600" + "a" * 200_000):
            body = json.dumps({"protocol": 1, "images": [good], "prompts": [prompt], "metadata": [{}]}).encode()
            status, answer = _post(port, body)
            assert status == 200 and answer["scores"]["mean_pixel"] == [pytest.approx(0.2)], (prompt[:8], answer)
        for raw in (False, True):  # 500 kB and an emoji, escaped or raw: 500 kB + 8 x 500 kB over 4 MiB
            body = json.dumps(
                {"protocol": 1, "images": [good], "prompts": ["\U0001f600" + "a" * 500_000], "metadata": [{}]},
                ensure_ascii=not raw,
            ).encode()
            status, answer = _post(port, body)
            assert status == 413 and "characters wider than a byte" in answer["detail"], answer
            assert "--max-bodies-mb" in answer["detail"], answer
        # every reservation was given back: a body of the largest size still fits
        status, answer = _post(port, _request([good], [{"pad": "a" * (2**20 - 500)}]))
        assert status == 200, answer


def test_bodies_held_at_once_are_bounded_before_they_are_read() -> None:
    """Two bodies of 1 MB being received fill a budget of 2 MB: a third is answered 503 at once."""
    with thread_server(MeanPixel(), max_request_bytes=2**20, max_bodies_bytes=2 * 2**20) as url:
        port = _port(url)
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**20 + b"{" * 1000)
            held.append(s)
        try:
            time.sleep(0.5)  # both are being received
            status, body = _post(port, b"{" * 2**20, timeout=30)
            assert status == 503 and "--max-bodies-mb" in body["detail"], body
            assert _get(port, "/health")[0] == 200
        finally:
            for s in held:
                s.close()
        time.sleep(0.5)  # their reservations are given back once the server sees them go
        good = _b64_png(np.full((4, 4, 3), 102, np.uint8))
        status, body = _post(port, _request([good]))
        assert status == 200 and body["scores"]["mean_pixel"] == [pytest.approx(0.4)], body


class _Refusing(Reward):
    """Raises on every request, keeping a weak reference to the images it was given."""

    name = "refusing"

    def __init__(self) -> None:
        self.seen: list[weakref.ref] = []

    def __call__(self, images: torch.Tensor, prompts: Any, metadata: Any) -> torch.Tensor:
        self.seen.append(weakref.ref(images))
        raise RuntimeError("this reward fails on purpose")


def _settled(measure: Any, ok: Any, within: float = 5.0) -> Any:
    """``measure()`` once ``ok`` of it holds, or its value after ``within`` seconds."""
    deadline = time.monotonic() + within
    value = measure()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = measure()
    return value


def test_a_refused_request_frees_its_body_and_pixels_at_once() -> None:
    """Answered 400 by the parser or 500 by the reward, a request leaves nothing for the garbage collector.

    With the cyclic collector off, memory traced after each refused request of 4 MB stays where it
    was, and the images a failing reward got are freed as soon as the answer is sent. (An exception
    that crossed from the worker thread to the event loop would hold the body, its parsed text and the
    decoded pixels in a reference cycle until the collector ran: memory no bound of the server counts.)
    """
    rng = np.random.default_rng()
    bodies = []
    for _ in range(5):  # valid base64 of random bytes that are not a PNG: parsed, decoded, then refused
        text = base64.b64encode(rng.integers(0, 256, 3 * 2**20, dtype=np.uint8).tobytes()).decode()
        bodies.append(_request([text]))
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    refusing = _Refusing()
    with thread_server(MeanPixel(), limits=Limits(max_json_values=1000)) as url, thread_server(refusing) as url2:
        _post(_port(url), bodies[0])  # warm: what the first request allocates once is not a leak
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            grown = []
            for body in bodies:
                status, answer = _post(_port(url), body)
                assert status == 400 and "image 0 is not a PNG" in answer["detail"], answer
                # the worker thread drops its reference to the call's arguments just after answering
                grown.append(_settled(lambda: tracemalloc.get_traced_memory()[0] - start, lambda g: g < 2**20))
            for _ in range(3):
                status, answer = _post(_port(url2), _request([_b64_png(pixels)] * 4))
                assert status == 500 and "fails on purpose" in answer["detail"], answer
                held = _settled(lambda: refusing.seen[-1]() is not None, lambda alive: not alive)
                assert not held, "the images of a request answered 500 are still held"
        finally:
            tracemalloc.stop()
            gc.enable()
    # each refused body is 4 MB of text, 4 MB parsed and 3 MB decoded: all of it freed with its answer
    assert max(grown) < 2**20, [f"{g / 2**20:.1f} MB" for g in grown]


def test_a_slow_body_gets_408_and_the_server_answers_meanwhile() -> None:
    with thread_server(MeanPixel(), receive_timeout=1.5) as url:
        port = _port(url)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        answer = b""
        s.settimeout(0.2)
        for _ in range(150):  # a byte every 0.2 s for at most 30 s, until the server answers
            with contextlib.suppress(OSError):
                s.sendall(b" ")
            try:
                answer += s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if b"}" in answer:  # the end of the JSON answer
                break
        elapsed = time.monotonic() - t0
        s.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"the body did not arrive within 1.5 s" in answer, answer[:300]
        assert elapsed < 20, elapsed
        assert _get(port, "/health")[0] == 200


def test_slow_clients_are_closed_and_connections_are_capped(tmp_path: Path) -> None:
    """60 clients trickling headers or bodies to a server capped at 20 connections and 2 s per request.

    /health answers throughout; the server's open file descriptors stay under the cap; every slow
    client is closed once its 2 s are up; each closed connection is one line of the log, no traceback.
    """
    log = tmp_path / "server.log"
    with server_process(
        "tests.test_reward_server_bounds:MeanPixel", "--max-connections", "20", "--receive-timeout", "2", log=log
    ) as (port, proc):
        resting_fds = _fd_count(proc.pid)
        socks, fds, latencies = [], [], []
        try:
            for k in range(60):
                s = socket.create_connection(("127.0.0.1", port))
                if k % 2:
                    s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")
                else:
                    s.sendall(b"POST /score HTTP/1.1\r\nHo")
                socks.append(s)
                if k % 10 == 9:
                    status, latency = _get(port, "/health")
                    assert status == 200
                    latencies.append(latency)
                    fds.append(_fd_count(proc.pid))
            until = time.monotonic() + 20  # far past their 2 s
            closed = sum(_closed_by_peer(s, max(0.01, until - time.monotonic())) for s in socks)
            status, latency = _get(port, "/health")
            assert status == 200
            latencies.append(latency)
        finally:
            for s in socks:
                s.close()
        time.sleep(0.5)
    text = log.read_text()
    lines = [line for line in text.splitlines() if "closed the connection" in line or "went away" in line]
    print(
        f"\nslow clients: {closed}/60 closed by the server; open fds {resting_fds} at rest, at most {max(fds)} "
        f"with 60 slow clients; /health {len(latencies)} polls, max {1000 * max(latencies):.0f} ms; "
        f"{len(lines)} log lines"
    )
    assert closed == 60
    assert max(fds) <= resting_fds + 20 + 2, fds  # the cap, and the connection of the /health poll
    assert "Traceback" not in text, text[-3000:]
    assert len(lines) == 60, text[-3000:]  # one line per closed connection


def test_a_client_going_away_mid_body_is_one_log_line(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with server_process("tests.test_reward_server_bounds:MeanPixel", log=log) as (port, _):
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"{" * 50_000)
            time.sleep(0.3)
            s.close()
        time.sleep(1.0)
        assert _get(port, "/health")[0] == 200
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert len([line for line in text.splitlines() if line.strip()]) == 3, text
    assert text.count("went away while sending its request body") == 3, text
