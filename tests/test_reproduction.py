"""The trainer knobs that reproduce the reference recipe: float32 trainable weights under a bf16 model,
the reference's effective EMA, prompts drawn without replacement, held-out rewards and the `own` protocol."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies.flux2 import Flux2KleinPolicy
from precise_rl.rl.ema import EMA
from precise_rl.rl.trainer import GRPOTrainer, epoch_prompt_indices

from . import tiny_pipelines as tp
from . import toy_task

diffusers_logging.disable_progress_bar()
toy_task.register()


def _toy(**sections: dict) -> object:
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return config_from_dict(data)


# ----------------------------------------------------------------------------- float32 trainable weights


def _bf16_flux2(path: Path, train: dict, **top: object) -> object:
    """A one-epoch config of the tiny FLUX.2 Klein pipeline at ``path`` with bf16 weights."""
    return config_from_dict(
        {
            **top,
            "model": {
                "name": "flux2_klein",
                "path": str(path),
                "dtype": "bfloat16",
                "options": tp.adapter_options("flux2_klein"),
            },
            "sampler": {"num_steps": 3},
            "reward": {"weights": {"jpeg_incompressibility": 1.0}},
            "train": {"epochs": 1, "groups_per_epoch": 2, **train},
            "eval": {"every": 0},
            "logging": {"tensorboard": False, "progress": False},
        }
    )


def test_lora_weights_and_adam_state_are_float32_under_a_bf16_model_and_every_entry_moves(tmp_path: Path) -> None:
    """With ``model.dtype: bfloat16`` every trainable weight is float32, the frozen ones stay bf16, and one
    AdamW step at the reference's lr 8e-5 changes every LoRA entry (in bf16 most of them would round away)."""
    path = tp.save_pipeline("flux2_klein", tmp_path / "pipe", seed=int(torch.randint(0, 1000, ())))
    train = {
        "group_size": 4,
        "batch_size": 8,  # every sample in one micro-batch: exactly one optimizer step
        "lr": 8e-5,
        "weight_decay": 1e-4,
        "clip_range": 0.2,
        "mixed_precision": "bf16",
        "lora": {"enabled": True, "rank": 4, "alpha": 4},
        "ema": {"enabled": False},
    }
    cfg = _bf16_flux2(path, train, seed=random.randrange(1000))
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    named = dict(zip(trainer.param_names, trainer.params, strict=True))
    assert named and all(("lora_A" in n or "lora_B" in n) for n in named)
    assert all(p.dtype == torch.float32 for p in named.values())
    frozen = [p for n, p in trainer.policy.transformer.named_parameters() if "lora" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    # Gaussian init has lora_B = 0, which gives lora_A no gradient at the first step: start from B != 0.
    with torch.no_grad():
        for n, p in named.items():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.run()
    assert trainer.global_step == 1
    lr, wd, (b1, b2), eps = 8e-5, 1e-4, cfg.train.adam_betas, cfg.train.adam_eps
    for n, p in named.items():
        assert p.dtype == torch.float32
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        # AdamW's first step written out in float64 from the moments it recorded
        m_hat = state["exp_avg"].double() / (1 - b1)
        v_hat = state["exp_avg_sq"].double() / (1 - b2)
        expected = before[n].double() * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-7)
        # Every entry moves, but those whose gradient vanishes (|g| << Adam's eps, where the step is far
        # below float32's resolution at the weight): the tiny model has a few in its last context block.
        moving = (expected - before[n].double()).abs() > before[n].double().abs() * 2.0**-23
        assert bool((p.detach() != before[n])[moving].all()), n
        assert moving.double().mean() > 0.99, f"{n}: {1 - moving.double().mean():.2%} with a vanishing gradient"
    # The same step stored in bf16 would have left most lora_A entries as they were.
    a_names = [n for n in named if "lora_A" in n]
    kept = torch.cat([(named[n].detach().bfloat16() == before[n].bfloat16()).flatten() for n in a_names])
    assert kept.float().mean() > 0.5


def test_the_timestep_reaches_the_flux2_time_embedding_unrounded_under_autocast() -> None:
    """FLUX.2 casts the timestep to the hidden states' dtype: under autocast the latents go in float32, so a
    bf16 model sees sigma 0.7003 as 700.3, not bf16's 700; without autocast they must be the weights' bf16."""
    pipe = tp.flux2_klein_pipeline(seed=int(torch.randint(0, 1000, ()))).to(torch.bfloat16)
    policy = Flux2KleinPolicy(pipe, **tp.adapter_options("flux2_klein"))
    seen: list[torch.Tensor] = []
    hook = policy.transformer.time_guidance_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    cond = policy.encode_prompts(["a cat"])
    x = torch.randn(1, *policy.latent_shape)
    t = torch.tensor([0.7003])
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            v = policy.velocity(x, t, cond)
        with torch.no_grad():
            policy.velocity(x, t, cond)
    finally:
        hook.remove()
    assert torch.isfinite(v).all()
    assert seen[0].dtype == torch.float32 and float(seen[0]) == float(t * 1000)
    assert float(seen[1]) == float(t.bfloat16() * 1000) == 700.0


