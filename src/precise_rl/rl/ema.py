"""Exponential moving average of the trainable parameters (used for eval and checkpoints)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["EMA"]


class EMA:
    """``shadow <- decay * shadow + (1 - decay) * param``, every ``every`` optimizer steps."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float = 0.9, every: int = 1) -> None:
        self.params = list(params)
        self.decay = float(decay)
        self.every = int(every)
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.num_steps = 0

    @torch.no_grad()
    def step(self) -> bool:
        """Count one optimizer step; update the average when due. Returns whether it did."""
        self.num_steps += 1
        if self.num_steps % self.every:
            return False
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)
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
