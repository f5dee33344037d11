"""One step: sampling, log-probs against torch.distributions, per-sample indices and generators, dtypes."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from precise_rl.sde import STD_FLOOR, gaussian_log_prob, kernel, log_prob, step

STOCHASTIC = ("flow_grpo", "dance_grpo", "cps", "precise", "dance_precise")
EM = ("flow_grpo", "dance_grpo")
PRECISE_FAMILY = ("cps", "precise", "dance_precise")


def random_grid(rng: np.random.Generator, n: int) -> torch.Tensor:
    inner = np.sort(rng.uniform(0.0, 1.0, size=n - 1))[::-1]
    return torch.tensor(np.concatenate([[1.0], inner, [0.0]]))


def random_eta(rng: np.random.Generator, name: str) -> float:
    return float(rng.uniform(0.05, 0.98)) if name == "cps" else float(rng.uniform(0.05, 2.5))


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Section 4 with torch.distributions, in float64, averaged over the non-batch elements."""
    std = std.double().clamp_min(STD_FLOOR).view(-1, *([1] * (x.ndim - 1)))
    return Normal(mean.double(), std).log_prob(x.double()).flatten(1).mean(dim=1)


def ref_mean(kern, i: torch.Tensor | int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """mean = a x + b v in float64, with the step's coefficients broadcast per row."""
    idx = torch.as_tensor(i).expand(x.shape[0])
    view = (-1,) + (1,) * (x.ndim - 1)
    return kern.a[idx].view(view) * x.double() + kern.b[idx].view(view) * v.double()


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random inputs per test, reproducible: numpy and torch seeded from the test's name."""
    seed = zlib.crc32(request.node.name.encode())
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_sampled_log_prob_equals_normal_log_prob_of_the_sample(name: str, rng) -> None:
    n = int(rng.integers(3, 12))
    kern = kernel(name, random_grid(rng, n), random_eta(rng, name))
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    x, v = torch.randn(2, 5, 3, 4, 4, generator=gen)
    for i in range(n):
        out = step(kern, i, x, v, generator=gen)
        for tensor in (out.sample, out.mean, out.std, out.log_prob):
            assert tensor.dtype == torch.float32
        assert out.sample.shape == x.shape and out.log_prob.shape == (5,) and out.std.shape == (5,)
        torch.testing.assert_close(out.mean.double(), ref_mean(kern, i, x, v), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std.double(), kern.std[i].expand(5), rtol=1e-6, atol=0)
        if float(kern.std[i]) > 0:
            expected = normal_log_prob(out.sample, out.mean, out.std)
            torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)
            # and the draw really is N(mean, std^2): the standardised residual is ~ unit normal
            z = (out.sample - out.mean) / float(kern.std[i])
            assert abs(float(z.std()) - 1) < 0.2


@pytest.mark.parametrize("name", STOCHASTIC)
def test_log_prob_of_given_x_s_equals_normal_log_prob(name: str, rng) -> None:
    n = 8
    kern = kernel(name, random_grid(rng, n), random_eta(rng, name))
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    x, v, target = torch.randn(3, 6, 2, 7, generator=gen)
    for i in range(n):
        std = kern.std[i].expand(6)
        mean = ref_mean(kern, i, x, v)
        # a plausible x_s (near the mean), and an arbitrary one
        for x_s in (mean.float() + float(kern.std[i]) * target, target):
            lp = log_prob(kern, i, x, v, x_s)
            assert lp.dtype == torch.float32 and lp.shape == (6,)
            expected = normal_log_prob(x_s, mean, std)
            # float32 mean: relative error ~1e-7 |mean| / std in z, so log-probs of far points lose ~1e-5 relative
            torch.testing.assert_close(lp.double(), expected, rtol=1e-4, atol=1e-4)
            out = step(kern, i, x, v, x_s=x_s)
            torch.testing.assert_close(out.log_prob, lp)
            assert torch.equal(out.sample, x_s.float())


