"""Which config a run uses: a YAML file (or the built-in default, or a resumed run's own) plus overrides.

Reads no torch: config errors answer before any heavy import.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    load_yaml,
    yaml_error_sentence,
)
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


def resolve_config(items: list[str], resume: Path | None, honour_edits: bool = False) -> ExperimentConfig:
    """The experiment config from a file (or the default, or the resumed run's own) plus overrides.

    With ``honour_edits`` (``train --resume``) the resumed run's own config is its checkpoint's with the
    edits made to its ``config.yaml`` since (see :func:`_with_edits`).
    """
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
        base = _with_edits(saved, ckpt) if honour_edits else saved
        return config_from_dict(apply_overrides(base, overrides))
    return load_config(config_path, overrides)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.01, ...}``: a nested mapping by dotted key (an empty mapping is one value)."""
    if not isinstance(data, dict) or not data:
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _plain(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``data`` as a config reads it back (defaults of keys it lacks filled in), as plain JSON values."""
    try:
        return json.loads(json.dumps(config_to_dict(config_from_dict(copy.deepcopy(data)))))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _with_edits(saved: dict[str, Any], ckpt: Path) -> dict[str, Any]:
    """The config a resume continues with: the checkpoint's, with the edits made to the run's ``config.yaml``.

    The run writes ``config.yaml`` (and rewrites it on every resume); a key the user changed there is
    honoured as if given as an override, and named on standard error. What a checkpoint cannot take
    (another model, sampler or algorithm) is then refused by the trainer in one sentence.
    """
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    path = run_dir / "config.yaml"
    if not path.is_file():
        return saved
    try:
        edited = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(
            f"the run's {str(path)!r} is not valid YAML ({yaml_error_sentence(exc)}); fix it, or delete it to "
            "resume with the checkpoint's config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the run's {str(path)!r}: {exc}") from None
    except UserError as exc:
        raise UserError(f"the run's {str(path)!r}: {exc}") from None
    if edited is None:  # emptied: nothing to honour, the checkpoint's config stands (and is written back)
        return saved
    if not isinstance(edited, dict):
        raise UserError(f"the run's {str(path)!r} must hold a mapping of keys to values; fix it or delete it")
    before = _flat(_plain(saved, f"checkpoint {str(ckpt)!r}"))
    after_plain = _plain(edited, f"the run's {str(path)!r}")
    after = _flat(after_plain)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not changed:
        return saved
    from .rundir import is_main_launch_process

    if is_main_launch_process():
        shown = ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        print(f"warning: resuming with the edits made to {path}: {shown}{more}", file=sys.stderr)
    return after_plain
