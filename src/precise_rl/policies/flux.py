"""FLUX.1 (``FluxPipeline``: dev, schnell and fine-tunes) as a policy.

Latents are the pipeline's noise layout ``(C, H/8, W/8)``; the velocity packs them into 2x2
patch tokens and back (the layout of :class:`.diffusers_base.PackedLatentsPolicy`). The timestep
is the sigma itself (the transformer scales it by 1000). FLUX.1-dev is guidance-distilled:
``guidance_scale`` (3.5 by default) is fed to the guidance embedding, with no second
(unconditional) pass; schnell has no guidance embedding. The pipeline's "true" CFG against a
negative prompt (``true_cfg_scale``) is not offered. The time grid is the pipeline's:
``linspace(1, 1/N, N)`` shifted by ``exp(mu)``, ``mu`` linear in the number of image tokens
(when the scheduler's dynamic shifting is on).
"""

from __future__ import annotations

from typing import Any

import torch

from .diffusers_base import PackedLatentsPolicy
from .lora_targets import FLUX1_FEED_FORWARD, JOINT_ATTENTION
from .registry import register_policy

__all__ = ["Flux1Policy"]


@register_policy("flux1")
class Flux1Policy(PackedLatentsPolicy):
    pipeline_class = "FluxPipeline"
    default_model = "black-forest-labs/FLUX.1-dev"
    display_name = "FLUX.1"
    default_guidance_scale = 3.5
    default_max_sequence_length = 512
    guidance_rule = 'guidance embedding (3.5), one pass; the pipeline\'s "true CFG" is not offered'
    time_grid_rule = "`mu` linear in the number of image tokens"
    #: attention and feed-forward projections of the double-stream blocks and the single-stream q/k/v
    default_lora_suffixes = (*JOINT_ATTENTION, *FLUX1_FEED_FORWARD)

    def __init__(self, pipe: Any, **kw: Any) -> None:
        super().__init__(pipe, **kw)
        self._img_ids: torch.Tensor | None = None

    @property
    def do_cfg(self) -> bool:
        # FLUX.1's guidance goes through the guidance embedding: one pass, no negative prompt.
        return False

    def _ids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._img_ids is None or self._img_ids.device != device or self._img_ids.dtype != dtype:
            _, h, w = self.latent_shape
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] = torch.arange(h // 2)[:, None]
            ids[..., 2] = torch.arange(w // 2)[None, :]
            self._img_ids = ids.reshape(-1, 3).to(device=device, dtype=dtype)
        return self._img_ids

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
        )
        return {
            "prompt_embeds": embeds.to(device=self.device, dtype=self.model_dtype),
            "pooled_prompt_embeds": pooled.to(device=self.device, dtype=self.model_dtype),
        }

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = cond["prompt_embeds"]
        guidance = None
        if self.model_config.guidance_embeds:
            guidance = torch.full_like(t, self.guidance_scale, dtype=torch.float32)
        out = self.transformer(
            hidden_states=self._pack(x).to(self.model_dtype),
            timestep=t,
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.model_dtype),
            img_ids=self._ids(x.device, self.model_dtype),
            return_dict=False,
        )[0]
        return self._unpack(out)

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {
            "sigmas": self._flux_sigmas_arg(self._scheduler, num_steps),
            "mu": self._dynamic_shift_mu(self.image_seq_len),
        }

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
