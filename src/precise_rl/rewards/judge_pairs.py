"""Which pairs of a group a pairwise judge compares, and each sample's win rate from the verdicts.

A sample's reward is its win rate within its group, as in Pref-GRPO (CodeGoat24/Pref-GRPO,
``fastvideo/rewards/unifiedreward_think.py``, ``_pairwise_win_rate`` and ``cal_win_rate_images``, commit
3e787f6dd5a3051b40d61f07e9578468ac26130a): the share of its comparisons that it won, a tie counting one
half. Where Pref-GRPO counts an answer without a verdict as a tie, here it counts for neither sample and
is a parse failure (counted, and stopping the run past the limit), so that a misreading judge does not
pull every win rate toward one half unseen. With ``pairs="all"`` every pair of a group of ``n``
is judged once: ``n(n-1)/2`` calls. With ``pairs=k`` (an integer) each sample ``i`` is compared with
``i+1, ..., i+k`` (indices modulo ``n``): ``n*k`` calls (fewer where ``2k >= n``, where this reaches every
pair), and every sample is in ``2k`` comparisons, so every win rate has the same weight. The order in
which the two images of a pair are shown alternates from pair to pair, so that a judge that prefers the
first (or second) image it sees favours no sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import UserError

__all__ = ["check_pairs", "group_pairs", "pairs_per_group", "win_rates", "group_runs"]


def check_pairs(pairs: object) -> str | int:
    """The ``pairs`` option checked: ``"all"`` or a positive integer."""
    if pairs == "all":
        return "all"
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise UserError(f"the judge's pairs option must be 'all' or a positive integer, got {pairs!r}")
    return pairs


def group_pairs(n: int, pairs: str | int) -> list[tuple[int, int]]:
    """The comparisons of a group of ``n``: ``(shown first, shown second)`` indices, each pair once."""
    if pairs == "all" or 2 * int(pairs) >= n - 1:
        unordered = [(i, j) for i in range(n) for j in range(i + 1, n)]
    else:
        seen: set[tuple[int, int]] = set()
        unordered = []
        for d in range(1, int(pairs) + 1):
            for i in range(n):
                a, b = sorted((i, (i + d) % n))
                if (a, b) not in seen:
                    seen.add((a, b))
                    unordered.append((a, b))
    return [(a, b) if k % 2 == 0 else (b, a) for k, (a, b) in enumerate(unordered)]


def pairs_per_group(n: int, pairs: str | int) -> int:
    """The number of judge calls for a group of ``n``."""
    return len(group_pairs(n, pairs))


def win_rates(n: int, comparisons: Sequence[tuple[int, int]], verdicts: Sequence[float | None]) -> list[tuple]:
    """``(win rate, comparisons judged)`` of each of ``n`` samples.

    ``verdicts[k]`` is 1.0 when the first image of ``comparisons[k]`` won, 0.0 when the second did, 0.5
    for a tie and None when the answer did not parse (or the call failed): that comparison counts for
    neither sample. A sample none of whose comparisons was judged has win rate NaN (unscored).
    """
    wins = [0.0] * n
    judged = [0] * n
    for (a, b), v in zip(comparisons, verdicts, strict=True):
        if v is None:
            continue
        wins[a] += v
        wins[b] += 1.0 - v
        judged[a] += 1
        judged[b] += 1
    return [(wins[i] / judged[i] if judged[i] else math.nan, judged[i]) for i in range(n)]


def group_runs(keys: Sequence[object]) -> list[list[int]]:
    """The indices of ``keys`` grouped into runs of equal consecutive keys (a group's rows are consecutive)."""
    runs: list[list[int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
