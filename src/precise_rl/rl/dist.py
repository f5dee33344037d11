"""Agreeing across data-parallel processes: errors, reward failures, reward fields, gathers.

Every function here is a collective when ``world > 1``: every process must call it at the same
point. A failure that one process alone sees (an unwritable directory on the main process, a
checkpoint another machine cannot read, a reward that stops or errs on one process's images)
would otherwise leave the others waiting in the next collective; here every process raises the
same exception with the same message.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate import Accelerator

from ..errors import UserError
from ..rewards.failures import RewardUnavailable

__all__ = [
    "RewardError",
    "agree",
    "gather_objects",
    "gather_rows",
    "launched_processes",
    "make_accelerator",
    "same_fields",
    "score_agreed",
]


class RewardError(UserError):
    """A reward that erred (a score of the wrong shape, an exception): what :func:`score_agreed` raises."""


def gather_objects(obj: Any, world: int) -> list[Any]:
    """``obj`` of every process, in process order (``[obj]`` on one process)."""
    if world == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def agree(error: str | None, world: int) -> None:
    """Raise ``error`` as a ``UserError`` on every process when any process has one."""
    if world > 1:
        errors = [e for e in gather_objects(error, world) if e]
        error = errors[0] if errors else None
    if error:
        raise UserError(error)


def score_agreed(scores: Callable[[], Mapping[str, torch.Tensor]], world: int) -> dict[str, torch.Tensor]:
    """``scores()`` (this process's reward components); a failure on any process is raised on all.

    A reward that stops raises ``RewardUnavailable``; one that errs (``UserError``, e.g. a score of
    the wrong shape, or any other exception, which is named in one line) raises :class:`RewardError`.
    """
    comps: dict[str, torch.Tensor] = {}
    failure = None
    try:
        comps.update(scores())
    except (RewardUnavailable, UserError) as exc:
        failure = (isinstance(exc, RewardUnavailable), str(exc))
    except Exception as exc:  # not BaseException: an interrupt still stops at once
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        failure = (False, f"the rewards raised {detail}")
    if world > 1:
        failures = [f for f in gather_objects(failure, world) if f]
        failure = failures[0] if failures else None
    if failure is not None:
        unavailable, message = failure
        raise (RewardUnavailable if unavailable else RewardError)(message)
    return comps


def same_fields(comps: Mapping[str, torch.Tensor], n: int, world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``comps`` (``n`` images) with the fields of every process, in one order, on ``device``.

    A process may lack a field that another has (an extra field of a remote reward whose server
    answered none of this process's requests): it is NaN here, so that every process gathers the
    same fields in the same order.
    """
    keys = list(comps)
    if world > 1:
        keys = []
        for part in gather_objects(list(comps), world):
            keys += [k for k in part if k not in keys]
    nan = torch.full((n,), math.nan, dtype=torch.float32, device=device)
    return {k: comps[k].detach().float().to(device) if k in comps else nan.clone() for k in keys}


def gather_rows(accelerator: Accelerator, world: int, comps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each field of ``comps`` with the rows of every process, in process order."""
    if world == 1:
        return dict(comps)
    return {k: accelerator.gather(v) for k, v in comps.items()}


def launched_processes() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``; 1 when unset); UserError when it is no integer."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        return int(raw)
    except ValueError:
        raise UserError(
            f"the environment variable WORLD_SIZE must be the number of processes (an integer), got {raw!r}"
        ) from None


def make_accelerator(mixed_precision: str, cpu: bool = False) -> Accelerator:
    """An ``Accelerator`` with this precision (on the CPU even where there is a GPU with ``cpu``); a
    single-process state left by an earlier trainer is replaced.

    accelerate keeps one state per process and refuses a second ``Accelerator`` with another mixed precision;
    in a plain (not launched) process that state holds nothing but the precision, so it is reset. Under a
    distributed launch the launcher's state is kept and accelerate's own error stands. As the state is shared,
    an ``Accelerator`` made earlier in the process reports the new precision afterwards (``mixed_precision``).
    """
    from accelerate.state import AcceleratorState, DistributedType

    state = AcceleratorState._shared_state
    if (
        state
        and state.get("distributed_type") == DistributedType.NO
        and (state.get("_mixed_precision") != mixed_precision or bool(state.get("_cpu", False)) != cpu)
    ):
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
