"""A real checkpoint's architecture with random weights, built from its shipped config (nothing downloaded).

The weights of the real checkpoints cannot be downloaded where the project runs, so memory and speed
are measured on the architectures themselves: :func:`random_pipeline` builds the transformer and the
VAE of a file of ``assets/model_configs`` at full size (or ``width_scale`` times narrower, the same
classes and code paths) with random weights, in the chosen dtype on the chosen device. The text
encoders are not built: they are only constructed on the meta device (no memory), so that the
adapter can read their configs, and every prompt's conditioning is a random tensor of the shape the
text encoders would give (:func:`random_conditioning`), put into the adapter's prompt cache before
the encoders are freed (model options ``cache_prompts`` and ``free_text_encoders``), as a run that
caches its prompts does.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..errors import UserError
from .sizes import _model_class, build_on_meta, config_files, load_model_config

__all__ = ["BENCH_ADAPTERS", "bench_models", "random_pipeline", "random_conditioning", "fill_prompt_cache"]

#: config keys that are widths (divided by ``width_scale``); head sizes, patch sizes and rope axes are not
_WIDTH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "joint_attention_dim",
    "pooled_projection_dim",
    "caption_projection_dim",
    "d_model",
    "d_ff",
    "projection_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "num_heads",
    "block_out_channels",
    "norm_num_groups",
)


def _flux2_shapes(transformer: Any, max_sequence_length: int) -> dict[str, tuple[int, ...]]:
    # Flux2KleinPipeline.encode_prompt: the stacked hidden states of the text encoder, padded to the length
    return {"prompt_embeds": (max_sequence_length, int(transformer.config.joint_attention_dim))}


def _sd3_shapes(transformer: Any, max_sequence_length: int) -> dict[str, tuple[int, ...]]:
    # StableDiffusion3Pipeline.encode_prompt: 77 CLIP tokens (the two CLIPs' states side by side, padded to
    # T5's width) followed by the T5 tokens; the pooled output is the two CLIP projections concatenated
    cfg = transformer.config
    return {
        "prompt_embeds": (77 + max_sequence_length, int(cfg.joint_attention_dim)),
        "pooled_prompt_embeds": (int(cfg.pooled_projection_dim),),
    }


#: the adapters whose prompt conditioning :func:`random_conditioning` can shape: adapter -> shapes of one prompt
BENCH_ADAPTERS: dict[str, Callable[[Any, int], dict[str, tuple[int, ...]]]] = {
    "flux2_klein": _flux2_shapes,
    "sd3": _sd3_shapes,
}


def bench_models() -> dict[str, str]:
    """The shipped config files the bench can build (file stem -> adapter), in file-name order."""
    out = {}
    for path in config_files():
        data = load_model_config(path)
        if data["adapter"] in BENCH_ADAPTERS and "scheduler" in data:
            out[path.stem] = data["adapter"]
    return out


def _scaled(config: dict[str, Any], scale: int, where: str) -> dict[str, Any]:
    """``config`` with every width divided by ``scale`` (each must divide exactly, so shapes stay consistent)."""
    if scale == 1:
        return dict(config)

    def div(key: str, value: int) -> int:
        if value % scale and value >= scale:
            raise UserError(f"--width-scale {scale} does not divide {where}'s {key} ({value}): choose a divisor of it")
        return max(1, value // scale)

    out = dict(config)
    for key in _WIDTH_KEYS:
        value = out.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            out[key] = div(key, value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            out[key] = [div(key, v) for v in value]
    if "norm_num_groups" in out and "block_out_channels" in out:
        # GroupNorm needs groups that divide every block's channels
        out["norm_num_groups"] = math.gcd(int(out["norm_num_groups"]), *map(int, out["block_out_channels"]))
    return out


def _text_scaled(config: dict[str, Any], scale: int) -> dict[str, Any]:
    """A text encoder's config for the meta device at ``width_scale``: only its output width matters (an adapter
    checks it against the transformer's text width), so hidden sizes are divided and one attention head kept."""
    if scale == 1:
        return dict(config)
    out = dict(config)
    for key in ("hidden_size", "intermediate_size", "d_model", "d_ff", "projection_dim"):
        if isinstance(out.get(key), int):
            out[key] = max(1, out[key] // scale)
    for key in ("num_attention_heads", "num_key_value_heads", "num_heads"):
        if key in out:
            out[key] = 1
    if "head_dim" in out and "hidden_size" in out:
        out["head_dim"] = out["hidden_size"]
    return out


def _full_config(library: str, class_name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The class's defaults with ``config`` over them (the shipped files give only what differs)."""
    if library == "transformers":  # their configs name every width the files describe
        return dict(config)
    meta = build_on_meta(library, class_name, config)
    return {k: v for k, v in dict(meta.config).items() if not k.startswith("_")}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _build(library: str, class_name: str, config: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Any:
    """The component with its own random initialisation, allocated in ``dtype`` on ``device`` from the start
    (no float32 copy of a full-size model is ever made)."""
    cls = _model_class(library, class_name)
    with _default_dtype(dtype), torch.device(device):
        module = cls.from_config(dict(config)) if library == "diffusers" else cls(cls.config_class(**config))
    # tensors a class builds in float32 on purpose (position tables) follow the weights, as from_pretrained's do
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)
    return module.eval()


def random_pipeline(
    name: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    width_scale: int = 1,
    seed: int = 0,
) -> tuple[Any, str]:
    """The diffusers pipeline of shipped config ``name`` (a file stem, e.g. ``flux2_klein_4b``) with random
    weights, and its adapter's name.

    The transformer and VAE are allocated in ``dtype`` on ``device``; the text encoders live on the meta
    device (their configs only); tokenizers are absent. ``width_scale`` divides every width (heads,
    hidden sizes, VAE channels) and keeps depths and head sizes.
    """
    models = bench_models()
    if name not in models:
        raise UserError(f"no benchable model config {name!r}; choose one of {', '.join(models)}")
    if isinstance(width_scale, bool) or not isinstance(width_scale, int) or width_scale < 1:
        raise UserError(f"--width-scale must be a positive integer, got {width_scale!r}")
    path = next(p for p in config_files() if p.stem == name)
    data = load_model_config(path)
    device = torch.device(device)
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    for role, spec in data["components"].items():
        full = _full_config(spec["library"], spec["class"], spec.get("config", {}))
        if role.startswith("text_encoder"):
            parts[role] = build_on_meta(spec["library"], spec["class"], _text_scaled(full, width_scale))
            continue
        config = _scaled(full, width_scale, f"{name} {role}")
        parts[role] = _build(spec["library"], spec["class"], config, dtype, device)
    sched = data["scheduler"]
    parts["scheduler"] = _model_class("diffusers", sched["class"]).from_config(dict(sched["config"]))
    from .registry import ADAPTERS

    adapter = models[name]
    pipeline_cls = _model_class("diffusers", ADAPTERS[adapter].pipeline_class)
    wanted = inspect.signature(pipeline_cls.__init__).parameters
    kwargs = {k: parts.get(k) for k in wanted if k != "self" and wanted[k].default is inspect.Parameter.empty}
    kwargs.update({k: v for k, v in parts.items() if k in wanted})
    return pipeline_cls(**kwargs), adapter


def random_conditioning(
    adapter: str, transformer: Any, max_sequence_length: int, dtype: torch.dtype, device: str | torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """One prompt's conditioning rows ``(1, ...)`` with the shapes the adapter's text encoders give, random normal."""
    gen = torch.Generator().manual_seed(seed)
    shapes = BENCH_ADAPTERS[adapter](transformer, max_sequence_length)
    return {k: torch.randn((1, *s), generator=gen).to(device=device, dtype=dtype) for k, s in shapes.items()}


def fill_prompt_cache(policy: Any, adapter: str, prompts: Sequence[str], seed: int = 0) -> None:
    """Random conditioning for each prompt in ``policy``'s prompt cache (needs model option ``cache_prompts``),
    so that :meth:`precompute_prompts` finds them all and frees the text encoders without running them."""
    from .edit import edit_key

    if not getattr(policy, "cache_prompts", False):
        raise UserError("random prompt conditioning needs model option 'cache_prompts: true'")

    def draw(k: int) -> dict[str, torch.Tensor]:
        return random_conditioning(
            adapter, policy.transformer, policy.max_sequence_length, policy.model_dtype, policy.device, k
        )

    negative = None
    if policy.do_cfg:  # the negative prompt's conditioning, as encode_prompts adds it to every row
        negative = policy._negative_cache = draw(seed + len(prompts))
    for i, p in enumerate(prompts):
        row = draw(seed + i)
        if negative is not None:
            row.update({f"negative_{k}": v for k, v in negative.items()})
        policy._prompt_cache[edit_key(p)] = row
