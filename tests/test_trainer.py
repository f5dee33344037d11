"""The GRPO trainer on a tiny task: exact ratios, exact resume, checkpoints, LoRA, options, CLI errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from precise_rl.cli import main
from precise_rl.config import MOVED_TRAIN_KEYS, config_from_dict
from precise_rl.errors import UserError
from precise_rl.rl.trainer import GRPOTrainer, train_step_indices

from . import toy_task
from .diffusers_checks import recompute_ratio

toy_task.register()

STOCHASTIC = ["precise", "flow_grpo", "dance_grpo", "cps", "dance_precise"]


def _cfg(**sections: dict) -> object:
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return config_from_dict(data)


def _weights(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)}


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_importance_ratio_is_one_before_the_first_update(tmp_path: Path, sampler: str) -> None:
    trainer = GRPOTrainer(_cfg(sampler={"name": sampler, "num_steps": 5}), tmp_path)
    batch = trainer.collect(epoch=0)
    steps = train_step_indices(batch.kernel, 0.99)
    assert steps == [j for j in range(4) if batch.kernel.std[j] > 0]
    out, ratio, rows, idx = recompute_ratio(trainer, batch, steps)
    assert torch.isfinite(ratio).all()
    assert (ratio - 1).abs().max().item() < 1e-5
    torch.testing.assert_close(out.mean, batch.means[rows, idx], rtol=0, atol=1e-6)


def test_training_changes_weights_and_logs_every_metric(tmp_path: Path) -> None:
    trainer = GRPOTrainer(_cfg(), tmp_path)
    before = _weights(trainer)
    summary = trainer.run()
    after = _weights(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "reward_mean" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    for key in ("elapsed_s", "reward_mean", "reward/toy_brightness", "loss", "clip_frac", "approx_kl"):
        assert all(key in r for r in epochs), key
    assert "eval_ode_reward" in records[0] and records[0]["epoch"] == 0
    assert "eval_ode_reward" in epochs[1] and "eval_ode_reward" in epochs[3]
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    assert list((tmp_path / "samples").glob("*.png"))
    assert summary["reward_before"] is not None and summary["reward_after"] is not None
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 4
    ckpts = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["epoch_000002", "epoch_000004"]


def test_resume_gives_identical_weights_and_metrics(tmp_path: Path) -> None:
    full = GRPOTrainer(_cfg(), tmp_path / "full")
    full.run()
    part = GRPOTrainer(_cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 2}), tmp_path / "part")
    part.run()
    resumed = GRPOTrainer(_cfg(), tmp_path / "part", resume=tmp_path / "part")
    assert resumed.epoch == 2
    resumed.run()
    for n, w in _weights(full).items():
        assert torch.equal(w, _weights(resumed)[n]), n
    for a, b in zip(full.ema.shadow, resumed.ema.shadow, strict=True):
        assert torch.equal(a, b)

    def strip(path: Path) -> list[dict]:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if "elapsed" not in k and not k.startswith("time_")} for r in rows]

    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "part" / "metrics.jsonl")


def pixel_spread(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """A second reward for the tests: the pixels' standard deviation."""
    return images.flatten(1).std(dim=1)


@pytest.mark.parametrize("chunk", [1, 5, 12])
def test_rollout_chunks_are_scored_as_they_come_and_z_scored_over_the_whole_epoch(tmp_path: Path, chunk: int) -> None:
    """Two rewards, the epoch's 12 images scored ``chunk`` at a time: the advantages are those of float64
    arithmetic that z-scores each reward over all 12 images, sums them with their weights and then
    normalises each group."""
    weights = {"toy_brightness": 1.0, "tests.test_trainer:pixel_spread": -0.5}
    cfg = _cfg(train={"rollout_batch_size": chunk, "adv_clip": 100.0}, reward={"weights": weights})
    trainer = GRPOTrainer(cfg, tmp_path)
    batch = trainer.collect(epoch=0)
    assert len(batch.pending) == -(-12 // chunk) and all(p.done() for p in batch.pending)
    comps, adv, raw = trainer.score(batch)
    flat = batch.images.flatten(1).double().numpy()
    r = {"toy_brightness": flat.mean(1), "tests.test_trainer:pixel_spread": flat.std(1, ddof=1)}
    for name, want in r.items():
        np.testing.assert_allclose(comps[name].double().numpy(), want, rtol=1e-5, atol=1e-7)
    combined = sum(w * (r[n] - r[n].mean()) / (r[n].std() + 1e-8) for n, w in weights.items())
    groups = combined.reshape(3, 4)
    want_adv = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(adv.double().numpy(), want_adv.flatten(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(raw.double().numpy(), r["toy_brightness"] - 0.5 * r[list(r)[1]], rtol=1e-5, atol=1e-6)


def test_groups_with_equal_rewards_do_not_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = GRPOTrainer(_cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 1}, eval={"every": 0}), tmp_path)
    before = _weights(trainer)
    batch = trainer.collect(0)
    stats = trainer.train_on(batch, torch.zeros(len(batch.prompts)), 0)
    assert stats["zero_adv_groups"] == 1.0
    assert trainer.global_step == 0
    for n, w in _weights(trainer).items():
        assert torch.equal(w, before[n])


def test_lora_trains_only_adapter_weights_and_saves_them(tmp_path: Path) -> None:
    cfg = _cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 2, "lora": {"enabled": True, "rank": 2}})
    trainer = GRPOTrainer(cfg, tmp_path)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    assert trainer.param_names and all("lora" in n for n in trainer.param_names)
    trainer.run()
    for n, p in trainer.model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n
    adapter = tmp_path / "checkpoints" / "epoch_000002" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora" in k for k in weights)


