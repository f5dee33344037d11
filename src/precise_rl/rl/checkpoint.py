"""Checkpoints written atomically, checked by checksum, loaded without executing code.

Layout of a run directory's ``checkpoints/``::

    epoch_000010/   trainable.safetensors  ema.safetensors  optimizer.pt  rng.safetensors
                    state.json  manifest.json   (and adapter/ with LoRA)

A checkpoint is built in a hidden temporary directory and renamed into place only when
every file is written and synced, so a crash or a full disk never leaves a half-written
checkpoint that resume would pick up; a checkpoint is deleted by renaming it out of the way
first, for the same reason. ``manifest.json`` holds each file's size and SHA-256, checked
before anything is loaded. Loading never runs code from the files: tensors are safetensors,
the optimizer state is read with ``torch.load(weights_only=True)``, the rest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError

__all__ = [
    "CheckpointError",
    "write_checkpoint",
    "read_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "verify_checkpoint",
    "check_writable",
    "older_checkpoint_hint",
    "remove_leftovers",
]

_NAME = re.compile(r"^epoch_(\d{6,})$")
MANIFEST = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read (message names the path)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reason(exc: BaseException) -> str:
    """One line saying why an operation failed."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    for known in ("No space left on device", "Permission denied", "File too large", "Read-only file system"):
        if known.lower() in text.lower():
            return known
    return text.splitlines()[0] if text else type(exc).__name__


_KNOWN = ("No space left on device", "Permission denied", "File too large", "Read-only file system")


def _write_reason(exc: BaseException, root: Path) -> str:
    """Why writing under ``root`` failed, named by its cause even when the library hides it.

    torch.save reports a short write only as its zip writer's "[enforce fail at inline_container.cc]
    unexpected pos A vs B", without the system error behind it: the cause is then looked up
    (a file-size limit of this process, a full file system).
    """
    reason = _reason(exc)
    if (isinstance(exc, OSError) and exc.strerror) or reason in _KNOWN:
        return reason
    short_write = any(k in reason for k in ("unexpected pos", "enforce fail", "write", "I/O", "os error"))
    if not short_write:
        return reason  # not an I/O failure (e.g. an object that cannot be saved): its own words
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"File too large (this process may write files of at most {soft} bytes: see ulimit -f)"
    try:
        st = os.statvfs(root)
        free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError:
        free = size = None
    if free is not None and (free < 2**30 or free < 0.01 * size):
        return f"No space left on device ({free / 2**20:.0f} MB free on its file system)"
    return reason  # no cause found on this side: the library's own words are all there is


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: first renamed out of the listing (atomic), then removed."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; a checkpoint already there is replaced, never lost.

    The old copy is renamed aside first and deleted only once the new one is in place, so a kill
    between the two renames leaves two complete copies, which :func:`remove_leftovers` resolves.
    """
    old = None
    if final.exists():
        old = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(root: str | Path) -> None:
    """Fail early, with a clear message, when checkpoints cannot be written under ``root``."""
    root = Path(root)
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} cannot be made: {str(blocker)!r} is a file")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".tmp-probe-", dir=root))
        (probe / "probe").write_bytes(b"0")
        shutil.rmtree(probe)
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {str(root)!r} is not writable: {_reason(exc)}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(
    root: str | Path,
    epoch: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    objects: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``root/epoch_XXXXXX`` atomically and return its path.

    ``tensors`` maps a file stem to a dict of tensors (saved as safetensors); ``objects`` maps
    a file stem to plain tensor containers saved with ``torch.save`` (e.g. the optimizer state,
    later loaded with ``weights_only=True``); ``state`` is saved as JSON; ``extra(dir)`` may write
    more files before the manifest is made.
    """
    root = Path(root)
    final = root / f"epoch_{epoch:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-epoch_{epoch:06d}-", dir=root))
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # as a plain mkdir would (mkdtemp makes it private)
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint directory {str(root)!r}: {_reason(exc)}") from None
    try:
        for stem, group in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{stem}.safetensors"))
        for stem, obj in (objects or {}).items():
            torch.save(obj, tmp / f"{stem}.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
        if extra is not None:
            extra(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"epoch": epoch, "files": manifest}, indent=1, sort_keys=True))
        for p in [*files, tmp / MANIFEST]:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        _put_in_place(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save and safetensors wrap I/O errors
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {str(final)!r}: {_write_reason(exc, root)} (nothing was left half-written)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Completed checkpoints under ``root``, oldest first (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the newest one in a run or checkpoints directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"resume path {str(p)!r} does not exist")
    if (p / MANIFEST).is_file() or _NAME.match(p.name):
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"no checkpoint found in {str(p)!r} (expected checkpoints/epoch_XXXXXX/manifest.json)")


