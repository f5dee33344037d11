"""Wan text-to-video (``WanPipeline``) as a policy: Wan2.1 T2V 1.3B / 14B, Wan2.2 TI2V-5B and Wan2.2 T2V A14B.

Latents are the pipeline's float32 noise ``(C, (F - 1)/4 + 1, H/s, W/s)`` (``s`` = 8, 5B's VAE 16); the
transformer patchifies them itself and predicts the flow velocity ``eps - x0`` directly. Its timestep is
the one the pipeline's scheduler hands it for a sigma: ``1000 sigma``, truncated to an integer by the
UniPC scheduler the checkpoints ship with (FlowMatchEuler keeps it a float). Wan2.2 TI2V-5B
(``expand_timesteps``) gets that timestep once per latent token, as its pipeline gives it.

Wan2.2 A14B has two experts, ``transformer`` for the noisy steps and ``transformer_2`` for the rest: a step
whose timestep is at least ``boundary_ratio * num_train_timesteps`` runs the first, with ``guidance_scale``,
any other the second, with ``guidance_scale_2`` (``guidance_scale`` unless given), as ``WanPipeline``
switches them. Here both live in one module, :class:`WanExperts` (``high`` and ``low``), which the trainer
optimises; each row of a batch is sent to the expert of its own ``t`` (in training, rows sit at different
steps), so the log-prob of a step is the one of the expert that made it. ``train_experts`` chooses the
experts LoRA adapts (or a full fine-tune trains): ``[high, low]`` by default.

Guidance is the pipeline's: ``v_u + w (v_c - v_u)`` when ``guidance_scale`` > 1, against
``negative_prompt`` (by default the English negative prompt of the Wan model cards and diffusers' Wan
examples; the pipeline's own default is the empty string). Text is UMT5's last hidden state, each
prompt padded with zeros to ``max_sequence_length`` (512) as the pipeline pads it. The time grid is
the pipeline's scheduler's sigmas for N steps (UniPC's flow sigmas shifted by its ``flow_shift``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .registry import register_policy
from .video import VideoPolicy

__all__ = ["WanExperts", "WanPolicy", "WAN_LORA_TARGETS", "WAN_NEGATIVE_PROMPT", "WAN_EXPERTS"]

#: the self- and cross-attention projections and the feed-forward layers of every Wan block
WAN_LORA_TARGETS: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)

#: the negative prompt of the Wan model cards (diffusers' ``Wan-AI/*-Diffusers``) and diffusers' Wan examples
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)

#: Wan2.2 A14B's experts: ``high`` is the pipeline's ``transformer`` (noisy steps), ``low`` its ``transformer_2``
WAN_EXPERTS: tuple[str, ...] = ("high", "low")


class WanExperts(nn.Module):
    """Wan2.2 A14B's two transformers as one trainable module: ``high`` (the pipeline's ``transformer``, the
    steps at or above the boundary timestep) and ``low`` (``transformer_2``).

    ``forward(expert, **kwargs)`` runs one of them, so that the module can be wrapped (LoRA injected by
    full parameter names such as ``high.blocks.0.attn1.to_q``, DDP, FSDP by the experts' blocks) and still
    be called as one.
    """

    def __init__(self, high: nn.Module, low: nn.Module) -> None:
        super().__init__()
        self.high = high
        self.low = low
        # the blocks FSDP shards one by one (rl/sharding.py reads the diffusers attribute)
        self._no_split_modules = sorted(
            set(getattr(high, "_no_split_modules", None) or ()) | set(getattr(low, "_no_split_modules", None) or ())
        )

    def forward(self, expert: str, **kwargs: Any) -> Any:
        if expert not in WAN_EXPERTS:
            raise ValueError(f"unknown Wan expert {expert!r}; the experts are {list(WAN_EXPERTS)}")
        return getattr(self, expert)(**kwargs)


def _scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise UserError(f"model option {name!r} must be a finite number >= 0, got {value!r}")
    return float(value)


@register_policy("wan")
class WanPolicy(VideoPolicy):
    pipeline_class = "WanPipeline"
    default_model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    display_name = "Wan"
    default_guidance_scale = 5.0
    default_max_sequence_length = 512
    default_num_frames = 81
    default_height = 480
    default_width = 832
    default_fps = 16
    scheduler_classes = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
    default_lora_suffixes = WAN_LORA_TARGETS
    guidance_rule = (
        "CFG `v_u + w (v_c - v_u)` against the Wan negative prompt for `guidance_scale` `w > 1` (5.0); Wan2.2 A14B: "
        "`guidance_scale` on the high-noise expert, `guidance_scale_2` on the low-noise one"
    )
    time_grid_rule = (
        "the scheduler's sigmas: UniPC's `linspace(1, 1/1000, N+1)[:-1]` shifted by `flow_shift`, then 0; "
        "A14B switches expert at `boundary_ratio * 1000`"
    )

    def __init__(
        self,
        pipe: Any,
        *,
        guidance_scale_2: float | None = None,
        train_experts: Sequence[str] | None = None,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
        gradient_checkpointing: bool = False,
        lora_targets: Sequence[str] | None = None,
        **kw: Any,
    ) -> None:
        if getattr(pipe, "transformer", None) is None:
            raise UserError(
                "this WanPipeline has no 'transformer'; the Wan adapter needs one (and 'transformer_2' "
                "for a two-expert Wan2.2)"
            )
        boundary = pipe.config.get("boundary_ratio")
        second = getattr(pipe, "transformer_2", None)
        if boundary is not None and second is None:
            raise UserError(
                f"this WanPipeline has boundary_ratio {boundary} but no 'transformer_2': a two-expert Wan2.2 needs "
                "both experts"
            )
        sched = pipe.scheduler
        if type(sched).__name__ == "UniPCMultistepScheduler" and not (
            sched.config.get("use_flow_sigmas") and sched.config.get("prediction_type") == "flow_prediction"
        ):
            raise UserError(
                "the Wan pipeline's UniPCMultistepScheduler must use flow sigmas with flow prediction "
                "(use_flow_sigmas: true, prediction_type: flow_prediction), as the Wan checkpoints configure it"
            )
        super().__init__(
            pipe,
            negative_prompt=negative_prompt,
            gradient_checkpointing=gradient_checkpointing,
            lora_targets=lora_targets,
            **kw,
        )
        self._check_positions(pipe.transformer)
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        # UniPC hands the transformer int64 timesteps (1000 sigma truncated), FlowMatchEuler float ones.
        self._integer_timesteps = type(sched).__name__ == "UniPCMultistepScheduler"
        self._num_train_timesteps = int(sched.config.num_train_timesteps)
        self.two_experts = boundary is not None
        if second is not None:
            second.requires_grad_(False)
        if not self.two_experts:
            if guidance_scale_2 is not None:
                raise UserError(
                    "model option 'guidance_scale_2' is for a two-expert Wan2.2 (a pipeline with boundary_ratio); "
                    "this Wan has one transformer"
                )
            if train_experts is not None:
                raise UserError(
                    "model option 'train_experts' is for a two-expert Wan2.2 (a pipeline with boundary_ratio); "
                    "this Wan has one transformer"
                )
            self.guidance_scale_2 = self.guidance_scale
            self.boundary_timestep: float | None = None
            self.train_experts: tuple[str, ...] = ()
            return
        self.guidance_scale_2 = (
            self.guidance_scale if guidance_scale_2 is None else _scale("guidance_scale_2", guidance_scale_2)
        )
        self.boundary_timestep = float(boundary) * self._num_train_timesteps
        experts = list(WAN_EXPERTS if train_experts is None else train_experts)
        if (
            isinstance(train_experts, str)
            or not experts
            or any(e not in WAN_EXPERTS for e in experts)
            or len(set(experts)) != len(experts)
        ):
            raise UserError(
                f"model option 'train_experts' must list some of {list(WAN_EXPERTS)} (high: the high-noise "
                f"transformer, low: transformer_2), got {train_experts!r}"
            )
        self.train_experts = tuple(e for e in WAN_EXPERTS if e in experts)
        if gradient_checkpointing:
            second.enable_gradient_checkpointing()
        self.transformer = WanExperts(pipe.transformer, second)
        targets = tuple(lora_targets or self.default_lora_suffixes)
        self._lora_names = [
            f"{e}.{name}"
            for e in self.train_experts
            for name in self._linear_names(getattr(self.transformer, e), targets)
        ]
        if not self._lora_names:
            raise UserError(
                f"no linear layer of the Wan experts {list(self.train_experts)} ends with any of {list(targets)} "
                "(model option 'lora_targets')"
            )

    def _check_positions(self, transformer: nn.Module) -> None:
        """The transformer's rotary table covers ``rope_max_seq_len`` patches per axis: more frames (or rows) fail
        deep inside it with a reshape error, so they are refused here naming the largest size it takes."""
        top = int(transformer.config.get("rope_max_seq_len", 1024))
        p_t, p_h, p_w = (int(p) for p in transformer.config.patch_size)
        s, t = self._spatial_scale(), self._temporal_scale()
        if self.latent_frames // p_t > top:
            most = (top * p_t - 1) * t + 1
            raise UserError(
                f"{self.display_name} cannot make a video of {self.num_frames} frames: its transformer's position "
                f"table covers at most {most} frames (model option 'num_frames')"
            )
        for name, value, patch in (("height", self.height, p_h), ("width", self.width, p_w)):
            if value // s // patch > top:
                raise UserError(
                    f"{self.display_name} cannot take a video {value} pixels in {name}: its transformer's position "
                    f"table covers at most {top * patch * s} pixels (model option {name!r})"
                )

    def finetuned_modules(self) -> list[nn.Module]:
        if not self.two_experts:
            return [self.transformer]
        experts = self.transformer.module if hasattr(self.transformer, "module") else self.transformer
        return [getattr(experts, e) for e in self.train_experts]

    # ------------------------------------------------------------------ layout

    def _temporal_scale(self) -> int:
        return int(self.pipe.vae_scale_factor_temporal)

    def _spatial_scale(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    def _spatial_multiple(self) -> tuple[int, int]:
        # the pipeline's patchification (VAE scale x patch size) and its check_inputs' multiple of 16
        patch = self.pipe.transformer.config.patch_size
        s = self._spatial_scale()
        return math.lcm(16, s * int(patch[1])), math.lcm(16, s * int(patch[2]))

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels)

    # ------------------------------------------------------------------ conditioning and forward

    def _encode_unique(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.pipe.text_encoder.device,
        )
        return {"prompt_embeds": embeds.to(device=self.device, dtype=self.model_dtype)}

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps ``(B,)`` the pipeline's scheduler gives the transformer at sigmas ``t``, as float32."""
        if self._integer_timesteps:  # UniPC: (sigma * 1000) in float64, cast to int64
            return torch.floor(t.double() * self._num_train_timesteps).float()
        return t.float() * self._num_train_timesteps  # FlowMatchEuler: sigmas * 1000 in float32

    def experts_for(self, t: torch.Tensor) -> list[str]:
        """The expert that makes a step from each sigma of ``t`` (one Wan transformer: ``high`` throughout)."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        if self.boundary_timestep is None:
            return ["high"] * t.numel()
        return ["high" if float(ts) >= self.boundary_timestep else "low" for ts in self.timesteps(t)]

    def _transformer_out(self, expert: str, x: torch.Tensor, ts: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """One expert's prediction ``(b, C, F, h, w)`` in float32 at timesteps ``ts``."""
        if self.expand_timesteps:
            # the pipeline's (mask[0][0][:, ::2, ::2] * t).flatten(): one timestep per latent token
            f, h, w = x.shape[2:]
            tokens = f * len(range(0, h, 2)) * len(range(0, w, 2))
            ts = ts[:, None].expand(-1, tokens)
        kwargs = {
            "hidden_states": x.to(self._hidden_dtype(x)),
            "timestep": ts,
            "encoder_hidden_states": embeds,
            "return_dict": False,
        }
        out = self.transformer(expert, **kwargs) if self.two_experts else self.transformer(**kwargs)
        return out[0].float()

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``v = eps - x0`` in float32: each row through the expert of its ``t``, guided with that expert's scale.

        A group of rows runs with its negative prompts in one forward of twice the rows.
        """
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self.do_cfg and "negative_prompt_embeds" not in cond:
            raise ValueError("guidance_scale > 1 needs the negative_* conditioning from encode_prompts")
        ts = self.timesteps(t)
        experts = self.experts_for(t)
        out = x.new_zeros(x.shape, dtype=torch.float32)
        for expert, scale in (("high", self.guidance_scale), ("low", self.guidance_scale_2)):
            rows = [i for i, e in enumerate(experts) if e == expert]
            if not rows:
                continue
            idx = torch.tensor(rows, device=x.device)
            xs, tss, pos = x[idx], ts[idx], cond["prompt_embeds"][idx]
            if not self.do_cfg:
                v = self._transformer_out(expert, xs, tss, pos)
            else:
                neg = cond["negative_prompt_embeds"][idx]
                both = self._transformer_out(expert, torch.cat([xs, xs]), torch.cat([tss, tss]), torch.cat([pos, neg]))
                v_cond, v_uncond = both.chunk(2)
                v = v_uncond + scale * (v_cond - v_uncond)
            out = out.index_copy(0, idx, v)
        return out + self._untouched_weights(set(experts))

    def _untouched_weights(self, used: set[str]) -> torch.Tensor | float:
        """Zero times the trained weights of the experts this forward did not run (0 where it ran them all).

        With it a backward reaches every trained weight (a zero gradient for the expert not run): a batch of
        high-noise steps alone still has a graph when only the low expert trains, and DDP gets each gradient
        it waits for. (AdamW then treats the idle expert as any weight with a zero gradient: its momentum and
        weight decay still apply.)
        """
        if not self.two_experts or not torch.is_grad_enabled():
            return 0.0
        experts = self.transformer.module if hasattr(self.transformer, "module") else self.transformer
        if not isinstance(experts, WanExperts):
            return 0.0
        idle = [p for e in WAN_EXPERTS if e not in used for p in getattr(experts, e).parameters() if p.requires_grad]
        # an FSDP shard (a DTensor) through its local part: its zero gradient needs no reduction
        local = [p.to_local() if hasattr(p, "to_local") else p for p in idle]
        return sum(p.float().sum() for p in local) * 0.0 if local else 0.0

    def _scheduler_kwargs(self, num_steps: int) -> dict[str, Any]:
        return {}  # the pipeline calls set_timesteps(num_inference_steps) alone

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        # the pipeline's un-normalisation, in the VAE's dtype as there: z / (1 / std) + mean
        vae = self.pipe.vae
        cfg = vae.config
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return z / inv_std + mean
