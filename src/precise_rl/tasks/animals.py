"""The built-in prompts of the text-to-image models: one animal per prompt (DDPO-style).

Short, single-subject prompts suit rewards that judge the whole image (JPEG size, aesthetics);
pass ``prompts.train`` / ``prompts.eval`` files for anything else. Train and eval animals are
disjoint, so held-out scores are on prompts never trained on.
"""

from __future__ import annotations

__all__ = ["TRAIN_ANIMALS", "EVAL_ANIMALS", "train_prompts", "eval_prompts"]

TRAIN_ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "rabbit", "hamster", "mouse",
    "squirrel", "fox", "wolf", "bear", "deer", "moose", "lion", "tiger", "leopard", "cheetah",
    "elephant", "giraffe", "zebra", "hippopotamus", "rhinoceros", "camel", "kangaroo", "koala", "panda", "monkey",
    "gorilla", "raccoon", "otter", "beaver", "hedgehog", "bat", "owl", "eagle", "parrot", "penguin",
    "flamingo", "duck", "swan", "chicken", "peacock", "frog", "turtle", "crocodile",
)  # fmt: skip

EVAL_ANIMALS: tuple[str, ...] = (
    "llama", "donkey", "badger", "lynx", "sloth", "seal",
    "walrus", "pelican", "toucan", "lizard", "octopus", "butterfly",
)  # fmt: skip


def _prompt(animal: str) -> str:
    article = "an" if animal[0] in "aeiou" else "a"
    return f"a photo of {article} {animal}"


def train_prompts() -> list[str]:
    return [_prompt(a) for a in TRAIN_ANIMALS]


def eval_prompts() -> list[str]:
    return [_prompt(a) for a in EVAL_ANIMALS]
