"""Tiny text-to-video pipelines (Wan2.1, Wan2.2 TI2V-5B, the two-expert Wan2.2 A14B), built offline from config
classes with random weights.

The VAE compresses 2x in time and space (5B's residual VAE 2x more in space, by its patchify); the
transformers have one or two blocks of two heads. ``save_pipeline`` writes a directory that loads back
through ``from_pretrained`` like a real checkpoint. ``euler_twin`` gives the same pipeline with a
FlowMatchEulerDiscreteScheduler of the same shift, which our ``ode`` sampler is compared against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import tiny_pipelines as tp

__all__ = [
    "BUILDERS",
    "FRAMES",
    "HEIGHT",
    "WIDTH",
    "adapter_options",
    "euler_twin",
    "save_pipeline",
    "wan_pipeline",
]

#: the tiny videos: 5 frames (3 latent frames) of 16x32 pixels (5B: 32x32, its VAE compresses 4x in space)
FRAMES, HEIGHT, WIDTH = 5, 16, 32
_TEXT_DIM = 16


def umt5_encoder(vocab_size: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=_TEXT_DIM,
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
    return UMT5EncoderModel(cfg).eval()


def wan_vae(seed: int, residual: bool = False):
    """Wan's causal video VAE: 4 latent channels, 2x in time and space (Wan2.2's residual VAE also patchifies
    2x2, so 4x in space, with 12 pixel channels in and out)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    extra = {"is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12} if residual else {}
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1],
        num_res_blocks=1,
        temperal_downsample=[True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.7, 1.2, 2.0],
        scale_factor_temporal=2,
        scale_factor_spatial=4 if residual else 2,
        **extra,
    ).eval()


def wan_transformer(seed: int, num_layers: int = 1):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=_TEXT_DIM,
        freq_dim=16,
        ffn_dim=24,
        num_layers=num_layers,
        rope_max_seq_len=32,
    ).eval()


def unipc_scheduler(flow_shift: float):
    """The scheduler of the Wan checkpoints: UniPC on flow sigmas shifted by ``flow_shift``."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
    )


def wan_pipeline(variant: str = "wan21", seed: int = 0):
    """``wan21`` (Wan2.1: one transformer, shift 3), ``wan22_5b`` (TI2V-5B: residual VAE, per-token timesteps,
    shift 5) or ``wan22_a14b`` (two experts switched at boundary_ratio 0.875, shift 3)."""
    from diffusers import WanPipeline

    tok = tp.t5_tokenizer()
    kwargs: dict = {}
    if variant == "wan22_a14b":
        kwargs = {"transformer_2": wan_transformer(seed + 3), "boundary_ratio": 0.875}
    elif variant == "wan22_5b":
        kwargs = {"expand_timesteps": True}
    elif variant != "wan21":
        raise ValueError(f"unknown tiny Wan variant {variant!r}")
    return WanPipeline(
        tokenizer=tok,
        text_encoder=umt5_encoder(len(tok), seed + 1),
        vae=wan_vae(seed + 2, residual=variant == "wan22_5b"),
        scheduler=unipc_scheduler(5.0 if variant == "wan22_5b" else 3.0),
        transformer=wan_transformer(seed),
        **kwargs,
    )


def euler_twin(pipe):
    """The pipeline with a FlowMatchEulerDiscreteScheduler of its UniPC scheduler's shift (the same modules)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=pipe.scheduler.config.flow_shift)
    components = {k: getattr(pipe, k) for k in ("tokenizer", "text_encoder", "vae", "transformer", "transformer_2")}
    return WanPipeline(
        scheduler=sched,
        boundary_ratio=pipe.config.boundary_ratio,
        expand_timesteps=pipe.config.expand_timesteps,
        **components,
    )


def adapter_options(kind: str, **extra) -> dict:
    """Model options that fit the tiny pipelines (their frame count and size, a short text)."""
    opts: dict = {"num_frames": FRAMES, "height": HEIGHT, "width": WIDTH, "max_sequence_length": 16}
    if kind == "wan22_5b":
        opts["width"] = 32
        opts["height"] = 32
    opts.update(extra)
    return opts


BUILDERS = {
    "wan21": lambda **kw: wan_pipeline("wan21", **kw),
    "wan22_5b": lambda **kw: wan_pipeline("wan22_5b", **kw),
    "wan22_a14b": lambda **kw: wan_pipeline("wan22_a14b", **kw),
}


def save_pipeline(kind: str, directory: str | Path, **kwargs) -> Path:
    """Build the tiny pipeline ``kind`` and save it (safetensors) to ``directory``."""
    return tp.save_pipeline(kind, directory, builders=BUILDERS, **kwargs)
