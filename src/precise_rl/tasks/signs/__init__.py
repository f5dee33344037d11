"""The built-in ``signs`` task: a small text-to-image flow model that draws a word on a sign, scored by OCR.

Prompts quote a word of capital letters (``a sign that says "MOON"``); the model (:mod:`.models`, a
1.7M-parameter DiT over ``3 x 32 x 128`` pixels with its own letter embeddings and a layout of the
letters) was pretrained on procedural renders (:mod:`.render`) of 4000 words; the evaluation words are
held out of pretraining (:mod:`.words`). The task's reward is ``ocr`` (PP-OCRv4 reading the whole image as one line).
Regenerate the shipped weights with ``precise-rl pretrain signs``.
"""

from __future__ import annotations

from .models import ALPHABET, SignsFlowNet, SignsNetConfig
from .policy import SignsPolicy, load_signs_flow
from .pretrain import (
    FLOW_FILE,
    REPORT_FILE,
    SignsPretrainSettings,
    evaluate_ocr,
    pretrain_signs,
    sample_signs,
)
from .render import FONTS, render_sign, render_signs
from .words import (
    encode_prompts,
    encode_words,
    eval_prompts,
    eval_words,
    is_held_out,
    parse_prompt,
    pretrain_words,
    prompt_for,
    prompt_metadata,
    rl_words,
    train_prompts,
)

__all__ = [
    "ALPHABET",
    "DEFAULT_REWARD_WEIGHTS",
    "OCR_OPTIONS",
    "FONTS",
    "FLOW_FILE",
    "REPORT_FILE",
    "SignsFlowNet",
    "SignsNetConfig",
    "SignsPolicy",
    "SignsPretrainSettings",
    "load_signs_flow",
    "pretrain_signs",
    "evaluate_ocr",
    "sample_signs",
    "render_sign",
    "render_signs",
    "encode_prompts",
    "encode_words",
    "eval_prompts",
    "eval_words",
    "is_held_out",
    "parse_prompt",
    "pretrain_words",
    "prompt_for",
    "prompt_metadata",
    "rl_words",
    "train_prompts",
]

#: the task's reward: Flow-GRPO's OCR reward on the whole image read as one line
DEFAULT_REWARD_WEIGHTS: dict[str, float] = {"ocr": 1.0}
#: the ``ocr`` options the task needs: its images are one text line that fills them
OCR_OPTIONS: dict[str, object] = {"detect": False}
