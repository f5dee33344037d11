"""Kernel coefficients ``(a, b, std)`` against the formulas of docs/math.md, written out here.

The reference below is float64 numpy, straight from the section 3 table (``mu`` and ``std``
as functions of ``x_t``, ``v``, ``t``, ``s``, ``eta``); ``a`` and ``b`` are read off ``mu`` by
evaluating it at ``(x, v) = (1, 0)`` and ``(0, 1)`` since every ``mu`` is linear in ``(x, v)``.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.integrate import quad

from precise_rl.sde import kernel, precise_rho

STOCHASTIC = ("flow_grpo", "dance_grpo", "cps", "precise", "dance_precise")
ALL = ("ode", *STOCHASTIC)
EM = ("flow_grpo", "dance_grpo")
PRECISE_FAMILY = ("cps", "precise", "dance_precise")


# ---------------------------------------------------------------------------------------------
# Independent reference (docs/math.md sections 1 and 3)
# ---------------------------------------------------------------------------------------------


def ref_std(name: str, t: float, s: float, eta: float, t1: float) -> float:
    d = t - s
    if name == "ode":
        return 0.0
    if name == "flow_grpo":
        denom = (1.0 - t1) if t == 1.0 else (1.0 - t)
        return eta * math.sqrt(t / denom) * math.sqrt(d)
    if name == "dance_grpo":
        return eta * math.sqrt(d)
    if name == "cps":
        return s * math.sin(eta * math.pi / 2)
    rho = ref_rho(name, t, s, eta)
    return s * math.sqrt(1.0 - rho**2)


def ref_rho(name: str, t: float, s: float, eta: float) -> float:
    if eta == 0.0:
        return 1.0  # g = 0: the ODE, nothing forgotten
    if name == "precise":
        return (s * (1.0 - t) / (t * (1.0 - s))) ** (eta**2 / 2)  # 0 at t = 1 and at s = 0
    if name == "dance_precise":
        if s == 0.0:
            return 0.0
        return math.exp(-(eta**2 / 2) * (1.0 / s - 1.0 / t))
    raise AssertionError(name)


def ref_mu(name: str, x: np.ndarray, v: np.ndarray, t: float, s: float, eta: float, t1: float) -> np.ndarray:
    d = t - s
    x0_hat = x - t * v
    eps_hat = x + (1.0 - t) * v
    std = ref_std(name, t, s, eta, t1)
    if name == "ode":
        return x - d * v
    if name in EM:
        return x - d * v - std**2 / (2 * t) * eps_hat
    if name == "cps":
        return (1.0 - s) * x0_hat + math.sqrt(max(s**2 - std**2, 0.0)) * eps_hat
    return (1.0 - s) * x0_hat + s * ref_rho(name, t, s, eta) * eps_hat


def ref_coefficients(name: str, sigmas: np.ndarray, eta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b, std = [], [], []
    one, zero = np.array(1.0), np.array(0.0)
    for t, s in zip(sigmas[:-1], sigmas[1:], strict=True):
        a.append(float(ref_mu(name, one, zero, t, s, eta, sigmas[1])))
        b.append(float(ref_mu(name, zero, one, t, s, eta, sigmas[1])))
        std.append(ref_std(name, t, s, eta, sigmas[1]))
    return np.array(a), np.array(b), np.array(std)


def random_grid(rng: np.random.Generator, n: int, start: float = 1.0, end: float = 0.0) -> np.ndarray:
    """Sorted random interior points in (0, 1) between the two ends, decreasing."""
    inner = np.sort(rng.uniform(end, start, size=n - 1))[::-1]
    return np.concatenate([[start], inner, [end]])


def random_eta(rng: np.random.Generator, name: str) -> float:
    return float(rng.uniform(0.05, 0.98)) if name == "cps" else float(rng.uniform(0.05, 2.5))


def as_np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


SEEDS = list(range(6))
GRID_ENDS = [(1.0, 0.0), (0.97, 0.0), (1.0, 0.02), (0.9, 0.05)]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", SEEDS)
def test_kernel_coefficients_match_math_page_table(name: str, seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    start, end = GRID_ENDS[seed % len(GRID_ENDS)]
    sigmas = random_grid(rng, int(rng.integers(2, 25)), start, end)
    eta = random_eta(rng, name)
    k = kernel(name, torch.tensor(sigmas), eta)
    a, b, std = ref_coefficients(name, sigmas, eta)
    for got in (k.a, k.b, k.std):
        assert got.dtype == torch.float64 and got.shape == (len(sigmas) - 1,)
    np.testing.assert_allclose(as_np(k.a), a, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(as_np(k.b), b, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(as_np(k.std), std, rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(as_np(k.sigmas), sigmas)


@pytest.mark.parametrize("name", ALL)
def test_kernel_mean_from_a_b_equals_table_mu_on_random_inputs(name: str) -> None:
    rng = np.random.default_rng(7)
    sigmas = random_grid(rng, 9)
    eta = random_eta(rng, name)
    k = kernel(name, sigmas.tolist(), eta)
    for i in range(len(sigmas) - 1):
        x, v = rng.standard_normal((2, 3, 5))
        mean = float(k.a[i]) * x + float(k.b[i]) * v
        np.testing.assert_allclose(mean, ref_mu(name, x, v, sigmas[i], sigmas[i + 1], eta, sigmas[1]), atol=1e-12)


@pytest.mark.parametrize("eta", [0.1, 0.7, 1.9])
def test_flow_grpo_first_step_uses_one_minus_t1_denominator(eta: float) -> None:
    rng = np.random.default_rng(11)
    sigmas = random_grid(rng, 7)
    k = kernel("flow_grpo", sigmas, eta)
    t1 = sigmas[1]
    d = 1.0 - t1
    std0 = eta * math.sqrt(1.0 / (1.0 - t1)) * math.sqrt(d)  # = eta: g * sqrt(d) with 1 - t_1 below
    assert math.isfinite(float(k.std[0]))
    assert float(k.std[0]) == pytest.approx(std0, rel=1e-12)
    assert float(k.std[0]) == pytest.approx(eta, rel=1e-12)
    assert float(k.a[0]) == pytest.approx(1.0 - std0**2 / 2, rel=1e-12)
    assert float(k.b[0]) == pytest.approx(-d, rel=1e-12)  # (1 - t) = 0: no eps_hat pull on v
    # Away from t = 1 the plain t / (1 - t) applies.
    t, s = sigmas[2], sigmas[3]
    assert float(k.std[2]) == pytest.approx(eta * math.sqrt(t / (1 - t)) * math.sqrt(t - s), rel=1e-12)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_guard_equals_abs_dmu_dv_of_section_5(name: str, seed: int) -> None:
    rng = np.random.default_rng(2000 + seed)
    sigmas = random_grid(rng, int(rng.integers(3, 20)))
    eta = random_eta(rng, name)
    k = kernel(name, sigmas, eta)
    t, s = sigmas[:-1], sigmas[1:]
    d = t - s
    std = ref_std_vec(name, sigmas, eta)
    if name in ("ode", *EM):
        expected = np.abs(-d - std**2 * (1 - t) / (2 * t))
    else:
        expected = np.abs(-t * (1 - s) + (1 - t) * np.sqrt(np.maximum(s**2 - std**2, 0.0)))
    # sqrt(s^2 - std^2) loses ~1e-8 absolute where std is close to s (rho ~ 0).
    np.testing.assert_allclose(as_np(k.guard), expected, rtol=1e-9, atol=1e-7)
    np.testing.assert_array_equal(as_np(k.guard), np.abs(as_np(k.b)))


def ref_std_vec(name: str, sigmas: np.ndarray, eta: float) -> np.ndarray:
    return np.array([ref_std(name, t, s, eta, sigmas[1]) for t, s in zip(sigmas[:-1], sigmas[1:], strict=True)])


@pytest.mark.parametrize("name", PRECISE_FAMILY)
def test_precise_family_last_step_has_zero_std_and_mean_x0_hat(name: str) -> None:
    rng = np.random.default_rng(3)
    sigmas = random_grid(rng, 6)
    k = kernel(name, sigmas, random_eta(rng, name))
    t = sigmas[-2]
    assert float(k.std[-1]) == 0.0
    # mu = x0_hat = x - t v: a = 1, b = -t
    assert float(k.a[-1]) == pytest.approx(1.0, abs=1e-15)
    assert float(k.b[-1]) == pytest.approx(-t, abs=1e-15)
    assert bool(k.stochastic[:-1].all()) and not bool(k.stochastic[-1])


@pytest.mark.parametrize("name", EM)
def test_euler_maruyama_kernels_keep_noise_at_the_last_step(name: str) -> None:
    rng = np.random.default_rng(4)
    sigmas = random_grid(rng, 6)
    eta = random_eta(rng, name)
    k = kernel(name, sigmas, eta)
    assert float(k.std[-1]) > 0
    assert float(k.std[-1]) == pytest.approx(ref_std(name, sigmas[-2], 0.0, eta, sigmas[1]), rel=1e-12)
    assert bool(k.stochastic.all())


@pytest.mark.parametrize("eta", [0.3, 1.0, 1.5, 3.0])
def test_precise_at_t_equal_1_keeps_no_initial_noise(eta: float) -> None:
    rng = np.random.default_rng(5)
    sigmas = random_grid(rng, 5)
    s = sigmas[1]
    k = kernel("precise", sigmas, eta)
    assert float(precise_rho(torch.tensor(sigmas), eta)[0]) == 0.0
    # rho = 0: mean = (1 - s) x0_hat = (1 - s)(x - v), so a = 1 - s, b = -(1 - s) = -a; std = s.
    assert float(k.a[0]) == pytest.approx(1.0 - s, rel=1e-14)
    assert float(k.b[0]) == pytest.approx(-float(k.a[0]), rel=1e-14)
    assert float(k.std[0]) == pytest.approx(s, rel=1e-14)
    # Same x0_hat, different eps_hat (at t = 1 eps_hat = x): same mean.
    x, v, delta = rng.standard_normal((3, 4, 6))
    mean1 = float(k.a[0]) * x + float(k.b[0]) * v
    mean2 = float(k.a[0]) * (x + delta) + float(k.b[0]) * (v + delta)
    np.testing.assert_allclose(mean1, mean2, atol=1e-12)
    np.testing.assert_allclose(mean1, (1 - s) * (x - v), atol=1e-12)


@pytest.mark.parametrize("name", ("precise", "dance_precise"))
def test_precise_with_eta_zero_is_the_ode(name: str) -> None:
    # Regression: the closed forms gave 0 ** 0 -> rho = 0 at t = 1 (precise) and NaN at s = 0 (dance_precise).
    rng = np.random.default_rng(6)
    sigmas = random_grid(rng, 7)
    k = kernel(name, sigmas, 0.0)
    np.testing.assert_allclose(as_np(k.a), np.ones(7), atol=1e-15)
    np.testing.assert_allclose(as_np(k.b), -(sigmas[:-1] - sigmas[1:]), atol=1e-15)
    np.testing.assert_array_equal(as_np(k.std), np.zeros(7))


# ---------------------------------------------------------------------------------------------
# The quadrature / callable-schedule path
# ---------------------------------------------------------------------------------------------


def flow_grpo_shape(t: np.ndarray) -> np.ndarray:
    return np.sqrt(t / (1 - t))


@pytest.mark.parametrize("seed", SEEDS[:4])
@pytest.mark.parametrize("name", ("precise", "dance_precise"))
def test_precise_quadrature_path_equals_closed_forms(name: str, seed: int) -> None:
    rng = np.random.default_rng(3000 + seed)
    start, end = GRID_ENDS[seed % len(GRID_ENDS)]
    sigmas = random_grid(rng, int(rng.integers(2, 15)), start, end)
    eta = random_eta(rng, name)
    a, b, std = ref_coefficients(name, sigmas, eta)
    sched = "logsnr" if name == "precise" else "constant"
    variants = [
        kernel(name, sigmas, eta, quadrature=True),
        kernel("precise", sigmas, eta, schedule=sched, quadrature=True),
        # a callable schedule always goes through quadrature
        kernel("precise", sigmas, eta, schedule=flow_grpo_shape if sched == "logsnr" else np.ones_like),
    ]
    for k in variants:
        np.testing.assert_allclose(as_np(k.a), a, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(as_np(k.b), b, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(as_np(k.std), std, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", ("precise", "dance_precise"))
def test_closed_form_rho_is_the_section_3_integral(name: str) -> None:
    """rho = exp(-int_s^t g^2 / (2 tau^2)) with g of section 2, integrated by mpmath in tau."""
    rng = np.random.default_rng(8)
    sigmas = random_grid(rng, 6, 0.99, 0.01)  # interior: the integral is finite
    eta = random_eta(rng, name)
    rho = as_np(precise_rho(torch.tensor(sigmas), eta, "logsnr" if name == "precise" else "constant"))
    for i, (t, s) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        if name == "precise":
            g2 = lambda tau: eta**2 * tau / (1 - tau)  # noqa: E731
        else:
            g2 = lambda tau: eta**2 + 0 * tau  # noqa: E731
        integral = mpmath.quad(lambda tau: g2(tau) / (2 * tau**2), [s, t])  # noqa: B023
        assert rho[i] == pytest.approx(float(mpmath.exp(-integral)), rel=1e-10, abs=1e-300)


def sqrt_schedule(t: np.ndarray) -> np.ndarray:
    return np.sqrt(t)


def bump_schedule(t: np.ndarray) -> np.ndarray:
    return 0.5 + np.asarray(t) ** 2 * np.cos(3 * np.asarray(t))


@pytest.mark.parametrize("shape", [sqrt_schedule, bump_schedule], ids=["sqrt", "bump"])
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_custom_schedule_rho_matches_independent_integral(shape, seed: int) -> None:
    rng = np.random.default_rng(4000 + seed)
    sigmas = random_grid(rng, int(rng.integers(3, 10)))  # contains t = 1 and s = 0
    eta = float(rng.uniform(0.2, 2.0))
    k = kernel("precise", sigmas, eta, schedule=shape)
    assert k.schedule == "custom"
    for i, (t, s) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        if s == 0.0:
            rho = 0.0  # int_0 g^2 / tau^2 diverges for both shapes (g(0) > 0 or g ~ sqrt(tau))
        else:
            val, _ = quad(lambda tau: (eta * float(shape(tau))) ** 2 / (2 * tau**2), s, t, epsabs=1e-14, epsrel=1e-12)
            rho = math.exp(-val)
        if shape is sqrt_schedule:
            closed = (s / t) ** (eta**2 / 2)  # int eta^2 / (2 tau) = eta^2 / 2 log(t / s)
            assert rho == pytest.approx(closed, rel=1e-9, abs=1e-300)
        std = s * math.sqrt(1 - rho**2)
        c = s * rho
        assert float(k.std[i]) == pytest.approx(std, rel=1e-8, abs=1e-10)
        assert float(k.a[i]) == pytest.approx((1 - s) + c, rel=1e-8, abs=1e-10)
        assert float(k.b[i]) == pytest.approx(-t * (1 - s) + c * (1 - t), rel=1e-8, abs=1e-10)


# ---------------------------------------------------------------------------------------------
# The SDE window at the kernel level
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_window_gives_ode_coefficients_outside_and_kernel_inside(name: str) -> None:
    rng = np.random.default_rng(9)
    n = 10
    sigmas = random_grid(rng, n)
    eta = random_eta(rng, name)
    inside = sorted(rng.choice(n, size=4, replace=False).tolist())
    a, b, std = ref_coefficients(name, sigmas, eta)
    d = sigmas[:-1] - sigmas[1:]
    full = kernel(name, sigmas, eta)
    mask = np.zeros(n, dtype=bool)
    mask[inside] = True
    for window in (inside, torch.tensor(mask)):
        k = full.with_window(window)
        np.testing.assert_allclose(as_np(k.a), np.where(mask, a, 1.0), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(as_np(k.b), np.where(mask, b, -d), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(as_np(k.std), np.where(mask, std, 0.0), rtol=1e-11, atol=1e-12)
        np.testing.assert_array_equal(as_np(k.stochastic), mask & (std > 0))
