"""GRPO advantages and losses against hand computations (docs/math.md section 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from precise_rl.rl.losses import group_advantages, guard_loss, kl_penalty, ppo_clip_loss


def _np_group_adv(r: np.ndarray, g: np.ndarray, clip: float, batch_std: bool = False) -> np.ndarray:
    out = np.zeros_like(r)
    for gid in np.unique(g):
        m = g == gid
        std = r.std() if batch_std else r[m].std()
        out[m] = (r[m] - r[m].mean()) / (std + 1e-4)
    return np.clip(out, -clip, clip)


def test_group_advantages_match_numpy_per_group() -> None:
    rng = np.random.default_rng()
    r = rng.normal(size=24)
    g = np.repeat(np.arange(4), 6)
    rng.shuffle(g)
    adv = group_advantages(torch.tensor(r), torch.tensor(g), "group", adv_clip=5.0)
    np.testing.assert_allclose(adv.numpy(), _np_group_adv(r, g, 5.0), rtol=1e-10, atol=1e-12)


def test_group_advantages_batch_std_option() -> None:
    rng = np.random.default_rng()
    r = rng.normal(size=12)
    g = np.repeat(np.arange(3), 4)
    adv = group_advantages(torch.tensor(r), torch.tensor(g), "batch", adv_clip=5.0)
    np.testing.assert_allclose(adv.numpy(), _np_group_adv(r, g, 5.0, batch_std=True), rtol=1e-10)


def test_group_with_equal_rewards_has_zero_advantage() -> None:
    r = torch.tensor([0.3, 0.3, 0.3, 0.3, 1.0, 2.5, 0.0, 5.0], dtype=torch.float32)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(r, g)
    assert torch.equal(adv[:4], torch.zeros(4))
    assert (adv[4:] != 0).all()


def test_advantages_are_clipped() -> None:
    r = torch.tensor([0.0] * 99 + [1.0], dtype=torch.float64)
    g = torch.zeros(100, dtype=torch.long)
    adv = group_advantages(r, g, adv_clip=2.5)
    assert adv.max().item() == pytest.approx(2.5)
    # unclipped it would be (1 - 0.01) / 0.0995 ~ 9.95
    assert _np_group_adv(r.numpy(), g.numpy(), 100.0).max() > 9


def test_ppo_clip_loss_and_gradient_by_hand() -> None:
    eps = 0.2
    old = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    lp = torch.tensor([0.1, -0.5, 0.5, 0.05], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0], dtype=torch.float64)
    out = ppo_clip_loss(lp, old, adv, eps)
    r = [math.exp(x) for x in (0.1, -0.5, 0.5, 0.05)]
    # row 0: A>0, r=1.105 in range -> -A r ; row 1: A>0, r=0.607 < 0.8 -> max(-0.607, -0.8) = -0.607 (unclipped)
    # row 2: A<0, r=1.649 > 1.2 -> max(2*1.649, 2*1.2) = 3.297 (unclipped); row 3: A<0 in range -> -A r
    expected = [-r[0], -r[1], 2 * r[2], r[3]]
    np.testing.assert_allclose(out.loss.detach().numpy(), expected, rtol=1e-12)
    out.loss.sum().backward()
    # d/dlp of -A exp(lp) = -A r (all four rows take the unclipped branch here)
    np.testing.assert_allclose(lp.grad.numpy(), [-r[0], -r[1], 2 * r[2], r[3]], rtol=1e-12)
    assert out.clipped.tolist() == [False, True, True, False]


def test_ppo_clip_gradient_vanishes_on_the_clipped_side() -> None:
    lp = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    out = ppo_clip_loss(lp, torch.zeros(1, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), 0.2)
    assert out.loss.item() == pytest.approx(-1.2)
    out.loss.sum().backward()
    assert lp.grad.item() == 0.0


def test_guard_loss_matches_formula() -> None:
    torch.manual_seed(0)
    b, d = 3, 5
    mean = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    old_mean = mean.detach() + 0.01 * torch.randn(b, d, dtype=torch.float64)
    std = torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64)
    x_s = old_mean + std[:, None] * torch.randn(b, d, dtype=torch.float64)

    def lp_of(m: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(m, std[:, None]).log_prob(x_s).mean(dim=1)

    lp, old = lp_of(mean), lp_of(old_mean)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    guard = torch.tensor([0.7, 0.2, 1.3], dtype=torch.float64)
    out = guard_loss(lp, old, adv, 1e-3, mean, old_mean, std, guard)
    bias = ((mean - old_mean) ** 2).mean(dim=1) / (2 * std**2)
    ratio = torch.exp((lp - old + bias) * std)
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 1e-3, 1 + 1e-3)) / guard
    torch.testing.assert_close(out.loss, expected)
    # The bias cancels the quadratic term: the log-ratio is linear in the mean shift.
    linear = (((x_s - old_mean) * (mean - old_mean)).mean(dim=1) / std**2) * std
    torch.testing.assert_close(torch.log(out.ratio), linear.detach())


def test_kl_penalty_is_mean_squared_mean_difference() -> None:
    a, b = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    torch.testing.assert_close(kl_penalty(a, b), ((a - b) ** 2).reshape(4, -1).mean(1))