def older_checkpoint_hint(ckpt: str | Path) -> str:
    """``"; to go on from the one before, resume from '...'"`` when an older checkpoint sits beside ``ckpt``."""
    ckpt = Path(ckpt)
    older = [c for c in list_checkpoints(ckpt.parent) if c.name < ckpt.name]
    return f"; to go on from the one before, resume from {str(older[-1])!r}" if older else ""


def verify_checkpoint(ckpt: str | Path, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Check every file of a checkpoint (or those named in ``only``) against its manifest; return the manifest."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has a missing or unreadable {MANIFEST}") from None
    if not isinstance(files, dict) or "state.json" not in files:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has a {MANIFEST} that lists no state.json")
    for rel, info in files.items():
        if only is not None and rel not in only:
            continue
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not isinstance(info, dict):
            raise CheckpointError(f"checkpoint {str(ckpt)!r} has a {MANIFEST} with a bad entry {rel!r}")
        fp = ckpt / rel
        if not fp.is_file():
            raise CheckpointError(f"checkpoint file {str(fp)!r} is missing")
        if fp.stat().st_size != info.get("bytes") or _sha256(fp) != info.get("sha256"):
            raise CheckpointError(f"checkpoint file {str(fp)!r} is corrupt or truncated (checksum mismatch)")
    return manifest


def read_checkpoint(ckpt: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """Verify and load a checkpoint: ``(tensors by stem, objects by stem, state)``; no code is executed."""
    ckpt = Path(ckpt)
    manifest = verify_checkpoint(ckpt)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    objects: dict[str, Any] = {}
    fp = ckpt / "state.json"
    try:
        for rel in manifest["files"]:
            fp = ckpt / rel
            if "/" in rel:
                continue
            if rel.endswith(".safetensors"):
                tensors[rel[: -len(".safetensors")]] = load_file(str(fp))
            elif rel.endswith(".pt"):
                # weights_only: plain containers of tensors and numbers; a pickled object is refused
                objects[rel[: -len(".pt")]] = torch.load(fp, map_location="cpu", weights_only=True)
        fp = ckpt / "state.json"
        state = json.loads(fp.read_text())
        if not isinstance(state, dict):
            raise ValueError("state.json does not hold a mapping")
    except Exception as exc:  # a file that passed its checksum but does not parse, or holds code
        raise CheckpointError(f"checkpoint file {str(fp)!r} could not be loaded safely: {_reason(exc)}") from None
    return tensors, objects, state


_LEFTOVER = re.compile(r"^\.(?:tmp|trash)-(epoch_\d{6})-")


def remove_leftovers(root: str | Path) -> None:
    """Resolve what a killed writer left under ``root`` (directories never listed as checkpoints).

    A complete copy (its manifest verifies) of a checkpoint that is missing is put back in place,
    the newly written one (``.tmp-``) before the one it was replacing (``.trash-``): a kill between
    the two renames of a rewrite leaves both. Everything else, half-written or half-deleted, is removed.
    """
    root = Path(root)
    for stale in [*sorted(root.glob(".tmp-*")), *sorted(root.glob(".trash-*"))]:
        m = _LEFTOVER.match(stale.name)
        if m is not None and stale.is_dir() and not (root / m.group(1)).exists():
            try:
                if verify_checkpoint(stale).get("epoch") == int(m.group(1)[len("epoch_") :]):
                    os.replace(stale, root / m.group(1))
                    continue
            except (CheckpointError, OSError):
                pass
        shutil.rmtree(stale, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and stale temporary directories)."""
    root = Path(root)
    remove_leftovers(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        _discard(old)
