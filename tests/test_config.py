"""Experiment configs: schema validation, overrides, round trips, and one clear sentence per error.

Besides the listed cases, hypothesis writes config files with a wrongly typed value (or NaN/inf
for a number) at a random key of the schema: each must end in one sentence naming the key, exit 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precise_rl.cli import main
from precise_rl.config import ExperimentConfig, config_from_dict, config_to_dict, load_config
from precise_rl.errors import UserError


def test_default_config_is_valid_and_round_trips() -> None:
    cfg = load_config()
    default = ExperimentConfig()
    assert default.sampler.name is None  # null: the algorithm's reference sampler, resolved by the check
    default.sampler.name = "precise"
    assert cfg == default
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_typed(tmp_path: Path) -> None:
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: 3e-4\n  epochs: 7\nsampler:\n  name: cps\n")
    cfg = load_config(f, ["train.lr=1e-4", "sampler.eta=0.5", "algorithm.guard=true", "reward.weights.ink_style=2"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7
    assert cfg.sampler.name == "cps" and cfg.sampler.eta == 0.5
    assert cfg.algorithm.guard is True
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
    ({"algorithm": {"guard": "yes"}}, "'algorithm.guard' must be true or false"),
    ({"algorithm": {"timestep_fraction": 0}}, "'algorithm.timestep_fraction' must be in (0, 1]"),
    ({"train": {"group_size": 1}}, "'train.group_size' must be >= 2"),
    ({"train": {"adam_betas": [0.9]}}, "'train.adam_betas' must be two numbers"),
    ({"algorithm": {"adv_std": "global"}}, "'algorithm.adv_std' must be one of 'group', 'batch'"),
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


# --------------------------------------------------------------------------- generated malformed values


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """Every typed leaf key of the schema with its type (free-form mappings left out)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is not dict and tp is not typing.Any:
            out.append((prefix + f.name, tp))
    return out


LEAVES = _leaves(ExperimentConfig)
_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_junk = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(_words, st.integers(), max_size=1))


def _wrong_value(tp: object) -> st.SearchStrategy:
    """Values that are not of type ``tp`` (or are NaN/inf where a finite number is needed)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: wrong for X and not None
        return _wrong_value(next(a for a in args if a is not type(None))).filter(lambda v: v is not None)
    if origin is typing.Literal:
        return st.one_of(_words.filter(lambda w: w not in args), st.integers(), _junk)
    if origin is list:
        return st.one_of(st.integers(), _words, st.lists(_wrong_value(args[0]), min_size=1, max_size=2))
    if tp is bool:
        return st.one_of(st.integers(), _words, st.floats(allow_nan=False), _junk)
    if tp is int:
        return st.one_of(
            _words,
            st.floats(allow_nan=False).filter(lambda x: x != int(x) if math.isfinite(x) else True),
            st.booleans(),
            _junk,
        )
    if tp is float:
        return st.one_of(_words, st.booleans(), st.sampled_from([math.nan, math.inf, -math.inf]), _junk)
    if tp is str:
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), _junk)
    raise AssertionError(tp)


@st.composite
def _bad_entry(draw: st.DrawFn) -> tuple[str, object]:
    key, tp = draw(st.sampled_from(LEAVES))
    return key, draw(_wrong_value(tp))


def test_every_typed_key_is_generated() -> None:
    keys = {k for k, _ in LEAVES}
    assert {"seed", "train.lr", "train.lora.rank", "sampler.window.size", "eval.samplers", "model.path"} <= keys
    assert len(LEAVES) > 50


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=_bad_entry())
def test_generated_malformed_config_files_are_one_sentence_and_exit_code_2(
    entry: tuple[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, value = entry
    data: dict = {}
    node = data
    *sections, last = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["train", str(path), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (key, value, err)
    assert len(err) == 1 and err[0].startswith(f"precise-rl train: error: config key '{key}"), (key, value, err)
