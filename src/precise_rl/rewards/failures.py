"""Exceptions a reward raises when it cannot go on, which the trainer turns into a clean stop."""

from __future__ import annotations

__all__ = ["RewardUnavailable", "RewardServerDown", "RewardServerRejected"]


class RewardUnavailable(RuntimeError):
    """A reward cannot score any more images: the trainer saves a checkpoint and stops with this message."""


class RewardServerDown(RewardUnavailable):
    """A reward server stayed unreachable (or kept failing) through every retry of several calls in a row."""


class RewardServerRejected(RewardUnavailable):
    """A reward server refused the client's credentials (HTTP 401/403): retrying cannot help."""
