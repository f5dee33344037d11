"""What a checkpoint holds and how it is restored.

A checkpoint (written atomically by :mod:`.checkpoint`) holds the whole trainable weights, the
EMA shadow, the optimizer state and ``state.json`` (epoch, step counts, timings, the first
evaluation, the config, the parameter names), plus the LoRA adapter in diffusers' layout (the
weights evaluated: the EMA's while it is on). FSDP shards (DTensors, :mod:`.sharding`) are gathered
whole before writing and split again when loading, and the optimizer state keeps torch's own layout
(by parameter index) with whole tensors, so a checkpoint is the same whether the run was sharded
or not and resumes on any number of processes, sharded or not. Every process calls save and load
(they are collectives); only the main process writes. Before writing, the processes compare
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

from ..config import config_from_dict, config_to_dict, with_run_defaults
from ..errors import UserError
from ..policies.lora import save_adapter
from . import dist
from .checkpoint import (
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    older_checkpoint_hint,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from .sharding import is_dtensor, shard_like, whole

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["load_checkpoint", "load_evaluated_weights", "resume", "save_checkpoint", "trainable_state"]


def trainable_state(names: Sequence[str], params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole trainable weights by name (a collective when FSDP shards them: every process calls it)."""
    return {n: whole(p) for n, p in zip(names, params, strict=True)}


def _optimizer_state(trainer: Trainer) -> dict[str, Any]:
    """The optimizer state to save, whole (a collective when sharded).

    In torch's own layout (state by parameter index) with whole tensors in place of shards, the layout of
    an unsharded run: a checkpoint loads on any number of processes, sharded or not.
    """
    saved = trainer.optimizer.state_dict()
    if not trainer._sharded:
        return saved
    # state_dict() shares the per-parameter dicts with the optimizer: build new ones.
    saved["state"] = {i: {k: whole(v) if is_dtensor(v) else v for k, v in s.items()} for i, s in saved["state"].items()}
    return saved


def _load_optimizer_state(trainer: Trainer, saved: dict[str, Any]) -> None:
    """Load ``saved`` (whole tensors, see :func:`_optimizer_state`), split as the parameters are when sharded."""
    if trainer._sharded:
        # torch maps the saved indices to the parameters in the order of the param groups
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        if len(ids) != len(params):
            raise ValueError(f"it holds {len(ids)} parameters, the model {len(params)}")
        by_id = dict(zip(ids, params, strict=True))

        def split(i: Any, k: str, v: Any) -> Any:
            p = by_id.get(i)
            if isinstance(v, torch.Tensor) and p is not None and tuple(v.shape) == tuple(p.shape) and v.ndim:
                return shard_like(v, p)
            return v

        saved = {**saved, "state": {i: {k: split(i, k, v) for k, v in s.items()} for i, s in saved["state"].items()}}
    trainer.optimizer.load_state_dict(saved)


def save_checkpoint(trainer: Trainer) -> Path:
    """Write the checkpoint of the completed epochs and prune old ones; returns its path (on every process).

    A write that fails (unwritable directory, full disk) raises the same one-sentence error on
    every process and leaves no half-written checkpoint behind.
    """
    tr = trainer
    tensors = {"trainable": tr._trainable_state()}
    if tr.ema is not None:
        tensors["ema"] = {n: whole(s) for n, s in tr.ema.state_tensors(tr.param_names).items()}
    own = tr.algorithm.state_tensors()  # e.g. an old policy's weights
    if own:
        tensors["algorithm"] = {n: whole(v) for n, v in own.items()}
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
            **tr.state.saved(),
            "ema_steps": tr.ema.num_steps if tr.ema is not None else 0,
            "config": config_to_dict(tr.cfg),
            "param_names": tr.param_names,
            "lora": tr.cfg.train.lora.enabled,
        }

        def write_adapter(directory: Path) -> None:
            # The weights evaluated (the EMA's while it is on), from the whole tensors gathered above.
            if tr.cfg.train.lora.enabled:
                weights = tensors["ema" if tr.ema is not None else "trainable"]
                save_adapter(tr.accelerator.unwrap_model(tr.model), directory / "adapter", weights=weights)

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


def resume(trainer: Trainer, where: str | Path) -> None:
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
    root = Path(ckpt).parent
    if trainer.is_main and root.resolve() == (trainer.out / "checkpoints").resolve():
        # A process killed between writing a checkpoint and pruning the old ones left one too many: finish
        # that prune now, as the save would have, only where the loaded checkpoint is the newest.
        found = list_checkpoints(root)
        if found and found[-1].resolve() == Path(ckpt).resolve():
            prune_checkpoints(root, trainer.cfg.checkpoint.keep)


def load_checkpoint(trainer: Trainer, ckpt: Path) -> str:
    """Verify and load ``ckpt`` into this process; returns the SHA-256 of its manifest."""
    tr = trainer
    try:
        tensors, objects, state = read_checkpoint(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{older_checkpoint_hint(ckpt)}") from None
    try:
        # A checkpoint of a run that left sampler.eta null (before runs wrote their defaults out) ran the
        # sampler's reference eta, as this run with the eta filled in does.
        saved_cfg = with_run_defaults(config_from_dict(state["config"]))
        names, epoch, step_count = state["param_names"], int(state["epoch"]), int(state["global_step"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has a state.json without this version's fields") from None
    if saved_cfg.sampler != tr.cfg.sampler or saved_cfg.model != tr.cfg.model:
        raise UserError(f"checkpoint {str(ckpt)!r} was made with another model or sampler than this config")
    if saved_cfg.algorithm.name != tr.cfg.algorithm.name:
        raise UserError(
            f"checkpoint {str(ckpt)!r} was made with algorithm {saved_cfg.algorithm.name!r}, "
            f"this config trains with {tr.cfg.algorithm.name!r}"
        )
    weights = tensors.get("trainable", {})
    if names != tr.param_names or any(
        n not in weights or tuple(weights[n].shape) != tuple(p.shape)
        for n, p in zip(tr.param_names, tr.params, strict=True)
    ):
        raise UserError(f"checkpoint {str(ckpt)!r} does not hold this model's trainable parameters")
    with torch.no_grad():
        for n, p in zip(tr.param_names, tr.params, strict=True):
            p.copy_(shard_like(weights[n], p))
    if tr.ema is not None:
        if "ema" not in tensors:
            raise UserError(f"checkpoint {str(ckpt)!r} has no EMA weights but train.ema.enabled is true")
        try:
            tr.ema.load_state_tensors(tr.param_names, tensors["ema"], state.get("ema_steps", 0))
        except KeyError:
            raise UserError(f"checkpoint {str(ckpt)!r} has EMA weights of another model") from None
        tr.ema.shadow = [shard_like(s, p) for s, p in zip(tr.ema.shadow, tr.params, strict=True)]
    own = tr.algorithm.state_tensors()
    if own:
        saved_own = tensors.get("algorithm", {})
        if set(saved_own) != set(own) or any(tuple(saved_own[n].shape) != tuple(v.shape) for n, v in own.items()):
            raise UserError(f"checkpoint {str(ckpt)!r} lacks the {tr.cfg.algorithm.name} algorithm's own weights")
        tr.algorithm.load_state_tensors({n: shard_like(saved_own[n], v) for n, v in own.items()})
    try:
        _load_optimizer_state(tr, objects["optimizer"])
    except (KeyError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {str(ckpt)!r} has an optimizer state that does not fit: {reason}") from None
    tr.state.restore({**state, "epoch": epoch, "global_step": step_count}, tr.cfg.train.forward_batch == "auto")
    tr.state.resumed_from = ckpt
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