# ----------------------------------------------------------------------------- EMA


def _reference_helper_calls(weights: list[torch.Tensor], every: int, accum: int, decay: float) -> list[torch.Tensor]:
    """The reference trainer's EMA, call by call: ``ema.step(params, global_step)`` after every micro-batch,
    acting when ``(global_step + 1) % every == 0`` with decay ``min((1 + n) / (10 + n), decay)``.

    Micro-batch ``i`` (from 1) ends an accumulation when ``i % accum == 0``: the optimizer steps (the
    parameters become ``weights[i // accum]``) and the step counter moves before the call. Returns the
    shadow after the last call that saw each count ``k`` = 1, 2, ... (just before step ``k + 1``).
    """
    shadow, params, global_step = weights[0].double().clone(), weights[0].double(), 0
    out = []
    for i in range(1, len(weights) * accum):
        if i % accum == 0:
            params, global_step = weights[i // accum].double(), i // accum
        if (global_step + 1) % every == 0:
            d = min((1 + global_step) / (10 + global_step), decay)
            shadow += (1 - d) * (params - shadow)
        if (i + 1) % accum == 0 and global_step >= 1:
            out.append(shadow.clone())
    return out


@pytest.mark.parametrize(("every", "accum"), [(8, 8), (3, 2), (1, 4)])
def test_reference_ema_mode_equals_the_reference_helper_called_after_every_micro_batch(every: int, accum: int) -> None:
    steps = 40
    weights = [torch.randn(5, 3)]
    for _ in range(steps):
        weights.append(weights[-1] + 0.1 * torch.randn(5, 3))
    param = torch.nn.Parameter(weights[0].clone())
    ema = EMA([param], decay=0.9, every=every, mode="reference", repeats=accum)
    expected = _reference_helper_calls(weights, every, accum, 0.9)
    for k in range(1, steps + 1):
        with torch.no_grad():
            param.copy_(weights[k])
        ema.step()
        torch.testing.assert_close(ema.shadow[0].double(), expected[k - 1], rtol=1e-5, atol=1e-6)


def test_reference_ema_keeps_0_43_at_steady_state_and_interval_mode_keeps_the_decay() -> None:
    ref = EMA([torch.nn.Parameter(torch.zeros(1))], decay=0.9, every=8, mode="reference", repeats=8)
    assert [n for n in range(1, 40) if ref.kept(n) is not None] == [7, 15, 23, 31, 39]
    assert ref.kept(7) == pytest.approx((8 / 17) ** 8)
    assert ref.kept(799) == pytest.approx(0.9**8) and abs(0.9**8 - 0.43) < 0.005
    interval = EMA([torch.nn.Parameter(torch.zeros(1))], decay=0.9, every=8)
    assert [n for n in range(1, 40) if interval.kept(n) is not None] == [8, 16, 24, 32]
    assert interval.kept(8) == 0.9


def test_the_trainer_applies_the_reference_ema_once_per_micro_batch_of_an_update(tmp_path: Path) -> None:
    cfg = _toy(train={"grad_accum": 3, "batch_size": 2, "ema": {"enabled": True, "mode": "reference", "every": 2}})
    trainer = GRPOTrainer(cfg, tmp_path)
    assert (trainer.ema.mode, trainer.ema.repeats, trainer.ema.every) == ("reference", 3, 2)


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(("n", "per"), [(7, 3), (5, 5), (4, 9), (48, 8)])
def test_shuffled_prompts_cover_the_set_once_per_pass(n: int, per: int) -> None:
    seed = random.randrange(10_000)
    passes = 3
    drawn = [i for e in range(passes * n) for i in epoch_prompt_indices(n, per, e, seed)]
    for k in range(passes * per):  # each consecutive block of n draws is one whole pass
        assert sorted(drawn[k * n : (k + 1) * n]) == list(range(n))
    # Over all passes, not two: two shuffles of 4 prompts agree (or keep file order) 1 time in 24, and
    # the seed is random; all of them agree with a chance of (1/n!)^(passes - 1).
    shuffles = [tuple(drawn[k * n : (k + 1) * n]) for k in range(passes * per)]
    assert any(s != tuple(range(n)) for s in shuffles)  # shuffled, not in file order
    assert len(set(shuffles)) > 1  # a new shuffle each pass
    # an epoch's prompts are a function of (seed, epoch) alone: a resumed run draws the same
    assert epoch_prompt_indices(n, per, 5, seed) == drawn[5 * per : 6 * per]


def test_random_prompt_order_draws_with_replacement() -> None:
    draws = [epoch_prompt_indices(48, 16, e, 0, "random") for e in range(20)]
    assert any(len(set(d)) < len(d) for d in draws)  # some epoch repeats a prompt
    assert all(0 <= i < 48 for d in draws for i in d)


def test_the_trainer_draws_every_training_prompt_before_repeating_one(tmp_path: Path) -> None:
    trainer = GRPOTrainer(_toy(train={"groups_per_epoch": 2}), tmp_path)  # 3 training prompts, 2 per epoch
    size = trainer.cfg.train.group_size
    drawn = [p for e in range(3) for p in trainer.collect(e).prompts[::size]]
    assert sorted(drawn[:3]) == sorted(drawn[3:]) == sorted(toy_task.PROMPTS[:3])


# ----------------------------------------------------------------------------- evaluation


def test_own_protocol_and_held_out_rewards_are_evaluated_and_not_trained_on(tmp_path: Path) -> None:
    cfg = _toy(
        reward={"eval_only": ["jpeg_compressibility"], "options": {"jpeg_compressibility": {"quality": 70}}},
        eval={"samplers": ["ode", "train"]},  # 'train': the former name of 'own'
        sampler={"name": "flow_grpo", "eta": 1.2},
    )
    assert cfg.eval.samplers == ["ode", "own"]
    trainer = GRPOTrainer(cfg, tmp_path)
    assert trainer.eval_rewards.rewards["jpeg_compressibility"].quality == 70
    scores = trainer.evaluate(0, write_grid=False)
    for protocol in ("ode", "own"):
        assert f"eval_{protocol}_reward" in scores and f"eval_{protocol}/jpeg_compressibility" in scores
    assert scores["eval_own_reward"] != scores["eval_ode_reward"]
    comps, _, _ = trainer.score(trainer.collect(0))
    assert "jpeg_compressibility" not in comps and "toy_brightness" in comps


def test_own_protocol_samples_with_the_training_sampler_at_its_training_eta(tmp_path: Path) -> None:
    """``own`` at eta 1.2 equals evaluating flow_grpo at eta 1.2, and not flow_grpo at its default eta."""
    base = {"sampler": {"name": "flow_grpo", "eta": 1.2}, "eval": {"samplers": ["own", "flow_grpo"]}}
    scores = GRPOTrainer(_toy(**base), tmp_path / "a").evaluate(0, write_grid=False)
    other = GRPOTrainer(_toy(sampler={"name": "precise"}, eval={"samplers": ["flow_grpo"]}), tmp_path / "b")
    default_eta = other.evaluate(0, write_grid=False)["eval_flow_grpo_reward"]
    assert scores["eval_own_reward"] == scores["eval_flow_grpo_reward"] != default_eta


def test_held_out_rewards_are_checked_in_the_config() -> None:
    with pytest.raises(UserError, match="also trained on"):
        _toy(reward={"eval_only": ["toy_brightness"]})
    with pytest.raises(UserError, match="twice"):
        _toy(reward={"eval_only": ["jpeg_compressibility", "jpeg_compressibility"]})


def test_options_of_a_reward_neither_trained_nor_evaluated_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"options given for rewards \['jpeg_compressibility'\]"):
        GRPOTrainer(_toy(reward={"options": {"jpeg_compressibility": {"quality": 70}}}), tmp_path)


