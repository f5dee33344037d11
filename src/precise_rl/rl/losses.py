"""GRPO advantages and the policy losses of ``docs/math.md`` section 5."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["group_advantages", "PolicyLossOutput", "ppo_clip_loss", "guard_loss", "kl_penalty"]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_mode: str = "group",
    adv_clip: float = 5.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """``A = (r - mean_group) / (std + eps)`` clipped to ``[-adv_clip, adv_clip]``.

    ``std`` is the group's (population) standard deviation, or the whole batch's with
    ``std_mode="batch"``. A group whose rewards are all equal gets advantages of exactly 0.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError("rewards and group_ids must be 1-D tensors of the same length")
    if std_mode not in ("group", "batch"):
        raise ValueError(f"std_mode must be 'group' or 'batch', got {std_mode!r}")
    r = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    count = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]
    if std_mode == "group":
        var = torch.zeros(n_groups, dtype=r.dtype).index_add_(0, inverse, centred**2) / count
        std = var.sqrt()[inverse]
    else:
        std = r.std(unbiased=False).expand_as(r)
    adv = centred / (std + eps)
    # A group of equal rewards carries no signal: keep it exactly zero despite rounding.
    flat = (std == 0) & (std_mode == "group")
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return adv.clamp(-adv_clip, adv_clip).to(rewards.dtype)


@dataclass
class PolicyLossOutput:
    """Per-row loss and the statistics logged for it (all ``(R,)``)."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def _clip_objective(ratio: torch.Tensor, adv: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (ratio - 1.0).abs() > clip_range


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float
) -> PolicyLossOutput:
    """Plain PPO-clip: ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(lp - lp_old)``."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss, clipped = _clip_objective(ratio, adv, clip_range)
    return PolicyLossOutput(loss, ratio.detach(), clipped)


def guard_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    adv: torch.Tensor,
    clip_range: float,
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    sigma_bar: torch.Tensor,
    guard: torch.Tensor,
) -> PolicyLossOutput:
    """The ratio-normalised loss: ``r = exp((lp - lp_old + bias) * sigma_bar)``, loss divided by ``|dmu/dv|``.

    ``bias = mean_elements((mu - mu_old)^2) / (2 sigma_bar^2)``; ``sigma_bar`` and ``guard``
    (``|b|``) are per row.
    """
    diff2 = (mean.float() - old_mean.float()).square().flatten(1).mean(dim=1)
    bias = diff2 / (2.0 * sigma_bar.square())
    ratio = torch.exp((log_prob - old_log_prob + bias) * sigma_bar)
    loss, clipped = _clip_objective(ratio, adv, clip_range)
    return PolicyLossOutput(loss / guard, ratio.detach(), clipped)


def kl_penalty(mean: torch.Tensor, ref_mean: torch.Tensor) -> torch.Tensor:
    """Per-row ``mean_elements((mu - mu_ref)^2)``, the KL term before ``beta``."""
    return (mean.float() - ref_mean.float()).square().flatten(1).mean(dim=1)
