"""Tiny diffusers pipelines built offline from config classes, for the adapter tests.

Every component (transformer, VAE, text encoders, tokenizers) is constructed here from a
config with random weights; tokenizers come from small in-memory vocabularies. The component
builders (``autoencoder_kl``, ``qwen3_text_encoder``, ``flux2_*``, ``qwen_image_*`` ...) also build
the pipelines of ``tiny_t2i_pipelines.py`` and ``tiny_edit_pipelines.py``. ``save_pipeline``
writes a pipeline directory that loads back through ``from_pretrained`` like a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A chat template in Qwen's shape; FLUX.2 Klein applies it to every prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")


def byte_vocab(specials: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary (one token per byte) followed by ``specials``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    return vocab


def qwen_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte, plus Qwen's special tokens."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Qwen2Tokenizer(vocab=byte_vocab(specials), merges=[], additional_special_tokens=specials[1:])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def clip_tokenizer(max_length: int = 16):
    """A character-level CLIP BPE tokenizer (lower-case letters, digits, punctuation)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer():
    """A character-level unigram tokenizer in T5's layout (pad 0, eos 1, unk 2)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in _CHARS] + [("\u2581" + ch, -3.5) for ch in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_text_encoder(vocab_size: int, max_length: int, seed: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
        projection_dim=16,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def _t5_encoder(vocab_size: int, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=24,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


def _vae_blocks(scale: int) -> dict:
    """``AutoencoderKL`` settings with ``scale`` = 2 ** (blocks - 1) downsampling."""
    n = {1: 1, 2: 2, 4: 3}[scale]
    return {
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": (4,) * n,
        "layers_per_block": 1,
        "norm_num_groups": 1,
    }


def autoencoder_kl(seed: int, latent_channels: int, shift_factor: float, scaling_factor: float, vae_scale: int = 2):
    """An ``AutoencoderKL`` of 32-pixel samples with the model's latent channels, shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        **_vae_blocks(vae_scale),
    ).eval()


def flux_scheduler():
    """FLUX.1's scheduler config (dynamic shift), its image token range scaled to the tiny images."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64
    )


def qwen3_text_encoder(
    vocab_size: int,
    seed: int,
    max_position_embeddings: int = 128,
    causal_lm: bool = True,
    **config,
):
    """A Qwen3 text encoder of 3 layers (hidden 16, two heads of 8 unless ``config`` says otherwise):
    ``Qwen3ForCausalLM`` (FLUX.2 Klein) or the bare ``Qwen3Model`` (Z-Image)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    settings = {"intermediate_size": 24, "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2}
    settings.update(num_key_value_heads=2, head_dim=8)
    settings.update(config)
    cfg = Qwen3Config(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings, **settings)
    torch.manual_seed(seed)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(cfg).eval()


def flux2_transformer(joint_attention_dim: int, guidance_embeds: bool, seed: int, num_layers: int = 1, heads: int = 2):
    """The Flux2 transformer on 2 latent channels in 2x2 patches (FLUX.2 Klein and dev)."""
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


def flux2_vae(seed: int, vae_scale: int = 2):
    """The Flux2 VAE (2 latent channels) with non-trivial batch-norm statistics."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        latent_channels=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **_vae_blocks(vae_scale),
    ).eval()
    with torch.no_grad():  # non-trivial normalisation statistics, so that decoding exercises them
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def flux2_scheduler():
    """FLUX.2's scheduler config (dynamic shifting; the pipeline computes mu itself)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, time_shift_type="exponential"
    )


def qwen_image_transformer(seed: int, **extra):
    """The Qwen-Image transformer on 4 latent channels in 2x2 patches (Qwen-Image and Qwen-Image-Edit)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x a 2x2 patch
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
        **extra,
    ).eval()


def qwen2_5_vl_text_encoder(tok, seed: int, max_position_embeddings: int, vision_ids: bool = False, **vision):
    """A Qwen2.5-VL (2 text layers of 16, a vision tower of 4-pixel patches and one block) on ``tok``'s ids;
    ``vision_ids``: with the ids of ``tok``'s vision tokens (the editing template's), ``vision``: more of the
    vision tower's settings."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
    }
    text = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2}
    text.update(num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=max_position_embeddings)
    text.update(rope_theta=1e6, **ids)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
    tower = {"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": 16}
    tower.update(patch_size=4, spatial_merge_size=1, temporal_patch_size=1, **vision)
    if vision_ids:
        ids.update(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=tower, **ids)).eval()


