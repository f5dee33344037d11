"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) as a policy.

Latents are the VAE's ``(C, H/8, W/8)``; the transformer patchifies them itself. The timestep is
``1000 * sigma``. The time grid is the pipeline's default for ``N`` steps (the scheduler's static
shift, 3.0 for SD3.5, or its dynamic shift where configured). Classifier-free guidance is part
of the policy: the velocity is ``v_uncond + w (v_cond - v_uncond)`` (``guidance_scale`` ``w``,
4.5 in the reference recipe) in rollouts and in training alike, so the log-probs agree.
"""

from __future__ import annotations

from typing import Any

import torch

from .diffusers_base import DiffusersPolicy
from .lora_targets import JOINT_ATTENTION
from .registry import register_policy

__all__ = ["SD3Policy"]


@register_policy("sd3")
class SD3Policy(DiffusersPolicy):
    pipeline_class = "StableDiffusion3Pipeline"
    default_model = "stabilityai/stable-diffusion-3.5-medium"
    display_name = "SD3"
    default_guidance_scale = 4.5
    default_max_sequence_length = 256
    guidance_rule = "CFG 4.5 by default: the velocity is `v_u + w (v_c - v_u)` in rollouts and in training alike"
    time_grid_rule = (
        "the scheduler's static shift (3.0 for SD3.5), or its resolution-dependent one where the scheduler sets "
        "dynamic shifting"
    )
    #: the joint-attention projections (Flow-GRPO's SD3.5 targets)
    default_lora_suffixes = JOINT_ATTENTION

    @property
    def patch_size(self) -> int:
        return int(self.model_config.patch_size)

    def _pixel_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def _max_pixels(self) -> int | None:
        size = self.model_config.get("pos_embed_max_size")
        return None if size is None else int(size) * self.patch_size * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (int(self.model_config.in_channels), self.height // f, self.width // f)

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.pipe.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {
            "prompt_embeds": embeds.to(device=self.device, dtype=self.model_dtype),
            "pooled_prompt_embeds": pooled.to(device=self.device, dtype=self.model_dtype),
        }

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.transformer(
            hidden_states=x.to(self.model_dtype),
            timestep=t * 1000.0,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        cfg = self._scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        _, h, w = self.latent_shape
        seq = (h // self.patch_size) * (w // self.patch_size)
        return {"mu": self._dynamic_shift_mu(seq, default_max_shift=1.16)}

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
