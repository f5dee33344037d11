"""The sampler study: every sampler (and algorithm) trained over cells (step count x time grid), with fidelity.

``run_study`` runs the jobs (a pool of processes; finished runs are not run again), summarises each cell
as ``compare`` does and writes ``study.json``, ``study.md`` and the two plots. What a cell is, what is
reported and what the defaults cost is said in ``precise-rl study --help`` (:mod:`precise_rl.cli.study`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..sde.samplers import prior_samplers
from .compare import PROTOCOLS, eval_every_for, run_label, sampler_of, summarise, valid_pairs

__all__ = [
    "run_study",
    "format_markdown",
    "fidelity_std_ratios",
    "SATURATED_HEADROOM",
]

DEFAULT_STEPS = [6, 10, 20]
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
#: a cell whose target leaves less of the way to the reward's ceiling open than this is "saturated"
SATURATED_HEADROOM = 0.1
#: the fidelity lab's sharp data: N(FIDELITY_MEAN, FIDELITY_STD^2), the thin manifold of clean images
FIDELITY_MEAN = 0.5
FIDELITY_STD = 0.02


# --------------------------------------------------------------------------- fidelity


def fidelity_std_ratios(
    samplers: list[str], sigmas: Any, precise_schedule: str = "logsnr", std: float = FIDELITY_STD
) -> dict[str, float]:
    """Output std / target std of each sampler (default eta) on ``N(0.5, std^2)`` data over ``sigmas``, exact."""
    from ..fidelity.gaussian import GaussianTarget, propagate_gaussian
    from ..sde import kernel

    target = GaussianTarget(FIDELITY_MEAN, std)
    out = {}
    for name in samplers:
        kern = kernel(name, sigmas, None, precise_schedule if name == "precise" else None)
        out[name] = float(propagate_gaussian(kern, target).std_ratio)
    return out


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


def _job_cfg(base: Any, cell: dict[str, Any], algorithm: str, sampler: str, k: int) -> Any:
    from ..algorithm_table import ALGORITHM_TABLE
    from ..config import AlgorithmConfig

    cfg = copy.deepcopy(base)
    if algorithm != base.algorithm.name:  # another algorithm at its default knobs
        cfg.algorithm = AlgorithmConfig(algorithm, ALGORITHM_TABLE[algorithm].knobs())
    cfg.sampler.name = sampler
    cfg.sampler.eta = None  # each sampler at its reference eta
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

    policy = build_task(base.model, torch.device("cpu")).policy if any(g == "model" for g, _ in grids) else None
    cells, merged = _cells(steps, grids, policy.time_grid if policy is not None else None)
    note = _model_grid_note(base.model.name, policy, merged)
    del policy

    from ..config import validate

    several = algorithms is not None and len(algorithms) > 1
    pairs, left_out = valid_pairs(algorithms or [base.algorithm.name], samplers)
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
        by_sampler = fidelity_std_ratios(["ode", *dict.fromkeys(map(sampler_of, labels))], cell["sigmas"], schedule)
        cell["fidelity_std_ratio"] = {**by_sampler, **{label: by_sampler[sampler_of(label)] for label in labels}}
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
        "fidelity_target": {"mean": FIDELITY_MEAN, "std": FIDELITY_STD, "eta": "each sampler's default"},
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


# --------------------------------------------------------------------------- report


def _f(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ratio_text(summary: dict[str, Any], seeds: int) -> str:
    """Precise's epoch ratio against the best prior on the seed-mean curves, then per seed pair, or ``not reached``.

    The two can differ a lot: the target is the best prior's own seed-mean final reward, which its
    seed-mean curve usually first reaches at the last evaluation, while single seeds cross it earlier
    or never. Both are shown so that a ratio from the mean curves alone is not read as a speed-up.
    """
    ratio = summary.get("precise_epoch_ratio_vs_best_prior")
    if ratio is None:
        return "not reached" if "precise" in summary["samplers"] and summary["target"] is not None else "-"
    done = [r for r in summary.get("precise_epoch_ratio_per_seed", []) if r is not None]
    text = f"{ratio:.2f}"
    if seeds > 1:
        pairs = ", ".join(f"{r:.2f}" for r in done) or "none"
        text += f" (seed pairs {pairs}: {len(done)}/{seeds})"
    return text


def format_markdown(result: dict[str, Any]) -> str:
    samplers, seeds = result["samplers"], result["seeds"]
    # the fidelity column is the sampler's (the same under every algorithm): one per distinct sampler
    fidelity = list(dict.fromkeys(sampler_of(s) for s in samplers))
    head = ["grid", "steps", "protocol", "best prior", "target", "headroom", "precise epochs / best prior's"]
    head += [f"final `{s}`" for s in samplers] + [f"std ratio `{s}`" for s in fidelity]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for cell in result["cells"]:
        for protocol, summary in cell["protocols"].items():
            headroom = summary.get("headroom")
            hr = "-" if headroom is None else f"{headroom:.2f}" + (" (saturated)" if summary["saturated"] else "")
            row = [
                " = ".join(cell["grids"]),
                str(cell["steps"]),
                protocol,
                summary["best_prior"] or "-",
                _f(summary["target"]),
                hr,
                ratio_text(summary, seeds),
            ]
            for s in samplers:
                c = summary["samplers"][s]
                row.append(_f(c["final_reward_mean"]) + (f" ± {c['final_reward_std']:.4f}" if seeds > 1 else ""))
            row += [_f(cell["fidelity_std_ratio"][s], ".3g") for s in fidelity]
            lines.append("| " + " | ".join(row) + " |")
    t = result["timings"]
    notes = [
        f"Sampler study: {len(samplers)} samplers x {seeds} seeds x steps {', '.join(map(str, result['steps']))} "
        f"x grids {', '.join(result['grids'])}; {result['epochs']} epochs per run, evaluated every "
        f"{result['eval_every']} epochs (up to {result['eval']['max_prompts']} held-out prompts x "
        f"{result['eval']['samples_per_prompt']} samples, EMA weights), each sampler at its reference eta.",
        "",
        "- protocol `own`: each sampler's own stochastic rollouts at its eta; `ode`: the deterministic ODE on the "
        "same weights.",
        "- target: the best final reward among the prior samplers (" + ", ".join(prior_samplers()) + "), seed mean; "
        "precise epochs / best prior's: epochs to reach it on the seed-mean curves (linear between evaluations), "
        "then each seed pair's ratio (precise's seed k against the best prior's seed k, where both reach the "
        "target). The target is the best prior's own seed-mean final reward, which its seed-mean curve usually "
        "first reaches at the last evaluation: a ratio below 1 on the mean curves that the seed pairs do not "
        "bear out is a level finish, not a speed-up.",
        f"- headroom: the share of the way from the untrained model to the reward's ceiling that the target leaves "
        f"open; below {SATURATED_HEADROOM} the cell is saturated and its ratio says little.",
        f"- std ratio: the fidelity lab's output std / target std on sharp Gaussian data (std {FIDELITY_STD}) on "
        "the cell's grid and step count, exact, each sampler at its default eta (1 is exact; above 1 is excess "
        "noise).",
    ]
    if result["merged"]:
        merged = "; ".join(f"N={m['steps']} {m['grid']} = {m['same_as']}" for m in result["merged"])
        notes.append(f"- merged (identical time grids, run once): {merged}.")
    if result["model_grid_note"]:
        notes.append(f"- {result['model_grid_note'][0].upper()}{result['model_grid_note'][1:]}.")
    runs_now = f"{t['jobs']} runs ({t['jobs_run']} run in {t['wall_s']:.0f} s on {t['workers']} worker(s) now"
    if len(t["invocations"]) > 1:
        runs_now += (
            f", {t['jobs_resumed']} finished earlier; {t['wall_s_all_invocations']:.0f} s wall-clock over "
            f"{len(t['invocations'])} invocations"
        )
    notes.append(f"- {runs_now}); {t['run_elapsed_s_total']:.0f} s of runs (training and evaluation) in all.")
    if len(result.get("algorithms", [])) > 1:
        notes.append(
            "- across algorithms (runs `algorithm/sampler`, each algorithm at its default knobs): the target is the "
            "best final reward of GRPO's prior samplers; left out: " + ("; ".join(result["left_out"]) or "none") + "."
        )
        lines += ["", *_algorithm_lines(result)]
    return "\n".join(["# Sampler study", "", *notes, "", *lines, ""])


def _algorithm_lines(result: dict[str, Any]) -> list[str]:
    """Per cell and protocol: each algorithm's sampler ranking, and who reaches the target soonest."""
    head = ["grid", "steps", "protocol", *(f"`{a}`: samplers by final reward" for a in result["algorithms"])]
    head += ["soonest (wall-clock)", "soonest (model evaluations)", "best final"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for cell in result["cells"]:
        for protocol, summary in cell["protocols"].items():
            info = summary.get("algorithms", {})
            ranking = info.get("ranking", {})
            row = [" = ".join(cell["grids"]), str(cell["steps"]), protocol]
            row += [" > ".join(ranking.get(a, [])) or "-" for a in result["algorithms"]]
            row += [
                info.get("soonest_by_wallclock_to_target_s") or "not reached",
                info.get("soonest_by_model_evals_to_target") or "not reached",
                info.get("best_final") or "-",
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _cell_text(summary: dict[str, Any], seeds: int) -> str:
    """A heatmap cell's ratio text on short lines: the mean-curve ratio, then the seed pairs', three a line."""
    ratio = summary.get("precise_epoch_ratio_vs_best_prior")
    if ratio is None or seeds < 2:
        return ratio_text(summary, seeds)
    done = [f"{r:.2f}" for r in summary.get("precise_epoch_ratio_per_seed", []) if r is not None]
    lines = [f"{ratio:.2f}", f"seed pairs {len(done)}/{seeds}" + (":" if done else "")]
    lines += [", ".join(done[k : k + 3]) for k in range(0, len(done), 3)]
    return "\n".join(lines)


def _fit_in_cells(fig: Any, texts: list[tuple[Any, int, int, Any]], fill: float = 0.9) -> None:
    """Shrink each cell's text until it takes at most ``fill`` of its cell's width and height.

    A text's size on the page is known only once drawn: a long ratio line at the default size ran over
    the cell borders on a figure of several grids.
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax, i, j, text in texts:
        (x0, y0), (x1, y1) = ax.transData.transform([(j - 0.5, i - 0.5), (j + 0.5, i + 0.5)])
        box = text.get_window_extent(renderer)
        scale = min(1.0, fill * abs(x1 - x0) / max(box.width, 1e-9), fill * abs(y1 - y0) / max(box.height, 1e-9))
        if scale < 1.0:
            text.set_fontsize(text.get_fontsize() * scale)


def plot_heatmap(result: dict[str, Any], path: Path) -> None:
    """One panel per protocol: rows steps, columns grids, colour = precise's epoch ratio vs the best prior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    steps, grids, seeds = result["steps"], result["grids"], result["seeds"]
    by = {(c["steps"], g): c for c in result["cells"] for g in c["grids"]}
    protocols = list(PROTOCOLS)
    fig, axes = plt.subplots(
        1, len(protocols), figsize=(2.2 * len(grids) * len(protocols) + 2.5, 1.3 * len(steps) + 2), squeeze=False
    )
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    norm = Normalize(-0.6, 0.6)  # log2 of the ratio: 0.66x .. 1.5x
    image = None
    texts: list[tuple[Any, int, int, Any]] = []  # (axes, row, column, text) of every cell
    for ax, protocol in zip(axes[0], protocols, strict=True):
        values = np.full((len(steps), len(grids)), np.nan)
        for i, n in enumerate(steps):
            for j, g in enumerate(grids):
                cell = by[(n, g)]
                summary = cell["protocols"][protocol]
                ratio = summary.get("precise_epoch_ratio_vs_best_prior")
                if ratio is not None:
                    values[i, j] = math.log2(ratio)
                text = _cell_text(summary, seeds)
                if text == "not reached":  # how far precise ends from the target
                    gap = summary["samplers"]["precise"]["final_reward_mean"] - summary["target"]
                    text = f"n/r\nfinal {gap:+.3f}"
                if g != cell["grid"]:
                    text += f"\n(= {cell['grid']})"
                if summary.get("saturated"):
                    text += "\nsaturated"
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="k", lw=0))
                texts.append((ax, i, j, ax.text(j, i, text, ha="center", va="center", fontsize=8)))
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
        for axt, i, j, text in texts:
            if axt is ax and np.isfinite(values[i, j]):  # white on the dark ends of the colour scale
                r, g, b, _ = cmap(norm(values[i, j]))
                text.set_color("white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
        ax.set_xticks(range(len(grids)), grids)
        ax.set_yticks(range(len(steps)), [str(n) for n in steps])
        ax.set_xlabel("time grid")
        ax.set_ylabel("steps N")
        what = "own stochastic rollouts" if protocol == "own" else "ODE"
        ax.set_title(f"{protocol} ({what})")
    if image is not None:
        bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85)
        ticks = [math.log2(v) for v in (0.7, 0.85, 1.0, 1.2, 1.4)]
        bar.set_ticks(ticks, labels=[f"{2**t:.2g}x" for t in ticks])
        bar.set_label("precise epochs to target / best prior's\n(< 1: precise faster)")
    _fit_in_cells(fig, texts)
    fig.suptitle(
        f"Where precise wins: {result['epochs']} epochs, {seeds} seed(s), ratio on the seed-mean curves "
        "(seed pairs' ratios)\n"
        "grey n/r: precise does not reach the target (its final reward minus the target shown)",
        y=1.04,
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Reward against epoch of every sampler (seed mean ± std), one subplot per cell and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, protocols = result["cells"], list(PROTOCOLS)
    fig, axes = plt.subplots(len(cells), len(protocols), figsize=(6 * len(protocols), 3.2 * len(cells)), squeeze=False)
    for r, cell in enumerate(cells):
        for col, protocol in enumerate(protocols):
            ax = axes[r][col]
            summary = cell["protocols"][protocol]
            for name, c in summary["samplers"].items():
                ep = np.array(c["epochs"], dtype=float)
                mu, sd = np.array(c["reward_mean"]), np.array(c["reward_std"])
                (line,) = ax.plot(ep, mu, lw=2.2 if name == "precise" else 1.1, label=name)
                ax.fill_between(ep, mu - sd, mu + sd, color=line.get_color(), alpha=0.12)
            if summary["target"] is not None:
                ax.axhline(summary["target"], color="k", ls="--", lw=0.8, label=f"target ({summary['best_prior']})")
            if summary.get("reward_ceiling") is not None:
                ax.axhline(summary["reward_ceiling"], color="grey", ls=":", lw=0.8, label="reward ceiling")
            sat = ", saturated" if summary.get("saturated") else ""
            ax.set_title(f"N={cell['steps']} {' = '.join(cell['grids'])}, {protocol}{sat}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"held-out reward ({protocol})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_algorithms(result: dict[str, Any], path: Path) -> None:
    """Across algorithms: reward against model evaluations and against wall-clock, every run, one row per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, protocols = result["cells"], list(PROTOCOLS)
    fig, axes = plt.subplots(
        len(cells), 2 * len(protocols), figsize=(5.5 * 2 * len(protocols), 3.4 * len(cells)), squeeze=False
    )
    styles = ["-", "--", ":", "-."]
    algos = result["algorithms"]
    samplers = list(dict.fromkeys(sampler_of(s) for s in result["samplers"]))
    colors = {s: f"C{i}" for i, s in enumerate(samplers)}  # colour = sampler, line style = algorithm
    for r, cell in enumerate(cells):
        for p, protocol in enumerate(protocols):
            summary = cell["protocols"][protocol]
            for name, c in summary["samplers"].items():
                algo = name.rsplit("/", 1)[0]
                style = styles[algos.index(algo) % len(styles)] if algo in algos else "-"
                mu = np.array(c["reward_mean"])
                for col, key in ((2 * p, "model_evals_mean"), (2 * p + 1, "wallclock_s_mean")):
                    axes[r][col].plot(
                        np.array(c[key]), mu, ls=style, lw=1.4, label=name, color=colors[sampler_of(name)]
                    )
            for col, xl in ((2 * p, "model evaluations"), (2 * p + 1, "training wall-clock (s)")):
                ax = axes[r][col]
                if summary["target"] is not None:
                    ax.axhline(summary["target"], color="k", lw=0.6, ls="-", alpha=0.6)
                ax.set_xlabel(xl)
                ax.set_ylabel(f"held-out reward ({protocol})")
                ax.set_title(f"N={cell['steps']} {' = '.join(cell['grids'])}, {protocol}", fontsize=10)
                ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    legend = ", ".join(f"{a} {s}" for a, s in zip(algos, ["solid", "dashed", "dotted", "dash-dot"], strict=False))
    fig.suptitle(f"Algorithms x samplers: colour = sampler, line style = algorithm ({legend}); thin black = target")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
