"""The reward server under hostile requests: bounded memory, 4xx for every malformed request, /health under load.

Everything goes to 127.0.0.1 only, bounded in count (and in time only as a guard against a hang).
The hostile requests are built here from the PNG and JSON specifications (a PNG with a forged
IHDR, brackets nested 100000 deep), not with the server's own encoder.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from precise_rl.cli.serve_reward import main as server_main
from precise_rl.rewards import Reward, build_reward
from precise_rl.rewards import server as server_mod
from precise_rl.rewards.protocol import ProtocolError, decode_images, parse_request

from .test_reward_server import start_server_process, thread_server

ROOT = Path(__file__).resolve().parents[1]


class MeanPixel(Reward):
    """The mean 8-bit level of each image, in [0, 1]: easy to check from the PNG bytes sent."""

    name = "mean_pixel"

    def __call__(self, images: torch.Tensor, prompts: Any, metadata: Any) -> torch.Tensor:
        return images.flatten(1).double().mean(dim=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _thread_server(reward: Reward, **kwargs: Any) -> Iterator[int]:
    """The reward-server tests' in-thread server, by port."""
    with thread_server(reward, **kwargs) as url:
        yield int(url.rsplit(":", 1)[1])


def _post(port: int, body: bytes, headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json", **(headers or {})})
        except OSError:  # answered (413, 503) and closed before the body was read: the answer is still there
            if conn.sock is None:
                raise
        response = conn.getresponse()
        try:
            raw = response.read()
        except http.client.IncompleteRead as exc:
            # Answered and closed before the body was read: the connection's reset may overtake the answer's
            # body once its head has arrived; the status is the answer.
            raw = exc.partial
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, {"raw": raw.decode(errors="replace")}
    finally:
        conn.close()


def _poll_health(
    port: int,
    done: threading.Event,
    lock: threading.Lock,
    latencies: list[float],
    failures: list[str],
    rounds: int,
    pause: float,
) -> None:
    """GET /health every ``pause`` seconds until ``done`` (at most ``rounds`` times), recording each answer's
    latency and any answer that is not 200 (the load tests' poller)."""
    for _ in range(rounds):
        if done.is_set():
            return
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/health")
            status = conn.getresponse().status
            conn.close()
        except OSError as exc:
            status = repr(exc)
        with lock:
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                failures.append(f"/health: {status}")
        time.sleep(pause)


def _png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit PNG written with PIL (grey for 2-D arrays, RGB for H x W x 3)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width x height`` black pixels, written by hand: a few hundred bytes per megapixel.

    Built row by row through a streaming compressor, so the test never holds the decoded image.
    """
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _request(images: list[str], **extra: Any) -> bytes:
    body = {"protocol": 1, "images": images, "prompts": ["p"] * len(images), "metadata": [{}] * len(images)}
    body.update(extra)
    return json.dumps(body).encode()


def _good_images(n: int, seed: int, size: int = 8) -> tuple[list[str], list[float]]:
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return [_b64(_png_bytes(a)) for a in arrays], [float(a.mean()) / 255.0 for a in arrays]


# --------------------------------------------------------------------------- case 5: memory


def test_a_small_png_with_huge_dimensions_is_refused_before_decoding() -> None:
    bomb = bomb_png(8192, 8192)  # 64 Mpixel: 256 MB as float32, from a file of some 70 kB
    assert len(bomb) < 200_000
    with _thread_server(MeanPixel()) as port:  # the default limits
        status, body = _post(port, _request([_b64(bomb)]))
        assert status == 413, body
        assert "8192x8192" in body["detail"] and "per image" in body["detail"]
        # four images each under the per-image bound, over the per-request bound together
        many = [_b64(bomb_png(3000, 3000))] * 4
        status, body = _post(port, _request(many))
        assert status == 413 and "per request" in body["detail"], body
        good, want = _good_images(2, 0)
        status, body = _post(port, _request(good))
        assert status == 200 and body["scores"]["mean_pixel"] == pytest.approx(want, abs=1e-6)


def test_pixel_bounds_are_options_and_are_read_from_the_png_header() -> None:
    from precise_rl.rewards.protocol import Limits

    limits = Limits(max_images=3, max_image_pixels=100, max_request_pixels=150)
    ok = _b64(_png_bytes(np.zeros((10, 10), np.uint8)))
    assert decode_images([ok], limits).shape == (1, 1, 10, 10)
    with pytest.raises(ProtocolError, match="11x10 pixels, over the limit of 100"):
        decode_images([_b64(_png_bytes(np.zeros((10, 11), np.uint8)))], limits)
    with pytest.raises(ProtocolError, match="over 150 pixels"):
        decode_images([ok, ok], limits)
    with pytest.raises(ProtocolError, match="4 images, over the limit of 3"):
        decode_images([ok] * 4, Limits(max_images=3))
    # the bound holds even when the body of the PNG is cut off: only the header was read
    truncated = bomb_png(20000, 20000)[:40]
    with pytest.raises(ProtocolError, match="20000x20000"):
        decode_images([_b64(truncated)], Limits(max_image_pixels=10**6))


# --------------------------------------------------------------------------- case 6: deep nesting


def test_deeply_nested_json_is_a_400_not_a_500() -> None:
    good, _ = _good_images(1, 1)
    nested_top = b"[" * 100_000
    nested_meta = (
        b'{"protocol": 1, "images": '
        + json.dumps(good).encode()
        + b', "prompts": ["p"], "metadata": ['
        + b"[" * 100_000
    )
    nested_closed = b'{"protocol": 1, "images": [], "metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with _thread_server(MeanPixel()) as port:
        for body in (nested_top, nested_meta, nested_closed):
            status, answer = _post(port, body)
            assert status == 400, (status, answer)
            assert answer["detail"].startswith("malformed request:"), answer
        assert _post(port, _request(good))[0] == 200  # and the server is still up


# --------------------------------------------------------------------------- case 7: the event loop stays free


def test_health_answers_while_a_request_is_being_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding is held on an event until /health has answered: possible only if decoding is off the loop."""
    release = threading.Event()
    decoding = threading.Event()
    real = server_mod.parse_request

    def slow_parse(*args: Any, **kwargs: Any) -> Any:
        decoding.set()
        release.wait(timeout=60)  # a guard against a hang if /health never answers
        return real(*args, **kwargs)

    monkeypatch.setattr(server_mod, "parse_request", slow_parse)
    good, want = _good_images(3, 2)
    result: dict[str, Any] = {}
    with _thread_server(MeanPixel()) as port:
        sender = threading.Thread(target=lambda: result.update(answer=_post(port, _request(good))))
        sender.start()
        assert decoding.wait(timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            conn.request("GET", "/health")
            health = conn.getresponse().status
        except TimeoutError:
            health = None  # the loop was blocked by the decoding request
        finally:
            conn.close()
            release.set()
        sender.join(timeout=60)
    assert health == 200
    status, body = result["answer"]
    assert status == 200 and body["scores"]["mean_pixel"] == pytest.approx(want, abs=1e-6)


def test_the_image_count_per_request_is_capped() -> None:
    tiny = _b64(_png_bytes(np.zeros((1, 1), np.uint8)))
    with _thread_server(MeanPixel()) as port:
        status, body = _post(port, _request([tiny] * 1025))  # the documented default cap is 1024
        assert status == 413 and "1025 images, over the limit of 1024" in body["detail"], body
        status, body = _post(port, _request([tiny] * 10))
        assert status == 200 and body["scores"]["mean_pixel"] == [0.0] * 10


# --------------------------------------------------------------------------- case 8: the smaller ones


def test_protocol_versions_that_only_compare_equal_are_refused() -> None:
    good, _ = _good_images(1, 3)
    tensor_images = good
    for version in (True, 1.0, "1"):
        with pytest.raises(ProtocolError, match="speaks protocol 1"):
            parse_request({"protocol": version, "images": tensor_images, "prompts": ["p"], "metadata": [{}]})
    images, _, _ = parse_request({"protocol": 1, "images": tensor_images, "prompts": ["p"], "metadata": [{}]})
    assert images.shape == (1, 3, 8, 8)


def test_text_that_is_not_an_image_is_named_without_a_python_repr() -> None:
    with _thread_server(MeanPixel()) as port:
        for payload in (_b64(b"hello, I am not a picture at all"), _b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "@@@"):
            status, body = _post(port, _request([payload]))
            assert status == 400, body
            detail = body["detail"]
            assert "image 0" in detail and "BytesIO" not in detail and " at 0x" not in detail, detail


def test_the_bearer_scheme_is_case_insensitive_and_the_token_is_not() -> None:
    good, _ = _good_images(1, 4)
    with _thread_server(MeanPixel(), token="s3cret") as port:
        for header in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret "):
            assert _post(port, _request(good), {"Authorization": header})[0] == 200, header
        for header in ("Bearer S3CRET", "Basic s3cret", "s3cret", "Bearer", ""):
            assert _post(port, _request(good), {"Authorization": header})[0] == 401, header


def test_serve_reward_claims_nothing_before_it_has_bound(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server_main(["jpeg_compressibility", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("precise-rl serve-reward: error: cannot listen on"), lines
    assert f"127.0.0.1:{port}" in lines[0]
    assert "serving" not in out
    assert server_main(["jpeg_compressibility", "--host", "0.0.0.0", "--port", str(_free_port())]) == 2
    out, err = capsys.readouterr()
    assert "without a token" in err and "serving" not in out


# --------------------------------------------------------------------------- the load test


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start_server(port: int) -> subprocess.Popen:
    return start_server_process(port, "tests.test_reward_server_hostile:MeanPixel", "--max-request-mb", "8")


@pytest.mark.slow
def test_load_good_and_hostile_requests_mixed(capsys: pytest.CaptureFixture[str]) -> None:
    """6 clients x 12 good requests, 2 attackers x 8 rounds of 6 hostile requests, /health polled throughout.

    Nothing is lost for the good requests (every one answered 200 with the right scores), every
    hostile one gets its 4xx, /health always answers, the server's peak memory stays bounded. The
    /health latencies and the peak memory are reported, not asserted on as times.
    """
    port = _free_port()
    proc = _start_server(port)
    bomb = _b64(bomb_png(8192, 8192))
    tiny = _b64(_png_bytes(np.zeros((1, 1), np.uint8)))
    hostile: list[tuple[str, bytes, int]] = [
        ("bomb", _request([bomb]), 413),
        ("nested", b"[" * 100_000, 400),
        ("too-many-images", _request([tiny] * 1100), 413),
        ("not-an-image", _request([_b64(b"plain text, not a picture")]), 400),
        ("protocol-true", _request([tiny], protocol=True), 400),
        ("over-size", b'{"images": ["' + b"A" * (9 * 2**20) + b'"]}', 413),
    ]
    failures: list[str] = []
    good_answers = [0]
    hostile_answers = [0]
    lock = threading.Lock()
    done = threading.Event()
    latencies: list[float] = []

    def good_client(k: int) -> None:
        for r in range(12):
            images, want = _good_images(8, 1000 * k + r, size=16)
            try:
                status, body = _post(port, _request(images))
                ok = status == 200 and body["scores"][body["reward"]] == pytest.approx(want, abs=1e-6)
            except (OSError, KeyError, TypeError) as exc:
                ok, body = False, {"error": repr(exc)}
            with lock:
                if ok:
                    good_answers[0] += 1
                else:
                    failures.append(f"good client {k} request {r}: {body}"[:300])

    def attacker(k: int) -> None:
        for r in range(8):
            for name, body, want in hostile:
                try:
                    status, answer = _post(port, body)
                except OSError as exc:  # the server may close a connection whose body it refused (413)
                    status, answer = (want, {}) if name == "over-size" else (None, {"error": repr(exc)})
                with lock:
                    if status == want:
                        hostile_answers[0] += 1
                    else:
                        failures.append(f"attacker {k} round {r} {name}: {status} {answer}"[:300])

    def health_poller() -> None:
        _poll_health(port, done, lock, latencies, failures, rounds=5000, pause=0.01)

    try:
        threads = [threading.Thread(target=good_client, args=(k,)) for k in range(6)]
        threads += [threading.Thread(target=attacker, args=(k,)) for k in range(2)]
        poller = threading.Thread(target=health_poller)
        poller.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        done.set()
        poller.join(timeout=120)
        alive = proc.poll() is None
        peak = _peak_rss_mb(proc.pid) if alive else float("nan")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    lat = np.array(latencies) * 1000
    with capsys.disabled():
        print(
            f"\nload test: {good_answers[0]}/72 good and {hostile_answers[0]}/96 hostile answered as expected; "
            f"/health {len(lat)} polls, median {np.median(lat):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
            f"max {lat.max():.1f} ms; server peak RSS {peak:.0f} MB"
        )
    assert alive, "the server died under load"
    assert not failures, failures[:10]
    assert good_answers[0] == 72 and hostile_answers[0] == 96
    assert len(lat) > 0
    # A decoded bomb alone would be 64 Mpixel x 4 bytes x several copies; the bounded server stays
    # near its resting size (Python, torch and the app), far under that.
    assert peak < 1500, f"peak RSS {peak:.0f} MB"


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
def test_load_slow_bodies_amplifying_json_and_concurrent_large_bodies(capsys: pytest.CaptureFixture[str]) -> None:
    """Large bodies at once, JSON that expands when parsed and slow bodies, while clients score and /health is polled.

    The server takes bodies up to 16 MB (``--max-request-mb``), holds 64 MB of bodies at once
    (``--max-bodies-mb``), parses 2 at once (the default ``--max-decoding``) with at most 250,000 JSON
    values and 1 Mpixel each, keeps 128 connections open and gives a request 3 s to arrive. Attackers:
    24 threads sending a 15 MB body (base64 text that is not a PNG: parsed and decoded before it is
    refused) up to 15 times, until three are answered, 4 x 3 of 15 MB of nested empty lists in ``metadata`` (5 million
    values), 30 connections that trickle a body a byte every 0.2 s. Every good request gets its exact
    scores (the remote client retries what is answered 503), no hostile one gets a 500, /health
    answers every poll. The server's peak memory over its resting size is asserted under the bound
    its options give (the arithmetic is below); times are reported, not asserted.
    """
    port = _free_port()
    proc = start_server_process(
        port,
        "tests.test_reward_server_hostile:MeanPixel",
        *("--max-request-mb", "16", "--max-bodies-mb", "64", "--receive-timeout", "3", "--max-connections", "128"),
        *("--max-json-values", "250000", "--max-image-pixels", str(2**20), "--max-request-pixels", str(2**20)),
    )
    large = b'{"protocol": 1, "images": ["' + b"A" * (15 * 2**20) + b'"], "prompts": ["p"], "metadata": [{}]}'
    tiny = _b64(_png_bytes(np.zeros((1, 1), np.uint8)))
    amplifying = (
        b'{"protocol": 1, "images": ["'
        + tiny.encode()
        + b'"], "prompts": ["p"], "metadata": [{"x": ['
        + b"[]," * (5 * 2**20)
        + b"[]]}]}"
    )
    assert json.loads(amplifying)["metadata"][0]["x"][-1] == []  # well-formed: refused for what it would become
    outcomes: dict[str, dict[Any, int]] = {"large": {}, "amplifying": {}, "slow": {}}
    failures: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def note(kind: str, what: Any) -> None:
        with lock:
            outcomes[kind][what] = outcomes[kind].get(what, 0) + 1

    def sender(kind: str, body: bytes, allowed: set[int], answers: int = 3, tries: int = 3) -> None:
        """``body`` sent until ``answers`` of them are answered, or ``tries`` times."""
        answered = 0
        for _ in range(tries):
            if answered == answers:
                return
            try:
                status, answer = _post(port, body, timeout=120)
            except OSError:  # refused (503) before its body was read: the server closed the connection
                note(kind, "closed")
                time.sleep(0.1)
                continue
            note(kind, status)
            answered += status != 503
            if status not in allowed:
                with lock:
                    failures.append(f"{kind}: {status} {answer}"[:300])

    def slow_body() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        try:
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
            s.settimeout(0.2)
            answer = b""
            for _ in range(150):  # at most 30 s
                with contextlib.suppress(OSError):
                    s.sendall(b" ")
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                answer += chunk
            note("slow", answer[:12].decode(errors="replace") or "closed")
        finally:
            s.close()

    good_scored = [0]

    def good_client(k: int) -> None:
        reward = build_reward(
            "remote", url=f"http://127.0.0.1:{port}", retries=20, backoff=0.5, backoff_max=2.0, timeout=120
        )
        for r in range(5):
            images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(100 * k + r))
            want = ((images * 255).round() / 255).flatten(1).double().mean(1)
            out = reward(images, [f"p{j}" for j in range(8)], [{}] * 8)
            ok = out["unscored"].sum() == 0 and torch.allclose(out["remote"].double(), want, atol=1e-5)
            with lock:
                if ok:
                    good_scored[0] += 8
                else:
                    failures.append(f"good client {k} call {r}: {out}"[:300])

    def health_poller() -> None:
        _poll_health(port, done, lock, latencies, failures, rounds=20000, pause=0.02)

    try:
        _post(port, _request([tiny]))  # warm: the first request imports and allocates what every one uses
        resting = _rss_mb(proc.pid, "VmRSS")
        threads = [threading.Thread(target=sender, args=("amplifying", amplifying, {413, 503})) for _ in range(4)]
        threads += [threading.Thread(target=good_client, args=(k,)) for k in range(4)]
        threads += [threading.Thread(target=slow_body) for _ in range(30)]
        threads += [threading.Thread(target=sender, args=("large", large, {400, 503}, 3, 15)) for _ in range(24)]
        poller = threading.Thread(target=health_poller)
        poller.start()
        for k, t in enumerate(threads):
            t.start()
            if k == 3:
                time.sleep(1.0)  # the amplifying bodies first, so that some reach the parser's budget
        for t in threads:
            t.join(timeout=600)
        done.set()
        poller.join(timeout=120)
        alive = proc.poll() is None
        peak = _rss_mb(proc.pid, "VmHWM") if alive else float("nan")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    lat = np.array(latencies) * 1000
    with capsys.disabled():
        print(
            f"\nload test (slow, amplifying, large bodies): {good_scored[0]}/160 good images scored; "
            f"large bodies {outcomes['large']}, amplifying JSON {outcomes['amplifying']}, slow bodies "
            f"{outcomes['slow']}; /health {len(lat)} polls, median {np.median(lat):.1f} ms, p99 "
            f"{np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms; server resting {resting:.0f} MB, "
            f"peak {peak:.0f} MB (+{peak - resting:.0f} MB)"
        )
    assert alive, "the server died under load"
    assert not failures, failures[:10]
    assert good_scored[0] == 160
    assert set(outcomes["slow"]) <= {"HTTP/1.1 408", "closed"}, outcomes["slow"]
    assert outcomes["large"].get(400, 0) >= 2, f"too few large bodies reached the parser: {outcomes['large']}"
    # What the options let the server hold at once, in MB. The bodies are ASCII without escapes, so their text is
    # a byte a character (what other text may take past that is reserved in --max-bodies-mb, text_reserve):
    body_mb, bodies_mb, parses, values, pixels, connections = 16, 64, 2, 250_000, 2**20, 128
    # - bodies being received or waiting to be parsed, and the ones being parsed: --max-bodies-mb
    held = bodies_mb
    # - a parse: the body's text as a str while json.loads runs (1 x body), its values (strings of at
    #   most the body's size, plus 128 bytes per value for a list, dict or float and its slot), then,
    #   the text freed, base64 decoding (an ASCII copy of the string and 0.75 x its size decoded) and
    #   the pixels (3 channels x 11 bytes: the decoded uint8, the stacked and the contiguous copies,
    #   float32 and float32 scaled)
    parsed_values = body_mb + values * 128 / 2**20
    one_parse = max(body_mb + parsed_values, parsed_values + 1.75 * body_mb + pixels * 3 * 11 / 2**20)
    # - each open connection: uvicorn's buffer up to its high-water mark (64 KiB) plus one socket read
    #   (256 KiB) before it stops reading from that client
    buffers = connections * (64 + 256) / 1024
    bound = held + parses * one_parse + buffers
    assert peak - resting < bound, (
        f"peak RSS {peak:.0f} MB is {peak - resting:.0f} MB over the resting {resting:.0f} MB, over the bound "
        f"of {bound:.0f} MB ({held} MB of bodies, {parses} parses of {one_parse:.0f} MB, {buffers:.0f} MB of buffers)"
    )
