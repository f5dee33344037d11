"""Where and in what the rollouts' trajectories are kept: ``train.latents_dtype`` and ``train.latents_on_cpu``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from precise_rl.config import config_from_dict
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices
from precise_rl.sde import kernel, log_prob, rollout

from . import toy_task
from .diffusers_checks import recompute_ratio

toy_task.register()


def _velocity(seed: int, dim: int):
    """A fixed random affine velocity field, row by row (each row's value does not depend on the batch)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen) / dim**0.5
    b = torch.randn(dim, generator=gen)

    def v(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return torch.stack([torch.tanh(row @ w + b * tt) for row, tt in zip(x, t, strict=True)])

    return v


def _recomputed(kern, traj, v) -> torch.Tensor:
    """Every stochastic step's log-prob recomputed from the stored latents, as training does."""
    out = torch.full_like(traj.log_probs, torch.nan)
    sig = kern.sigmas.float()
    for i in range(kern.num_steps):
        if kern.stochastic[i]:
            x_t, x_s = traj.latents[:, i].float(), traj.latents[:, i + 1].float()
            out[:, i] = log_prob(kern, i, x_t, v(x_t, sig[i].expand(len(x_t)), None), x_s)
    return out


@pytest.mark.parametrize("sampler", ["precise", "flow_grpo"])
def test_bfloat16_latents_give_a_log_prob_ratio_of_exactly_one(sampler: str) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    dim, n = 24, 6
    v = _velocity(seed, dim)
    kern = kernel(sampler, torch.linspace(1, 0, n + 1, dtype=torch.float64))
    x1 = torch.randn(5, dim, generator=torch.Generator().manual_seed(seed + 1))
    traj = rollout(v, x1, None, kern, generator=torch.Generator().manual_seed(seed + 2), store_dtype=torch.bfloat16)
    assert traj.latents.dtype == torch.bfloat16
    stoch = kern.stochastic
    assert torch.equal(_recomputed(kern, traj, v)[:, stoch], traj.log_probs[:, stoch])
    # The same trajectory kept in float32 and only rounded afterwards would not: the rounding moves each stored
    # sample away from the one whose density the rollout gave.
    full = rollout(v, x1, None, kern, generator=torch.Generator().manual_seed(seed + 2))
    rounded = copy.copy(full)
    rounded.latents = full.latents.bfloat16()
    assert not torch.equal(_recomputed(kern, rounded, v)[:, stoch], full.log_probs[:, stoch])
    # half the bytes, and samples as close to the float32 chain's as bfloat16's precision allows
    assert traj.latents.element_size() * 2 == full.latents.element_size()
    torch.testing.assert_close(traj.sample.float(), full.sample, rtol=0.05, atol=0.05)


def test_latents_on_the_cpu_store_the_same_trajectory() -> None:
    dim = 16
    v = _velocity(3, dim)
    kern = kernel("precise", torch.linspace(1, 0, 5, dtype=torch.float64))
    x1 = torch.randn(4, dim)
    a = rollout(v, x1, None, kern, generator=torch.Generator().manual_seed(7))
    b = rollout(v, x1, None, kern, generator=torch.Generator().manual_seed(7), store_device="cpu")
    assert b.latents.device.type == "cpu" and b.means.device.type == "cpu"
    for name in ("latents", "means", "log_probs"):  # log_probs: NaN on the deterministic last step
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True, msg=name)


def _cfg(**train) -> object:
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["train"].update({"epochs": 1, **train})
    data["eval"]["every"] = 0
    return config_from_dict(data)


def test_trainer_first_pass_ratio_is_exactly_one_with_bfloat16_latents(tmp_path: Path) -> None:
    trainer = GRPOTrainer(_cfg(latents_dtype="bfloat16", latents_on_cpu=True), tmp_path)
    batch = trainer.collect(epoch=0)
    assert batch.latents.dtype == torch.bfloat16 and batch.latents.device.type == "cpu"
    steps = train_step_indices(batch.kernel, 0.99)
    _, ratio, _, _ = recompute_ratio(trainer, batch, steps)
    assert torch.equal(ratio, torch.ones_like(ratio))


def test_latents_on_cpu_train_to_the_same_weights(tmp_path: Path) -> None:
    weights = []
    for on_cpu in (False, True):
        trainer = GRPOTrainer(_cfg(latents_on_cpu=on_cpu), tmp_path / str(on_cpu))
        trainer.run()
        weights.append([p.detach().clone() for p in trainer.params])
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b)


def test_the_latents_dtype_must_be_a_known_one() -> None:
    from precise_rl.errors import UserError

    with pytest.raises(UserError, match="latents_dtype"):
        _cfg(latents_dtype="float8")
