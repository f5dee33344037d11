"""Z-Image and Z-Image-Turbo (``ZImagePipeline``) as a policy.

Latents are the pipeline's float32 noise ``(C, H/8, W/8)``; the transformer takes each sample as a
``(C, 1, h, w)`` tensor of a list and patchifies it itself. Its timestep runs the other way,
``(1000 - 1000 sigma) / 1000``, and it predicts ``x0 - eps``: the velocity is its output negated.
The text is the second-to-last hidden state of Qwen3 over the chat template, each prompt as long as
it is (a batch is kept padded here, with its lengths, and unpadded for the transformer).

Guidance is the pipeline's: ``v_c + w (v_c - v_u)`` against ``negative_prompt`` when
``guidance_scale`` ``w`` > 0 (5.0 by default, as the pipeline; Z-Image-Turbo is distilled and runs
at 0, one pass). ``cfg_normalization`` (0 = off; the pipeline's True is 1) caps the guided
prediction's norm at that multiple of the conditional one's, sample by sample; ``cfg_truncation``
drops guidance at steps whose ``1 - sigma`` exceeds it (1 = never). The time grid is the pipeline's:
``linspace(1, 1/N, N)`` (in float32), shifted by the scheduler (Z-Image-Turbo: a static shift of 3;
with dynamic shifting, ``exp(mu)``, ``mu`` linear in the image tokens).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UserError
from .diffusers_base import DiffusersPolicy
from .registry import register_policy

__all__ = ["ZImagePolicy", "Z_IMAGE_LORA_TARGETS"]

#: the attention and SwiGLU feed-forward projections of every Z-Image block (the main layers and the
#: noise and caption refiners alike)
Z_IMAGE_LORA_TARGETS: tuple[str, ...] = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


@register_policy("z_image")
class ZImagePolicy(DiffusersPolicy):
    pipeline_class = "ZImagePipeline"
    default_model = "Tongyi-MAI/Z-Image"
    display_name = "Z-Image"
    default_guidance_scale = 5.0
    default_max_sequence_length = 512
    guidance_rule = (
        "CFG `v_c + w (v_c - v_u)` for `guidance_scale` `w > 0` (5.0; Turbo is distilled: 0, one pass), with the "
        "pipeline's `cfg_normalization` and `cfg_truncation`"
    )
    time_grid_rule = "`linspace(1, 1/N, N)` (float32) shifted by the scheduler (Turbo: static shift 3)"
    default_lora_suffixes = Z_IMAGE_LORA_TARGETS

    def __init__(
        self,
        pipe: Any,
        *,
        cfg_normalization: float | bool = 0.0,
        cfg_truncation: float = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(pipe, **kw)
        for name, value in (("cfg_normalization", cfg_normalization), ("cfg_truncation", cfg_truncation)):
            if not isinstance(value, int | float) or not math.isfinite(float(value)) or float(value) < 0:
                raise UserError(f"model option '{name}' must be a finite number >= 0, got {value!r}")
        self.cfg_normalization = float(cfg_normalization)
        self.cfg_truncation = float(cfg_truncation)
        patch = self.model_config.all_patch_size
        if 2 not in patch or 1 not in self.model_config.all_f_patch_size:
            raise UserError(
                f"this {self.display_name} transformer has patch sizes {list(patch)}; the pipeline runs it with "
                "2x2 patches of one frame, which it lacks"
            )

    @property
    def do_cfg(self) -> bool:
        # Z-Image guides at any positive scale (its combination is v_c + w (v_c - v_u)).
        return self.guidance_scale > 0.0

    # ------------------------------------------------------------------ layout

    def _pixel_multiple(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (int(self.model_config.in_channels), self.height // f, self.width // f)

    @property
    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    # ------------------------------------------------------------------ conditioning and forward

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # The pipeline's encoder writes the templated text into the list it is given: hand it a copy.
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.pipe.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        lengths = torch.tensor([e.shape[0] for e in embeds], device=self.device)
        padded = torch.nn.utils.rnn.pad_sequence(list(embeds), batch_first=True)
        return {"prompt_embeds": padded.to(device=self.device, dtype=self.model_dtype), "prompt_lengths": lengths}

    @staticmethod
    def _unpadded(embeds: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        return [e[: int(n)] for e, n in zip(embeds, lengths.tolist(), strict=True)]

    def _model_out(self, x: torch.Tensor, t: torch.Tensor, texts: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's output ``(B, C, h, w)`` in float32 for latents ``x`` at sigmas ``t``."""
        timestep = (1000.0 - t * 1000.0) / 1000.0  # the pipeline's reversed time, from its timesteps
        frames = list(x.to(self._hidden_dtype(x)).unsqueeze(2).unbind(0))
        out = self.transformer(frames, timestep, texts, return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return -self._model_out(x, t, self._unpadded(cond["prompt_embeds"], cond["prompt_lengths"]))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``v = eps - x0`` in float32: the negated prediction, guided as the pipeline guides.

        The rows that guide run with their negative prompts in one forward of twice the rows; a row
        whose step is past ``cfg_truncation`` takes its conditional prediction alone.
        """
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if not self.do_cfg:
            return self._forward(x, t, cond)
        if "negative_prompt_embeds" not in cond:
            raise ValueError("guidance_scale > 0 needs the negative_* conditioning from encode_prompts")
        pos = self._unpadded(cond["prompt_embeds"], cond["prompt_lengths"])
        neg = self._unpadded(cond["negative_prompt_embeds"], cond["negative_prompt_lengths"])
        # the pipeline's rule per step: guidance only while (1000 - timestep) / 1000 <= cfg_truncation
        guided = (((1000.0 - t * 1000.0) / 1000.0).double() <= self.cfg_truncation).tolist()
        if not any(guided):
            return self._forward(x, t, cond)
        out = self._model_out(torch.cat([x, x]), torch.cat([t, t]), pos + neg)
        v_cond, v_uncond = out.chunk(2)
        preds = []
        for j in range(x.shape[0]):
            c, u = v_cond[j], v_uncond[j]
            pred = c + self.guidance_scale * (c - u) if guided[j] else c
            if guided[j] and self.cfg_normalization > 0.0:
                top = torch.linalg.vector_norm(c) * self.cfg_normalization
                norm = torch.linalg.vector_norm(pred)
                if norm > top:
                    pred = pred * (top / norm)
            preds.append(pred)
        return -torch.stack(preds)

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        # the pipeline's default sigmas come from a float32 linspace (get_default_z_image_sigmas)
        sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        return {"sigmas": sigmas, "mu": self._dynamic_shift_mu(self.image_seq_len)}

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
