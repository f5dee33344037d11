"""The ``digits`` flow model as a :class:`~precise_rl.policies.Policy`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...policies.base import Policy
from .data import latents_to_images
from .models import DigitsFlowNet, FlowNetConfig, load_module
from .pretrain import FLOW_FILE
from .prompts import encode_prompts, prompt_metadata

__all__ = ["DigitsPolicy", "assets_dir", "resolve_weights"]


def assets_dir() -> Path:
    """The folder of the shipped weights (``precise_rl/assets``)."""
    return Path(__file__).resolve().parents[2] / "assets"


def resolve_weights(path: str | Path | None, filename: str) -> Path:
    """``path`` as a weights file: ``None`` is the shipped file, a directory holds ``filename``."""
    p = assets_dir() / filename if path is None else Path(path).expanduser()
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise UserError(f"digits weights file {p} does not exist (regenerate with 'precise-rl pretrain digits')")
    return p


#: the shift of the model's own time grid: SD3.5's, the regime real models sample in (see :meth:`time_grid`)
DEFAULT_TIME_SHIFT = 3.0


class DigitsPolicy(Policy):
    """Class-conditional flow model over 1x8x8 pixel latents in [-1, 1], prompted by text like ``"a bold 7"``.

    ``time_shift`` (model option) shifts its own time grid SD3-style (1 = the uniform grid).
    """

    # what ``precise-rl models`` lists (as the diffusers adapters state it)
    display_name = "digits"
    default_model = "the shipped weights (`assets/digits_flow.safetensors`)"
    guidance_rule = "none: the digit and style are the conditioning"
    time_grid_rule = "uniform, shifted SD3-style by model option `time_shift` (3 by default)"
    # Its tensors are a few KB: on a CPU, intra-op threads cost more in handing work out than they
    # give, most of all on a machine whose cores other jobs share (benchmarks/cpu_threads.py).
    cpu_threads = 1

    def __init__(
        self, transformer: DigitsFlowNet, device: str | torch.device = "cpu", time_shift: float = DEFAULT_TIME_SHIFT
    ) -> None:
        if not isinstance(transformer, DigitsFlowNet):
            raise TypeError(f"DigitsPolicy needs a DigitsFlowNet, got {type(transformer).__name__}")
        if isinstance(time_shift, bool) or not isinstance(time_shift, int | float) or not 0 < time_shift < math.inf:
            raise UserError(f"model option 'time_shift' must be a positive number, got {time_shift!r}")
        self.time_shift = float(time_shift)
        # kept apart from the module: the trainer may wrap ``transformer`` (LoRA) after this
        self.config: FlowNetConfig = transformer.config
        self.transformer: nn.Module = transformer.to(device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device: str | torch.device = "cpu", time_shift: float = DEFAULT_TIME_SHIFT
    ) -> DigitsPolicy:
        """Load the shipped weights, or those in ``path`` (a directory or a ``.safetensors`` file)."""
        net = load_module(resolve_weights(path, FLOW_FILE), "digits_flow", device)
        return cls(net, device, time_shift)

    @classmethod
    def from_config(
        cls,
        config: FlowNetConfig | dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> DigitsPolicy:
        """A freshly initialised (untrained) model, e.g. ``from_config({"width": 1024})`` for benchmarks."""
        if isinstance(config, dict):
            config = FlowNetConfig.from_dict(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DigitsFlowNet(config or FlowNetConfig())
        return cls(net, device)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 2)`` long tensor ``[digit, style]`` on the policy's device; UserError for an unreadable prompt."""
        return encode_prompts(prompts, self.device)

    def prompt_metadata(self, prompts: Sequence[str]) -> list[dict]:
        """``{"digit", "style"}`` per prompt, for the rewards."""
        return prompt_metadata(prompts)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``v = eps - x0`` in float32 whatever the module's dtype (the step math stays in float32)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.transformer(x, t, cond).float()

    def time_grid(self, num_steps: int) -> torch.Tensor:
        """The uniform grid shifted by ``time_shift`` (3: as SD3.5's scheduler), float64.

        The model was pretrained with ``t ~ U(0, 1)``, for which the uniform grid (``time_shift`` 1, or
        ``sampler.grid: uniform``) is the natural one. The default samples it as real models are sampled:
        SD3.5 and FLUX shift their grids towards the noise end, where the sampler study shows the
        samplers' differences matter most for RL.
        """
        from ...sde import shifted_sigmas

        return shifted_sigmas(num_steps, self.time_shift)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], ``(B, 1, 8, 8)``."""
        return latents_to_images(latents)

    def lora_target_modules(self) -> list[str]:
        """Every linear layer on the image path and the FiLM layers (not the time embedding)."""
        return DigitsFlowNet.linear_names_for(self.config)