def test_gaussian_log_prob_averages_over_elements_with_scalar_or_per_row_std(rng) -> None:
    x, mean = torch.randn(2, 4, 3, 5)
    std_rows = torch.tensor(rng.uniform(0.1, 2.0, size=4))
    tol = {"rtol": 1e-6, "atol": 1e-5}
    torch.testing.assert_close(gaussian_log_prob(x, mean, std_rows).double(), normal_log_prob(x, mean, std_rows), **tol)
    expected = normal_log_prob(x, mean, torch.full((4,), 0.3, dtype=torch.float64))
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3).double(), expected, **tol)
    # std below the floor is clamped to 1e-6 (section 3)
    lp = gaussian_log_prob(mean, mean, 0.0)
    torch.testing.assert_close(lp.double(), torch.full((4,), -math.log(1e-6) - 0.5 * math.log(2 * math.pi)).double())


@pytest.mark.parametrize("name", STOCHASTIC)
def test_per_sample_indices_match_row_by_row_steps(name: str, rng) -> None:
    n = 9
    kern = kernel(name, random_grid(rng, n), random_eta(rng, name))
    batch = 7
    idx = torch.tensor(rng.integers(0, n, size=batch))
    x, v, x_s = torch.randn(3, batch, 3, 5)
    lp = log_prob(kern, idx, x, v, x_s)
    mean = ref_mean(kern, idx, x, v)
    torch.testing.assert_close(lp.double(), normal_log_prob(x_s, mean, kern.std[idx]), rtol=1e-5, atol=1e-4)
    for r in range(batch):
        lp_r = log_prob(kern, int(idx[r]), x[r : r + 1], v[r : r + 1], x_s[r : r + 1])
        torch.testing.assert_close(lp[r : r + 1], lp_r, rtol=1e-6, atol=1e-6)
    # sampling with per-sample indices: noise scaled by each row's own std
    noise = torch.randn(batch, 3, 5)
    out = step(kern, idx, x, v, noise=noise)
    std = kern.std[idx].view(-1, 1, 1)
    torch.testing.assert_close(out.sample.double(), mean + std * noise.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std.double(), kern.std[idx], rtol=1e-6, atol=0)
    torch.testing.assert_close(
        out.log_prob.double(), normal_log_prob(out.sample, out.mean, kern.std[idx]), rtol=1e-5, atol=1e-4
    )
    # numpy integers are step indices too
    torch.testing.assert_close(step(kern, np.int64(2), x, v, x_s=x_s).log_prob, log_prob(kern, 2, x, v, x_s))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_per_sample_generators_reproduce_a_row_independently_of_the_batch(name: str, rng) -> None:
    kern = kernel(name, random_grid(rng, 5), random_eta(rng, name))
    seeds = rng.integers(0, 1 << 31, size=4).tolist()
    x, v = torch.randn(2, 4, 2, 3, 3)
    gens = [torch.Generator().manual_seed(k) for k in seeds]
    out = step(kern, 1, x, v, generator=gens)
    for r, k in enumerate(seeds):
        alone = step(kern, 1, x[r : r + 1], v[r : r + 1], generator=[torch.Generator().manual_seed(k)])
        assert torch.equal(out.sample[r : r + 1], alone.sample)
        assert torch.equal(out.log_prob[r : r + 1], alone.log_prob)
        single = step(kern, 1, x[r : r + 1], v[r : r + 1], generator=torch.Generator().manual_seed(k))
        assert torch.equal(out.sample[r : r + 1], single.sample)
    # a shuffled batch carries its generators along
    perm = [2, 0, 3, 1]
    shuffled = step(kern, 1, x[perm], v[perm], generator=[torch.Generator().manual_seed(seeds[p]) for p in perm])
    assert torch.equal(shuffled.sample, out.sample[perm])


@pytest.mark.parametrize("name", PRECISE_FAMILY)
def test_last_step_of_precise_family_is_deterministic_x0_hat(name: str, rng) -> None:
    sigmas = random_grid(rng, 6)
    kern = kernel(name, sigmas, random_eta(rng, name))
    x, v = torch.randn(2, 3, 4, 4)
    outs = [step(kern, 5, x, v, generator=torch.Generator().manual_seed(k)) for k in (0, 1, 2)]
    outs.append(step(kern, 5, x, v, noise=torch.randn(3, 4, 4)))
    t = float(sigmas[-2])
    x0_hat = x.double() - t * v.double()
    for out in outs:
        assert torch.equal(out.sample, outs[0].sample)
        assert float(out.std.abs().max()) == 0.0
        torch.testing.assert_close(out.sample.double(), x0_hat, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EM)
