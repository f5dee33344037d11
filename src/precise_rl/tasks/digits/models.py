"""The networks of the ``digits`` task: the flow model and the two digit classifiers.

Each network is built from a small JSON-able config; the weights files (safetensors) carry that
config in their metadata, so one file is enough to rebuild its network.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError

__all__ = [
    "FlowNetConfig",
    "DigitsFlowNet",
    "MLPClassifier",
    "ConvClassifier",
    "CLASSIFIERS",
    "timestep_embedding",
    "save_module",
    "load_module",
    "read_metadata",
    "METADATA_KEY",
]

#: the one safetensors metadata key (a single key keeps the header bytes reproducible)
METADATA_KEY = "precise_rl"


def timestep_embedding(t: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` in [0, 1] on the diffusers timestep scale (``1000 t``): ``(B, 2 num_freqs)``."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(num_freqs, dtype=torch.float32, device=t.device) / num_freqs)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


@dataclass(frozen=True)
class FlowNetConfig:
    """Architecture of :class:`DigitsFlowNet` (``width`` scales it: 128 ships, wider builds are for benchmarks)."""

    width: int = 128
    depth: int = 3
    mlp_ratio: int = 2
    cond_dim: int = 128
    time_freqs: int = 32
    pixels: int = 64
    num_digits: int = 10
    num_styles: int = 3

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowNetConfig:
        """Build from a dict, refusing unknown keys (they would be silently ignored otherwise)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown digits flow-model config keys {unknown}; known keys are {sorted(names)}")
        return cls(**{k: int(v) for k, v in d.items()})


class FiLMBlock(nn.Module):
    """Pre-norm residual MLP block whose normalised input is scaled and shifted by the conditioning."""

    def __init__(self, width: int, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        # start as the identity with neutral FiLM: deep residual stacks train faster that way
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c).chunk(2, dim=1)
        y = self.norm(h) * (1.0 + scale) + shift
        return h + self.fc2(F.silu(self.fc1(y)))


class DigitsFlowNet(nn.Module):
    """Class-conditional velocity network over flattened 8x8 latents.

    ``forward(x, t, cond)``: ``x`` is ``(B, 1, 8, 8)``, ``t`` is ``(B,)`` in [0, 1] and ``cond`` a
    ``(B, 2)`` long tensor ``[digit, style]``; returns ``v = eps - x0`` shaped like ``x``.
    """

    #: the blocks that are sharded one by one under ``train.fsdp`` (the attribute diffusers models declare)
    _no_split_modules = ["FiLMBlock"]

    def __init__(self, config: FlowNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FlowNetConfig()
        w, c = config.width, config.cond_dim
        self.digit_emb = nn.Embedding(config.num_digits, c)
        self.style_emb = nn.Embedding(config.num_styles, c)
        self.time_fc1 = nn.Linear(2 * config.time_freqs, c)
        self.time_fc2 = nn.Linear(c, c)
        self.in_proj = nn.Linear(config.pixels, w)
        self.blocks = nn.ModuleList(FiLMBlock(w, config.mlp_ratio * w, c) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False)
        self.out_film = nn.Linear(c, 2 * w)
        self.out_proj = nn.Linear(w, config.pixels)
        nn.init.zeros_(self.out_film.weight)
        nn.init.zeros_(self.out_film.bias)

    @staticmethod
    def linear_names_for(config: FlowNetConfig) -> list[str]:
        """Names of the layers LoRA adapts: every linear layer on the image path and its FiLM."""
        names = ["in_proj"]
        for i in range(config.depth):
            names += [f"blocks.{i}.film", f"blocks.{i}.fc1", f"blocks.{i}.fc2"]
        return names + ["out_film", "out_proj"]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.in_proj.weight.dtype
        temb = timestep_embedding(t, self.config.time_freqs).to(dtype)
        c = self.digit_emb(cond[:, 0]) + self.style_emb(cond[:, 1]) + self.time_fc2(F.silu(self.time_fc1(temb)))
        c = F.silu(c)
        h = self.in_proj(x.reshape(x.shape[0], -1).to(dtype))
        for block in self.blocks:
            h = block(h, c)
        scale, shift = self.out_film(c).chunk(2, dim=1)
        h = self.out_norm(h) * (1.0 + scale) + shift
        return self.out_proj(h).reshape(x.shape)


class MLPClassifier(nn.Module):
    """The reward classifier: a two-hidden-layer MLP over the 64 pixels of images in [0, 1]."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.fc3 = nn.Linear(hidden // 2, 10)

    def config(self) -> dict[str, Any]:
        return {"arch": "mlp", "hidden": self.hidden}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images.reshape(images.shape[0], -1) * 2.0 - 1.0
        return self.fc3(F.silu(self.fc2(F.silu(self.fc1(h)))))


class ConvClassifier(nn.Module):
    """The held-out evaluation classifier: a two-layer conv net (a different inductive bias from the MLP)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc1 = nn.Linear(2 * channels * 16, 128)
        self.fc2 = nn.Linear(128, 10)

    def config(self) -> dict[str, Any]:
        return {"arch": "conv", "channels": self.channels}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images * 2.0 - 1.0
        h = F.silu(self.conv1(h))
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)
        return self.fc2(F.silu(self.fc1(h.flatten(1))))


#: classifier architecture name -> class (rebuilt from the ``arch`` of a weights file)
CLASSIFIERS: dict[str, type[nn.Module]] = {"mlp": MLPClassifier, "conv": ConvClassifier}


def save_module(module: nn.Module, path: str | Path, kind: str, config: dict[str, Any]) -> None:
    """Write ``module``'s weights as safetensors with ``{"kind", "config"}`` in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    meta = json.dumps({"kind": kind, "config": config}, sort_keys=True)
    save_file(state, str(path), metadata={METADATA_KEY: meta})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``{"kind", "config"}`` metadata of a weights file written by :func:`save_module`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[METADATA_KEY])
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise UserError(f"{path} is not a precise-rl digits weights file ({type(exc).__name__}: {exc})") from None


def load_module(path: str | Path, kind: str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network stored in ``path`` (written by :func:`save_module` with this ``kind``) on ``device``."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if meta.get("kind") != kind:
        raise UserError(f"{path} holds a {meta.get('kind')!r} network, expected a {kind!r} one")
    config = dict(meta.get("config") or {})
    if kind == "digits_flow":
        module: nn.Module = DigitsFlowNet(FlowNetConfig.from_dict(config))
    else:
        arch = config.pop("arch", None)
        if arch not in CLASSIFIERS:
            raise UserError(f"{path} names an unknown classifier architecture {arch!r}")
        module = CLASSIFIERS[arch](**config)
    try:
        state = load_file(str(path))
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise UserError(f"cannot load the weights in {path} ({type(exc).__name__}: {exc})") from None
    return module.to(device).eval()
