"""MP4s, frame strips and GIFs of ``(F, C, H, W)`` frames, checked by decoding them back.

H.264 in yuv420p (what every player plays) is lossy in two ways even at ``crf=0`` (lossless in
YUV): the RGB -> YUV conversion quantises to limited range (219 luma levels and 224 chroma levels
for 256), and chroma is kept at half resolution. So the tolerances are: grey frames (no chroma)
within 2 levels of 255 (luma rounding, at most about 1.5); flat-colour frames (chroma subsampling
loses nothing) within 4 levels (chroma rounding, amplified up to 1.8 times by the YUV -> RGB matrix);
a smooth colour video at the default quality within 4 levels on average, every decoded frame
nearest to its own source frame.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from precise_rl.errors import UserError
from precise_rl.videos import (
    frame_strip,
    gif_bytes,
    mp4_bytes,
    policy_fps,
    read_mp4,
    save_strip,
    strip_indices,
    write_mp4,
)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def test_grey_frames_survive_a_lossless_mp4_within_luma_rounding(tmp_path) -> None:
    gen = _gen()
    frames = _levels(torch.rand(6, 1, 10, 14, generator=gen))
    path = write_mp4(frames, tmp_path / "grey.mp4", fps=12, crf=0)
    back, fps = read_mp4(path)
    assert fps == 12 and back.shape == (6, 3, 10, 14)
    assert (back - frames.expand(-1, 3, -1, -1)).abs().max() * 255 <= 2.0


def test_flat_colour_frames_survive_within_chroma_rounding() -> None:
    gen = _gen()
    colours = torch.rand(7, 3, 1, 1, generator=gen)
    frames = _levels(colours.expand(-1, -1, 6, 10))
    back, _ = read_mp4(mp4_bytes(frames, fps=8, crf=0))
    assert back.shape == frames.shape
    assert (back - frames).abs().max() * 255 <= 4.0


def test_a_smooth_colour_video_keeps_its_frames_in_order_at_the_default_quality() -> None:
    gen = _gen()
    coarse = torch.rand(8, 3, 3, 3, generator=gen) * 0.8 + 0.1
    frames = F.interpolate(coarse, size=(64, 96), mode="bicubic", align_corners=True).clamp(0, 1)
    back, fps = read_mp4(mp4_bytes(frames, fps=24))
    assert fps == 24 and back.shape == frames.shape
    assert (back - frames).abs().mean() * 255 <= 4.0
    # every decoded frame is nearest to its own source frame: none is dropped, repeated or reordered
    dist = ((back[:, None] - frames[None]) ** 2).flatten(2).mean(-1)
    assert dist.argmin(dim=1).tolist() == list(range(8))


def test_odd_sizes_are_padded_by_repeating_the_last_row_and_column() -> None:
    gen = _gen()
    frames = _levels(torch.rand(3, 1, 5, 7, generator=gen))
    back, _ = read_mp4(mp4_bytes(frames, fps=4, crf=0))
    assert back.shape == (3, 3, 6, 8)  # H.264 in yuv420p needs even sides
    inner = back[..., :5, :7]
    assert (inner - frames.expand(-1, 3, -1, -1)).abs().max() * 255 <= 2.0
    assert (back[..., 5, :7] - frames[..., 4, :].expand(-1, 3, -1)).abs().max() * 255 <= 2.0
    assert (back[..., :5, 7] - frames[..., :, 6].expand(-1, 3, -1)).abs().max() * 255 <= 2.0


def test_scale_enlarges_each_pixel_into_a_block() -> None:
    gen = _gen()
    frames = _levels(torch.rand(2, 1, 3, 3, generator=gen))
    back, _ = read_mp4(mp4_bytes(frames, fps=4, scale=4, crf=0))
    assert back.shape == (2, 3, 12, 12)
    expected = frames.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3).expand(-1, 3, -1, -1)
    assert (back - expected).abs().max() * 255 <= 2.0


def test_the_strip_is_the_first_middle_and_last_frames_side_by_side(tmp_path) -> None:
    gen = _gen()
    for n in (1, 2, 5, 8):
        frames = torch.rand(n, 3, 4, 6, generator=gen)
        picked = sorted({0, (n - 1) // 2, n - 1})
        assert strip_indices(n) == picked
        strip = frame_strip(frames)
        k = len(picked)
        assert strip.shape == (3, 4, k * 6 + (k - 1))
        for j, idx in enumerate(picked):
            torch.testing.assert_close(strip[:, :, j * 7 : j * 7 + 6], frames[idx])
            if j:
                assert bool((strip[:, :, j * 7 - 1] == 0.5).all())  # the grey separator
    png = np.asarray(Image.open(save_strip(frames, tmp_path / "strip.png", scale=2)))
    assert png.shape == (8, 2 * (3 * 6 + 2), 3)
    first = (frames[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert (png[::2, 0:12:2] == first).all()


def test_the_gif_tiles_every_video_frame_by_frame() -> None:
    gen = _gen()
    # few distinct colours, so the GIF's palette holds them exactly
    levels = torch.tensor([0.0, 1.0])
    videos = levels[torch.randint(0, 2, (3, 4, 1, 2, 2), generator=gen)].expand(-1, -1, 3, -1, -1)
    data, h, w = gif_bytes(videos, fps=5, cols=3)
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 4 and gif.size == (w, h) == (3 * 3 + 1, 4)
    for f in range(4):
        gif.seek(f)
        frame = np.asarray(gif.convert("RGB")).astype(float) / 255
        for b in range(3):
            cell = frame[1:3, 1 + b * 3 : 3 + b * 3]
            np.testing.assert_array_equal(cell, videos[b, f].permute(1, 2, 0).numpy())
        assert gif.info["duration"] == 200


def test_unreadable_videos_and_missing_frame_rates_are_one_sentence(tmp_path) -> None:
    bad = tmp_path / "not.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(UserError, match="cannot read .*not.mp4.* as a video"):
        read_mp4(bad)
    with pytest.raises(UserError, match="cannot read the MP4 bytes"):
        read_mp4(b"\x00" * 64)

    class NoFps:
        pass

    with pytest.raises(UserError, match="decodes to videos but has no 'fps' attribute"):
        policy_fps(NoFps())
    NoFps.fps = 0
    with pytest.raises(UserError, match="must be a positive integer frame rate"):
        policy_fps(NoFps())
    with pytest.raises(ValueError, match=r"\(F, 1 or 3, H, W\)"):
        mp4_bytes(torch.rand(2, 4, 4, 4), fps=4)
