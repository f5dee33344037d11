"""What a checkpoint holds and how it is restored.

A checkpoint (written atomically by :mod:`.checkpoint`) holds the whole trainable weights, the
EMA shadow, the optimizer state and ``state.json`` (epoch, step counts, timings, the first
evaluation, the config, the parameter names), plus the LoRA adapter in diffusers' layout. FSDP
shards (DTensors) are gathered whole before writing and sharded again when loading, so a
checkpoint of an FSDP run resumes with or without FSDP. Every process calls save and load (they
are collectives); only the main process writes. Before writing, the processes compare
fingerprints of their weights: copies that differ stop the run instead of being saved. On resume
the main process names the checkpoint, every process loads it and they compare the SHA-256 of
its manifest, so that a process reading other files (storage not shared) stops the run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import config_from_dict, config_to_dict
from ..errors import UserError
from ..policies.lora import save_adapter
from . import dist
from .checkpoint import (
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    older_checkpoint_hint,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from .evaluate import eval_weights

if TYPE_CHECKING:
    from .trainer import GRPOTrainer

__all__ = ["is_sharded", "load_checkpoint", "load_evaluated_weights", "resume", "save_checkpoint", "trainable_state"]


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter or EMA shadow, gathering FSDP shards (a collective then)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``like``: sharded as ``like`` is when it is an FSDP DTensor, else on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(like.device_mesh.device_type), like.device_mesh, like.placements)
    return whole.to(like.device)


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether the trainable parameters are FSDP shards (DTensors)."""
    return any(_is_dtensor(p) for p in params)


