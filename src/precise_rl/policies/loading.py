"""Loading a diffusers pipeline: local directories and hub ids, pinned revisions, the adapter of a pipeline class.

Nothing is downloaded unless a hub id is given; a hub model loaded without a commit hash is named
with the commit it resolved to, once. Every failure is one sentence (``UserError``).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .registry import PIPELINE_ADAPTERS  # pipeline class -> adapter name, filled by @register_policy

__all__ = ["DTYPES", "PIPELINE_ADAPTERS", "read_model_index", "detect_adapter", "load_pipeline"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_unpinned_noted: set[str] = set()


def _is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or path.startswith((".", "/", "~")) or not _HUB_ID.match(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _note_unpinned(path: str, revision: str | None, snapshot: str) -> None:
    """Warn once per model that a hub model loaded without a commit hash can change under a run."""
    if revision is not None and _COMMIT.match(revision):
        return
    key = f"{path}@{revision}"
    if key in _unpinned_noted:
        return
    _unpinned_noted.add(key)
    commit = snapshot if _COMMIT.match(snapshot) else "unknown"
    warnings.warn(
        f"model {path!r} is not pinned (revision {revision or 'main'!r} resolved to commit {commit}); "
        "set model.revision (or --revision) to a commit hash for a reproducible run",
        stacklevel=3,
    )


def read_model_index(path: str, revision: str | None = None) -> dict[str, Any]:
    """The ``model_index.json`` of a local pipeline directory or a hub repository; UserError if unreadable."""
    if _is_local(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"model path {path!r} does not exist (give a diffusers pipeline directory or a hub id)")
        index = p / "model_index.json"
        if not index.is_file():
            raise UserError(f"{path!r} is not a diffusers pipeline directory: it has no model_index.json")
        text = index.read_text(encoding="utf-8", errors="replace")
        where = str(index)
    else:
        try:
            from huggingface_hub import hf_hub_download

            where = hf_hub_download(path, "model_index.json", revision=revision)
            text = Path(where).read_text(encoding="utf-8")
        except Exception as exc:  # offline, unknown repo, bad revision, gated model...
            rev = f" at revision {revision!r}" if revision else ""
            raise UserError(
                f"could not read model_index.json of hub model {path!r}{rev}: {_first_line(exc)}; "
                "check the id and revision, log in for gated models, or give a local pipeline directory"
            ) from None
        _note_unpinned(path, revision, Path(where).parent.name)
    try:
        data = json.loads(text)
    except ValueError:
        raise UserError(f"{where} is not valid JSON") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise UserError(f"{where} does not name a pipeline class (no '_class_name')")
    return data


def detect_adapter(path: str, revision: str | None = None) -> str:
    """The adapter name for the pipeline at ``path``, from its ``model_index.json``."""
    cls = read_model_index(path, revision)["_class_name"]
    if cls not in PIPELINE_ADAPTERS:
        raise UserError(
            f"pipeline class {cls!r} of model {path!r} is not supported; supported pipeline classes: "
            + ", ".join(f"{c} ({a})" for c, a in PIPELINE_ADAPTERS.items())
        )
    return PIPELINE_ADAPTERS[cls]


def load_pipeline(
    path: str,
    pipeline_class: str,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> Any:
    """Load a diffusers pipeline of class ``pipeline_class`` (hub id or local directory) on ``device``.

    Every component is loaded in ``dtype``; the caller freezes what it does not train.
    """
    import diffusers

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    found = read_model_index(path, revision)["_class_name"]
    if found != pipeline_class:
        hint = f" (use model name {PIPELINE_ADAPTERS[found]!r})" if found in PIPELINE_ADAPTERS else ""
        raise UserError(
            f"model {path!r} is a {found} but this adapter needs a {pipeline_class}{hint}; supported pipeline "
            f"classes: {', '.join(PIPELINE_ADAPTERS)}"
        )
    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        raise UserError(f"the installed diffusers {diffusers.__version__} has no {pipeline_class}; upgrade diffusers")
    # diffusers renamed ``torch_dtype`` to ``dtype`` (the old name still works there, with a warning).
    from diffusers.utils import deprecation_utils

    dtype_key = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    try:
        pipe = cls.from_pretrained(path, revision=revision, **{dtype_key: torch_dtype})
    except Exception as exc:
        raise UserError(f"could not load {pipeline_class} from {path!r}: {_first_line(exc)}") from None
    return pipe.to(device)
