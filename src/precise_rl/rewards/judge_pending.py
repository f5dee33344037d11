"""Scores of a ``vlm_judge`` batch in flight: what :meth:`.judge.VLMJudge.submit` returns.

``result()`` waits for the answers, parses them with the reward's template (on the caller's thread, so that
the reward's counts and its stops happen there) and returns the fields, ``(B,)`` each.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from .judge_client import Answer
from .judge_pairs import win_rates
from .judge_templates import UNIFIEDREWARD_V2
from .remote import UNSCORED

if TYPE_CHECKING:
    from .judge import VLMJudge

__all__ = ["PendingPointwise", "GroupJob", "PendingPairwise", "PARSE_FAILED"]

#: the extra field: 1 where the judge's answer did not parse (pairwise: the share of a sample's comparisons)
PARSE_FAILED = "parse_failed"


class PendingPointwise:
    def __init__(self, owner: VLMJudge, futures: list[Future], device: torch.device) -> None:
        self._owner, self._futures, self._device = owner, futures, device
        self._result: dict[str, torch.Tensor] | None = None
        self.answers: list[Answer] = []

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def result(self) -> dict[str, torch.Tensor]:
        if self._result is not None:
            return self._result
        owner, n = self._owner, len(self._futures)
        self.answers = [f.result() for f in self._futures]
        scores = [owner.template.parse(a.text) if a.text is not None else None for a in self.answers]
        owner._account(self.answers, [s is not None for s in scores])
        fields: dict[str, torch.Tensor] = {}
        main = owner.template.main
        keys = [main] + sorted({k for s in scores if s for k in s} - {main})
        if owner.template.name == UNIFIEDREWARD_V2:
            keys = [main, "alignment", "coherence", "style"]
        for key in keys:
            values = [s[key] if s and key in s else math.nan for s in scores]
            fields[owner.name if key == main else key] = torch.tensor(values, dtype=torch.float32)
        fields[PARSE_FAILED] = torch.tensor(
            [float(a.text is not None and s is None) for a, s in zip(self.answers, scores, strict=True)]
        )
        fields[UNSCORED] = torch.isnan(fields[owner.name]).float()
        assert all(len(v) == n for v in fields.values())
        self._result = {k: v.to(self._device) for k, v in fields.items()}
        return self._result


class GroupJob:
    """One group's comparisons in flight; verdicts parsed (and counted) once, by whichever result comes first."""

    def __init__(self, n: int, comparisons: list[tuple[int, int]], futures: list[Future]) -> None:
        self.n, self.comparisons, self.futures = n, comparisons, futures
        self.rates: list[tuple[float, int]] | None = None
        self.failed_share: list[float] = []

    def finish(self, owner: VLMJudge) -> None:
        if self.rates is not None:
            return
        n = self.n
        answers = [f.result() for f in self.futures]
        verdicts = [owner.pair_template.parse(a.text) if a.text is not None else None for a in answers]
        owner._account(answers, [v is not None for v in verdicts])
        self.rates = win_rates(n, self.comparisons, verdicts)
        misread = [0] * n
        shown = [0] * n
        for (a, b), answer, v in zip(self.comparisons, answers, verdicts, strict=True):
            for i in (a, b):
                shown[i] += answer.text is not None
                misread[i] += answer.text is not None and v is None
        self.failed_share = [misread[i] / shown[i] if shown[i] else 0.0 for i in range(n)]


class PendingPairwise:
    def __init__(self, owner: VLMJudge, batch: int, device: torch.device) -> None:
        self._owner, self._batch, self._device = owner, batch, device
        self.jobs: dict[int, tuple[GroupJob, int]] = {}  # row -> (its group's job, its place in the group)
        self._result: dict[str, torch.Tensor] | None = None

    def done(self) -> bool:
        return len(self.jobs) == self._batch and all(f.done() for job, _ in self.jobs.values() for f in job.futures)

    def result(self) -> dict[str, torch.Tensor]:
        if self._result is not None:
            return self._result
        owner = self._owner
        if len(self.jobs) < self._batch:
            owner._flush()  # no more rows of the open group are waited for
        rate = torch.full((self._batch,), math.nan)
        judged = torch.zeros(self._batch)
        failed = torch.zeros(self._batch)
        for row, (job, position) in self.jobs.items():
            job.finish(owner)
            rate[row], judged[row] = job.rates[position]
            failed[row] = job.failed_share[position]
        fields = {owner.name: rate, "comparisons": judged, PARSE_FAILED: failed, UNSCORED: torch.isnan(rate).float()}
        self._result = {k: v.float().to(self._device) for k, v in fields.items()}
        return self._result
