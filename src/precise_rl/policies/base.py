"""The adapter interface between a model and the trainer.

An adapter turns a model into ``velocity(x, t, cond)`` plus what the trainer needs: prompt
encoding, the initial noise, decoding latents to images, and the module to train. It knows
nothing about samplers or rewards.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Policy", "index_cond"]


class Policy(ABC):
    """A flow-matching model seen as a policy. Latents are ``(B, *latent_shape)``.

    ``velocity`` gets ``t`` as a ``(B,)`` float tensor of sigmas in [0, 1] (t = 1 is noise)
    and returns ``v = eps - x0`` with the shape of ``x``.
    """

    #: the module the trainer optimises (wrapped with LoRA when asked)
    transformer: nn.Module
    #: torch's intra-op threads that suit this model on a CPU (``train.threads: auto``); None = torch's
    #: default. A model so small that splitting each operation costs more than it gives says 1.
    cpu_threads: int | None = None

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]: ...

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Conditioning for a batch of prompts: a tensor, or a dict/tuple of ``(B, ...)`` tensors."""

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``UserError`` for prompts the model cannot take; the default encodes them.

        Adapters with large text encoders override it with a cheap check, so that a long prompt
        file is not encoded (and held in memory) just to be validated.
        """
        self.encode_prompts(prompts)

    @abstractmethod
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The model's velocity at ``(x, t)`` under conditioning ``cond``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` as floats in [0, 1]."""

    @contextlib.contextmanager
    def at_resolution(self, height: int, width: int) -> Iterator[None]:
        """Inside it, the policy samples ``height`` x ``width`` images (config keys ``eval.height``/``eval.width``:
        training at a lower resolution than evaluation). A model of one fixed size cannot."""
        from ..errors import UserError

        raise UserError(f"the {type(self).__name__} model has one fixed resolution: remove eval.height and eval.width")
        yield  # pragma: no cover - a generator, for the context manager

    def time_grid(self, num_steps: int) -> torch.Tensor:
        """The model's own sigmas for ``num_steps`` steps (uniform unless the model shifts them)."""
        from ..sde import uniform_sigmas

        return uniform_sigmas(num_steps)

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial latents ``x1 ~ N(0, I)`` in float32 on the policy's device."""
        return torch.randn((batch, *self.latent_shape), generator=generator, device=self.device)

    def finetuned_modules(self) -> list[nn.Module]:
        """The parts of ``transformer`` a full fine-tune trains (all of it unless the model says otherwise)."""
        return [self.transformer]

    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Names (or suffixes) of the modules of ``transformer`` that LoRA adapts."""


def index_cond(cond: Any, index: torch.Tensor | slice) -> Any:
    """Rows ``index`` of a conditioning batch (tensor, dict, list or tuple of tensors, or None)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond[index]
    if isinstance(cond, Mapping):
        return {k: index_cond(v, index) for k, v in cond.items()}
    if isinstance(cond, tuple | list):
        return type(cond)(index_cond(v, index) for v in cond)
    return cond
