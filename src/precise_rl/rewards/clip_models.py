"""The field's CLIP-based reward models: PickScore, CLIPScore, image similarity and the LAION aesthetic predictor.

HPSv2.1, on the same CLIP helpers, is :mod:`.hpsv2`.

Every scorer here runs on ``transformers``' ``CLIPModel`` (no torchvision, no open_clip): HPSv2.1's
open_clip ViT-H-14 checkpoint is converted to it on load (the two architectures are the same
pre-LayerNorm transformer; open_clip's fused attention projection is split into q, k, v).
Models load lazily on the first call, on ``device``, in ``dtype`` (``"float16"`` / ``"bfloat16"``
for half precision), and score ``batch_size`` images at a time. Images are ``(B, 1 or 3, H, W)``
in [0, 1] and are preprocessed in torch exactly as each original model's pipeline does it
(:mod:`precise_rl.rewards.preprocess`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .base import Reward, register_reward
from .hub import LazyModel, check_batch_size, parse_dtype, resolve_dir, resolve_file
from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    as_rgb_255,
    normalize,
    resize_longest_and_pad,
    resize_shortest_and_crop,
)

__all__ = [
    "ModelReward",
    "ClipPreprocess",
    "PickScore",
    "CLIPScore",
    "ImageSimilarity",
    "AestheticScore",
    "AestheticMLP",
    "load_clip_preprocess",
]

_MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json"]
_MODEL_FILES_BIN = ["config.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json"]
_TOKENIZER_FILES = ["*.json", "*.txt", "*.model"]


class ModelReward(Reward):
    """A reward backed by a model that loads lazily: subclasses give ``_load()`` and ``_score(model, x, prompts)``."""

    def __init__(self, device: str | torch.device = "cpu", dtype: str = "float32", batch_size: int = 32) -> None:
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.batch_size = check_batch_size(batch_size)
        self._model = LazyModel(self._load)

    def _load(self) -> Any:
        raise NotImplementedError

    def _score(self, model: Any, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def model(self) -> Any:
        """The loaded model (loads it on first access)."""
        return self._model.get()

    def _check_images(self, images: torch.Tensor, per_image: Sequence[Any], what: str) -> None:
        """Images ``(B, 1 or 3, H, W)`` with one entry of ``per_image`` (prompts or metadata) each, else UserError."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"reward {self.name!r} needs images shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
        if len(per_image) != images.shape[0]:
            raise UserError(f"reward {self.name!r} got {images.shape[0]} images and {len(per_image)} {what}")

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        self._check_images(images, prompts, "prompts")
        model = self.model
        parts: dict[str, list[torch.Tensor]] = {}
        for lo in range(0, images.shape[0], self.batch_size):
            chunk = images[lo : lo + self.batch_size].to(self.device)
            for key, value in self._score(model, chunk, list(prompts[lo : lo + self.batch_size])).items():
                parts.setdefault(key, []).append(value.detach().float())
        return {key: torch.cat(vals).to(images.device) for key, vals in parts.items()}


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# ----------------------------------------------------------------------------- preprocessing


class ClipPreprocess:
    """One model's image pipeline: ``shortest`` (resize the short side, centre crop) or ``longest`` (resize, pad)."""

    def __init__(
        self,
        size: int = 224,
        crop: int = 224,
        mode: str = "shortest",
        rounding: str = "floor",
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
    ) -> None:
        if mode not in ("shortest", "longest"):
            raise ValueError(f"mode must be 'shortest' or 'longest', got {mode!r}")
        self.size, self.crop, self.mode, self.rounding = int(size), int(crop), mode, rounding
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1 or 3, H, W)`` in [0, 1] to the model's normalised ``(B, 3, crop, crop)`` float32 input."""
        x = as_rgb_255(images)
        if self.mode == "shortest":
            x = resize_shortest_and_crop(x, self.size, self.crop, self.rounding)
        else:
            x = resize_longest_and_pad(x, self.size)
        return normalize(x, self.mean, self.std)