# ----------------------------------------------------------------------------- headroom


def test_digits_rewards_never_score_above_their_stated_maximum_and_reach_it() -> None:
    from precise_rl.rewards.base import RewardSet
    from precise_rl.tasks import digits

    prompts = list(digits.eval_prompts())
    meta = digits.prompt_metadata(prompts)
    rewards = RewardSet({"ink_style": 1.0, "digit_alignment": 1.0})
    best = rewards.max_weighted_raw(prompts, meta)
    images = [torch.rand(len(prompts), 1, 8, 8), torch.ones(len(prompts), 1, 8, 8), torch.zeros(len(prompts), 1, 8, 8)]
    for img in images:
        raw = rewards.weighted_raw(rewards.score(img, prompts, meta))
        assert bool((raw.double() <= best + 1e-6).all())
    # ink_style's maximum is reached: full ink for a bold prompt is past the cap
    bold = [i for i, m in enumerate(meta) if m["style"] == "bold"]
    ink = rewards.rewards["ink_style"]
    got = ink(torch.ones(len(bold), 1, 8, 8), [prompts[i] for i in bold], [meta[i] for i in bold])["ink_style"]
    torch.testing.assert_close(got, ink.max_score([prompts[i] for i in bold], [meta[i] for i in bold]).float())
    assert RewardSet({"ink_style": 1.0}, ink_style={"cap": None}).max_weighted_raw(prompts, meta) is None


