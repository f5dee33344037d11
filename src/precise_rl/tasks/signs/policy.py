"""The ``signs`` flow model as a :class:`~precise_rl.policies.Policy`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...policies.base import Policy
from ..digits.models import read_metadata
from ..digits.policy import assets_dir
from .models import SignsFlowNet, SignsNetConfig
from .pretrain import EVAL_TIME_SHIFT, FLOW_FILE, latents_to_images
from .words import encode_prompts, prompt_metadata

__all__ = ["SignsPolicy", "load_signs_flow"]


def load_signs_flow(path: str | Path | None = None, device: str | torch.device = "cpu") -> SignsFlowNet:
    """The shipped network, or the one in ``path`` (a directory holding ``signs_flow.safetensors``, or the file)."""
    from safetensors.torch import load_file

    p = assets_dir() / FLOW_FILE if path is None else Path(path).expanduser()
    if p.is_dir():
        p = p / FLOW_FILE
    if not p.is_file():
        raise UserError(f"signs weights file {p} does not exist (regenerate with 'precise-rl pretrain signs')")
    meta = read_metadata(p)
    if meta.get("kind") != "signs_flow":
        raise UserError(f"{p} holds a {meta.get('kind')!r} network, expected a 'signs_flow' one")
    net = SignsFlowNet(SignsNetConfig.from_dict(dict(meta.get("config") or {})))
    try:
        net.load_state_dict(load_file(str(p)), strict=True)
    except Exception as exc:
        raise UserError(f"cannot load the weights in {p} ({type(exc).__name__}: {exc})") from None
    return net.to(device).eval()


class SignsPolicy(Policy):
    """Text-to-image flow model over ``3 x 32 x 128`` pixel latents in [-1, 1], prompted ``a sign that says "MOON"``.

    ``time_shift`` (model option) shifts its own time grid SD3-style (1 = the uniform grid).
    """

    display_name = "signs"
    default_model = "the shipped weights (`assets/signs_flow.safetensors`)"
    guidance_rule = "none: the quoted word is the conditioning"
    time_grid_rule = "uniform, shifted SD3-style by model option `time_shift` (3 by default)"
    # a small network: on a shared CPU one intra-op thread per process wastes least (as digits)
    cpu_threads = 1

    def __init__(
        self, transformer: SignsFlowNet, device: str | torch.device = "cpu", time_shift: float = EVAL_TIME_SHIFT
    ) -> None:
        if not isinstance(transformer, SignsFlowNet):
            raise TypeError(f"SignsPolicy needs a SignsFlowNet, got {type(transformer).__name__}")
        if isinstance(time_shift, bool) or not isinstance(time_shift, int | float) or not 0 < time_shift < math.inf:
            raise UserError(f"model option 'time_shift' must be a positive number, got {time_shift!r}")
        self.time_shift = float(time_shift)
        self.config: SignsNetConfig = transformer.config
        self.transformer: nn.Module = transformer.to(device)

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, device: str | torch.device = "cpu", time_shift: float = EVAL_TIME_SHIFT
    ) -> SignsPolicy:
        """Load the shipped weights, or those in ``path`` (a directory or a ``.safetensors`` file)."""
        return cls(load_signs_flow(path, device), device, time_shift)

    @classmethod
    def from_config(
        cls, config: SignsNetConfig | dict[str, Any] | None = None, device: str | torch.device = "cpu", seed: int = 0
    ) -> SignsPolicy:
        """A freshly initialised (untrained) model."""
        if isinstance(config, dict):
            config = SignsNetConfig.from_dict(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = SignsFlowNet(config or SignsNetConfig())
        return cls(net, device)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (3, self.config.height, self.config.width_px)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 6)`` letter tokens of each prompt's quoted word; UserError for an unreadable prompt."""
        return encode_prompts(prompts, self.device)

    def prompt_metadata(self, prompts: Sequence[str]) -> list[dict]:
        """``{"word"}`` per prompt."""
        return prompt_metadata(prompts)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``v = eps - x0`` in float32 whatever the module's dtype."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.transformer(x, t, cond).float()

    def time_grid(self, num_steps: int) -> torch.Tensor:
        """The uniform grid shifted by ``time_shift`` (3, as SD3.5's scheduler and the pretraining evaluation)."""
        from ...sde import shifted_sigmas

        return shifted_sigmas(num_steps, self.time_shift)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """RGB pixels in [0, 1], ``(B, 3, 32, 128)``."""
        return latents_to_images(latents)

    def lora_target_modules(self) -> list[str]:
        """The attention, cross-attention and MLP linears of every block, and the patch projections."""
        return SignsFlowNet.linear_names_for(self.config)
