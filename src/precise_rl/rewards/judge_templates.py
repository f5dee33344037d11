"""What the ``vlm_judge`` reward asks a vision-language judge, and how it reads the answer.

A pointwise template turns a prompt into the judge's instruction and an answer into named scores (or
None: the answer does not parse, and the image is unscored). A pairwise template does the same for two
images and answers which one is better.

- ``unifiedreward_v2``: the UnifiedReward-2.0 alignment/coherence/style instruction and its parsing as
  the method's reference implementation has them (Tencent-Hunyuan/Precise, ``precise_sde/rewards/remote.py``,
  ``unifiedreward_score_v2``, commit 9a84f91b5acc634fb22f846acecf40b8c55b3350): each of the three scores
  (1-5) is clipped to [0, 5] and divided by 5, and the score is their average (or their weighted average
  with ``acs_weights``). An answer that lacks any of the three lines does not parse.
- ``score_1_10``: a generic instruction asking for ``Score: N`` with N from 1 to 10; the score is N.
- a file: ``template_file`` holds the instruction, ``{prompt}`` standing for the prompt; ``score_pattern``
  (a regular expression with one group, default ``Score:\\s*(-?\\d+(?:\\.\\d+)?)``) finds the score in the
  answer, the first match counting.
- ``pair_rank`` (pairwise): the UnifiedReward pair-rank instruction of the same repository
  (``precise_sde/rewards/servers/unified_reward/test_api.py``, test 6, same commit): the judge answers
  "Image 1 is better.", "Image 2 is better." or "Both images are equally good."
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

__all__ = [
    "PointwiseTemplate",
    "PairwiseTemplate",
    "UNIFIEDREWARD_V2",
    "SCORE_1_10",
    "PAIR_RANK",
    "DEFAULT_SCORE_PATTERN",
    "unifiedreward_v2_text",
    "parse_unifiedreward_v2",
    "parse_pair_rank",
    "pointwise_template",
    "pairwise_template",
]

UNIFIEDREWARD_V2 = "unifiedreward_v2"
SCORE_1_10 = "score_1_10"
PAIR_RANK = "pair_rank"
DEFAULT_SCORE_PATTERN = r"Score:\s*(-?\d+(?:\.\d+)?)"

_ACS = ("alignment", "coherence", "style")


@dataclass(frozen=True)
class PointwiseTemplate:
    """One image per request: ``text(prompt)`` is the instruction, ``parse(answer)`` the scores or None.

    ``main`` is the field that is the reward's score; the others are logged as its components.
    """

    name: str
    text: Callable[[str], str]
    parse: Callable[[str], dict[str, float] | None]
    main: str


@dataclass(frozen=True)
class PairwiseTemplate:
    """Two images per request; ``parse(answer)`` is 1.0 (image 1 wins), 0.0 (image 2 wins), 0.5 (a tie) or None."""

    name: str
    text: Callable[[str], str]
    parse: Callable[[str], float | None]


def unifiedreward_v2_text(prompt: str) -> str:
    """The instruction of ``unifiedreward_score_v2`` (Precise ``precise_sde/rewards/remote.py``, 9a84f91), verbatim."""
    return (
        "You are presented with a generated image and its associated text caption. "
        "Provide overall assessments along the following axes (each rated from 1 to 5):\n"
        "- Alignment Score: How well the image matches the caption.\n"
        "- Coherence Score: How logically consistent the image is.\n"
        "- Style Score: How aesthetically appealing the image looks.\n\n"
        "Output your evaluation using the format below:\n\n"
        "Alignment Score (1-5): X\n"
        "Coherence Score (1-5): Y\n"
        "Style Score (1-5): Z\n\n"
        f"Your task is provided as follows:\nText Caption: [{prompt}]"
    )


_ACS_PATTERNS = {
    "alignment": re.compile(r"Alignment Score \(1-5\):\s*([\d.]+)"),
    "coherence": re.compile(r"Coherence Score \(1-5\):\s*([\d.]+)"),
    "style": re.compile(r"Style Score \(1-5\):\s*([\d.]+)"),
}


def parse_unifiedreward_v2(answer: str, acs_weights: Mapping[str, float] | None = None) -> dict[str, float] | None:
    """``{"alignment", "coherence", "style", "avg"}`` in [0, 1] from a UnifiedReward-v2 answer, or None.

    As ``_extract_acs_scores`` of the reference: the first match of each line, clipped to [0, 5], over 5;
    ``avg`` their mean, or their mean weighted by ``acs_weights`` when those weights sum to more than 0.
    Where the reference marks an answer missing a line with the sentinel -10, None is returned: the image
    is unscored, not scored -10.
    """
    raw: dict[str, float] = {}
    for key, pattern in _ACS_PATTERNS.items():
        match = pattern.search(answer)
        if not match:
            return None
        try:
            raw[key] = float(match.group(1))
        except ValueError:  # e.g. "4.5." or "..." matched by [\d.]+
            return None
    named = {key: max(0.0, min(value, 5.0)) / 5.0 for key, value in raw.items()}
    total = sum(float((acs_weights or {}).get(k, 0.0)) for k in _ACS)
    if acs_weights and total > 0:
        named["avg"] = sum(named[k] * float(acs_weights.get(k, 0.0)) for k in _ACS) / total
    else:
        named["avg"] = sum(named.values()) / 3.0
    return named


def _score_1_10_text(prompt: str) -> str:
    return (
        "You are presented with a generated image and the text prompt it was generated from. "
        "Rate how well the image matches the prompt and how good it looks, on a scale from 1 (worst) "
        "to 10 (best).\n\n"
        "Answer with one line in the format below and nothing else:\n\n"
        "Score: N\n\n"
        f"Text prompt: [{prompt}]"
    )


def _pattern_parser(pattern: re.Pattern[str], low: float | None, high: float | None) -> Callable:
    def parse(answer: str) -> dict[str, float] | None:
        match = pattern.search(answer)
        if not match:
            return None
        try:
            value = float(match.group(1))
        except (ValueError, IndexError):
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            return None  # a score off the scale the judge was asked for is a misread answer
        return {"score": value}

    return parse


def _pair_rank_text(prompt: str) -> str:
    """The pair-rank instruction (Precise ``servers/unified_reward/test_api.py`` test 6, 9a84f91), verbatim."""
    return (
        "You are given a text caption and two generated images based on that caption. "
        "Your task is to evaluate and compare these images based on two key criteria:\n"
        "1. Alignment with the Caption: Assess how well each image aligns with the provided caption.\n"
        "2. Overall Image Quality: Examine visual quality including clarity, detail, color accuracy, and aesthetics.\n"
        "Compare both images and select the one that better aligns with the caption while exhibiting superior "
        "quality.\n"
        'Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." or '
        '"Both images are equally good."\n'
        f"Your task is provided as follows:\nText Caption: [{prompt}]"
    )


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_VERDICT = re.compile(r"Image\s*([12])\s+is\s+better", re.I)
_TIE = re.compile(r"equally\s+good", re.I)


def parse_pair_rank(answer: str) -> float | None:
    """1.0 when the answer says image 1 is better, 0.0 for image 2, 0.5 for "equally good"; None otherwise.

    The text inside ``<answer>...</answer>`` counts when there is one (UnifiedReward-Think answers so,
    as Pref-GRPO's template asks). An answer naming both images better, or a verdict and a tie, is
    ambiguous and does not parse.
    """
    tagged = _ANSWER_TAG.findall(answer)
    text = tagged[-1] if tagged else answer
    verdicts = {m.group(1) for m in _VERDICT.finditer(text)}
    tie = bool(_TIE.search(text))
    if tie and not verdicts:
        return 0.5
    if len(verdicts) == 1 and not tie:
        return 1.0 if verdicts == {"1"} else 0.0
    return None


def pointwise_template(
    name: str | None,
    template_file: str | None = None,
    score_pattern: str | None = None,
    acs_weights: Mapping[str, float] | None = None,
) -> PointwiseTemplate:
    """The pointwise template ``name`` (``unifiedreward_v2``, ``score_1_10``) or the one in ``template_file``."""
    if template_file is not None:
        path = Path(template_file).expanduser()
        try:
            body = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UserError(f"cannot read the judge's template_file {str(template_file)!r} ({reason})") from None
        if "{prompt}" not in body:
            raise UserError(f"the judge's template_file {str(template_file)!r} has no {{prompt}} placeholder")
        try:
            pattern = re.compile(score_pattern or DEFAULT_SCORE_PATTERN)
        except re.error as exc:
            raise UserError(f"the judge's score_pattern {score_pattern!r} is no regular expression ({exc})") from None
        if pattern.groups != 1:
            raise UserError(f"the judge's score_pattern {pattern.pattern!r} must have exactly one group (the score)")
        return PointwiseTemplate(
            f"file:{path.name}",
            lambda prompt: body.replace("{prompt}", prompt),
            _pattern_parser(pattern, None, None),
            "score",
        )
    if score_pattern is not None:
        raise UserError("the judge's score_pattern applies to a template_file only")
    if acs_weights is not None:
        if not isinstance(acs_weights, Mapping) or set(acs_weights) - set(_ACS):
            raise UserError(f"the judge's acs_weights map alignment, coherence, style to numbers, got {acs_weights!r}")
        if name != UNIFIEDREWARD_V2:
            raise UserError(f"the judge's acs_weights apply to template {UNIFIEDREWARD_V2!r} only")
    if name == UNIFIEDREWARD_V2:
        weights = dict(acs_weights) if acs_weights else None
        return PointwiseTemplate(
            UNIFIEDREWARD_V2, unifiedreward_v2_text, lambda a: parse_unifiedreward_v2(a, weights), "avg"
        )
    if name == SCORE_1_10:
        return PointwiseTemplate(
            SCORE_1_10, _score_1_10_text, _pattern_parser(re.compile(DEFAULT_SCORE_PATTERN), 1.0, 10.0), "score"
        )
    raise UserError(
        f"unknown judge template {name!r}; choose {UNIFIEDREWARD_V2!r}, {SCORE_1_10!r}, {PAIR_RANK!r} (pairwise) "
        "or give a template_file"
    )


def pairwise_template(name: str) -> PairwiseTemplate:
    """The pairwise template ``name`` (``pair_rank``)."""
    if name != PAIR_RANK:
        raise UserError(f"unknown pairwise judge template {name!r}; choose {PAIR_RANK!r}")
    return PairwiseTemplate(PAIR_RANK, _pair_rank_text, parse_pair_rank)