def qwen_image_vae(seed: int):
    """The Qwen-Image video VAE (4 latent channels, one spatial downsampling) with per-channel statistics."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1],  # one spatial downsampling: a VAE factor of 2
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.7, 1.2, 2.0],
    ).eval()


def qwen_image_scheduler():
    """Qwen-Image's scheduler config (dynamic shift from 0.5 to 0.9, stretched to end at 0.02)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )


def flux2_klein_pipeline(vae_scale: int = 2, guidance_embeds: bool = False, seed: int = 0):
    """FLUX.2 Klein in miniature: Qwen3 text encoder (3 layers), Flux2 transformer, Flux2 VAE with batch-norm stats."""
    from diffusers import Flux2KleinPipeline

    tok = qwen_tokenizer()
    transformer = flux2_transformer(48, guidance_embeds, seed)  # 3 text-encoder layers x hidden 16
    text_encoder = qwen3_text_encoder(len(tok), seed + 1)
    return Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=flux2_vae(seed + 2, vae_scale),
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def sd3_pipeline(vae_scale: int = 2, with_t5: bool = True, pos_embed_max_size: int = 16, seed: int = 0):
    """SD3 in miniature: two CLIP encoders with projection, a T5 encoder, SD3 transformer, AutoencoderKL."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_len = 16
    tok = clip_tokenizer(clip_len)
    tok_2 = clip_tokenizer(clip_len)
    tok_3 = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,  # two CLIP projections of 16
        out_channels=4,
        pos_embed_max_size=pos_embed_max_size,
    ).eval()
    te = _clip_text_encoder(len(tok), clip_len, seed + 1, with_projection=True)
    te_2 = _clip_text_encoder(len(tok_2), clip_len, seed + 2, with_projection=True)
    te_3 = _t5_encoder(len(tok_3), 32, seed + 3) if with_t5 else None
    vae = autoencoder_kl(seed + 4, 4, shift_factor=0.0609, scaling_factor=1.5035, vae_scale=vae_scale)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te_2,
        tokenizer_2=tok_2,
        text_encoder_3=te_3,
        tokenizer_3=tok_3 if with_t5 else None,
    )


def flux1_pipeline(vae_scale: int = 2, guidance_embeds: bool = True, seed: int = 0):
    """FLUX.1 in miniature: CLIP text encoder (pooled), T5 encoder, Flux transformer, AutoencoderKL."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    clip_len = 16
    tok = clip_tokenizer(clip_len)
    tok_2 = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,  # 2 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    te = _clip_text_encoder(len(tok), clip_len, seed + 1, with_projection=False)
    te_2 = _t5_encoder(len(tok_2), 32, seed + 2)
    vae = autoencoder_kl(seed + 3, 2, shift_factor=0.1159, scaling_factor=0.3611, vae_scale=vae_scale)
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te_2,
        tokenizer_2=tok_2,
        transformer=transformer,
    )


#: image size of the tests: not square, so that a transposed layout would show
HEIGHT, WIDTH = 32, 16


def adapter_options(kind: str, **extra) -> dict:
    """Model options that fit the tiny pipelines (short text, the tiny Qwen3's layers)."""
    opts = {"height": HEIGHT, "width": WIDTH, "max_sequence_length": 16}
    if kind == "flux2_klein":  # the chat template takes 8 of Klein's (one-byte) tokens
        opts.update(text_encoder_out_layers=[1, 2, 3], max_sequence_length=40)
    opts.update(extra)
    return opts


BUILDERS = {"flux2_klein": flux2_klein_pipeline, "sd3": sd3_pipeline, "flux1": flux1_pipeline}


def save_pipeline(kind: str, directory: str | Path, builders: dict | None = None, **kwargs) -> Path:
    """Build the tiny pipeline ``kind`` (one of ``builders``, by default this module's ``BUILDERS``) and save it
    (safetensors) to ``directory``."""
    directory = Path(directory)
    pipe = (BUILDERS if builders is None else builders)[kind](**kwargs)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def set_pipeline_class(directory: str | Path, class_name: str) -> None:
    """Rewrite ``model_index.json``'s ``_class_name`` (to test an unsupported pipeline)."""
    path = Path(directory) / "model_index.json"
    index = json.loads(path.read_text())
    index["_class_name"] = class_name
    path.write_text(json.dumps(index))


