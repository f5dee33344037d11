"""ImageReward (Xu et al. 2023) on ``transformers``' BLIP classes, without the ``image-reward`` package.

The original model is BLIP's ViT image encoder, BLIP's BERT text encoder with cross-attention to
the image tokens, and an MLP on the text encoder's first token; the score is
``(mlp(feature) - 0.16717362830052426) / 1.0333394966054072``. Its checkpoint (``ImageReward.pt``
of ``THUDM/ImageReward``, next to ``med_config.json``) is renamed onto ``BlipVisionModel`` and
``BlipTextModel`` on load (the same layers; the mapping is transformers' own BLIP conversion).
The tokenizer is ``bert-base-uncased`` with BLIP's two added tokens; prompts are padded to 35
tokens as in the original. The ``image-reward`` package is not needed (it pins a timm that current
open_clip rejects, and imports torchvision).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .base import register_reward
from .clip_models import AestheticMLP, ClipPreprocess, ModelReward, _load_into, _load_state, _load_tokenizer
from .hub import resolve_dir, resolve_file

__all__ = ["ImageReward", "blip_state_to_transformers", "IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD"]

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072

_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
# parts of the checkpoint the score does not use (BLIP's contrastive projections, buffers)
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_UNUSED_SUFFIXES = ("position_ids",)


def blip_state_to_transformers(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an ImageReward checkpoint into ``BlipVisionModel``, ``BlipTextModel`` and MLP state dicts."""
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    mlp: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_UNUSED_PREFIXES) or key.endswith(_UNUSED_SUFFIXES):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in _VIT_TOP:
                vision[_VIT_TOP[rest]] = value
                continue
            m = _BLOCK.match(rest)
            if m is None or m.group(2) not in _VIT_BLOCK:
                raise UserError(f"ImageReward checkpoint key {key!r} has no counterpart in BlipVisionModel")
            vision[f"encoder.layers.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        elif key.startswith("blip.text_encoder."):
            # BLIP's med.py and transformers' BlipTextModel share their parameter names
            text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = value
        else:
            raise UserError(f"ImageReward checkpoint key {key!r} is not part of the model")
    for part, name in ((vision, "image encoder"), (text, "text encoder"), (mlp, "MLP head")):
        if not part:
            raise UserError(f"the ImageReward checkpoint has no {name} weights")
    return vision, text, mlp


def _vision_config(vision: Mapping[str, torch.Tensor], heads: int | None) -> Any:
    from transformers import BlipVisionConfig

    width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    grid = math.isqrt(int(vision["embeddings.position_embedding"].shape[1]) - 1)
    layers = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    heads = width // 64 if heads is None else heads  # BLIP: base 768/12, large 1024/16
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise UserError(f"vision_heads must be a positive divisor of the image width {width}, got {heads!r}")
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )


def _text_config(med: Mapping[str, Any], encoder_width: int) -> Any:
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise UserError("med_config.json must describe BLIP's text encoder with cross-attention")
    return BlipTextConfig(
        vocab_size=int(med["vocab_size"]),
        hidden_size=int(med["hidden_size"]),
        encoder_hidden_size=encoder_width,
        intermediate_size=int(med["intermediate_size"]),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med["max_position_embeddings"]),
        hidden_act=str(med.get("hidden_act", "gelu")),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.0)),
        attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.0)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        is_decoder=True,  # builds the cross-attention layers; the forward pass runs bidirectionally
    )


class _ImageRewardModel(nn.Module):
    def __init__(self, vision: nn.Module, text: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vision.parameters()).dtype
        image_embeds = self.vision(pixel_values=pixels.to(dtype)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        features = out.last_hidden_state[:, 0, :].float()
        return (self.mlp(features)[:, 0] - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


@register_reward("imagereward")
class ImageReward(ModelReward):
    """ImageReward: a BLIP model trained on 137k expert comparisons of generated images (prompt fidelity and looks).

    Scores are standardised over the training comparisons (mean 0, std 1 there). Weights:
    ``ImageReward.pt`` and ``med_config.json`` of ``THUDM/ImageReward`` (or a local directory with
    both); tokenizer: ``google-bert/bert-base-uncased``. Preprocessing as the original: torchvision
    ``Resize(224, bicubic)`` + ``CenterCrop(224)`` with the OpenAI CLIP constants.
    """

    def __init__(
        self,
        model: str = "THUDM/ImageReward",
        revision: str | None = None,
        tokenizer: str = "google-bert/bert-base-uncased",
        tokenizer_revision: str | None = None,
        vision_heads: int | None = None,
        max_length: int = 35,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        self.source, self.revision = model, revision
        self.tokenizer, self.tokenizer_revision = tokenizer, tokenizer_revision
        self.vision_heads, self.max_length = vision_heads, int(max_length)
        super().__init__(device, dtype, batch_size)

    def _load(self) -> tuple[_ImageRewardModel, Any, ClipPreprocess]:
        from transformers import BlipTextModel, BlipVisionModel

        ckpt = resolve_file(self.source, "ImageReward.pt", self.revision, "imagereward checkpoint")
        med_path = resolve_file(self.source, "med_config.json", self.revision, "imagereward med_config")
        try:
            med = json.loads(Path(med_path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"imagereward: cannot read {str(med_path)!r} ({exc})") from None
        vision_sd, text_sd, mlp_sd = blip_state_to_transformers(_load_state(ckpt, "imagereward checkpoint"))
        vcfg = _vision_config(vision_sd, self.vision_heads)
        vision = BlipVisionModel(vcfg)
        _load_into(vision, vision_sd, "imagereward image encoder", ckpt)
        text = BlipTextModel(_text_config(med, vcfg.hidden_size), add_pooling_layer=False)
        _load_into(text, text_sd, "imagereward text encoder", ckpt)
        mlp = AestheticMLP(int(mlp_sd["layers.0.weight"].shape[1]))
        _load_into(mlp, mlp_sd, "imagereward MLP head", ckpt)
        model = _ImageRewardModel(vision.to(self.dtype), text.to(self.dtype), mlp)
        model = model.to(self.device).eval().requires_grad_(False)
        tok_dir = resolve_dir(self.tokenizer, self.tokenizer_revision, "imagereward tokenizer", ["*.json", "*.txt"])
        tokenizer = _load_tokenizer(tok_dir, "imagereward tokenizer")
        # BLIP's init_tokenizer: [DEC] as bos, [ENC] as an extra special token (vocabulary 30524)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        size = int(vcfg.image_size)
        return model, tokenizer, ClipPreprocess(size, size, "shortest", "round")

    def _score(self, model: Any, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        net, tokenizer, prep = model
        tokens = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tokens["input_ids"].to(images.device)
        mask = tokens["attention_mask"].to(images.device)
        return {self.name or "imagereward": net(prep(images), ids, mask)}
