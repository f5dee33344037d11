"""A sampler, a model and a reward from outside the package, each one file plus one registry line.

The three files in ``tests/extensions/`` register themselves on import (``register_sampler``,
``@register_policy``, ``@register_reward``); from then on the config, the trainer, evaluation and
``precise-rl sample`` take them by name like the built-in ones. The registries are restored after.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from precise_rl.cli import main
from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies import registry as policy_registry
from precise_rl.rewards import base as reward_base
from precise_rl.sde import SAMPLERS, kernel, shifted_sigmas, trainable_samplers
from precise_rl.sde import samplers as sampler_table

EXTENSIONS = ["linear_cps_sampler", "two_pixel_model", "brightness_reward"]


@pytest.fixture
def extensions() -> Iterator[None]:
    tables = [
        sampler_table.SAMPLER_TABLE,
        policy_registry.ADAPTERS,
        policy_registry.PIPELINE_ADAPTERS,
        reward_base._REGISTRY,
    ]
    saved = [dict(t) for t in tables]
    for name in EXTENSIONS:
        module = f"tests.extensions.{name}"
        if module in sys.modules:
            importlib.reload(sys.modules[module])  # registers again after an earlier test's restore
        else:
            importlib.import_module(module)
    yield
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)


def test_the_three_register_by_name_and_are_gone_after(extensions: None) -> None:
    from precise_rl.tasks.registry import model_names

    assert "linear_cps" in SAMPLERS and "linear_cps" in trainable_samplers()
    assert "two_pixel" in model_names()
    assert "ext_brightness" in reward_base.available_rewards()


def test_the_registries_hold_no_extension_outside_the_fixture() -> None:
    assert "linear_cps" not in SAMPLERS and "two_pixel" not in policy_registry.ADAPTERS


def test_the_new_sampler_is_cps_reparameterised_and_its_eta_bound_is_read_from_its_entry(extensions: None) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(5):
        eta = float(torch.rand((), generator=gen)) * 0.98
        sig = shifted_sigmas(
            int(torch.randint(3, 30, (), generator=gen)), 1.0 + 3 * float(torch.rand((), generator=gen))
        )
        mine, cps = kernel("linear_cps", sig, eta), kernel("cps", sig, 2 * math.asin(eta) / math.pi)
        for a, b in ((mine.a, cps.a), (mine.b, cps.b), (mine.std, cps.std)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert kernel("linear_cps", sig).eta == 0.6  # the entry's default
    with pytest.raises(ValueError, match=r"linear_cps needs eta in \[0, 1\] \(std = eta \* s\)"):
        kernel("linear_cps", sig, 1.2)
    with pytest.raises(UserError, match=r"'sampler.eta' must be in \[0, 1\] for linear_cps"):
        config_from_dict({"sampler": {"name": "linear_cps", "eta": 1.5}})
    with pytest.raises(ValueError, match="applies to 'precise' only"):
        kernel("linear_cps", sig, 0.5, "constant")


def test_training_evaluation_and_sampling_take_all_three_by_name(extensions: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "model.name=two_pixel",
        "sampler.name=linear_cps",
        "sampler.num_steps=4",
        "reward.weights.ext_brightness=1.0",
        "train.epochs=3",
        "train.groups_per_epoch=2",
        "train.group_size=4",
        "train.batch_size=4",
        "train.lr=1e-2",
        "train.ema.every=1",
        "eval.every=3",
        "eval.num_steps=4",
        "eval.max_prompts=4",
        "eval.samples_per_prompt=2",
        "eval.samplers=[ode,own,linear_cps]",
        "logging.tensorboard=false",
        "logging.progress=false",
    ]
    assert main(["train", *args, "--output", str(run)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert "reward/ext_brightness" in last and {"eval_own_reward", "eval_linear_cps_reward"} <= set(last)
    # own: the training sampler at its training eta, here its default: the same numbers as linear_cps by name
    assert last["eval_own_reward"] == last["eval_linear_cps_reward"]
    assert last["eval_own_reward"] != first["eval_own_reward"]  # the weights moved
    out = tmp_path / "samples"
    code = main(
        [
            "sample",
            "--model",
            "two_pixel",
            "--sampler",
            "linear_cps",
            "--prompt",
            "a cat",
            "--num-images",
            "2",
            "--steps",
            "4",
            "--output",
            str(out),
            "--grid",
            "--grid-samplers",
            "ode,linear_cps",
        ]
    )
    assert code == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["samplers"] == {"linear_cps": {"eta": 0.6}, "ode": {"eta": 0.0}}
    assert len(record["prompts"][0]["files"]) == 4 and Path(record["prompts"][0]["grid"]).is_file()
