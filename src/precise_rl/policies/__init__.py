"""Model adapters: each turns a model into a policy the trainer can roll out and train.

``Policy`` is the interface; ``DiffusersPolicy`` the shared base of the diffusers adapters
``Flux2KleinPolicy`` (FLUX.2 Klein), ``SD3Policy`` (SD3 / SD3.5), ``Flux1Policy`` (FLUX.1), and the
instruction-editing ``FluxKontextPolicy`` (FLUX.1 Kontext) and ``QwenImageEditPlusPolicy`` (Qwen-Image-Edit),
whose prompts are ``EditPrompt``s (an instruction with its source image, :mod:`.edit`).
"""

from .base import Policy, index_cond
from .diffusers_base import DiffusersPolicy
from .edit import EditPrompt
from .flux import Flux1Policy
from .flux2 import Flux2KleinPolicy
from .flux_kontext import FluxKontextPolicy
from .qwen_image_edit import QwenImageEditPlusPolicy
from .sd3 import SD3Policy

__all__ = [
    "Policy",
    "DiffusersPolicy",
    "Flux1Policy",
    "FluxKontextPolicy",
    "QwenImageEditPlusPolicy",
    "EditPrompt",
    "Flux2KleinPolicy",
    "SD3Policy",
    "index_cond",
]
