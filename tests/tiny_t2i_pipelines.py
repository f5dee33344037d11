"""Tiny text-to-image pipelines of the newer model families (FLUX.2 dev, FLUX.2 Klein 9B's shape,
Qwen-Image, Z-Image), built offline from config classes with random weights.

Tokenizers are byte-level BPE vocabularies without merges (one token per byte), as in
``tiny_pipelines.py``; each carries a chat template in its model's shape. ``save_pipeline``
writes a directory that loads back through ``from_pretrained`` like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import tiny_pipelines as tp
from .tiny_pipelines import HEIGHT, WIDTH, flux2_klein_pipeline, qwen_tokenizer

__all__ = [
    "BUILDERS",
    "HEIGHT",
    "WIDTH",
    "adapter_options",
    "flux2_dev_pipeline",
    "flux2_klein_9b_pipeline",
    "mistral_tokenizer",
    "qwen_image_pipeline",
    "z_image_pipeline",
    "save_pipeline",
]

# Mistral's chat layout: the system message and the user's text between control tokens.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}[/INST]"
    "{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """A byte-level tokenizer with Mistral's control tokens and a chat template of content lists.

    FLUX.2 dev ships a ``PixtralProcessor``, whose image half needs torchvision; the pipeline only
    calls its ``apply_chat_template``, which a tokenizer has with the same arguments.
    """
    from transformers import Qwen2Tokenizer

    specials = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tok = Qwen2Tokenizer(
        vocab=tp.byte_vocab(specials),
        merges=[],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=specials[3:],
    )
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def flux2_dev_pipeline(guidance_embeds: bool = True, seed: int = 0):
    """FLUX.2 dev in miniature: a Mistral3 text encoder (3 layers of 16), the Flux2 transformer with its
    guidance embedding, the Flux2 VAE with batch-norm statistics."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = mistral_tokenizer()
    transformer = tp.flux2_transformer(48, guidance_embeds, seed)  # 3 text-encoder layers x hidden 16
    text = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2}
    text.update(num_key_value_heads=1, head_dim=8, vocab_size=len(tok), max_position_embeddings=512)
    vision = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update(head_dim=8, patch_size=4, image_size=16)
    cfg = Mistral3Config(
        text_config={"model_type": "mistral", **text},
        vision_config={"model_type": "pixtral", **vision},
        image_token_index=len(tok) - 1,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Mistral3ForConditionalGeneration(cfg).eval()
    return Flux2Pipeline(
        scheduler=tp.flux2_scheduler(),
        vae=tp.flux2_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def flux2_klein_9b_pipeline(is_distilled: bool = False, seed: int = 0):
    """FLUX.2 Klein in the 9B checkpoints' shape: relative to the 4B, a wider text encoder (Qwen3-8B's
    hidden 4096 against Qwen3-4B's 2560, so a joint_attention_dim of 3 x 4096), more double-stream
    blocks and attention heads; the distilled 9B's model_index.json sets ``is_distilled``."""
    pipe = flux2_klein_pipeline(seed=seed)
    wider = {"intermediate_size": 40, "hidden_size": 24, "num_attention_heads": 3, "num_key_value_heads": 1}
    pipe.register_modules(
        text_encoder=tp.qwen3_text_encoder(len(pipe.tokenizer), seed + 1, **wider),
        transformer=tp.flux2_transformer(72, False, seed, num_layers=2, heads=3),
    )
    pipe.register_to_config(is_distilled=is_distilled)
    return pipe


def qwen_image_pipeline(seed: int = 0):
    """Qwen-Image in miniature: a Qwen2.5-VL text encoder (2 layers of 16), the Qwen-Image transformer
    (2x2 patches of 4 latent channels), the Qwen-Image video VAE with per-channel statistics, and
    Qwen-Image's scheduler config (dynamic shift from 0.5 to 0.9, stretched to end at 0.02)."""
    from diffusers import QwenImagePipeline

    tok = qwen_tokenizer()
    transformer = tp.qwen_image_transformer(seed)
    text_encoder = tp.qwen2_5_vl_text_encoder(tok, seed + 1, max_position_embeddings=512)
    return QwenImagePipeline(
        scheduler=tp.qwen_image_scheduler(),
        vae=tp.qwen_image_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def z_image_pipeline(turbo: bool = False, seed: int = 0):
    """Z-Image in miniature: a Qwen3 text encoder (3 layers of 16), the Z-Image transformer (one main
    layer, one noise and one caption refiner), AutoencoderKL with a shift and a scale. ``turbo``:
    Z-Image-Turbo's scheduler (a static shift of 3); otherwise a dynamic shift, so that the pipeline's
    ``mu`` matters."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],  # head dim 16
        axes_lens=[512, 32, 32],
    ).eval()
    text_encoder = tp.qwen3_text_encoder(len(tok), seed + 1, max_position_embeddings=512, causal_lm=False)
    vae = tp.autoencoder_kl(seed + 2, 4, shift_factor=0.1159, scaling_factor=0.3611)
    if turbo:  # Z-Image-Turbo's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    else:
        scheduler = tp.flux_scheduler()
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def adapter_options(kind: str, **extra) -> dict:
    """Model options that fit the tiny pipelines (the tiny text encoders' layers, text lengths that keep
    the prompt after each model's template)."""
    opts: dict = {"height": HEIGHT, "width": WIDTH}
    if kind == "flux2_dev":  # the system message takes 182 of the byte tokens
        opts.update(text_encoder_out_layers=[1, 2, 3], max_sequence_length=200)
    elif kind == "flux2_klein_9b":
        opts.update(text_encoder_out_layers=[1, 2, 3], max_sequence_length=40)
    elif kind == "qwen_image":  # the template's system part is longer in bytes than the 34 tokens it drops
        opts.update(max_sequence_length=160)
    elif kind == "z_image":  # the chat template takes 34 of the byte tokens
        opts.update(max_sequence_length=64)
    elif kind == "z_image_turbo":  # distilled: no guidance
        opts.update(max_sequence_length=64, guidance_scale=0.0)
    opts.update(extra)
    return opts


#: builder of each tiny pipeline, by the adapter name that drives it (``flux2_klein_9b``: Klein's adapter)
BUILDERS = {
    "flux2_dev": flux2_dev_pipeline,
    "flux2_klein_9b": flux2_klein_9b_pipeline,
    "qwen_image": qwen_image_pipeline,
    "z_image": z_image_pipeline,
    "z_image_turbo": lambda **kw: z_image_pipeline(turbo=True, **kw),
}
#: the adapter that drives each tiny pipeline
ADAPTER = {"flux2_dev": "flux2_dev", "flux2_klein_9b": "flux2_klein", "qwen_image": "qwen_image"}
ADAPTER.update(z_image="z_image", z_image_turbo="z_image")


def save_pipeline(kind: str, directory: str | Path, **kwargs) -> Path:
    """Build the tiny pipeline ``kind`` and save it (safetensors) to ``directory``."""
    return tp.save_pipeline(kind, directory, builders=BUILDERS, **kwargs)