@pytest.mark.parametrize(
    "options",
    [
        {"guard": True, "clip_range": 1e-3},
        {"kl_beta": 0.1},
        {"kl_beta": 0.1, "lora": {"enabled": True, "rank": 2}},
        {"inner_epochs": 2, "grad_accum": 2, "forward_batch": 5},
        {"adv_std": "batch", "timestep_fraction": 0.5},
    ],
)
def test_trainer_options_run_with_finite_metrics(tmp_path: Path, options: dict) -> None:
    knobs = {k: v for k, v in options.items() if k in MOVED_TRAIN_KEYS}  # GRPO's, under algorithm:
    train = {k: v for k, v in options.items() if k not in knobs}
    cfg = _cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 2, **train}, algorithm=knobs, eval={"every": 0})
    GRPOTrainer(cfg, tmp_path).run()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert all(v == v for v in r.values() if isinstance(v, float))
        if options.get("kl_beta"):
            assert "kl_ref" in r


def test_sliding_window_trains_only_window_steps(tmp_path: Path) -> None:
    cfg = _cfg(sampler={"name": "precise", "num_steps": 6, "window": {"size": 2, "slide_every": 1, "stride": 1}})
    trainer = GRPOTrainer(cfg, tmp_path)
    assert train_step_indices(trainer.kernel_for_epoch(0), 0.99) == [0, 1]
    assert train_step_indices(trainer.kernel_for_epoch(1), 0.99) == [1, 2]
    batch = trainer.collect(1)
    assert torch.isnan(batch.log_probs[:, 0]).all() and torch.isfinite(batch.log_probs[:, 1:3]).all()


def test_corrupt_checkpoint_is_refused_with_the_file_named(tmp_path: Path) -> None:
    cfg = _cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 2}, eval={"every": 0})
    GRPOTrainer(cfg, tmp_path).run()
    target = tmp_path / "checkpoints" / "epoch_000002" / "trainable.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="trainable.safetensors.*corrupt or truncated"):
        GRPOTrainer(cfg, tmp_path, resume=tmp_path)


def test_nan_loss_skips_updates_then_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 3, "max_nonfinite": 2}, eval={"every": 0})
    trainer = GRPOTrainer(cfg, tmp_path)
    before = _weights(trainer)
    real = trainer.policy.velocity

    def poisoned(x, t, cond):  # NaN only when gradients flow, i.e. in training, not rollouts
        v = real(x, t, cond)
        return v * float("nan") if torch.is_grad_enabled() else v

    monkeypatch.setattr(trainer.policy, "velocity", poisoned)
    with pytest.raises(UserError, match="updates in a row had a NaN"):
        trainer.run()
    for n, w in _weights(trainer).items():
        assert torch.equal(w, before[n])


def test_cli_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    assert main(["train", str(bad), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'train.lr' must be > 0" in err and len(err.splitlines()) == 1
    assert main(["train", "model.name=toy", "sampler.name=euler"]) == 2
    assert "'sampler.name' must be one of" in capsys.readouterr().err
    assert main(["train", "model.name=nosuchmodel", "--output", str(tmp_path / "r2")]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


@pytest.mark.parametrize("on_cpu", [False, True])
def test_a_world_size_that_is_no_integer_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_cpu: bool
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    if on_cpu:  # accelerate itself reads WORLD_SIZE then
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(UserError) as info:
        GRPOTrainer(_cfg(), tmp_path / "run")
    assert str(info.value) == (
        "the environment variable WORLD_SIZE must be the number of processes (an integer), got 'two'"
    )
    assert not (tmp_path / "run").exists()


def test_trainers_with_other_mixed_precision_follow_each_other(tmp_path: Path) -> None:
    """accelerate's process-wide state does not pin the first trainer's precision on the next one."""
    for i, precision in enumerate(["no", "bf16", "no"]):
        cfg = _cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 1, "mixed_precision": precision})
        trainer = GRPOTrainer(cfg, tmp_path / str(i))
        assert trainer.accelerator.mixed_precision == precision


def test_resume_from_checkpoint_with_unreadable_state_is_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(train={**toy_task.TOY_CONFIG["train"], "epochs": 1}, eval={"every": 0})
    GRPOTrainer(cfg, tmp_path).run()
    state = tmp_path / "checkpoints" / "epoch_000001" / "state.json"
    state.write_text(state.read_text()[:20])
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "state.json" in err and len(err.splitlines()) == 1
