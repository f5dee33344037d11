"""AWM (Advantage Weighted Matching): the loss against the reference code, the stratified times, training.

The reference functions below are transcribed from scxue/advantage_weighted_matching at commit
be5137232e33a21b449ed65a533211d0deb97ed8, file advantage_weighted_matching/scripts/train_sd3_awm.py
(line numbers in each docstring), and the per-prompt stat tracker from its flow_grpo/stat_tracking.py
(identical to NVlabs/DiffusionNFT's, L12-32). They are kept as literal as the reference (names and
operation order); only type annotations were modernised. Inputs are fresh random tensors each run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from precise_rl.cli import main
from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies import index_cond
from precise_rl.rewards.base import combine_rewards
from precise_rl.rl import seeds
from precise_rl.rl.algorithms.awm import AWM, awm_loss, ema_decay, row_time_indices, strata
from precise_rl.rl.algorithms.base import reference_weights
from precise_rl.rl.trainer import Trainer

QUIET = {"tensorboard": False, "progress": False}
#: our weighting names -> the reference's
WEIGHTINGS = {"ghuber": "ghuber", "uniform": "Uniform", "t": "t", "t2": "t**2"}


# =====================================================================================
# Reference transcriptions (scxue/advantage_weighted_matching @ be51372, train_sd3_awm.py)
# =====================================================================================


def per_prompt_stat_tracker_reference(prompts: Sequence[str], rewards, global_std: bool = True) -> np.ndarray:
    """PerPromptStatTracker.update (type='grpo'), NVNFT flow_grpo/stat_tracking.py L12-32
    (identical in FG flow_grpo/stat_tracking.py L11-31 and AWM's copy).

    mean = per-prompt mean; std = (global std over *all* rewards if global_std else per-prompt std) + 1e-4;
    advantage = (r - mean)/std.  np.std is the population std (ddof=0).  `rewards` may be (N,) or (N,T)
    (NVNFT/FG repeat the reward over T train timesteps before calling; the statistics are per column).
    """
    prompts = np.array(prompts)
    rewards = np.array(rewards, dtype=np.float64)
    unique = np.unique(prompts)
    advantages = np.empty_like(rewards) * 0.0
    stats: dict[str, list] = {}
    for prompt in unique:
        prompt_rewards = rewards[prompts == prompt]
        if prompt not in stats:
            stats[prompt] = []
        stats[prompt].extend(prompt_rewards)
    for prompt in unique:
        stats[prompt] = np.stack(stats[prompt])
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(stats[prompt], axis=0, keepdims=True)
        if global_std:
            std = np.std(rewards, axis=0, keepdims=True) + 1e-4
        else:
            std = np.std(stats[prompt], axis=0, keepdims=True) + 1e-4
        advantages[prompts == prompt] = (prompt_rewards - mean) / std
    return advantages


def awm_compute_log_prob_reference(
    noise_pred: torch.Tensor,
    timestep: torch.Tensor,
    clean_latents: torch.Tensor,
    random_noise: torch.Tensor,
    weighting: str = "ghuber",
    ghuber_power: float = 0.25,
):
    """AWM train_sd3_awm.py L234-252 (compute_log_prob_awm after the transformer call).
    timestep = sigma in [0,1], shape (T*B,1,1,1) (the transformer receives timestep*1000, L228).
    "log_prob" = -mean_{C,H,W} (v_theta - (eps - x0))^2 in float64, then weighted:
      't': *t ; 't**2': *t^2 ; 'huber': -(sqrt(-lp+1e-10)-1e-5)*t ;
      'ghuber': -((-lp+1e-10)^p - (1e-10)^p) * t / p   (p = ghuber_power, 0.25 in every SD3.5 config).
    Returns (log_prob (T*B,), model_output (float64), std_dev_t) -- std_dev_t only feeds the unused
    'ELBO' KL weighting."""
    sigma = timestep
    std_dev_t = torch.sqrt(sigma / (1 - torch.clamp(sigma, 0, 0.99))) * 0.7
    model_output = noise_pred.double()
    log_prob = -((model_output - (random_noise.double() - clean_latents.double())) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    if weighting == "t":
        log_prob = log_prob * timestep.view(-1)
    elif weighting == "t**2":
        log_prob = log_prob * timestep.view(-1) ** 2
    elif weighting == "Uniform":
        log_prob = log_prob
    elif weighting == "huber":
        log_prob = -(torch.sqrt(-log_prob + 1e-10) - 1e-5) * timestep.view(-1)
    elif weighting == "ghuber":
        log_prob = (
            -(
                torch.pow(-log_prob + 1e-10, ghuber_power)
                - torch.pow(torch.tensor(1e-10, device=log_prob.device, dtype=log_prob.dtype), ghuber_power)
            )
            * timestep.view(-1)
            / ghuber_power
        )
    else:
        raise ValueError(f"Unknown weighting method: {weighting}")
    return log_prob, model_output, std_dev_t


def awm_loss_reference(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages_raw: torch.Tensor,
    train_timesteps: int,
    batch_size: int,
    model_output: torch.Tensor | None = None,
    model_output_ref: torch.Tensor | None = None,
    model_output_ema: torch.Tensor | None = None,
    std_dev_t: torch.Tensor | None = None,
    adv_clip_max: float = 5.0,
    advantage_max: float | None = 1.0,
    clip_range: float = 1.0,
    loss_type: str = "exp_first",
    beta: float = 0.0001,
    ema_beta: float = 1.0,
    kl_weight: str = "Uniform",
    kl_ema_weight: str = "Uniform",
) -> dict[str, torch.Tensor]:
    """AWM training loss, train_sd3_awm.py L1285-1354 (one micro-batch = T timesteps x B samples in one
    forward; row index = t_idx*B + b, because embeds/latents are `torch.cat([x]*T, dim=0)`, L1212-1220).

      advantages = clamp(A, -adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max  (A/5 in [-1,1])
      ratio      = exp(log_prob - old_log_prob.detach())      ('exp_first': per (t,b) element)
      policy     = mean(max(-adv*ratio, -adv*clamp(ratio, 1-clip_range, 1+clip_range)))
      kl         = mean_T mean_B mean_{CHW}(v - v_ref)^2       (v_ref = base model, LoRA disabled)
      ema_kl     = mean_T mean_B mean_{CHW}(v - v_ema)^2       (v_ema = 'ema' LoRA adapter)
      loss       = policy + beta*kl + ema_beta*ema_kl          (both KL terms only if beta > 0)
    On-policy default (off_policy=False, GAS == #micro-batches): old_log_prob == log_prob.detach()
    (L1282-1284), so ratio == 1 and grad = -mean(adv * grad log_prob).
    log_prob / old_log_prob: (T*B,) as returned by awm_compute_log_prob_reference.
    advantages_raw: (B,) (`sample["advantages"][:, 0]`).  model_output*: (T*B, C, H, W)."""
    log_probs_tb = log_prob.reshape(train_timesteps, batch_size)
    old_log_probs_tb = old_log_prob.reshape(train_timesteps, batch_size)

    advantages = torch.clamp(advantages_raw, -adv_clip_max, adv_clip_max)
    if advantage_max is not None:
        advantages = advantages / adv_clip_max * advantage_max

    if loss_type == "sum_first":
        sum_log_probs = log_probs_tb.mean(dim=0)
        sum_old_log_probs = old_log_probs_tb.mean(dim=0)
        ratio = torch.exp(sum_log_probs - sum_old_log_probs.detach())
    elif loss_type == "exp_first":
        log_probs = log_probs_tb.view(-1)
        old_log_probs = old_log_probs_tb.view(-1)
        ratio = torch.exp(log_probs - old_log_probs.detach())
    else:
        raise ValueError(f"Unknown loss_type: {loss_type}")

    if loss_type == "exp_first":
        advantages = advantages.unsqueeze(0).repeat(train_timesteps, 1).view(-1)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))

    out = {"advantages": advantages, "ratio": ratio, "policy_loss": policy_loss}
    if beta > 0 and model_output is not None and model_output_ref is not None:
        mo = model_output.reshape(train_timesteps, batch_size, *model_output.shape[1:])
        mo_ref = model_output_ref.reshape(train_timesteps, batch_size, *model_output_ref.shape[1:])
        sd = std_dev_t.reshape(train_timesteps, batch_size, *std_dev_t.shape[1:]) if std_dev_t is not None else None
        if kl_weight == "ELBO":
            kl_loss = ((mo - mo_ref) ** 2).mean(dim=(2, 3, 4), keepdim=True) / (2 * sd**2)
        elif kl_weight == "Uniform":
            kl_loss = ((mo - mo_ref) ** 2).mean(dim=(2, 3, 4), keepdim=True)
        else:
            raise ValueError(f"Unknown kl_weight: {kl_weight}")
        kl_loss = kl_loss.mean(dim=0).mean()
        out["kl_loss"] = kl_loss
        if ema_beta > 0 and model_output_ema is not None:
            mo_ema = model_output_ema.reshape(train_timesteps, batch_size, *model_output_ema.shape[1:])
            if kl_ema_weight == "ELBO":
                ema_kl_loss = ((mo - mo_ema) ** 2).mean(dim=(2, 3, 4), keepdim=True) / (2 * sd**2)
            elif kl_ema_weight == "Uniform":
                ema_kl_loss = ((mo - mo_ema) ** 2).mean(dim=(2, 3, 4), keepdim=True)
            else:
                raise ValueError(f"Unknown kl_weight: {kl_weight}")
            ema_kl_loss = ema_kl_loss.mean(dim=0).mean()
            out["ema_kl_loss"] = ema_kl_loss
            loss = policy_loss + beta * kl_loss + ema_beta * ema_kl_loss
        else:
            loss = policy_loss + beta * kl_loss
    else:
        loss = policy_loss
    out["loss"] = loss
    return out


def awm_kl_ema_decay_reference(global_step: int, kl_ema_decay: float = 0.3, kl_ema_decay_type: str = "linear") -> float:
    """AWM train_sd3_awm.py L1409-1419: decay of the 'ema' LoRA adapter (the EMA-KL anchor and, if
    off_policy, the sampler).  Applied once per epoch after training: ema = ema*decay + cur*(1-decay).
    'linear': min(kl_ema_decay, 0.001*global_step); 'constant': kl_ema_decay."""
    if kl_ema_decay_type == "constant":
        decay = kl_ema_decay
    elif kl_ema_decay_type == "linear":
        decay = min(kl_ema_decay, 0.001 * global_step)
    else:
        raise ValueError(kl_ema_decay_type)
    return decay


def awm_discrete_time_indices_reference(
    time_type: str, num_steps: int, timestep_fraction: float, train_timesteps: int, rand_u: torch.Tensor | None = None
) -> torch.Tensor:
    """AWM train_sd3_awm.py L1172-1205: stratified indices into the rollout timestep grid
    (`sample["timesteps"][0]`, the N-step shifted SD3 schedule); the trained sigma is grid[idx]/1000,
    identical for all B samples of the micro-batch (repeat_interleave, L1179).
      'discrete'        : linspace(0, int(N*frac), T+1)  -> strata [lo, hi)
      'discrete_wo_init': linspace(1, int(N*frac), T+1)
      'discrete_with_init': index 0 plus T-1 strata over linspace(1, int(N*frac), T)
    SD3.5 defaults: N=14, frac=0.9 -> int(12.6)=12, T=6."""
    if time_type == "discrete":
        boundaries = torch.linspace(0, int(num_steps * timestep_fraction), steps=train_timesteps + 1)
        lower_bounds = boundaries[:-1].long()
        upper_bounds = boundaries[1:].long()
        if rand_u is None:
            rand_u = torch.rand(train_timesteps)
        t_indices = lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long()
    elif time_type == "discrete_with_init":
        init_index = torch.tensor([0], dtype=torch.long)
        num_remaining = train_timesteps - 1
        if num_remaining > 0:
            max_step_idx = int(num_steps * timestep_fraction)
            boundaries = torch.linspace(1, max_step_idx, steps=num_remaining + 1)
            lower_bounds = boundaries[:-1].long()
            upper_bounds = boundaries[1:].long()
            if rand_u is None:
                rand_u = torch.rand(num_remaining)
            remaining_indices = lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long()
            t_indices = torch.cat([init_index, remaining_indices])
        else:
            t_indices = init_index
    elif time_type == "discrete_wo_init":
        boundaries = torch.linspace(1, int(num_steps * timestep_fraction), steps=train_timesteps + 1)
        lower_bounds = boundaries[:-1].long()
        upper_bounds = boundaries[1:].long()
        if rand_u is None:
            rand_u = torch.rand(train_timesteps)
        t_indices = lower_bounds + (rand_u * (upper_bounds - lower_bounds)).long()
    else:
        raise NotImplementedError(time_type)
    return t_indices


# =====================================================================================
# The loss formula
# =====================================================================================


def _random_inputs(gen: torch.Generator, rows: int, shape: tuple[int, ...] = (2, 3, 3)) -> dict[str, torch.Tensor]:
    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    x0, eps = randn(rows, *shape), randn(rows, *shape)
    v = (eps - x0 + 0.5 * randn(rows, *shape)).float()  # a model's velocity is float32, near the target
    return {
        "v": v,
        "v_ref": v + 0.1 * randn(rows, *shape).float(),
        "v_ema": v + 0.1 * randn(rows, *shape).float(),
        "eps": eps.float(),
        "x0": x0.float(),
        "t": torch.rand(rows, generator=gen),
    }


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize(("kl_beta", "ema_kl_beta"), [(1e-4, 1.0), (3e-2, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("clip_range", [1.0, 1e-4])
def test_loss_value_and_gradient_equal_the_reference(
    weighting: str, kl_beta: float, ema_kl_beta: float, clip_range: float
) -> None:
    """T times x B samples in the reference's row order (t_idx * B + b): our per-row loss averaged over
    the rows is the reference's micro-batch loss, and so is its gradient w.r.t. the velocity."""
    gen = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    T, B = 3, 4
    x = _random_inputs(gen, T * B)
    # float64 as the reference's (numpy) advantages; some beyond the clip of 5
    adv_raw = 3.0 * torch.randn(B, generator=gen, dtype=torch.float64)
    adv_raw[0] = 7.0
    knobs = {"adv_clip": 5.0, "advantage_max": 1.0, "clip_range": clip_range, "ghuber_power": 0.25}

    v_ours = x["v"].clone().requires_grad_(True)
    ours = awm_loss(
        v_ours,
        x["eps"],
        x["x0"],
        x["t"],
        adv_raw.repeat(T),  # row t_idx * B + b holds sample b
        v_ref=x["v_ref"],
        v_ema=x["v_ema"],
        weighting=weighting,
        kl_beta=kl_beta,
        ema_kl_beta=ema_kl_beta,
        **knobs,
    )
    ours.loss.mean().backward()

    v_ref = x["v"].clone().requires_grad_(True)
    lp, mo, std = awm_compute_log_prob_reference(
        v_ref, x["t"].view(-1, 1, 1, 1), x["x0"], x["eps"], WEIGHTINGS[weighting], knobs["ghuber_power"]
    )
    want = awm_loss_reference(
        lp,
        lp,  # on policy: the old log-prob is this one, detached inside
        adv_raw,
        T,
        B,
        model_output=mo,
        model_output_ref=x["v_ref"].double(),
        model_output_ema=x["v_ema"].double(),
        std_dev_t=std,
        adv_clip_max=knobs["adv_clip"],
        advantage_max=knobs["advantage_max"],
        clip_range=clip_range,
        beta=kl_beta,
        ema_beta=ema_kl_beta,
    )
    want["loss"].backward()

    assert ours.loss.dtype == torch.float64 and ours.loss.shape == (T * B,)
    torch.testing.assert_close(ours.loss.mean(), want["loss"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours.policy_loss.mean(), want["policy_loss"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours.log_prob, lp.detach(), rtol=1e-12, atol=0)
    # The gradient reaches v in its float32: a float32 rounding apart at most.
    scale = float(v_ref.grad.abs().max())
    torch.testing.assert_close(v_ours.grad, v_ref.grad, rtol=1e-6, atol=1e-6 * scale)
    assert v_ours.grad.abs().sum() > 0
    if kl_beta > 0:
        torch.testing.assert_close(ours.kl_ref.mean(), want["kl_loss"], rtol=1e-12, atol=0)
    else:
        assert ours.kl_ref is None and ours.kl_ema is None
    if kl_beta > 0 and ema_kl_beta > 0:
        torch.testing.assert_close(ours.kl_ema.mean(), want["ema_kl_loss"], rtol=1e-12, atol=0)


def test_the_ema_decay_is_the_references() -> None:
    for step in [0, 1, 7, 120, 299, 300, 301, 5000]:
        assert ema_decay(step, 0.001, 0.3) == awm_kl_ema_decay_reference(step, 0.3, "linear")


# =====================================================================================
# Stratified times
# =====================================================================================


@pytest.mark.parametrize("time_type", ["discrete", "discrete_wo_init"])
@pytest.mark.parametrize(("n", "fraction", "T"), [(14, 0.9, 6), (10, 0.9, 6), (10, 0.99, 3), (20, 0.7, 4), (6, 1.0, 6)])
def test_times_fall_one_in_each_of_the_reference_strata(time_type: str, n: int, fraction: float, T: int) -> None:
    bounds = strata(time_type, n, fraction, T)
    # The reference's strata: its draw at u = 0 is each stratum's lowest index, just below u = 1 its highest.
    lowest = awm_discrete_time_indices_reference(time_type, n, fraction, T, rand_u=torch.zeros(T))
    highest = awm_discrete_time_indices_reference(time_type, n, fraction, T, rand_u=torch.full((T,), 1 - 1e-7))
    assert int(highest.max()) < n
    base = int(torch.randint(1 << 30, ()))
    draws = []
    for row in range(400):
        # Same u as ours draws from the row's generator: the reference's index.
        u = torch.rand(T, generator=torch.Generator().manual_seed(base + row))
        ours = row_time_indices(bounds, torch.Generator().manual_seed(base + row))
        assert torch.equal(ours, awm_discrete_time_indices_reference(time_type, n, fraction, T, rand_u=u))
        draws.append(ours)
    idx = torch.stack(draws)  # (rows, T)
    assert bool(((idx >= lowest) & (idx <= highest)).all())
    for j in range(T):  # every index of every stratum is hit
        assert set(idx[:, j].tolist()) == set(range(int(lowest[j]), int(highest[j]) + 1))


def test_times_beyond_the_grid_are_refused() -> None:
    with pytest.raises(UserError, match="beyond the grid"):
        strata("discrete_wo_init", 1, 1.0, 2)


# =====================================================================================
# Through the class, on the built-in digits model
# =====================================================================================


def _digits_trainer(path: Path, **algorithm: object) -> Trainer:
    cfg = config_from_dict(
        {
            "seed": int(torch.randint(1000, ())),
            "algorithm": {"name": "awm", **algorithm},
            "train": {"epochs": 1, "groups_per_epoch": 2, "group_size": 4, "batch_size": 4},
            "eval": {"every": 0},
            "checkpoint": {"every": 0},
            "logging": QUIET,
        }
    )
    return Trainer(cfg, path)


def _perturb(params: Sequence[torch.Tensor], gen: torch.Generator, scale: float = 0.02) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen) * (p.abs().mean() + 1e-3))


def test_class_loss_and_weight_gradient_equal_the_reference_on_the_digits_model(tmp_path: Path) -> None:
    """The class's loss on real rows and (sample, time) items, and its gradient w.r.t. the model's weights,
    against the reference's formulas fed what the reference would compute: its advantages from the
    tracker, the row's strata draw, its noise, the current, reference and EMA policies' velocities."""
    trainer = _digits_trainer(tmp_path)
    algo, ctx = trainer.algorithm, trainer.algorithm.ctx
    assert isinstance(algo, AWM) and algo.forwards_per_row() == (1, 2)
    k, seed = algo.knobs, trainer.cfg.seed
    gen = torch.Generator().manual_seed(seed)
    # The current, EMA and reference (initial) weights all differ.
    _perturb(ctx.params, gen)
    algo.after_epoch(global_step=150)  # decay 0.15: the EMA policy moves most of the way
    _perturb(ctx.params, gen)
    batch = trainer.collect(epoch=0)
    comps, targets, _ = trainer.score(batch)
    algo.begin(batch, targets, epoch=0, inner=0)

    rows = batch.row_ids[torch.randperm(len(batch.row_ids), generator=gen)[:5]]
    units = rows.repeat_interleave(2)
    items = torch.randint(k.train_timesteps, (len(units),), generator=gen)
    out = algo.loss(units, items)
    grads = torch.autograd.grad(out.loss.mean(), ctx.params)

    # The reference's advantages: the per-prompt tracker (global std) on the combined reward.
    combined = combine_rewards(comps, trainer.reward_weights).double().numpy()
    groups = [str(r // trainer.cfg.train.group_size) for r in range(len(combined))]
    adv_all = torch.from_numpy(per_prompt_stat_tracker_reference(groups, combined, global_std=True))
    grid = batch.kernel.sigmas[:-1]
    n = len(grid)
    local = torch.tensor([int((batch.row_ids == u).nonzero()) for u in units])
    x0 = batch.latents[local, -1].float()
    t, eps = [], []
    for u, j in zip(units.tolist(), items.tolist(), strict=True):
        row_gen = torch.Generator().manual_seed(seeds.train_noise_seed(seed, 0, 0, u))
        idx = awm_discrete_time_indices_reference(
            k.time_type,
            n,
            k.timestep_fraction,
            k.train_timesteps,
            rand_u=torch.rand(k.train_timesteps, generator=row_gen),
        )
        t.append(float(grid[idx[j]]))
        noise_gen = torch.Generator().manual_seed(seeds.train_noise_seed(seed, 0, 0, u, j))
        eps.append(torch.randn(x0.shape[1:], generator=noise_gen))
    t_rows, eps_rows = torch.tensor(t, dtype=torch.float32), torch.stack(eps)
    tt = t_rows.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps_rows
    cond = index_cond(batch.cond, local)
    with torch.no_grad(), reference_weights(ctx):
        v_ref = trainer.policy.velocity(x_t, t_rows, cond)
    live = [p.detach().clone() for p in ctx.params]
    with torch.no_grad():
        for p, w in zip(ctx.params, algo.ema_policy.weights, strict=True):
            p.copy_(w)
        v_ema = trainer.policy.velocity(x_t, t_rows, cond)
        for p, w in zip(ctx.params, live, strict=True):
            p.copy_(w)
    v = trainer.policy.velocity(x_t, t_rows, cond)
    assert not torch.allclose(v, v_ref) and not torch.allclose(v, v_ema) and not torch.allclose(v_ref, v_ema)
    lp, mo, std = awm_compute_log_prob_reference(v, tt, x0, eps_rows, WEIGHTINGS[k.weighting], k.ghuber_power)
    want = awm_loss_reference(
        lp,
        lp,
        adv_all[units],
        1,  # each row its own sample: the reference's mean over T x B is the mean over the rows
        len(units),
        model_output=mo,
        model_output_ref=v_ref.double(),
        model_output_ema=v_ema.double(),
        std_dev_t=std,
        adv_clip_max=k.adv_clip,
        advantage_max=k.advantage_max,
        clip_range=k.clip_range,
        beta=k.kl_beta,
        ema_beta=k.ema_kl_beta,
    )
    want_grads = torch.autograd.grad(want["loss"], ctx.params)
    torch.testing.assert_close(out.loss.mean(), want["loss"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.stats["policy_loss"].mean(), want["policy_loss"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out.stats["kl_ref"].mean(), want["kl_loss"], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(out.stats["kl_ema"].mean(), want["ema_kl_loss"], rtol=1e-5, atol=1e-12)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # Unscored rows get a NaN advantage, as the shared helper gives; none here.
    assert torch.isfinite(targets).all()
    np.testing.assert_allclose(targets.double().numpy(), np.clip(adv_all.numpy(), -k.adv_clip, k.adv_clip), rtol=1e-5)


def test_a_rows_times_and_loss_do_not_depend_on_its_chunk_or_process(tmp_path: Path) -> None:
    trainer = _digits_trainer(tmp_path)
    algo = trainer.algorithm
    batch = trainer.collect(epoch=0)
    _, targets, _ = trainer.score(batch)
    algo.begin(batch, targets, epoch=0, inner=0)
    T = algo.items()
    units = batch.row_ids.repeat_interleave(T)
    items = torch.arange(T).repeat(len(batch.row_ids))
    whole = algo.loss(units, items).loss.detach()
    times = algo.times.clone()
    # Rows one at a time, in reverse order: the same times and noise, so the same loss.
    for i in reversed(range(len(units))):
        one = algo.loss(units[i : i + 1], items[i : i + 1]).loss.detach()
        torch.testing.assert_close(one, whole[i : i + 1], rtol=1e-6, atol=1e-9)
    # Another process holding only the second group draws the same times for its rows.
    size = trainer.cfg.train.group_size
    keep = torch.arange(size, 2 * size)
    part = replace(
        batch,
        prompts=[batch.prompts[i] for i in keep],
        metadata=[batch.metadata[i] for i in keep],
        group_ids=batch.group_ids[keep],
        row_ids=batch.row_ids[keep],
        cond=index_cond(batch.cond, keep),
        latents=batch.latents[keep],
        log_probs=batch.log_probs[keep],
        images=batch.images[keep],
    )
    algo.begin(part, targets, epoch=0, inner=0)
    assert torch.equal(algo.times, times[keep])
    mine = (units >= size) & (units < 2 * size)
    torch.testing.assert_close(algo.loss(units[mine], items[mine]).loss.detach(), whole[mine], rtol=1e-6, atol=1e-9)
    # The strata hold: each row's j-th time is in the j-th stratum of the rollout grid.
    grid = batch.kernel.sigmas[:-1].float()
    k = algo.knobs
    bounds = strata(k.time_type, len(grid), k.timestep_fraction, T)
    hi = torch.where(bounds[:, 1] > bounds[:, 0], bounds[:, 1] - 1, bounds[:, 0])
    assert bool(((times <= grid[bounds[:, 0]]) & (times >= grid[hi])).all())  # the grid descends
    # Another pass or epoch draws afresh.
    algo.begin(batch, targets, epoch=0, inner=1)
    assert not torch.equal(algo.times, times)


def test_idle_pass_and_the_ema_policy(tmp_path: Path) -> None:
    trainer = _digits_trainer(tmp_path)
    algo, ctx = trainer.algorithm, trainer.algorithm.ctx
    batch = trainer.collect(epoch=0)
    _, targets, _ = trainer.score(batch)
    algo.begin(batch, targets, epoch=0, inner=0)
    # An idle pass needs no target: a NaN everywhere (no row scored) does not reach its loss.
    algo.begin(batch, torch.full_like(targets, math.nan), epoch=0, inner=0)
    idle = algo.loss(torch.tensor([algo.placeholder()]), torch.zeros(1, dtype=torch.long), idle=True)
    assert torch.isfinite(idle.loss).all() and not idle.stats
    # The EMA policy follows the trained weights after an epoch with the reference's decay.
    before = [w.clone() for w in algo.ema_policy.weights]
    _perturb(ctx.params, torch.Generator().manual_seed(1))
    algo.after_epoch(global_step=120)
    d = awm_kl_ema_decay_reference(120, 0.3, "linear")
    for w, b, p in zip(algo.ema_policy.weights, before, ctx.params, strict=True):
        torch.testing.assert_close(w, d * b + (1 - d) * p.detach(), rtol=1e-6, atol=1e-7)
    saved = algo.state_tensors()
    assert set(saved) == {"ema_policy." + n for n in ctx.param_names}
    # Without the KL terms there is no EMA policy to keep, and one forward per row.
    plain = AWM(replace(algo.knobs, kl_beta=0.0), ctx)
    assert plain.forwards_per_row() == (1, 0) and plain.state_tensors() == {}


def test_plan_keeps_groups_of_equal_rewards(tmp_path: Path) -> None:
    trainer = _digits_trainer(tmp_path)
    algo = trainer.algorithm
    size = trainer.cfg.train.group_size
    adv = torch.randn(2 * size)
    adv[:size] = 0.0  # a group whose rewards were all equal
    adv[-1] = math.nan  # an unscored image
    planned = torch.cat([m for u in algo.plan(adv, 0, 0) for m in u])
    assert sorted(planned.tolist()) == list(range(2 * size - 1))


# =====================================================================================
# Training through the CLI
# =====================================================================================


def _cli(out: Path, *overrides: str) -> int:
    args = ["train", "algorithm.name=awm", "--output", str(out), "eval.samplers=[ode]"]
    args += ["logging.tensorboard=false", "logging.progress=false", *overrides]
    return main(args)


@pytest.mark.slow
def test_training_raises_the_held_out_reward(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _cli(out, "seed=0", "train.epochs=20", "eval.every=20", "checkpoint.every=0") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_ode_reward"] for r in records if "eval_ode_reward" in r]
    assert len(evals) == 2
    before, after = evals
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["reward_before"], summary["reward_after"]) == (before, after)
    assert after > before + 0.02, f"held-out reward {before:.4f} -> {after:.4f}"
    trained = [r for r in records if "loss" in r]
    assert len(trained) == 20
    for key in ("policy_loss", "log_prob", "fm_error", "kl_ref", "kl_ema"):
        assert all(math.isfinite(r[key]) for r in trained), key


@pytest.mark.slow
def test_resume_repeats_an_uninterrupted_run_and_keeps_the_ema_policy(tmp_path: Path) -> None:
    small = ["seed=3", "train.groups_per_epoch=2", "train.group_size=4", "train.batch_size=4", "eval.every=0"]
    assert _cli(tmp_path / "full", *small, "train.epochs=4", "checkpoint.every=2") == 0
    assert _cli(tmp_path / "part", *small, "train.epochs=2", "checkpoint.every=2") == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=4"]) == 0

    def saved(run: str, stem: str) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / "checkpoints" / "epoch_000004" / f"{stem}.safetensors"))

    full, resumed = saved("full", "trainable"), saved("part", "trainable")
    assert full.keys() == resumed.keys() and full
    for n in full:
        assert torch.equal(full[n], resumed[n]), n
    ema_full, ema_resumed = saved("full", "algorithm"), saved("part", "algorithm")
    assert set(ema_full) == {"ema_policy." + n for n in full}
    for n in ema_full:
        assert torch.equal(ema_full[n], ema_resumed[n]), n
    # It is its own copy: it lags the trained weights (decay 0.001 * steps > 0 after the first epoch).
    assert any(not torch.equal(ema_full["ema_policy." + n], full[n].float()) for n in full)
