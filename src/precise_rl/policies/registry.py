"""The adapter registry: adapter name -> policy class, filled by :func:`register_policy`.

``PIPELINE_ADAPTERS`` (diffusers pipeline class -> adapter name) is derived from it: an adapter
class that names its ``pipeline_class`` is chosen for pipelines of that class. Adding an adapter
is one module with a decorated class (and its import in ``precise_rl/policies/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..registries import add_entry, check_name
from .base import Policy

__all__ = ["ADAPTERS", "PIPELINE_ADAPTERS", "register_policy"]

#: adapter name -> policy class (its ``from_pretrained(path, revision, dtype, device, **options)`` loads it)
ADAPTERS: dict[str, type[Policy]] = {}
#: diffusers pipeline class -> adapter name, derived from ``ADAPTERS`` at registration
PIPELINE_ADAPTERS: dict[str, str] = {}

P = TypeVar("P", bound=type[Policy])


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator: make a policy adapter buildable as model ``name``."""
    check_name(name, "an adapter")

    def decorate(cls: P) -> P:
        add_entry(ADAPTERS, name, cls, "an adapter")
        pipeline = getattr(cls, "pipeline_class", None)
        if pipeline:
            PIPELINE_ADAPTERS[pipeline] = name
        return cls

    return decorate
