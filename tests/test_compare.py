"""``precise-rl compare``: the summary against a hand computation, and a small end-to-end run on the toy task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.rl.compare import print_summary, summarise, time_to_target
from precise_rl.rl.compare_report import markdown_table
from precise_rl.rl.logging import read_metrics

from . import toy_task

toy_task.register()


def _records(epochs: list[int], times: list[float], rewards: list[float], cost: float = 0.1) -> list[dict]:
    out = []
    for i, (ep, t, r) in enumerate(zip(epochs, times, rewards, strict=True)):
        out.append({"epoch": ep, "optimizer_steps": 2.0 * ep, "train_elapsed_s": t, "eval_ode_reward": r})
        # training records between evaluations carry no eval reward and must be ignored for the curve
        out.append(
            {"epoch": ep + 1, "train_elapsed_s": t + 0.5, "reward_mean": -100.0, "time_rollout_s": cost * (1 + i),
             "time_reward_s": 0.0, "time_train_s": 0.0}
        )  # fmt: skip
    return out


def _crossing(xs: list[float], ys: np.ndarray, target: float) -> float | None:
    """Where the polyline first reaches ``target`` after its first point, written out."""
    for i in range(1, len(xs)):
        if ys[i] >= target:
            if ys[i - 1] >= target:
                return xs[i]
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (target - ys[i - 1]) / (ys[i] - ys[i - 1])
    return None


def test_summary_matches_a_hand_computation() -> None:
    rng = np.random.default_rng()
    epochs = [0, 10, 20, 30]
    base = np.array([0.0, 0.4, 0.7, 0.9])
    runs: dict[str, list[list[dict]]] = {}
    raw: dict[str, np.ndarray] = {}
    times: dict[str, np.ndarray] = {}
    costs: list[float] = []
    for name, speed, gain in [("precise", 1.0, 1.2), ("flow_grpo", 2.0, 1.0), ("cps", 1.5, 0.8)]:
        rewards = np.stack([base * gain + rng.normal(0, 0.01, 4) * (np.arange(4) > 0) for _ in range(3)])
        clock = np.stack([np.array(epochs) * speed * (1 + 0.1 * k) for k in range(3)])
        raw[name], times[name] = rewards, clock
        runs[name] = [_records(epochs, list(clock[k]), list(rewards[k]), cost=speed) for k in range(3)]
        costs += [speed * (1 + i) for _ in range(3) for i in range(4)]
    summary = summarise(runs)

    finals = {n: raw[n][:, -1].mean() for n in raw}
    target = max(finals["flow_grpo"], finals["cps"])
    assert summary["target"] == pytest.approx(target)
    assert summary["best_prior"] == max(["flow_grpo", "cps"], key=lambda n: finals[n])
    assert summary["epoch_cost_s"] == pytest.approx(np.median(costs))  # pooled over every sampler's epochs
    for name, speed in [("precise", 1.0), ("flow_grpo", 2.0), ("cps", 1.5)]:
        c = summary["samplers"][name]
        assert c["epochs"] == epochs
        np.testing.assert_allclose(c["reward_mean"], raw[name].mean(axis=0))
        np.testing.assert_allclose(c["reward_std"], raw[name].std(axis=0))
        np.testing.assert_allclose(c["wallclock_s_mean"], times[name].mean(axis=0))
        np.testing.assert_allclose(c["optimizer_steps_mean"], 2.0 * np.array(epochs))
        assert c["epoch_cost_s"] == pytest.approx(speed * 2.5)  # the median of speed * (1, 2, 3, 4)
        assert c["final_reward_mean"] == pytest.approx(finals[name])
        expected = _crossing(epochs, raw[name].mean(axis=0), target)
        if expected is None:
            assert c["epochs_to_target"] is None and c["wallclock_to_target_s"] is None
        else:
            assert c["epochs_to_target"] == pytest.approx(expected)
            assert c["optimizer_steps_to_target"] == pytest.approx(2 * expected)
            assert c["wallclock_to_target_s"] == pytest.approx(expected * np.median(costs))
            assert c["measured_wallclock_to_target_s"] == pytest.approx(
                np.interp(expected, epochs, times[name].mean(axis=0))
            )
        per_seed = [_crossing(epochs, raw[name][k], target) for k in range(3)]
        assert c["epochs_to_target_per_seed"] == [pytest.approx(e) if e is not None else None for e in per_seed]
    p = summary["samplers"]["precise"]["epochs_to_target"]
    b = summary["samplers"][summary["best_prior"]]["epochs_to_target"]
    assert summary["precise_epoch_ratio_vs_best_prior"] == pytest.approx(p / b)
    assert summary["precise_time_ratio_vs_best_prior"] == pytest.approx(p / b)  # one pooled cost per epoch
    assert summary["precise_time_saving_pct_vs_best_prior"] == pytest.approx((1 - p / b) * 100)


def test_the_markdown_table_reads_each_runs_curve_final_and_epochs_to_target() -> None:
    rng = np.random.default_rng()
    epochs = [0, 20, 40, 60, 80, 100]
    protocols, raw = {}, {}
    for protocol in ("own", "ode"):
        runs = {}
        for name in ("precise", "flow_grpo", "cps"):
            raw[protocol, name] = np.cumsum(rng.uniform(0, 0.2, (3, len(epochs))), axis=1)
            runs[name] = [_records(epochs, [float(e) for e in epochs], list(r)) for r in raw[protocol, name]]
        protocols[protocol] = summarise(runs)
    lines = markdown_table({"protocols": protocols, "seeds": 3})
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[0] == "run" and head[1] == "`own` epoch 20 / 40 / 60" and head[4] == "`ode` epoch 20 / 40 / 60"
    assert head[3] == f"`own` epochs to {protocols['own']['target']:.4f}"
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")][1:] for r in lines[2:]}
    assert set(rows) == {"`precise`", "`flow_grpo`", "`cps`"}
    for k, protocol in enumerate(("own", "ode")):
        finals = {n: raw[protocol, n][:, -1].mean() for n in ("precise", "flow_grpo", "cps")}
        target = max(finals["flow_grpo"], finals["cps"])
        for name in finals:
            curve = raw[protocol, name].mean(axis=0)
            marks, final, to_target = rows[f"`{name}`"][3 * k : 3 * k + 3]
            assert marks == " / ".join(f"{curve[i]:.3f}" for i in (1, 2, 3))
            text = f"{finals[name]:.4f} ± {raw[protocol, name][:, -1].std():.4f}"
            assert final == (f"**{text}**" if finals[name] == max(finals.values()) else text)
            crossing = _crossing(epochs, curve, target)
            assert to_target == ("not reached" if crossing is None else format(round(crossing, 1), "g"))


def test_time_to_target_interpolates_between_evaluations() -> None:
    assert time_to_target([0, 10, 20], [0.0, 0.5, 1.0], 0.75) == pytest.approx(15.0)
    assert time_to_target([0, 10, 20], [0.0, 0.5, 1.0], 1.5) is None
    assert time_to_target([0, 10, 20], [0.9, 0.95, 1.0], 0.5) == 10  # already there untrained: the first eval


def test_headroom_is_the_open_share_of_the_way_to_the_reward_ceiling() -> None:
    runs = {
        "precise": [[*_records([0, 5], [0.0, 1.0], [0.2, 0.5]), {"epoch": 0, "eval_reward_ceiling": 1.2}]],
        "cps": [[*_records([0, 5], [0.0, 1.0], [0.2, 0.7]), {"epoch": 0, "eval_reward_ceiling": 1.2}]],
    }
    summary = summarise(runs)
    assert summary["reward_ceiling"] == pytest.approx(1.2)
    assert summary["headroom"] == pytest.approx((1.2 - 0.7) / (1.2 - 0.2))


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
    result = json.loads((out / "compare.json").read_text())
    assert set(result["protocols"]) == {"own", "ode"}
    summary = result["protocols"]["ode"]
    assert set(summary["samplers"]) == {"precise", "cps"}
    assert set(result["protocols"]["own"]["samplers"]) == {"precise", "cps"}
    assert result["protocols"]["own"]["metric"] == "eval_own_reward"
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
    assert (out / "compare.md").read_text() == "\n".join(markdown_table(result)) + "\n"
    printed = capsys.readouterr().out
    assert "target (best final prior reward, cps)" in printed
    assert "== protocol own" in printed and "== protocol ode" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds"),
        (["--samplers", "precise,euler"], "unknown sampler 'euler'"),
        (["--samplers", "precise,flowgrpo"], "unknown sampler 'flowgrpo'"),
        (["--samplers", ","], "names no sampler"),
    ],
)
def test_compare_rejects_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["compare", "--output", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_one_seed_prints_no_spread(capsys: pytest.CaptureFixture[str]) -> None:
    runs = {"precise": [_records([0, 5], [0.0, 1.0], [0.0, 0.9])], "cps": [_records([0, 5], [0.0, 1.0], [0.0, 0.8])]}
    print_summary(summarise(runs), "ode", seeds=1)
    printed = capsys.readouterr().out
    assert "±" not in printed and "0.9000" in printed


def test_compare_keeps_earlier_runs_unless_told_and_holds_the_output_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from precise_rl.rl.rundir import lock_run_dir

    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(toy_task.TOY_CONFIG)))
    out = tmp_path / "cmp"
    argv = ["compare", str(cfg_path), "train.epochs=1", "eval.every=1", "--seeds", "1", "--samplers", "precise,cps"]
    assert main([*argv, "--output", str(out)]) == 0
    first = (out / "runs" / "precise-seed3" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*argv, "--output", str(out)]) == 2  # the finished runs are kept, nothing is trained
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" not in err
    assert (out / "runs" / "precise-seed3" / "metrics.jsonl").read_text() == first
    with lock_run_dir(out, "another compare"):
        assert main([*argv, "--output", str(out), "--overwrite"]) == 2
    assert "another compare" in capsys.readouterr().err
    assert main([*argv, "--output", str(out), "--overwrite"]) == 0


def test_compare_across_algorithms_labels_runs_and_reads_reward_against_model_evaluations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(toy_task.TOY_CONFIG)))
    out = tmp_path / "cmp"
    argv = ["compare", str(cfg_path), "train.epochs=2", "eval.every=1", "--seeds", "1", "--samplers", "ode,precise,cps"]
    assert main([*argv, "--algorithms", "grpo,nft", "--output", str(out)]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["algorithms"] == ["grpo", "nft"]
    assert result["left_out"] and "grpo/ode" in result["left_out"][0]  # GRPO cannot train on the ODE
    summary = result["protocols"]["ode"]
    assert set(summary["samplers"]) == {"grpo/precise", "grpo/cps", "nft/ode", "nft/precise", "nft/cps"}
    assert summary["best_prior"] == "grpo/cps"  # the target is GRPO's prior sampler's
    for label, c in summary["samplers"].items():
        records = read_metrics(out / "runs" / f"{label.replace('/', '-')}-seed3" / "metrics.jsonl")
        evals = [r.get("model_evals", 0.0) for r in records if "eval_ode_reward" in r]  # none before training
        assert c["model_evals_mean"] == pytest.approx(evals) and evals[0] == 0 and evals[-1] > evals[1] > 0
    assert summary["algorithms"]["ranking"]["nft"] and set(summary["algorithms"]["ranking"]) == {"grpo", "nft"}
    printed = capsys.readouterr().out
    assert "compare: left out grpo/ode" in printed and "nft/precise" in printed and "model evals to target" in printed
    # an unknown algorithm is one sentence
    assert main([*argv, "--algorithms", "grpo,ppo", "--output", str(tmp_path / "x")]) == 2
    assert "unknown algorithm 'ppo'" in capsys.readouterr().err


# --------------------------------------------------------------------------- short comparisons, honest savings


@pytest.mark.parametrize(
    ("epochs", "every", "expected"),
    [
        (100, 10, 5),  # the default: one evaluation every 5% of the run
        (400, 10, 10),  # a config asking for more evaluations than 20 keeps them
        (10, 10, 5),  # short: no more often than every MIN_EPOCHS_PER_EVAL epochs (was every epoch)
        (30, 10, 5),
        (3, 10, 3),  # shorter than that: once, at the end
        (10, 1, 1),  # eval.every=1 asked for is kept
        (10, 0, 5),
    ],
)
def test_evaluations_scale_with_the_runs_length(epochs: int, every: int, expected: int) -> None:
    from precise_rl.rl.compare import eval_every_for

    assert eval_every_for(epochs, every) == expected


def _two_sampler_runs(seeds: int, precise_finals: list[float]) -> dict[str, list[list[dict]]]:
    """precise and cps over ``seeds`` seeds; cps ends at 1.0 every seed, precise at ``precise_finals``, both rising."""
    runs: dict[str, list[list[dict]]] = {"precise": [], "cps": []}
    for k in range(seeds):
        runs["cps"].append(_records([0, 5, 10], [0.0, 1.0, 2.0], [0.0, 0.5, 1.0]))
        runs["precise"].append(_records([0, 5, 10], [0.0, 1.0, 2.0], [0.0, 0.8, precise_finals[k]]))
    return runs


def test_one_seed_states_no_time_saving_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    summary = summarise(_two_sampler_runs(1, [1.2]))
    assert summary["precise_epoch_ratio_vs_best_prior"] is not None  # precise reaches it sooner on this seed
    assert "one seed" in summary["saving_withheld"]
    print_summary(summary, "ode", seeds=1)
    printed = capsys.readouterr().out
    assert "% saved" not in printed
    assert "no time saving is stated: one seed" in printed


def test_a_saving_needs_seed_pairs_that_reach_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    # precise's seed mean (1.2, 0.95, 0.95 -> 1.033) reaches cps's 1.0, but only its first seed does
    summary = summarise(_two_sampler_runs(3, [1.2, 0.95, 0.95]))
    assert summary["precise_epoch_ratio_vs_best_prior"] is not None
    assert summary["saving_withheld"].startswith("only 1 of 3 seed pairs")
    print_summary(summary, "ode", seeds=3)
    printed = capsys.readouterr().out
    assert "% saved" not in printed and "no time saving is stated: only 1 of 3 seed pairs" in printed
    supported = summarise(_two_sampler_runs(3, [1.2, 1.1, 1.05]))
    assert supported["saving_withheld"] is None
    print_summary(supported, "ode", seeds=3)
    assert "% saved" in capsys.readouterr().out


def test_the_ema_note_counts_evaluations_that_saw_no_ema_update() -> None:
    from precise_rl.rl.compare import ema_note

    # 2 optimizer steps per epoch, evaluations every epoch, EMA every 8 steps: an update every 4 epochs
    records = [{"epoch": e, "optimizer_steps": 2.0 * e, "train_elapsed_s": float(e), "eval_ode_reward": 0.1 * e}
               for e in range(9)]  # fmt: skip
    note = ema_note({"precise": [records]}, every=8, mode="interval")
    # updates after steps 8 and 16 (epochs 4 and 8): 6 of the 8 later evaluations follow no update
    assert note is not None and "6 of 8 evaluations" in note and "every 4 epochs" in note
    on_updates = [r for r in records if r["epoch"] % 4 == 0]
    assert ema_note({"precise": [on_updates]}, every=8, mode="interval") is None


def test_compare_plot_carries_the_note(tmp_path: Path) -> None:
    from precise_rl.rl.compare import plot_comparison

    summary = summarise(_two_sampler_runs(2, [1.2, 1.1]))
    plot_comparison({"ode": summary}, tmp_path / "plain.png")
    plot_comparison({"ode": summary}, tmp_path / "noted.png", note="evaluations score the EMA weights")
    assert (tmp_path / "noted.png").read_bytes() != (tmp_path / "plain.png").read_bytes()
