"""What a run records and applies: its CPU threads (``train.threads``) and the defaults it leaves open.

A run directory alone must say how the run was made: ``config.yaml`` holds the rewards, eta and thread
count that ran, and ``--resume``, ``precise-rl eval`` and a resumed study read such a file back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from precise_rl.cli import main
from precise_rl.config import config_from_dict, config_to_dict, same_run_config, with_run_defaults
from precise_rl.errors import UserError
from precise_rl.rl.threads import resolve_threads, using_threads
from precise_rl.rl.trainer import Trainer
from precise_rl.sde import SAMPLER_TABLE
from precise_rl.tasks.digits import DEFAULT_REWARD_WEIGHTS, DigitsPolicy

from . import toy_task

toy_task.register()

#: the built-in recipe cut to one small epoch, no evaluation: seconds on a CPU
SHORT_DIGITS = {
    "train": {"epochs": 1, "groups_per_epoch": 2, "group_size": 4, "batch_size": 8},
    "eval": {"every": 0},
    "checkpoint": {"every": 0, "keep": 1},
    "logging": {"tensorboard": False, "progress": False},
}


def _toy_yaml(tmp_path: Path, **changes: dict) -> Path:
    data = json.loads(json.dumps(toy_task.TOY_CONFIG))
    for section, values in changes.items():
        data[section].update(values)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- threads


def test_auto_threads_is_one_for_the_builtin_model_on_a_cpu_and_torchs_default_elsewhere() -> None:
    digits = DigitsPolicy.from_pretrained()
    toy = toy_task.ToyPolicy()
    assert resolve_threads("auto", digits, "cpu") == 1
    assert resolve_threads("auto", digits, torch.device("cuda")) == torch.get_num_threads()
    assert resolve_threads("auto", toy, "cpu") == torch.get_num_threads()  # a model that says nothing
    assert resolve_threads(3, digits, "cpu") == 3  # a number given is a number used


def test_using_threads_gives_the_callers_count_back() -> None:
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with using_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), using_threads(other):
        raise RuntimeError
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", [0, -2, "many", 1.5])
def test_a_bad_thread_count_is_refused_naming_the_key(value: object) -> None:
    with pytest.raises(UserError, match="train.threads"):
        config_from_dict({"train": {"threads": value}})


def test_a_digits_run_trains_on_one_thread_records_it_and_gives_the_count_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = Trainer.collect

    def collect(self: Trainer, epoch: int):  # the thread count while the run samples
        seen.append(torch.get_num_threads())
        return real(self, epoch)

    monkeypatch.setattr(Trainer, "collect", collect)
    before = torch.get_num_threads()
    trainer = Trainer(config_from_dict(json.loads(json.dumps(SHORT_DIGITS))), tmp_path / "run")
    trainer.run()
    assert seen == [1]
    assert torch.get_num_threads() == before
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["threads"] == 1


def test_a_thread_count_given_is_applied_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = Trainer.collect
    monkeypatch.setattr(Trainer, "collect", lambda self, e: seen.append(torch.get_num_threads()) or real(self, e))
    out = tmp_path / "run"
    assert main(["train", str(_toy_yaml(tmp_path)), "-o", str(out), "train.epochs=1", "train.threads=2"]) == 0
    assert seen == [2]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["threads"] == 2


def test_eval_uses_the_threads_the_run_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from precise_rl.rl import evaluate as evaluate_module

    seen: list[int] = []
    real = evaluate_module.evaluate

    def evaluate(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)  # precise-rl eval imports it when it runs
    before = torch.get_num_threads()
    run, cfg = tmp_path / "run", tmp_path / "digits.yaml"
    cfg.write_text(yaml.safe_dump(SHORT_DIGITS))
    assert main(["train", str(cfg), "-o", str(run)]) == 0
    assert main(["eval", str(run), "--samplers", "ode", "--steps", "2", "--max-prompts", "2"]) == 0
    assert seen == [1] and torch.get_num_threads() == before


def test_sample_uses_the_threads_of_the_builtin_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from precise_rl.cli import sample as sample_cli

    seen: list[int] = []
    real = sample_cli.generate

    def generate(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_cli, "generate", generate)
    before = torch.get_num_threads()
    argv = ["sample", "--model", "digits", "--prompt", "a 3", "--steps", "2", "--num-images", "1"]
    assert main([*argv, "-o", str(tmp_path / "s")]) == 0
    assert seen == [1] and torch.get_num_threads() == before


# --------------------------------------------------------------------------- the defaults a run fills in


def test_config_yaml_records_the_rewards_and_eta_that_ran(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = config_from_dict(json.loads(json.dumps(SHORT_DIGITS)))
    assert cfg.reward.weights == {} and cfg.sampler.eta is None  # the defaults left open
    Trainer(cfg, out).run()
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["reward"]["weights"] == dict(DEFAULT_REWARD_WEIGHTS)
    assert recorded["sampler"]["name"] == "precise"
    assert recorded["sampler"]["eta"] == SAMPLER_TABLE["precise"].default_eta == 1.5
    # the checkpoint holds the same config, and running that file again gives the same config
    state = json.loads(next((out / "checkpoints").glob("epoch_*/state.json")).read_text())
    assert state["config"] == recorded
    again = Trainer(config_from_dict(recorded), tmp_path / "again", read_only=True)
    assert config_to_dict(again.cfg) == recorded


def test_a_run_resumed_with_the_config_that_left_the_defaults_open_continues(tmp_path: Path) -> None:
    """``--resume`` compares the checkpoint's sampler with this config's: eta null and the recorded eta agree."""
    data = json.loads(json.dumps(toy_task.TOY_CONFIG))
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))  # sampler.eta left open
    out = tmp_path / "run"
    assert main(["train", str(path), "-o", str(out), "train.epochs=2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["sampler"]["eta"] == 1.5
    assert main(["train", str(path), "--resume", str(out), "train.epochs=4"]) == 0
    assert main(["train", "--resume", str(out), "train.epochs=6"]) == 0  # the recorded config alone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 6
    assert main(["eval", str(out), "--samplers", "own", "--steps", "2"]) == 0
    assert json.loads((out / "eval.json").read_text())["results"][0]["sampler"] == "precise"


def test_a_checkpoint_without_the_recorded_eta_is_the_same_sampler() -> None:
    """What ``load_checkpoint`` compares: a config written before eta was recorded ran the reference eta."""
    old = config_from_dict({"sampler": {"name": "cps", "eta": None}})
    new = with_run_defaults(config_from_dict({"sampler": {"name": "cps"}}))
    assert new.sampler.eta == SAMPLER_TABLE["cps"].default_eta
    assert with_run_defaults(old).sampler == new.sampler
    assert with_run_defaults(config_from_dict({"sampler": {"name": "cps", "eta": 0.3}})).sampler.eta == 0.3


def test_a_recorded_config_is_a_run_of_the_config_that_left_defaults_open() -> None:
    cfg = config_from_dict({"sampler": {"name": "cps"}})
    recorded = config_to_dict(with_run_defaults(cfg, reward_weights={"ink_style": 1.0}, threads=1))
    assert same_run_config(recorded, cfg)
    plain = config_to_dict(cfg)
    assert same_run_config(plain, cfg)  # a config.yaml written before runs filled their defaults in
    legacy = json.loads(json.dumps(plain))
    del legacy["train"]["threads"]  # ... and before the key existed
    assert same_run_config(legacy, cfg)
    other_eta = json.loads(json.dumps(recorded))
    other_eta["sampler"]["eta"] = 0.2  # not cps's reference eta: another run
    assert not same_run_config(other_eta, cfg)
    other_seed = json.loads(json.dumps(recorded))
    other_seed["seed"] = 7
    assert not same_run_config(other_seed, cfg)
    given = config_from_dict({"reward": {"weights": {"ink_style": 2.0}}})
    assert not same_run_config(recorded, given)  # weights given must be the weights recorded
