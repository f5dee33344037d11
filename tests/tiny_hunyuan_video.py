"""A tiny HunyuanVideo 1.5 text-to-video pipeline, built offline from config classes with random weights.

The components are the real pipeline's classes at toy sizes: the Qwen2.5-VL text model (3 layers of 16) on a
byte-level tokenizer with Qwen's chat template, the ByT5 glyph encoder (``T5EncoderModel`` on the built-in
``ByT5Tokenizer``), the HunyuanVideo 1.5 transformer (4 latent channels, so its input is 4 + 4 condition + 1 mask
channels), its causal video VAE (4x spatial, 4x temporal compression, so ``num_frames`` must be ``4k + 1``), the
scheduler of the 480p checkpoints (a static shift of 5) and their guider (CFG at 6).
``save_pipeline`` writes a directory that loads back through ``from_pretrained`` like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import tiny_pipelines as tp

__all__ = ["BUILDERS", "FRAMES", "HEIGHT", "WIDTH", "adapter_options", "hunyuan_video15_pipeline", "save_pipeline"]

#: video size of the tests: 5 frames (two latent frames), not square, so that a transposed layout would show
FRAMES, HEIGHT, WIDTH = 5, 16, 8


def hunyuan_video15_pipeline(guidance_scale: float = 6.0, shift: float = 5.0, seed: int = 0):
    """HunyuanVideo 1.5 text-to-video in miniature (the 480p checkpoints' scheduler and guider settings)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tok = tp.qwen_tokenizer()
    text = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2}
    text.update(num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=2048, rope_theta=1e6)
    text.update(bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    text.update(eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
    torch.manual_seed(seed + 1)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**text)).eval()
    tok_2 = ByT5Tokenizer()
    t5 = T5Config(vocab_size=len(tok_2), d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2)
    t5.update({"relative_attention_num_buckets": 8, "decoder_start_token_id": 0, "pad_token_id": 0})
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(t5).eval()
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # 4 latent channels, 4 of the (zero) condition latents, 1 of the (zero) condition mask
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=16,
        image_embed_dim=8,
        rope_axes_dim=(2, 2, 4),
        target_size=32,
        task_type="t2v",
    ).eval()
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=4,
        scaling_factor=0.8,
    ).eval()
    return HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )


def adapter_options(kind: str = "hunyuan_video15", **extra) -> dict:
    """Model options that fit the tiny pipeline (its video size)."""
    opts: dict = {"num_frames": FRAMES, "height": HEIGHT, "width": WIDTH}
    if kind == "hunyuan_video15_distilled":
        opts["guidance_scale"] = 1.0
    opts.update(extra)
    return opts


#: builder of each tiny pipeline; ``hunyuan_video15_distilled``: the CFG-distilled checkpoints' guider (scale 1)
BUILDERS = {
    "hunyuan_video15": hunyuan_video15_pipeline,
    "hunyuan_video15_distilled": lambda **kw: hunyuan_video15_pipeline(guidance_scale=1.0, **kw),
}


def save_pipeline(kind: str, directory: str | Path, **kwargs) -> Path:
    """Build the tiny pipeline ``kind`` and save it (safetensors) to ``directory``."""
    return tp.save_pipeline(kind, directory, builders=BUILDERS, **kwargs)
