"""Which config a run uses: a YAML file (or the built-in default, or a resumed run's own) plus overrides.

Reads no torch: config errors answer before any heavy import.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ExperimentConfig, apply_overrides, config_from_dict, load_config
from ..errors import UserError

__all__ = ["split_config_and_overrides", "resolve_config"]


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item without '=' is the config file; the rest are overrides."""
    config = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UserError(f"unexpected argument {item!r}: give one config file, then key.path=value overrides")
    return config, overrides


def resolve_config(items: list[str], resume: Path | None) -> ExperimentConfig:
    """The experiment config from a file (or the default, or the resumed run's own) plus overrides."""
    config_path, overrides = split_config_and_overrides(items)
    if config_path is None and resume is not None:
        from .checkpoint import CheckpointError, latest_checkpoint, older_checkpoint_hint, verify_checkpoint

        ckpt = latest_checkpoint(resume)
        try:
            verify_checkpoint(ckpt, only=["state.json"])  # the trainer checks every file before loading
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}{older_checkpoint_hint(ckpt)}") from None
        try:
            saved = json.loads((ckpt / "state.json").read_text())["config"]
            if not isinstance(saved, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r} holds no readable config in state.json{older_checkpoint_hint(ckpt)}"
            ) from None
        return config_from_dict(apply_overrides(saved, overrides))
    return load_config(config_path, overrides)
