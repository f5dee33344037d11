"""What every name registry of the project shares: one entry per name, refused twice.

Samplers (``sde.samplers``), policy adapters (``policies.registry``), rewards (``rewards.base``) and
tasks (``tasks.registry``) each keep a ``dict`` of their own; these two functions are how an entry
gets in. Like ``errors.py`` this module stands below the layers and imports none of them.
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["check_name", "add_entry"]

T = TypeVar("T")


def check_name(name: Any, what: str, forbidden: str = "") -> str:
    """``name`` if it is a non-empty string without the characters of ``forbidden``; ValueError otherwise."""
    if not isinstance(name, str) or not name or any(ch in name for ch in forbidden):
        without = f" without {' or '.join(repr(c) for c in forbidden)}" if forbidden else ""
        raise ValueError(f"{what} name must be a non-empty string{without}, got {name!r}")
    return name


def add_entry(table: dict[str, T], name: str, entry: T, what: str) -> T:
    """Put ``entry`` under ``name`` in ``table``; a name taken by another entry is refused (ValueError)."""
    known = table.get(name)
    if known is not None and known is not entry and known != entry:
        raise ValueError(f"{what} named {name!r} is already registered ({known!r})")
    table[name] = entry
    return entry
