"""Text prompts of the ``digits`` task: parsing to ``[digit, style]`` and the train / eval prompt sets.

A prompt names exactly one digit (``7`` or ``seven``) and at most one style word; other words
are free (``"a bold handwritten 7"``, ``"the digit four in heavy strokes"``). No style word means
``plain``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ...errors import UserError
from .data import DIGIT_WORDS, STYLES

__all__ = [
    "STYLE_SYNONYMS",
    "HELD_OUT_COMBOS",
    "parse_prompt",
    "encode_prompts",
    "prompt_metadata",
    "train_prompts",
    "eval_prompts",
]

#: style -> the words that ask for it
STYLE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "regular", "normal", "ordinary", "standard", "medium"),
    "bold": ("bold", "thick", "heavy", "dark", "fat", "strong", "chunky"),
    "thin": ("thin", "light", "fine", "faint", "slender", "skinny", "delicate"),
}
_STYLE_OF_WORD = {w: s for s, words in STYLE_SYNONYMS.items() for w in words}
_DIGIT_OF_WORD = {w: i for i, w in enumerate(DIGIT_WORDS)}
_TOKEN = re.compile(r"[a-z]+|\d+")

#: (digit, style) pairs never seen in training prompts: eval measures how RL generalises to them
HELD_OUT_COMBOS: tuple[tuple[int, str], ...] = (
    (0, "thin"),
    (3, "bold"),
    (4, "plain"),
    (6, "thin"),
    (7, "bold"),
    (9, "plain"),
)
_TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "plain": ("a handwritten {digit}", "a plain handwritten {digit}"),
    "bold": ("a bold handwritten {digit}", "a thick handwritten {digit}"),
    "thin": ("a thin handwritten {digit}", "a light handwritten {digit}"),
}
# paraphrases use words and phrasings that no training prompt uses
_EVAL_PARAPHRASES: dict[str, str] = {
    "plain": "the digit {word} in regular strokes",
    "bold": "the digit {word} in heavy strokes",
    "thin": "the digit {word} in fine strokes",
}


def parse_prompt(prompt: str) -> tuple[int, str]:
    """``(digit, style)`` of one prompt; raises UserError naming the prompt when it cannot be read."""
    if not isinstance(prompt, str):
        raise UserError(f"a digits prompt must be a string, got {prompt!r}")
    digits: set[int] = set()
    styles: set[str] = set()
    for token in _TOKEN.findall(prompt.lower()):
        if token.isdigit():
            if len(token) > 1:
                raise UserError(f"the prompt {prompt!r} names the number {token}; name a single digit 0-9")
            digits.add(int(token))
        elif token in _DIGIT_OF_WORD:
            digits.add(_DIGIT_OF_WORD[token])
        elif token in _STYLE_OF_WORD:
            styles.add(_STYLE_OF_WORD[token])
    if not digits:
        raise UserError(f"cannot find a digit 0-9 in the prompt {prompt!r}; write e.g. 'a bold handwritten 7'")
    if len(digits) > 1:
        raise UserError(f"the prompt {prompt!r} names several digits {sorted(digits)}; name exactly one")
    if len(styles) > 1:
        raise UserError(f"the prompt {prompt!r} asks for several styles {sorted(styles)}; ask for at most one")
    return digits.pop(), (styles.pop() if styles else "plain")


def encode_prompts(prompts: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """``(B, 2)`` long tensor of ``[digit, style index]`` (style indices follow ``STYLES``)."""
    if isinstance(prompts, str):
        raise UserError(f"expected a list of prompts, got the single string {prompts!r}")
    rows = [(d, STYLES.index(s)) for d, s in (parse_prompt(p) for p in prompts)]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), 2)


def prompt_metadata(prompts: Sequence[str]) -> list[dict]:
    """One ``{"digit": int, "style": str}`` per prompt: what the rewards read."""
    if isinstance(prompts, str):
        raise UserError(f"expected a list of prompts, got the single string {prompts!r}")
    return [{"digit": d, "style": s} for d, s in (parse_prompt(p) for p in prompts)]


def train_prompts() -> list[str]:
    """The RL training prompts: two phrasings of every (digit, style) pair except ``HELD_OUT_COMBOS`` (48)."""
    held_out = set(HELD_OUT_COMBOS)
    return [
        template.format(digit=d)
        for d in range(10)
        for style in STYLES
        if (d, style) not in held_out
        for template in _TRAIN_TEMPLATES[style]
    ]


def eval_prompts() -> list[str]:
    """Held-out evaluation prompts (36): the held-out pairs in training phrasing, then every pair paraphrased."""
    held = [_TRAIN_TEMPLATES[style][0].format(digit=d) for d, style in HELD_OUT_COMBOS]
    paraphrased = [_EVAL_PARAPHRASES[style].format(word=DIGIT_WORDS[d]) for d in range(10) for style in STYLES]
    return held + paraphrased
