"""Inputs a user can get wrong end in a ValueError that names the problem."""

from __future__ import annotations

import pytest
import torch

from precise_rl.sde import kernel, log_prob, rollout, sde_window, sliding_window, step, uniform_sigmas

SIGMAS = uniform_sigmas(4)


def _xv(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, 4), torch.randn(batch, 2, 4)


def test_unknown_sampler_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'ddpm'"):
        kernel("ddpm", SIGMAS)
    with pytest.raises(ValueError, match="unknown sampler"):
        rollout(lambda x, t, c: x, torch.randn(2, 3), SIGMAS, "euler_a")


@pytest.mark.parametrize("name", ["flow_grpo", "dance_grpo", "cps", "precise", "dance_precise"])
@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_eta_is_rejected(name: str, eta: float) -> None:
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        kernel(name, SIGMAS, eta)


def test_cps_eta_above_one_is_rejected() -> None:
    kernel("cps", SIGMAS, 1.0)
    with pytest.raises(ValueError, match=r"cps needs eta in \[0, 1\]"):
        kernel("cps", SIGMAS, 1.01)


def test_non_numeric_eta_is_rejected() -> None:
    with pytest.raises(ValueError, match="eta must be a number"):
        kernel("precise", SIGMAS, "high")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sigmas", "match"),
    [([1.0, 0.4, 0.6, 0.0], "strictly decreasing"), ([1.5, 0.5, 0.0], r"\[0, 1\]"), ([1.0, 0.5, -1.0], r"\[0, 1\]")],
)
def test_kernel_and_rollout_reject_bad_sigmas(sigmas: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kernel("precise", sigmas)
    with pytest.raises(ValueError, match=match):
        rollout(lambda x, t, c: x, torch.randn(2, 3), sigmas, "flow_grpo")


def test_schedule_is_rejected_where_it_does_not_apply() -> None:
    with pytest.raises(ValueError, match="applies to 'precise' only"):
        kernel("flow_grpo", SIGMAS, schedule="constant")
    with pytest.raises(ValueError, match="unknown exploration schedule"):
        kernel("precise", SIGMAS, schedule="cosine")
    with pytest.raises(ValueError, match="constant schedule"):
        kernel("dance_precise", SIGMAS, schedule="logsnr")


@pytest.mark.parametrize("which", ["x_t", "v", "x_s"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_rejected(which: str, bad: float) -> None:
    k = kernel("precise", SIGMAS)
    x, v = _xv()
    x_s = torch.randn_like(x)
    {"x_t": x, "v": v, "x_s": x_s}[which][1, 0, 2] = bad
    with pytest.raises(ValueError, match=f"{which} contains NaN or inf"):
        log_prob(k, 1, x, v, x_s)
    if which != "x_s":
        with pytest.raises(ValueError, match=f"{which} contains NaN or inf"):
            step(k, 1, x, v)


def test_rollout_rejects_non_finite_noise_and_velocity() -> None:
    x1 = torch.randn(2, 3)
    x1[0, 1] = float("nan")
    with pytest.raises(ValueError, match="x1 contains NaN"):
        rollout(lambda x, t, c: x, x1, SIGMAS, "precise")
    with pytest.raises(ValueError, match="NaN or inf at step"):
        rollout(lambda x, t, c: x / (t - t)[:, None], torch.randn(2, 3), SIGMAS, "precise")


def test_shape_mismatches_are_rejected() -> None:
    k = kernel("precise", SIGMAS)
    x, v = _xv()
    with pytest.raises(ValueError, match="x_t and v must have the same shape"):
        step(k, 0, x, v[:, :1])
    with pytest.raises(ValueError, match="x_t and v must have the same shape"):
        step(k, 0, x, v[:2])
    with pytest.raises(ValueError, match="x_s must have the shape of x_t"):
        log_prob(k, 0, x, v, x[:, :1])
    with pytest.raises(ValueError, match="noise must have the shape of x_t"):
        step(k, 0, x, v, noise=torch.randn(3, 2, 5))


@pytest.mark.parametrize(
    "index",
    [
        torch.tensor([0, 1]),  # too short
        torch.tensor([0, 1, 2, 3]),  # too long
        torch.tensor([[0], [1], [2]]),  # 2-D
        torch.tensor([0.0, 1.0, 2.0]),  # float
        torch.tensor([True, False, True]),  # a mask, not indices
    ],
    ids=["short", "long", "2d", "float", "bool"],
)
def test_wrong_per_sample_index_shape_or_dtype_is_rejected(index: torch.Tensor) -> None:
    k = kernel("precise", SIGMAS)
    x, v = _xv()
    with pytest.raises(ValueError, match=r"per-sample step indices must be an integer tensor of shape \(3,\)"):
        step(k, index, x, v)


def test_index_out_of_range_is_rejected() -> None:
    k = kernel("precise", SIGMAS)
    x, v = _xv()
    for i in (4, -1, 100):
        with pytest.raises(ValueError, match=f"step index {i} is out of range for a kernel of 4 steps"):
            step(k, i, x, v)
    with pytest.raises(ValueError, match=r"step indices must lie in \[0, 3\]"):
        step(k, torch.tensor([0, 4, 1]), x, v)
    with pytest.raises(ValueError, match=r"step indices must lie in \[0, 3\]"):
        step(k, torch.tensor([0, -1, 1]), x, v)


def test_wrong_number_of_generators_is_rejected() -> None:
    k = kernel("flow_grpo", SIGMAS)
    x, v = _xv()
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        step(k, 0, x, v, generator=gens)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        rollout(lambda x, t, c: x, torch.randn(3, 2), SIGMAS, "precise", generator=gens)


def test_velocity_fn_returning_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"velocity_fn returned shape \(2, 1\) for input of shape \(2, 3\)"):
        rollout(lambda x, t, c: x[:, :1], torch.randn(2, 3), SIGMAS, "precise")


def test_bad_sde_windows_are_rejected() -> None:
    with pytest.raises(ValueError, match="SDE window indices must lie in"):
        rollout(lambda x, t, c: x, torch.randn(2, 3), SIGMAS, "precise", window=[1, 4])
    with pytest.raises(ValueError, match="boolean SDE window must have length 4"):
        rollout(lambda x, t, c: x, torch.randn(2, 3), SIGMAS, "precise", window=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="size must be in"):
        sliding_window(4, 5, epoch=0)
    with pytest.raises(ValueError, match=">= 0"):
        sde_window(4, -1)


def test_kernel_and_different_sigmas_passed_to_rollout_are_rejected() -> None:
    k = kernel("precise", SIGMAS)
    with pytest.raises(ValueError, match="differ from those of the given kernel"):
        rollout(lambda x, t, c: x, torch.randn(2, 3), uniform_sigmas(5), k)
