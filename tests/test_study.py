"""``precise-rl study``: files, merged grids, per-cell summaries, exact fidelity numbers, resume, bad flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from precise_rl.cli import main
from precise_rl.cli import study as study_cli
from precise_rl.rl import study
from precise_rl.rl.compare import PROTOCOLS, summarise
from precise_rl.rl.logging import read_metrics
from precise_rl.sde import SAMPLERS as SAMPLERS_ALL
from precise_rl.sde import kernel, shifted_sigmas, uniform_sigmas

from . import toy_task

toy_task.register()

SAMPLERS = ["precise", "cps"]


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One tiny study on the toy task: steps 2 and 3, grids uniform, shift3, model (= uniform), 2 seeds."""
    tmp = tmp_path_factory.mktemp("study")
    cfg_path = tmp / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    out = tmp / "out"
    args = [
        "study", str(cfg_path), "train.epochs=2", "eval.every=1", "--seeds", "2", "--steps", "2,3",
        "--grids", "uniform,shift3,model", "--samplers", ",".join(SAMPLERS), "--workers", "1", "-o", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    return out, cfg_path, " ".join(args)


def _json(out: Path) -> dict:
    return json.loads((out / "study.json").read_text())


def test_study_writes_its_files_and_merges_identical_grids(toy_study: tuple[Path, Path, str]) -> None:
    out, _, _ = toy_study
    for name in ("study.json", "study.md"):
        assert (out / name).stat().st_size > 100
    for name in ("study_heatmap.png", "study_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 2000
    assert not (out / "study_etas.png").exists()  # no eta sweep, no sweep figure
    result = _json(out)
    # the toy policy keeps the uniform default grid: model cells are the uniform ones, run once
    assert [(c["steps"], c["grids"]) for c in result["cells"]] == [
        (2, ["uniform", "model"]),
        (2, ["shift3"]),
        (3, ["uniform", "model"]),
        (3, ["shift3"]),
    ]
    assert result["merged"] == [
        {"steps": 2, "grid": "model", "same_as": "uniform"},
        {"steps": 3, "grid": "model", "same_as": "uniform"},
    ]
    assert result["model_grid_note"]
    assert result["timings"]["jobs"] == 4 * 2 * 2 and result["timings"]["jobs_run"] == 16
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["N2-shift3", "N2-uniform", "N3-shift3", "N3-uniform"]
    cell = result["cells"][1]
    np.testing.assert_allclose(cell["sigmas"], shifted_sigmas(2, 3.0).numpy())
    cfg = yaml.safe_load((out / "runs" / "N2-shift3" / "precise-seed3" / "config.yaml").read_text())
    assert cfg["sampler"]["grid"] == "shifted" and cfg["sampler"]["shift"] == 3.0
    assert cfg["sampler"]["eta"] == 1.5  # each sampler at its reference eta, recorded as the number that ran
    assert cfg["sampler"]["num_steps"] == 2 and cfg["eval"]["num_steps"] == 2
    assert cfg["eval"]["samplers"] == ["ode", "own"] and cfg["logging"]["tensorboard"] is False
    md = (out / "study.md").read_text()
    assert md.count("| uniform = model | 2 | o") == 2 and "| shift3 | 3 | ode |" in md  # a row per protocol
    # and a row per sampler of the table in the fidelity table (those not trained at their reference eta)
    assert md.count("| uniform = model | 2 | `") == len(SAMPLERS_ALL)


def test_cell_summaries_equal_compare_summarise(toy_study: tuple[Path, Path, str]) -> None:
    out, _, _ = toy_study
    for cell in _json(out)["cells"]:
        runs = {
            s: [read_metrics(out / "runs" / cell["name"] / f"{s}-seed{seed}" / "metrics.jsonl") for seed in (3, 4)]
            for s in SAMPLERS
        }
        for protocol, key in PROTOCOLS.items():
            expected = json.loads(json.dumps(summarise(runs, key)))
            got = dict(cell["protocols"][protocol])
            assert got.pop("saturated") is None  # the toy reward states no ceiling: no headroom
            assert got == expected


def _propagate(sampler: str, sigmas: np.ndarray, c: float) -> float:
    """Output std / c on N(0.5, c^2) data: x_s = a x + b v + std z with the exact v = alpha(t) x + beta(t)."""
    kern = kernel(sampler, sigmas)
    a, b, sd = (np.asarray(getattr(kern, k), dtype=np.float64) for k in ("a", "b", "std"))
    var = 1.0
    for i, t in enumerate(sigmas[:-1]):
        alpha = (t - (1 - t) * c**2) / ((1 - t) ** 2 * c**2 + t**2)
        var = (a[i] + b[i] * alpha) ** 2 * var + sd[i] ** 2
    return math.sqrt(var) / c


def test_fidelity_numbers_equal_an_independent_propagation(toy_study: tuple[Path, Path, str]) -> None:
    out, _, _ = toy_study
    for cell in _json(out)["cells"]:
        sigmas = np.array(cell["sigmas"], dtype=np.float64)
        assert set(cell["fidelity_std_ratio"]) == set(SAMPLERS_ALL)  # the runs' and the table's others
        for sampler, got in cell["fidelity_std_ratio"].items():
            assert got == pytest.approx(_propagate(sampler, sigmas, 0.02), rel=1e-9)
    # the lab's README figure: shift-3 grid, NFE 10, sharp data
    ratios = study.fidelity_std_ratios(["flow_grpo", "precise"], shifted_sigmas(10, 3.0))
    assert ratios["flow_grpo"] == pytest.approx(11.4, abs=0.05) and ratios["precise"] == pytest.approx(0.060, abs=5e-4)
    assert study.fidelity_std_ratios(["cps"], uniform_sigmas(6))["cps"] == pytest.approx(
        _propagate("cps", uniform_sigmas(6).numpy(), 0.02), rel=1e-9
    )


def test_a_resumed_study_runs_no_finished_job(toy_study: tuple[Path, Path, str], monkeypatch) -> None:
    out, cfg_path, _ = toy_study
    before = _json(out)
    finished = out / "runs" / "N3-shift3" / "cps-seed4"
    (finished / "summary.json").unlink()  # as if killed before the end: this one job runs again
    calls: list[str] = []
    real = study._run_job
    monkeypatch.setattr(study, "_run_job", lambda job: (calls.append(job["key"]), real(job))[1])
    args = [
        "study", str(cfg_path), "train.epochs=2", "eval.every=1", "--seeds", "2", "--steps", "2,3",
        "--samplers", ",".join(SAMPLERS), "--workers", "1", "-o", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    assert calls == ["N3-shift3/cps-seed4"]
    after = _json(out)
    assert after["timings"]["jobs_resumed"] == 15 and after["timings"]["jobs_run"] == 1
    assert len(after["timings"]["invocations"]) == 2 and len(after["timings"]["job_s"]) == 16
    # the rerun job is deterministic: every reward curve and target is as before (the clocks are not)
    for c0, c1 in zip(before["cells"], after["cells"], strict=True):
        for protocol in PROTOCOLS:
            s0, s1 = c0["protocols"][protocol], c1["protocols"][protocol]
            assert s1["target"] == pytest.approx(s0["target"], rel=1e-6)
            for name in SAMPLERS:
                np.testing.assert_allclose(
                    s1["samplers"][name]["reward_per_seed"], s0["samplers"][name]["reward_per_seed"], rtol=1e-6
                )
    # another config in the same output is refused, not mixed in
    assert main([*args, "train.lr=0.5"]) == 2
    # and a study that another process is writing is refused before any job runs
    from precise_rl.rl.rundir import lock_run_dir

    (finished / "summary.json").unlink()
    calls.clear()
    with lock_run_dir(out, "another study"):
        assert main(args) == 2
    assert calls == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps takes comma-separated positive integers, got '0'"),
        (["--steps", "6,x"], "--steps takes comma-separated positive integers, got 'x'"),
        (["--grids", "bogus"], "--grids: unknown grid 'bogus'"),
        (["--grids", "shift-1"], "--grids: unknown grid 'shift-1'"),
        (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
        (["--workers", "0"], "--workers must be a positive integer, got 0"),
        (["--samplers", "euler"], "unknown sampler 'euler'"),
    ],
)
def test_bad_flags_are_one_sentence_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["study", "-o", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_grid_and_step_parsing() -> None:
    assert study_cli.parse_grids("uniform,shift3,shift2.5,model,shift3.0") == [
        ("uniform", None),
        ("shift3", 3.0),
        ("shift2.5", 2.5),
        ("model", None),
    ]
    assert study_cli.parse_steps("6, 10,6,20") == [6, 10, 20]


@pytest.mark.slow
def test_digits_study_is_the_same_on_two_workers_and_one(tmp_path: Path) -> None:
    common = [
        "train.epochs=2", "eval.every=1", "eval.max_prompts=4", "eval.samples_per_prompt=2",
        "train.groups_per_epoch=2", "--seeds", "1", "--steps", "3", "--grids", "uniform,shift3",
        "--samplers", "precise,flow_grpo",
    ]  # fmt: skip
    finals = []
    for workers in ("2", "1"):
        out = tmp_path / f"w{workers}"
        assert main(["study", *common, "--workers", workers, "-o", str(out)]) == 0
        result = _json(out)
        assert result["timings"]["jobs_run"] == 4
        finals.append(
            [
                c["protocols"][p]["samplers"][s]["final_reward_per_seed"]
                for c in result["cells"]
                for p in PROTOCOLS
                for s in ("precise", "flow_grpo")
            ]
        )
    np.testing.assert_allclose(finals[0], finals[1], rtol=1e-5, atol=1e-6)


def test_a_study_across_algorithms_ranks_each_algorithms_samplers_and_plots_them(tmp_path: Path) -> None:
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    out = tmp_path / "out"
    args = [
        "study", str(cfg_path), "train.epochs=2", "eval.every=1", "--seeds", "1", "--steps", "3", "--grids", "uniform",
        "--samplers", "ode,precise,cps", "--algorithms", "grpo,nft", "--workers", "1", "-o", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    result = _json(out)
    assert result["algorithms"] == ["grpo", "nft"] and result["samplers"] == [
        "grpo/precise", "grpo/cps", "nft/ode", "nft/precise", "nft/cps"
    ]  # fmt: skip
    (cell,) = result["cells"]
    for protocol, key in PROTOCOLS.items():
        summary = cell["protocols"][protocol]
        ranking = summary["algorithms"]["ranking"]
        finals = {s: c["final_reward_mean"] for s, c in summary["samplers"].items()}
        for algo, order in ranking.items():  # each algorithm's samplers by final reward, best first
            values = [finals[f"{algo}/{s}"] for s in order]
            assert values == sorted(values, reverse=True)
        runs = {
            s: [read_metrics(out / "runs" / cell["name"] / f"{s.replace('/', '-')}-seed3" / "metrics.jsonl")]
            for s in result["samplers"]
        }
        assert summary["target"] == summarise(runs, key)["target"]
    # the fidelity number is the sampler's, whatever the algorithm
    assert cell["fidelity_std_ratio"]["nft/precise"] == cell["fidelity_std_ratio"]["grpo/precise"]
    text = (out / "study.md").read_text()
    assert "`nft`: samplers by final reward" in text and "| `nft/precise` | 1.5 |" in text
    assert (out / "study_algorithms.png").stat().st_size > 1000


def _fid_propagate(sampler: str, sigmas: np.ndarray, c: float, eta: float) -> float:
    """As ``_propagate``, at ``eta``."""
    kern = kernel(sampler, sigmas, eta)
    a, b, sd = (np.asarray(getattr(kern, k), dtype=np.float64) for k in ("a", "b", "std"))
    var = 1.0
    for i, t in enumerate(sigmas[:-1]):
        alpha = (t - (1 - t) * c**2) / ((1 - t) ** 2 * c**2 + t**2)
        var = (a[i] + b[i] * alpha) ** 2 * var + sd[i] ** 2
    return math.sqrt(var) / c


def test_the_matched_control_runs_at_cps_total_noise_share_with_offsets_and_fidelity(tmp_path: Path) -> None:
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    out = tmp_path / "out"
    args = [
        "study", str(cfg_path), "train.epochs=2", "eval.every=1", "--seeds", "1", "--steps", "4", "--grids",
        "uniform,shift2", "--samplers", "cps,precise@cps", "--workers", "1", "-o", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    result = _json(out)
    assert result["samplers"] == ["cps", "precise@cps"]
    for cell in result["cells"]:
        sigmas = np.array(cell["sigmas"], dtype=np.float64)
        # the matched eta, independently: sum over interior steps of -log rho_cps = (eta^2 / 2) sum dlambda
        t, s = sigmas[:-1], sigmas[1:]
        inner = (t < 1) & (s > 0)
        dlam = np.log((1 - s[inner]) / s[inner]) - np.log((1 - t[inner]) / t[inner])
        expected = math.sqrt(-2 * inner.sum() * math.log(math.cos(0.7 * math.pi / 2)) / dlam.sum())
        assert cell["eta"]["precise@cps"] == pytest.approx(expected, rel=1e-9)
        run_dir = out / "runs" / cell["name"] / "precise@cps-seed3"
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["sampler"]["name"] == "precise" and cfg["sampler"]["eta"] == pytest.approx(expected, rel=1e-12)
        # cps's effective eta per step, the closed form's median; precise@cps's is its own eta
        eff = cell["fidelity"]["cps"]["effective_eta"]
        closed = np.sqrt(-2 * math.log(math.cos(0.7 * math.pi / 2)) / dlam)
        assert eff["median"] == pytest.approx(float(np.median(closed)), rel=1e-9) and eff["match"] == "exact"
        assert cell["fidelity"]["precise@cps"]["effective_eta"]["median"] == pytest.approx(expected, rel=1e-9)
        for run, sampler, eta in (("cps", "cps", 0.7), ("precise@cps", "precise", expected), ("ode", "ode", 0.0)):
            for key, c in (("std_ratio_sharp", 0.02), ("std_ratio_broad", 0.5)):
                got = cell["fidelity"][run][key]
                assert got == pytest.approx(_fid_propagate(sampler, sigmas, c, eta), rel=1e-9)
        # the untrained offset is the epoch-0 evaluation of each run; the gain is measured from it
        for protocol, key in PROTOCOLS.items():
            c = cell["protocols"][protocol]["samplers"]["precise@cps"]
            first = read_metrics(run_dir / "metrics.jsonl")[0]
            assert first["epoch"] == 0 and c["initial_reward_mean"] == pytest.approx(first[key], rel=1e-12)
    md = (out / "study.md").read_text()
    cell = result["cells"][0]
    c = cell["protocols"]["own"]["samplers"]["precise@cps"]
    gain = f"{c['final_reward_mean'] - c['initial_reward_mean']:+.4f}"
    assert f"| `precise@cps` | {cell['eta']['precise@cps']:.4g} |" in md and gain in md
    assert "untrained `own`" in md and "std ratio broad" in md
    # the samplers not trained here stand in the fidelity table at their reference eta, exact
    from precise_rl.sde import effective_eta

    for name in ("flow_grpo", "dance_grpo", "dance_precise", "precise"):
        row = cell["fidelity"][name]
        assert (
            row["effective_eta"] == effective_eta(name, cell["sigmas"]).summary()
            and f"| `{name}` (not trained) |" in md
        )


def test_an_eta_sweep_is_one_run_per_eta(tmp_path: Path) -> None:
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    out = tmp_path / "out"
    args = [
        "study", str(cfg_path), "train.epochs=1", "eval.every=1", "--seeds", "1", "--steps", "3", "--grids", "uniform",
        "--samplers", "precise", "--etas", "0.5,2,0.5", "--workers", "1", "-o", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    result = _json(out)
    assert result["samplers"] == ["precise@0.5", "precise@2"]
    (cell,) = result["cells"]
    for label, eta in (("precise@0.5", 0.5), ("precise@2", 2.0)):
        cfg = yaml.safe_load((out / "runs" / cell["name"] / f"{label}-seed3" / "config.yaml").read_text())
        assert cfg["sampler"]["name"] == "precise" and cfg["sampler"]["eta"] == eta
        assert cell["eta"][label] == eta and cell["fidelity"][label]["effective_eta"]["median"] == pytest.approx(eta)
    assert "final `precise@0.5`" in (out / "study.md").read_text()
    assert (out / "study_etas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--etas", "1,2", "--samplers", "precise,cps"], "--etas sweeps one sampler at a time"),
        (["--etas", "1,2"], "--etas sweeps one sampler at a time: name it with --samplers"),
        (["--etas", "1,x", "--samplers", "precise"], "--etas takes comma-separated numbers, got 'x'"),
        (["--etas", "0.5,1.5", "--samplers", "cps"], "cps needs eta in [0, 1]"),
        (["--samplers", "cps@two"], "only precise runs at the eta matched to another sampler"),
        (["--samplers", "precise@ode"], "precise@OTHER matches another stochastic sampler, got 'ode'"),
        (["--samplers", "precise@-1"], "eta must be a finite number >= 0"),
    ],
)
def test_bad_run_flags_are_one_sentence_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["study", "-o", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_matched_control_needs_the_logsnr_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["study", "sampler.schedule=constant", "--samplers", "cps,precise@cps", "-o", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "precise@cps matches on precise's logSNR schedule; drop sampler.schedule=constant" in err
    assert not (tmp_path / "out" / "runs").exists()


def test_run_parsing() -> None:
    assert study_cli.parse_runs("precise, cps@0.50,precise@cps,cps@0.5") == ["precise", "cps@0.5", "precise@cps"]
    assert study.parse_run("grpo/precise@cps") == ("precise", "cps")
    assert study.run_eta("cps@0.3", uniform_sigmas(5)) == 0.3 and study.run_eta("cps", uniform_sigmas(5)) == 0.7
    assert study.default_runs() == ["precise", "flow_grpo", "cps", "precise@cps"]


def test_the_broad_data_column_gives_the_quoted_contraction() -> None:
    """Uniform grid, data std 0.5, output std / target std of ODE, precise, cps: 0.928, 0.859, 0.788 at 20 steps
    and 0.952, 0.898, 0.806 at 30 (computed independently when the question was raised); sharp data agrees to
    three digits between cps and precise."""
    for n, expected in ((20, (0.928, 0.859, 0.788)), (30, (0.952, 0.898, 0.806))):
        fid = study.cell_fidelity(["precise", "cps"], uniform_sigmas(n))
        got = tuple(fid[s]["std_ratio_broad"] for s in ("ode", "precise", "cps"))
        assert got == pytest.approx(expected, abs=5e-4)
        assert fid["precise"]["std_ratio_sharp"] == pytest.approx(fid["cps"]["std_ratio_sharp"], abs=5e-4)
        for s in ("ode", "precise", "cps"):
            assert fid[s]["std_ratio_broad"] == pytest.approx(
                _fid_propagate(s, uniform_sigmas(n).numpy(), 0.5, fid[s]["eta"]), rel=1e-9
            )


def test_precise_against_cps_splits_into_exploration_and_consistency() -> None:
    """The split table from per-seed finals made up here: each column recomputed from the seed pairs."""
    from precise_rl.rl.study_report import split_lines

    rng = np.random.default_rng()
    finals = {r: rng.normal(1.0, 0.1, size=3) for r in ("precise", "precise@cps", "cps")}
    starts = {r: rng.normal(0.6, 0.05, size=3) for r in finals}
    summary = {
        "samplers": {
            r: {"final_reward_per_seed": finals[r].tolist(), "reward_per_seed": [[s0, 0.0] for s0 in starts[r]]}
            for r in finals
        }
    }
    cell = {"grids": ["uniform"], "steps": 20, "protocols": {"own": summary}}
    lines = split_lines({"samplers": ["precise", "cps", "precise@cps"], "cells": [cell]})
    row = lines[2].strip("| ").split(" | ")
    assert row[:3] == ["uniform", "20", "own"]
    for text, (a, b) in zip(
        row[3:6], [("precise", "cps"), ("precise", "precise@cps"), ("precise@cps", "cps")], strict=True
    ):
        d = finals[a] - finals[b]
        assert text == f"{d.mean():+.4f} ± {d.std():.4f}"
    assert row[6] == f"{(starts['precise@cps'] - starts['cps']).mean():+.4f}"
    assert split_lines({"samplers": ["precise", "cps"], "cells": [cell]}) == []


@pytest.mark.parametrize("quick", [False, True])
def test_the_signs_config_takes_its_own_study_sizes_and_flags_win(tmp_path: Path, monkeypatch, quick: bool) -> None:
    seen: dict = {}

    def fake_run_study(items, seeds, steps, grids, samplers, workers, output, algorithms=None):
        seen.update(items=items, seeds=seeds, steps=steps, grids=grids)
        raise SystemExit(0)  # stop before any training

    monkeypatch.setattr(study_cli, "run_study", fake_run_study)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "signs_precise.yaml")
    flags = ["--quick"] if quick else []
    with pytest.raises(SystemExit):
        main(["study", config, *flags, "--output", str(tmp_path / "a"), "train.lr=1e-4"])
    sizes = study.TASK_SIZES["signs"]
    own = sizes["quick"] if quick else sizes
    assert seen["seeds"] == own["seeds"] and seen["grids"] == [("model", None)]
    assert seen["steps"] == (own["steps"] if quick else study.DEFAULT_STEPS)
    # the config first, then the study's and the task's overrides, the user's last (they win)
    assert seen["items"][0] == config and seen["items"][-1] == "train.lr=1e-4"
    assert all(o in seen["items"] for o in sizes["overrides"] + study.STUDY_OVERRIDES)
    assert all(o in seen["items"] for o in own["overrides"])
    # flags given win over the task's sizes; the digits config keeps the digits defaults
    with pytest.raises(SystemExit):
        main(["study", config, "--seeds", "2", "--grids", "uniform", "--output", str(tmp_path / "b")])
    assert seen["seeds"] == 2 and seen["grids"] == [("uniform", None)]
    with pytest.raises(SystemExit):
        main(["study", "--quick", "--output", str(tmp_path / "c")])
    assert seen["seeds"] == study.QUICK["seeds"] and seen["steps"] == study.QUICK["steps"]
    assert len(seen["grids"]) == 3 and not any("groups_per_epoch" in o for o in seen["items"])


def test_the_map_row_per_cell_from_made_up_seeds() -> None:
    """The site's summary row: ratios, precise - cps and its split, cps's etas and the broad-data ratios,
    each recomputed here from made-up per-seed numbers; rows ordered grid by grid, then by steps."""
    from precise_rl.rl.study_report import map_lines

    rng = np.random.default_rng()
    runs = ("precise", "precise@cps", "cps")

    def protocol(ratio: float | None) -> tuple[dict, dict]:
        finals = {r: rng.normal(1.0, 0.1, size=3) for r in runs}
        summary = {
            "target": 1.05,
            "precise_epoch_ratio_vs_best_prior": ratio,
            "precise_epoch_ratio_per_seed": [0.8, None, 0.9],
            "samplers": {
                r: {"final_reward_per_seed": finals[r].tolist(), "final_reward_mean": float(finals[r].mean())}
                for r in runs
            },
        }
        return summary, finals

    cells, expected = [], {}
    for steps, grid in ((20, "shift3"), (6, "uniform"), (6, "shift3")):
        own, own_f = protocol(float(rng.uniform(0.5, 1.5)))
        ode, ode_f = protocol(None)
        broad = {r: float(rng.uniform(0.5, 1.0)) for r in ("precise", "cps", "ode")}
        fidelity = {r: {"std_ratio_broad": b} for r, b in broad.items()}
        fidelity["cps"]["effective_eta"] = {"median": float(rng.uniform(1, 3))}
        fidelity["precise@cps"] = {"eta": float(rng.uniform(1, 3))}
        cells.append(
            {"grid": grid, "grids": [grid], "steps": steps, "fidelity": fidelity, "protocols": {"own": own, "ode": ode}}
        )
        d = own_f["precise"] - own_f["cps"]
        e = own_f["precise"] - own_f["precise@cps"]
        c = own_f["precise@cps"] - own_f["cps"]
        expected[(grid, steps)] = [
            grid,
            str(steps),
            f"{own['precise_epoch_ratio_vs_best_prior']:.2f} (0.80, 0.90)",
            f"not reached ({ode_f['precise'].mean() - 1.05:+.3f})",
            f"{d.mean():+.3f} / {(ode_f['precise'] - ode_f['cps']).mean():+.3f}",
            f"{e.mean():+.3f} ± {e.std():.3f}",
            f"{c.mean():+.3f} ± {c.std():.3f}",
            f"{fidelity['cps']['effective_eta']['median']:.2f} / {fidelity['precise@cps']['eta']:.2f}",
            " / ".join(f"{broad[r]:.3f}" for r in ("precise", "cps", "ode")),
        ]
    result = {"samplers": list(runs), "grids": ["uniform", "shift3"], "cells": cells}
    rows = [line.strip("| ").split(" | ") for line in map_lines(result)[2:]]
    assert [(r[0], int(r[1])) for r in rows] == [("uniform", 6), ("shift3", 6), ("shift3", 20)]
    for row in rows:
        assert row == expected[(row[0], int(row[1]))]
    for row in (line.strip("| ").split(" | ") for line in map_lines({**result, "seeds": 1})[2:]):
        want = expected[(row[0], int(row[1]))]  # one seed: the split without a spread
        assert row[5:7] == [cell.split(" ± ")[0] for cell in want[5:7]] and row[:5] == want[:5]
    assert map_lines({**result, "samplers": ["precise", "cps"]}) == []