def trainable_state(names: Sequence[str], params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole trainable weights by name (a collective when FSDP shards them: every process calls it)."""
    return {n: _whole(p) for n, p in zip(names, params, strict=True)}


def _optimizer_state(trainer: GRPOTrainer) -> dict[str, Any]:
    """The optimizer state to save (whole, on the main process; a collective when sharded)."""
    if not trainer._sharded:
        return trainer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    module = trainer.accelerator.unwrap_model(trainer.model)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(module, trainer.optimizer.optimizer, options=opts)


def _load_optimizer_state(trainer: GRPOTrainer, saved: dict[str, Any]) -> None:
    if not trainer._sharded:
        trainer.optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    module = trainer.accelerator.unwrap_model(trainer.model)
    opts = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(module, trainer.optimizer.optimizer, optim_state_dict=saved, options=opts)


def save_checkpoint(trainer: GRPOTrainer) -> Path:
    """Write the checkpoint of the completed epochs and prune old ones; returns its path (on every process).

    A write that fails (unwritable directory, full disk) raises the same one-sentence error on
    every process and leaves no half-written checkpoint behind.
    """
    tr = trainer
    tensors = {"trainable": tr._trainable_state()}
    if tr.ema is not None:
        tensors["ema"] = {n: _whole(s) for n, s in tr.ema.state_tensors(tr.param_names).items()}
    optimizer_state = _optimizer_state(tr)
    error, path = None, None
    if tr.world > 1:
        # Data-parallel copies must stay identical; a checkpoint of one copy would hide a divergence.
        prints = torch.stack(
            [v.double().sum() for v in tensors["trainable"].values()]
            + [v.double().square().sum() for v in tensors["trainable"].values()]
        )
        seen = tr.accelerator.gather(prints.to(tr.accelerator.device)[None])
        if not bool((seen == seen[:1]).all()):
            error = f"the processes hold different weights after epoch {tr.epoch}; no checkpoint was written"
            dist.agree(error, tr.world)
    if tr.is_main:
        state = {
            "epoch": tr.epoch,
            "global_step": tr.global_step,
            "ema_steps": tr.ema.num_steps if tr.ema is not None else 0,
            "elapsed_s": tr.elapsed,
            "train_elapsed_s": tr.train_elapsed,
            "first_eval": tr.first_eval,
            "config": config_to_dict(tr.cfg),
            "param_names": tr.param_names,
            "lora": tr.cfg.train.lora.enabled,
        }

        def write_adapter(directory: Path) -> None:
            if tr.cfg.train.lora.enabled and not tr._sharded:
                with eval_weights(tr.ema):
                    save_adapter(tr.accelerator.unwrap_model(tr.model), directory / "adapter")

        root = tr.out / "checkpoints"
        try:
            path = write_checkpoint(
                root, tr.epoch, tensors, state, objects={"optimizer": optimizer_state}, extra=write_adapter
            )
            prune_checkpoints(root, tr.cfg.checkpoint.keep)
        except UserError as exc:
            error = str(exc)
    dist.agree(error, tr.world)
    return path if path is not None else tr.out / "checkpoints" / f"epoch_{tr.epoch:06d}"


def resume(trainer: GRPOTrainer, where: str | Path) -> None:
    """Load the checkpoint the main process names (newest under ``where``) on every process."""
    world = trainer.world
    error, ckpt = None, None
    if trainer.is_main:
        try:
            ckpt = str(latest_checkpoint(where))
        except UserError as exc:
            error = str(exc)
    dist.agree(error, world)
    if world > 1:
        from accelerate.utils import broadcast_object_list

        ckpt = broadcast_object_list([ckpt])[0]
    error, digest = None, None
    try:
        digest = load_checkpoint(trainer, Path(ckpt))
    except UserError as exc:
        error = str(exc)
    dist.agree(error, world)
    if world > 1 and len(set(dist.gather_objects(digest, world))) > 1:
        raise UserError(
            f"the processes found different files in checkpoint {ckpt!r}: put the run directory on "
            "storage that every machine shares"
        )


def load_checkpoint(trainer: GRPOTrainer, ckpt: Path) -> str:
    """Verify and load ``ckpt`` into this process; returns the SHA-256 of its manifest."""
    tr = trainer
    try:
        tensors, objects, state = read_checkpoint(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{older_checkpoint_hint(ckpt)}") from None
    try:
        saved_cfg = config_from_dict(state["config"])
        names, epoch, step_count = state["param_names"], int(state["epoch"]), int(state["global_step"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has a state.json without this version's fields") from None
    if saved_cfg.sampler != tr.cfg.sampler or saved_cfg.model != tr.cfg.model:
        raise UserError(f"checkpoint {str(ckpt)!r} was made with another model or sampler than this config")
    weights = tensors.get("trainable", {})
    if names != tr.param_names or any(
        n not in weights or tuple(weights[n].shape) != tuple(p.shape)
        for n, p in zip(tr.param_names, tr.params, strict=True)
    ):
        raise UserError(f"checkpoint {str(ckpt)!r} does not hold this model's trainable parameters")
    with torch.no_grad():
        for n, p in zip(tr.param_names, tr.params, strict=True):
            p.copy_(_shard_like(weights[n], p))
    if tr.ema is not None:
        if "ema" not in tensors:
            raise UserError(f"checkpoint {str(ckpt)!r} has no EMA weights but train.ema.enabled is true")
        try:
            tr.ema.load_state_tensors(tr.param_names, tensors["ema"], state.get("ema_steps", 0))
        except KeyError:
            raise UserError(f"checkpoint {str(ckpt)!r} has EMA weights of another model") from None
        tr.ema.shadow = [_shard_like(s, p) for s, p in zip(tr.ema.shadow, tr.params, strict=True)]
    try:
        _load_optimizer_state(tr, objects["optimizer"])
    except (KeyError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {str(ckpt)!r} has an optimizer state that does not fit: {reason}") from None
    tr.epoch = epoch
    tr.global_step = step_count
    tr.elapsed = float(state.get("elapsed_s", 0.0))
    tr.train_elapsed = float(state.get("train_elapsed_s", 0.0))
    tr.first_eval = state.get("first_eval")
    tr.resumed_from = ckpt
    return hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()


def load_evaluated_weights(
    ckpt: Path, names: Sequence[str], params: Sequence[torch.Tensor], use_ema: bool
) -> dict[str, Any]:
    """Copy into ``params`` the weights the run's evaluations used: the EMA shadow when it kept one.

    For ``precise-rl eval``, which needs the weights and nothing else of the training state
    (no optimizer, no logs). Returns the checkpoint's ``state.json``.
    """
    try:
        tensors, _, saved = read_checkpoint(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{older_checkpoint_hint(ckpt)}") from None
    if saved.get("param_names") != list(names):
        raise UserError(f"checkpoint {str(ckpt)!r} does not hold this model's trainable parameters")
    if use_ema and "ema" not in tensors:
        raise UserError(f"checkpoint {str(ckpt)!r} has no EMA weights but train.ema.enabled is true")
    source = tensors["ema"] if use_ema else tensors.get("trainable", {})
    if any(n not in source or tuple(source[n].shape) != tuple(p.shape) for n, p in zip(names, params, strict=True)):
        raise UserError(f"checkpoint {str(ckpt)!r} does not hold this model's trainable parameters")
    with torch.no_grad():
        for n, p in zip(names, params, strict=True):
            p.copy_(source[n].to(p.dtype))
    return saved
