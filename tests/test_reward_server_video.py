"""Videos through the reward server over real sockets on 127.0.0.1: frames as PNGs, bounds, hostile requests.

A served video reward sees ``(B, F, C, H, W)`` in frame order with each video's own prompt; an image
reward is served for videos through its frames option (client side or server side) and refuses whole
videos with 415, which the client turns into one sentence. Hostile bodies are built here with PIL
and by hand (a PNG with a forged IHDR), not with the protocol's own encoder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch

from precise_rl.cli.serve_reward import main as server_main
from precise_rl.errors import UserError
from precise_rl.rewards import Reward, build_reward
from precise_rl.rewards.protocol import Limits, ProtocolError, decode_videos, encode_videos, parse_request

from .test_reward_server import thread_server
from .test_reward_server_hostile import _b64, _png_bytes, _post, _thread_server, bomb_png

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


class FrameOrder(Reward):
    """``sum_f (f + 1) mean(frame f) + len(prompt)``: a reordered frame or a wrong pairing changes the score."""

    name = "frame_order"
    accepts_video = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> dict:
        assert images.ndim == 5
        weights = torch.arange(1, images.shape[1] + 1, dtype=torch.float64)
        means = images.double().flatten(2).mean(-1)  # (B, F)
        length = torch.tensor([float(len(p)) for p in prompts], dtype=torch.float64)
        return {"frame_order": means @ weights + length, "frames": torch.full_like(length, images.shape[1])}


class MeanLevel(Reward):
    """An image reward: the mean 8-bit level of each image."""

    name = "mean_level"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        assert images.ndim == 4
        return images.double().flatten(1).mean(1)


def _videos(b: int, f: int, shape: tuple[int, int, int] = (3, 6, 8), seed: int | None = None) -> torch.Tensor:
    seed = int(torch.randint(0, 2**31, ())) if seed is None else seed
    return torch.rand(b, f, *shape, generator=torch.Generator().manual_seed(seed))


def _expected_order(videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    q = _levels(videos).double()
    out = []
    for v, p in zip(q, prompts, strict=True):
        out.append(sum((k + 1) * float(v[k].mean()) for k in range(v.shape[0])) + len(p))
    return torch.tensor(out, dtype=torch.float64)


def _video_body(videos: list[list[str]], **extra: Any) -> bytes:
    n = len(videos) if isinstance(videos, list) else 1
    body = {"protocol": 1, "videos": videos, "prompts": ["p"] * n, "metadata": [{}] * n}
    body.update(extra)
    return json.dumps(body).encode()


def _pil_frames(f: int, h: int, w: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    arrays = rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)
    return [_b64(_png_bytes(a)) for a in arrays], arrays


# ----------------------------------------------------------------------------- the wire


def test_videos_survive_the_wire_as_eight_bit_png_frames() -> None:
    for shape in ((3, 5, 7), (1, 4, 4)):
        videos = _videos(2, 3, shape)
        back = decode_videos(encode_videos(videos))
        torch.testing.assert_close(back, _levels(videos), rtol=0, atol=1e-7)
    # frames written by PIL, not by the protocol's encoder, come back as (B, F, C, H, W) in order
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    a, arr_a = _pil_frames(4, 5, 6, rng)
    b, arr_b = _pil_frames(4, 5, 6, rng)
    videos, prompts, meta = parse_request({"protocol": 1, "videos": [a, b], "prompts": ["x", "y"]})
    assert videos.shape == (2, 4, 3, 5, 6) and prompts == ["x", "y"] and meta == [{}, {}]
    expected = torch.from_numpy(np.stack([arr_a, arr_b])).permute(0, 1, 4, 2, 3).float() / 255
    torch.testing.assert_close(videos, expected, rtol=0, atol=0)


def test_a_video_reward_scores_every_video_with_its_own_prompt_over_a_socket() -> None:
    videos = _videos(5, 4)
    prompts = [f"prompt {'x' * k}" for k in range(5)]
    with thread_server(FrameOrder()) as url:
        reward = build_reward("remote@video", url=url, max_batch=2, retries=0)
        out = reward(videos, prompts, [{"k": k} for k in range(5)])
    torch.testing.assert_close(out["remote@video"].double(), _expected_order(videos, prompts), rtol=0, atol=1e-4)
    assert out["frames"].tolist() == [4.0] * 5 and out["unscored"].tolist() == [0.0] * 5
    assert reward.stats["requests"] == 3


def test_an_image_server_scores_chosen_frames_and_refuses_whole_videos() -> None:
    videos = _videos(3, 5)
    prompts = ["a", "b", "c"]
    per_frame = _levels(videos).double().flatten(2).mean(-1)  # (B, F)
    with thread_server(MeanLevel()) as url:
        # the client picks the frames and sends them as images
        client = build_reward("remote", url=url, frames="first,last", retries=0)
        out = client(videos, prompts, [{}] * 3)
        torch.testing.assert_close(out["remote"].double(), per_frame[:, [0, 4]].mean(1), rtol=0, atol=1e-6)
        # whole videos to an image reward: HTTP 415, one sentence, no retry
        whole = build_reward("remote", url=url, retries=3, backoff=0.0)
        with pytest.raises(UserError, match="cannot score videos .*scores images, not videos.*--set frames="):
            whole(videos, prompts, [{}] * 3)
        assert whole.stats["requests"] == 1
    # the server's reward built with frames (``--set frames=all``) takes the videos whole
    served = build_reward("tests.test_reward_server_video:MeanLevel", frames="all")
    with thread_server(served) as url:
        out = build_reward("remote", url=url, retries=0)(videos, prompts, [{}] * 3)
    torch.testing.assert_close(out["remote"].double(), per_frame.mean(1), rtol=0, atol=1e-6)


class DarkCornerUnscored(Reward):
    """An image reward that cannot score an image whose top-left red level is under 0.2 (null)."""

    name = "corner"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        score = images.double().flatten(1).mean(1)
        score[images[:, 0, 0, 0] < 0.2] = float("nan")
        return score


def test_frames_scored_remotely_in_the_background_leave_a_video_unscored_when_one_frame_is() -> None:
    from precise_rl.rewards import RewardSet

    videos = _videos(6, 4)
    prompts = [f"p{k}" for k in range(6)]
    q = _levels(videos).double()
    chosen = [0, 1, 3]  # first, middle ((4 - 1) // 2) and last
    with thread_server(DarkCornerUnscored()) as url:
        rewards = RewardSet({"remote": 1.0}, remote={"url": url, "frames": "first,middle,last", "max_batch": 5})
        assert callable(getattr(rewards.rewards["remote"], "submit", None))  # scored in the background
        out = rewards.score(videos, prompts)
    for b in range(6):
        dark = any(float(q[b, f, 0, 0, 0]) < 0.2 for f in chosen)
        assert out["remote/unscored"][b].item() == float(dark)
        if dark:
            assert torch.isnan(out["remote"][b])
        else:
            expected = sum(float(q[b, f].mean()) for f in chosen) / 3
            assert out["remote"][b].item() == pytest.approx(expected, abs=1e-6)


def test_an_image_reward_without_frames_is_refused_on_the_client_for_geneval() -> None:
    from precise_rl.rewards import RewardSet

    rewards = RewardSet({"geneval": 1.0}, geneval={"url": "http://127.0.0.1:9"})
    with pytest.raises(UserError, match="reward.options.geneval.frames=first,middle,last"):
        rewards.score(_videos(1, 2), ["a"], [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}])


# ----------------------------------------------------------------------------- bounds and hostile requests


def test_frame_count_and_pixel_bounds_are_read_before_decoding() -> None:
    limits = Limits(max_images=2, max_image_pixels=100, max_request_pixels=250, max_frames=3)
    ok = _b64(_png_bytes(np.zeros((10, 10), np.uint8)))
    assert decode_videos([[ok, ok]], limits).shape == (1, 2, 1, 10, 10)
    with pytest.raises(ProtocolError, match="video 0 has 4 frames, over the limit of 3 frames per video"):
        decode_videos([[ok] * 4], limits)
    with pytest.raises(ProtocolError, match="3 videos, over the limit of 2"):
        decode_videos([[ok]] * 3, limits)
    with pytest.raises(ProtocolError, match="frame 1 of video 0 is 11x10 pixels, over the limit of 100"):
        decode_videos([[ok, _b64(_png_bytes(np.zeros((10, 11), np.uint8)))]], limits)
    with pytest.raises(ProtocolError, match="over 250 pixels"):  # three frames under the per-frame bound
        decode_videos([[ok, ok, ok]], limits)
    # a frame count over the bound is refused even when a frame is garbage: nothing was decoded
    with pytest.raises(ProtocolError, match="over the limit of 3 frames"):
        decode_videos([[ok], ["garbage"] * 4], limits)
    truncated = bomb_png(20000, 20000)[:40]  # the header alone bounds it
    with pytest.raises(ProtocolError, match="20000x20000"):
        decode_videos([[_b64(truncated)]], Limits(max_image_pixels=10**6))


def test_hostile_video_requests_get_4xx_and_the_server_stays_up() -> None:
    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    frames, arrays = _pil_frames(3, 6, 8, rng)
    other, _ = _pil_frames(2, 6, 8, rng)
    small, _ = _pil_frames(3, 4, 4, rng)
    bomb = _b64(bomb_png(8192, 8192))  # 64 Mpixel from some 70 kB
    cases = [
        (_video_body([[bomb]]), 413, "frame 0 of video 0 is 8192x8192"),
        (_video_body([[_b64(bomb_png(2000, 2000))] * 9]), 413, "per request"),
        (_video_body([frames] * 3), 413, "3 videos, over the limit of 2"),
        (_video_body([frames * 4]), 413, "12 frames, over the limit of 10"),
        (_video_body([frames, other]), 400, "same number of frames"),
        (_video_body([frames, small]), 400, "one size"),
        (_video_body([frames], images=[frames[0]]), 400, "not both"),
        (_video_body([]), 400, "'videos' must be a non-empty list"),
        (_video_body(["not a list"]), 400, "video 0 is not a non-empty list"),
        (_video_body([[]]), 400, "video 0 is not a non-empty list"),
        (_video_body({"a": 1}), 400, "'videos' must be a non-empty list"),
        (_video_body([[frames[0], 7]]), 400, "frame 1 of video 0 is not a base64 string"),
        (_video_body([[frames[0], "!!!"]]), 400, "frame 1 of video 0 is not a readable base64 PNG"),
        (_video_body([[frames[0], _b64(b"GIF89a" + b"\x00" * 40)]]), 400, "frame 1 of video 0 is not a PNG"),
        (_video_body([frames], prompts=["a", "b"]), 400, "got 1 videos, 2 prompts"),
        (b"x" * 2_100_000, 413, "over the limit"),
    ]
    limits = Limits(max_images=2, max_image_pixels=8192 * 8000, max_request_pixels=2000 * 2000 * 8, max_frames=10)
    with _thread_server(FrameOrder(), limits=limits, max_request_bytes=2_000_000) as port:
        for body, status, detail in cases:
            got, answer = _post(port, body)
            assert got == status and detail in answer["detail"], (status, detail, got, answer)
        got, answer = _post(port, _video_body([frames]))
        assert got == 200
        expected = sum((k + 1) * float(arrays[k].astype(np.float64).mean() / 255) for k in range(3)) + 1
        assert answer["scores"]["frame_order"] == pytest.approx([expected], abs=1e-6)


def test_the_client_splits_videos_over_the_request_bound_and_marks_one_it_cannot_send() -> None:
    videos = _videos(4, 3, (3, 8, 8))
    prompts = [f"p{k}" for k in range(4)]
    limits = Limits(max_images=64, max_image_pixels=10**6, max_request_pixels=2 * 3 * 64, max_frames=16)
    with thread_server(FrameOrder(), limits=limits) as url:
        reward = build_reward("remote", url=url, max_batch=4, retries=0)
        out = reward(videos, prompts, [{}] * 4)
        torch.testing.assert_close(out["remote"].double(), _expected_order(videos, prompts), rtol=0, atol=1e-4)
        assert reward.stats["requests"] == 3  # all four (413), then two halves of two videos
        big = _videos(1, 7, (3, 8, 8))  # one video over the pixel bound by itself: unscored, not a crash
        out = reward(big, ["p"], [{}])
    assert out["unscored"].tolist() == [1.0] and torch.isnan(out["remote"]).all()


def test_serve_reward_checks_the_frame_bound(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_main(["tests.test_reward_server_video:FrameOrder", "--max-frames", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "precise-rl serve-reward: error: --max-frames must be a positive integer, got 0"
