"""FSDP2 sharding of the trained transformer over the processes of a launch (``train.fsdp``).

Each process holds ``1/N`` of every weight (frozen and trainable), of the gradients and of the
optimizer state; a block's weights are gathered whole only while the block computes. The
transformer is sharded block by block (the classes its ``_no_split_modules`` names, as diffusers
models declare them), then the root, which takes the weights left over (embeddings, the output
layers). The launch is an ordinary data-parallel one (gloo on CPU processes, NCCL on GPUs):
precise-rl shards the model itself with ``torch.distributed.fsdp.fully_shard`` instead of letting
accelerate wrap it in DDP, so the sharded path is one code path on CPU and GPU.

A sharded weight is a DTensor; :func:`whole` gathers one (a collective) and :func:`shard_like`
splits a whole tensor as a sharded one is split, which is how checkpoints stay independent of the
number of processes (see :mod:`.state`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator
from torch import nn

from ..errors import UserError

__all__ = [
    "check_launch",
    "gradient_sync",
    "is_dtensor",
    "is_sharded",
    "shard",
    "shard_like",
    "shard_units",
    "whole",
]


def check_launch() -> None:
    """UserError for a launch through accelerate's own FSDP plugin (``distributed_type: FSDP``).

    That plugin would wrap the model its own way, a path precise-rl neither drives nor tests; accelerate
    marks such a launch with ``ACCELERATE_USE_FSDP`` (on CPU processes too, where it then runs plain DDP).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes"):
        raise UserError(
            "this run was launched with accelerate's FSDP plugin (distributed_type: FSDP), which precise-rl "
            "does not use: set train.fsdp=true and launch with configs/accelerate/fsdp.yaml"
        )


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded one by one: those whose class ``module._no_split_modules`` names (outermost only)."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    units: list[nn.Module] = []
    for sub in module.modules():
        if sub is not module and type(sub).__name__ in names and not any(_contains(u, sub) for u in units):
            units.append(sub)
    return units


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def shard(modules: Sequence[nn.Module], device: torch.device, world: int, mixed_precision: str) -> None:
    """Shard each of ``modules`` in place over the ``world`` processes (a collective; every process calls it).

    With ``mixed_precision`` ``bf16`` the gathered weights compute in bfloat16 and the gradients are
    reduced in float32; the stored shards keep their dtype (trainable weights float32). Inputs are not
    cast: the policy chooses the dtype its inputs enter in (a timestep cast to bfloat16 would lose bits).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    for module in modules:
        # Reshard after every forward, the root's too: a parameter is then always its shard outside a
        # forward, so that loading, the EMA swap and saving, which write and read the shards, see the
        # weights the next forward gathers.
        for unit in shard_units(module):
            fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


@contextmanager
def gradient_sync(accelerator: Accelerator, model: nn.Module, sync: bool) -> Iterator[None]:
    """Inside it, a backward reduces the gradients over the processes only when ``sync`` (accumulation otherwise).

    DDP through accelerate's ``no_sync``; an FSDP2 module through ``set_requires_gradient_sync``, under
    which the unreduced gradients accumulate until the backward that reduces them.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        yield
        return
    with nullcontext() if sync else accelerator.no_sync(model):
        yield


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` (a parameter, a gradient, an optimizer or EMA state) is a shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether the trainable parameters are FSDP shards."""
    return any(is_dtensor(p) for p in params)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter or state, gathering a shard (a collective then), detached."""
    t = t.detach()
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: split as ``like`` is when a shard (a collective then), else on its device."""
    if is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)
    return full.to(like.device)
