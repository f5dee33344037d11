"""Rewards for videos ``(B, F, C, H, W)``: any image reward on chosen frames, and temporal consistency.

**An image reward on frames.** Any image reward takes the option ``frames`` (in ``reward.options``, or
``--set frames=...`` of ``precise-rl serve-reward``): it then scores the named frames of each video as
images, with the video's prompt and metadata, and each field is the mean over those frames, as
DanceGRPO scores videos with image models. ``frames`` is ``all``, ``first,middle,last`` (any of these
names, comma-separated), frame indices (negative ones count from the end: ``[0, -1]``), or a mix
(``"0,middle,-1"``); ``middle`` is frame ``(F - 1) // 2``. An image reward given videos without it
stops with one sentence saying what to write.

**temporal_consistency**: the mean cosine similarity of consecutive frames' CLIP image embeddings
(1 for a still video; lower the more the content changes from frame to frame), with ``min`` (the
least similar consecutive pair) as an extra field. CLIP loads as the CLIP rewards load theirs
(:mod:`.clip_models`), by default ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .base import Reward, register_reward
from .clip_models import _TOKENIZER_FILES, ModelReward, _image_embeds, _load_clip_model, _unit, load_clip_preprocess
from .hub import resolve_dir
from .remote import UNSCORED

__all__ = [
    "FrameReward",
    "TemporalConsistency",
    "frame_reward",
    "parse_frames",
    "resolve_frames",
    "needs_frames_sentence",
]

_NAMES = ("first", "middle", "last")


def parse_frames(spec: Any, name: str = "") -> list[int | str] | str:
    """The ``frames`` option checked: ``"all"`` or a list of names (first, middle, last) and ints."""
    where = f"the frames option of reward {name!r}" if name else "the frames option"
    items: list[Any]
    if isinstance(spec, str):
        if spec.strip() == "all":
            return "all"
        items = [x.strip() for x in spec.split(",")]
    elif isinstance(spec, int) and not isinstance(spec, bool):
        items = [spec]
    elif isinstance(spec, list | tuple):
        items = list(spec)
    else:
        items = [None]
    out: list[int | str] = []
    for item in items:
        if isinstance(item, str) and item.lstrip("-").isdigit():
            item = int(item)
        if isinstance(item, bool) or not (isinstance(item, int) or item in _NAMES):
            raise UserError(
                f"{where} must be 'all', names among first, middle, last, or frame indices such as [0, -1], "
                f"got {spec!r}"
            )
        out.append(item)
    if not out:
        raise UserError(f"{where} names no frame")
    return out


def resolve_frames(spec: list[int | str] | str, num_frames: int, name: str = "") -> list[int]:
    """The frame indices ``spec`` (from :func:`parse_frames`) names in videos of ``num_frames`` frames."""
    if spec == "all":
        return list(range(num_frames))
    named = {"first": 0, "middle": (num_frames - 1) // 2, "last": num_frames - 1}
    out = []
    for item in spec:
        k = named[item] if isinstance(item, str) else int(item)
        if not -num_frames <= k < num_frames:
            raise UserError(
                f"the frames option of reward {name!r} names frame {k}, but the videos have {num_frames} frames"
            )
        out.append(k % num_frames)
    return out


def needs_frames_sentence(name: str) -> str:
    """The sentence for an image reward given videos: what to write in the config."""
    return (
        f"reward {name!r} scores images and the policy makes videos: set its frames option, e.g. "
        f"reward.options.{name}.frames=first,middle,last (or all, or frame indices such as [0, -1]), to score "
        "those frames of each video and average them"
    )


class FrameReward(Reward):
    """An image reward on frames ``frames`` of each video; every field is the mean over those frames.

    The frames of a batch go to the inner reward as one batch of ``B x K`` images (video ``b``'s
    frames together, each with the video's prompt and metadata). A frame the inner reward could not
    score (NaN) leaves its video unscored, and a remote reward's ``unscored`` flag is 1 for a video
    when it is 1 for any of its frames.
    """

    accepts_video = True

    def __init__(self, inner: Reward, frames: Any) -> None:
        self.inner = inner
        self.frames = parse_frames(frames, inner.name)

    @property  # the inner reward's name: it keys the fields the inner reward returns
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @name.setter
    def name(self, value: str) -> None:
        self.inner.name = value

    @property
    def may_fail(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "may_fail", False))

    def _flatten(
        self, videos: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> tuple[torch.Tensor, list[str], list[Mapping[str, Any]], int]:
        if videos.ndim != 5:
            raise UserError(
                f"reward {self.name!r} has a frames option, which picks frames of videos (B, F, C, H, W), but it "
                f"was given images shaped {tuple(videos.shape)}: remove the option for an image model"
            )
        idx = resolve_frames(self.frames, videos.shape[1], self.name)
        k = len(idx)
        flat = videos[:, idx].reshape(videos.shape[0] * k, *videos.shape[2:])
        return flat, [p for p in prompts for _ in range(k)], [m for m in metadata for _ in range(k)], k

    @staticmethod
    def _mean(out: Any, name: str, batch: int, k: int) -> dict[str, torch.Tensor]:
        if not isinstance(out, Mapping):
            out = {name: out}
        result = {}
        for field, value in out.items():
            t = torch.as_tensor(value)
            if t.numel() != batch * k:
                raise UserError(f"reward {name!r} returned {t.numel()} scores for {batch * k} frames")
            per_frame = t.reshape(batch, k).float()
            # a video is unscored when any of its frames is; every other field is the frames' mean
            result[field] = per_frame.amax(dim=1) if field == UNSCORED else per_frame.mean(dim=1)
        return result

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        flat, p, m, k = self._flatten(images, prompts, metadata)
        return self._mean(self.inner(flat, p, m), self.name, images.shape[0], k)

    def max_score(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        return self.inner.max_score(prompts, metadata)  # the mean of frames is at most the best frame


class _PendingMean:
    def __init__(self, pending: Any, name: str, batch: int, k: int) -> None:
        self._pending, self._name, self._batch, self._k = pending, name, batch, k

    def done(self) -> bool:
        return self._pending.done() if callable(getattr(self._pending, "done", None)) else True

    def result(self) -> dict[str, torch.Tensor]:
        return FrameReward._mean(self._pending.result(), self._name, self._batch, self._k)


class _SubmittingFrameReward(FrameReward):
    """A :class:`FrameReward` around a reward that scores in the background (``remote``): it keeps ``submit``."""

    def submit(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> Any:
        flat, p, m, k = self._flatten(images, prompts, metadata)
        return _PendingMean(self.inner.submit(flat, p, m), self.name, images.shape[0], k)


def frame_reward(inner: Reward, frames: Any) -> FrameReward:
    """``inner`` (an image reward) scoring frames ``frames`` of each video (see :class:`FrameReward`)."""
    cls = _SubmittingFrameReward if callable(getattr(inner, "submit", None)) else FrameReward
    return cls(inner, frames)


# ----------------------------------------------------------------------------- temporal consistency


@register_reward("temporal_consistency")
class TemporalConsistency(ModelReward):
    """Mean cosine of consecutive frames' CLIP image embeddings, ``(1 / (F-1)) sum_f cos(e_f, e_{f+1})``.

    Frames are preprocessed as CLIPScore's images (the model directory's ``preprocessor_config.json``)
    and embedded ``batch_size`` at a time. Extra field ``min``: the lowest consecutive cosine, which
    a single cut or flicker pulls down where the mean hardly moves. The prompt is not used.
    """

    accepts_video = True

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        self.source, self.revision = model, revision
        super().__init__(device, dtype, batch_size)

    def _load(self) -> Any:
        path = Path(self.source).expanduser()
        if not path.is_dir():
            path = resolve_dir(self.source, self.revision, "temporal_consistency processor", _TOKENIZER_FILES)
        clip = _load_clip_model(self.source, self.revision, "temporal_consistency model", self.device, self.dtype)
        return clip, load_clip_preprocess(path)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        name = self.name or "temporal_consistency"
        if images.ndim != 5 or images.shape[2] not in (1, 3) or images.shape[1] < 2:
            raise UserError(
                f"reward {name!r} needs videos of at least two frames shaped (B, F, 1 or 3, H, W), "
                f"got {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise UserError(f"reward {name!r} got {images.shape[0]} videos and {len(prompts)} prompts")
        clip, prep = self.model
        b, f = images.shape[:2]
        flat = images.reshape(b * f, *images.shape[2:])
        embeds = []
        for lo in range(0, flat.shape[0], self.batch_size):
            embeds.append(_unit(_image_embeds(clip, prep(flat[lo : lo + self.batch_size].to(self.device)))))
        e = torch.cat(embeds).reshape(b, f, -1)
        cos = (e[:, 1:] * e[:, :-1]).sum(dim=-1)  # (B, F - 1)
        return {name: cos.mean(dim=1).to(images.device), "min": cos.min(dim=1).values.to(images.device)}
