"""Task registry: a config's ``model.name`` becomes a policy plus its task (prompts, rewards).

``digits`` and ``signs`` are the built-in tasks; every adapter of :data:`precise_rl.policies.registry.ADAPTERS`
(``@register_policy``) is a model name with the animal prompts (an editing model: the drawn scenes of
:mod:`.edits`), and ``diffusers`` picks the adapter from the pipeline's ``model_index.json``. A model
with prompts and rewards of its own is one builder function under ``@register_task``; a task passed to
``Trainer(..., task=TaskSpec(...))`` needs neither.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import UserError
from ..policies import Policy
from ..policies.diffusers_base import detect_adapter
from ..policies.edit import EditPrompt, check_image_file, with_source_metadata
from ..policies.registry import ADAPTERS
from ..registries import add_entry, check_name
from . import animals, digits, edits, signs  # digits: its rewards register by name on import

__all__ = [
    "TaskSpec",
    "TASKS",
    "build_task",
    "digits_task",
    "signs_task",
    "model_names",
    "read_prompt_file",
    "read_edit_prompts",
    "register_task",
]


@dataclass
class TaskSpec:
    """A policy and what training it needs besides the model."""

    policy: Policy
    train_prompts: list[str]
    eval_prompts: list[str]
    metadata: Callable[[list[str]], list[dict]] = lambda prompts: [{} for _ in prompts]
    default_rewards: dict[str, float] = field(default_factory=dict)
    #: rewards scored at evaluation only (e.g. a held-out classifier)
    eval_rewards: dict[str, float] = field(default_factory=dict)
    #: reward name -> options the task's images need (e.g. ``ocr``'s ``detect: false`` for one-line images);
    #: a config's ``reward.options`` entry for the same reward overrides them key by key
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # an editing prompt's source image reaches the rewards whatever the task's own metadata holds
        self.metadata = with_source_metadata(self.metadata)


def _digits(model_cfg: Any, device: torch.device) -> TaskSpec:
    return digits_task(digits.DigitsPolicy.from_pretrained(model_cfg.path, device=device, **model_cfg.options))


def digits_task(policy: Policy) -> TaskSpec:
    """The built-in digits task (prompts, metadata, rewards) around a digits velocity network."""
    return TaskSpec(
        policy=policy,
        train_prompts=list(digits.train_prompts()),
        eval_prompts=list(digits.eval_prompts()),
        metadata=digits.prompt_metadata,
        default_rewards=dict(digits.DEFAULT_REWARD_WEIGHTS),
        eval_rewards={"digit_recognised": 1.0},
    )


def _signs(model_cfg: Any, device: torch.device) -> TaskSpec:
    return signs_task(signs.SignsPolicy.from_pretrained(model_cfg.path, device=device, **model_cfg.options))


def signs_task(policy: Policy) -> TaskSpec:
    """The built-in signs task (prompts with a quoted word, the ``ocr`` reward) around a signs velocity network."""
    return TaskSpec(
        policy=policy,
        train_prompts=signs.train_prompts(),
        eval_prompts=signs.eval_prompts(),
        metadata=signs.prompt_metadata,
        default_rewards=dict(signs.DEFAULT_REWARD_WEIGHTS),
        reward_options={"ocr": dict(signs.OCR_OPTIONS)},
    )


def _diffusers_builder(adapter: str | None) -> Callable[[Any, torch.device], TaskSpec]:
    """A builder for a diffusers-pipeline adapter (``None``: chosen from the pipeline's model_index.json)."""

    def build(model_cfg: Any, device: torch.device) -> TaskSpec:
        name = adapter
        if name is None:
            if not model_cfg.path:
                raise UserError("model 'diffusers' needs config key 'model.path' (a pipeline directory or hub id)")
            name = detect_adapter(model_cfg.path, model_cfg.revision)
        policy = ADAPTERS[name].from_pretrained(
            model_cfg.path, model_cfg.revision, model_cfg.dtype, device, **model_cfg.options
        )
        prompts = edits if getattr(policy, "edits_images", False) else animals  # editing models: drawn scenes
        return TaskSpec(
            policy=policy,
            train_prompts=prompts.train_prompts(),
            eval_prompts=prompts.eval_prompts(),
        )

    return build


#: task name -> builder(model_cfg, device) -> TaskSpec, filled by :func:`register_task`. Every adapter of
#: ``ADAPTERS`` is a model name besides these (with the animal prompts, an editing model with the drawn scenes),
#: looked up when a run is built.
TASKS: dict[str, Callable[[Any, torch.device], TaskSpec]] = {}

B = TypeVar("B", bound=Callable[[Any, torch.device], TaskSpec])


def register_task(name: str) -> Callable[[B], B]:
    """Decorator: make ``builder(model_cfg, device) -> TaskSpec`` the task of model name ``name``."""
    check_name(name, "a task")

    def decorate(builder: B) -> B:
        return add_entry(TASKS, name, builder, "a task")

    return decorate


register_task("digits")(_digits)
register_task("signs")(_signs)
# any registered adapter, chosen from the pipeline's model_index.json
register_task("diffusers")(_diffusers_builder(None))


def model_names() -> list[str]:
    """Every value config key ``model.name`` takes: the registered tasks and adapters."""
    return sorted(set(TASKS) | set(ADAPTERS))


def build_task(model_cfg: Any, device: torch.device | str) -> TaskSpec:
    """Build the task named by ``model_cfg.name`` on ``device``."""
    builder = TASKS.get(model_cfg.name)
    if builder is None and model_cfg.name in ADAPTERS:
        builder = _diffusers_builder(model_cfg.name)
    if builder is None:
        raise UserError(f"unknown model {model_cfg.name!r} in config key 'model.name'; choose one of {model_names()}")
    try:
        return builder(model_cfg, torch.device(device))
    except TypeError as exc:
        raise UserError(f"config key 'model.options' does not fit model {model_cfg.name!r}: {exc}") from None


def read_prompt_file(path: str | Path, key: str = "prompts") -> list[str]:
    """Prompts from a file: a text file, one prompt per line (blank lines and lines starting with '#'
    skipped), or, for a name ending in ``.jsonl``, editing prompts in JSON lines (:func:`read_edit_prompts`)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(
            f"prompt file {str(p)!r} (config key '{key}') is a directory; give a text file, one prompt per line"
        )
    if not p.is_file():
        raise UserError(f"prompt file {str(p)!r} (config key '{key}') does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt file {str(p)!r} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"prompt file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if p.suffix.lower() == ".jsonl":
        return read_edit_prompts(p, lines)
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {str(p)!r} holds no prompts")
    return prompts


def read_edit_prompts(path: Path, lines: list[str]) -> list[str]:
    """Editing prompts from the lines of a JSON-lines file: one object a line, ``{"prompt": ..., "image": ...}``.

    ``image`` is the source image's path, relative to the file's directory (or absolute); every image
    is checked to be readable here, so that a bad line fails before any work. Other keys of a line
    reach the rewards in the prompt's metadata. Blank lines are skipped.
    """
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise UserError(f"line {number} of prompt file {str(path)!r} is not JSON ({exc.args[0]})") from None
        if not isinstance(entry, dict):
            raise UserError(f"line {number} of prompt file {str(path)!r} is not a JSON object")
        prompt, image = entry.get("prompt"), entry.get("image")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"line {number} of prompt file {str(path)!r} has no 'prompt' (a non-empty string)")
        if not isinstance(image, str) or not image.strip():
            raise UserError(
                f"line {number} of prompt file {str(path)!r} has no 'image' (the source image's path, relative "
                "to the file)"
            )
        image_path = (path.parent / Path(image).expanduser()).resolve()
        check_image_file(image_path, f"line {number} of prompt file {str(path)!r}")
        extra = {k: v for k, v in entry.items() if k not in ("prompt", "image")}
        prompts.append(EditPrompt(prompt.strip(), image_path, where, extra))
    if not prompts:
        raise UserError(f"prompt file {str(path)!r} holds no prompts")
    return prompts
