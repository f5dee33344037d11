"""Videos as people watch them: MP4 files, frame strips and animated GIFs of ``(F, C, H, W)`` frames in [0, 1].

A video policy decodes to ``(B, F, C, H, W)`` (images are ``(B, C, H, W)``; the number of dimensions
tells them apart). MP4s are H.264 in the yuv420p pixel format, written and read with PyAV (``av``,
FFmpeg's libraries in its wheels): the format every browser and player plays. H.264 in yuv420p needs
an even width and height, so a frame of odd size is padded by repeating its last row or column (the
file is then one pixel taller or wider; :func:`read_mp4` returns what the file holds). Like
``images.py`` this module sits outside the layers and imports none of them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .images import image_grid, to_uint8

__all__ = [
    "DEFAULT_CRF",
    "check_fps",
    "frame_strip",
    "gif_bytes",
    "is_video",
    "mp4_bytes",
    "policy_fps",
    "read_mp4",
    "save_strip",
    "strip_indices",
    "video_uint8",
    "write_mp4",
]

#: libx264's constant rate factor: 18 is the usual "visually lossless"; 0 is lossless in YUV
DEFAULT_CRF = 18


def is_video(x: torch.Tensor) -> bool:
    """Whether a decoded batch holds videos ``(B, F, C, H, W)`` rather than images ``(B, C, H, W)``."""
    return x.ndim == 5


def check_fps(fps: Any, where: str = "fps") -> int:
    """A frame rate as a positive int; ``UserError`` naming ``where`` otherwise."""
    if isinstance(fps, bool) or not isinstance(fps, int | np.integer) or fps < 1:
        raise UserError(f"{where} must be a positive integer frame rate, got {fps!r}")
    return int(fps)


def policy_fps(policy: Any) -> int:
    """The frame rate of a video policy (its int attribute ``fps``), with one sentence when it has none."""
    fps = getattr(policy, "fps", None)
    if fps is None:
        raise UserError(
            f"the policy {type(policy).__name__} decodes to videos but has no 'fps' attribute: a video policy "
            "must say its frame rate (an int) for the MP4s"
        )
    return check_fps(fps, f"the fps of policy {type(policy).__name__}")


def _check_frames(frames: torch.Tensor) -> None:
    if frames.ndim != 4 or frames.shape[1] not in (1, 3) or frames.shape[0] < 1:
        raise ValueError(f"a video must be frames shaped (F, 1 or 3, H, W) with F >= 1, got {tuple(frames.shape)}")


def video_uint8(frames: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``(F, C, H, W)`` in [0, 1] as ``(F, H', W', 3)`` uint8, enlarged ``scale`` times and padded to even size.

    The padding repeats the last row / column, the smallest change that H.264's yuv420p accepts.
    """
    _check_frames(frames)
    arr = np.stack([to_uint8(f, scale) for f in frames])
    h, w = arr.shape[1:3]
    return np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _encode(frames: torch.Tensor, target: Any, fps: int, scale: int, crf: int) -> None:
    import av

    arr = video_uint8(frames, scale)
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=check_fps(fps))
        stream.height, stream.width = arr.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def mp4_bytes(frames: torch.Tensor, fps: int, scale: int = 1, crf: int = DEFAULT_CRF) -> bytes:
    """One video ``(F, C, H, W)`` in [0, 1] as the bytes of an H.264 MP4 (see :func:`write_mp4`)."""
    buf = io.BytesIO()
    _encode(frames, buf, fps, scale, crf)
    return buf.getvalue()


def write_mp4(frames: torch.Tensor, path: str | Path, fps: int, scale: int = 1, crf: int = DEFAULT_CRF) -> Path:
    """Write one video ``(F, C, H, W)`` in [0, 1] as an H.264 MP4 at ``fps`` frames a second.

    ``scale`` enlarges each frame by nearest neighbour (tiny frames stay sharp); an odd height or
    width is padded by one repeated row / column. ``crf`` is libx264's quality (0: lossless in YUV).
    """
    path = Path(path)
    path.write_bytes(mp4_bytes(frames, fps, scale, crf))
    return path


def read_mp4(source: str | Path | bytes) -> tuple[torch.Tensor, float]:
    """An MP4 (a path or its bytes) back to ``(F, 3, H, W)`` float32 frames in [0, 1], and its frame rate."""
    import av

    target: Any = io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source)
    try:
        with av.open(target, mode="r") as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        name = "the MP4 bytes" if isinstance(source, bytes | bytearray) else repr(str(source))
        raise UserError(f"cannot read {name} as a video ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise UserError("the MP4 holds no frames")
    stacked = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    return stacked, rate


def strip_indices(num_frames: int) -> list[int]:
    """The first, middle and last frame (fewer for a video of one or two frames)."""
    return sorted({0, (num_frames - 1) // 2, num_frames - 1})


def frame_strip(frames: torch.Tensor) -> torch.Tensor:
    """The first, middle and last frames of ``(F, C, H, W)`` side by side as one ``(C, H, k W + k - 1)`` image.

    One column of grey (0.5) separates the frames, so a strip passes for an image: it goes into the
    labelled grids of :mod:`precise_rl.images` like any sample.
    """
    _check_frames(frames)
    picked = [frames[i].detach().float().cpu().clamp(0, 1) for i in strip_indices(frames.shape[0])]
    gap = torch.full((frames.shape[1], frames.shape[2], 1), 0.5)
    parts: list[torch.Tensor] = []
    for k, frame in enumerate(picked):
        parts += [gap, frame] if k else [frame]
    return torch.cat(parts, dim=-1)


def save_strip(frames: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """The first / middle / last frame strip of one video as PNG, enlarged ``scale`` times."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(to_uint8(frame_strip(frames), scale)).save(path)
    return path


def gif_bytes(videos: torch.Tensor, fps: int, cols: int | None = None, scale: int = 1) -> tuple[bytes, int, int]:
    """Videos ``(B, F, C, H, W)`` tiled into one animated GIF (a grid per frame); (bytes, height, width).

    What TensorBoard shows as a video: ``SummaryWriter.add_video`` writes such a GIF in an image
    summary, made with moviepy; this makes it with Pillow.
    """
    from PIL import Image

    if videos.ndim != 5:
        raise ValueError(f"videos must be shaped (B, F, C, H, W), got {tuple(videos.shape)}")
    b, f = videos.shape[:2]
    cols = cols or b
    rows = -(-b // cols)
    grids = [Image.fromarray(image_grid(videos[:, k], rows, cols, scale)) for k in range(f)]
    buf = io.BytesIO()
    grids[0].save(buf, format="GIF", save_all=True, append_images=grids[1:], duration=max(1, round(1000 / fps)), loop=0)
    return buf.getvalue(), grids[0].height, grids[0].width
