"""The transformer layers LoRA adapts, as name suffixes shared by the adapters of one block family.

The diffusers MMDiT-style transformers (SD3, FLUX.1, FLUX.2, Qwen-Image, ...) name their joint
attention alike: the image stream's ``attn.to_q/k/v/out.0`` and the text stream's
``attn.add_q/k/v_proj`` and ``attn.to_add_out``. An adapter composes its default from these.
"""

from __future__ import annotations

__all__ = ["JOINT_ATTENTION", "IMAGE_ATTENTION", "TEXT_ATTENTION", "FLUX1_FEED_FORWARD", "QWEN_IMAGE_FEED_FORWARD"]

#: the image stream's attention projections (``attn.to_out`` is a ModuleList: ``.0`` is its Linear)
IMAGE_ATTENTION: tuple[str, ...] = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
#: the text (context) stream's attention projections of a double-stream block
TEXT_ATTENTION: tuple[str, ...] = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
#: both streams' attention projections (Flow-GRPO's SD3.5 targets)
JOINT_ATTENTION: tuple[str, ...] = (*IMAGE_ATTENTION, *TEXT_ATTENTION)
#: the GELU feed-forward of both streams in diffusers' ``FeedForward`` (FLUX.1, SD3)
FLUX1_FEED_FORWARD: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
#: the GELU feed-forward of both streams of a Qwen-Image block (``img_mlp``, ``txt_mlp``: Qwen-Image and its
#: editing models share the transformer)
QWEN_IMAGE_FEED_FORWARD: tuple[str, ...] = (
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
