"""HunyuanVideo 1.5 text-to-video (``HunyuanVideo15Pipeline``) as a policy.

Latents are the pipeline's noise ``(C, F, H/16, W/16)`` with ``F = (num_frames - 1) / 4 + 1`` latent
frames (``num_frames`` must be ``4k + 1``, height and width multiples of the VAE's 16 times the patch size).
The 1.5 transformer is built for image-to-video too and takes ``2C + 1`` input channels even for text-to-video:
as the pipeline does, the latents are followed by ``C`` channels of (zero) condition latents and one of (zero)
condition mask, and the image tokens it also takes are 729 zero SigLIP embeddings, which the transformer masks
out. The timestep is ``1000 sigma`` in the latents' dtype.

The text is the pipeline's: the third-to-last hidden state of the Qwen2.5-VL text model over the video chat
template, padded to ``max_sequence_length`` (the pipeline's 1000) after its first 108 tokens (the template's
system part) are cropped; and the ByT5 glyph encoder over the quoted text of the prompt (``"..."``), 256 tokens,
all masked out for a prompt without quotes. Each distinct prompt goes through both encoders once.

Guidance is the pipeline's guider (a ``ClassifierFreeGuidance`` in its config): ``guidance_scale`` is its
scale unless given (6.0 in the released checkpoints, 1.0 = none in the CFG-distilled ones), against
``negative_prompt`` (the pipeline's default is empty), with the guider's formulation and ``guidance_rescale``.
The time grid is the pipeline's ``linspace(1, 0, N + 1)[:-1]`` shifted by the scheduler's static shift (5 at 480p,
9 at 720p). Decoding (:class:`.VideoPolicy`'s) divides by the VAE's ``scaling_factor`` and decodes one video
per call (``decode_batch`` stays 1: the VAE's causal attention mask does not broadcast over a batch), in the
VAE's 256-pixel tiles with ``vae_tiling`` (on by default, as the model card runs it), to frames
``(B, F, 3, H, W)`` in [0, 1]. The size defaults to the pipeline's (its 16:9 bucket: 480x848 at 480p).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .registry import register_policy
from .video import VideoPolicy

__all__ = ["HunyuanVideo15Policy", "HUNYUAN_VIDEO15_LORA_TARGETS"]

#: the attention projections and feed-forwards of both streams of the double-stream blocks (not the text
#: refiner's, whose layers end the same way)
HUNYUAN_VIDEO15_LORA_TARGETS: tuple[str, ...] = tuple(
    f"transformer_blocks.*.{name}"
    for name in (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
)


@register_policy("hunyuan_video15")
class HunyuanVideo15Policy(VideoPolicy):
    pipeline_class = "HunyuanVideo15Pipeline"
    default_model = "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v"
    display_name = "HunyuanVideo 1.5"
    default_guidance_scale = 6.0
    default_max_sequence_length = 1000
    guidance_rule = (
        "the pipeline's guider: CFG `v_u + w (v_c - v_u)` against `negative_prompt` (empty), `w` the guider's "
        "`guidance_scale` (6.0; the CFG-distilled checkpoints: 1.0, one pass)"
    )
    time_grid_rule = "`linspace(1, 0, N + 1)[:-1]` shifted by the scheduler's static shift (480p: 5, 720p: 9)"
    default_lora_suffixes = HUNYUAN_VIDEO15_LORA_TARGETS
    default_num_frames = 121  # the pipeline's
    #: frames per second of the released model's videos (its ``generate.py`` writes them at 24)
    default_fps = 24

    def __init__(
        self,
        pipe: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        vae_tiling: bool = True,
        decode_batch: int = 1,
        **kw: Any,
    ) -> None:
        from diffusers import ClassifierFreeGuidance

        guider = getattr(pipe, "guider", None)
        if not isinstance(guider, ClassifierFreeGuidance):
            raise UserError(
                f"the {self.display_name} adapter follows a ClassifierFreeGuidance guider, the pipeline has "
                f"{type(guider).__name__}"
            )
        if guider.config.start != 0.0 or guider.config.stop != 1.0:
            raise UserError(
                f"the pipeline's guider guides only between {guider.config.start} and {guider.config.stop} of the "
                "steps, which this adapter does not reproduce; use a guider that guides every step (start 0, stop 1)"
            )
        #: the guider's ``x_c + w (x_c - x_u)`` (True) or diffusers' ``x_u + w (x_c - x_u)``
        self.original_formulation = bool(guider.config.use_original_formulation)
        self.guidance_rescale = float(guider.config.guidance_rescale)
        if guidance_scale is None:
            off = 0.0 if self.original_formulation else 1.0
            guidance_scale = float(guider.guidance_scale) if guider._enabled else off
        if decode_batch != 1:
            raise UserError(
                f"model option 'decode_batch' must be 1 for {self.display_name}: its VAE decodes one video at a time "
                "(its causal attention mask does not broadcast over a batch)"
            )
        if height is None and width is None:  # the pipeline's default: its 16:9 bucket of the target size
            height, width = pipe.video_processor.calculate_default_height_width(9, 16, pipe.target_size)
        elif height is None or width is None:
            raise UserError("model options 'height' and 'width' go together: give both or neither")
        super().__init__(
            pipe,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            vae_tiling=vae_tiling,
            decode_batch=decode_batch,
            **kw,
        )
        if not vae_tiling:  # (a flag VideoPolicy checked) a pipeline another policy tiled decodes whole again
            pipe.vae.disable_tiling()
        channels = self.latent_channels
        if int(self.model_config.in_channels) != 2 * channels + 1:
            raise UserError(
                f"this {self.display_name} transformer takes {self.model_config.in_channels} input channels; the "
                f"pipeline feeds it {2 * channels + 1} (the VAE's {channels} latent channels, as many condition "
                "channels and a mask)"
            )
        if self._scheduler.config.get("use_dynamic_shifting", False):
            raise UserError(
                f"the {self.display_name} pipeline passes no shift to its scheduler, whose config asks for a dynamic "
                "one (use_dynamic_shifting); use the checkpoint's own scheduler config (a static shift)"
            )

    # ------------------------------------------------------------------ layout

    def _temporal_scale(self) -> int:
        return int(self.pipe.vae_scale_factor_temporal)

    def _spatial_scale(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    def _spatial_multiple(self) -> tuple[int, int]:
        m = self._spatial_scale() * int(self.pipe.transformer.config.patch_size)
        return m, m

    @property
    def vae_scale_factor(self) -> int:
        return self._spatial_scale()

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.num_channels_latents)

    # ------------------------------------------------------------------ guidance

    @property
    def do_cfg(self) -> bool:
        # the guider's rule: no second pass where the combination reduces to the conditional prediction
        return not math.isclose(self.guidance_scale, 0.0 if self.original_formulation else 1.0)

    @property
    def cfg_scale(self) -> float:
        # x_c + w (x_c - x_u) = x_u + (w + 1) (x_c - x_u)
        return self.guidance_scale + 1.0 if self.original_formulation else self.guidance_scale

    # ------------------------------------------------------------------ conditioning and forward

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        embeds, mask = pipe._get_mllm_prompt_embeds(
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            prompt=list(prompts),
            device=pipe.text_encoder.device,
            tokenizer_max_length=self.max_sequence_length,
            system_message=pipe.system_message,
            crop_start=pipe.prompt_template_encode_start_idx,
        )
        glyphs, glyph_mask = pipe._get_byt5_prompt_embeds(
            tokenizer=pipe.tokenizer_2,
            text_encoder=pipe.text_encoder_2,
            prompt=list(prompts),
            device=pipe.text_encoder_2.device,
            tokenizer_max_length=pipe.tokenizer_2_max_length,
        )
        return {
            "prompt_embeds": embeds.to(device=self.device, dtype=self.model_dtype),
            "prompt_embeds_mask": mask.to(device=self.device, dtype=torch.long),
            "prompt_embeds_2": glyphs.to(device=self.device, dtype=self.model_dtype),
            "prompt_embeds_mask_2": glyph_mask.to(device=self.device, dtype=torch.long),
        }

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self._hidden_dtype(x)
        b, c, f, h, w = x.shape
        # text-to-video: the image-condition latents and their mask are zero, as the pipeline feeds them
        hidden = torch.cat([x, x.new_zeros((b, c + 1, f, h, w))], dim=1).to(dtype)
        # no image: zero image tokens, which the transformer masks out; in the weights' dtype, as the pipeline
        # gives them (their layer norm takes no other under autocast on the CPU)
        tokens = int(self.pipe.vision_num_semantic_tokens)
        image_embeds = x.new_zeros((b, tokens, int(self.model_config.image_embed_dim)), dtype=self.model_dtype)
        return self.transformer(
            hidden_states=hidden,
            image_embeds=image_embeds,
            timestep=(t * 1000.0).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_embeds_mask"],
            encoder_hidden_states_2=cond["prompt_embeds_2"],
            encoder_attention_mask_2=cond["prompt_embeds_mask_2"],
            return_dict=False,
        )[0]

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``v = eps - x0`` in float32, guided as the pipeline's guider combines its two passes.

        Both branches run in one forward of ``2B`` rows (every text row has the pipeline's fixed length, so
        each row's prediction is its own pass's); with the guider's ``guidance_rescale`` the combination is
        rescaled toward the conditional prediction's standard deviation.
        """
        from diffusers.guiders.guider_utils import rescale_noise_cfg

        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if not self.do_cfg:
            return self._forward(x, t, cond).float()
        if "negative_prompt_embeds" not in cond:
            raise ValueError("guidance needs the negative_* conditioning from encode_prompts")
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        both = {k: torch.cat([cond[f"negative_{k}"], v]) for k, v in pos.items()}
        v_uncond, v_cond = self._forward(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
        v = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        if self.guidance_rescale > 0.0:
            v = rescale_noise_cfg(v, v_cond, self.guidance_rescale)
        return v

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {"sigmas": np.linspace(1.0, 0.0, num_steps + 1)[:-1]}

    # ------------------------------------------------------------------ decoding

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor
