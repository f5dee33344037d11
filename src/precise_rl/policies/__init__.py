"""Model adapters: each turns a model into a policy the trainer can roll out and train.

``Policy`` is the interface; ``DiffusersPolicy`` the shared base of the diffusers adapters
``Flux2KleinPolicy`` (FLUX.2 Klein), ``SD3Policy`` (SD3 / SD3.5) and ``Flux1Policy`` (FLUX.1).
"""

from .base import Policy, index_cond
from .diffusers_base import DiffusersPolicy
from .flux import Flux1Policy
from .flux2 import Flux2KleinPolicy
from .sd3 import SD3Policy

__all__ = [
    "Policy",
    "DiffusersPolicy",
    "Flux1Policy",
    "Flux2KleinPolicy",
    "SD3Policy",
    "index_cond",
]
