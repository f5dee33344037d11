"""LoRA through peft, on any ``nn.Module`` (the built-in model or a diffusers transformer)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from ..errors import UserError

__all__ = ["apply_lora", "adapters_disabled", "save_adapter", "load_adapter", "has_lora"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(
    module: torch.nn.Module,
    target_modules: Sequence[str],
    rank: int = 16,
    alpha: float = 16.0,
    init: str = "gaussian",
    dropout: float = 0.0,
) -> torch.nn.Module:
    """Inject LoRA layers into ``module`` in place; only their weights stay trainable."""
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        init_lora_weights="gaussian" if init == "gaussian" else True,
    )
    try:
        return inject_adapter_in_model(config, module)
    except ValueError as exc:
        raise UserError(f"LoRA could not target modules {list(target_modules)}: {exc}") from None


def has_lora(module: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Run the base model (the reference policy) with every LoRA layer switched off."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def save_adapter(
    module: torch.nn.Module, directory: str | Path, weights: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Save the LoRA weights and config in peft's format (``adapter_config.json``, safetensors).

    ``weights``: whole tensors by parameter name to save instead of the module's own (whose FSDP
    shards hold a part of each weight only); it must hold every LoRA weight.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = getattr(module, "peft_config", {}).get("default")
    if config is None:
        raise UserError("the model has no LoRA adapter to save")
    config.save_pretrained(str(directory))
    chosen = None if weights is None else dict(weights)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(module, chosen).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS))
    return directory


def load_adapter(module: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """Inject and load a LoRA adapter saved by :func:`save_adapter` (or by peft)."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{str(directory)!r} is not a LoRA adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = PeftLoraConfig.from_pretrained(str(directory))
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as exc:
        raise UserError(f"could not read the LoRA adapter in {str(directory)!r}: {exc}") from None
    if not has_lora(module):
        module = inject_adapter_in_model(config, module)
    # The adapter was trained in float32 (see the trainer): keep its weights so on a bf16 model too,
    # instead of peft's default of the base layer's dtype, which would round the trained update away.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name and p.is_floating_point():
                p.data = p.data.float()
    result = set_peft_model_state_dict(module, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UserError(f"the LoRA adapter in {str(directory)!r} does not fit this model ({unexpected[:2]} ...)")
    return module
