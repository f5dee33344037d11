"""FLUX.2 dev (``Flux2Pipeline``) as a policy.

The transformer, VAE, latent layout and time grid are FLUX.2 Klein's (see ``flux2.py``): noise in
``(4C, H/16, W/16)``, tokens packed inside the velocity, the sigma itself as the timestep,
``linspace(1, 1/N, N)`` shifted by FLUX.2's empirical ``mu``. What differs is the text encoder
and the guidance. The text encoder is Mistral Small 3 (``Mistral3ForConditionalGeneration``):
each prompt goes through the pipeline's chat template with its system message, and the hidden
states of layers 10, 20 and 30 are stacked. FLUX.2 dev is guidance-distilled: ``guidance_scale``
(4.0, the pipeline's default) is fed to the guidance embedding, one pass, no negative prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from .flux2 import Flux2KleinPolicy
from .registry import register_policy

__all__ = ["Flux2DevPolicy"]


@register_policy("flux2_dev")
class Flux2DevPolicy(Flux2KleinPolicy):
    pipeline_class = "Flux2Pipeline"
    default_model = "black-forest-labs/FLUX.2-dev"
    display_name = "FLUX.2 dev"
    default_guidance_scale = 4.0
    guidance_rule = "guidance embedding (4.0), one pass, no negative prompt"
    #: the layers of the reference recipe's FLUX.2 Klein list: FLUX.2 dev has the same block types
    default_lora_suffixes = Flux2KleinPolicy.default_lora_suffixes

    def __init__(
        self,
        pipe: Any,
        *,
        text_encoder_out_layers: tuple[int, ...] | list[int] = (10, 20, 30),
        **kw: Any,
    ) -> None:
        super().__init__(pipe, text_encoder_out_layers=text_encoder_out_layers, **kw)

    @staticmethod
    def _text_config(pipe: Any) -> Any:
        # Mistral3ForConditionalGeneration keeps its language model's settings in ``text_config``.
        return pipe.text_encoder.config.text_config

    @property
    def do_cfg(self) -> bool:
        # FLUX.2 dev's guidance goes through the guidance embedding: one pass, no negative prompt.
        return False

    def _guidance(self, t: torch.Tensor) -> torch.Tensor | None:
        if not self.model_config.guidance_embeds:
            return None
        return torch.full_like(t, self.guidance_scale, dtype=torch.float32)
