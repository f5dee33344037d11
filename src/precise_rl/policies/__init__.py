"""Model adapters: each turns a model into a policy the trainer can roll out and train."""

from .base import Policy, cat_cond, index_cond

__all__ = ["Policy", "cat_cond", "index_cond"]
