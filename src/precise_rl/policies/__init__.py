"""Model adapters: each turns a model into a policy the trainer can roll out and train.

``Policy`` is the interface; ``DiffusersPolicy`` the shared base of the diffusers adapters
``Flux2KleinPolicy`` (FLUX.2 Klein 4B and 9B), ``Flux2DevPolicy`` (FLUX.2 dev), ``QwenImagePolicy``
(Qwen-Image), ``SD3Policy`` (SD3 / SD3.5), ``Flux1Policy`` (FLUX.1), ``ZImagePolicy`` (Z-Image,
Z-Image-Turbo), and the instruction-editing ``FluxKontextPolicy`` (FLUX.1 Kontext) and
``QwenImageEditPlusPolicy`` (Qwen-Image-Edit), whose prompts are ``EditPrompt``s (an instruction with
its source image, :mod:`.edit`); ``VideoPolicy`` is the base of the text-to-video adapters, ``WanPolicy``
(Wan2.1, Wan2.2 TI2V-5B and the two-expert Wan2.2 A14B) and ``HunyuanVideo15Policy`` (HunyuanVideo 1.5).
"""

from .base import Policy, index_cond
from .diffusers_base import DiffusersPolicy
from .edit import EditPrompt
from .flux import Flux1Policy
from .flux2 import Flux2KleinPolicy
from .flux2_dev import Flux2DevPolicy
from .flux_kontext import FluxKontextPolicy
from .hunyuan_video15 import HunyuanVideo15Policy
from .qwen_image import QwenImagePolicy
from .qwen_image_edit import QwenImageEditPlusPolicy
from .sd3 import SD3Policy
from .video import VideoPolicy
from .wan import WanPolicy
from .z_image import ZImagePolicy

__all__ = [
    "Policy",
    "DiffusersPolicy",
    "Flux1Policy",
    "Flux2DevPolicy",
    "FluxKontextPolicy",
    "QwenImageEditPlusPolicy",
    "EditPrompt",
    "Flux2KleinPolicy",
    "HunyuanVideo15Policy",
    "QwenImagePolicy",
    "SD3Policy",
    "VideoPolicy",
    "WanPolicy",
    "ZImagePolicy",
    "index_cond",
]
