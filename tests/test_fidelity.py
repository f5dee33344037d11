"""The fidelity lab: exact Gaussian propagation, the mixture velocity, and the report CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from precise_rl import cli
from precise_rl.cli import main
from precise_rl.fidelity import (
    GaussianMixture,
    GaussianTarget,
    default_mixture,
    mode_frequencies,
    mode_w2,
    propagate_gaussian,
    residual_median,
    residual_noise,
    weight_error,
)
from precise_rl.fidelity.report import sweep_eta_max
from precise_rl.sde import DEFAULT_ETA, SAMPLERS, kernel, rollout, shifted_sigmas, time_grid, uniform_sigmas

STOCHASTIC = tuple(s for s in SAMPLERS if s != "ode")


def _random_case(rng: np.random.Generator) -> tuple[GaussianTarget, torch.Tensor]:
    target = GaussianTarget(mean=float(rng.uniform(-1, 1)), std=float(np.exp(rng.uniform(np.log(0.05), np.log(3.0)))))
    grid = time_grid(int(rng.integers(4, 13)), str(rng.choice(["uniform", "shifted"])), shift=3.0)
    return target, grid


@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exact_propagation_matches_monte_carlo_rollout(sampler: str, seed: int) -> None:
    """The lab's exact mean/std equal those of real rollouts with the exact Gaussian velocity."""
    rng = np.random.default_rng(seed)
    target, sigmas = _random_case(rng)
    eta = DEFAULT_ETA[sampler] if sampler == "ode" else float(rng.uniform(0.05, sweep_eta_max()[sampler]))
    kern = kernel(sampler, sigmas, eta)
    exact = propagate_gaussian(kern, target)

    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn((4000, 8), generator=gen)  # 32000 independent coordinates
    x = rollout(target.velocity, x1, sigmas, kern, generator=gen, store_means=False).sample.double().flatten()
    n = x.numel()
    sd = exact.std
    assert abs(float(x.mean()) - exact.mean) < 5 * sd / math.sqrt(n) + 1e-6 * (1 + abs(exact.mean))
    assert abs(float(x.std()) / sd - 1) < 5 / math.sqrt(2 * n) + 1e-3


@pytest.mark.parametrize("grid", ["uniform", "shifted"])
def test_fine_grid_reaches_broad_target_except_cps(grid: str) -> None:
    """With 1000 steps on broad data the consistent samplers are within 1% of the target std; cps is not."""
    target = GaussianTarget(mean=float(np.random.default_rng().uniform(-1, 1)), std=2.0)
    sigmas = time_grid(1000, grid, shift=3.0)
    for sampler in SAMPLERS:
        ratio = propagate_gaussian(kernel(sampler, sigmas), target).std_ratio
        if sampler == "cps":
            assert abs(ratio - 1) > 0.05, ratio
        else:
            assert abs(ratio - 1) < 0.01, (sampler, ratio)


@pytest.mark.parametrize("nfe", [6, 10, 20])
def test_sharp_target_precise_tracks_ode_flow_grpo_adds_noise(nfe: int) -> None:
    """Sharp data, shift-3 grid: precise's std is the ODE's (within 5%); Flow-GRPO's is at least 5x the target's."""
    target = GaussianTarget(mean=0.5, std=0.02)
    sigmas = shifted_sigmas(nfe, 3.0)
    ode = propagate_gaussian(kernel("ode", sigmas), target)
    precise = propagate_gaussian(kernel("precise", sigmas), target)
    flow = propagate_gaussian(kernel("flow_grpo", sigmas), target)
    assert abs(precise.std / ode.std - 1) < 0.05
    assert flow.std_ratio >= 5.0