def test_the_trainer_logs_the_reward_ceiling_of_the_held_out_prompts(tmp_path: Path) -> None:
    cfg = config_from_dict({"train": {"epochs": 1}, "eval": {"max_prompts": 6}, "logging": {"progress": False}})
    trainer = GRPOTrainer(cfg, tmp_path)
    scores = trainer.evaluate(0, write_grid=False)
    styles = [m["style"] for m in trainer.task.metadata(trainer.eval_prompts[:6])]
    assert scores["eval_reward_ceiling"] == pytest.approx(sum(2.0 for s in styles if s != "plain") / len(styles))


def test_metrics_count_updates_per_epoch_and_optimizer_steps_since_the_start(tmp_path: Path) -> None:
    """``updates``: optimizer steps of that epoch; ``optimizer_steps``: the running total (the paper's x-axis)."""
    cfg = _toy(train={"epochs": 3, "batch_size": 2, "grad_accum": 2}, eval={"every": 0})
    trainer = GRPOTrainer(cfg, tmp_path)
    trainer.run()
    from precise_rl.rl.logging import read_metrics

    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward_mean" in r]
    # 3 groups of 4 = 12 samples per epoch, 2 per micro-batch, 2 micro-batches per update: 3 updates
    # (fewer where a group of equal rewards carries no signal and is not trained)
    assert all(0 < r["updates"] <= 3 for r in records)
    totals = [r["optimizer_steps"] for r in records]
    assert totals == list(np.cumsum([r["updates"] for r in records])) and totals[-1] == trainer.global_step


def test_full_fine_tuning_of_a_bf16_model_with_kl_and_no_autocast_trains_in_float32(tmp_path: Path) -> None:
    """Every weight trained: the whole transformer and its frozen KL copy run in float32, without autocast too."""
    path = tp.save_pipeline("flux2_klein", tmp_path / "pipe")
    cfg = _bf16_flux2(path, {"group_size": 2, "kl_beta": 0.01, "lr": 1e-4})
    trainer = GRPOTrainer(cfg, tmp_path / "run")
    assert all(p.dtype == torch.float32 for p in trainer.policy.transformer.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.ref_module.parameters())
    trainer.run()
    from precise_rl.rl.logging import read_metrics

    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert record["updates"] == 1 and record["kl_ref"] >= 0 and np.isfinite(record["loss"])


def test_a_saved_adapter_samples_with_float32_lora_weights_and_an_unrounded_timestep_on_a_bf16_model(
    tmp_path: Path,
) -> None:
    """``precise-rl sample --lora`` on a bf16 model: the adapter keeps its float32 weights and the rollout runs
    under autocast as training does, so FLUX.2 sees its timestep unrounded."""
    from precise_rl.cli import sample as sample_cli
    from precise_rl.policies.lora import apply_lora, load_adapter, save_adapter
    from precise_rl.sde import uniform_sigmas

    pipe = tp.flux2_klein_pipeline(seed=int(torch.randint(0, 1000, ())))
    trained = Flux2KleinPolicy(pipe, **tp.adapter_options("flux2_klein"))
    module = apply_lora(trained.transformer, trained.lora_target_modules(), rank=2, alpha=2)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1 + 0.3)  # values bf16 cannot hold exactly
    save_adapter(module, tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}

    policy = Flux2KleinPolicy(tp.flux2_klein_pipeline(seed=0).to(torch.bfloat16), **tp.adapter_options("flux2_klein"))
    policy.transformer = load_adapter(policy.transformer, tmp_path / "adapter")
    loaded = {n: p for n, p in policy.transformer.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    for n, p in loaded.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), saved[n]), n
    seen: list[torch.Tensor] = []
    hook = policy.transformer.time_guidance_embed.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        images = sample_cli.generate(policy, "a cat", "precise", uniform_sigmas(3), None, [1, 2])
    finally:
        hook.remove()
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    assert seen and all(t.dtype == torch.float32 for t in seen)
