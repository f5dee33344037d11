"""The sampler study: every sampler (and algorithm) trained over cells (step count x time grid), with fidelity.

``run_study`` runs the jobs (a pool of processes; finished runs are not run again), summarises each cell
as ``compare`` does and writes ``study.json``, ``study.md`` (:mod:`.study_report`) and the figures
(:mod:`.study_plots`); what a run is (``NAME``, ``NAME@ETA``, ``precise@OTHER``) is :mod:`.study_runs`, the
exact numbers beside each run :mod:`.study_fidelity`. What a cell is, what is reported and what the
defaults cost is said in ``precise-rl study --help`` (:mod:`precise_rl.cli.study`).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .compare import PROTOCOLS, eval_every_for, run_label, sampler_of, summarise, valid_pairs
from .study_fidelity import BROAD_FIDELITY_STD, FIDELITY_MEAN, FIDELITY_STD, cell_fidelity, fidelity_std_ratios
from .study_plots import plot_algorithms, plot_curves, plot_etas, plot_heatmap
from .study_report import SATURATED_HEADROOM, format_markdown
from .study_runs import MATCHED_CONTROL, default_runs, parse_run, run_eta, sweep_runs

__all__ = [
    "run_study",
    "format_markdown",
    "fidelity_std_ratios",
    "cell_fidelity",
    "parse_run",
    "run_eta",
    "default_runs",
    "plot_heatmap",
    "plot_curves",
    "plot_etas",
    "plot_algorithms",
    "SATURATED_HEADROOM",
    "MATCHED_CONTROL",
    "TASK_SIZES",
    "FIDELITY_MEAN",
    "FIDELITY_STD",
    "BROAD_FIDELITY_STD",
]

DEFAULT_STEPS = [6, 10, 20, 30]
DEFAULT_GRIDS = "uniform,shift3,model"
DEFAULT_SEEDS = 3
#: overrides the study puts before the user's (who can override them in turn). Why: one digits run of the
#: default recipe (100 epochs, 10 steps, 21 evaluations of 36 held-out prompts x 4 samples under both
#: protocols) took 18 s on one thread on the 2-core development machine at load 4-8, about 70% of it
#: training; the 90 runs of the default study came out at 28-33 minutes on two workers, too close to a
#: 30-minute budget. The study keeps the 100 epochs, the 3 seeds and compare's evaluation frequency and
#: halves the evaluation cost instead (2 samples per prompt); one checkpoint at the end changes no result.
#: Measured then: the full default study 19 min 11 s (load 5-6), ``--quick`` 2 min 14 s (load 2-3).
STUDY_OVERRIDES = ["eval.samples_per_prompt=2", "checkpoint.every=0", "checkpoint.keep=1"]
QUICK = {"steps": [6, 10], "seeds": 2, "overrides": ["train.epochs=30", "eval.max_prompts=16"]}
#: a built-in task whose runs cost more than the digits task's has sizes of its own, used where the
#: command line gives none (its overrides come after the config's values and before the user's). Why for
#: signs: an epoch of its recipe (8 x 8 rollouts of a 1.7M-parameter DiT over 32x128 pixels, each image
#: read by PP-OCRv4, GRPO's loss on 6 of 10 steps) takes 8-18 s on one thread of the shared 2-core
#: machine, where a digits epoch takes 0.05 s. One seed on the model's own grid (shift 3; the uniform grid would
#: double the cost) and 10 epochs a run keep the full study (16 runs) to 17 min 46 s on 2 workers at load
#: average 3 (measured); ``--quick`` is the 4 runs at 10 steps for 6 epochs (3 min 20 s at load 3).
#: Fewer updates than the config's EMA interval (every 8) leave the evaluated EMA weights untrained: a
#: first quick mode of 3 epochs of 4 x 4 rollouts (one update an epoch) measured a gain of exactly 0 for
#: every run.
TASK_SIZES: dict[str, dict[str, Any]] = {
    "signs": {
        "seeds": 1,
        "grids": "model",
        "overrides": ["train.epochs=10", "eval.max_prompts=16"],
        "quick": {"steps": [10], "seeds": 1, "overrides": ["train.epochs=6", "eval.max_prompts=8"]},
    }
}


# --------------------------------------------------------------------------- jobs


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the cores: one thread each


def _run_job(job: dict[str, Any]) -> tuple[str, float]:
    """Train one (cell, sampler, seed); returns its key and seconds (set-up and training)."""
    from .trainer import Trainer

    start = time.perf_counter()
    Trainer(job["cfg"], job["run_dir"]).run()
    return job["key"], time.perf_counter() - start


def _finished(run_dir: Path, cfg: Any) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg``; UserError if it holds one of another config."""
    import yaml

    from ..config import same_run_config

    if not (run_dir / "summary.json").is_file():
        return False
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not same_run_config(saved, cfg):  # config.yaml holds the defaults the run filled in
        raise UserError(
            f"{run_dir} holds a finished run of another config; give another --output or remove that directory"
        )
    return True


