"""Where reward-model weights come from: a local directory or file, or a hub id at a revision.

A hub id is fetched with ``huggingface_hub`` (its cache, ``HF_HOME`` and ``HF_HUB_OFFLINE`` apply).
Give ``revision`` a commit hash to pin the weights; without one the hub's ``main`` is used and the
commit it resolved to is reported once, so that the run can be pinned afterwards.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

__all__ = ["resolve_dir", "resolve_file", "parse_dtype", "check_batch_size", "LazyModel"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_warned: set[str] = set()


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.startswith((".", "~")) and ".." not in source


def _note_revision(what: str, source: str, revision: str | None, path: Path) -> None:
    if revision is not None and _COMMIT.match(revision):
        return
    commit = path.name if _COMMIT.match(path.name) else "unknown"
    key = f"{source}@{revision}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{what}: {source!r} is not pinned (revision {revision or 'main'!r} resolved to commit {commit}); "
            "set its revision option to a commit hash to pin it",
            stacklevel=3,
        )


def resolve_dir(
    source: str | Path, revision: str | None, what: str, allow_patterns: Sequence[str] | None = None
) -> Path:
    """A local directory, or a hub snapshot of ``source`` at ``revision`` (only ``allow_patterns`` files)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or not _is_hub_id(text):
        raise UserError(f"{what}: {text!r} is neither a directory nor a hub id like 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(text, revision=revision, allow_patterns=list(allow_patterns or []) or None))
    except Exception as exc:  # noqa: BLE001 - any fetch failure ends in one sentence
        raise UserError(
            f"{what}: cannot fetch {text!r} at revision {revision or 'main'!r} from the hub ({type(exc).__name__}: "
            f"{exc}); give a local directory, or check the id, the revision and the network"
        ) from None
    _note_revision(what, text, revision, local)
    return local


def resolve_file(source: str | Path, filename: str, revision: str | None, what: str) -> Path:
    """A local file, ``filename`` in a local directory, or ``filename`` of hub repo ``source`` at ``revision``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise UserError(f"{what}: directory {str(path)!r} has no file {filename!r}")
        return path / filename
    text = str(source)
    if not _is_hub_id(text):
        raise UserError(f"{what}: {text!r} is neither a file, a directory nor a hub id like 'org/name'")
    try:
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(text, filename, revision=revision))
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"{what}: cannot fetch {filename!r} of {text!r} at revision {revision or 'main'!r} from the hub "
            f"({type(exc).__name__}: {exc}); give a local file, or check the id, the revision and the network"
        ) from None
    _note_revision(what, text, revision, local.parent)
    return local


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
_DTYPES.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"float16"`` or ``"bfloat16"`` (or the torch dtype) to a torch dtype; UserError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UserError(f"dtype must be one of 'float32', 'float16', 'bfloat16', got {dtype!r}")


def check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


class LazyModel:
    """Builds a value on first use, once, even from several threads (a reward server's)."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self._value: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> Any:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
        return self._value
