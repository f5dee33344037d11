"""The reward server and its clients over real sockets on 127.0.0.1.

Servers: healthy, killed mid-run (a separate process, SIGKILL), slow past the client's timeout,
answering HTTP 500 or garbage, and asking for a token. In each case nothing crashes, exactly the
images whose requests failed are marked (NaN score, ``unscored`` = 1), the trainer counts them, and
training either goes on or stops after writing a checkpoint. The trainer submits each rollout chunk
as soon as it is decoded: a slow server scores one chunk while the next is rolled out, with the result
of scoring after the whole rollout. Plus GenEval's verdict rules.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from precise_rl.cli.serve_reward import main as server_main
from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.rewards import Reward, RewardSet, build_reward, concat_components, jpeg_sizes_kb
from precise_rl.rewards.failures import RewardServerDown, RewardServerRejected
from precise_rl.rewards.geneval import evaluate_clauses, relative_position, select_detections
from precise_rl.rewards.protocol import ProtocolError, decode_images, encode_images, parse_request
from precise_rl.rewards.server import TOKEN_ENV, create_app, read_token, serve
from precise_rl.rl.logging import read_metrics
from precise_rl.rl.trainer import GRPOTrainer

from . import toy_task

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
toy_task.register()

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- rewards served in tests


def _levels(images: torch.Tensor) -> torch.Tensor:
    """What the server sees: each pixel at 8 bits."""
    return (images.clamp(0, 1) * 255).round() / 255


class PairedMean(Reward):
    """Mean pixel plus the prompt's length: a wrong image-prompt pairing shows in the score."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> dict:
        self.calls += 1
        if any("boom" in p for p in prompts):
            raise RuntimeError("the model fell over")
        mean = images.flatten(1).mean(1).double()
        length = torch.tensor([float(len(p)) for p in prompts], dtype=torch.float64)
        score = mean + length
        score[torch.tensor(["nan" in p for p in prompts])] = float("nan")
        return {"paired": score, "mean": mean}