def _run_jobs(jobs: list[dict[str, Any]], workers: int, done: int) -> dict[str, float]:
    """Run ``jobs`` (those not finished yet) with a progress bar over all ``done + len(jobs)``; seconds per job."""
    from tqdm.auto import tqdm

    seconds: dict[str, float] = {}
    bar = tqdm(total=done + len(jobs), initial=done, desc="study", unit="run", dynamic_ncols=True)
    try:
        if workers == 1 or len(jobs) <= 1:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a worker: the same arithmetic whatever --workers
            try:
                for job in jobs:
                    key, sec = _run_job(job)
                    seconds[key] = sec
                    bar.update()
            finally:
                torch.set_num_threads(threads)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
                for key, sec in pool.imap_unordered(_run_job, jobs):
                    seconds[key] = sec
                    bar.update()
                pool.close()  # let the workers exit on their own (terminate would leave their semaphores behind)
                pool.join()
    finally:
        bar.close()
    return seconds


# --------------------------------------------------------------------------- the study


def _cells(
    steps: list[int], grids: list[tuple[str, float | None]], model_grid: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Distinct cells (each with the grid labels it stands for) and the (steps, grid) pairs merged into them."""
    from ..sde import shifted_sigmas, uniform_sigmas

    cells: list[dict[str, Any]] = []
    merged: list[dict[str, Any]] = []
    for n in steps:
        for label, shift in grids:
            if label == "uniform":
                sigmas = uniform_sigmas(n)
            elif label == "model":
                sigmas = model_grid(n)
            else:
                sigmas = shifted_sigmas(n, shift)
            sigmas = [float(s) for s in sigmas]
            same = next((c for c in cells if c["steps"] == n and c["sigmas"] == sigmas), None)
            if same is not None:
                same["grids"].append(label)
                merged.append({"steps": n, "grid": label, "same_as": same["grid"]})
                continue
            cells.append(
                {"name": f"N{n}-{label}", "steps": n, "grid": label, "shift": shift, "grids": [label], "sigmas": sigmas}
            )
    return cells, merged


def _model_grid_note(model_name: str, policy: Any, merged: list[dict[str, Any]]) -> str | None:
    """What the ``model`` grid is, where it was merged into another grid."""
    same = sorted({m["same_as"] for m in merged if m["grid"] == "model"})
    if not same:
        return None
    note = (
        f"the model's own time grid (sampler.grid=model) is the {' / '.join(same)} grid here, so those cells ran once"
    )
    shift = getattr(policy, "time_shift", None)
    if model_name == "digits" and shift is not None:
        note += (
            f": the digits model samples the uniform grid shifted by its time_shift {shift:g} (model option; "
            "its pretraining draws t ~ U(0, 1), for which the unshifted uniform grid is the natural one)"
        )
    return note


def _job_cfg(base: Any, cell: dict[str, Any], algorithm: str, run: str, k: int) -> Any:
    from ..algorithm_table import ALGORITHM_TABLE
    from ..config import AlgorithmConfig

    cfg = copy.deepcopy(base)
    if algorithm != base.algorithm.name:  # another algorithm at its default knobs
        cfg.algorithm = AlgorithmConfig(algorithm, ALGORITHM_TABLE[algorithm].knobs())
    sampler, spec = parse_run(run)
    cfg.sampler.name = sampler
    # None: the sampler's reference eta; else the run's number, or the eta matched on this cell's grid
    cfg.sampler.eta = None if spec is None else run_eta(run, cell["sigmas"])
    cfg.sampler.num_steps = cell["steps"]
    cfg.eval.num_steps = cell["steps"]
    if cell["grid"] == "uniform":
        cfg.sampler.grid = "uniform"
    elif cell["grid"] == "model":
        cfg.sampler.grid = "model"
    else:
        cfg.sampler.grid = "shifted"
        cfg.sampler.shift = cell["shift"]
    cfg.seed = base.seed + k
    cfg.logging.progress = False
    cfg.logging.tensorboard = False
    return cfg


def _cell_summary(summary: dict[str, Any]) -> dict[str, Any]:
    headroom = summary.get("headroom")
    summary["saturated"] = None if headroom is None else bool(headroom < SATURATED_HEADROOM)
    return summary


def _check_only_run_outputs(run_dir: Path) -> None:
    """Refuse to restart ``run_dir`` (it is removed whole) when it holds anything a run does not write."""
    from .rundir import RUN_OUTPUTS, foreign_files

    extra = [n for n in foreign_files(run_dir) if n.rstrip("/") not in RUN_OUTPUTS]
    if extra:
        raise UserError(
            f"the study's run directory {str(run_dir)!r} holds files a run did not write ({', '.join(extra[:5])}); "
            "move them away or choose another --output"
        )


def run_study(
    items: list[str],
    seeds: int,
    steps: list[int],
    grids: list[tuple[str, float | None]],
    samplers: list[str],
    workers: int,
    output: Path,
    algorithms: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every job, summarise each cell, write the files; returns the study's dict.

    ``algorithms``: None = the config's algorithm alone (runs labelled by sampler); several: every
    (algorithm, sampler) pair that can train, labelled ``algorithm/sampler``.
    """
    import torch

    from ..tasks.registry import build_task
    from .logging import read_metrics
    from .preflight import check_config
    from .run_config import resolve_config

    start = time.perf_counter()
    base = resolve_config(items, None)
    base.eval.every = eval_every_for(base.train.epochs, base.eval.every)
    base.eval.samplers = ["ode", "own"]
    matched = [r for r in samplers if isinstance(parse_run(r)[1], str)]
    if matched and base.sampler.schedule != "logsnr":
        raise UserError(
            f"{matched[0]} matches on precise's logSNR schedule; drop sampler.schedule={base.sampler.schedule} "
            "or the precise@ runs"
        )

    policy = build_task(base.model, torch.device("cpu")).policy if any(g == "model" for g, _ in grids) else None
    cells, merged = _cells(steps, grids, policy.time_grid if policy is not None else None)
    note = _model_grid_note(base.model.name, policy, merged)
    del policy

    from ..config import validate

    several = algorithms is not None and len(algorithms) > 1
    algos = algorithms or [base.algorithm.name]
    ok, left_out = valid_pairs(algos, list(dict.fromkeys(map(sampler_of, samplers))))
    pairs = [(a, r) for a in algos for r in samplers if (a, sampler_of(r)) in ok]
    labels = [run_label(a, s, several) for a, s in pairs]
    jobs, done = [], 0
    # Seed-major order: a machine that slows down during the study hits every cell and sampler alike.
    for k in range(seeds):
        for cell in cells:
            for (algorithm, sampler), label in zip(pairs, labels, strict=True):
                cfg = _job_cfg(base, cell, algorithm, sampler, k)
                validate(cfg)
                first = k == 0 and cell is cells[0] and label == labels[0]
                check_config(cfg, warn=first)  # every run's config before any training; warnings once
                run_dir = output / "runs" / cell["name"] / f"{label.replace('/', '-')}-seed{cfg.seed}"
                job = {"key": f"{cell['name']}/{label}-seed{cfg.seed}", "cfg": cfg, "run_dir": str(run_dir)}
                if _finished(run_dir, cfg):
                    done += 1
                    continue
                if run_dir.exists():  # a run killed before it finished: start it again
                    _check_only_run_outputs(run_dir)
                    shutil.rmtree(run_dir)
                jobs.append(job)
    seconds = _run_jobs(jobs, workers, done)

    schedule = base.sampler.schedule
    for cell in cells:
        runs: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in labels}
        run_s: dict[str, list[float]] = {s: [] for s in labels}
        for label in labels:
            for k in range(seeds):
                run_dir = output / "runs" / cell["name"] / f"{label.replace('/', '-')}-seed{base.seed + k}"
                runs[label].append(read_metrics(run_dir / "metrics.jsonl"))
                run_s[label].append(float(json.loads((run_dir / "summary.json").read_text())["elapsed_s"]))
        cell["protocols"] = {p: _cell_summary(summarise(runs, key)) for p, key in PROTOCOLS.items()}
        runs_fid = cell_fidelity([r for _, r in pairs], cell["sigmas"], schedule)
        fid = {**runs_fid, **{label: runs_fid[run] for (_, run), label in zip(pairs, labels, strict=True)}}
        cell["fidelity"] = fid
        cell["fidelity_std_ratio"] = {k: v["std_ratio_sharp"] for k, v in fid.items()}
        cell["fidelity_broad_std_ratio"] = {k: v["std_ratio_broad"] for k, v in fid.items()}
        cell["eta"] = {k: v["eta"] for k, v in fid.items()}
        cell["run_elapsed_s"] = run_s
    result: dict[str, Any] = {
        "config": items,
        "seeds": seeds,
        "steps": steps,
        "grids": [g for g, _ in grids],
        "samplers": labels,  # the runs' labels: samplers, or algorithm/sampler across algorithms
        "algorithms": algorithms or [base.algorithm.name],
        "left_out": left_out,
        "epochs": base.train.epochs,
        "eval_every": base.eval.every,
        "eval": {"max_prompts": base.eval.max_prompts, "samples_per_prompt": base.eval.samples_per_prompt},
        "saturated_below_headroom": SATURATED_HEADROOM,
        "fidelity_target": {"mean": FIDELITY_MEAN, "std": FIDELITY_STD, "eta": "each run's eta"},
        "fidelity_broad_target": {"mean": FIDELITY_MEAN, "std": BROAD_FIDELITY_STD, "eta": "each run's eta"},
        "cells": cells,
        "merged": merged,
        "model_grid_note": note,
        "timings": _timings(output, time.perf_counter() - start, workers, done, len(jobs), seconds, cells),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "study.json").write_text(json.dumps(result, indent=1))
    (output / "study.md").write_text(format_markdown(result))
    plot_heatmap(result, output / "study_heatmap.png")
    plot_curves(result, output / "study_curves.png")
    if several:
        plot_algorithms(result, output / "study_algorithms.png")
    if len(sweep_runs(labels)) > 1:
        plot_etas(result, output / "study_etas.png")
    return result


