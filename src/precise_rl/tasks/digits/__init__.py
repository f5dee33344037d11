"""The built-in ``digits`` task: a tiny class-conditional flow model over scikit-learn's 8x8 digits.

Prompts ask for a digit and a stroke style (``"a bold handwritten 7"``); the shipped model is a
real starting point (its ODE samples are recognisable digits with the asked-for ink), small
enough that GRPO runs on a CPU. Its rewards (:mod:`.rewards`) register by name on import.
Regenerate every shipped file with ``precise-rl pretrain digits``.
"""

from __future__ import annotations

from .data import DIGIT_WORDS, STYLES, ink, ink_statistics, load_digit_data, split_indices, style_labels
from .models import ConvClassifier, DigitsFlowNet, FlowNetConfig, MLPClassifier
from .policy import DigitsPolicy, assets_dir
from .pretrain import (
    EVAL_CLASSIFIER_FILE,
    FLOW_FILE,
    REPORT_FILE,
    REWARD_CLASSIFIER_FILE,
    PretrainSettings,
    pretrain_digits,
)
from .prompts import (
    HELD_OUT_COMBOS,
    STYLE_SYNONYMS,
    encode_prompts,
    eval_prompts,
    parse_prompt,
    prompt_metadata,
    train_prompts,
)
from .rewards import DigitAlignment, DigitRecognised, InkStyle, load_classifier, prompt_targets

__all__ = [
    "DEFAULT_REWARD_WEIGHTS",
    "EVAL_REWARD_WEIGHTS",
    "DIGIT_WORDS",
    "STYLES",
    "STYLE_SYNONYMS",
    "HELD_OUT_COMBOS",
    "DigitsPolicy",
    "DigitsFlowNet",
    "FlowNetConfig",
    "MLPClassifier",
    "ConvClassifier",
    "PretrainSettings",
    "pretrain_digits",
    "load_classifier",
    "DigitAlignment",
    "DigitRecognised",
    "InkStyle",
    "prompt_targets",
    "parse_prompt",
    "encode_prompts",
    "prompt_metadata",
    "train_prompts",
    "eval_prompts",
    "load_digit_data",
    "split_indices",
    "style_labels",
    "ink",
    "ink_statistics",
    "assets_dir",
    "FLOW_FILE",
    "REWARD_CLASSIFIER_FILE",
    "EVAL_CLASSIFIER_FILE",
    "REPORT_FILE",
]

#: the task's training reward: the asked-for stroke style, while the digit stays recognisable.
#: Both components are z-scored over the batch before weighting, so equal weights mean equal say.
DEFAULT_REWARD_WEIGHTS: dict[str, float] = {"ink_style": 1.0, "digit_alignment": 1.0}
#: what evaluation logs: the training components plus recognition by the held-out classifier
EVAL_REWARD_WEIGHTS: dict[str, float] = {"ink_style": 1.0, "digit_alignment": 1.0, "digit_recognised": 0.0}
