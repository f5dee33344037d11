"""Tasks: what a run trains on (a policy, its prompts and rewards), and the built-in ones.

:mod:`.registry` maps a config's ``model.name`` to a :class:`~.registry.TaskSpec`
(``TaskSpec``, ``TASKS``, ``build_task`` and ``read_prompt_file`` are loaded from it on first use,
so that this package imports no torch); :mod:`.digits` is the built-in digits task (data, model,
prompts, rewards, pretraining), :mod:`.signs` the built-in text-rendering task (scored by the ``ocr``
reward), :mod:`.animals` the prompts of the diffusers models, :mod:`.edits` those
of the editing models (drawn scenes with an edit each).
"""

from __future__ import annotations

import importlib
from typing import Any

#: pretrainable task name -> the module that implements it (``precise-rl pretrain TASK`` lists these)
PRETRAIN_TASKS: dict[str, str] = {"digits": "precise_rl.tasks.digits", "signs": "precise_rl.tasks.signs"}

_REGISTRY_NAMES = (
    "TaskSpec",
    "TASKS",
    "build_task",
    "digits_task",
    "signs_task",
    "model_names",
    "read_prompt_file",
    "register_task",
)

__all__ = ["PRETRAIN_TASKS", *_REGISTRY_NAMES]


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module(".registry", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
