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
    assert md.count("| uniform = model | 2 |") == 2 and "| shift3 | 3 | ode |" in md  # a row per protocol


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
        assert set(cell["fidelity_std_ratio"]) == {"ode", *SAMPLERS}
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
    assert "`nft`: samplers by final reward" in text and "std ratio `precise`" in text
    assert (out / "study_algorithms.png").stat().st_size > 1000
