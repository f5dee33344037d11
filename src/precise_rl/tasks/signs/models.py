"""The velocity network of the ``signs`` task: a small DiT over pixels that reads the word it must draw.

Image tokens are patches of the ``3 x 32 x 128`` pixel latent; the prompt's word is a row of character
tokens (learned letter and position embeddings, one self-attention layer). Each patch token also gets a
layout embedding: the letter whose place covers it, and where in that place it lies, with places laid
out as the renders lay out a centred monospaced line (character-level layout conditioning as in
TextDiffuser, but computed from the word's length instead of drawn by a layout model). Without it, 6000
steps on a CPU taught the network letter-like strokes at letter-like places but no readable letter; with
it, a patch knows which glyph it is part of from the first step. Each block attends over the
image tokens, then from them to the character tokens (cross-attention: where a glyph goes depends on
which letter sits where), then an MLP; the time embedding scales and shifts each sub-layer (adaLN-Zero,
DiT's conditioning), so a freshly built block is the identity. A token is narrower than its patch
(128 against 192 numbers), so the transformer alone could not even pass its input through; a small
convolutional head sees the noisy pixels beside the transformer's per-pixel features and gives the
velocity at full resolution (what removes the last of the noise at low ``t``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ..digits.models import timestep_embedding
from .render import letter_advance

__all__ = ["SignsNetConfig", "SignsFlowNet", "ALPHABET", "PAD"]

#: the characters a sign shows; token 0 is padding
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PAD = 0


@dataclass(frozen=True)
class SignsNetConfig:
    """Architecture of :class:`SignsFlowNet` (the defaults are the shipped model)."""

    height: int = 32
    width_px: int = 128
    patch_h: int = 8
    patch_w: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    max_chars: int = 6
    time_freqs: int = 32
    #: feature channels per pixel that the transformer hands to the convolutional head
    head_channels: int = 16
    #: width of the head's hidden convolution
    head_hidden: int = 32
    #: per-pixel letter embedding the head sees (with the phase within the letter and the row)
    layout_channels: int = 8

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SignsNetConfig:
        """Build from a dict, refusing unknown keys (they would be silently ignored otherwise)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown signs model config keys {unknown}; known keys are {sorted(names)}")
        config = cls(**{k: int(v) for k, v in d.items()})
        if config.height % config.patch_h or config.width_px % config.patch_w or config.width % config.heads:
            raise UserError(f"signs model config {config} does not tile: sizes must divide by the patch and heads")
        return config

    @property
    def grid(self) -> tuple[int, int]:
        """Patch rows and columns."""
        return self.height // self.patch_h, self.width_px // self.patch_w


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class SignsBlock(nn.Module):
    """Self-attention over patches, cross-attention to the characters, MLP; each gated by the time (adaLN-Zero)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.q_cross = nn.Linear(width, width)
        self.kv_cross = nn.Linear(width, 2 * width)
        self.proj_cross = nn.Linear(width, width)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)
        self.ada = nn.Linear(width, 8 * width)
        # adaLN-Zero: the gates start at zero, so the block starts as the identity
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, h: torch.Tensor, chars: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, g1, s2, g2, s3, sc3, g3, sc1 = self.ada(c).chunk(8, dim=1)
        q, k, v = self.qkv(_modulate(self.norm1(h), s1, sc1)).chunk(3, dim=2)
        a = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        h = h + g1[:, None] * self.proj(self._merge(a))
        q = self._heads(self.q_cross(_modulate(self.norm2(h), s2, torch.zeros_like(s2))))
        k, v = self.kv_cross(chars).chunk(2, dim=2)
        a = F.scaled_dot_product_attention(q, self._heads(k), self._heads(v), attn_mask=mask[:, None, None, :])
        h = h + g2[:, None] * self.proj_cross(self._merge(a))
        y = self.fc2(F.gelu(self.fc1(_modulate(self.norm3(h), s3, sc3)), approximate="tanh"))
        return h + g3[:, None] * y


class SignsFlowNet(nn.Module):
    """Text-conditioned velocity network over ``(B, 3, 32, 128)`` pixel latents in [-1, 1].

    ``forward(x, t, chars)``: ``t`` is ``(B,)`` in [0, 1], ``chars`` a ``(B, max_chars)`` long tensor of
    letter tokens (1..26, 0 pads); returns ``v = eps - x0`` shaped like ``x``.
    """

    _no_split_modules = ["SignsBlock"]

    def __init__(self, config: SignsNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or SignsNetConfig()
        w = config.width
        rows, cols = config.grid
        patch = 3 * config.patch_h * config.patch_w
        self.patch_in = nn.Linear(patch, w)
        self.pos = nn.Parameter(torch.randn(1, rows * cols, w) * 0.02)
        self.char_emb = nn.Embedding(len(ALPHABET) + 1, w, padding_idx=PAD)
        self.char_pos = nn.Parameter(torch.randn(1, config.max_chars, w) * 0.02)
        self.len_emb = nn.Embedding(config.max_chars + 1, w)
        self.layout_emb = nn.Embedding(len(ALPHABET) + 1, w, padding_idx=PAD)
        self.layout_phase = nn.Linear(2, w, bias=False)
        # advance[n]: a letter's width in a word of n letters (0 letters: unused)
        advances = [letter_advance(n) for n in range(config.max_chars + 1)]
        self.register_buffer("advance", torch.tensor(advances, dtype=torch.float32), persistent=False)
        self.text_layer = nn.TransformerEncoderLayer(w, config.heads, 2 * w, dropout=0.0, batch_first=True)
        self.time_fc1 = nn.Linear(2 * config.time_freqs, w)
        self.time_fc2 = nn.Linear(w, w)
        self.blocks = nn.ModuleList(SignsBlock(w, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(w, elementwise_affine=False)
        self.out_ada = nn.Linear(w, 2 * w)
        self.out = nn.Linear(w, config.head_channels * config.patch_h * config.patch_w)
        # the head also sees, per pixel, the letter placed there, where in it, and the row: a glyph's strokes
        # follow from these alone up to the render's small moves, which the transformer's features carry
        self.layout_pixel = nn.Embedding(len(ALPHABET) + 1, config.layout_channels)
        self.head1 = nn.Conv2d(config.head_channels + 3 + config.layout_channels + 3, config.head_hidden, 3, padding=1)
        self.head2 = nn.Conv2d(config.head_hidden, 3, 3, padding=1)
        nn.init.zeros_(self.out_ada.weight)
        nn.init.zeros_(self.out_ada.bias)
        nn.init.zeros_(self.head2.weight)
        nn.init.zeros_(self.head2.bias)

    @staticmethod
    def linear_names_for(config: SignsNetConfig) -> list[str]:
        """The layers LoRA adapts: the attention, cross-attention and MLP linears of every block, and the output."""
        names = ["patch_in"]
        for i in range(config.depth):
            names += [f"blocks.{i}.{n}" for n in ("qkv", "proj", "q_cross", "kv_cross", "proj_cross", "fc1", "fc2")]
        return names + ["out", "head1", "head2"]

    def layout(self, chars: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At each horizontal position ``x`` (pixels, any shape): the letter token placed there and its phase.

        Returns ``(B, *x.shape)`` letter tokens (0 outside the word) and ``(B, *x.shape, 2)``: the (cos, sin)
        of the position within the letter's place (zeros outside the word).
        """
        lengths = (chars != PAD).sum(dim=1)
        shape = (-1,) + (1,) * x.ndim
        advance = self.advance[lengths].reshape(shape)
        start = self.config.width_px / 2 - lengths.reshape(shape) * advance / 2
        place = (x.to(advance.dtype)[None] - start) / advance
        slot = place.floor().long()
        inside = (slot >= 0) & (slot < lengths.reshape(shape))
        letters = chars.gather(1, slot.clamp(0, chars.shape[1] - 1).reshape(chars.shape[0], -1)).reshape(slot.shape)
        angle = 2 * torch.pi * (place - place.floor())
        phase = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * inside[..., None]
        return letters * inside, phase

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        rows, cols = cfg.grid
        x = x.reshape(b, 3, rows, cfg.patch_h, cols, cfg.patch_w)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, -1)

    def _unpatchify(self, p: torch.Tensor, channels: int) -> torch.Tensor:
        cfg = self.config
        b = p.shape[0]
        rows, cols = cfg.grid
        p = p.reshape(b, rows, cols, channels, cfg.patch_h, cfg.patch_w)
        return p.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, cfg.height, cfg.width_px)

    def encode_text(self, chars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Character features ``(B, L, width)`` and the attention mask ``(B, L)`` (True: a letter)."""
        mask = chars != PAD
        lengths = mask.sum(dim=1)
        e = self.char_emb(chars) + self.char_pos[:, : chars.shape[1]] + self.len_emb(lengths)[:, None]
        feats = self.text_layer(e, src_key_padding_mask=~mask)
        return feats, mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, chars: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_in.weight.dtype
        feats, mask = self.encode_text(chars)
        temb = timestep_embedding(t, self.config.time_freqs).to(dtype)
        pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        c = F.silu(self.time_fc2(F.silu(self.time_fc1(temb))) + pooled)
        cfg = self.config
        rows, cols = cfg.grid
        # one layout vector per patch column (from the centres of its halves), the same for every row of patches
        sub = torch.arange(cols, device=chars.device)[:, None] + torch.tensor([0.25, 0.75], device=chars.device)
        letters, phase = self.layout(chars, sub * cfg.patch_w)
        column = (self.layout_emb(letters) + self.layout_phase(phase.to(dtype))).sum(dim=2)
        h = self.patch_in(self._patchify(x.to(dtype))) + self.pos + column.repeat(1, rows, 1)
        for block in self.blocks:
            h = block(h, feats, mask, c)
        shift, scale = self.out_ada(c).chunk(2, dim=1)
        feats = self._unpatchify(self.out(_modulate(self.out_norm(h), shift, scale)), cfg.head_channels)
        return self.head2(F.silu(self.head1(torch.cat([feats, x.to(dtype), self._pixel_layout(chars, dtype)], dim=1))))

    def _pixel_layout(self, chars: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, layout_channels + 3, H, W)``: each pixel's letter embedding, phase within the letter, and row."""
        cfg = self.config
        b = chars.shape[0]
        letters, phase = self.layout(chars, torch.arange(cfg.width_px, device=chars.device) + 0.5)
        column = torch.cat([self.layout_pixel(letters), phase], dim=-1).to(dtype).transpose(1, 2)  # (B, C, W)
        row = torch.linspace(-1.0, 1.0, cfg.height, device=chars.device, dtype=dtype)
        return torch.cat(
            [
                column[:, :, None, :].expand(-1, -1, cfg.height, -1),
                row[None, None, :, None].expand(b, 1, -1, cfg.width_px),
            ],
            dim=1,
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