# ------------------------------------------------------------------------------------ tiny reward models
# The recipes' hub rewards (PickScore, HPSv2.1) on tiny random CLIP models saved in the layouts the
# rewards read, so that a recipe runs its own reward offline (``reward.options`` point at these).

# input side 24, unlike the tiny pipelines' 32x16 images, so that preprocessing resizes (and HPSv2 pads)
_CLIP_SIDE, _CLIP_PATCH, _CLIP_CTX, _CLIP_WIDTH, _CLIP_EMBED, _CLIP_HEADS = 24, 8, 32, 16, 12, 2


def _save_clip_tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    clip_tokenizer(_CLIP_CTX).save_pretrained(str(directory))
    return directory


def tiny_pickscore(directory: str | Path, seed: int = 0) -> dict:
    """A tiny PickScore: a random ``CLIPModel`` and a CLIP processor directory; returns the reward's options."""
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    proc = _save_clip_tokenizer(directory / "processor")
    (proc / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_size": {"height": _CLIP_SIDE, "width": _CLIP_SIDE},
                "do_center_crop": True,
                "do_normalize": True,
                "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "resample": 3,
                "size": {"shortest_edge": _CLIP_SIDE},
            }
        )
    )
    common = {"hidden_size": _CLIP_WIDTH, "intermediate_size": 24, "num_hidden_layers": 1}
    common["num_attention_heads"] = _CLIP_HEADS
    tok = clip_tokenizer(_CLIP_CTX)
    text = {"vocab_size": len(tok), "max_position_embeddings": _CLIP_CTX, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"image_size": _CLIP_SIDE, "patch_size": _CLIP_PATCH}
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config={**common, **text}, vision_config={**common, **vision}, projection_dim=_CLIP_EMBED)
    )
    model.save_pretrained(str(directory / "model"))
    return {"model": str(directory / "model"), "processor": str(proc)}


def tiny_hpsv2(directory: str | Path, seed: int = 0) -> dict:
    """A tiny HPSv2.1: a random open_clip ViT state dict as ``HPS_v2.1_compressed.pt``; returns the reward's options."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    w, vocab = _CLIP_WIDTH, len(clip_tokenizer(_CLIP_CTX))

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    sd: dict[str, torch.Tensor] = {}
    for prefix in ("visual.", ""):
        p = f"{prefix}transformer.resblocks.0."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = 1 + r(w), r(w)
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * w, w), r(3 * w)
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(w, w), r(w)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = 1 + r(w), r(w)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * w, w), r(4 * w)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(w, 4 * w), r(w)
    grid = _CLIP_SIDE // _CLIP_PATCH
    sd["visual.class_embedding"], sd["visual.positional_embedding"] = r(w), r(grid * grid + 1, w)
    sd["visual.proj"], sd["visual.conv1.weight"] = r(w, _CLIP_EMBED), r(w, 3, _CLIP_PATCH, _CLIP_PATCH)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = 1 + r(w), r(w)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = 1 + r(w), r(w)
    sd["positional_embedding"], sd["text_projection"] = r(_CLIP_CTX, w), r(w, _CLIP_EMBED)
    sd["token_embedding.weight"], sd["logit_scale"] = r(vocab, w), torch.tensor(4.6052)
    sd["ln_final.weight"], sd["ln_final.bias"] = 1 + r(w), r(w)
    torch.save({"state_dict": sd}, directory / "HPS_v2.1_compressed.pt")
    tok = _save_clip_tokenizer(directory / "tokenizer")
    return {
        "checkpoint": str(directory),
        "tokenizer": str(tok),
        "vision_heads": _CLIP_HEADS,
        "text_heads": _CLIP_HEADS,
    }


def tiny_clip(directory: str | Path, seed: int = 1) -> dict:
    """A tiny CLIP model and its processor in one directory (as CLIPScore and image_similarity read them);
    returns the reward's options."""
    import shutil

    directory = Path(directory)
    parts = tiny_pickscore(directory / "parts", seed=seed)
    both = directory / "clip"
    shutil.copytree(parts["model"], both)
    for f in Path(parts["processor"]).iterdir():
        shutil.copy(f, both / f.name)
    return {"model": str(both)}


#: the reward options of a tiny stand-in for each hub reward a recipe trains on (ImageReward, evaluated
#: only, has none here)
TINY_REWARDS = {"pickscore": tiny_pickscore, "hpsv2": tiny_hpsv2, "clipscore": tiny_clip}
