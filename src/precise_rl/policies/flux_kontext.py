"""FLUX.1 Kontext (``FluxKontextPipeline``: instruction editing) as a policy.

Everything FLUX.1 has (:mod:`.flux`): the noise layout ``(C, H/8, W/8)`` packed into 2x2 patch
tokens, the sigma as timestep, the guidance embedding (``guidance_scale``, one pass) and the time
grid ``linspace(1, 1/N, N)`` shifted by ``exp(mu)`` with ``mu`` linear in the number of *output*
tokens. On top, each prompt's source image is encoded as the pipeline does: resized to the
preferred Kontext resolution of the nearest aspect ratio (``auto_resize``, the pipeline's
``_auto_resize``; off: the image's own size), floored to a multiple of 16 pixels, VAE-encoded
(the distribution's mode), shifted and scaled, and packed into tokens. These tokens are appended
to the sequence after the noisy tokens, with position ids whose first coordinate is 1; the
velocity is the output at the noisy tokens. Rows whose source images give token grids of another
size go through the transformer in separate calls (one per grid size).

The output size is ``height`` x ``width`` as given (the pipeline's with ``max_area = height *
width``). ``true_cfg_scale`` > 1 adds the pipeline's true classifier-free guidance against
``negative_prompt`` (both branches see the source image); off by default, as in the pipeline.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UserError
from .edit import by_source_grid, padded_rows, source_image
from .flux import Flux1Policy
from .registry import register_policy

__all__ = ["FluxKontextPolicy"]


@register_policy("flux1_kontext")
class FluxKontextPolicy(Flux1Policy):
    pipeline_class = "FluxKontextPipeline"
    default_model = "black-forest-labs/FLUX.1-Kontext-dev"
    display_name = "FLUX.1 Kontext"
    default_guidance_scale = 3.5  # the pipeline's default (recipes use 2.5, as Flow-GRPO's Kontext config)
    guidance_rule = (
        "guidance embedding (3.5), one pass; `true_cfg_scale > 1` adds the pipeline's true CFG against "
        "`negative_prompt`"
    )
    time_grid_rule = "FLUX.1's: `mu` linear in the number of output image tokens"
    edits_images = True

    def __init__(self, pipe: Any, *, true_cfg_scale: float = 1.0, auto_resize: bool = True, **kw: Any) -> None:
        if not isinstance(true_cfg_scale, int | float) or isinstance(true_cfg_scale, bool):
            raise UserError(f"model option 'true_cfg_scale' must be a number >= 0, got {true_cfg_scale!r}")
        if not math.isfinite(true_cfg_scale) or true_cfg_scale < 0:
            raise UserError(f"model option 'true_cfg_scale' must be a finite number >= 0, got {true_cfg_scale!r}")
        if not isinstance(auto_resize, bool):
            raise UserError(f"model option 'auto_resize' must be true or false, got {auto_resize!r}")
        self.true_cfg_scale = float(true_cfg_scale)
        self.auto_resize = auto_resize
        super().__init__(pipe, **kw)
        #: source image path -> (packed latent tokens (n, 4C), token grid (h, w)), encoded once per policy and
        #: kept in host memory (a prompt set's sources need not all fit beside the model)
        self._sources: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}

    @property
    def do_cfg(self) -> bool:
        return self.true_cfg_scale > 1.0

    @property
    def cfg_scale(self) -> float:
        return self.true_cfg_scale

    # ------------------------------------------------------------------ the source image

    def source_size(self, image: Any) -> tuple[int, int]:
        """``(height, width)`` in pixels the pipeline resizes a source image (a PIL image) to."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        height, width = self.pipe.image_processor.get_default_height_width(image)
        if self.auto_resize:
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        m = self._pixel_multiple()
        height, width = height // m * m, width // m * m
        if height < m or width < m:
            raise UserError(
                f"{self.display_name} cannot take a source image of {image.height}x{image.width} pixels: "
                f"it must be at least {m} pixels a side"
            )
        return height, width

    def _source_tokens(self, prompt: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        key = str(prompt.image)
        if key not in self._sources:
            pipe = self.pipe
            image = source_image(prompt)
            height, width = self.source_size(image)
            pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, height, width), height, width)
            vae = pipe.vae
            with torch.no_grad():
                latents = pipe._encode_vae_image(pixels.to(device=vae.device, dtype=self.model_dtype), generator=None)
            _, c, h, w = latents.shape
            tokens = pipe._pack_latents(latents, 1, c, h, w)[0]
            self._sources[key] = (tokens.to(device="cpu", dtype=self.model_dtype), (h // 2, w // 2))
        return self._sources[key]

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text embeddings of each distinct instruction and latent tokens of each distinct source image."""
        texts = list(dict.fromkeys(str(p) for p in prompts))
        table = super()._encode_unique(texts)
        rows = torch.tensor([texts.index(str(p)) for p in prompts], device=self.device)
        cond = {k: v.index_select(0, rows) for k, v in table.items()}
        if not any(getattr(p, "image", None) is not None for p in prompts):
            return cond  # the negative prompt: its branch shares the source image tokens
        sources = [self._source_tokens(p) for p in prompts]
        cond["image_latents"], _ = padded_rows([tokens for tokens, _ in sources], self.device, self.model_dtype)
        cond["image_grid"] = torch.tensor([grid for _, grid in sources], device=self.device, dtype=torch.long)
        return cond

    # ------------------------------------------------------------------ forward

    def _source_ids(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Position ids of the source tokens: the latent grid's, first coordinate 1 (the pipeline's ``image_ids``)."""
        h, w = grid
        ids = torch.zeros(h, w, 3)
        ids[..., 0] = 1
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = self._pack(x).to(self.model_dtype)
        n = tokens.shape[1]

        def run(grid: list[int], rows: torch.Tensor) -> torch.Tensor:
            part = {k: v.index_select(0, rows) for k, v in cond.items()} if rows.numel() < x.shape[0] else cond
            embeds = part["prompt_embeds"]
            guidance = None
            if self.model_config.guidance_embeds:
                guidance = torch.full((rows.numel(),), self.guidance_scale, device=x.device, dtype=torch.float32)
            ids = [self._ids(x.device, self.model_dtype), self._source_ids(grid, x.device, self.model_dtype)]
            return self.transformer(
                hidden_states=torch.cat(
                    [tokens[rows], part["image_latents"][:, : grid[0] * grid[1]].to(tokens.dtype)], dim=1
                ),
                timestep=t[rows],
                guidance=guidance,
                pooled_projections=part["pooled_prompt_embeds"],
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.model_dtype),
                img_ids=torch.cat(ids),
                return_dict=False,
            )[0][:, :n]

        return self._unpack(by_source_grid(cond["image_grid"], run))
