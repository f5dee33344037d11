"""Offline rewards of the built-in ``digits`` task (images ``(B, 1, 8, 8)`` in [0, 1]).

Each reads the asked-for digit and style from the metadata (``{"digit": int, "style": str}``,
see :func:`~.prompts.prompt_metadata`), or parses the prompt where they are missing. They register
by name (``digit_alignment``, ``ink_style``, ``digit_recognised``) when the task is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...rewards.base import Reward, register_reward
from .data import STYLES, ink, ink_statistics
from .models import load_module
from .policy import resolve_weights
from .pretrain import EVAL_CLASSIFIER_FILE, REWARD_CLASSIFIER_FILE
from .prompts import parse_prompt

__all__ = ["DigitAlignment", "InkStyle", "DigitRecognised", "load_classifier", "prompt_targets"]

_CLASSIFIER_FILES = {"reward": REWARD_CLASSIFIER_FILE, "eval": EVAL_CLASSIFIER_FILE}


def load_classifier(which: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The shipped ``"reward"`` or held-out ``"eval"`` classifier, or the one in ``path``: images -> logits."""
    if which not in _CLASSIFIER_FILES:
        raise ValueError(f"which must be 'reward' or 'eval', got {which!r}")
    net = load_module(resolve_weights(path, _CLASSIFIER_FILES[which]), "digits_classifier", device)
    net.requires_grad_(False)
    return net


def prompt_targets(prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[str]]:
    """The asked-for digits and styles, from the metadata or else from the prompts."""
    digits, styles = [], []
    for prompt, meta in zip(prompts, metadata, strict=True):
        if "digit" in meta and "style" in meta:
            d, s = int(meta["digit"]), str(meta["style"])
        else:
            d, s = parse_prompt(prompt)
        if not 0 <= d <= 9 or s not in STYLES:
            raise UserError(f"metadata {dict(meta)!r} must hold a digit 0-9 and a style in {STYLES}")
        digits.append(d)
        styles.append(s)
    return digits, styles


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise UserError(f"the digits rewards need images shaped (B, 1, 8, 8), got {tuple(images.shape)}")


class _ClassifierReward(Reward):
    which = "reward"

    def __init__(self, classifier_path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.classifier = load_classifier(self.which, classifier_path, device)
        self.device = torch.device(device)

    @torch.no_grad()
    def _log_probs(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]):
        _check_images(images)
        digits, _ = prompt_targets(prompts, metadata)
        logits = self.classifier(images.to(self.device, torch.float32))
        target = torch.tensor(digits, device=self.device)
        return torch.log_softmax(logits.float(), dim=1), target


@register_reward("digit_alignment")
class DigitAlignment(_ClassifierReward):
    """``log p(prompt's digit | image)`` under the shipped reward classifier (an MLP): <= 0, 0 = certain."""

    which = "reward"

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        log_probs, target = self._log_probs(images, prompts, metadata)
        return {"digit_alignment": log_probs.gather(1, target[:, None])[:, 0].to(images.device)}

    def max_score(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return torch.zeros(len(prompts))  # a log-probability: 0 for a certain classifier


@register_reward("digit_recognised")
class DigitRecognised(_ClassifierReward):
    """For evaluation only: 1 where the held-out classifier (a conv net, never trained on) reads the digit, else 0."""

    which = "eval"

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        log_probs, target = self._log_probs(images, prompts, metadata)
        return {"digit_recognised": (log_probs.argmax(dim=1) == target).float().to(images.device)}


@register_reward("ink_style")
class InkStyle(Reward):
    """How well the stroke weight matches the asked-for style, in units of the digit's ink spread.

    With ``ink`` the image's mean intensity and ``z = (ink - mean_d) / std_d`` (per-digit mean
    and std of ink over the data set, ``d`` the asked-for digit), the reward is ``z`` for
    ``bold`` (more ink is better), ``-z`` for ``thin`` (less ink is better) and ``-|z|`` for
    ``plain`` (best at the digit's typical ink). ``bold`` and ``thin`` saturate at ``cap``
    (default 2: about the boldest or thinnest 2.5% of the data set's own strokes), so the reward
    asks for a stroke a real hand would make instead of a blot of ink; ``cap=None`` removes the
    limit. Being in the same units for every digit and style, it is comparable across a batch.
    The raw ink is logged as the field ``ink``.
    """

    def __init__(self, cap: float | None = 2.0) -> None:
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise UserError(f"ink_style cap must be a positive number or null, got {cap!r}")
        self.cap = None if cap is None else float(cap)
        means, stds = ink_statistics()
        self.mean = torch.tensor(means, dtype=torch.float32)
        self.std = torch.tensor(stds, dtype=torch.float32)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        _check_images(images)
        digits, styles = prompt_targets(prompts, metadata)
        amount = ink(images)
        d = torch.tensor(digits, device=images.device)
        z = (amount - self.mean.to(images.device)[d]) / self.std.to(images.device)[d]
        sign = torch.tensor([{"bold": 1.0, "thin": -1.0, "plain": 0.0}[s] for s in styles], device=images.device)
        directed = sign * z if self.cap is None else (sign * z).clamp_max(self.cap)
        score = torch.where(sign == 0, -z.abs(), directed)
        return {"ink_style": score, "ink": amount}

    def max_score(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        """``cap`` for bold and thin, 0 for plain (the digit's typical ink); unbounded without a cap."""
        if self.cap is None:
            return None
        _, styles = prompt_targets(prompts, metadata)
        return torch.tensor([0.0 if s == "plain" else self.cap for s in styles])
