"""Rewriting a checkpoint never loses it, and leftovers of a killed writer are resolved, not just deleted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from precise_rl.rl import checkpoint as ck


def _write(root: Path, epoch: int, value: float) -> Path:
    tensors = {"trainable": {"w": torch.full((3,), value)}}
    return ck.write_checkpoint(root, epoch, tensors, {"epoch": epoch, "value": value})


def _value(path: Path) -> float:
    tensors, _, state = ck.read_checkpoint(path)
    assert float(tensors["trainable"]["w"][0]) == state["value"]
    return state["value"]


def test_rewrite_replaces_the_checkpoint_and_leaves_nothing_behind(tmp_path: Path) -> None:
    _write(tmp_path, 3, 1.0)
    _write(tmp_path, 3, 2.0)
    assert _value(tmp_path / "epoch_000003") == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000003"]


def test_failed_rename_of_a_rewrite_puts_the_old_checkpoint_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, 3, 1.0)
    real = os.replace
    calls: list[str] = []

    def flaky(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        calls.append(Path(src).name)
        if Path(src).name.startswith(".tmp-"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(ck.os, "replace", flaky)
    with pytest.raises(ck.CheckpointError, match="No space left on device"):
        _write(tmp_path, 3, 2.0)
    monkeypatch.undo()
    assert calls[0] == "epoch_000003"  # the old copy was moved aside before the new one's rename failed
    assert _value(tmp_path / "epoch_000003") == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000003"]


def _killed_between_renames(root: Path) -> None:
    """The state a kill leaves between 'old copy aside' and 'new copy in place' of a rewrite of epoch 3."""
    _write(root, 3, 1.0)
    new = _write(root / "staging", 3, 2.0)
    os.replace(root / "epoch_000003", root / ".trash-epoch_000003-0000aaaa")
    os.replace(new, root / ".tmp-epoch_000003-zz")
    shutil.rmtree(root / "staging")


def test_kill_between_the_renames_keeps_the_new_copy(tmp_path: Path) -> None:
    _killed_between_renames(tmp_path)
    assert ck.list_checkpoints(tmp_path) == []
    ck.remove_leftovers(tmp_path)
    assert _value(tmp_path / "epoch_000003") == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000003"]


def test_kill_between_the_renames_with_the_new_copy_damaged_keeps_the_old_one(tmp_path: Path) -> None:
    _killed_between_renames(tmp_path)
    weights = tmp_path / ".tmp-epoch_000003-zz" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5])
    ck.remove_leftovers(tmp_path)
    assert _value(tmp_path / "epoch_000003") == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000003"]


def test_half_written_and_half_deleted_directories_are_removed(tmp_path: Path) -> None:
    _write(tmp_path, 2, 5.0)
    _write(tmp_path, 4, 6.0)
    half = tmp_path / ".tmp-epoch_000006-ab"  # killed before its manifest was written
    half.mkdir()
    (half / "state.json").write_text("{}")
    pruned = tmp_path / ".trash-epoch_000001-cd"  # killed while deleting: the manifest already gone
    shutil.copytree(tmp_path / "epoch_000002", pruned)
    (pruned / ck.MANIFEST).unlink()
    stale_rewrite = tmp_path / ".trash-epoch_000004-ef"  # the old copy of a finished rewrite
    shutil.copytree(tmp_path / "epoch_000004", stale_rewrite)
    mislabelled = tmp_path / ".tmp-epoch_000008-gh"  # a complete copy whose manifest names another epoch
    shutil.copytree(tmp_path / "epoch_000002", mislabelled)
    ck.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000002", "epoch_000004"]
    assert _value(tmp_path / "epoch_000004") == 6.0
