"""``vlm_judge``: a reward from a vision-language judge (e.g. UnifiedReward-2.0 on ``vllm serve``).

Pointwise (templates ``unifiedreward_v2``, ``score_1_10`` or a ``template_file``, :mod:`.judge_templates`):
one request per image; the reward is the template's score and its sub-scores are logged beside it.
Pairwise (template ``pair_rank``): the judge compares pairs of images of one group (``pairs``,
:mod:`.judge_pairs`) and a sample's reward is its win rate in its group. Requests go out in the background
as soon as a chunk of rollouts is submitted (:meth:`VLMJudge.submit`), so the judge works while the next
chunk is sampled; transport, retries and round-robin are :mod:`.judge_client`'s.

Every image also gets ``parse_failed`` (1 where the answer did not parse; pairwise: the share of its
comparisons whose answer did not) and ``unscored`` (1 where it has no score: NaN, left out of training
and counted by the trainer). When more than ``max_parse_failures`` of the last ``parse_window`` answers
did not parse, the reward stops the run (the trainer saves a checkpoint first) with one sentence naming
the server, the model and an example answer; a server that gives no answer at all in ``stop_after``
calls in a row, or refuses the key, or has no such model, stops it too.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..errors import UserError
from .base import Reward, register_reward
from .failures import RewardServerDown, RewardServerRejected, RewardUnavailable
from .judge_client import API_KEY_ENV, Answer, JudgeClient, encode_image, encode_video, read_api_key
from .judge_pairs import check_pairs, group_pairs, group_runs
from .judge_pending import PARSE_FAILED, GroupJob, PendingPairwise, PendingPointwise
from .judge_templates import PAIR_RANK, UNIFIEDREWARD_V2, pairwise_template, pointwise_template
from .video import parse_frames, resolve_frames

__all__ = ["VLMJudge", "PARSE_FAILED"]


def _number(value: Any, name: str, *, integer: bool = False, zero: bool = False, at_most: float | None = None) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        kind = "integer" if integer else "number"
        raise UserError(f"the judge's option {name} must be a {'non-negative' if zero else 'positive'} {kind}")
    if at_most is not None and value > at_most:
        raise UserError(f"the judge's option {name} must be at most {at_most:g}, got {value!r}")
    return value


@register_reward("vlm_judge")
class VLMJudge(Reward):
    """A vision-language judge behind an OpenAI-compatible API (see the module's text for the options' effect).

    ``url``: a server's root or ``/v1`` URL, or a list of them (requests go round-robin). ``model``: the
    served model name (the reference serves UnifiedReward as ``UnifiedReward``). The key: the environment
    variable ``api_key_env`` (default ``PRECISE_RL_JUDGE_API_KEY``; a server without a key needs none) or
    the file ``api_key_file``. ``resolution``: the longer side images are sent at (None: as generated);
    ``image_format``: ``jpeg`` (quality 95, as the reference) or ``png``. Videos: ``frames`` (as in
    :mod:`.video`) sends those frames together, in order, as one sample's images; ``video: mp4`` sends each
    video whole as an H.264 MP4 at ``fps`` frames a second (a ``video_url`` part, for a server that takes
    videos, as vLLM does for Qwen-VL models).
    """

    may_fail = True
    accepts_video = True

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        model: str = "UnifiedReward",
        template: str = UNIFIEDREWARD_V2,
        template_file: str | None = None,
        score_pattern: str | None = None,
        acs_weights: Mapping[str, float] | None = None,
        pairs: str | int = "all",
        api_key_env: str | None = API_KEY_ENV,
        api_key_file: str | None = None,
        concurrency: int = 16,
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        resolution: int | None = 512,
        image_format: str = "jpeg",
        max_tokens: int = 256,
        temperature: float = 0.0,
        frames: Any = None,
        video: str = "frames",
        fps: int = 8,
        max_parse_failures: float = 0.5,
        parse_window: int = 32,
        stop_after: int = 2,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url) if isinstance(url, (list, tuple)) else []
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise UserError(
                "the vlm_judge reward needs url: the judge server's address, e.g. "
                f"reward.options.vlm_judge.url=http://127.0.0.1:8080 (or a list of them), got {url!r}"
            )
        if not isinstance(model, str) or not model:
            raise UserError(f"the judge's model must be the served model's name, got {model!r}")
        self.pairwise = template == PAIR_RANK and template_file is None
        if self.pairwise:
            if score_pattern is not None or acs_weights is not None:
                raise UserError(f"the judge's score_pattern and acs_weights do not apply to template {PAIR_RANK!r}")
            self.pair_template = pairwise_template(template)
            self.pairs = check_pairs(pairs)
        else:
            self.template = pointwise_template(template, template_file, score_pattern, acs_weights)
            if pairs != "all":
                raise UserError(f"the judge's pairs option applies to the pairwise template {PAIR_RANK!r} only")
        if image_format not in ("jpeg", "png"):
            raise UserError(f"the judge's image_format must be 'jpeg' or 'png', got {image_format!r}")
        self.resolution = None if resolution is None else _number(resolution, "resolution", integer=True)
        self.image_format = image_format
        self.frames = None if frames is None else parse_frames(frames, "vlm_judge")
        if video not in ("frames", "mp4"):
            raise UserError(f"the judge's video option must be 'frames' or 'mp4', got {video!r}")
        if video == "mp4" and self.frames is not None:
            raise UserError("the judge's video: mp4 sends whole videos: remove the frames option")
        self.video = video
        self.fps = _number(fps, "fps", integer=True)
        self.max_parse_failures = float(_number(max_parse_failures, "max_parse_failures", zero=True, at_most=1.0))
        self.parse_window = _number(parse_window, "parse_window", integer=True)
        self.stop_after = _number(stop_after, "stop_after", integer=True)
        self.client = JudgeClient(
            urls,
            model,
            read_api_key(api_key_env, api_key_file),
            concurrency=_number(concurrency, "concurrency", integer=True),
            timeout=float(_number(timeout, "timeout")),
            retries=_number(retries, "retries", integer=True, zero=True),
            backoff=float(_number(backoff, "backoff", zero=True)),
            backoff_max=float(_number(backoff_max, "backoff_max", zero=True)),
            max_tokens=_number(max_tokens, "max_tokens", integer=True),
            temperature=float(_number(temperature, "temperature", zero=True)),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._recent: collections.deque[bool] = collections.deque(maxlen=self.parse_window)  # True: parsed
        self.down_streak = 0  #: calls in a row that got no answer at all
        self._open: list[tuple[Any, str, list[str]]] = []  # pairwise: the last group's rows, not yet judged
        self.stats = {"answers": 0, "parse_failures": 0, "unanswered": 0}

    # ------------------------------------------------------------------ helpers

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pool=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                workers = self.client.concurrency * len(self.client.urls)
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vlm-judge")
            return self._pool

    def _encode(self, sample: torch.Tensor) -> list[str]:
        """One sample's images as data URLs: the image, or the chosen frames of a video."""
        if sample.ndim == 4 and self.video == "mp4":
            return [encode_video(sample, self.resolution, self.fps)]
        if sample.ndim == 4:
            idx = resolve_frames(self.frames, sample.shape[0], self.name)
            return [encode_image(sample[k], self.resolution, self.image_format) for k in idx]
        return [encode_image(sample, self.resolution, self.image_format)]

    def _check(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> None:
        channels = images.shape[2] if images.ndim == 5 else images.shape[1] if images.ndim == 4 else 0
        if channels not in (1, 3):
            raise UserError(
                f"reward {self.name!r} needs images (B, 1 or 3, H, W) or videos (B, F, 1 or 3, H, W), "
                f"got {tuple(images.shape)}"
            )
        if images.ndim == 5 and self.frames is None and self.video != "mp4":
            raise UserError(
                f"reward {self.name!r} was given videos: set reward.options.{self.name}.frames (e.g. "
                f"first,middle,last) to the frames the judge is shown, or .video: mp4 to send them whole"
            )
        if images.ndim == 4 and (self.frames is not None or self.video == "mp4"):
            raise UserError(
                f"reward {self.name!r} has a frames option, which picks frames of videos, but it was given images "
                f"shaped {tuple(images.shape)}: remove the option for an image model"
            )
        if len(prompts) != images.shape[0] or len(metadata) != images.shape[0]:
            raise UserError(
                f"reward {self.name!r} got {images.shape[0]} images, {len(prompts)} prompts, {len(metadata)} metadata"
            )

    def max_score(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        if self.pairwise or self.template.name == UNIFIEDREWARD_V2:
            return torch.ones(len(prompts))
        if self.template.name == "score_1_10":
            return torch.full((len(prompts),), 10.0)
        return None

    # ------------------------------------------------------------------ scoring

    def submit(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
        groups: Sequence[Any] | None = None,
    ) -> Any:
        """Send the batch's requests; ``.result()`` waits for the scores.

        ``groups``: each row's group (consecutive rows of a group); without it, consecutive rows with the
        same prompt form a group. Pairwise, a group whose last rows may still come in the next call is
        judged when they do, or when a result is asked for.
        """
        self._check(images, prompts, metadata)
        cpu = images.detach().cpu()
        if self.pairwise:
            keys = list(groups) if groups is not None else list(prompts)
            if len(keys) != cpu.shape[0]:
                raise UserError(f"reward {self.name!r} got {len(keys)} group ids for {cpu.shape[0]} images")
            pending = PendingPairwise(self, cpu.shape[0], images.device)
            rows = [(pending, i, keys[i], prompts[i], self._encode(cpu[i])) for i in range(cpu.shape[0])]
            self._add_rows(rows)
            return pending
        pool = self._executor()
        futures = [
            pool.submit(self._ask_one, cpu[i], prompts[i], self.client.next_server()) for i in range(cpu.shape[0])
        ]
        return PendingPointwise(self, futures, images.device)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        return self.submit(images, prompts, metadata).result()

    def _ask_one(self, sample: torch.Tensor, prompt: str, server: int) -> Answer:
        return self.client.ask(self._encode(sample), self.template.text(prompt), server)

    # pairwise: rows wait in ``_open`` until their group is complete (a row of another group came after)

    def _add_rows(self, rows: list[tuple]) -> None:
        with self._lock:
            buffered = self._open + rows
            runs = group_runs([row[2] for row in buffered])
            closed, self._open = runs[:-1], [buffered[i] for i in runs[-1]] if runs else []
        for run in closed:
            self._judge_group([buffered[i] for i in run])

    def _flush(self) -> None:
        with self._lock:
            rows, self._open = self._open, []
        if rows:
            self._judge_group(rows)

    def _judge_group(self, rows: list[tuple]) -> None:
        comparisons = group_pairs(len(rows), self.pairs)
        text = self.pair_template.text(rows[0][3])
        pool = self._executor()
        futures = [
            pool.submit(self.client.ask, rows[a][4] + rows[b][4], text, self.client.next_server())
            for a, b in comparisons
        ]
        job = GroupJob(len(rows), comparisons, futures)
        for position, (pending, i, *_rest) in enumerate(rows):
            pending.jobs[i] = (job, position)

    # ------------------------------------------------------------------ bookkeeping (on the caller's thread)

    def _account(self, answers: Sequence[Answer], parsed: Sequence[bool]) -> None:
        """Count the answers, raise for a refused key / unknown model / dead server / too many misreads."""
        for answer in answers:
            if answer.kind == "rejected":
                raise RewardServerRejected(
                    f"judge server {answer.server} refused the API key ({answer.reason}); set the environment "
                    f"variable named by reward.options.{self.name}.api_key_env, or api_key_file"
                )
            if answer.kind == "missing":
                raise UserError(
                    f"judge server {answer.server} has no model {self.client.model!r} ({answer.reason}); see "
                    f"precise-rl probe-judge --url {answer.server} for the models it serves"
                )
        got = [a for a in answers if a.text is not None]
        self.stats["unanswered"] += len(answers) - len(got)
        if answers and not got:
            self.down_streak += 1
            if self.down_streak >= self.stop_after:
                failed = answers[-1]
                raise RewardServerDown(
                    f"judge server {failed.server} gave no answer in {self.down_streak} calls in a row "
                    f"({failed.reason})"
                )
        elif got:
            self.down_streak = 0
        example = None
        for answer, ok in zip(answers, parsed, strict=True):
            if answer.text is None:
                continue
            self.stats["answers"] += 1
            self._recent.append(ok)
            if not ok:
                self.stats["parse_failures"] += 1
                example = answer
        bad = sum(not ok for ok in self._recent)
        if (
            example is not None
            and len(self._recent) == self.parse_window
            and bad > self.max_parse_failures * len(self._recent)
        ):
            what = self.pair_template.name if self.pairwise else self.template.name
            shown = example.text if len(example.text) <= 200 else example.text[:200] + "..."
            raise RewardUnavailable(
                f"{bad} of the last {len(self._recent)} answers of judge server {example.server} (model "
                f"{self.client.model!r}) do not parse as template {what!r}, over the limit of "
                f"{self.max_parse_failures:.0%} (max_parse_failures), e.g. {shown!r}"
            )

    def close(self) -> None:
        """Stop the worker threads and close the connections."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            self._open = []
        self.client.close()
