"""How many (sample, step) rows one training forward takes: ``train.forward_batch: auto``, chosen by a memory budget.

The memory of a training pass is the live state (weights, gradients, optimizer state) plus the
activations one forward keeps for its backward, which grow linearly with the rows of the forward
(the token count per row is fixed by the model's resolution). So two measured passes, of one row
and of two, give the line ``peak(k) = fixed + k * per_row``, and the largest ``k`` under the budget is
``floor((budget - fixed) / per_row)``. The passes are measured on the run's own device with its own
model, dtype, gradient checkpointing and loss (the KL term's reference forward included), so the
line holds whatever the model: nothing is estimated from its architecture.

Peak live memory is read from the allocator on CUDA (``torch.cuda.max_memory_allocated``) and from
the profiler's record of tensor allocations on the CPU (``torch.profiler.profile(profile_memory=True)``);
both count tensor bytes, not the allocator's cached blocks, which is what a budget must bound.
Optimizer state (AdamW's two moments per trainable weight) is allocated at the first optimizer
step, after the probe: it is added to the fixed part when it does not exist yet.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError

__all__ = ["MemoryLine", "budget_bytes", "check_decode", "fit_line", "human_bytes", "live_bytes", "peak_bytes"]

#: the share of a GPU's memory that ``auto`` plans for when ``train.memory_budget_gb`` is not set: the rest
#: is the CUDA context, the allocator's fragmentation and the rollout's decoder, which the probe does not see
DEFAULT_GPU_SHARE = 0.9
#: the share of the budget the line plans for: a pass's gradient clipping, optimizer step and chunk
#: bookkeeping allocate a little the two probe passes do not (2-3% on the tiny models of the tests)
HEADROOM = 0.95
GB = 1e9


def _cpu_peak(fn: Callable[[], None]) -> int:
    """Peak bytes of CPU tensors allocated during ``fn`` and not yet freed, above the start.

    The profiler records every CPU allocation and free as a ``[memory]`` event (bytes, negative for a
    free); their running sum in time order is the live memory the pass added. The raw events are read
    from the profiler's results, which needs no stack recording (the memory timeline would).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak live tensor bytes on ``device`` while ``fn`` runs, above what was live when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    if device.type == "cpu":
        return _cpu_peak(fn)
    raise UserError(f"train.forward_batch: auto measures memory on cuda or cpu devices, not on {device.type!r}")


def live_bytes(device: torch.device) -> int:
    """Bytes of the tensors live on ``device`` now: the allocator's count on CUDA; on the CPU the storages of
    every tensor the garbage collector tracks (weights, buffers, the epoch's batch), each storage once."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                if storage.nbytes():  # FSDP frees a gathered weight by emptying its storage
                    seen[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a tensor without storage of its own (a DTensor's wrapper, a freed one)
                continue
    return sum(seen.values())


def budget_bytes(budget_gb: float | None, device: torch.device) -> int:
    """The budget ``auto`` plans for: ``train.memory_budget_gb``, else 90% of the GPU's memory."""
    if budget_gb is not None:
        return int(budget_gb * GB)
    if device.type == "cuda":
        return int(DEFAULT_GPU_SHARE * torch.cuda.get_device_properties(device).total_memory)
    raise UserError(
        f"train.forward_batch: auto on a {device.type} device needs train.memory_budget_gb "
        "(the memory a training pass may take, in GB)"
    )


def human_bytes(n: float) -> str:
    """``n`` bytes in the decimal unit that shows it with three significant digits (``"512 B"``, ``"3.41 MB"``).

    A fixed unit misleads at the ends: a budget of a few kilobytes printed in GB reads "0.00 GB".
    """
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            break
        value /= 1000
    if unit == "B":
        return f"{int(round(value))} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {unit}"


@dataclass(frozen=True)
class MemoryLine:
    """``peak(k) = fixed + k * per_row`` bytes: a training pass of ``k`` rows per forward."""

    fixed: int
    per_row: int

    def peak(self, rows: int) -> int:
        return self.fixed + rows * self.per_row

    def largest(self, budget: int, most: int) -> int:
        """The most rows per forward, up to ``most``, whose pass stays within ``budget`` bytes (planned at
        :data:`HEADROOM` of it); one sentence if not even one row does."""
        budget = int(budget * HEADROOM)
        if self.peak(1) > budget:
            raise UserError(
                f"a training pass of one (sample, step) row per forward takes {human_bytes(self.peak(1))}, more "
                f"than {HEADROOM:.0%} of the budget of {human_bytes(round(budget / HEADROOM))}: raise "
                "train.memory_budget_gb, turn on the model's gradient_checkpointing, or use a lower resolution"
            )
        if self.per_row <= 0:
            return most
        return max(1, min(most, math.floor((budget - self.fixed) / self.per_row)))


def fit_line(live: int, one_row: int, two_rows: int, optimizer_state: int = 0) -> MemoryLine:
    """The line through the measured peaks above ``live`` of passes of one and two rows, with the optimizer state
    that will still be allocated added to the fixed part."""
    per_row = max(0, two_rows - one_row)
    return MemoryLine(fixed=live + optimizer_state + one_row - per_row, per_row=per_row)


def check_decode(policy: Any, budget_gb: float | None, device: torch.device, rollout_batch: int) -> None:
    """The rollouts' VAE decode against the budget, before the first epoch: one sentence naming model option
    ``decode_batch`` if decoding that many images at once would not fit beside what is in memory now.

    Decodes of one and two latents (zeros) are measured on the run's device and fitted to a line, as for the
    training pass. A rollout chunk of ``rollout_batch`` images is decoded ``decode_batch`` at a time. Only
    where there is a budget (a GPU, or ``train.memory_budget_gb``) and for models with a ``decode_batch``.
    """
    decode_batch = getattr(policy, "decode_batch", None)
    if decode_batch is None or (device.type != "cuda" and budget_gb is None):
        return
    budget = budget_bytes(budget_gb, device)
    images = min(int(decode_batch), rollout_batch)
    live = live_bytes(device)
    peaks = []
    for k in (1, 2):
        latents = torch.zeros((k, *policy.latent_shape), device=policy.device)
        peaks.append(peak_bytes(lambda latents=latents: policy.decode(latents), device))
        del latents
    line = fit_line(live, peaks[0], peaks[1])
    need = line.peak(images)
    if need > budget:
        fits = int((budget - line.fixed) // line.per_row) if line.per_row > 0 else 0
        hint = (
            f"at most {fits} fit"
            if fits >= 1
            else "not even one image fits: turn on offload_vae, or lower the resolution"
        )
        raise UserError(
            f"the rollouts' VAE decode of {images} images at once takes {human_bytes(need)} with what is in memory, "
            f"more than the budget of {human_bytes(budget)} (train.memory_budget_gb, or 90% of the GPU): lower "
            f"model option 'decode_batch' ({hint})"
        )