def _side(value: Any, key: str, where: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value and value["height"] == value["width"]:
            return int(value["height"])
    raise UserError(f"{where}: unsupported {key} {value!r} (a square size or a shortest edge is needed)")


def load_clip_preprocess(directory: Path) -> ClipPreprocess:
    """The pipeline a ``transformers`` CLIP image processor describes (``preprocessor_config.json``)."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        raise UserError(f"{str(directory)!r} has no preprocessor_config.json (a CLIP processor is needed)")
    cfg = json.loads(path.read_text())
    where = str(path)
    if not cfg.get("do_resize", True) or not cfg.get("do_center_crop", True) or not cfg.get("do_normalize", True):
        raise UserError(f"{where}: only the resize + centre crop + normalise pipeline of CLIP is supported")
    if int(cfg.get("resample", 3)) != 3:
        raise UserError(f"{where}: only bicubic resampling (resample=3) is supported, got {cfg.get('resample')}")
    return ClipPreprocess(
        size=_side(cfg.get("size", 224), "size", where),
        crop=_side(cfg.get("crop_size", 224), "crop_size", where),
        mode="shortest",
        rounding="floor",  # transformers' center_crop: (H - h) // 2
        mean=cfg.get("image_mean", OPENAI_CLIP_MEAN),
        std=cfg.get("image_std", OPENAI_CLIP_STD),
    )


# ----------------------------------------------------------------------------- CLIP helpers


def _load_tokenizer(directory: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"{what}: cannot load a tokenizer from {str(directory)!r} ({type(exc).__name__}: {exc})"
        ) from None


def _load_clip_model(source: str | Path, revision: str | None, what: str, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPModel

    path = Path(source).expanduser()
    if not path.is_dir():
        path = resolve_dir(source, revision, what, _MODEL_FILES)
        if not list(path.glob("*.safetensors")):
            path = resolve_dir(source, revision, what, _MODEL_FILES_BIN)
    try:
        model = CLIPModel.from_pretrained(str(path), dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = CLIPModel.from_pretrained(str(path), torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{what}: cannot load a CLIP model from {str(path)!r} ({type(exc).__name__}: {exc})") from None
    return model.to(device).eval().requires_grad_(False)


def _image_embeds(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP's projected image embedding (``get_image_features``), float32."""
    out = model.vision_model(pixel_values=pixels.to(_module_dtype(model)))
    return model.visual_projection(out.pooler_output).float()


def _text_embeds(model: nn.Module, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """CLIP's projected text embedding (``get_text_features``), float32."""
    out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
    return model.text_projection(out.pooler_output).float()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _tokenize(tokenizer: Any, prompts: list[str], device: torch.device, max_length: int) -> dict[str, torch.Tensor]:
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}


class _ClipPair:
    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: ClipPreprocess) -> None:
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = images.device
        img = _unit(_image_embeds(self.model, self.preprocess(images)))
        txt = _unit(_text_embeds(self.model, _tokenize(self.tokenizer, prompts, device, self.max_length)))
        return (img * txt).sum(dim=-1)


# ----------------------------------------------------------------------------- PickScore


