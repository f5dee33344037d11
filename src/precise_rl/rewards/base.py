"""The reward interface, the registry of rewards by name, and the weighted combination.

A reward maps a batch of images ``(B, C, H, W)`` (floats in [0, 1]; a video model's batch is videos
``(B, F, C, H, W)``, which image rewards score through their ``frames`` option, :mod:`.video`), their
prompts and their metadata dicts to named ``(B,)`` float32 scores. ``RewardSet`` scores a batch with several
rewards; ``combine_rewards`` z-scores each over the batch and sums them with weights
(``docs/math.md`` section 5). A score that is NaN or infinite, from any reward, marks an
image the reward could not score: it becomes NaN, and an image that a reward of non-zero weight
could not score is left out of the statistics and of training (the trainer counts it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..config import MAX_REWARD_WEIGHT
from ..errors import UserError
from ..registries import add_entry, check_name
from .failures import RewardUnavailable

__all__ = [
    "Reward",
    "FunctionReward",
    "RewardSet",
    "PendingRewards",
    "concat_components",
    "register_reward",
    "build_reward",
    "available_rewards",
    "combine_rewards",
    "weighted_raw",
    "check_weights",
]

ZSCORE_EPS = 1e-8


class Reward(ABC):
    """A scorer: ``reward(images, prompts, metadata) -> {field: (B,) float32 tensor}``.

    One field carries the reward's own name (the one a weight applies to); more fields are
    extra measurements that get logged.
    """

    #: the registry name (or import path) this reward was built under
    name: str = ""
    #: True for a reward that is expected to fail on some images (a remote one, whose server may
    #: not answer). Any reward's NaN or infinite score marks an image unscored, which
    #: ``combine_rewards`` passes on and the trainer leaves out and counts; the trainer also warns
    #: (once) when a reward with ``may_fail`` False does so
    may_fail: bool = False
    #: True for a reward that scores videos ``(B, F, C, H, W)`` itself; an image reward scores videos
    #: only through its ``frames`` option (:mod:`.video`)
    accepts_video: bool = False

    @abstractmethod
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]: ...

    def max_score(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        """The highest score any image could get for each prompt, ``(B,)``; None where it has no known bound.

        It tells how much headroom a reward curve has: a target that every sampler reaches because the
        reward cannot go higher says nothing about which sampler learns faster.
        """
        return None


class FunctionReward(Reward):
    """A plain function ``f(images, prompts, metadata)`` returning a ``(B,)`` tensor or a dict, as a Reward."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        # a plain function that scores videos says so with an attribute ``accepts_video = True``
        self.accepts_video = bool(getattr(fn, "accepts_video", False))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        out = self.fn(images, prompts, metadata)
        return dict(out) if isinstance(out, Mapping) else {self.name: out}


_REGISTRY: dict[str, Any] = {}


def register_reward(name: str) -> Callable[[Any], Any]:
    """Class or function decorator: make a reward buildable by ``name``."""
    check_name(name, "a reward", forbidden=":@")  # ':' marks an import path, '@' a label

    def decorate(obj: Any) -> Any:
        return add_entry(_REGISTRY, name, obj, "a reward")

    return decorate


def _load_builtins() -> None:
    # the built-in rewards register themselves on import
    from . import image  # noqa: F401


def available_rewards() -> list[str]:
    """Names of the registered rewards (import paths ``package.module:Name`` work too)."""
    _load_builtins()
    return sorted(_REGISTRY)