def _random_mixture(rng: np.random.Generator, dim: int) -> GaussianMixture:
    k = int(rng.integers(2, 6))
    w = rng.dirichlet(np.ones(k))
    return GaussianMixture(
        weights=tuple(float(x) for x in w / w.sum()),
        means=tuple(tuple(float(v) for v in row) for row in rng.normal(0, 2, size=(k, dim))),
        stds=tuple(float(c) for c in np.exp(rng.uniform(np.log(0.05), np.log(1.5), size=k))),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixture_posterior_matches_score_of_marginal(seed: int) -> None:
    """x0_hat and eps_hat equal Tweedie's formulas from the autograd score of the marginal density."""
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(1, 4))
    mix = _random_mixture(rng, dim)
    x = torch.from_numpy(rng.normal(0, 2, size=(64, dim)))
    t = torch.from_numpy(rng.uniform(0.02, 0.98, size=64))
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(mix.log_density(xg, t).sum(), xg)
    x0_hat, eps_hat = mix.posterior(x, t)
    tt = t[:, None]
    torch.testing.assert_close(eps_hat, -tt * score, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(x0_hat, (x + tt**2 * score) / (1 - tt), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(x, (1 - tt) * x0_hat + tt * eps_hat)
    # Batched times agree with one time per call.
    v = mix.velocity(x, t)
    for i in (0, 17, 63):
        torch.testing.assert_close(v[i : i + 1], mix.velocity(x[i : i + 1], float(t[i])))


def test_mixture_velocity_limits_and_single_mode() -> None:
    rng = np.random.default_rng()
    mix = _random_mixture(rng, 2)
    x = torch.from_numpy(rng.normal(size=(32, 2)))
    w, m, _ = mix.tensors()
    # t = 1: x0_hat is the data mean and eps_hat is x itself.
    torch.testing.assert_close(mix.velocity(x, 1.0), x - (w[:, None] * m).sum(0))
    # Close to the data end it stays finite, and x0_hat tends to x.
    x0_hat, _ = mix.posterior(x, 1e-9)
    assert torch.isfinite(x0_hat).all()
    # One mode: the Gaussian formula, coordinate by coordinate.
    c, mean = float(rng.uniform(0.05, 2)), float(rng.uniform(-1, 1))
    single = GaussianMixture(weights=(1.0,), means=((mean, mean),), stds=(c,))
    target = GaussianTarget(mean, c)
    for t in (1.0, 0.7, 0.2, 0.01):
        torch.testing.assert_close(single.velocity(x, t), target.velocity(x, t))
        alpha, beta = target.velocity_coefficients(t)
        torch.testing.assert_close(target.velocity(x, t), alpha * x + beta)


def test_mixture_metrics_on_exact_samples() -> None:
    """Exact target samples score as exact: weights match, residual ~1, small within-mode W2."""
    mix = default_mixture(5)
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    x, labels = mix.sample(4000, gen)
    assert (mix.assign(x) == labels).float().mean() > 0.99
    assert weight_error(mode_frequencies(mix, x), mix.weights) < 0.04
    assert abs(residual_noise(mix, x) - 1) < 0.06
    assert abs(residual_median(mix, x) - 1) < 0.06
    # A sampler that blurs every mode by 2x is far off.
    blurred = mix.tensors()[1][labels] + 2 * (x - mix.tensors()[1][labels])
    assert residual_median(mix, blurred) > 1.8
    assert mode_w2(mix, blurred, gen) > 3 * mode_w2(mix, x, gen)


@pytest.mark.parametrize("c", [0.02, 2.0])
def test_exploration_zero_for_ode_and_fractional_for_stochastic(c: float) -> None:
    """0 for the ODE, in (0, 1) for the stochastic samplers, and exactly 1 for precise.

    precise's first step starts at t = 1 where rho = 0: it keeps none of x_1 (``x0_hat`` at t = 1
    is the data mean whatever x_1), so its sample is independent of the initial noise. With that
    step left deterministic (an SDE window) its exploration is strictly between 0 and 1.
    """
    target = GaussianTarget(0.5, c)
    for grid in (uniform_sigmas(10), shifted_sigmas(10, 3.0)):
        assert propagate_gaussian(kernel("ode", grid), target).exploration == 0.0
        for sampler in STOCHASTIC:
            e = propagate_gaussian(kernel(sampler, grid), target).exploration
            if sampler == "precise":
                assert e == pytest.approx(1.0, abs=1e-12)
                windowed = kernel(sampler, grid).with_window(list(range(1, 10)))
                assert 0.0 < propagate_gaussian(windowed, target).exploration < 1.0
            else:
                assert 0.0 < e < 1.0, (sampler, e)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_exploration_matches_repeated_rollouts(sampler: str) -> None:
    """E[Var(x0 | x1)] / Var(x0) from the lab equals its estimate from many rollouts per x1."""
    rng = np.random.default_rng()
    target, sigmas = _random_case(rng)
    kern = kernel(sampler, sigmas)
    exact = propagate_gaussian(kern, target).exploration
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    groups, repeats, dim = 800, 20, 8
    x1 = torch.randn((groups, 1, dim), generator=gen).expand(groups, repeats, dim).reshape(-1, dim)
    x = rollout(target.velocity, x1, sigmas, kern, generator=gen, store_means=False).sample.double()
    x = x.view(groups, repeats, dim)
    estimate = float(x.var(dim=1).mean() / x.var())
    assert abs(estimate - exact) < 0.03, (estimate, exact)


@pytest.fixture(autouse=True)
def _only_fidelity_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI imports every subcommand's module: test this one without depending on the others."""
    monkeypatch.setattr(cli, "COMMANDS", {"fidelity": cli.COMMANDS["fidelity"]})


def test_cli_writes_report(tmp_path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["fidelity", "--output", str(out), "--nfe", "3", "5", "--samples", "64", "--eta-points", "2"]
    rc = main([*argv, "--no-progress", "--scatter-nfe", "3"])
    assert rc == 0
    for name in ("fidelity.json", "error_vs_nfe.png", "frontier.png", "mixture_scatter.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "fidelity.json").read_text())
    assert {"meta", "definitions", "gaussian", "mixture", "mixture_reference", "mixture_spec"} <= set(data)
    assert data["meta"]["nfe"] == [3, 5] and data["meta"]["scatter_nfe"] == 3 and data["meta"]["frontier_nfe"] == 5
    g = data["gaussian"][0]
    assert {"target_std", "grid", "sampler", "eta", "nfe", "std_ratio", "kl", "exploration"} <= set(g)
    # Every sampler at its default eta, per target, grid and NFE.
    assert len([r for r in data["gaussian"] if r["default_eta"]]) == 2 * 2 * len(SAMPLERS) * 2
    assert len(data["mixture"]) == 2 * len(SAMPLERS) * 2
    assert {"w2", "mode_w2", "weight_error", "mode_frequencies", "residual_noise"} <= set(data["mixture"][0])
    printed = capsys.readouterr().out
    assert "precise" in printed and "fidelity.json" in printed
    # the effective eta per step of every sampler, per grid and NFE, as the sde function computes it
    from precise_rl.sde import effective_eta, matched_precise_eta

    for r in data["effective_eta"]:
        sigmas = time_grid(r["nfe"], "uniform" if r["grid"] == "uniform" else "shifted", shift=3.0)
        if r["sampler"] == "precise matched to cps":
            assert r["eta"] == pytest.approx(matched_precise_eta(sigmas, "cps"), rel=1e-12)
            continue
        eff = effective_eta(r["sampler"], sigmas)
        np.testing.assert_allclose(np.array(r["per_step"], dtype=float), eff.values, rtol=1e-12)
        finite = eff.values[np.isfinite(eff.values)]
        assert r["median"] == (pytest.approx(float(np.median(finite))) if finite.size else None)
    assert len(data["effective_eta"]) == 2 * 2 * (len(SAMPLERS) + 1)
    assert "precise matched to cps" in printed


@pytest.mark.parametrize(
    "flags",
    [
        ["--nfe", "0"],
        ["--samples", "3"],
        ["--samplers", "euler"],
        ["--grids", "cosine"],
        ["--target-stds", "-1"],
        ["--nfe", "6", "--scatter-nfe", "10"],
        ["--eta-points", "1"],
    ],
)
def test_cli_bad_values_exit_2(tmp_path, flags, capsys) -> None:
    assert main(["fidelity", "--output", str(tmp_path / "r"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cli_bad_flags_exit_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fidelity", "--nfe", "ten"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["fidelity", "--no-such-flag"])
    assert exc.value.code == 2
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(["fidelity", "--output", str(not_a_dir), "--quick", "--no-progress"]) == 2
