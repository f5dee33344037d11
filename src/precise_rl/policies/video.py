"""What the video adapters share: the frame count, size and frame rate checked up front, and chunked decoding.

Conventions (all video adapters): latents are ``(B, C, F, H, W)`` in the model's own layout (the noise
its diffusers pipeline draws, ``F`` latent frames); :meth:`VideoPolicy.decode` returns ``(B, F, C, H, W)``
floats in [0, 1], ``F`` video frames (consumers tell a video from an image by ``ndim == 5``); ``fps`` is
the frame rate a video is written at. The model options ``num_frames``, ``height``, ``width`` and ``fps``
are checked when the adapter is built, against the pipeline's own constraints, so that a bad value is
one sentence before any work rather than a shape error deep in a rollout.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import UserError
from .diffusers_base import MAX_SIDE_PIXELS, DiffusersPolicy, _flag

__all__ = ["VideoPolicy", "check_video_size", "MAX_VIDEO_FRAMES"]

#: the most frames of one video (the video models in the table make 81 to 121): a typo such as 100001 would
#: otherwise fail deep inside the pipeline, or allocate the latents of a feature film first
MAX_VIDEO_FRAMES = 1025


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"model option {name!r} must be a positive integer, got {value!r}")
    return value


def check_video_size(
    model: str, num_frames: Any, height: Any, width: Any, temporal: int, spatial: tuple[int, int]
) -> tuple[int, int, int]:
    """``(num_frames, height, width)`` checked: ``num_frames - 1`` a multiple of the VAE's ``temporal``
    compression, height and width multiples of ``spatial`` = (pixels per latent row x patch rows,
    pixels per latent column x patch columns); else one sentence naming the options and the nearest fit."""
    num_frames = _positive_int("num_frames", num_frames)
    height = _positive_int("height", height)
    width = _positive_int("width", width)
    for name, value, limit, unit in (
        ("num_frames", num_frames, MAX_VIDEO_FRAMES, " frames"),
        ("height", height, MAX_SIDE_PIXELS, " pixels"),
        ("width", width, MAX_SIDE_PIXELS, " pixels"),
    ):
        if value > limit:
            raise UserError(
                f"model option {name!r} of {model} is {value}{unit}, more than the limit of {limit}{unit}; give at "
                f"most {limit}"
            )
    if (num_frames - 1) % temporal:
        fit = (num_frames - 1) // temporal * temporal + 1
        raise UserError(
            f"{model} cannot make a video of {num_frames} frames: num_frames - 1 must be a multiple of {temporal} "
            f"(the VAE's temporal compression; model option 'num_frames'), e.g. {fit} or {fit + temporal}"
        )
    mh, mw = spatial
    if height % mh or width % mw:
        raise UserError(
            f"{model} cannot take a {height}x{width} video: height must be a multiple of {mh} and width of {mw} "
            f"pixels (the VAE's compression times the patch size; model options 'height' and 'width'), e.g. "
            f"{max(mh, height // mh * mh)}x{max(mw, width // mw * mw)}"
        )
    return num_frames, height, width


class VideoPolicy(DiffusersPolicy):
    """Base of the text-to-video diffusers adapters.

    Model options beyond :class:`DiffusersPolicy`'s: ``num_frames`` (video frames), ``fps`` (frames per
    second of a written video), ``vae_tiling`` (decode each frame in overlapping spatial tiles, where the VAE
    can); ``decode_batch`` (videos per VAE call) defaults to 1.

    Subclasses give the hooks :meth:`_temporal_scale`, :meth:`_spatial_multiple`, :attr:`latent_channels`
    and :meth:`_latents_to_vae`.
    """

    default_num_frames: ClassVar[int] = 81
    default_height: ClassVar[int] = 480
    default_width: ClassVar[int] = 832
    default_fps: ClassVar[int] = 16

    def __init__(
        self,
        pipe: Any,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        fps: int | None = None,
        decode_batch: int = 1,
        vae_tiling: bool = False,
        **kw: Any,
    ) -> None:
        self.pipe = pipe  # the hooks below read the pipeline's VAE and transformer configs
        self.num_frames = self.default_num_frames if num_frames is None else num_frames
        self.fps = _positive_int("fps", self.default_fps if fps is None else fps)
        height = self.default_height if height is None else height
        width = self.default_width if width is None else width
        self.num_frames, height, width = check_video_size(
            self.display_name, self.num_frames, height, width, self._temporal_scale(), self._spatial_multiple()
        )
        super().__init__(pipe, height=height, width=width, decode_batch=decode_batch, **kw)
        if _flag("vae_tiling", vae_tiling):
            if not hasattr(pipe.vae, "enable_tiling"):
                raise UserError(f"the {type(pipe.vae).__name__} of {self.display_name} cannot decode in tiles")
            pipe.vae.enable_tiling()

    # ------------------------------------------------------------------ model-specific hooks

    def _temporal_scale(self) -> int:
        """Video frames per latent frame (after the first): ``num_frames - 1`` must be a multiple of it."""
        raise NotImplementedError

    def _spatial_multiple(self) -> tuple[int, int]:
        """Height and width must be multiples of these many pixels (VAE compression x patch size)."""
        raise NotImplementedError

    def _spatial_scale(self) -> int:
        """Pixels per latent row and column."""
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour

    def _check_resolution(self, height: Any, width: Any) -> tuple[int, int]:
        # checked with the frame count in __init__ (check_video_size), against the video constraints
        return height, width

    def _pixel_multiple(self) -> int:
        return max(self._spatial_multiple())

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self._temporal_scale() + 1

    @property
    def latent_shape(self) -> tuple[int, ...]:
        s = self._spatial_scale()
        return (self.latent_channels, self.latent_frames, self.height // s, self.width // s)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, F, 3, H, W)`` in [0, 1], float32, ``decode_batch`` videos per VAE call.

        Why chunked so: a video VAE's activations scale with frames x pixels, far beyond an image's, so the
        batch is cut into ``decode_batch`` rows (1 by default). Within a row the causal video VAEs bound
        memory themselves: Wan's decodes one latent frame at a time, carrying a cache of the last frames'
        features from one call to the next (its causal convolutions look back in time only), so frames
        add time, not memory; ``vae_tiling`` bounds a frame's pixels too. Cutting a video in time here
        would break that cache and change the frames.
        """
        vae = self.pipe.vae
        outs = []
        with torch.no_grad():
            for lo in range(0, latents.shape[0], self.decode_batch):
                z = self._latents_to_vae(latents[lo : lo + self.decode_batch].float().to(vae.device))
                video = vae.decode(z.to(dtype=vae.dtype), return_dict=False)[0]  # (b, 3, F, H, W) in [-1, 1]
                outs.append((video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1))
        return torch.cat(outs)
