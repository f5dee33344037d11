"""Qwen-Image-Edit (``QwenImageEditPlusPipeline``: Qwen-Image-Edit-2509 / 2511) as a policy.

A subclass of Qwen-Image's adapter (:mod:`.qwen_image`), whose layout, guidance, time grid and
decoding it keeps: the noise ``(C, H/8, W/8)`` (the pipeline's ``(1, C, H/8, W/8)`` with the frame
axis dropped: the same numbers for the same seed), packed into 2x2 patch tokens inside the
velocity; the timestep is the sigma itself. The source image conditions twice, as in the
pipeline: resized to ``condition_area`` pixels (384^2 in the pipeline) at its aspect ratio, it goes
to the Qwen2.5-VL text encoder with the instruction, in the pipeline's template ("Picture 1:
<image>" before the instruction; the last hidden state, the template's first 64 tokens dropped);
resized to ``vae_area`` pixels (1024^2), it is VAE-encoded (the mode, standardised per channel) and
its packed tokens are appended to the noisy ones, its shape given to the transformer's RoPE (and,
for ``zero_cond_t`` checkpoints such as 2511, its timestep zeroed by the transformer itself). Rows
whose source images give token grids of another size go through the transformer in separate
calls, one per grid size; texts of different lengths are padded under the mask.

Guidance is the pipeline's true CFG: ``guidance_scale`` is its ``true_cfg_scale`` (4.0 by default)
against ``negative_prompt`` (" ", encoded with the same source image), the combination rescaled token
by token to the conditional prediction's norm, in rollouts and training alike. The time grid is
``linspace(1, 1/N, N)`` shifted by ``exp(mu)``, ``mu`` linear in the number of output tokens, then
stretched by the scheduler to end at its ``shift_terminal``. The output size is ``height`` x
``width`` as given; the pipeline's own text is not cut, so ``max_sequence_length`` is not used.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from .edit import by_source_grid, edit_key, padded_rows, source_image
from .qwen_image import QwenImagePolicy
from .registry import register_policy

__all__ = ["QwenImageEditPlusPolicy"]


def _pipeline_module() -> Any:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    return pipeline_qwenimage_edit_plus


@register_policy("qwen_image_edit")
class QwenImageEditPlusPolicy(QwenImagePolicy):
    pipeline_class = "QwenImageEditPlusPipeline"
    default_model = "Qwen/Qwen-Image-Edit-2509"
    display_name = "Qwen-Image-Edit"
    guidance_rule = (
        'true CFG 4.0 against `" "` (with the source image), the combination rescaled token by token to the '
        "conditional prediction's norm"
    )
    time_grid_rule = (
        "`mu` linear in the number of output image tokens, stretched to end at the scheduler's `shift_terminal`"
    )
    edits_images = True
    #: the pipeline's own text is not cut: ``max_sequence_length`` is not used, so not bounded either
    max_text = None
    load_requires = (
        ("torchvision", "the pipeline's Qwen2VLProcessor needs torchvision here: pip install torchvision"),
    )

    def __init__(
        self,
        pipe: Any,
        *,
        condition_area: int | None = None,
        vae_area: int | None = None,
        **kw: Any,
    ) -> None:
        module = _pipeline_module()
        self.condition_area = self._area("condition_area", condition_area, module.CONDITION_IMAGE_SIZE)
        self.vae_area = self._area("vae_area", vae_area, module.VAE_IMAGE_SIZE)
        super().__init__(pipe, **kw)
        #: source image path -> (the text encoder's resized image, VAE tokens (n, 4C), token grid (h, w)); this
        #: cache and the next are kept in host memory (a prompt set's sources need not fit beside the model)
        self._sources: dict[str, tuple[Any, torch.Tensor, tuple[int, int]]] = {}
        #: source image path -> the negative prompt's embeddings with that image
        self._negatives: dict[str, torch.Tensor] = {}

    @staticmethod
    def _area(name: str, value: Any, default: int) -> int:
        if value is None:
            return int(default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 32 * 32:
            raise UserError(f"model option {name!r} must be a number of pixels >= 1024 (32 x 32), got {value!r}")
        return value

    # ------------------------------------------------------------------ the source image

    def source_sizes(self, image: Any) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((height, width) for the text encoder, (height, width) for the VAE)`` of a source image (PIL)."""
        module = _pipeline_module()
        ratio = image.width / image.height
        cw, ch = module.calculate_dimensions(self.condition_area, ratio)
        vw, vh = module.calculate_dimensions(self.vae_area, ratio)
        if min(cw, ch, vw, vh) < 32:
            raise UserError(
                f"{self.display_name} cannot take a source image of {image.height}x{image.width} pixels: its aspect "
                "ratio is too far from square for the pipeline's resize (a side rounds to 0)"
            )
        return (int(ch), int(cw)), (int(vh), int(vw))

    def _source(self, prompt: Any) -> tuple[Any, torch.Tensor, tuple[int, int]]:
        key = str(prompt.image)
        if key not in self._sources:
            pipe = self.pipe
            image = source_image(prompt)
            (ch, cw), (vh, vw) = self.source_sizes(image)
            condition = pipe.image_processor.resize(image, ch, cw)
            pixels = pipe.image_processor.preprocess(image, vh, vw).unsqueeze(2)
            with torch.no_grad():
                latents = pipe._encode_vae_image(pixels.to(device=pipe.vae.device, dtype=self.model_dtype), None)
            _, c, _, h, w = latents.shape
            tokens = pipe._pack_latents(latents, 1, c, h, w)[0]
            self._sources[key] = (condition, tokens.to(device="cpu", dtype=self.model_dtype), (h // 2, w // 2))
        return self._sources[key]

    def _text(self, text: str, condition: Any) -> torch.Tensor:
        """The text encoder's embeddings ``(L, D)`` of one text with its condition image (the pipeline's call)."""
        embeds, _ = self.pipe.encode_prompt(prompt=[text], image=[condition], device=self.pipe.text_encoder.device)
        return embeds[0].to(device=self.device, dtype=self.model_dtype)

    # ------------------------------------------------------------------ conditioning

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # Never called: this adapter's encode_prompts (below) encodes each (instruction, image) pair itself,
        # and the negative prompt with its image. The text-only encoding inherited from Qwen-Image would drop
        # the source image from the text encoder's input, so a call that reaches it is a bug, not a fallback.
        raise TypeError(f"{type(self).__name__} encodes prompts with their source images in encode_prompts")

    def encode_prompts(self, prompts: Any) -> dict[str, torch.Tensor]:
        """Conditioning ``(B, ...)``: each distinct (instruction, image) through the text encoder once, each
        distinct image through the VAE once (and, with CFG, with the negative prompt once)."""
        prompts = self._checked_prompts(prompts)
        texts: dict[tuple[str, str], torch.Tensor] = {}
        with torch.no_grad():
            for p in prompts:
                if edit_key(p) not in texts:
                    texts[edit_key(p)] = self._text(str(p), self._source(p)[0])
            sources = [self._source(p) for p in prompts]
            embeds, mask = padded_rows([texts[edit_key(p)] for p in prompts], self.device, self.model_dtype)
            tokens, _ = padded_rows([tokens for _, tokens, _ in sources], self.device, self.model_dtype)
            cond = {
                "prompt_embeds": embeds,
                "prompt_embeds_mask": mask,
                "image_latents": tokens,
                "image_grid": torch.tensor([grid for _, _, grid in sources], device=self.device, dtype=torch.long),
            }
            if self.do_cfg:
                for p in prompts:
                    key = str(p.image)
                    if key not in self._negatives:
                        self._negatives[key] = self._text(self.negative_prompt, self._source(p)[0]).cpu()
                neg, neg_mask = padded_rows(
                    [self._negatives[str(p.image)] for p in prompts], self.device, self.model_dtype
                )
                cond.update(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
        return cond

    # ------------------------------------------------------------------ forward

    def _tokens(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's prediction at the noisy tokens ``(B, n, 4C)``, one call per source grid size (the
        source's tokens and grid from ``cond``)."""
        tokens = self._pack(x).to(self._hidden_dtype(x))
        n = tokens.shape[1]
        _, h, w = self.latent_shape

        def run(grid: list[int], rows: torch.Tensor) -> torch.Tensor:
            text, text_mask = self._trimmed(embeds[rows], mask[rows])  # up to the group's longest prompt
            return self.transformer(
                hidden_states=torch.cat(
                    [tokens[rows], cond["image_latents"][rows, : grid[0] * grid[1]].to(tokens.dtype)], dim=1
                ),
                timestep=t[rows],
                guidance=None,
                encoder_hidden_states_mask=text_mask,
                encoder_hidden_states=text,
                img_shapes=[[(1, h // 2, w // 2), (1, *grid)]] * rows.numel(),
                return_dict=False,
            )[0][:, :n]

        return by_source_grid(cond["image_grid"], run)
