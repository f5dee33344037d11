"""Batched rollouts: stored transitions re-evaluate to ratio 1, precise is exact for a point mass, SDE windows."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from precise_rl.sde import (
    STD_FLOOR,
    kernel,
    log_prob,
    rollout,
    sde_window,
    shifted_sigmas,
    sliding_window,
    uniform_sigmas,
)

STOCHASTIC = ("flow_grpo", "dance_grpo", "cps", "precise", "dance_precise")


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random inputs per test, reproducible: numpy and torch seeded from the test's name."""
    seed = zlib.crc32(request.node.name.encode())
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def random_grid(rng: np.random.Generator, n: int) -> torch.Tensor:
    inner = np.sort(rng.uniform(0.0, 1.0, size=n - 1))[::-1]
    return torch.tensor(np.concatenate([[1.0], inner, [0.0]]))


def random_eta(rng: np.random.Generator, name: str) -> float:
    return float(rng.uniform(0.1, 0.95)) if name == "cps" else float(rng.uniform(0.1, 2.0))


def toy_velocity(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for a model (mixes pixels, depends on t and cond)."""
    tt = t.view(-1, *([1] * (x.ndim - 1)))
    out = torch.tanh(0.8 * x.flip(-1) + tt) - 0.4 * x + 0.3 * x.roll(1, dims=-2) * tt
    if cond is not None:
        out = out + cond.view(-1, *([1] * (x.ndim - 1)))
    return out


def normal_log_prob64(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    std = max(std, STD_FLOOR)
    z = (x.double() - mean.double()) / std
    return (-0.5 * z**2 - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(dim=1)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_recomputed_log_prob_of_stored_transition_gives_ratio_one(name: str, rng) -> None:
    n = int(rng.integers(4, 12))
    sigmas = random_grid(rng, n)
    eta = random_eta(rng, name)
    cond = torch.tensor(rng.standard_normal(4), dtype=torch.float32)
    x1 = torch.randn(4, 2, 8, 8)
    traj = rollout(toy_velocity, x1, sigmas, name, eta, cond=cond, generator=torch.Generator().manual_seed(3))
    kern = kernel(name, sigmas, eta)  # what a trainer rebuilds from the config
    stochastic = kern.std > 0
    assert torch.equal(traj.stochastic, stochastic)
    assert bool(torch.isnan(traj.log_probs[:, ~stochastic]).all())
    assert bool(torch.isfinite(traj.log_probs[:, stochastic]).all())
    for i in range(n):
        x_t, x_s = traj.latents[:, i], traj.latents[:, i + 1]
        t = sigmas[i].float().expand(4)
        v = toy_velocity(x_t, t, cond)
        if not stochastic[i]:
            continue
        lp = log_prob(kern, i, x_t, v, x_s)
        ratio = torch.exp(lp - traj.log_probs[:, i])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
        # independent float64 check: x_s ~ N(a x + b v, std^2) of docs/math.md section 3
        std = float(kern.std[i])
        mean = float(kern.a[i]) * x_t.double() + float(kern.b[i]) * v.double()
        torch.testing.assert_close(traj.means[:, i].double(), mean, rtol=1e-5, atol=1e-5)
        expected = normal_log_prob64(x_s, mean, std)
        torch.testing.assert_close(traj.log_probs[:, i].double(), expected, rtol=1e-5, atol=1e-4)
        z = (x_s.double() - mean) / std
        assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1) < 0.1
    # the trainer's batched form: one random step per row
    idx = torch.tensor(rng.integers(0, n, size=4))
    idx = torch.where(stochastic[idx], idx, torch.zeros_like(idx))
    rows = torch.arange(4)
    x_t, x_s = traj.latents[rows, idx], traj.latents[rows, idx + 1]
    v = toy_velocity(x_t, sigmas[idx].float(), cond)
    ratio = torch.exp(log_prob(kern, idx, x_t, v, x_s) - traj.log_probs[rows, idx])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_rollout_feeds_velocity_fn_float32_sigmas_per_row(rng) -> None:
    sigmas = random_grid(rng, 5)
    seen: list[torch.Tensor] = []

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        assert x.dtype == torch.float32 and t.dtype == torch.float32 and t.shape == (3,)
        seen.append(t.clone())
        return -x

    traj = rollout(velocity, torch.randn(3, 4).to(torch.bfloat16), sigmas, "ode")
    assert traj.latents.dtype == torch.float32 and traj.latents.shape == (3, 6, 4)
    torch.testing.assert_close(torch.stack([s[0] for s in seen]).double(), sigmas[:-1], rtol=1e-7, atol=0)
    # ODE with v = -x: x_{i+1} = (1 + d_i) x_i exactly, in float64
    x = traj.latents[:, 0].double()
    for i in range(5):
        x = x * (1 + float(sigmas[i] - sigmas[i + 1]))
        torch.testing.assert_close(traj.latents[:, i + 1].double(), x, rtol=1e-5, atol=1e-6)
    assert bool(torch.isnan(traj.log_probs).all())


@pytest.mark.parametrize("name", STOCHASTIC)
def test_rollout_rows_with_own_generators_do_not_depend_on_the_batch(name: str, rng) -> None:
    sigmas = random_grid(rng, 6)
    eta = random_eta(rng, name)
    seeds = rng.integers(0, 1 << 31, size=3).tolist()
    x1 = torch.randn(3, 2, 4, 4)
    batch = rollout(toy_velocity, x1, sigmas, name, eta, generator=[torch.Generator().manual_seed(k) for k in seeds])
    for r, k in enumerate(seeds):
        alone = rollout(toy_velocity, x1[r : r + 1], sigmas, name, eta, generator=[torch.Generator().manual_seed(k)])
        torch.testing.assert_close(batch.latents[r : r + 1], alone.latents, rtol=1e-6, atol=1e-6)


def point_mass_velocity(target: torch.Tensor):
    """Exact velocity of the data distribution delta(x*): v = (x - x*) / t."""

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        return (x - target) / t.view(-1, *([1] * (x.ndim - 1)))

    return velocity


@pytest.mark.parametrize("grid", ["uniform", "shifted", "random"])
@pytest.mark.parametrize("nfe", [1, 3, 10, 25])
def test_precise_is_exact_for_a_point_mass(nfe: int, grid: str, rng) -> None:
    sigmas = {"uniform": uniform_sigmas, "shifted": shifted_sigmas}.get(grid, lambda n: random_grid(rng, n))(nfe)
    target = torch.randn(2, 1, 64, 64)
    for eta in (0.3, 1.0, 1.5, 3.0):
        traj = rollout(point_mass_velocity(target), torch.randn(2, 1, 64, 64), sigmas, "precise", eta)
        torch.testing.assert_close(traj.sample, target, rtol=1e-5, atol=1e-5)
        # exactness along the way: x_t = (1 - t) x* + t e with e ~ N(0, I) at every grid point
        for i in range(1, nfe):
            t = float(sigmas[i])
            e = (traj.latents[:, i].double() - (1 - t) * target.double()) / t
            assert abs(float(e.std()) - 1.0) < 0.03, (i, t, float(e.std()))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_rollout_window_uses_ode_outside_and_kernel_inside(name: str, rng) -> None:
    n = 8
    sigmas = random_grid(rng, n)
    eta = random_eta(rng, name)
    window = sde_window(n, 3, start=int(rng.integers(0, n - 3)))
    traj = rollout(toy_velocity, torch.randn(3, 2, 5), sigmas, name, eta, window=window)
    full = kernel(name, sigmas, eta)
    stochastic = window & (full.std > 0)
    assert torch.equal(traj.stochastic, stochastic)
    assert bool(torch.isnan(traj.log_probs[:, ~stochastic]).all())
    assert bool(torch.isfinite(traj.log_probs[:, stochastic]).all())
    for i in range(n):
        x_t, x_s = traj.latents[:, i].double(), traj.latents[:, i + 1].double()
        v = toy_velocity(traj.latents[:, i], sigmas[i].float().expand(3), None).double()
        d = float(sigmas[i] - sigmas[i + 1])
        if window[i]:
            assert float(traj.std[i]) == pytest.approx(float(full.std[i]), rel=1e-6)
            mean = float(full.a[i]) * x_t + float(full.b[i]) * v
            torch.testing.assert_close(traj.means[:, i].double(), mean, rtol=1e-5, atol=1e-5)
        else:
            assert float(traj.std[i]) == 0.0
            torch.testing.assert_close(x_s, x_t - d * v, rtol=1e-5, atol=1e-5)  # Euler, no noise


def test_sliding_window_moves_toward_data_and_wraps() -> None:
    n, size, shift_every, stride = 10, 3, 2, 2
    starts = []
    for epoch in range(16):
        w = sliding_window(n, size, epoch, shift_every=shift_every, stride=stride)
        assert w.dtype == torch.bool and w.shape == (n,) and int(w.sum()) == size
        on = torch.nonzero(w).flatten().tolist()
        assert on == list(range(on[0], on[0] + size))  # consecutive
        starts.append(on[0])
    assert starts[0] == 0
    for e in range(1, 16):
        if e % shift_every:
            assert starts[e] == starts[e - 1]  # holds between shifts
        elif starts[e - 1] + stride + size <= n:
            assert starts[e] == starts[e - 1] + stride  # moves by stride toward the data end
        else:
            assert starts[e] < starts[e - 1]  # wraps around
    assert set(starts) > {0}
    torch.testing.assert_close(sde_window(n, 4, start=8), torch.tensor([False] * 8 + [True] * 2))
