"""FLUX.2 Klein (``Flux2KleinPipeline``) as a policy.

Latents are the pipeline's noise layout ``(4C, H/16, W/16)`` (VAE latents already folded into
2x2 patches); the transformer sees them as a token sequence. The timestep is the sigma itself
(the transformer scales it by 1000). The time grid is the pipeline's: ``linspace(1, 1/N, N)``
shifted by ``exp(mu)`` with ``mu`` from FLUX.2's empirical fit to sequence length and steps.
The base model is trained without classifier-free guidance in the reference recipe
(``guidance_scale`` 1); a value above 1 applies the pipeline's guidance against ``""``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UserError
from ..sde import flux2_empirical_mu
from .diffusers_base import DiffusersPolicy
from .registry import register_policy

__all__ = ["Flux2KleinPolicy", "REFERENCE_LORA_TARGETS", "SINGLE_STREAM_OUT_TARGET", "LORA_TARGET_PRESETS"]

#: LoRA targets of the reference recipe, in its order (name suffixes; ``attn.to_out.0`` is the output
#: projection of the double-stream blocks, where ``attn.to_out`` is a ModuleList)
REFERENCE_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.to_qkv_mlp_proj",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)
#: the single-stream blocks' attention output projection (a Linear there), which the reference does not adapt
SINGLE_STREAM_OUT_TARGET = "single_transformer_blocks.*.attn.to_out"
#: ``reference``: the reference's list (the default); ``reference+single_out``: with the single-stream
#: blocks' output projection too (this adapter's default before it followed the reference)
LORA_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "reference": REFERENCE_LORA_TARGETS,
    "reference+single_out": (*REFERENCE_LORA_TARGETS, SINGLE_STREAM_OUT_TARGET),
}


def expand_lora_targets(targets: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Model option ``lora_targets`` with preset names (see :data:`LORA_TARGET_PRESETS`) expanded in place."""
    if targets is None:
        return None
    items = [targets] if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for item in items:
        for name in LORA_TARGET_PRESETS.get(item, (item,)) if isinstance(item, str) else (item,):
            if name not in out:
                out.append(name)
    return tuple(out)


@register_policy("flux2_klein")
class Flux2KleinPolicy(DiffusersPolicy):
    pipeline_class = "Flux2KleinPipeline"
    default_model = "black-forest-labs/FLUX.2-klein-base-4B"
    display_name = "FLUX.2 Klein"
    default_guidance_scale = 1.0
    default_max_sequence_length = 512
    guidance_rule = (
        "none (the base model is trained without CFG in the reference recipe); `guidance_scale > 1` applies "
        'the pipeline\'s CFG against `""`'
    )
    time_grid_rule = "`linspace(1, 1/N, N)` shifted by FLUX.2's empirical `mu` (image tokens and steps)"
    #: the reference recipe's LoRA targets (Tencent-Hunyuan/Precise, ``precise_sde/train/adapters.py``):
    #: the attention and MLP projections of the double-stream blocks and the fused QKV/MLP input
    #: projection of the single-stream blocks (not their output projection, modulation or embedders)
    default_lora_suffixes = REFERENCE_LORA_TARGETS
    #: named values of model option ``lora_targets`` (alone, or as entries of a list among suffixes and globs)
    lora_target_presets = LORA_TARGET_PRESETS

    def __init__(
        self,
        pipe: Any,
        *,
        text_encoder_out_layers: tuple[int, ...] | list[int] = (9, 18, 27),
        lora_targets: str | Sequence[str] | None = None,
        **kw: Any,
    ):
        layers = tuple(int(i) for i in text_encoder_out_layers)
        n_layers = pipe.text_encoder.config.num_hidden_layers
        if not layers or any(not 0 <= i <= n_layers for i in layers):
            raise UserError(
                f"model option 'text_encoder_out_layers' must name hidden states 0..{n_layers} of the text "
                f"encoder, got {list(text_encoder_out_layers)}"
            )
        self.text_encoder_out_layers = layers
        super().__init__(pipe, lora_targets=expand_lora_targets(lora_targets), **kw)
        if self.do_cfg and pipe.config.get("is_distilled", False):
            raise UserError(
                "this FLUX.2 Klein checkpoint is step-distilled and takes no classifier-free guidance: "
                "set model option 'guidance_scale' to 1"
            )
        self._img_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------ layout

    def _pixel_multiple(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        m = self._pixel_multiple()
        return (int(self.model_config.in_channels), self.height // m, self.width // m)

    @property
    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        return h * w

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, h*w, C)`` (the pipeline's ``_pack_latents``)."""
        return x.flatten(2).transpose(1, 2)

    def _unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        _, h, w = self.latent_shape
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def _ids(self, device: torch.device) -> torch.Tensor:
        """Position ids ``(T, H, W, L)`` of the image tokens, row-major (the pipeline's ``_prepare_latent_ids``)."""
        if self._img_ids is None or self._img_ids.device != device:
            _, h, w = self.latent_shape
            self._img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(
                device
            )
        return self._img_ids

    # ------------------------------------------------------------------ conditioning and forward

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"prompt_embeds": embeds.to(device=self.device, dtype=self.model_dtype)}

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 4, dtype=torch.long, device=x.device)
        txt_ids[:, 3] = torch.arange(embeds.shape[1], device=x.device)
        out = self.transformer(
            hidden_states=self._pack(x).to(self._hidden_dtype(x)),
            timestep=t,
            guidance=None,  # as Flux2KleinPipeline: a guidance embedding, where a checkpoint has one, gets none
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=self._ids(x.device),
            return_dict=False,
        )[0]
        return self._unpack(out[:, : self.image_seq_len])

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {
            "sigmas": self._flux_sigmas_arg(self._scheduler, num_steps),
            "mu": flux2_empirical_mu(self.image_seq_len, num_steps),
        }

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE's batch-norm standardisation, then unfold the 2x2 patches."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).float().to(latents.device)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).float() + vae.config.batch_norm_eps).to(latents.device)
        z = latents * std + mean
        b, c, h, w = z.shape
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(b, c // 4, h * 2, w * 2)
