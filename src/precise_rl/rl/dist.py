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
    if launched_processes() > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        with _bounded_meeting():
            return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


#: the environment variable that bounds how long a launched process waits for the others, in seconds
MEET_TIMEOUT_ENV = "PRECISE_RL_DIST_TIMEOUT_S"
#: the default of that bound: long enough for the processes of a multi-node launch to come up
MEET_TIMEOUT_S = 300.0
#: after this many seconds of waiting a process says what it waits for
MEET_NOTICE_S = 10.0


def meet_timeout() -> float:
    """The seconds a launched process waits for the others (``PRECISE_RL_DIST_TIMEOUT_S``, default 300)."""
    raw = os.environ.get(MEET_TIMEOUT_ENV, "").strip()
    if not raw:
        return MEET_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(
            f"the environment variable {MEET_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}"
        )
    return value


def _launch_env() -> str:
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return ", ".join(f"{n}={os.environ[n]}" for n in names if n in os.environ)


class _bounded_meeting:  # noqa: N801 - used as a context manager, named for what it bounds
    """Joining the process group of a launch: say what it waits for after ``MEET_NOTICE_S``, give up after the bound.

    Leftover launch variables (``WORLD_SIZE=2 RANK=0`` exported in a shell) make a plain ``train`` wait
    for processes that will never come; torch's own wait is 30 minutes or more and says nothing. The
    watchdog ends the process with exit code 2 and one sentence: the bound of the meeting alone, not
    of the collectives after it (a long checkpoint write keeps torch's own timeout).
    """

    def __enter__(self) -> None:
        import threading

        self.timeout = meet_timeout()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="launch-meeting-watchdog", daemon=True)
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.done.set()

    def _watch(self) -> None:
        import sys

        world, env = launched_processes(), _launch_env()
        if self.timeout > MEET_NOTICE_S:
            if self.done.wait(MEET_NOTICE_S):
                return
            print(
                f"precise-rl: waiting up to {self.timeout:g} s for the {world} processes of a distributed launch "
                f"to meet ({env})",
                file=sys.stderr,
                flush=True,
            )
        if self.done.wait(self.timeout - (MEET_NOTICE_S if self.timeout > MEET_NOTICE_S else 0.0)):
            return
        print(
            f"precise-rl: error: the {world} processes of a distributed launch ({env}) did not meet within "
            f"{self.timeout:g} s; start every process (torchrun or accelerate launch), or unset WORLD_SIZE and "
            f"RANK to run in one process ({MEET_TIMEOUT_ENV} sets the wait)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(2)  # the main thread is inside torch's wait and cannot be interrupted
