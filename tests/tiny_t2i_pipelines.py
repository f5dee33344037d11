"""Tiny text-to-image pipelines of the newer model families (FLUX.2 dev, FLUX.2 Klein 9B's shape,
Qwen-Image, Z-Image), built offline from config classes with random weights.

Tokenizers are byte-level BPE vocabularies without merges (one token per byte), as in
``tiny_pipelines.py``; each carries a chat template in its model's shape. ``save_pipeline``
writes a directory that loads back through ``from_pretrained`` like a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny_pipelines import HEIGHT, WIDTH, _vae_blocks, flux2_klein_pipeline, qwen_tokenizer

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


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    return vocab


def mistral_tokenizer():
    """A byte-level tokenizer with Mistral's control tokens and a chat template of content lists.

    FLUX.2 dev ships a ``PixtralProcessor``, whose image half needs torchvision; the pipeline only
    calls its ``apply_chat_template``, which a tokenizer has with the same arguments.
    """
    from transformers import Qwen2Tokenizer

    specials = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tok = Qwen2Tokenizer(
        vocab=_byte_vocab(specials),
        merges=[],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=specials[3:],
    )
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def _flux2_transformer(joint_attention_dim: int, guidance_embeds: bool, seed: int, num_layers: int = 1, heads: int = 2):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=8,  # 2 latent channels x a 2x2 patch
        num_layers=num_layers,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,
    ).eval()


def _flux2_vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        latent_channels=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **_vae_blocks(2),
    ).eval()
    with torch.no_grad():  # non-trivial normalisation statistics, so that decoding exercises them
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def _flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.2's scheduler config (dynamic shifting; the pipeline computes mu itself)
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"
    )


def flux2_dev_pipeline(guidance_embeds: bool = True, seed: int = 0):
    """FLUX.2 dev in miniature: a Mistral3 text encoder (3 layers of 16), the Flux2 transformer with its
    guidance embedding, the Flux2 VAE with batch-norm statistics."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = mistral_tokenizer()
    transformer = _flux2_transformer(48, guidance_embeds, seed)  # 3 text-encoder layers x hidden 16
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
        scheduler=_flux2_scheduler(),
        vae=_flux2_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def flux2_klein_9b_pipeline(is_distilled: bool = False, seed: int = 0):
    """FLUX.2 Klein in the 9B checkpoints' shape: relative to the 4B, a wider text encoder (Qwen3-8B's
    hidden 4096 against Qwen3-4B's 2560, so a joint_attention_dim of 3 x 4096), more double-stream
    blocks and attention heads; the distilled 9B's model_index.json sets ``is_distilled``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pipe = flux2_klein_pipeline(seed=seed)
    qcfg = Qwen3Config(
        intermediate_size=40,
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=len(pipe.tokenizer),
        max_position_embeddings=128,
    )
    torch.manual_seed(seed + 1)
    pipe.register_modules(
        text_encoder=Qwen3ForCausalLM(qcfg).eval(),
        transformer=_flux2_transformer(72, False, seed, num_layers=2, heads=3),
    )
    pipe.register_to_config(is_distilled=is_distilled)
    return pipe


def qwen_image_pipeline(seed: int = 0):
    """Qwen-Image in miniature: a Qwen2.5-VL text encoder (2 layers of 16), the Qwen-Image transformer
    (2x2 patches of 4 latent channels), the Qwen-Image video VAE with per-channel statistics, and
    Qwen-Image's scheduler config (dynamic shift from 0.5 to 0.9, stretched to end at 0.02)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    ids = {
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
    }
    text = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2}
    text.update(num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=512, rope_theta=1e6, **ids)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": 16}
    vision.update(patch_size=4, spatial_merge_size=1, temporal_patch_size=1)
    torch.manual_seed(seed + 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1],  # one spatial downsampling: a VAE factor of 2
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.7, 1.2, 2.0],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def z_image_pipeline(turbo: bool = False, seed: int = 0):
    """Z-Image in miniature: a Qwen3 text encoder (3 layers of 16), the Z-Image transformer (one main
    layer, one noise and one caption refiner), AutoencoderKL with a shift and a scale. ``turbo``:
    Z-Image-Turbo's scheduler (a static shift of 3); otherwise a dynamic shift, so that the pipeline's
    ``mu`` matters."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

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
    qcfg = Qwen3Config(
        intermediate_size=24,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tok),
        max_position_embeddings=512,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(qcfg).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        **_vae_blocks(2),
    ).eval()
    if turbo:  # Z-Image-Turbo's scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=4,
            max_image_seq_len=64,
        )
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
    directory = Path(directory)
    BUILDERS[kind](**kwargs).save_pretrained(str(directory), safe_serialization=True)
    return directory
