"""Instruction editing: a prompt paired with its source image, and what the editing adapters share.

An editing prompt is an :class:`EditPrompt`: the instruction text itself (a ``str``, so that the
trainer, the logs and the sample grids handle it as any prompt) carrying the path of its source
image and where it was read from (``file.jsonl:LINE``, for messages). It compares and hashes as its
instruction text; the editing adapters key their encodings by :func:`edit_key` (instruction and
image), so one instruction given with two images stays two prompts.

:func:`source_metadata` is what the rewards receive for each image: the source image's pixels
(``source_image``, a ``(3, H, W)`` float tensor in [0, 1], as the file holds them) and its path
(``source_image_path``), so that a reward can score an edit against its source.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

__all__ = [
    "EditPrompt",
    "edit_key",
    "source_image",
    "source_pixels",
    "source_metadata",
    "with_source_metadata",
    "check_image_file",
    "padded_rows",
    "by_source_grid",
]


class EditPrompt(str):
    """An editing instruction (the string itself) with the path of its source image."""

    image: Path
    #: where the prompt was read (``file.jsonl:LINE``), for messages
    origin: str
    #: the prompt file's other keys of this line, handed to the rewards in the metadata
    extra: dict[str, Any]

    def __new__(
        cls, text: str, image: str | Path, origin: str | None = None, extra: dict[str, Any] | None = None
    ) -> EditPrompt:
        obj = super().__new__(cls, text)
        obj.image = Path(image)
        obj.origin = origin or str(image)
        obj.extra = dict(extra or {})
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (EditPrompt, (str(self), str(self.image), self.origin, self.extra))

    def __repr__(self) -> str:
        return f"EditPrompt({str(self)!r}, image={str(self.image)!r})"


def edit_key(prompt: str) -> tuple[str, str]:
    """What identifies a prompt's conditioning: its text and its source image (``""`` for none)."""
    image = getattr(prompt, "image", None)
    return (str(prompt), "" if image is None else str(image))


def check_image_file(path: Path, where: str) -> None:
    """UserError (naming ``where``) unless ``path`` is an image file that reads as 8-bit RGB (see ``read_rgb8``)."""
    from ..images import read_rgb8

    read_rgb8(path, f"{where}: source image {str(path)!r}")


@functools.lru_cache(maxsize=256)
def _load_rgb(path: str, where: str) -> Any:
    from ..images import read_rgb8

    return read_rgb8(path, f"{where}: source image {path!r}")


def source_image(prompt: str) -> Any:
    """The source image of an editing prompt as an RGB ``PIL.Image`` (each file read once)."""
    image = getattr(prompt, "image", None)
    if image is None:
        raise UserError(f"prompt {str(prompt)!r} has no source image")
    return _load_rgb(str(image), getattr(prompt, "origin", str(image)))


def source_pixels(prompt: str) -> torch.Tensor:
    """The source image of an editing prompt as a ``(3, H, W)`` float32 tensor in [0, 1]."""
    import numpy as np

    arr = np.asarray(source_image(prompt), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def source_metadata(prompts: Sequence[str]) -> list[dict[str, Any]]:
    """Per prompt: an editing prompt's ``source_image`` (pixels), ``source_image_path`` and the prompt file's
    other keys of its line; nothing for a plain prompt."""
    return [
        {**p.extra, "source_image": source_pixels(p), "source_image_path": str(p.image)}
        if isinstance(p, EditPrompt)
        else {}
        for p in prompts
    ]


def with_source_metadata(metadata: Callable[[list[str]], list[dict]]) -> Callable[[list[str]], list[dict]]:
    """A task's metadata function with each editing prompt's source image added (its own keys win)."""
    if getattr(metadata, "adds_source_images", False):
        return metadata

    def merged(prompts: list[str]) -> list[dict]:
        own = metadata(prompts)
        return [{**src, **dict(m)} for src, m in zip(source_metadata(prompts), own, strict=True)]

    merged.adds_source_images = True  # type: ignore[attr-defined]
    return merged


def padded_rows(
    rows: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(L_i, D)`` (texts, source tokens of different lengths) zero-padded to the longest, as ``(B, L, D)``
    in ``dtype`` on ``device``, and the ``(B, L)`` mask of their real entries."""
    longest = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), longest, rows[0].shape[1], device=device, dtype=dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r.to(device=device, dtype=dtype)
        mask[i, : r.shape[0]] = 1
    return out, mask


def by_source_grid(grids: torch.Tensor, run: Callable[[list[int], torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run(grid, rows)`` once per distinct source token grid ``[h, w]`` of ``grids`` ``(B, 2)``, ``rows`` the
    indices of the rows with that grid, and the outputs put back in row order.

    The editing adapters append a source image's tokens to the noisy ones: rows whose sources give grids of
    another size make sequences of another length, so they go through the transformer in separate calls.
    """
    outs, order = [], []
    for grid in torch.unique(grids, dim=0).tolist():
        rows = (grids == grids.new_tensor(grid)).all(dim=1).nonzero().flatten()
        outs.append(run(grid, rows))
        order.append(rows)
    return outs[0] if len(outs) == 1 else torch.cat(outs).index_select(0, torch.cat(order).argsort())