def _timings(
    output: Path, wall: float, workers: int, done: int, ran: int, seconds: dict[str, float], cells: list
) -> dict[str, Any]:
    """This invocation's timings, and those of the earlier invocations of a resumed study (from its study.json)."""
    previous: dict[str, Any] = {}
    try:
        previous = json.loads((output / "study.json").read_text())["timings"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    earlier = previous.get("invocations")
    if earlier is None and "wall_s" in previous:  # a study.json that lists no invocations: it was one
        earlier = [{k: previous.get(k) for k in ("wall_s", "workers", "jobs_run")}]
    invocations = [*(earlier or []), {"wall_s": wall, "workers": workers, "jobs_run": ran}]
    keys = {f"{c['name']}/{name}" for c in cells for name in c["run_elapsed_s"]}
    job_s = {k: v for k, v in previous.get("job_s", {}).items() if k.rsplit("-seed", 1)[0] in keys}
    return {
        "wall_s": wall,
        "workers": workers,
        "jobs": done + ran,
        "jobs_run": ran,
        "jobs_resumed": done,
        "invocations": invocations,
        "wall_s_all_invocations": float(sum(i["wall_s"] for i in invocations)),
        "job_s": {**job_s, **seconds},
        "run_elapsed_s_total": float(sum(sum(v) for c in cells for v in c["run_elapsed_s"].values())),
    }