def flaky_brightness(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]) -> torch.Tensor:
    """The toy task's reward, except that the server fails on prompt 1 (every time)."""
    if "prompt 1" in prompts:
        raise RuntimeError("cannot score prompt 1")
    return images.flatten(1).mean(dim=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def thread_server(reward: Reward, port: int | None = None, **kwargs: Any) -> Iterator[str]:
    """A uvicorn server in a thread of this process; stopped (gracefully) on exit."""
    port = port or _free_port()
    reward.name = reward.name or "paired"
    app = create_app(reward, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _answer(handler: http.server.BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


@contextlib.contextmanager
def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A plain HTTP server on a free 127.0.0.1 port, quiet, in a thread; yields its URL."""
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def garbage_server() -> Iterator[str]:
    """A plain HTTP server that answers the protocol wrongly, depending on the prompts it gets."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            n = len(body["prompts"])
            if any("garbage" in p for p in body["prompts"]):
                payload, status = b"<html>this is not json</html>", 200
            elif any("short" in p for p in body["prompts"]):
                payload, status = json.dumps({"reward": "r", "scores": {"r": [1.0] * (n - 1)}}).encode(), 200
            elif any("teapot" in p for p in body["prompts"]):
                payload, status = b"I am a teapot", 503
            else:
                lengths = [float(len(p)) for p in body["prompts"]]
                payload, status = json.dumps({"reward": "r", "scores": {"r": lengths}}).encode(), 200
            _answer(self, status, payload)

    with _serve(Handler) as url:
        yield url


class Gated(Reward):
    """Mean pixel plus prompt length, but a request holding a prompt with ``hold`` waits for ``gate``.

    A server busy with such a request for as long as the test wants, with no clock involved.
    """

    def __init__(self, hold: str = "", wait_s: float = 60.0) -> None:
        self.hold, self.wait_s = hold, wait_s
        self.gate, self.seen = threading.Event(), threading.Event()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        if any(self.hold in p for p in prompts):
            self.seen.set()
            if not self.gate.wait(self.wait_s):
                raise RuntimeError("the test never opened the gate")
        return images.flatten(1).mean(1).double() + torch.tensor([float(len(p)) for p in prompts])


def _pil_brightness(encoded: str) -> float:
    """Mean pixel of a base64 PNG, read with Pillow alone."""
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as pil:
        return float(np.asarray(pil, dtype=np.float64).mean() / 255.0)


@contextlib.contextmanager
def scripted_server(bad: str) -> Iterator[str]:
    """Brightness for every request, except one with a prompt holding ``bad``: a 200 that is not JSON."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if any(bad in p for p in body["prompts"]):
                payload = b"<html>502 Bad Gateway, says a proxy</html>"
            else:
                scores = [_pil_brightness(e) for e in body["images"]]
                payload = json.dumps({"protocol": 1, "reward": "b", "scores": {"b": scores}}).encode()
            _answer(self, 200, payload)

    with _serve(Handler) as url:
        yield url


def _images(n: int, seed: int, shape: tuple[int, int, int] = (3, 8, 8)) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def _expected(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    q = _levels(images).flatten(1).mean(1).double()
    return q + torch.tensor([float(len(p)) for p in prompts], dtype=torch.float64)


# ----------------------------------------------------------------------------- protocol


def test_images_survive_the_wire_at_eight_bits() -> None:
    for shape in ((3, 5, 7), (1, 4, 4)):
        images = _images(3, 1, shape)
        back = decode_images(encode_images(images))
        torch.testing.assert_close(back, _levels(images), rtol=0, atol=1e-7)
    good = encode_images(_images(1, 2))[0]
    with pytest.raises(ProtocolError, match="one size"):
        decode_images([good, encode_images(_images(1, 2, (3, 9, 9)))[0]])
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    with pytest.raises(ProtocolError, match="not a PNG"):
        decode_images([base64.b64encode(jpeg.getvalue()).decode()])
    with pytest.raises(ProtocolError, match="readable"):
        decode_images(["!!!not base64!!!"])
    with pytest.raises(ProtocolError, match="2 prompts"):
        parse_request({"images": [good], "prompts": ["a", "b"], "metadata": [{}, {}]})


# ----------------------------------------------------------------------------- healthy, slow, failing


def test_healthy_server_scores_every_image_with_its_own_prompt() -> None:
    images = _images(11, 3)
    prompts = [f"prompt number {'x' * k}" for k in range(11)]
    with thread_server(PairedMean()) as url:
        reward = build_reward("remote@paired", url=url, max_batch=3, workers=4, retries=0)
        out = reward(images, prompts, [{"k": k} for k in range(11)])
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=5)
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
    assert health == {"status": "ok", "protocol": 1}
    torch.testing.assert_close(out["remote@paired"].double(), _expected(images, prompts), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["mean"].double(), _levels(images).flatten(1).mean(1).double(), rtol=0, atol=1e-6)
    assert out["unscored"].tolist() == [0.0] * 11
    assert reward.stats["requests"] == 4 and reward.down_streak == 0


def test_http_500_and_null_scores_mark_only_their_images() -> None:
    images = _images(8, 4)
    prompts = ["a", "b", "boom", "c", "d", "nan", "e", "f"]
    with thread_server(PairedMean()) as url:
        reward = build_reward("remote", url=url, max_batch=2, retries=2, backoff=0.0)
        out = reward(images, prompts, [{}] * 8)
    # chunk [boom, c] failed with 500 after its retries; "nan" came back as null
    bad = torch.tensor([False, False, True, True, False, True, False, False])
    assert out["unscored"].bool().tolist() == bad.tolist()
    assert torch.isnan(out["remote"][bad]).all()
    torch.testing.assert_close(out["remote"][~bad].double(), _expected(images, prompts)[~bad], rtol=0, atol=1e-5)
    assert reward.stats["retries"] == 2 and reward.down_streak == 0


def test_garbage_answers_are_retried_then_marked() -> None:
    images = _images(8, 5)
    prompts = ["ok1", "ok2", "garbage", "x", "short", "y", "teapot", "ok3"]
    with garbage_server() as url:
        reward = build_reward("remote", url=url, max_batch=2, retries=1, backoff=0.0)
        out = reward(images, prompts, [{}] * 8)
    bad = [False, False, True, True, True, True, True, True]
    assert out["unscored"].bool().tolist() == bad
    assert out["remote"][:2].tolist() == [3.0, 3.0]
    assert reward.stats["retries"] == 3  # one retry for each of the three failing requests


def test_slow_server_times_out_for_its_images_only() -> None:
    images = _images(6, 6)
    prompts = ["fast a", "fast b", "slow c", "slow d", "fast e", "fast f"]
    gated = Gated(hold="slow")  # the slow requests are held until the client has given up on them
    with thread_server(gated, concurrent=True) as url:
        try:
            reward = build_reward("remote", url=url, max_batch=2, workers=3, timeout=1.0, retries=1, backoff=0.0)
            out = reward(images, prompts, [{}] * 6)
        finally:
            gated.gate.set()
    assert out["unscored"].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    keep = out["unscored"] == 0
    torch.testing.assert_close(out["remote"][keep].double(), _expected(images, prompts)[keep], rtol=0, atol=1e-5)
    assert reward.down_streak == 0 and reward.stats["unscored"] == 2


def test_token_is_required_and_a_wrong_one_stops_cleanly(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "wrong").write_text("guess\n")
    images, prompts = _images(3, 7), ["a", "b", "c"]
    with thread_server(PairedMean(), token="s3cret-token") as url:
        good = build_reward("remote", url=url, token_file=str(tmp_path / "token"), retries=0)
        got = good(images, prompts, [{}] * 3)["remote"].double()
        torch.testing.assert_close(got, _expected(images, prompts), rtol=0, atol=1e-5)
        for kwargs in ({"token_file": str(tmp_path / "wrong")}, {"token_env": "PRECISE_RL_TEST_UNSET_TOKEN"}):
            bad = build_reward("remote", url=url, retries=3, backoff=0.0, **kwargs)
            with pytest.raises(RewardServerRejected, match="refused the token"):
                bad(images, prompts, [{}] * 3)
            assert bad.stats["retries"] == 0  # a refused token is not retried
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_token(tmp_path / "empty")
    (tmp_path / "two").write_text("  first-line \nsecond line\n")
    assert read_token(tmp_path / "two") == "first-line"
    with pytest.raises(UserError, match="cannot read the token file"):
        read_token(tmp_path / "missing")


def test_the_server_command_refuses_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # as a program: one line on stderr (no warning from running a module of an imported package)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    cmd = [sys.executable, "-m", "precise_rl.cli.serve_reward", "no_such_reward"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("precise-rl serve-reward: error: unknown reward 'no_such_reward'")
    for args, message in (
        (["jpeg_compressibility", "--device", "cpu"], "takes no device"),
        (["jpeg_compressibility", "--set", "quality=200"], "JPEG quality must be an integer in [1, 95]"),
        (["jpeg_compressibility", "--set", "quality"], "--set takes key=value"),
        (["jpeg_compressibility", "--host", "0.0.0.0", "--port", "9"], "without a token"),
        (["jpeg_compressibility", "--token-file", str(tmp_path / "nope")], "cannot read the token file"),
        (["jpeg_compressibility", "--port", "70000"], "--port must be in 1..65535"),
    ):
        assert server_main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("precise-rl serve-reward: error:")


def test_request_size_limit_is_enforced_and_the_client_splits() -> None:
    images = _images(6, 8, (3, 24, 24))  # about 2.3 kB per image once encoded
    prompts = [f"p{k}" for k in range(6)]
    with thread_server(PairedMean(), max_request_bytes=6000) as url:
        port = int(url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/score", body=b"x" * 7000, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413 and "limit" in json.loads(response.read())["detail"]
        reward = build_reward("remote", url=url, max_batch=6, retries=0)
        out = reward(images, prompts, [{}] * 6)
    torch.testing.assert_close(out["remote"].double(), _expected(images, prompts), rtol=0, atol=1e-5)
    assert reward.stats["requests"] > 1  # 413 on the whole batch, then halves until they fit


def test_a_server_that_stays_down_raises_after_stop_after_calls() -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nobody listens there
    reward = build_reward("remote", url=url, retries=1, backoff=0.0, stop_after=2)
    out = reward(_images(2, 9), ["a", "b"], [{}] * 2)
    assert torch.isnan(out["remote"]).all() and out["unscored"].tolist() == [1.0, 1.0]
    with pytest.raises(RewardServerDown, match="no score in 2 calls"):
        reward(_images(2, 9), ["a", "b"], [{}] * 2)


def test_remote_reward_options_and_bind_address_are_checked() -> None:
    with pytest.raises(UserError, match="url"):
        build_reward("remote", url="127.0.0.1:80")
    with pytest.raises(UserError, match="timeout"):
        build_reward("remote", timeout=0)
    with pytest.raises(UserError, match="max_batch"):
        build_reward("remote", max_batch=1.5)
    with pytest.raises(UserError, match="without a token"):
        serve(PairedMean(), host="0.0.0.0", port=_free_port(), token=None)


# ----------------------------------------------------------------------------- training against a server


def _toy_cfg(tmp_url: str, **remote: Any) -> Any:
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["reward"] = {"weights": {"remote": 1.0}, "options": {"remote": {"url": tmp_url, "max_batch": 4, **remote}}}
    return config_from_dict(data)


@contextlib.contextmanager
def _failing_server(mode: str) -> Iterator[tuple[str, dict]]:
    """A server that fails every request holding prompt 1, and the client options that go with it."""
    if mode == "http 500":
        with thread_server(build_reward("tests.test_reward_server:flaky_brightness")) as url:
            yield url, {}
    elif mode == "garbage":
        with scripted_server("prompt 1") as url:
            yield url, {}
    else:  # slow: a request of prompt 1 is held until the test ends, past every timeout of the client
        gated = Gated(hold="prompt 1")
        with thread_server(gated, concurrent=True) as url:
            try:
                yield url, {"timeout": 1.0, "retries": 0}
            finally:
                gated.gate.set()


@pytest.mark.parametrize("mode", ["http 500", "garbage", "slow"])
def test_training_goes_on_when_some_images_cannot_be_scored(tmp_path: Path, mode: str) -> None:
    with _failing_server(mode) as (url, options):
        options = {"retries": 1, "backoff": 0.0, **options}
        cfg = _toy_cfg(url, **options)
        trainer = GRPOTrainer(cfg, tmp_path / "run")
        before = {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)}
        trainer.run()
        stats = dict(trainer.rewards.rewards["remote"].stats)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    # the prompts each epoch drew, replayed without any reward server: every image of prompt 1 is unscored
    replay = GRPOTrainer(config_from_dict(toy_task.TOY_CONFIG), tmp_path / "replay", read_only=True)
    expected = [sum(p == "prompt 1" for p in replay.collect(e).prompts) for e in range(4)]
    assert [r["unscored_samples"] for r in records] == expected
    assert [r["reward/remote/unscored"] for r in records] == pytest.approx([e / 12 for e in expected])
    assert stats["unscored"] == sum(expected)
    assert stats["retries"] >= options["retries"] * sum(expected) // 4  # each failing request was retried
    assert sum(expected) > 0 and any(e < 12 for e in expected)
    # the scored images still train the model, and the run ends with its last checkpoint
    after = dict(zip(trainer.param_names, trainer.params, strict=True))
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)
    assert (tmp_path / "run" / "checkpoints" / "epoch_000004").is_dir()


def test_a_token_refused_mid_run_stops_training_after_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "first-token")
    port = _free_port()
    served = build_reward("tests.toy_task:toy_brightness")
    with contextlib.ExitStack() as stack:
        stack.enter_context(thread_server(served, port=port, token="first-token"))
        cfg = _toy_cfg(f"http://127.0.0.1:{port}", retries=2, backoff=0.0)
        trainer = GRPOTrainer(cfg, tmp_path / "run")
        collect = trainer.collect

        def collect_then_rotate(epoch: int) -> Any:
            if epoch == 2:  # after the checkpoint of epoch 2, the server comes back with another token
                stack.close()
                stack.enter_context(thread_server(served, port=port, token="second-token"))
            return collect(epoch)

        trainer.collect = collect_then_rotate
        with pytest.raises(UserError, match=r"training stopped: reward server .* refused the token") as info:
            trainer.run()
        assert "--resume" in str(info.value) and "first-token" not in str(info.value)
        assert trainer.rewards.rewards["remote"].stats["retries"] == 0  # a refused token is never retried
        records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
        assert [(r["epoch"], r["unscored_samples"]) for r in records] == [(1, 0), (2, 0)]
        names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("epoch_"))
        assert names[-1] == "epoch_000002"
        # with the new token the run resumes where it stopped and finishes
        monkeypatch.setenv(TOKEN_ENV, "second-token")
        resumed = GRPOTrainer(cfg, tmp_path / "run", resume=tmp_path / "run")
        assert resumed.epoch == 2
        resumed.run()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
    assert [(r["epoch"], r["unscored_samples"]) for r in records][-2:] == [(3, 0), (4, 0)]


class StrictBrightness(Reward):
    """Mean pixel and an extra field ``strict`` (1 when it is at least 0.5), as GenEval's server; fails on prompt 1."""

    name = "strict_brightness"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> dict:
        if "prompt 1" in prompts:
            raise RuntimeError("cannot score prompt 1")
        mean = images.flatten(1).mean(1).double()
        return {"strict_brightness": mean, "strict": (mean >= 0.5).double()}


def test_a_call_without_any_score_still_has_the_extra_fields_seen_before() -> None:
    images = _images(4, 12)
    with thread_server(StrictBrightness()) as url:
        reward = build_reward("remote@strict", url=url, max_batch=2, retries=0)
        first = reward(images[:2], ["prompt 1", "prompt 1"], [{}] * 2)  # nothing seen yet: no extra field
        scored = reward(images, ["prompt 0", "prompt 2", "prompt 0", "prompt 1"], [{}] * 4)
        failed = reward(images[:2], ["prompt 1", "prompt 1"], [{}] * 2)
    assert list(first) == ["remote@strict", "unscored"] and first["unscored"].tolist() == [1.0, 1.0]
    mean = _levels(images).flatten(1).mean(1).double()
    assert scored["unscored"].tolist() == [0.0, 0.0, 1.0, 1.0]  # the second request holds prompt 1
    assert scored["strict"][:2].tolist() == (mean[:2] >= 0.5).double().tolist()
    assert torch.isnan(scored["strict"][2:]).all()
    assert sorted(failed) == ["remote@strict", "strict", "unscored"]
    assert torch.isnan(failed["strict"]).all() and torch.isnan(failed["remote@strict"]).all()
    assert failed["unscored"].tolist() == [1.0, 1.0]


def test_a_chunk_without_any_score_lacks_no_extra_field_and_training_goes_on(tmp_path: Path) -> None:
    """Chunks of one group (4 images), one request each: every request of a prompt-1 chunk fails, so that
    chunk has no ``strict`` from the server; it gets NaN there and the epoch goes on with the other chunks."""
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["train"]["rollout_batch_size"] = 4
    options = {"max_batch": 4, "retries": 0, "stop_after": 100}
    seen: list[tuple[list[str], dict[str, torch.Tensor]]] = []
    with thread_server(StrictBrightness()) as url:
        data["reward"] = {"weights": {"remote": 1.0}, "options": {"remote": {"url": url, **options}}}
        trainer = GRPOTrainer(config_from_dict(data), tmp_path / "run")
        score = trainer.score

        def score_and_keep(batch: Any) -> Any:
            out = score(batch)
            seen.append((list(batch.prompts), out[0]))
            return out

        trainer.score = score_and_keep
        trainer.run()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    # some epoch had a chunk of prompt 1 (no field at all from the server) beside chunks that were scored
    assert any(0 < sum(p == "prompt 1" for p in prompts) < 12 for prompts, _ in seen)
    for (prompts, comps), record in zip(seen, records, strict=True):
        failed = torch.tensor([p == "prompt 1" for p in prompts])
        assert sorted(comps) == ["remote", "remote/strict", "remote/unscored"]
        assert comps["remote/unscored"].bool().tolist() == failed.tolist()
        assert torch.isnan(comps["remote"][failed]).all() and torch.isnan(comps["remote/strict"][failed]).all()
        ok = comps["remote"][~failed].double()
        assert comps["remote/strict"][~failed].tolist() == (ok >= 0.5).double().tolist()
        assert record["unscored_samples"] == int(failed.sum()) and record["unscored/remote"] == int(failed.sum())
        if bool((~failed).any()):
            assert record["reward/remote/strict"] == pytest.approx(float((ok >= 0.5).double().mean()))
            assert record["reward_mean"] == pytest.approx(float(ok.mean()), rel=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "epoch_000004").is_dir()


def test_submitted_chunks_are_scored_while_the_caller_goes_on() -> None:
    images, prompts = _images(8, 11), [f"chunk{k // 4} image {k}" for k in range(8)]
    gated = Gated(hold="chunk0", wait_s=20.0)
    with thread_server(gated) as url:
        rs = RewardSet(
            {"remote": 1.0, "jpeg_compressibility": 0.5},
            "cpu",
            remote={"url": url, "max_batch": 2, "retries": 0, "timeout": 60.0},
        )
        first = rs.submit(images[:4], prompts[:4])
        # submit came back while the server still holds the first chunk: nothing waited for its scores
        assert gated.seen.wait(30.0) and not first.done()
        second = rs.submit(images[4:], prompts[4:])  # the next chunk, say, just rolled out
        gated.gate.set()
        parts = [first.result(), second.result()]
        assert first.done() and first.result() is parts[0]
    comps = concat_components(parts)
    assert list(comps) == ["remote", "remote/unscored", "jpeg_compressibility"]
    torch.testing.assert_close(comps["remote"].double(), _expected(images, prompts), rtol=0, atol=1e-5)
    assert comps["remote/unscored"].tolist() == [0.0] * 8
    torch.testing.assert_close(comps["jpeg_compressibility"], -jpeg_sizes_kb(images), rtol=0, atol=0)


class HoldFirst(Reward):
    """Mean pixel plus prompt length; the first request waits for ``gate``. Requests and answers go to ``log``."""

    def __init__(self, log: list[tuple], wait_s: float = 60.0) -> None:
        self.log, self.wait_s = log, wait_s
        self.gate, self.seen = threading.Event(), threading.Event()
        self.requests = 0
        self.lock = threading.Lock()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        with self.lock:
            k, self.requests = self.requests, self.requests + 1
        self.log.append(("received", k))
        if k == 0:
            self.seen.set()
            if not self.gate.wait(self.wait_s):
                raise RuntimeError("the test never opened the gate")
        out = images.flatten(1).mean(1).double() + torch.tensor([float(len(p)) for p in prompts])
        self.log.append(("answered", k))
        return out


class _Deferred:
    """Scoring that starts only when its result is asked for: what the trainer did before rollouts overlapped."""

    def __init__(self, rewards: RewardSet, *args: Any) -> None:
        self.rewards, self.args = rewards, args

    def done(self) -> bool:
        return False

    def result(self) -> dict[str, torch.Tensor]:
        return RewardSet.submit(self.rewards, *self.args).result()


def _overlap_cfg(url: str) -> Any:
    """Three rollout chunks of 4 per epoch, one request per chunk, no evaluation."""
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["train"].update(epochs=2, rollout_batch_size=4)
    data["eval"]["every"] = 0
    options = {"url": url, "max_batch": 4, "workers": 4, "timeout": 60.0, "retries": 0}
    data["reward"] = {"weights": {"remote": 1.0}, "options": {"remote": options}}
    return config_from_dict(data)


def test_a_chunk_is_scored_by_the_server_while_the_next_chunk_is_rolled_out(tmp_path: Path) -> None:
    """The server holds the first chunk's request until the trainer asks for the scores: every rollout step of
    the epoch's later chunks runs while that request is in the server. The result is bit for bit that of the
    same run scoring each chunk only after the whole rollout."""
    log: list[tuple] = []
    served = HoldFirst(log)
    with thread_server(served, concurrent=True) as url:
        trainer = GRPOTrainer(_overlap_cfg(url), tmp_path / "overlap")
        velocity, submit, score = trainer.policy.velocity, trainer.rewards.submit, trainer.score
        submitted = [0]

        def logged_velocity(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            if not torch.is_grad_enabled():  # a rollout step (training recomputes with gradients)
                if submitted[0] and not served.gate.is_set():
                    assert served.seen.wait(30.0), "the first chunk's request never reached the server"
                log.append(("rollout step", submitted[0]))
            return velocity(x, t, cond)

        def logged_submit(*args: Any) -> Any:
            log.append(("submit", submitted[0]))
            submitted[0] += 1
            return submit(*args)

        def open_then_score(batch: Any) -> Any:
            log.append(("score",))
            served.gate.set()
            return score(batch)

        trainer.policy.velocity = logged_velocity
        trainer.rewards.submit = logged_submit
        trainer.score = open_then_score
        try:
            trainer.run()
        finally:
            served.gate.set()
    # epoch 1: chunk 0 rolled out and submitted, chunks 1 and 2 rolled out while request 0 was held
    first = log[: log.index(("score",))]
    steps = trainer.cfg.sampler.num_steps
    assert [e for e in first if e[0] in ("rollout step", "submit")] == [
        *[("rollout step", 0)] * steps,
        ("submit", 0),
        *[("rollout step", 1)] * steps,
        ("submit", 1),
        *[("rollout step", 2)] * steps,
        ("submit", 2),
    ]
    held_from, held_until = log.index(("received", 0)), log.index(("answered", 0))
    later = [i for i, e in enumerate(log) if e[0] == "rollout step" and e[1] in (1, 2) and i < log.index(("score",))]
    assert len(later) == 2 * steps and all(held_from < i < held_until for i in later), log
    assert ("answered", 0) not in first
    records = [r for r in read_metrics(tmp_path / "overlap" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["unscored_samples"] for r in records] == [0, 0]

    # the same run scoring each chunk only when the scores are asked for, after the whole rollout
    served = HoldFirst([])
    served.gate.set()
    with thread_server(served, concurrent=True) as url:
        reference = GRPOTrainer(_overlap_cfg(url), tmp_path / "reference")
        rewards = reference.rewards
        reference.rewards.submit = lambda *args: _Deferred(rewards, *args)
        reference.run()
    for a, b in zip(trainer.params, reference.params, strict=True):
        assert torch.equal(a, b)

    def strip(path: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if "elapsed" not in k and not k.startswith("time_")} for r in read_metrics(path)
        ]

    assert strip(tmp_path / "overlap" / "metrics.jsonl") == strip(tmp_path / "reference" / "metrics.jsonl")
    # and its first epoch's rewards are those of its images: 8-bit mean pixel plus prompt length
    replay = GRPOTrainer(config_from_dict(toy_task.TOY_CONFIG), tmp_path / "replay", read_only=True)
    batch = replay.collect(0)
    want = _expected(batch.images, batch.prompts)
    assert records[0]["reward/remote"] == pytest.approx(float(want.mean()), abs=1e-5)


def start_server_process(port: int, reward: str, *options: str) -> subprocess.Popen:
    """``python -m precise_rl.rewards.server REWARD --port PORT OPTIONS`` in a process, once /health answers."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    cmd = [sys.executable, "-m", "precise_rl.cli.serve_reward", reward, "--port", str(port), *options]
    cmd += ["--log-level", "error"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the reward server process did not come up")


def test_server_killed_mid_run_stops_training_after_a_checkpoint(tmp_path: Path) -> None:
    port = _free_port()
    proc = start_server_process(port, "tests.toy_task:toy_brightness")
    try:
        cfg = _toy_cfg(f"http://127.0.0.1:{port}", retries=1, backoff=0.0, stop_after=2)
        trainer = GRPOTrainer(cfg, tmp_path / "run")
        collect = trainer.collect

        def collect_then_kill(epoch: int) -> Any:
            if epoch == 2:  # after the checkpoint of epoch 2
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            return collect(epoch)

        trainer.collect = collect_then_kill
        with pytest.raises(UserError, match=r"training stopped: reward server .* gave no score in 2 calls") as info:
            trainer.run()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert "--resume" in str(info.value)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
    # epoch 3 ran with every image unscored (no update), epoch 4's scoring found the server still down
    assert [(r["epoch"], r["unscored_samples"]) for r in records] == [(1, 0), (2, 0), (3, 12)]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("epoch_"))
    assert names[-1] == "epoch_000003"
    resumed = GRPOTrainer(_toy_cfg(f"http://127.0.0.1:{port}"), tmp_path / "run", resume=tmp_path / "run")
    assert resumed.epoch == 3


def test_reward_set_keeps_remote_failures_out_of_the_combination() -> None:
    images = _images(6, 10)
    prompts = ["a", "b", "boom", "c", "d", "e"]
    with thread_server(PairedMean()) as url:
        rs = RewardSet(
            {"remote": 1.0, "jpeg_compressibility": 0.5}, "cpu", remote={"url": url, "max_batch": 2, "retries": 0}
        )
        comps = rs.score(images, prompts)
    combined = rs.combine(comps)
    bad = torch.tensor([False, False, True, True, False, False])
    assert torch.isnan(combined[bad]).all() and torch.isfinite(combined[~bad]).all()
    r, j = comps["remote"][~bad].double(), comps["jpeg_compressibility"][~bad].double()
    z = lambda x: (x - x.mean()) / (x.std(correction=0) + 1e-8)  # noqa: E731
    torch.testing.assert_close(combined[~bad].double(), z(r) + 0.5 * z(j), rtol=0, atol=1e-5)
    assert comps["remote/unscored"].tolist() == bad.float().tolist()


# ----------------------------------------------------------------------------- GenEval


def test_relative_position_follows_geneval() -> None:
    a, b = [0, 0, 10, 10], [30, 0, 40, 10]
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position([0, 30, 10, 40], a) == {"below"}
    assert relative_position([30, 30, 40, 40], a) == {"right of", "below"}
    # overlapping beyond 0.1 of the sizes: no relation at all
    assert relative_position([0, 0, 10, 10], [1, 1, 11, 11]) == set()
    # centres 12 apart horizontally, sizes 10 and 10: offset shrinks to 10, and dx = 10/12 > 0.5
    assert relative_position([12, 0, 22, 10], [0, 0, 10, 10]) == {"right of"}


def test_clauses_count_colour_position_and_exclusion() -> None:
    dets = [
        {"class": "dog", "score": 0.95, "box": [0, 0, 10, 10]},
        {"class": "dog", "score": 0.5, "box": [50, 0, 60, 10]},
        {"class": "cat", "score": 0.92, "box": [40, 0, 50, 10]},
        {"class": "cat", "score": 0.2, "box": [40, 40, 50, 50]},
    ]
    assert select_detections(dets, "two_object") == {"dog": [[0, 0, 10, 10], [50, 0, 60, 10]], "cat": [[40, 0, 50, 10]]}
    assert select_detections(dets, "counting") == {"dog": [[0, 0, 10, 10]], "cat": [[40, 0, 50, 10]]}
    objects = select_detections(dets, "position")
    dog_left = {"class": "dog", "count": 1, "position": ["left of", 0]}
    left_of = {"tag": "position", "include": [{"class": "cat", "count": 1}, dog_left]}
    assert evaluate_clauses(objects, left_of)[:2] == (2, 2)
    right_of = copy.deepcopy(left_of)
    right_of["include"][1]["position"] = ["right of", 0]
    assert evaluate_clauses(objects, right_of)[:2] == (1, 2)
    three = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
    assert evaluate_clauses(objects, three)[:2] == (1, 2)
    no_cat = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    no_cat["exclude"] = [{"class": "cat", "count": 1}]
    assert evaluate_clauses(objects, no_cat)[:2] == (1, 2)
    red = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}
    assert evaluate_clauses(objects, red, lambda box, name: "red" if box[0] == 0 else "blue")[:2] == (1, 1)
    assert evaluate_clauses(objects, red, lambda box, name: "blue")[:2] == (0, 1)
    with pytest.raises(UserError, match="colour classifier"):
        evaluate_clauses(objects, red)


PALETTE = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0)}


def blob_detector(images: torch.Tensor) -> list[list[dict]]:
    """Coloured rectangles on black: a square is a "cup", a tall rectangle a "bottle"."""
    out = []
    for image in images:
        labels, _ = ndimage.label(image.sum(0).numpy() > 0.3)
        dets = []
        for sy, sx in ndimage.find_objects(labels):
            h, w = sy.stop - sy.start, sx.stop - sx.start
            name = "bottle" if h > 1.5 * w else "cup"
            dets.append({"class": name, "score": 0.95, "box": [sx.start, sy.start, sx.stop, sy.stop]})
        out.append(dets)
    return out


def blob_color(image: torch.Tensor, box: list[float], name: str) -> str:
    x0, y0, x1, y1 = (int(v) for v in box)
    mean = image[:, y0:y1, x0:x1].mean(dim=(1, 2)).numpy()
    return min(PALETTE, key=lambda c: float(np.square(mean - np.array(PALETTE[c])).sum()))


def _draw(shapes: list[tuple[str, int, int, int, int]]) -> torch.Tensor:
    img = torch.zeros(3, 32, 32)
    for color, x, y, w, h in shapes:
        img[:, y : y + h, x : x + w] = torch.tensor(PALETTE[color])[:, None, None]
    return img


def test_geneval_client_and_detector_server_end_to_end() -> None:
    images = torch.stack(
        [
            _draw([("red", 2, 10, 6, 6), ("blue", 20, 10, 6, 6)]),  # two cups
            _draw([("green", 2, 4, 4, 14)]),  # one green bottle
            _draw([("blue", 2, 10, 6, 6), ("green", 20, 4, 4, 14)]),  # a cup left of a bottle
            _draw([("blue", 20, 10, 6, 6), ("green", 2, 4, 4, 14)]),  # a cup right of a bottle
        ]
    )
    cup_left_of_bottle = {
        "tag": "position",
        "include": [{"class": "bottle", "count": 1}, {"class": "cup", "count": 1, "position": ["left of", 0]}],
    }
    meta = [
        {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]},
        {"tag": "colors", "include": [{"class": "bottle", "count": 1, "color": "red"}]},
        cup_left_of_bottle,
        cup_left_of_bottle,
    ]
    server_reward = build_reward(
        "geneval_detector",
        detector="tests.test_reward_server:blob_detector",
        colors="tests.test_reward_server:blob_color",
    )
    with thread_server(server_reward) as url:
        client = build_reward("geneval", url=url, max_batch=2, retries=0)
        out = client(images, ["p1", "p2", "p3", "p4"], meta)
        with pytest.raises(UserError, match="GenEval metadata"):
            client(images[:1], ["p"], [{"tag": "counting"}])
    assert out["geneval"].tolist() == [1.0, 0.0, 1.0, 0.5]
    assert out["strict"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out["unscored"].tolist() == [0.0, 0.0, 0.0, 0.0]


def _jsonl(path: Path, entries: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return path


def test_geneval_metadata_comes_from_a_file_by_prompt(tmp_path: Path) -> None:
    images = torch.stack([_draw([("red", 2, 10, 6, 6), ("blue", 20, 10, 6, 6)]), _draw([("green", 2, 4, 4, 14)])])
    two_cups = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    red_bottle = {"tag": "colors", "include": [{"class": "bottle", "count": 1, "color": "red"}]}
    green_bottle = {"tag": "colors", "include": [{"class": "bottle", "count": 1, "color": "green"}]}
    # GenEval's evaluation_metadata.jsonl: one object per line, the prompt beside its entry
    path = _jsonl(
        tmp_path / "evaluation_metadata.jsonl",
        [{"prompt": "two cups", **two_cups}, {"prompt": "a red bottle", **red_bottle}],
    )
    server_reward = build_reward(
        "geneval_detector",
        detector="tests.test_reward_server:blob_detector",
        colors="tests.test_reward_server:blob_color",
    )
    with thread_server(server_reward) as url:
        client = build_reward("geneval", url=url, retries=0, metadata_file=str(path))
        out = client(images, ["two cups", "a red bottle"], [{}, {}])
        # metadata given with the batch wins over the file's entry
        own = client(images, ["two cups", "a red bottle"], [{}, green_bottle])
        with pytest.raises(UserError, match=r"image 0 needs GenEval metadata"):
            client(images[:1], ["a prompt the file lacks"], [{}])
        bare = build_reward("geneval", url=url, retries=0)
        with pytest.raises(UserError, match="or give the reward a metadata_file"):
            bare(images[:1], ["two cups"], [{}])
    assert out["geneval"].tolist() == [1.0, 0.0] and out["strict"].tolist() == [1.0, 0.0]
    assert own["geneval"].tolist() == [1.0, 1.0]
    for lines, message in (
        (["{not json"], "line 1 .* is not JSON"),
        ([json.dumps({"tag": "counting"})], "line 1 .* not an object with a 'prompt'"),
        ([json.dumps({"prompt": "a", **two_cups}), json.dumps({"prompt": "a", **red_bottle})], "two different"),
        ([""], "holds no entries"),
    ):
        (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(UserError, match=message):
            build_reward("geneval", metadata_file=str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="cannot read the metadata file"):
        build_reward("geneval", metadata_file=str(tmp_path / "missing.jsonl"))


def brightness_detector(images: torch.Tensor) -> list[list[dict]]:
    """One object covering the whole image: a "light" one when its mean pixel is over 1/2, else a "dark" one."""
    height, width = images.shape[-2:]
    return [
        [{"class": "light" if float(img.mean()) > 0.5 else "dark", "score": 0.99, "box": [0, 0, width, height]}]
        for img in images
    ]


def test_training_on_geneval_verdicts_from_a_detector_server(tmp_path: Path) -> None:
    wants = {f"prompt {k}": "light" if k % 2 == 0 else "dark" for k in range(4)}
    entries = [{"prompt": p, "tag": "single_object", "include": [{"class": c, "count": 1}]} for p, c in wants.items()]
    path = _jsonl(tmp_path / "meta.jsonl", entries)
    served = build_reward("geneval_detector", detector="tests.test_reward_server:brightness_detector")
    with thread_server(served) as url:
        data = copy.deepcopy(toy_task.TOY_CONFIG)
        options = {"url": url, "max_batch": 4, "retries": 0, "metadata_file": str(path)}
        data["reward"] = {"weights": {"geneval": 1.0}, "options": {"geneval": options}}
        trainer = GRPOTrainer(config_from_dict(data), tmp_path / "run")
        trainer.run()
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
    assert [(r["epoch"], r["unscored_samples"]) for r in records] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    # the first epoch's verdicts, recomputed from its images (replayed) and the prompts' wishes
    data["reward"] = {"weights": {"toy_brightness": 1.0}}  # the same images, scored by no server
    first = GRPOTrainer(config_from_dict(data), tmp_path / "replay", read_only=True).collect(0)
    light = first.images.flatten(1).mean(1) > 0.5
    met = torch.tensor([float(bool(b) == (wants[p] == "light")) for b, p in zip(light, first.prompts, strict=True)])
    assert records[0]["reward/geneval"] == pytest.approx(float(met.mean()))
    assert records[0]["reward/geneval/strict"] == pytest.approx(float(met.mean()))
    assert 0.0 < float(met.mean()) < 1.0  # the verdicts differ between images: the check above can fail
