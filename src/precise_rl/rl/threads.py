"""How many CPU threads torch uses for a run (config key ``train.threads``).

``auto`` takes the model's own advice (:attr:`precise_rl.policies.Policy.cpu_threads`: one thread for
the built-in digits model) when the model runs on the CPU, and torch's default otherwise. The
number a run used is what its ``config.yaml`` records, so that the run can be repeated: where torch
splits an operation over threads, a sum can round differently with another count (the digits
model's default run gives the same numbers on one thread and on two on the development machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..policies import Policy

__all__ = ["resolve_threads", "using_threads"]


def resolve_threads(setting: int | str, policy: Policy, device: torch.device | str) -> int:
    """The thread count ``train.threads`` (``setting``) means for ``policy`` on ``device``."""
    if setting != "auto":
        return int(setting)
    own = getattr(policy, "cpu_threads", None)
    if own is not None and torch.device(device).type == "cpu":
        return int(own)
    return torch.get_num_threads()


@contextmanager
def using_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads and give the caller's count back after it.

    Setting the count for good would change it for everything else the calling process runs
    (a library user's other work, the next test).
    """
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
