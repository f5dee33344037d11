"""The words of the ``signs`` task and its prompts: ``a sign that says "MOON"``.

Words are strings of 3 to 5 capital letters drawn by a fixed random generator (no word list to ship,
and no word is easier for being common English). Every possible word belongs to one of two parts,
fixed by a hash of the word: one word in eight is *held out* and never appears in pretraining; the
evaluation words come from that part only, so evaluation measures what the model does on words it has
never been shown. The RL training words are a subset of the pretraining words: RL then sharpens a
skill the model has (drawing letters where the word puts them), and the held-out evaluation says
whether that gain carries over to new words rather than being memorised for the prompts trained on.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from functools import cache

import torch

from ...errors import UserError
from .models import ALPHABET, PAD

__all__ = [
    "MIN_LETTERS",
    "MAX_LETTERS",
    "PROMPT_TEMPLATE",
    "is_held_out",
    "random_word",
    "pretrain_words",
    "eval_words",
    "rl_words",
    "prompt_for",
    "parse_prompt",
    "encode_words",
    "encode_prompts",
    "prompt_metadata",
    "train_prompts",
    "eval_prompts",
]

MIN_LETTERS, MAX_LETTERS = 3, 5
#: the phrasing of every prompt of the task (the reward reads the quoted text)
PROMPT_TEMPLATE = 'a sign that says "{word}"'
#: the longest word the model takes (its character slots); longer targets are refused
CHAR_SLOTS = 6
_HELD_OUT_MODULUS = 8
# fixed seeds: the word sets are a property of the task, not of a pretraining run
_PRETRAIN_SEED, _EVAL_SEED = 20260101, 20260102
NUM_PRETRAIN_WORDS, NUM_EVAL_WORDS, NUM_RL_WORDS = 4000, 48, 64


def is_held_out(word: str) -> bool:
    """Whether ``word`` belongs to the held-out part (one word in eight, by a CRC-32 of the word)."""
    return zlib.crc32(word.upper().encode()) % _HELD_OUT_MODULUS == 0


def random_word(rng: random.Random) -> str:
    """A word of 3 to 5 capital letters."""
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))


def _draw(seed: int, count: int, held_out: bool) -> tuple[str, ...]:
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < count:
        w = random_word(rng)
        if is_held_out(w) == held_out:
            words[w] = None
    return tuple(words)


@cache
def pretrain_words() -> tuple[str, ...]:
    """The 4000 words the pretraining renders show (none held out)."""
    return _draw(_PRETRAIN_SEED, NUM_PRETRAIN_WORDS, held_out=False)


@cache
def eval_words() -> tuple[str, ...]:
    """The 48 evaluation words, all from the held-out part: never seen in pretraining or RL."""
    return _draw(_EVAL_SEED, NUM_EVAL_WORDS, held_out=True)


def rl_words() -> tuple[str, ...]:
    """The 64 RL training words: the first pretraining words."""
    return pretrain_words()[:NUM_RL_WORDS]


def prompt_for(word: str) -> str:
    """``a sign that says "WORD"``."""
    return PROMPT_TEMPLATE.format(word=word)


def parse_prompt(prompt: str) -> str:
    """The word a prompt asks for (its quoted text, in capitals); UserError naming the prompt otherwise."""
    if not isinstance(prompt, str):
        raise UserError(f"a signs prompt must be a string, got {prompt!r}")
    parts = prompt.split('"')
    if len(parts) < 3:
        raise UserError(f"the prompt {prompt!r} has no quoted word; write e.g. 'a sign that says \"MOON\"'")
    word = parts[1].strip().upper()
    if not word or any(ch not in ALPHABET for ch in word):
        raise UserError(f"the prompt {prompt!r} quotes {parts[1]!r}; the signs model draws letters A-Z only")
    if len(word) > CHAR_SLOTS:
        raise UserError(f"the prompt {prompt!r} quotes {len(word)} letters; the signs model draws at most {CHAR_SLOTS}")
    return word


def encode_words(words: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """``(B, 6)`` long tensor of letter tokens (A = 1 .. Z = 26, 0 pads the end)."""
    rows = [[ALPHABET.index(ch) + 1 for ch in w] + [PAD] * (CHAR_SLOTS - len(w)) for w in words]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), CHAR_SLOTS)


def encode_prompts(prompts: Sequence[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """The letter tokens of each prompt's word (:func:`encode_words`)."""
    if isinstance(prompts, str):
        raise UserError(f"expected a list of prompts, got the single string {prompts!r}")
    return encode_words([parse_prompt(p) for p in prompts], device)


def prompt_metadata(prompts: Sequence[str]) -> list[dict]:
    """One ``{"word": str}`` per prompt."""
    if isinstance(prompts, str):
        raise UserError(f"expected a list of prompts, got the single string {prompts!r}")
    return [{"word": parse_prompt(p)} for p in prompts]


def train_prompts() -> list[str]:
    """The RL training prompts (64 pretraining words)."""
    return [prompt_for(w) for w in rl_words()]


def eval_prompts() -> list[str]:
    """The held-out evaluation prompts (48 words never seen in pretraining)."""
    return [prompt_for(w) for w in eval_words()]
