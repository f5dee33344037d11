"""What every diffusers-pipeline adapter shares: frozen encoders, prompt encoding, memory options, grids, decoding.

Loading a pipeline (local or from the hub, pinned, detected by class) is :mod:`.loading`.

A concrete adapter (``flux2.py``, ``sd3.py``, ``flux.py``) adds the model's latent layout, its
timestep convention, its conditioning and its resolution-dependent shift (most take it from
:meth:`DiffusersPolicy._dynamic_shift_mu`). Latents are kept in the shape of the noise the
diffusers pipeline draws, so the same seed gives the same image; packing into tokens happens
inside :meth:`velocity` (FLUX.1's and Qwen-Image's 2x2 patches: :class:`PackedLatentsPolicy`).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import gc
import importlib.util
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..sde import flux1_mu
from .base import Policy
from .edit import edit_key
from .loading import DTYPES, PIPELINE_ADAPTERS, detect_adapter, load_pipeline, read_model_index

__all__ = [
    "MAX_SIDE_PIXELS",
    "DiffusersPolicy",
    "PackedLatentsPolicy",
    "DTYPES",
    "PIPELINE_ADAPTERS",
    "read_model_index",
    "detect_adapter",
    "load_pipeline",
]


#: the pipeline attributes that hold text encoders (those a pipeline has; FLUX.1 has two, SD3 three)
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: the largest height or width any adapter is asked for, in pixels (the models in the table top out at 2048):
#: beyond it a typo would allocate latents and attention of gigabytes before any model could object
MAX_SIDE_PIXELS = 4096


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"model option {name!r} must be true or false, got {value!r}")
    return value


def _pad_cat(rows: list[torch.Tensor]) -> torch.Tensor:
    """``rows`` concatenated along dim 0, each first zero-padded at the end of every other dim to the largest.

    The adapters pad a batch's variable-length rows (text, source-image tokens, masks) with zeros up to the
    batch's longest, so rows cached at their own lengths assemble into the shapes and padding the adapter
    gives that batch.
    """
    shape = [max(r.shape[d] for r in rows) for d in range(1, rows[0].ndim)]
    out = rows[0].new_zeros((sum(r.shape[0] for r in rows), *shape))
    lo = 0
    for r in rows:
        out[(slice(lo, lo + r.shape[0]), *(slice(0, n) for n in r.shape[1:]))] = r
        lo += r.shape[0]
    return out


def _frozen(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        module.requires_grad_(False).eval()
    return module


class DiffusersPolicy(Policy):
    """Base class of the diffusers adapters. Subclasses define the model-specific hooks below.

    ``height``/``width`` are the image size in pixels; ``guidance_scale`` is the model's
    classifier-free guidance weight (1 = none); ``max_sequence_length`` the text length fed to
    the transformer; ``gradient_checkpointing`` trades compute for memory in training;
    ``lora_targets`` overrides the layers LoRA adapts (name suffixes or ``*`` globs); ``decode_batch`` bounds the
    VAE's batch.

    Memory options (each off by default): ``offload_text_encoders`` keeps the text encoders on the CPU except
    while they encode, ``offload_vae`` the VAE except while it decodes or encodes a source image (both exact:
    moving weights copies them); ``cache_prompts`` keeps each distinct prompt's conditioning, encoded alone
    the first time it is seen, for the run; ``free_text_encoders`` (with ``cache_prompts``) deletes the text
    encoders after :meth:`precompute_prompts`.
    """

    #: diffusers pipeline class this adapter drives
    pipeline_class: ClassVar[str]
    #: hub id used when ``model.path`` is not given
    default_model: ClassVar[str]
    #: suffixes of the transformer's ``nn.Linear`` modules that LoRA adapts
    default_lora_suffixes: ClassVar[tuple[str, ...]]
    #: human name in messages
    display_name: ClassVar[str]
    default_guidance_scale: ClassVar[float] = 1.0
    default_max_sequence_length: ClassVar[int] = 512
    #: how the model guides, in words (``precise-rl models`` and the README's models table)
    guidance_rule: ClassVar[str] = "classifier-free guidance against the negative prompt"
    #: the pipeline's time grid rule, in words (the grid itself comes from :meth:`time_grid`)
    time_grid_rule: ClassVar[str] = "the scheduler's sigmas"
    #: True for an instruction-editing model: every prompt comes with a source image (an ``EditPrompt``)
    edits_images: ClassVar[bool] = False
    #: (module, what to tell the user) for each module the pipeline needs beyond diffusers that may be missing:
    #: where loading fails and the module is not installed, the message says so
    load_requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: the diffusers scheduler classes whose sigmas :meth:`time_grid` reproduces
    scheduler_classes: ClassVar[tuple[str, ...]] = ("FlowMatchEulerDiscreteScheduler",)

    def __init__(
        self,
        pipe: Any,
        *,
        height: int = 512,
        width: int = 512,
        guidance_scale: float | None = None,
        max_sequence_length: int | None = None,
        gradient_checkpointing: bool = False,
        lora_targets: Sequence[str] | None = None,
        decode_batch: int = 8,
        negative_prompt: str = "",
        offload_text_encoders: bool = False,
        offload_vae: bool = False,
        cache_prompts: bool = False,
        free_text_encoders: bool = False,
    ) -> None:
        self.pipe = pipe
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            _frozen(getattr(pipe, name, None))
        transformer = pipe.transformer
        transformer.requires_grad_(False)  # the trainer unfreezes what it trains (LoRA or every weight)
        # Kept apart from the module: the trainer may wrap ``transformer`` (LoRA, DDP) after this.
        self.model_config = transformer.config
        self.model_dtype: torch.dtype = transformer.dtype
        self.transformer: nn.Module = transformer
        import diffusers

        if not isinstance(pipe.scheduler, tuple(getattr(diffusers, name) for name in self.scheduler_classes)):
            raise UserError(
                f"{self.display_name} adapter needs a {' or '.join(self.scheduler_classes)}, the pipeline has a "
                f"{type(pipe.scheduler).__name__}"
            )
        self._scheduler = copy.deepcopy(pipe.scheduler)  # set_timesteps mutates; keep the pipeline's own intact
        self.height, self.width = self._check_resolution(height, width)
        self.guidance_scale = float(self.default_guidance_scale if guidance_scale is None else guidance_scale)
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise UserError(f"model option 'guidance_scale' must be a finite number >= 0, got {guidance_scale!r}")
        self.max_sequence_length = int(max_sequence_length or self.default_max_sequence_length)
        if self.max_sequence_length < 1:
            raise UserError(f"model option 'max_sequence_length' must be >= 1, got {max_sequence_length!r}")
        if decode_batch < 1:
            raise UserError(f"model option 'decode_batch' must be >= 1, got {decode_batch!r}")
        self.decode_batch = int(decode_batch)
        self.negative_prompt = str(negative_prompt)
        self._negative_cache: dict[str, torch.Tensor] | None = None
        self._lora_names = self._linear_names(transformer, tuple(lora_targets or self.default_lora_suffixes))
        if not self._lora_names:
            raise UserError(
                f"no linear layer of the {self.display_name} transformer ends with any of "
                f"{list(lora_targets or self.default_lora_suffixes)} (model option 'lora_targets')"
            )
        if gradient_checkpointing:
            if not getattr(transformer, "_supports_gradient_checkpointing", False):
                raise UserError(f"the {type(transformer).__name__} does not support gradient checkpointing")
            transformer.enable_gradient_checkpointing()
        self._setup_memory_options(offload_text_encoders, offload_vae, cache_prompts, free_text_encoders)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        **options: Any,
    ) -> DiffusersPolicy:
        """Load the pipeline (hub id with a pinned ``revision``, or a local directory) and wrap it."""
        try:
            pipe = load_pipeline(path or cls.default_model, cls.pipeline_class, revision, dtype, device)
        except UserError as exc:
            missing = [hint for module, hint in cls.load_requires if importlib.util.find_spec(module) is None]
            if missing and "could not load" in str(exc):
                raise UserError(f"{exc}; {'; '.join(missing)}") from None
            raise
        return cls(pipe, **options)

    # ------------------------------------------------------------------ model-specific hooks

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def _pixel_multiple(self) -> int:
        """Height and width must be multiples of this many pixels."""
        raise NotImplementedError

    def _max_pixels(self) -> int | None:
        """Largest height/width the model takes (None = no limit)."""
        return None

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors ``(U, ...)`` for distinct prompts."""
        raise NotImplementedError

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's velocity for latents ``x`` (latent layout) at sigmas ``t``."""
        raise NotImplementedError

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        """What the diffusers pipeline passes to ``scheduler.set_timesteps`` for ``num_steps`` steps."""
        raise NotImplementedError

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in our layout to the VAE decoder's input."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour

    def _check_resolution(self, height: Any, width: Any) -> tuple[int, int]:
        m = self._pixel_multiple()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model option '{name}' must be a positive integer number of pixels, got {value!r}")
            if value > MAX_SIDE_PIXELS:
                raise UserError(
                    f"model option '{name}' is {value} pixels, more than the limit of {MAX_SIDE_PIXELS} pixels; give "
                    f"at most {MAX_SIDE_PIXELS}"
                )
        if height % m or width % m:
            raise UserError(
                f"{self.display_name} cannot take a {height}x{width} image: height and width must be multiples of "
                f"{m} pixels (model options 'height' and 'width'), e.g. {max(m, height // m * m)}x"
                f"{max(m, width // m * m)}"
            )
        top = self._max_pixels()
        if top is not None and max(height, width) > top:
            raise UserError(
                f"{self.display_name} cannot take a {height}x{width} image: this checkpoint's position "
                f"embedding covers at most {top} pixels per side (model options 'height' and 'width')"
            )
        return height, width

    @contextlib.contextmanager
    def at_resolution(self, height: int, width: int) -> Iterator[None]:
        """Inside it, latents, position ids and time grid are those of ``height`` x ``width`` images (checked as
        model options ``height``/``width`` are); the model's own resolution after it."""
        checked = self._check_resolution(height, width)
        before = self.height, self.width
        self.height, self.width = checked
        self._reset_position_cache()
        try:
            yield
        finally:
            self.height, self.width = before
            self._reset_position_cache()

    def _reset_position_cache(self) -> None:
        """Forget position ids kept for one resolution (FLUX's image ids)."""
        if hasattr(self, "_img_ids"):
            self._img_ids = None

    @staticmethod
    def _linear_names(module: nn.Module, targets: tuple[str, ...]) -> list[str]:
        """Full names of the ``nn.Linear`` modules that ``targets`` name (exact names for peft).

        A target is a name suffix (``attn.to_q``) or, with ``*``, a glob over the full name
        (``single_transformer_blocks.*.attn.to_out``).
        """

        def hit(name: str, target: str) -> bool:
            if "*" in target:
                return fnmatch.fnmatchcase(name, target)
            return name == target or name.endswith("." + target)

        return [
            name
            for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and any(hit(name, t) for t in targets)
        ]

    def lora_target_modules(self) -> list[str]:
        return list(self._lora_names)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Prompts must be strings, with a source image for an editing model and without one for any other;
        checked without running the text encoders."""
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise UserError(f"prompt {i} must be a string, got {type(p).__name__}")
            image = getattr(p, "image", None)
            if self.edits_images and image is None:
                raise UserError(
                    f"{self.display_name} edits a source image but prompt {str(p)!r} comes without one: give the "
                    'prompts as a JSON-lines file (.jsonl, a line {"prompt": ..., "image": ...}), or an --image'
                )
            if not self.edits_images and image is not None:
                raise UserError(
                    f"{self.display_name} generates from text alone but prompt {str(p)!r} "
                    f"({getattr(p, 'origin', image)}) comes with a source image: use an editing model or a "
                    "prompt file without images"
                )

    def _checked_prompts(self, prompts: str | Sequence[str]) -> list[str]:
        """The prompts of an :meth:`encode_prompts` call as a list (one string is one prompt), checked."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise UserError("no prompts to encode")
        self.check_prompts(prompts)
        return prompts

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioning ``(B, ...)``: each distinct prompt goes through the text encoders once."""
        prompts = self._checked_prompts(prompts)
        # distinct by text and source image: one instruction on two images is two prompts
        slots: dict[tuple[str, str], int] = {}
        unique: list[str] = []
        for p in prompts:
            if slots.setdefault(edit_key(p), len(unique)) == len(unique):
                unique.append(p)
        index = torch.tensor([slots[edit_key(p)] for p in prompts], device=self.device)
        with torch.no_grad():
            table = self._encode_unique(unique)
            cond = {k: v.index_select(0, index) for k, v in table.items()}
            if self.do_cfg:
                neg = self._negative()
                cond.update({f"negative_{k}": v.expand(len(prompts), *v.shape[1:]) for k, v in neg.items()})
        return cond

    def _negative(self) -> dict[str, torch.Tensor]:
        """The unconditional branch's embeddings (of ``negative_prompt``), computed once."""
        if self._negative_cache is None:
            self._negative_cache = self._encode_unique([self.negative_prompt])
        return self._negative_cache

    # ------------------------------------------------------------------ memory options

    def _setup_memory_options(
        self, offload_text_encoders: Any, offload_vae: Any, cache_prompts: Any, free_text_encoders: Any
    ) -> None:
        """Validate the memory options and install them around this adapter's own methods.

        The adapter's ``encode_prompts`` and ``decode`` (its overrides included: the image-editing adapters
        have their own) are wrapped on the instance, so every adapter gets the options without code of its own.
        """
        self.offload_text_encoders = _flag("offload_text_encoders", offload_text_encoders)
        self.offload_vae = _flag("offload_vae", offload_vae)
        self.cache_prompts = _flag("cache_prompts", cache_prompts)
        self.free_text_encoders = _flag("free_text_encoders", free_text_encoders)
        if self.free_text_encoders and not self.cache_prompts:
            raise UserError("model option 'free_text_encoders' needs 'cache_prompts: true' to keep the embeddings")
        #: conditioning rows ``(1, ...)`` of each prompt seen, by :func:`edit_key` (``cache_prompts``)
        self._prompt_cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self._text_encoders_freed = False
        if self.offload_text_encoders:
            for module in self._text_encoders():
                module.to("cpu")
        if self.offload_vae:
            self.pipe.vae.to("cpu")
            self.decode = self._with_vae(self.decode)  # type: ignore[method-assign]
        if self.offload_text_encoders or self.offload_vae or self.cache_prompts:
            self._encode_batch = self.encode_prompts  # the adapter's own, bound before the wrapper replaces it
            self.encode_prompts = self._encode_with_options  # type: ignore[method-assign]

    def _text_encoders(self) -> list[nn.Module]:
        return [m for m in (getattr(self.pipe, name, None) for name in _TEXT_ENCODERS) if m is not None]

    @contextlib.contextmanager
    def _on_device(self, modules: Sequence[nn.Module]) -> Iterator[None]:
        """``modules`` on the compute device (the transformer's) inside the block, back on the CPU after it.

        Moving weights between devices copies them exactly, so the numbers are those of modules kept on the
        device.
        """
        device = self.device
        for module in modules:
            module.to(device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    @contextlib.contextmanager
    def _encoding(self) -> Iterator[None]:
        """What an encoding call needs on the device: the offloaded text encoders, and the offloaded VAE when
        the adapter encodes source images with it (the editing adapters do, inside their encoding)."""
        with contextlib.ExitStack() as stack:
            if self.offload_text_encoders:
                stack.enter_context(self._on_device(self._text_encoders()))
            if self.offload_vae and self.edits_images:
                stack.enter_context(self._on_device([self.pipe.vae]))
            yield

    def _with_vae(self, method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(method)
        def on_device(*args: Any, **kwargs: Any) -> torch.Tensor:
            with self._on_device([self.pipe.vae]):
                return method(*args, **kwargs)

        return on_device

    def _encode_with_options(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """:meth:`encode_prompts` under the memory options: offloaded modules on the device only for the
        encoding, and with ``cache_prompts`` only prompts not seen before encoded."""
        if not self.cache_prompts:
            with self._encoding():
                return self._encode_batch(prompts)
        prompts = self._checked_prompts(prompts)
        missing = list({edit_key(p): p for p in prompts if edit_key(p) not in self._prompt_cache}.values())
        if missing:
            if self._text_encoders_freed:
                raise UserError(
                    f"prompt {str(missing[0])!r} was not precomputed before the text encoders were freed "
                    "(model option 'free_text_encoders'): pass it to precompute_prompts or turn the option off"
                )
            with self._encoding():
                # One at a time, so that each row keeps its own length: the adapters pad a batch to its
                # longest row with zeros, which :func:`_pad_cat` redoes for whatever batch asks for the rows.
                for p in missing:
                    row = self._encode_batch([p])
                    self._prompt_cache[edit_key(p)] = {
                        k: v.to("cpu") if self.offload_text_encoders else v for k, v in row.items()
                    }
        rows = [self._prompt_cache[edit_key(p)] for p in prompts]
        return {k: _pad_cat([r[k] for r in rows]).to(self.device) for k in rows[0]}

    def precompute_prompts(self, prompts: Sequence[str]) -> None:
        """Encode ``prompts`` into the prompt cache (``cache_prompts``; a no-op without it), then, with
        ``free_text_encoders``, delete the text encoders: later only these prompts can be encoded."""
        if not self.cache_prompts:
            return
        if len(prompts):
            self.encode_prompts(prompts)
        if self.free_text_encoders and not self._text_encoders_freed:
            for name in _TEXT_ENCODERS:
                if getattr(self.pipe, name, None) is not None:
                    setattr(self.pipe, name, None)
            self._text_encoders_freed = True
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _hidden_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the latents enter the transformer in.

        FLUX.2's transformer casts the timestep to the dtype of the hidden states before anything else:
        in bf16 a timestep of 1000 * sigma keeps 8 bits (700.3 becomes 700, with a spacing of 4 there).
        Under autocast the latents can stay float32, so the timestep reaches the time embedding
        unrounded and autocast casts the inputs of the matmuls; without autocast they must match the
        weights. (FLUX.1 casts it to the dtype of its first layer's output, SD3 not at all.)
        """
        return torch.float32 if torch.is_autocast_enabled(x.device.type) else self.model_dtype

    @property
    def cfg_scale(self) -> float:
        """The classifier-free guidance weight ``w`` of :meth:`velocity` (``guidance_scale`` unless the model
        feeds that to a guidance embedding and takes its CFG weight apart)."""
        return self.guidance_scale

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``v = eps - x0`` in float32, with classifier-free guidance when :attr:`do_cfg`.

        Both branches run in one pass of ``2B`` rows; a conditioning key without a ``negative_`` twin (a
        source image's latents) is the same in both.
        """
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if not self.do_cfg:
            return self._forward(x, t, cond).float()
        pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
        neg = {k.removeprefix("negative_"): v for k, v in cond.items() if k.startswith("negative_")}
        if not neg:
            raise ValueError("guidance_scale > 1 needs the negative_* conditioning from encode_prompts")
        both = {k: torch.cat([neg.get(k, pos[k]), pos[k]]) for k in pos}
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]), both).float()
        v_uncond, v_cond = out.chunk(2)
        return v_uncond + self.cfg_scale * (v_cond - v_uncond)

    def time_grid(self, num_steps: int) -> torch.Tensor:
        """The sigmas the diffusers pipeline itself uses for ``num_steps`` steps (shift included), float64."""
        from ..sde import validate_sigmas

        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise UserError(f"the number of steps must be a positive integer, got {num_steps!r}")
        sched = self._scheduler
        kwargs = self._scheduler_kwargs(num_steps)
        if kwargs.get("sigmas") is None:
            kwargs.pop("sigmas", None)
            kwargs["num_inference_steps"] = num_steps
        sched.set_timesteps(device="cpu", **kwargs)
        try:
            return validate_sigmas(sched.sigmas.double())
        except ValueError as exc:
            raise UserError(f"the pipeline's scheduler gives an unusable time grid: {exc}") from None

    def _dynamic_shift_mu(self, image_seq_len: int, default_max_shift: float = 1.15) -> float:
        """The pipelines' ``calculate_shift``: ``mu`` linear in ``image_seq_len``, from ``base_shift`` at
        ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` of the scheduler's config.

        A config without ``max_shift`` falls back to ``default_max_shift``, the pipeline's own default
        (1.15; SD3's pipeline says 1.16).
        """
        cfg = self._scheduler.config
        return flux1_mu(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", default_max_shift),
        )

    @staticmethod
    def _flux_sigmas_arg(sched: Any, num_steps: int) -> np.ndarray | None:
        """FLUX pipelines pass ``linspace(1, 1/N, N)`` unless the scheduler uses its own flow sigmas."""
        if getattr(sched.config, "use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1.0 / num_steps, num_steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1], float32, decoded ``decode_batch`` at a time."""
        vae = self.pipe.vae
        outs = []
        with torch.no_grad():
            for lo in range(0, latents.shape[0], self.decode_batch):
                z = self._latents_to_vae(latents[lo : lo + self.decode_batch].float())
                img = vae.decode(z.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
                if img.ndim == 5:  # a video VAE's (B, 3, frames, H, W), Qwen-Image's: its single frame
                    img = img[:, :, 0]
                outs.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(outs)


class PackedLatentsPolicy(DiffusersPolicy):
    """The layout of FLUX.1 and Qwen-Image: noise ``(C, H/8, W/8)``, ``C`` a quarter of the transformer's
    ``in_channels``, which sees it as 2x2 patch tokens ``(h/2 * w/2, 4C)``."""

    def _pixel_multiple(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (int(self.model_config.in_channels) // 4, self.height // f, self.width // f)

    @property
    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)`` (the pipelines' ``_pack_latents``)."""
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def _unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)`` (the pipelines' ``_unpack_latents``)."""
        c, h, w = self.latent_shape
        b = tokens.shape[0]
        x = tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)
