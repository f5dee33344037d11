"""Every sampler as a precise-family member: effective eta per step, against closed forms and the kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from precise_rl.fidelity import GaussianTarget, propagate_gaussian
from precise_rl.sde import kernel, shifted_sigmas, time_grid, uniform_sigmas
from precise_rl.sde.precise_family import effective_eta, matched_precise_eta, precise_step_coefficients


def _grid(rng: np.random.Generator) -> torch.Tensor:
    return time_grid(int(rng.integers(4, 33)), str(rng.choice(["uniform", "shifted"])), shift=float(rng.uniform(1, 5)))


def _logsnr(t: np.ndarray) -> np.ndarray:
    return np.log((1 - t) / t)


def _interior(sigmas: torch.Tensor) -> np.ndarray:
    """Steps with t < 1 and s > 0: the ones where an eta is identifiable."""
    sig = sigmas.numpy()
    return (sig[:-1] < 1) & (sig[1:] > 0)


def _transition(a: float, b: float, std: float, x_t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, float]:
    return a * x_t + b * v, std


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precise_maps_to_its_own_eta_on_every_identifiable_step(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigmas, eta = _grid(rng), float(rng.uniform(0.1, 3.0))
    eff = effective_eta("precise", sigmas, eta)
    inner = _interior(sigmas)
    np.testing.assert_allclose(eff.values[inner], eta, rtol=1e-9)
    assert np.isnan(eff.values[~inner]).all()  # t = 1 and s = 0: every eta gives the same step
    assert eff.match == "exact" and eff.summary()["matched_steps"] == int(inner.sum())


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_a_cps_step_is_the_precise_step_at_its_effective_eta(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigmas, eta = _grid(rng), float(rng.uniform(0.1, 0.95))
    eff = effective_eta("cps", sigmas, eta)
    sig = sigmas.numpy()
    t, s = sig[:-1], sig[1:]
    inner = _interior(sigmas)
    # closed form: rho = cos(eta pi / 2) = exp(-(eta_eff^2 / 2) dlambda)
    closed = np.sqrt(-2 * math.log(math.cos(eta * math.pi / 2)) / (_logsnr(s[inner]) - _logsnr(t[inner])))
    np.testing.assert_allclose(eff.values[inner], closed, rtol=1e-10)
    assert np.isnan(eff.values[~inner]).all() and eff.match == "exact"
    # the same transition: mean and std of x_s | x_t for fresh x_t, v, in float64
    kern = kernel("cps", sigmas, eta)
    for i in np.flatnonzero(inner):
        x_t, v = rng.normal(size=64), rng.normal(size=64)
        pa, pb, pstd = (float(c) for c in precise_step_coefficients(t[i], s[i], eff.values[i]))
        mean_p, std_p = _transition(pa, pb, pstd, x_t, v)
        mean_c, std_c = _transition(float(kern.a[i]), float(kern.b[i]), float(kern.std[i]), x_t, v)
        np.testing.assert_allclose(mean_p, mean_c, rtol=1e-10, atol=1e-12)
        assert std_p == pytest.approx(std_c, rel=1e-10)
    # and the per-step formula agrees with the kernel of precise at one eta
    one = kernel("precise", sigmas, float(eff.values[inner][0]))
    i = int(np.flatnonzero(inner)[0])
    pa, pb, pstd = precise_step_coefficients(t[i], s[i], eff.values[i])
    assert (float(pa), float(pb), float(pstd)) == pytest.approx(
        (float(one.a[i]), float(one.b[i]), float(one.std[i])), rel=1e-12
    )


def test_the_cps_medians_quoted_for_the_uniform_grid() -> None:
    """cps at 0.7 on the uniform grid: median effective eta 1.41, 1.80, 2.51, 3.04 at 6, 10, 20, 30 steps."""
    got = [effective_eta("cps", uniform_sigmas(n)).summary()["median"] for n in (6, 10, 20, 30)]
    assert got == pytest.approx([1.411, 1.801, 2.507, 3.040], abs=1e-3)


@pytest.mark.parametrize("sampler", ["flow_grpo", "dance_grpo"])
@pytest.mark.parametrize("seed", [6, 7])
def test_euler_maruyama_matches_the_fresh_noise_variance_only(sampler: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigmas, eta = _grid(rng), float(rng.uniform(0.1, 1.0))
    eff = effective_eta(sampler, sigmas, eta)
    kern = kernel(sampler, sigmas, eta)
    sig = sigmas.numpy()
    t, s = sig[:-1], sig[1:]
    std = kern.std.numpy()
    ok = eff.matched
    assert ok.any() and eff.match == "variance"
    # where it has one, the precise step at the effective eta injects the same fresh-noise std ...
    pa, pb, pstd = precise_step_coefficients(t[ok], s[ok], eff.values[ok])
    np.testing.assert_allclose(pstd, std[ok], rtol=1e-10)
    # ... but keeps s rho of eps_hat where Euler-Maruyama keeps s - std^2 / (2 t): the means differ
    x_t, v = rng.normal(size=(int(ok.sum()), 16)), rng.normal(size=(int(ok.sum()), 16))
    mean_em = kern.a.numpy()[ok, None] * x_t + kern.b.numpy()[ok, None] * v
    tt, ss = t[ok, None], s[ok, None]
    x0_hat, eps_hat = x_t - tt * v, x_t + (1 - tt) * v
    rho = np.sqrt(1 - (std[ok, None] / ss) ** 2)
    mean_p = pa[:, None] * x_t + pb[:, None] * v
    np.testing.assert_allclose(mean_p, (1 - ss) * x0_hat + ss * rho * eps_hat, rtol=1e-9, atol=1e-12)
    em_keep = ss - std[ok, None] ** 2 / (2 * tt)
    np.testing.assert_allclose(mean_em, (1 - ss) * x0_hat + em_keep * eps_hat, rtol=1e-9, atol=1e-12)
    assert not eff.exact[ok].any()
    # no match where the step keeps no noise (std >= s) or adds noise at s = 0
    assert np.isnan(eff.values[(std >= s) | (s == 0)]).all()


def test_the_ode_is_precise_at_eta_zero() -> None:
    sigmas = shifted_sigmas(int(np.random.default_rng().integers(3, 30)), 3.0)
    eff = effective_eta("ode", sigmas)
    assert (eff.values[:-1] == 0).all() and np.isnan(eff.values[-1]) and eff.match == "exact"


@pytest.mark.parametrize("seed", [8, 9])
def test_the_matched_eta_keeps_the_same_total_noise_share_as_cps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigmas, eta = _grid(rng), float(rng.uniform(0.2, 0.9))
    match = matched_precise_eta(sigmas, "cps", eta)
    inner = _interior(sigmas)
    kept_cps = math.cos(eta * math.pi / 2) ** int(inner.sum())
    sig = sigmas.numpy()
    ratio = (sig[1:] * (1 - sig[:-1]) / (sig[:-1] * (1 - sig[1:])))[inner]
    kept_precise = np.prod(ratio ** (match**2 / 2))  # precise's rho per step, from the math page
    assert kept_precise == pytest.approx(kept_cps, rel=1e-9)


def test_the_matched_eta_reproduces_cps_on_broad_data_better_than_the_median() -> None:
    """Why the total and not the median: on c = 0.5 data precise at the matched eta ends closer to cps's std."""
    target = GaussianTarget(0.5, 0.5)
    for n in (20, 30):
        sigmas = uniform_sigmas(n)
        cps = propagate_gaussian(kernel("cps", sigmas), target).std_ratio
        at_match = propagate_gaussian(kernel("precise", sigmas, matched_precise_eta(sigmas)), target).std_ratio
        median = effective_eta("cps", sigmas).summary()["median"]
        at_median = propagate_gaussian(kernel("precise", sigmas, median), target).std_ratio
        assert abs(at_match - cps) < abs(at_median - cps)
