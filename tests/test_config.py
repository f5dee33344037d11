"""Experiment configs: schema validation, overrides, round trips, and one clear sentence per error."""

from __future__ import annotations

from pathlib import Path

import pytest

from precise_rl.config import ExperimentConfig, config_from_dict, config_to_dict, load_config
from precise_rl.errors import UserError


def test_default_config_is_valid_and_round_trips() -> None:
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_typed(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: 3e-4\n  epochs: 7\nsampler:\n  name: cps\n")
    cfg = load_config(f, ["train.lr=1e-4", "sampler.eta=0.5", "train.guard=true", "reward.weights.ink_style=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7
    assert cfg.sampler.name == "cps" and cfg.sampler.eta == 0.5
    assert cfg.train.guard is True
    assert cfg.reward.weights == {"ink_style": 2.0}


BAD_CONFIGS = [
    ({"trian": {}}, "unknown config key 'trian' (did you mean 'train'?)"),
    ({"train": {"lr_rate": 1}}, "unknown config key 'train.lr_rate'"),
    ({"train": {"epochs": "ten"}}, "'train.epochs' must be an integer"),
    ({"train": {"epochs": 2.5}}, "'train.epochs' must be an integer"),
    ({"train": {"epochs": True}}, "'train.epochs' must be an integer"),
    ({"train": {"epochs": 0}}, "'train.epochs' must be > 0"),
    ({"train": {"lr": -1.0}}, "'train.lr' must be > 0"),
    ({"train": {"lr": "fast"}}, "'train.lr' must be a number"),
    ({"train": {"guard": "yes"}}, "'train.guard' must be true or false"),
    ({"train": {"timestep_fraction": 0}}, "'train.timestep_fraction' must be in (0, 1]"),
    ({"train": {"group_size": 1}}, "'train.group_size' must be >= 2"),
    ({"train": {"adam_betas": [0.9]}}, "'train.adam_betas' must be two numbers"),
    ({"train": {"adv_std": "global"}}, "'train.adv_std' must be one of 'group', 'batch'"),
    ({"train": {"ema": {"decay": 1.5}}}, "'train.ema.decay' must be in [0, 1)"),
    ({"train": {"lora": {"rank": 0}}}, "'train.lora.rank' must be > 0"),
    ({"train": {"mixed_precision": "fp8"}}, "'train.mixed_precision' must be one of"),
    ({"sampler": {"name": "euler"}}, "'sampler.name' must be one of"),
    ({"sampler": {"eta": -0.1}}, "'sampler.eta' must be >= 0"),
    ({"sampler": {"name": "cps", "eta": 1.5}}, "'sampler.eta' must be in [0, 1] for cps"),
    ({"sampler": {"num_steps": 0}}, "'sampler.num_steps' must be > 0"),
    ({"sampler": {"window": {"size": 20}}}, "'sampler.window' does not fit in 10 steps"),
    ({"sampler": {"window": 3}}, "'sampler.window' must be a mapping"),
    ({"reward": {"weights": {"ink_style": "a lot"}}}, "'reward.weights.ink_style' must be a number"),
    ({"reward": {"weights": [1, 2]}}, "'reward.weights' must be a mapping"),
    ({"eval": {"samplers": ["euler"]}}, "'eval.samplers' has unknown sampler 'euler'"),
    ({"eval": {"samplers": "ode"}}, "'eval.samplers' must be a list"),
    ({"checkpoint": {"keep": 0}}, "'checkpoint.keep' must be > 0"),
    ({"seed": "zero"}, "'seed' must be an integer"),
    ({"model": {"dtype": "float64"}}, "'model.dtype' must be one of"),
]


@pytest.mark.parametrize(("data", "message"), BAD_CONFIGS)
def test_bad_config_is_refused_with_one_sentence(data: dict, message: str) -> None:
    with pytest.raises(UserError) as info:
        config_from_dict(data)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("train: [1, 2\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("train:\n  lr: 1e-3\n  bogus: 1\n", "unknown config key 'train.bogus'"),
    ],
)
def test_bad_config_file(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(f)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr", "must look like key.path=value"),
        ("=3", "has an empty key"),
        ("train..lr=3", "has an empty key"),
        ("train.lr.x=3", "'train.lr' must be a number"),
        ("train.nope=3", "unknown config key 'train.nope'"),
    ],
)
def test_bad_override(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(None, [override])
