"""The data of the ``digits`` task: scikit-learn's 1797 8x8 handwritten digits, with style labels.

Pixels are 0..16 in the source; images here are floats in [0, 1] (``pixels / 16``) and the
flow model's latents are the same pixels scaled to [-1, 1]. The style of an image is the
tercile of its ink (mean intensity) within its digit class: the lightest third is ``thin``,
the darkest third ``bold``, the rest ``plain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "DIGIT_WORDS",
    "STYLES",
    "DigitData",
    "load_digit_data",
    "style_labels",
    "split_indices",
    "ink",
    "ink_statistics",
    "images_to_latents",
    "latents_to_images",
]

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: style index -> name; the conditioning tensor stores the index
STYLES: tuple[str, ...] = ("plain", "bold", "thin")


@dataclass(frozen=True)
class DigitData:
    """All 1797 images ``(N, 1, 8, 8)`` in [0, 1] with digit labels, style labels and ink."""

    images: np.ndarray
    digits: np.ndarray
    styles: np.ndarray
    ink: np.ndarray

    def __len__(self) -> int:
        return int(self.digits.shape[0])


def style_labels(ink_values: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Ink terciles within each digit class: 2 (thin) for the lowest third, 1 (bold) for the highest, else 0."""
    labels = np.zeros_like(digits)
    for d in np.unique(digits):
        idx = np.flatnonzero(digits == d)
        # a stable sort breaks ties by dataset order, so the labels do not depend on the platform
        order = idx[np.argsort(ink_values[idx], kind="stable")]
        n = len(order)
        lo, hi = n // 3, n - n // 3
        labels[order[:lo]] = STYLES.index("thin")
        labels[order[hi:]] = STYLES.index("bold")
    return labels


@lru_cache(maxsize=1)
def load_digit_data() -> DigitData:
    """Load scikit-learn's digits (shipped with scikit-learn: nothing is downloaded)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images.astype(np.float32) / 16.0)[:, None]
    digits = raw.target.astype(np.int64)
    ink_values = images.reshape(len(images), -1).mean(axis=1)
    for arr in (images, digits, ink_values):
        arr.setflags(write=False)
    styles = style_labels(ink_values, digits)
    styles.setflags(write=False)
    return DigitData(images=images, digits=digits, styles=styles, ink=ink_values)


def split_indices(digits: np.ndarray, seed: int, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A split stratified by digit: ``(train, test)`` sorted index arrays, a pure function of ``seed``."""
    # the legacy RandomState stream is frozen by numpy's compatibility policy: same split everywhere
    rng = np.random.RandomState(seed)
    test = []
    for d in np.unique(digits):
        idx = np.flatnonzero(digits == d)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[: int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(digits)), test_idx)
    return train_idx, test_idx


def ink(images: torch.Tensor) -> torch.Tensor:
    """Ink of each image ``(B, C, H, W)`` in [0, 1]: its mean intensity, ``(B,)`` float32."""
    return images.float().flatten(1).mean(dim=1)


@lru_cache(maxsize=1)
def ink_statistics() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-digit mean and standard deviation of ink over the whole data set."""
    data = load_digit_data()
    means = tuple(float(data.ink[data.digits == d].mean()) for d in range(10))
    stds = tuple(float(data.ink[data.digits == d].std()) for d in range(10))
    return means, stds


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to latents in [-1, 1] (latents are pixels)."""
    return images * 2.0 - 1.0


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1], clipped: a sample may overshoot the data range slightly."""
    return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)