def test_euler_maruyama_last_step_still_draws_noise(name: str, rng) -> None:
    kern = kernel(name, random_grid(rng, 6), random_eta(rng, name))
    x, v = torch.randn(2, 3, 4, 4)
    a = step(kern, 5, x, v, generator=torch.Generator().manual_seed(0))
    b = step(kern, 5, x, v, generator=torch.Generator().manual_seed(1))
    assert float(a.std.min()) > 0
    assert not torch.allclose(a.sample, b.sample)
    torch.testing.assert_close(a.mean, b.mean)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", STOCHASTIC)
def test_step_math_is_float32_for_half_precision_inputs(name: str, dtype: torch.dtype, rng) -> None:
    # Large latents and a small std: (x_s - mean)^2 / std^2 overflows in half precision.
    n = 10
    kern = kernel(name, random_grid(rng, n), random_eta(rng, name))
    x = (300 * torch.randn(4, 2, 8, 8)).to(dtype)
    v = (300 * torch.randn(4, 2, 8, 8)).to(dtype)
    x_s = (300 * torch.randn(4, 2, 8, 8)).to(dtype)
    noise = torch.randn(4, 2, 8, 8).to(dtype)
    for i in range(n):
        out = step(kern, i, x, v, noise=noise)
        given = step(kern, i, x, v, x_s=x_s)
        for tensor in (out.sample, out.mean, out.log_prob, given.log_prob, given.mean):
            assert tensor.dtype == torch.float32
            assert bool(torch.isfinite(tensor).all())
        mean64 = ref_mean(kern, i, x, v)  # from the same half-precision values, in float64
        std = float(kern.std[i])
        torch.testing.assert_close(out.mean.double(), mean64, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(out.sample.double(), mean64 + std * noise.double(), rtol=1e-5, atol=1e-3)
        expected = normal_log_prob(x_s, mean64, kern.std[i].expand(4))
        torch.testing.assert_close(given.log_prob.double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_step_leaves_inputs_and_given_noise_untouched(name: str, rng) -> None:
    kern = kernel(name, random_grid(rng, 6), random_eta(rng, name))
    x, v, noise = torch.randn(3, 4, 2, 5)
    copies = [t.clone() for t in (x, v, noise)]
    out = step(kern, 2, x, v, noise=noise)
    step(kern, 2, x, v, generator=torch.Generator().manual_seed(0))
    for tensor, copy in zip((x, v, noise), copies, strict=True):
        assert torch.equal(tensor, copy)
    assert out.sample.data_ptr() not in (x.data_ptr(), v.data_ptr(), noise.data_ptr(), out.mean.data_ptr())


@pytest.mark.parametrize("name", STOCHASTIC)
def test_sampling_and_log_prob_are_differentiable_in_v(name: str, rng) -> None:
    kern = kernel(name, random_grid(rng, 6), random_eta(rng, name))
    i = 2
    x = torch.randn(3, 4, 5)
    v = torch.randn(3, 4, 5, requires_grad=True)
    noise = torch.randn(3, 4, 5)
    out = step(kern, i, x, v, noise=noise)
    (out.sample.sum()).backward()
    torch.testing.assert_close(v.grad.double(), torch.full((3, 4, 5), float(kern.b[i]), dtype=torch.float64))
    v.grad = None
    out = step(kern, i, x, v, generator=torch.Generator().manual_seed(0))
    out.sample.sum().backward()
    torch.testing.assert_close(v.grad.double(), torch.full((3, 4, 5), float(kern.b[i]), dtype=torch.float64))
    # d log_prob / d v for a fixed x_s: (x_s - mean) / std^2 * b, averaged over the 20 elements
    x_s = out.sample.detach()
    v.grad = None
    log_prob(kern, i, x, v, x_s).sum().backward()
    std = float(kern.std[i])
    mean = float(kern.a[i]) * x.double() + float(kern.b[i]) * v.detach().double()
    expected = (x_s.double() - mean) / std**2 * float(kern.b[i]) / 20
    torch.testing.assert_close(v.grad.double(), expected, rtol=1e-3, atol=1e-5)
