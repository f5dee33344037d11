"""HPSv2.1 (and HPS v2) as a reward: ``cos(image, prompt)`` under HPS's open_clip ViT-H-14, run on ``transformers``.

The open_clip checkpoint is converted to ``CLIPModel`` on load (:func:`open_clip_to_transformers`:
the two architectures are the same pre-LayerNorm transformer; open_clip's fused attention
projection is split into q, k, v), so neither ``hpsv2`` nor ``open_clip`` is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .base import register_reward
from .clip_models import (
    _TOKENIZER_FILES,
    ClipPreprocess,
    ModelReward,
    _ClipPair,
    _load_into,
    _load_state,
    _load_tokenizer,
)
from .hub import resolve_dir, resolve_file

__all__ = ["HPSv2", "open_clip_to_transformers"]

# ----------------------------------------------------------------------------- HPSv2.1

_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_IGNORED = {"attn_mask", "visual.attn_mask"}


def open_clip_to_transformers(
    state: Mapping[str, torch.Tensor],
    vision_heads: int,
    text_heads: int,
    quick_gelu: bool = False,
    token_ids: Mapping[str, int] | None = None,
) -> tuple[Any, dict[str, torch.Tensor]]:
    """An open_clip CLIP state dict (ViT image tower, default text tower) as a ``CLIPConfig`` and its state dict.

    Sizes are read from the tensors; head counts are not in a state dict and are given
    (ViT-H-14: 16 and 16). ``token_ids`` sets ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``
    of the text config (the text embedding is pooled at the end-of-text token).
    """
    from transformers import CLIPConfig

    required = ["visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection", "ln_final.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"not an open_clip ViT checkpoint: keys {missing} are missing")
    if any(k.startswith("text.") or k.startswith("visual.trunk.") for k in state):
        raise UserError("only open_clip's default ViT image tower and built-in text tower can be converted")
    out: dict[str, torch.Tensor] = {}
    layers = {"visual": set(), "text": set()}
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
            continue
        if key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
            continue
        if key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
            continue
        m = _RESBLOCK.match(key)
        if m is None:
            raise UserError(f"open_clip checkpoint key {key!r} has no counterpart in CLIPModel")
        tower = "visual" if m.group(1) else "text"
        prefix = f"{'vision_model' if tower == 'visual' else 'text_model'}.encoder.layers.{m.group(2)}."
        layers[tower].add(int(m.group(2)))
        rest = m.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            q, k, v = value.chunk(3, dim=0)
            for name, part in zip(("q", "k", "v"), (q, k, v), strict=True):
                out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
        elif rest in _BLOCK_NAMES:
            out[prefix + _BLOCK_NAMES[rest]] = value
        else:
            raise UserError(f"open_clip checkpoint key {key!r} has no counterpart in CLIPModel")
    conv = state["visual.conv1.weight"]
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = math.isqrt(int(state["visual.positional_embedding"].shape[0]) - 1)
    t_width = int(state["ln_final.weight"].shape[0])
    act = "quick_gelu" if quick_gelu else "gelu"
    ids = dict(token_ids or {})
    text_config = {
        "vocab_size": int(state["token_embedding.weight"].shape[0]),
        "hidden_size": t_width,
        "intermediate_size": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": len(layers["text"]),
        "num_attention_heads": text_heads,
        "max_position_embeddings": int(state["positional_embedding"].shape[0]),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(state["text_projection"].shape[1]),
        **{k: int(v) for k, v in ids.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    }
    vision_config = {
        "hidden_size": v_width,
        "intermediate_size": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": len(layers["visual"]),
        "num_attention_heads": vision_heads,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(state["visual.proj"].shape[1]),
    }
    for name, width, heads in (("vision", v_width, vision_heads), ("text", t_width, text_heads)):
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
            raise UserError(f"{name}_heads must be a positive divisor of the {name} width {width}, got {heads!r}")
    config = CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=int(state["visual.proj"].shape[1])
    )
    return config, out


def _model_from_state(config: Any, state: Mapping[str, torch.Tensor], what: str, path: Path) -> nn.Module:
    from transformers import CLIPModel

    model = CLIPModel(config)
    _load_into(model, state, what, path)
    return model


@register_reward("hpsv2")
class HPSv2(ModelReward):
    """HPS v2.1 / v2.0 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preference data.

    ``cos(image, prompt)`` (about 0.2-0.35), exactly the original ``hpsv2.score``. Weights:
    ``HPS_v2.1_compressed.pt`` (``version="2.1"``) or ``HPS_v2_compressed.pt`` (``"2.0"``) of
    ``xswu/HPSv2``, or a local file; tokenizer: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (open_clip's
    BPE). The checkpoint is converted to ``transformers.CLIPModel`` on load, so neither open_clip nor
    torchvision is needed. Preprocessing as HPSv2's ``preprocess_val``: open_clip's ``ResizeMaxSize``
    (longer side to 224, bicubic, black padding to a square).
    """

    _FILES = {"2.1": "HPS_v2.1_compressed.pt", "2.0": "HPS_v2_compressed.pt"}

    def __init__(
        self,
        checkpoint: str = "xswu/HPSv2",
        version: str = "2.1",
        checkpoint_revision: str | None = None,
        tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        tokenizer_revision: str | None = None,
        vision_heads: int = 16,
        text_heads: int = 16,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        if str(version) not in self._FILES:
            raise UserError(f"hpsv2 version must be one of {sorted(self._FILES)}, got {version!r}")
        self.checkpoint, self.version, self.checkpoint_revision = checkpoint, str(version), checkpoint_revision
        self.tokenizer, self.tokenizer_revision = tokenizer, tokenizer_revision
        self.vision_heads, self.text_heads = vision_heads, text_heads
        super().__init__(device, dtype, batch_size)

    def _load(self) -> _ClipPair:
        tok_dir = resolve_dir(self.tokenizer, self.tokenizer_revision, "hpsv2 tokenizer", _TOKENIZER_FILES)
        tokenizer = _load_tokenizer(tok_dir, "hpsv2 tokenizer")
        path = resolve_file(self.checkpoint, self._FILES[self.version], self.checkpoint_revision, "hpsv2 checkpoint")
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        config, state = open_clip_to_transformers(
            _load_state(path, "hpsv2 checkpoint"),
            self.vision_heads,
            self.text_heads,
            token_ids={k: v for k, v in ids.items() if v is not None},
        )
        model = _model_from_state(config, state, "hpsv2 checkpoint", path)
        model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        size = int(config.vision_config.image_size)
        return _ClipPair(model, tokenizer, ClipPreprocess(size, size, "longest"))

    def _score(self, model: _ClipPair, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {self.name or "hpsv2": model.cosine(images, prompts)}
