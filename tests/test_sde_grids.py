"""Time grids of section 6 against their formulas and diffusers' FLUX shift functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from precise_rl.sde import (
    flux1_mu,
    flux2_empirical_mu,
    flux_sigmas,
    shift_sigmas,
    shifted_sigmas,
    time_grid,
    uniform_sigmas,
    validate_sigmas,
)


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_uniform_grid_is_one_minus_i_over_n(n: int) -> None:
    s = uniform_sigmas(n)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    np.testing.assert_allclose(s.numpy(), [1 - i / n for i in range(n + 1)], atol=1e-15)
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 7.3])
@pytest.mark.parametrize("n", [1, 10, 28])
def test_shifted_grid_follows_sd3_formula(n: int, shift: float) -> None:
    s = shifted_sigmas(n, shift)
    expected = [shift * t / (1 + (shift - 1) * t) for t in (1 - i / n for i in range(n + 1))]
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-14, atol=1e-15)
    assert float(s[0]) == pytest.approx(1.0, abs=1e-15) and float(s[-1]) == 0.0
    validate_sigmas(s)
    torch.testing.assert_close(time_grid(n, "shifted", shift=shift), s)
    torch.testing.assert_close(shifted_sigmas(n), shifted_sigmas(n, 3.0))  # SD3.5 default


@pytest.mark.parametrize("mu", [-0.4, 0.5, 1.15, 2.3])
def test_flux_grid_uses_exp_mu_as_shift(mu: float) -> None:
    n = 12
    a = math.exp(mu)
    expected = [a * t / (1 + (a - 1) * t) for t in (1 - i / n for i in range(n + 1))]
    np.testing.assert_allclose(flux_sigmas(n, mu).numpy(), expected, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(time_grid(n, "flux", mu=mu), flux_sigmas(n, mu))
    torch.testing.assert_close(shift_sigmas(uniform_sigmas(n), a), flux_sigmas(n, mu))


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 4300, 4301, 9000])
@pytest.mark.parametrize("steps", [4, 10, 20, 50])
def test_flux2_empirical_mu_matches_diffusers(seq_len: int, steps: int) -> None:
    pipeline_flux2 = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2")
    assert flux2_empirical_mu(seq_len, steps) == pytest.approx(
        pipeline_flux2.compute_empirical_mu(seq_len, steps), rel=1e-14, abs=1e-14
    )


@pytest.mark.parametrize("seq_len", [256, 1000, 4096, 8192])
def test_flux1_mu_matches_diffusers_calculate_shift(seq_len: int) -> None:
    pipeline_flux = pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
    assert flux1_mu(seq_len) == pytest.approx(pipeline_flux.calculate_shift(seq_len), rel=1e-12)


def test_validate_sigmas_accepts_a_random_decreasing_grid_as_float64() -> None:
    rng = np.random.default_rng(12)
    grid = np.concatenate([[1.0], np.sort(rng.uniform(0, 1, 9))[::-1], [0.0]])
    out = validate_sigmas(grid.tolist())
    assert out.dtype == torch.float64
    np.testing.assert_array_equal(out.numpy(), grid)
    torch.testing.assert_close(time_grid(10, "custom", sigmas=grid.tolist()), out)


@pytest.mark.parametrize(
    ("sigmas", "match"),
    [
        ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([1.0, 0.3, 0.6, 0.0], "strictly decreasing"),
        ([0.0, 0.5, 1.0], "strictly decreasing"),
        ([1.2, 0.5, 0.0], r"within \[0, 1\]"),
        ([1.0, 0.5, -0.1], r"within \[0, 1\]"),
        ([1.0, float("nan"), 0.0], "finite"),
        ([1.0, float("inf"), 0.0], "finite"),
        ([1.0], "at least 2"),
        ([[1.0, 0.0]], "1-D"),
    ],
)
def test_validate_sigmas_rejects_bad_grids_naming_the_problem(sigmas: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_sigmas(sigmas)


def test_time_grid_rejects_unknown_kind_and_missing_arguments() -> None:
    with pytest.raises(ValueError, match="unknown time grid"):
        time_grid(10, "cosine")
    with pytest.raises(ValueError, match="needs mu"):
        time_grid(10, "flux")
    with pytest.raises(ValueError, match="needs sigmas"):
        time_grid(10, "custom")
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(3, "custom", sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="num_steps"):
        uniform_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        shifted_sigmas(10, -1.0)
