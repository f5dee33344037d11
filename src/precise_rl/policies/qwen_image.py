"""Qwen-Image (``QwenImagePipeline``) as a policy.

Latents are the pipeline's noise ``(C, H/8, W/8)`` (its ``(1, C, H/8, W/8)`` with the frame axis
dropped: the same numbers for the same seed); the velocity packs them into 2x2 patch tokens and
back. The timestep is the sigma itself (the transformer scales it by 1000). The text is the last
hidden state of Qwen2.5-VL over the pipeline's prompt template, its first 34 tokens (the template's
system part) dropped, each prompt as long as it is, padded with a mask to the longest of the batch.

Guidance is the pipeline's "true CFG": ``guidance_scale`` is its ``true_cfg_scale`` (4.0 by default,
against ``negative_prompt``, " " by default as in the model card); the combined prediction
``v_u + w (v_c - v_u)`` is rescaled, token by token, to the norm of the conditional one, in
rollouts and training alike. The time grid is ``linspace(1, 1/N, N)`` shifted by ``exp(mu)``,
``mu`` linear in the number of image tokens between the scheduler's ``base_shift`` (at
``base_image_seq_len``) and ``max_shift`` (at ``max_image_seq_len``), then stretched by the
scheduler so that the last sigma is its ``shift_terminal`` (0.02 for Qwen-Image).

Qwen-Image-Edit (:mod:`.qwen_image_edit`) is a subclass: the same layout, guidance, time grid and
decoding, with a source image in the conditioning.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import UserError
from .diffusers_base import PackedLatentsPolicy
from .lora_targets import JOINT_ATTENTION, QWEN_IMAGE_FEED_FORWARD
from .registry import register_policy

__all__ = ["QwenImagePolicy"]

#: the longest text the pipeline takes (its ``check_inputs``)
MAX_TEXT = 1024


@register_policy("qwen_image")
class QwenImagePolicy(PackedLatentsPolicy):
    pipeline_class = "QwenImagePipeline"
    default_model = "Qwen/Qwen-Image"
    display_name = "Qwen-Image"
    default_guidance_scale = 4.0
    default_max_sequence_length = 512
    guidance_rule = (
        "the pipeline's true CFG: `guidance_scale` is its `true_cfg_scale` (4.0) against `negative_prompt` "
        '(`" "`), the combination rescaled token by token to the conditional prediction\'s norm, in rollouts and '
        "training alike"
    )
    time_grid_rule = (
        "`linspace(1, 1/N, N)` shifted by `exp(mu)`, `mu` linear in the image tokens (0.5 to 0.9), stretched to "
        "end at the scheduler's `shift_terminal` (0.02)"
    )
    #: both streams' attention projections and feed-forwards
    default_lora_suffixes = (*JOINT_ATTENTION, *QWEN_IMAGE_FEED_FORWARD)
    #: the longest ``max_sequence_length`` the pipeline takes (None: the adapter does not cut the text)
    max_text: ClassVar[int | None] = MAX_TEXT

    def __init__(self, pipe: Any, *, negative_prompt: str = " ", **kw: Any) -> None:
        super().__init__(pipe, negative_prompt=negative_prompt, **kw)
        if self.max_text is not None and self.max_sequence_length > self.max_text:
            raise UserError(
                f"model option 'max_sequence_length' must be at most {self.max_text} for {self.display_name}, "
                f"got {self.max_sequence_length}"
            )
        if self.model_config.get("guidance_embeds", False):
            raise UserError(
                f"this {self.display_name} checkpoint has a guidance embedding, which this adapter does not feed; "
                f"use a checkpoint without one ({self.default_model} has none)"
            )

    # ------------------------------------------------------------------ conditioning and forward

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.pipe.text_encoder.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline drops an all-ones mask; rows of the cache keep theirs
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {
            "prompt_embeds": embeds.to(device=self.device, dtype=self.model_dtype),
            "prompt_embeds_mask": mask.to(device=self.device, dtype=torch.long),
        }

    @staticmethod
    def _trimmed(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text up to the batch's longest prompt, and its mask (None when nothing is padding, as the
        pipeline passes it)."""
        length = int(mask.sum(1).max())
        embeds, mask = embeds[:, :length], mask[:, :length]
        return embeds, (None if bool(mask.all()) else mask)

    def _tokens(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's prediction as packed tokens ``(B, h/2 * w/2, 4C)`` for text ``embeds`` under ``mask``.

        ``cond`` holds the rest of the rows' conditioning (none here; an editing subclass's source image).
        """
        embeds, mask = self._trimmed(embeds, mask)
        _, h, w = self.latent_shape
        return self.transformer(
            hidden_states=self._pack(x).to(self._hidden_dtype(x)),
            timestep=t,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=embeds,
            img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
            return_dict=False,
        )[0]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._unpack(self._tokens(x, t, cond["prompt_embeds"], cond["prompt_embeds_mask"], cond))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``v = eps - x0`` in float32; with true CFG, the pipeline's norm-rescaled combination.

        Both branches run in one forward of 2B rows: the negative and positive texts are padded to a
        common length under the mask, which leaves each row's prediction as its own pass gives it; a
        conditioning key without a ``negative_`` twin (an edit's source image) is the same in both.
        """
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if not self.do_cfg:
            return self._forward(x, t, cond).float()
        if "negative_prompt_embeds" not in cond:
            raise ValueError("guidance_scale > 1 needs the negative_* conditioning from encode_prompts")
        pos, neg = cond["prompt_embeds"], cond["negative_prompt_embeds"]
        pos_mask, neg_mask = cond["prompt_embeds_mask"], cond["negative_prompt_embeds_mask"]
        length = max(pos.shape[1], neg.shape[1])

        def pad(e: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            extra = length - e.shape[1]
            return torch.nn.functional.pad(e, (0, 0, 0, extra)), torch.nn.functional.pad(m, (0, extra))

        (pos, pos_mask), (neg, neg_mask) = pad(pos, pos_mask), pad(neg, neg_mask)
        shared = {k: v for k, v in cond.items() if not k.startswith("negative_") and f"negative_{k}" not in cond}
        both = {k: torch.cat([v, v]) for k, v in shared.items()}
        out = self._tokens(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([pos, neg]), torch.cat([pos_mask, neg_mask]), both
        )
        v_cond, v_uncond = out.float().chunk(2)
        combined = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        combined = combined * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return self._unpack(combined)

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        # the Qwen-Image pipelines pass these sigmas whatever the scheduler's use_flow_sigmas says
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        return {"sigmas": sigmas, "mu": self._dynamic_shift_mu(self.image_seq_len)}

    # ------------------------------------------------------------------ decoding

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE's per-channel standardisation (as the pipeline computes it) and add the frame axis."""
        vae = self.pipe.vae
        z = latents[:, :, None].to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        return z / inv_std + mean
