"""``precise-rl compare``: the summary against a hand computation, and a small end-to-end run on the toy task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.rl.compare import summarise

from . import toy_task

toy_task.register()


def _records(epochs: list[int], times: list[float], rewards: list[float]) -> list[dict]:
    out = []
    for ep, t, r in zip(epochs, times, rewards, strict=True):
        out.append({"epoch": ep, "train_elapsed_s": t, "eval_ode_reward": r})
        # training records between evaluations carry no eval reward and must be ignored
        out.append({"epoch": ep + 1, "train_elapsed_s": t + 0.5, "reward_mean": -100.0})
    return out


def test_summary_matches_a_hand_computation() -> None:
    rng = np.random.default_rng()
    epochs = [0, 10, 20, 30]
    base = np.array([0.0, 0.4, 0.7, 0.9])
    runs: dict[str, list[list[dict]]] = {}
    raw: dict[str, np.ndarray] = {}
    times: dict[str, np.ndarray] = {}
    for name, speed, gain in [("precise", 1.0, 1.2), ("flow_grpo", 2.0, 1.0), ("cps", 1.5, 0.8)]:
        rewards = np.stack([base * gain + rng.normal(0, 0.01, 4) * (np.arange(4) > 0) for _ in range(3)])
        clock = np.stack([np.array(epochs) * speed * (1 + 0.1 * k) for k in range(3)])
        raw[name], times[name] = rewards, clock
        runs[name] = [_records(epochs, list(clock[k]), list(rewards[k])) for k in range(3)]
    summary = summarise(runs)

    finals = {n: raw[n][:, -1].mean() for n in raw}
    target = max(finals["flow_grpo"], finals["cps"])
    assert summary["target"] == pytest.approx(target)
    assert summary["best_prior"] == max(["flow_grpo", "cps"], key=lambda n: finals[n])
    for name in raw:
        c = summary["samplers"][name]
        assert c["epochs"] == epochs
        np.testing.assert_allclose(c["reward_mean"], raw[name].mean(axis=0))
        np.testing.assert_allclose(c["reward_std"], raw[name].std(axis=0))
        np.testing.assert_allclose(c["wallclock_s_mean"], times[name].mean(axis=0))
        assert c["final_reward_mean"] == pytest.approx(finals[name])
        mean_curve = raw[name].mean(axis=0)
        hits = [i for i in range(1, 4) if mean_curve[i] >= target]
        expected_epoch = epochs[hits[0]] if hits else None
        assert c["epochs_to_target"] == expected_epoch
        assert c["wallclock_to_target_s"] == (pytest.approx(times[name].mean(axis=0)[hits[0]]) if hits else None)
    p = summary["samplers"]["precise"]["wallclock_to_target_s"]
    b = summary["samplers"][summary["best_prior"]]["wallclock_to_target_s"]
    assert summary["precise_time_ratio_vs_best_prior"] == pytest.approx(p / b)
    assert summary["precise_time_saving_pct_vs_best_prior"] == pytest.approx((1 - p / b) * 100)


def test_precise_that_never_reaches_the_target_has_no_ratio() -> None:
    runs = {
        "precise": [_records([0, 5], [0.0, 1.0], [0.0, 0.5])],
        "dance_grpo": [_records([0, 5], [0.0, 1.0], [0.0, 0.8])],
    }
    summary = summarise(runs)
    assert summary["target"] == pytest.approx(0.8)
    assert summary["samplers"]["precise"]["epochs_to_target"] is None
    assert summary["precise_time_ratio_vs_best_prior"] is None


def test_summary_refuses_runs_without_evaluations() -> None:
    with pytest.raises(UserError, match="eval.every"):
        summarise({"precise": [[{"epoch": 1, "train_elapsed_s": 1.0, "reward_mean": 0.0}]]})


def test_compare_command_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dict(toy_task.TOY_CONFIG)
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    code = main(
        ["compare", str(cfg_path), "train.epochs=2", "eval.every=1", "--seeds", "2", "--samplers", "precise,cps",
         "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["samplers"]) == {"precise", "cps"}
    assert summary["best_prior"] == "cps"
    for name in ("precise", "cps"):
        c = summary["samplers"][name]
        assert c["epochs"] == [0, 1, 2]
        assert len(c["final_reward_per_seed"]) == 2
        for seed in (3, 4):
            assert (out / "runs" / f"{name}-seed{seed}" / "metrics.jsonl").is_file()
    # both samplers start from the same model and evaluation noise
    assert summary["samplers"]["precise"]["reward_mean"][0] == pytest.approx(
        summary["samplers"]["cps"]["reward_mean"][0]
    )
    assert (out / "compare.png").stat().st_size > 1000
    assert "target (best final prior reward, cps)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--seeds", "0"], "--seeds"), (["--samplers", "precise,euler"], "--samplers")],
)
def test_compare_rejects_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["compare", "--output", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
