"""Exponential moving average of the trainable parameters (used for eval and checkpoints).

Two behaviours (``train.ema.mode``), both updating once every ``every`` optimizer steps:

* ``interval``: ``shadow <- decay * shadow + (1 - decay) * param`` after every ``every``-th
  step. At decay 0.9 and every 8 the shadow lags the weights by about
  ``every * decay / (1 - decay)`` = 72 optimizer steps.
* ``reference``: what the reference recipe's EMA helper does in effect. It is called after every
  training micro-batch with the count ``n`` of optimizer steps done and acts when
  ``(n + 1) % every == 0`` (after the 7th, 15th, ... step for every = 8), with the warm-up decay
  ``d(n) = min((1 + n) / (10 + n), decay)``. The weights do not change between the ``repeats``
  calls (micro-batches per optimizer step) that see the same ``n``, so the shadow becomes
  ``d^repeats * shadow + (1 - d^repeats) * param``. With 8 micro-batches and decay 0.9,
  ``0.9^8 = 0.43`` of the shadow is kept: a lag of about ``8 * 0.43 / 0.57`` = 6 optimizer steps
  at steady state, less during the warm-up. Exact where those calls fall in one epoch; where an
  update falls on an epoch's last optimizer step, the reference makes the remaining calls after the
  next rollout with the same weights, so its shadow at that epoch's evaluation or checkpoint has
  had one application, not ``repeats``. The reference recipes (2 optimizer steps per epoch, every
  8: updates after odd steps, epochs ending on even ones) never meet that case.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["EMA"]


class EMA:
    """The average of ``params``; :meth:`step` after every optimizer step (see the module docstring)."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        decay: float = 0.9,
        every: int = 1,
        mode: str = "interval",
        repeats: int = 1,
    ) -> None:
        if mode not in ("interval", "reference"):
            raise ValueError(f"unknown EMA mode {mode!r}")
        self.params = list(params)
        self.decay = float(decay)
        self.every = int(every)
        self.mode = mode
        self.repeats = int(repeats)
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.num_steps = 0

    def kept(self, n: int) -> float | None:
        """The share of the shadow kept by the update after the ``n``-th optimizer step; None: no update then."""
        if self.mode == "interval":
            return self.decay if n % self.every == 0 else None
        # The reference helper is called with the count of optimizer steps done, ``n``, and acts
        # when ``(n + 1) % every == 0``: after the 7th, 15th, ... step for every = 8.
        if (n + 1) % self.every:
            return None
        return min((1 + n) / (10 + n), self.decay) ** self.repeats

    @torch.no_grad()
    def step(self) -> bool:
        """Count one optimizer step; update the average when due. Returns whether it did."""
        self.num_steps += 1
        kept = self.kept(self.num_steps)
        if kept is None:
            return False
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - kept)
        return True

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params, strict=True):
                    p.copy_(b)

    def state_tensors(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: s.contiguous() for n, s in zip(names, self.shadow, strict=True)}

    def load_state_tensors(self, names: Sequence[str], tensors: dict[str, torch.Tensor], num_steps: int) -> None:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        self.shadow = [tensors[n].clone().float() for n in names]
        self.num_steps = int(num_steps)
