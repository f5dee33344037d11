"""A video policy through the whole path: ``precise-rl train`` -> ``eval`` -> ``sample``, with no video model.

The tiny video model of ``tests/extensions/tiny_video_model.py`` decodes to ``(B, F, C, H, W)``; it is
trained on an image reward scoring chosen frames plus CLIP temporal consistency (a tiny CLIP built
from a config), evaluated, and sampled. The run's sample grids are frame strips with MP4s beside
them and TensorBoard holds the videos as GIFs; the sample command writes an MP4 and a strip per
sample, and each MP4's frames match its strip (8-bit PNG) within the codec's tolerance.
"""

from __future__ import annotations

import importlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from precise_rl.cli import main
from precise_rl.policies import registry as policy_registry
from precise_rl.rewards import base as reward_base
from precise_rl.videos import read_mp4

from .test_reward_models import _processor_dir, _tiny_clip

MODULES = ["tests.extensions.tiny_video_model", "tests.extensions.brightness_reward"]
FRAMES, H, W = 4, 5, 7  # the tiny model's frames


@pytest.fixture
def video_model() -> Iterator[None]:
    tables = [policy_registry.ADAPTERS, policy_registry.PIPELINE_ADAPTERS, reward_base._REGISTRY]
    saved = [dict(t) for t in tables]
    for module in MODULES:
        if module in sys.modules:
            importlib.reload(sys.modules[module])  # registers again after an earlier test's restore
        else:
            importlib.import_module(module)
    yield
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)


def _strip_frames(path: Path, scale: int) -> list[np.ndarray]:
    """The first / middle / last frames of a strip PNG, back at the model's size (one pixel per block)."""
    arr = np.asarray(Image.open(path)).astype(np.float64) / 255
    block = W * scale + scale  # a frame and the one-pixel separator, enlarged
    return [arr[scale // 2 :: scale, k * block + scale // 2 : k * block + W * scale : scale] for k in range(3)]


def _block_centres(frame: torch.Tensor, scale: int) -> np.ndarray:
    """An MP4 frame ``(3, H', W')`` sampled at the centre of each enlarged pixel, ``(H, W, 3)``."""
    return frame[:, scale // 2 : H * scale : scale, scale // 2 : W * scale : scale].permute(1, 2, 0).double().numpy()


def test_train_eval_and_sample_a_video_policy(video_model: None, tmp_path: Path) -> None:
    clip = _processor_dir(_tiny_clip(tmp_path / "clip", seed=2))
    run = tmp_path / "run"
    args = [
        "model.name=tiny_video",
        "sampler.name=precise",
        "sampler.num_steps=3",
        "reward.weights.ext_brightness=1.0",
        "reward.weights.temporal_consistency=0.5",
        "reward.options.ext_brightness.frames=first,middle,last",
        f"reward.options.temporal_consistency.model={clip}",
        "train.epochs=2",
        "train.groups_per_epoch=2",
        "train.group_size=2",
        "train.batch_size=4",
        "train.lr=1e-2",
        "eval.every=2",
        "eval.num_steps=3",
        "eval.max_prompts=2",
        "eval.samples_per_prompt=2",
        "eval.grid_prompts=2",
        "logging.tensorboard=true",
        "logging.progress=false",
    ]
    assert main(["train", *args, "--output", str(run)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert {"reward/ext_brightness", "reward/temporal_consistency", "reward/temporal_consistency/min"} <= set(last)
    assert 0 < last["reward/ext_brightness"] < 1 and -1 <= last["reward/temporal_consistency"] <= 1
    assert "eval_ode/temporal_consistency" in last

    # the evaluation grids: frame strips (a row per prompt), the MP4s beside them
    for epoch in (0, 2):
        grid = run / "samples" / f"epoch_{epoch:04d}_ode.png"
        assert grid.is_file()
        mp4s = sorted((run / "samples" / f"epoch_{epoch:04d}_ode").glob("*.mp4"))
        assert [p.name for p in mp4s] == [f"prompt{r}_sample{c}.mp4" for r in range(2) for c in (1, 2)]
        frames, fps = read_mp4(mp4s[0])
        scale = 64 // W  # the grid's enlargement of 7-pixel-wide frames; 5 x 9 = 45 rows padded to 46
        assert fps == 8 and frames.shape == (FRAMES, 3, H * scale + 1, W * scale + 1)

    # TensorBoard: the grid as an image, the videos as an animated GIF
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"samples/ode", "samples_video/ode"} <= set(events.Tags()["images"])
    gif = Image.open(io.BytesIO(events.Images("samples_video/ode")[-1].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == FRAMES

    # the same run evaluated from its checkpoint
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert "temporal_consistency" in json.dumps(result)

    # samples of the trained run: an MP4 and a strip per seed and sampler, and a grid of strips
    out = tmp_path / "samples"
    code = main(
        ["sample", "--model", str(run), "--prompt", "a cat", "--num-images", "2", "--steps", "3", "-o", str(out)]
        + ["--grid", "--grid-samplers", "ode,precise"]
    )
    assert code == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["fps"] == 8 and record["frames"] == FRAMES
    files = [Path(f) for f in record["prompts"][0]["files"]]
    assert sorted(f.name for f in files) == sorted(
        f"{s}_seed{k}{ext}" for s in ("precise", "ode") for k in (0, 1) for ext in (".mp4", "_frames.png")
    )
    assert Path(record["prompts"][0]["grid"]).is_file()
    scale = 64 // H  # sample's enlargement: by the short side
    for mp4 in (f for f in files if f.suffix == ".mp4"):
        frames, fps = read_mp4(mp4)
        assert fps == 8 and frames.shape == (FRAMES, 3, H * scale, W * scale)
        strip = _strip_frames(mp4.with_name(mp4.stem + "_frames.png"), scale)
        for k, index in enumerate((0, (FRAMES - 1) // 2, FRAMES - 1)):
            # at the centre of each enlarged pixel the colour is flat around it, so 4:2:0 chroma loses
            # nothing there; what is left is the encoder's quantisation at crf 18 and YUV rounding
            err = np.abs(_block_centres(frames[index], scale) - strip[k])
            assert err.mean() * 255 <= 4.0, (mp4.name, k, err.mean() * 255)


def test_an_image_reward_on_a_video_policy_without_frames_stops_with_what_to_write(
    video_model: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["model.name=tiny_video", "reward.weights.ext_brightness=1.0", "sampler.num_steps=2"]
    args += ["train.epochs=1", "train.groups_per_epoch=1", "train.group_size=2", "train.batch_size=2"]
    args += ["eval.every=0", "logging.tensorboard=false", "logging.progress=false"]
    assert main(["train", *args, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "reward 'ext_brightness' scores images and the policy makes videos" in err
    assert "reward.options.ext_brightness.frames=first,middle,last" in err