@register_reward("pickscore")
class PickScore(ModelReward):
    """PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences.

    ``logit_scale.exp() * cos(image, prompt)`` (about 18-24 for typical images), exactly the
    original inference code's score. Weights: ``yuvalkirstain/PickScore_v1``; processor (tokenizer
    and image pipeline): ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
    """

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        model_revision: str | None = None,
        processor_revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        self.source, self.processor = model, processor
        self.model_revision, self.processor_revision = model_revision, processor_revision
        super().__init__(device, dtype, batch_size)

    def _load(self) -> _ClipPair:
        proc = resolve_dir(self.processor, self.processor_revision, "pickscore processor", _TOKENIZER_FILES)
        model = _load_clip_model(self.source, self.model_revision, "pickscore model", self.device, self.dtype)
        return _ClipPair(model, _load_tokenizer(proc, "pickscore processor"), load_clip_preprocess(proc))

    def _score(self, model: _ClipPair, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        scale = model.model.logit_scale.float().exp()
        return {self.name or "pickscore": scale * model.cosine(images, prompts)}


# ----------------------------------------------------------------------------- CLIPScore


@register_reward("clipscore")
class CLIPScore(ModelReward):
    """CLIPScore: ``max(100 cos(image, prompt), 0)`` under OpenAI's CLIP ViT-L/14 (torchmetrics' definition).

    Weights, tokenizer and image pipeline: ``openai/clip-vit-large-patch14``. (Flow-GRPO's variant
    divides by 30; a constant factor, which the per-reward z-score removes.)
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        self.source, self.revision = model, revision
        super().__init__(device, dtype, batch_size)

    def _load(self) -> _ClipPair:
        path = Path(self.source).expanduser()
        if not path.is_dir():
            path = resolve_dir(self.source, self.revision, "clipscore processor", _TOKENIZER_FILES)
        clip = _load_clip_model(self.source, self.revision, "clipscore model", self.device, self.dtype)
        return _ClipPair(clip, _load_tokenizer(path, "clipscore processor"), load_clip_preprocess(path))

    def _score(self, model: _ClipPair, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {self.name or "clipscore": (100.0 * model.cosine(images, prompts)).clamp_min(0.0)}


# ----------------------------------------------------------------------------- image similarity (edits)


@register_reward("image_similarity")
class ImageSimilarity(CLIPScore):
    """For an edit: the cosine of the CLIP image embeddings of the image and its source image.

    The source comes in each image's metadata (``source_image``, a ``(3, H, W)`` tensor in [0, 1], as
    the editing models' prompts hand it on); each source is preprocessed at its own size. 1 for an
    image its source's CLIP cannot tell apart, lower the further the edit departs from it: Flow-GRPO's
    ``image_similarity`` reward of its editing recipes (``flow_grpo/rewards.py``, a CLIP scorer's
    image-to-image similarity). Weights and image pipeline: ``openai/clip-vit-large-patch14``, as
    CLIPScore's.
    """

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        self._check_images(images, metadata, "metadata")
        sources = [m.get("source_image") for m in metadata]
        if any(not isinstance(s, torch.Tensor) for s in sources):
            raise UserError(
                f"reward {self.name or 'image_similarity'!r} scores an edit against its source image, but an image "
                "came without one: train an editing model on a JSON-lines prompt file (prompt and image a line)"
            )
        model = self.model
        scores = []
        for lo in range(0, images.shape[0], self.batch_size):
            chunk = images[lo : lo + self.batch_size].to(self.device)
            src = torch.cat([model.preprocess(s[None].to(self.device)) for s in sources[lo : lo + self.batch_size]])
            a = _unit(_image_embeds(model.model, model.preprocess(chunk)))
            b = _unit(_image_embeds(model.model, src))
            scores.append((a * b).sum(dim=-1).float())
        return {self.name or "image_similarity": torch.cat(scores).to(images.device)}


# ----------------------------------------------------------------------------- LAION aesthetic predictor


class AestheticMLP(nn.Module):
    """The head of the LAION improved aesthetic predictor, as the original (no activations between layers).

    ``Linear(d, 1024) - Dropout(0.2) - Linear(1024, 128) - Dropout(0.2) - Linear(128, 64) -
    Dropout(0.1) - Linear(64, 16) - Linear(16, 1)``; ImageReward's head is the same with ``d = 768``.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{what}: cannot read weights from {str(path)!r} ({type(exc).__name__}: {exc})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what}: {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what}: the weights in {str(path)!r} do not fit the model ({first} ...)") from None


@register_reward("aesthetic")
class AestheticScore(ModelReward):
    """The LAION improved aesthetic predictor ("sac+logos+ava1-l14-linearMSE"): a 1-10 rating of looks alone.

    An MLP (:class:`AestheticMLP`) on the L2-normalised CLIP ViT-L/14 image embedding; the prompt is
    not used. CLIP: ``openai/clip-vit-large-patch14``; head: ``aesthetic-model.pth`` of
    ``trl-lib/ddpo-aesthetic-predictor`` (the original's weights, as DDPO ships them), or a local
    ``.pth`` / ``.safetensors`` file. Preprocessing as ``clip.load``'s (torchvision resize and crop).
    """

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        clip_revision: str | None = None,
        head: str = "trl-lib/ddpo-aesthetic-predictor",
        head_file: str = "aesthetic-model.pth",
        head_revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
    ) -> None:
        self.clip_source, self.clip_revision = clip_model, clip_revision
        self.head, self.head_file, self.head_revision = head, head_file, head_revision
        super().__init__(device, dtype, batch_size)

    def _load(self) -> tuple[nn.Module, AestheticMLP, ClipPreprocess]:
        clip = _load_clip_model(self.clip_source, self.clip_revision, "aesthetic CLIP model", self.device, self.dtype)
        path = resolve_file(self.head, self.head_file, self.head_revision, "aesthetic head")
        mlp = AestheticMLP(int(clip.config.projection_dim))
        _load_into(mlp, _load_state(path, "aesthetic head"), "aesthetic head", path)
        size = int(clip.config.vision_config.image_size)
        # clip.load's transform: torchvision Resize(n_px, BICUBIC) + CenterCrop(n_px), OpenAI constants
        prep = ClipPreprocess(size, size, "shortest", "round")
        return clip, mlp.to(self.device).eval().requires_grad_(False), prep

    def _score(self, model: Any, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        clip, mlp, prep = model
        emb = _unit(_image_embeds(clip, prep(images)))
        return {self.name or "aesthetic": mlp(emb)[:, 0]}
