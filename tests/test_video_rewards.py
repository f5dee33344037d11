"""Rewards on videos ``(B, F, C, H, W)``: image rewards on chosen frames, and CLIP temporal consistency.

The frame option is checked against the inner reward computed here frame by frame (its formula
written out, or the JPEG sizes of the frames one by one); temporal consistency against
transformers' own CLIPModel in float64 on Pillow-preprocessed frames (tiny CLIP built from a config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from precise_rl.errors import UserError
from precise_rl.rewards import Reward, RewardSet, build_reward, jpeg_sizes_kb
from precise_rl.rewards.video import parse_frames, resolve_frames

from .test_reward_models import IMAGE, _processor_dir, _reference_pixels, _smooth_images, _tiny_clip


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


class PairedBrightness(Reward):
    """Mean pixel x prompt length + the metadata's bias: a frame scored with another video's prompt shows."""

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f"an image reward, given {tuple(images.shape)}")
        mean = images.flatten(1).mean(1)
        length = torch.tensor([float(len(p)) for p in prompts])
        bias = torch.tensor([float(m["bias"]) for m in metadata])
        return {self.name: mean * length + bias, "mean": mean}


def _direct(video: torch.Tensor, prompt: str, bias: float, frames: list[int]) -> tuple[float, float]:
    """The inner reward's formula on each named frame on its own, averaged."""
    means = [float(video[f].double().mean()) for f in frames]
    return sum(m * len(prompt) + bias for m in means) / len(frames), sum(means) / len(frames)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("first,middle,last", lambda n: [0, (n - 1) // 2, n - 1]),
        ("all", lambda n: list(range(n))),
        ([0, -1], lambda n: [0, n - 1]),
        ("0, middle, -2", lambda n: [0, (n - 1) // 2, n - 2]),
        (3, lambda n: [3]),
        (["last", "first"], lambda n: [n - 1, 0]),
    ],
)
def test_the_frames_option_is_the_mean_of_the_inner_reward_over_those_frames(spec: Any, expected: Any) -> None:
    gen = _gen()
    b, n = 3, int(torch.randint(4, 9, (), generator=gen))
    videos = torch.rand(b, n, 3, 5, 6, generator=gen)
    prompts = ["a cat", "two dogs on a sofa", "x"]
    metadata = [{"bias": float(torch.randn((), generator=gen))} for _ in range(b)]
    rewards = RewardSet(
        {"tests.test_video_rewards:PairedBrightness": 1.0},
        **{"tests.test_video_rewards:PairedBrightness": {"frames": spec}},
    )
    out = rewards.score(videos, prompts, metadata)
    key = "tests.test_video_rewards:PairedBrightness"
    for k in range(b):
        score, mean = _direct(videos[k], prompts[k], metadata[k]["bias"], expected(n))
        assert float(out[key][k]) == pytest.approx(score, rel=1e-5, abs=1e-5)
        assert float(out[f"{key}/mean"][k]) == pytest.approx(mean, rel=1e-5, abs=1e-6)


def test_a_registered_image_reward_scores_frames_through_its_options() -> None:
    gen = _gen()
    videos = torch.rand(2, 5, 3, 8, 8, generator=gen)
    rewards = RewardSet({"jpeg_compressibility": 1.0}, jpeg_compressibility={"frames": "first,last", "quality": 80})
    out = rewards.score(videos, ["a", "b"])["jpeg_compressibility"]
    for k in range(2):
        sizes = jpeg_sizes_kb(videos[k, [0, 4]], quality=80)
        assert float(out[k]) == pytest.approx(-float(sizes.double().mean()), rel=1e-6)
    # the same reward built by name for a server (``--set frames=...``) is the same wrapper
    served = build_reward("jpeg_compressibility", frames="first,last", quality=80)
    assert served.name == "jpeg_compressibility" and served.accepts_video
    torch.testing.assert_close(served(videos, ["a", "b"], [{}, {}])["jpeg_compressibility"], out)


def test_an_image_reward_given_videos_says_what_to_write() -> None:
    videos = torch.rand(2, 3, 3, 4, 4)
    with pytest.raises(UserError) as info:
        RewardSet({"jpeg_compressibility": 1.0}).score(videos, ["a", "b"])
    message = str(info.value)
    assert "scores images and the policy makes videos" in message
    assert "reward.options.jpeg_compressibility.frames=first,middle,last" in message
    assert "\n" not in message


def test_frame_options_that_cannot_apply_are_one_sentence() -> None:
    with pytest.raises(UserError, match="must be 'all', names among first, middle, last, or frame indices"):
        RewardSet({"jpeg_compressibility": 1.0}, jpeg_compressibility={"frames": "beginning"})
    with pytest.raises(UserError, match="names no frame"):
        parse_frames([])
    rewards = RewardSet({"jpeg_compressibility": 1.0}, jpeg_compressibility={"frames": [0, 7]})
    with pytest.raises(UserError, match="names frame 7, but the videos have 4 frames"):
        rewards.score(torch.rand(1, 4, 3, 4, 4), ["a"])
    with pytest.raises(UserError, match="picks frames of videos .* but it was given images"):
        rewards.score(torch.rand(1, 3, 4, 4), ["a"])
    assert resolve_frames(parse_frames("-4,last"), 4) == [0, 3]
    with pytest.raises(UserError, match="names frame -5"):
        resolve_frames(parse_frames([-5]), 4)


# ----------------------------------------------------------------------------- temporal consistency


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = _tiny_clip(tmp_path_factory.mktemp("tc") / "clip", seed=5)
    return _processor_dir(directory)  # tokenizer and preprocessor_config.json beside the weights


def _reference_consistency(clip_dir: Path, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and min of consecutive frames' cosines, from CLIPModel in float64 on Pillow-preprocessed frames."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).double().eval()
    b, f = videos.shape[:2]
    pixels = _reference_pixels(videos.reshape(b * f, *videos.shape[2:]), IMAGE, "shortest").double()
    with torch.no_grad():
        e = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    e = (e / e.norm(dim=-1, keepdim=True)).reshape(b, f, -1)
    cos = torch.stack([(e[:, k] * e[:, k + 1]).sum(-1) for k in range(f - 1)], dim=1)
    return cos.mean(1), cos.min(1).values


def test_temporal_consistency_is_the_mean_cosine_of_consecutive_clip_embeddings(clip_dir: Path) -> None:
    gen = _gen()
    reward = build_reward("temporal_consistency", model=str(clip_dir), batch_size=4)
    # frames at the model's size (no resize): float precision; larger frames: Pillow's bicubic differs by a level
    for h, w, atol in ((IMAGE, IMAGE, 1e-4), (40, 52, 2e-3)):
        videos = torch.stack([_smooth_images(gen, 5, h, w) for _ in range(3)])
        out = reward(videos, ["a", "b", "c"], [{}] * 3)
        mean, low = _reference_consistency(clip_dir, videos)
        torch.testing.assert_close(out["temporal_consistency"].double(), mean, rtol=0, atol=atol)
        torch.testing.assert_close(out["min"].double(), low, rtol=0, atol=atol)
    still = _smooth_images(gen, 1, IMAGE, IMAGE).expand(4, -1, -1, -1)[None]
    assert float(reward(still, ["a"], [{}])["temporal_consistency"]) == pytest.approx(1.0, abs=1e-5)


def test_temporal_consistency_needs_videos_of_two_frames(clip_dir: Path) -> None:
    rewards = RewardSet({"temporal_consistency": 1.0}, temporal_consistency={"model": str(clip_dir)})
    with pytest.raises(UserError, match="needs videos of at least two frames"):
        rewards.score(torch.rand(2, 1, 3, 8, 8), ["a", "b"])
    with pytest.raises(UserError, match="needs videos of at least two frames"):
        rewards.score(torch.rand(2, 3, 8, 8), ["a", "b"])