def _resolve(name: str) -> Any:
    if not isinstance(name, str) or not name:
        raise UserError(f"a reward name must be a non-empty string, got {name!r}")
    # "name@label" is reward "name" under its own label: the same reward twice with other options
    name = name.split("@", 1)[0]
    if not name:
        raise UserError("a reward name must not start with '@' (write 'name@label', e.g. 'remote@hps')")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not module_name or module_name.startswith(".") or not attr:
            raise UserError(f"reward {name!r} is not an import path of the form 'package.module:Name'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"cannot import the module of reward {name!r} ({exc})") from None
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise UserError(f"module {module_name!r} has no attribute {attr!r} (reward {name!r})")
            obj = getattr(obj, part)
        return obj
    _load_builtins()
    if name not in _REGISTRY:
        raise UserError(
            f"unknown reward {name!r}; choose one of {sorted(_REGISTRY)} or give an import path 'package.module:Name'"
        )
    return _REGISTRY[name]


def _accepts(obj: Any, param: str) -> bool:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return param in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Build a registered reward, or one given by import path ``"package.module:ClassOrFunction"``.

    A class is instantiated with ``kwargs``; a function is bound to them. The result always
    behaves as a :class:`Reward` named ``name``. ``"name@label"`` builds reward ``name`` under the
    label: its scores are keyed ``"name@label"``, so one reward can be used twice with other options.
    Option ``frames`` of an image reward makes it score those frames of videos (:mod:`.video`).
    """
    obj = _resolve(name)
    frames = None
    if "frames" in kwargs and not _accepts(obj, "frames"):  # a reward with a frames option of its own keeps it
        kwargs = dict(kwargs)
        frames = kwargs.pop("frames")
    if inspect.isclass(obj):
        try:
            instance = obj(**kwargs)
        except TypeError as exc:
            raise UserError(f"cannot build reward {name!r} with options {sorted(kwargs)}: {exc}") from None
    elif callable(obj):
        if kwargs:
            unknown = [k for k in kwargs if not _accepts(obj, k)]
            if unknown:
                raise UserError(f"reward {name!r} takes no options {unknown}")
        instance = functools.partial(obj, **kwargs) if kwargs else obj
    else:
        raise UserError(f"reward {name!r} is neither a class nor a function ({type(obj).__name__})")
    if not isinstance(instance, Reward):
        if not callable(instance):
            raise UserError(f"reward {name!r} built a non-callable {type(instance).__name__}")
        instance = FunctionReward(name, instance)
    instance.name = name
    if frames is not None:
        from .video import frame_reward  # video.py builds on this module

        instance = frame_reward(instance, frames)
    return instance


def check_weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """Validate reward weights (names to finite numbers); UserError otherwise."""
    if not isinstance(weights, Mapping) or not weights:
        raise UserError(f"reward weights must be a non-empty mapping of reward name to number, got {weights!r}")
    out: dict[str, float] = {}
    for name, w in weights.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"reward names must be non-empty strings, got {name!r}")
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
            raise UserError(f"the weight of reward {name!r} must be a finite number, got {w!r}")
        if abs(float(w)) > MAX_REWARD_WEIGHT:
            raise UserError(
                f"the weight of reward {name!r} is {w!r}, beyond the limit of {MAX_REWARD_WEIGHT:g} in size (the "
                "weighted reward would overflow); only the ratios of the weights matter, so scale them down"
            )
        out[name] = float(w)
    return out


def _zscore(r: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:
    r = r.detach().to(torch.float64)
    # NaN marks an image a reward could not score: the statistics use the scored images only
    scored = ~torch.isnan(r) if scored is None else scored
    if not bool(scored.any()):
        return torch.full_like(r, math.nan)
    ok = r[scored]
    # population std: a batch of one, or a constant component, then contributes exactly 0
    z = (r - ok.mean()) / (ok.std(correction=0) + ZSCORE_EPS)
    return torch.where(scored, z, torch.full_like(z, math.nan))


def _pick(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> list[tuple[torch.Tensor, float]]:
    missing = [n for n in weights if n not in components]
    if missing:
        raise ValueError(f"no scores for rewards {missing}; scored: {sorted(components)}")
    return [(components[n], float(w)) for n, w in weights.items()]


def combine_rewards(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k w_k * (r_k - mean(r_k)) / (std(r_k) + 1e-8)`` over the batch, ``(B,)`` float32.

    ``std`` is the population std (no Bessel correction); a constant component contributes 0.
    An image that a reward of non-zero weight could not score (NaN) gets a NaN combined reward and
    is left out of every component's mean and std, so the statistics are those of the images that
    are trained on; components of weight 0 are only logged and never count.
    """
    pairs = [(r, w) for r, w in _pick(components, weights) if w != 0]
    if not pairs:
        return torch.zeros_like(next(iter(components.values())), dtype=torch.float32)
    scored = torch.stack([~torch.isnan(r) for r, _ in pairs]).all(dim=0)
    total = sum(w * _zscore(r, scored) for r, w in pairs)
    return total.to(torch.float32)


def weighted_raw(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_k w_k * r_k`` on the raw scores, ``(B,)`` float32: a human-readable reward curve.

    NaN where a reward of non-zero weight could not score the image (see :func:`combine_rewards`).
    """
    pairs = [(r, w) for r, w in _pick(components, weights) if w != 0]
    if not pairs:
        return torch.zeros_like(next(iter(components.values())), dtype=torch.float32)
    total = sum(w * r.detach().to(torch.float64) for r, w in pairs)
    return total.to(torch.float32)


def _as_components(name: str, out: Any, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A reward's output as ``{key: (batch,) float32}``; NaN or inf (an image it could not score) becomes NaN."""
    if not isinstance(out, Mapping):
        out = {name: out}
    if not out:
        raise UserError(f"reward {name!r} returned no scores")
    if name not in out:
        if len(out) != 1:
            raise UserError(f"reward {name!r} returned fields {sorted(out)}; one of them must be named {name!r}")
        out = {name: next(iter(out.values()))}
    result: dict[str, torch.Tensor] = {}
    for field, value in out.items():
        key = name if field == name else f"{name}/{field}"
        t = torch.as_tensor(value).detach().to(device=device, dtype=torch.float32)
        if t.shape != (batch,):
            raise UserError(f"reward {key!r} returned shape {tuple(t.shape)}; expected ({batch},), one score per image")
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            t = t.masked_fill(bad, math.nan)
        result[key] = t
    return result


@contextlib.contextmanager
def _named_failure(name: str) -> Any:
    """Any exception of reward ``name`` (but ``UserError`` and ``RewardUnavailable``, which say what to do) as a
    ``UserError`` naming the reward: a bug or an exhausted device in a reward is one sentence, not a traceback."""
    try:
        yield
    except (UserError, RewardUnavailable):
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise UserError(f"reward {name!r} raised {detail}") from exc


class RewardSet:
    """Several rewards with weights: ``score`` gives every raw component, ``combine`` the training signal.

    ``weights`` maps reward names (or import paths) to finite floats; a weight of 0 scores and
    logs a reward without training on it. ``kwargs`` maps a reward name to the options it is
    built with, e.g. ``RewardSet({"jpeg_compressibility": 1.0}, "cpu", jpeg_compressibility={"quality": 80})``;
    ``device`` is passed to every reward that takes one. An exception a reward raises while scoring
    (other than ``UserError`` and ``RewardUnavailable``) comes out as a ``UserError`` naming the reward.
    """

    def __init__(
        self, weights: Mapping[str, float], device: str | torch.device = "cpu", **kwargs: Mapping[str, Any]
    ) -> None:
        self.weights = check_weights(weights)
        self.device = torch.device(device)
        stray = sorted(set(kwargs) - set(self.weights))
        if stray:
            raise UserError(f"options given for rewards {stray} that have no weight; weighted: {sorted(self.weights)}")
        self.rewards: dict[str, Reward] = {}
        for name in self.weights:
            options = dict(kwargs.get(name) or {})
            if "device" not in options and _accepts(_resolve(name), "device"):
                options["device"] = self.device
            self.rewards[name] = build_reward(name, **options)

    @property
    def wants_groups(self) -> bool:
        """True when a reward's ``submit`` takes each row's group (``groups``, see :meth:`submit`)."""
        return any(callable(getattr(r, "submit", None)) and _accepts(r.submit, "groups") for r in self.rewards.values())

    def _check_batch(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None
    ) -> list[Mapping[str, Any]]:
        if images.ndim not in (4, 5):
            raise UserError(
                f"rewards need images shaped (B, C, H, W) or videos shaped (B, F, C, H, W), got {tuple(images.shape)}"
            )
        if images.ndim == 5:
            from .video import needs_frames_sentence

            for name, reward in self.rewards.items():
                if not getattr(reward, "accepts_video", False):
                    raise UserError(needs_frames_sentence(name))
        batch = images.shape[0]
        metadata = [{} for _ in range(batch)] if metadata is None else list(metadata)
        if len(prompts) != batch or len(metadata) != batch:
            raise UserError(f"got {batch} images, {len(prompts)} prompts and {len(metadata)} metadata entries")
        return metadata

    @torch.no_grad()
    def submit(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
        groups: Sequence[Any] | None = None,
    ) -> PendingRewards:
        """Start scoring a batch; ``.result()`` gives what :meth:`score` returns.

        Rewards with a ``submit`` method (``remote``, ``geneval``, ``vlm_judge``) send their requests and
        return at once, their scores arriving in the background; the others are computed here, meanwhile.
        A caller that submits each chunk of a rollout as soon as it is decoded overlaps the
        servers' scoring with the rollout of the next chunk. ``groups`` (each row's group id, a group's
        rows consecutive) goes to the rewards whose ``submit`` takes it (a pairwise ``vlm_judge``).
        """
        metadata = self._check_batch(images, prompts, metadata)
        images = images.to(self.device)
        prompts = list(prompts)
        started: dict[str, Any] = {}
        for name, reward in self.rewards.items():
            if callable(getattr(reward, "submit", None)):
                with _named_failure(name):
                    if groups is not None and _accepts(reward.submit, "groups"):
                        started[name] = reward.submit(images, prompts, metadata, groups=list(groups))
                    else:
                        started[name] = reward.submit(images, prompts, metadata)
        done: dict[str, Any] = {}
        for name, reward in self.rewards.items():
            if name not in started:
                with _named_failure(name):
                    done[name] = reward(images, prompts, metadata)
        return PendingRewards(self, started, done, images.shape[0])

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every reward's fields, ``(B,)`` float32 each on ``device`` (extra fields as ``"name/field"``)."""
        return self.submit(images, prompts, metadata).result()

    __call__ = score

    def combine(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The z-scored weighted sum (see :func:`combine_rewards`)."""
        return combine_rewards(components, self.weights)

    def weighted_raw(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of raw scores (see :func:`weighted_raw`)."""
        return weighted_raw(components, self.weights)

    def max_weighted_raw(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        """The highest weighted raw reward of each prompt, where every weighted reward knows its maximum."""
        total = torch.zeros(len(prompts), dtype=torch.float64)
        for name, reward in self.rewards.items():
            w = self.weights[name]
            if w == 0:
                continue
            if w < 0:  # the highest weighted value of a reward with a negative weight is its minimum
                return None
            best = reward.max_score(prompts, metadata)
            if best is None:
                return None
            total += w * torch.as_tensor(best, dtype=torch.float64).cpu()
        return total


class PendingRewards:
    """A batch being scored by a :class:`RewardSet` (see :meth:`RewardSet.submit`)."""

    def __init__(self, owner: RewardSet, started: dict[str, Any], done: dict[str, Any], batch: int) -> None:
        self._owner, self._started, self._done, self._batch = owner, started, done, batch
        self._result: dict[str, torch.Tensor] | None = None

    def done(self) -> bool:
        """True once every reward has its scores (``result()`` then returns without waiting)."""
        return all(pending.done() for pending in self._started.values() if callable(getattr(pending, "done", None)))

    def result(self) -> dict[str, torch.Tensor]:
        """Wait for every reward; the components as :meth:`RewardSet.score` gives them (computed once)."""
        if self._result is None:
            owner = self._owner
            components: dict[str, torch.Tensor] = {}
            for name in owner.rewards:
                with _named_failure(name):
                    out = self._started[name].result() if name in self._started else self._done[name]
                    components.update(_as_components(name, out, self._batch, owner.device))
            self._result = components
        return self._result


def concat_components(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The components of consecutive chunks of a batch (each from :meth:`RewardSet.score`) as one batch's.

    A field that some chunks lack (an extra field of a remote reward whose server answered none of a
    chunk's requests) is NaN for those chunks' images: the batch has every field any chunk has.
    """
    if not parts:
        raise ValueError("no reward components to concatenate")
    keys: list[str] = []
    for part in parts:
        keys += [k for k in part if k not in keys]
    filled = []
    for k, part in enumerate(parts):
        if not part:
            raise ValueError(f"chunk {k} has no reward fields")
        like = next(iter(part.values()))
        filled.append({key: part[key] if key in part else torch.full_like(like, math.nan) for key in keys})
    return {key: torch.cat([part[key] for part in filled]) for key in keys}
