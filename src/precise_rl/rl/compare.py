"""Every sampler (and algorithm) trained on one recipe over seeds, and the summary: reward against epochs,
optimizer steps, wall-clock and model evaluations.

``compare_runs`` trains them one after another in this process; ``summarise`` reads each run's
seed-mean curve off its evaluations, for both protocols, and finds the time to the prior samplers'
best final reward. A run is labelled by its sampler, or ``algorithm/sampler`` when several algorithms
are compared. The method is said in ``precise-rl compare --help`` (:mod:`precise_rl.cli.compare`).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..algorithm_table import ALGORITHM_TABLE
from ..errors import UserError
from ..sde.samplers import SAMPLER_TABLE, prior_samplers, trainable_samplers
from .compare_report import markdown_table

__all__ = [
    "compare_runs",
    "parse_algorithms",
    "parse_samplers",
    "print_summary",
    "run_label",
    "sampler_of",
    "summarise",
    "time_to_target",
    "valid_pairs",
    "PROTOCOLS",
]

#: evaluation protocol -> the metric of its weighted held-out reward
PROTOCOLS = {"own": "eval_own_reward", "ode": "eval_ode_reward"}
#: what the wall-clock ratios use, said in every summary
RATIO_BASIS = (
    "epochs to target x the median training seconds per epoch over every sampler's epochs of the run's algorithm "
    "(robust wall-clock: the samplers' step costs are equal, so within an algorithm it differs from epochs by a "
    "common factor)"
)
#: most evaluations per run: one every 5% of the run's length reads a time to target to about 5%
MAX_EVALS = 20
#: fewest epochs between two evaluations. One evaluation (both protocols, 36 held-out prompts x 4
#: samples, the sample grid) costs about 1.7 epochs of training on the built-in task (0.078 s against
#: 0.045 s per epoch, one thread, measured from a default run's metrics.jsonl), so a short run evaluated
#: every epoch spent two thirds of its time evaluating (a 10-epoch comparison evaluated 11 times per
#: run); one evaluation per 5 epochs keeps it near a third, and a short run is read more coarsely.
MIN_EPOCHS_PER_EVAL = 5
#: seed pairs that must reach the target before a time saving is printed: one pair has no spread to
#: judge the saving by
MIN_SEED_PAIRS = 2


def parse_algorithms(text: str) -> list[str]:
    """``--algorithms``: names of the algorithm table, each once; UserError naming the unknown ones."""
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [a for a in names if a not in ALGORITHM_TABLE]
    if unknown:
        raise UserError(
            f"--algorithms: unknown algorithm {', '.join(map(repr, unknown))}; choose from {', '.join(ALGORITHM_TABLE)}"
        )
    if not names:
        raise UserError(f"--algorithms names no algorithm; choose from {', '.join(ALGORITHM_TABLE)}")
    return names


def valid_pairs(algorithms: list[str], samplers: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (algorithm, sampler) pairs that can train, and a note for each left out (GRPO cannot train on ``ode``)."""
    pairs, left = [], []
    for a in algorithms:
        for s in samplers:
            if ALGORITHM_TABLE[a].samplers == "stochastic" and not SAMPLER_TABLE[s].stochastic:
                left.append(f"{a}/{s} (algorithm {a} trains on per-step log-probs; {s} draws no noise)")
            else:
                pairs.append((a, s))
    if not pairs:
        raise UserError(f"no algorithm of {algorithms} can train with the samplers {samplers}: {'; '.join(left)}")
    return pairs, left


def run_label(algorithm: str, sampler: str, several: bool) -> str:
    """A run's name in summaries: the sampler, or ``algorithm/sampler`` when several algorithms are compared."""
    return f"{algorithm}/{sampler}" if several else sampler


def sampler_of(label: str) -> str:
    """The sampler of a run label (see :func:`run_label`; the study's ``sampler@eta`` labels too)."""
    return label.rsplit("/", 1)[-1].split("@", 1)[0]


def _run_of(label: str) -> str:
    """A run label without its algorithm: the sampler, with the study's ``@eta`` where it has one."""
    return label.rsplit("/", 1)[-1]


def _algorithm_of(label: str) -> str:
    """The algorithm of a run label ("" for a plain sampler label: one algorithm compared)."""
    return label.rsplit("/", 1)[0] if "/" in label else ""


def parse_samplers(text: str, any_sampler: bool = False) -> list[str]:
    """``--samplers``: known names, each once; UserError naming the unknown ones.

    ``any_sampler``: ``ode`` too (for algorithms that train on final samples).
    """
    samplers = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    known = list(SAMPLER_TABLE) if any_sampler else trainable_samplers()
    unknown = [s for s in samplers if s not in known]
    if unknown:
        raise UserError(f"--samplers: unknown sampler {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    if not samplers:
        raise UserError(f"--samplers names no sampler; choose from {', '.join(known)}")
    return samplers


def epoch_costs(records: list[dict[str, Any]]) -> list[float]:
    """Training seconds (rollout + reward + update) of each epoch of a run."""
    return [r["time_rollout_s"] + r["time_reward_s"] + r["time_train_s"] for r in records if "time_train_s" in r]


def _median(values: list[float]) -> float:
    # A median, not a mean or the cumulative clock: on a shared machine a few slow epochs (another job,
    # a page-cache miss) would otherwise decide which sampler looks faster.
    return float(np.median(values)) if values else math.nan


def time_to_target(xs: list[float] | np.ndarray, ys: list[float] | np.ndarray, target: float) -> float | None:
    """The first ``x`` at which the curve ``(xs, ys)`` reaches ``target``, linear between points; None if never.

    The first point (the evaluation before training) does not count as reaching it.
    """
    for i in range(1, len(xs)):
        if ys[i] >= target:
            y0 = ys[i - 1]
            if y0 >= target:  # only the untrained model can be there already: count the first evaluation
                return float(xs[i])
            return float(xs[i - 1] + (target - y0) / (ys[i] - y0) * (xs[i] - xs[i - 1]))
    return None


def _eval_points(records: list[dict[str, Any]], key: str) -> np.ndarray:
    """``(epoch, optimizer steps, measured train wall-clock, reward, model evaluations)`` of every evaluation."""
    steps, evals = 0.0, 0.0
    rows = []
    for r in records:
        steps = float(r.get("optimizer_steps", steps))
        evals = float(r.get("model_evals", evals))
        if key in r:
            rows.append((float(r["epoch"]), steps, float(r["train_elapsed_s"]), float(r[key]), evals))
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def summarise(runs: dict[str, list[list[dict[str, Any]]]], key: str = "eval_ode_reward") -> dict[str, Any]:
    """The comparison under one protocol (``key``) from each sampler's per-seed metrics records (pure)."""
    curves: dict[str, dict[str, Any]] = {}
    for sampler, seeds in runs.items():
        per_seed = [_eval_points(rec, key) for rec in seeds]
        n_eval = min(len(c) for c in per_seed)
        if n_eval == 0:
            raise UserError(f"the {sampler} runs have no '{key}' evaluations: set eval.every > 0")
        arr = np.stack([c[:n_eval] for c in per_seed])  # (seeds, evals, 5)
        cost = _median([c for rec in seeds for c in epoch_costs(rec)])
        finals = arr[:, -1, 3]
        ceilings = [r["eval_reward_ceiling"] for rec in seeds for r in rec if "eval_reward_ceiling" in r]
        curves[sampler] = {
            "epochs": arr[0, :, 0].astype(int).tolist(),
            "optimizer_steps_mean": arr[:, :, 1].mean(axis=0).tolist(),
            "wallclock_s_mean": arr[:, :, 2].mean(axis=0).tolist(),
            "model_evals_mean": arr[:, :, 4].mean(axis=0).tolist(),
            "epoch_cost_s": cost,
            "reward_mean": arr[:, :, 3].mean(axis=0).tolist(),
            "reward_std": arr[:, :, 3].std(axis=0).tolist(),
            "reward_per_seed": arr[:, :, 3].tolist(),
            "final_reward_mean": float(finals.mean()),
            "final_reward_std": float(finals.std()),
            "final_reward_per_seed": finals.tolist(),
            "initial_reward_mean": float(arr[:, 0, 3].mean()),
            "reward_ceiling": float(np.mean(ceilings)) if ceilings else None,
        }
    pooled_cost = _median([c for seeds in runs.values() for rec in seeds for c in epoch_costs(rec)])
    # Samplers of one algorithm cost the same per epoch, algorithms do not: the robust clock pools the epochs
    # of each algorithm's runs (of every run when one algorithm is compared, as before).
    algo_cost = {
        a: _median(
            [c for label, seeds in runs.items() if _algorithm_of(label) == a for r in seeds for c in epoch_costs(r)]
        )
        for a in {_algorithm_of(label) for label in runs}
    }
    # the prior samplers' runs (of GRPO, when several algorithms are compared and GRPO is one of them)
    priors = [s for s in curves if sampler_of(s) in prior_samplers()]
    if any(s.startswith("grpo/") for s in priors):
        priors = [s for s in priors if s.startswith("grpo/")]
    target = max((curves[s]["final_reward_mean"] for s in priors), default=None)
    best_prior = max(priors, key=lambda s: curves[s]["final_reward_mean"]) if priors else None
    for name, c in curves.items():
        c.update(
            epochs_to_target=None,
            optimizer_steps_to_target=None,
            wallclock_to_target_s=None,
            measured_wallclock_to_target_s=None,
            model_evals_to_target=None,
            epochs_to_target_per_seed=[None] * len(c["final_reward_per_seed"]),
        )
        if target is None:
            continue
        ep = time_to_target(c["epochs"], c["reward_mean"], target)
        if ep is not None:
            c["epochs_to_target"] = ep
            c["optimizer_steps_to_target"] = float(np.interp(ep, c["epochs"], c["optimizer_steps_mean"]))
            c["measured_wallclock_to_target_s"] = float(np.interp(ep, c["epochs"], c["wallclock_s_mean"]))
            c["wallclock_to_target_s"] = ep * algo_cost[_algorithm_of(name)]
            c["model_evals_to_target"] = float(np.interp(ep, c["epochs"], c["model_evals_mean"]))
        c["epochs_to_target_per_seed"] = [time_to_target(c["epochs"], r, target) for r in c["reward_per_seed"]]
        reached = [e for e in c["epochs_to_target_per_seed"] if e is not None]
        c["epochs_to_target_seed_mean"], c["epochs_to_target_seed_std"] = _mean_std(reached)
        c["seeds_reaching_target"] = len(reached)
    result: dict[str, Any] = {
        "metric": key,
        "target": target,
        "best_prior": best_prior,
        "ratio_basis": RATIO_BASIS,
        "epoch_cost_s": pooled_cost,
        "samplers": curves,
    }
    ceilings = [c["reward_ceiling"] for c in curves.values() if c["reward_ceiling"] is not None]
    if ceilings and target is not None:
        ceiling = float(np.mean(ceilings))
        start = float(np.mean([c["initial_reward_mean"] for c in curves.values()]))
        # The share of the way from the untrained model to the reward's maximum that the target leaves open.
        result["reward_ceiling"] = ceiling
        result["headroom"] = (ceiling - target) / (ceiling - start) if ceiling > start else 0.0
    result.update(_ratios(curves, priors, best_prior))
    if any("/" in label for label in curves):
        result["algorithms"] = _per_algorithm(curves)
    return result


def _per_algorithm(curves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Across algorithms: each algorithm's samplers ranked by final reward, and who reaches the target soonest."""
    out: dict[str, Any] = {"ranking": {}}
    for label in curves:
        algorithm = _algorithm_of(label)
        out["ranking"].setdefault(algorithm, [])
    for algorithm, ranked in out["ranking"].items():
        mine = [label for label in curves if _algorithm_of(label) == algorithm]
        ranked.extend(_run_of(s) for s in sorted(mine, key=lambda s: -curves[s]["final_reward_mean"]))
    for axis in ("wallclock_to_target_s", "model_evals_to_target", "epochs_to_target"):
        reached = {label: c[axis] for label, c in curves.items() if c.get(axis) is not None}
        out[f"soonest_by_{axis}"] = min(reached, key=reached.get) if reached else None
    out["best_final"] = max(curves, key=lambda s: curves[s]["final_reward_mean"])
    return out


def _ratios(curves: dict[str, dict[str, Any]], priors: list[str], best_prior: str | None) -> dict[str, Any]:
    """Precise's time to target over the best prior sampler's (and the fastest one's), with a per-seed spread."""
    out: dict[str, Any] = {
        "precise_epoch_ratio_vs_best_prior": None,
        "precise_time_ratio_vs_best_prior": None,
        "precise_measured_time_ratio_vs_best_prior": None,
        "precise_time_saving_pct_vs_best_prior": None,
        "precise_time_ratio_vs_fastest_prior": None,
        "precise_epoch_ratio_per_seed": [],
        "saving_withheld": None,
    }
    if "precise" not in curves or best_prior is None:
        return out
    p, b = curves["precise"], curves[best_prior]
    if p["epochs_to_target"] and b["epochs_to_target"]:
        out["precise_epoch_ratio_vs_best_prior"] = p["epochs_to_target"] / b["epochs_to_target"]
        out["precise_time_ratio_vs_best_prior"] = p["wallclock_to_target_s"] / b["wallclock_to_target_s"]
        out["precise_measured_time_ratio_vs_best_prior"] = (
            p["measured_wallclock_to_target_s"] / b["measured_wallclock_to_target_s"]
        )
        out["precise_time_saving_pct_vs_best_prior"] = (1 - out["precise_time_ratio_vs_best_prior"]) * 100
    reached = [curves[s]["wallclock_to_target_s"] for s in priors if curves[s]["wallclock_to_target_s"]]
    if p["wallclock_to_target_s"] and reached:
        out["precise_time_ratio_vs_fastest_prior"] = p["wallclock_to_target_s"] / min(reached)
    # Seed k of precise against seed k of the best prior (the same seed: the same prompts and noise).
    pairs = zip(p["epochs_to_target_per_seed"], b["epochs_to_target_per_seed"], strict=False)
    out["precise_epoch_ratio_per_seed"] = [pe / be if pe and be else None for pe, be in pairs]
    done = [r for r in out["precise_epoch_ratio_per_seed"] if r is not None]
    out["precise_epoch_ratio_seed_mean"], out["precise_epoch_ratio_seed_std"] = _mean_std(done)
    out["saving_withheld"] = _saving_withheld(out, len(p["final_reward_per_seed"]), len(done))
    return out


def _saving_withheld(ratios: dict[str, Any], seeds: int, pairs: int) -> str | None:
    """Why the time saving should not be stated (None: it may be).

    The saving is read off the seed-mean curves; it says something only where seeds show how far
    those curves move by chance and where both samplers reach the target seed by seed, not only on
    average (a mean curve can cross a target that no single seed of it reaches at the same time).
    """
    if ratios["precise_time_ratio_vs_best_prior"] is None:
        return "precise or the best prior sampler does not reach the target"
    if seeds < MIN_SEED_PAIRS:
        return "one seed has no spread to judge a saving by; run --seeds 3 or more"
    if pairs < MIN_SEED_PAIRS:
        return (
            f"only {pairs} of {seeds} seed pairs reach the target with both samplers; "
            f"a saving needs at least {MIN_SEED_PAIRS}"
        )
    return None


def ema_note(runs: dict[str, list[list[dict[str, Any]]]], every: int, mode: str) -> str | None:
    """What the EMA's rhythm does to the curves, where evaluations fall between its updates (else None).

    Evaluations score the EMA weights, which change once every ``every`` optimizer steps: an
    evaluation with no update since the one before scores the same weights again, and the curve
    through both is flat before it rises (step-shaped curves, which are the EMA's, not the run's).
    """
    # updates made within the first n optimizer steps (see ema.EMA.kept)
    made = (lambda n: n // every) if mode == "interval" else (lambda n: (n + 1) // every)
    repeats, evaluations, per_epoch = 0, 0, []
    for seeds in runs.values():
        for records in seeds:
            # every protocol is scored at the same evaluations: the first one the records hold
            points = next((p for key in PROTOCOLS.values() if len(p := _eval_points(records, key))), np.zeros((0, 5)))
            steps = [int(round(n)) for n in points[:, 1]]
            evaluations += max(0, len(steps) - 1)
            repeats += sum(made(b) == made(a) for a, b in zip(steps[:-1], steps[1:], strict=True))
            if len(points) and points[-1, 0] > 0:
                per_epoch.append(points[-1, 1] / points[-1, 0])
    if not repeats:
        return None
    period = every / float(np.median(per_epoch)) if per_epoch else math.nan
    return (
        f"evaluations score the EMA weights, which change once every {every} optimizer steps (every {period:.3g} "
        f"epochs here): {repeats} of {evaluations} evaluations came with no EMA update since the one before and "
        "score the same weights again, so the curves rise in steps"
    )


def plot_comparison(summaries: dict[str, dict[str, Any]], path: Path, title: str = "", note: str | None = None) -> None:
    """One row per protocol; reward against epochs, optimizer steps and robust training wall-clock.

    ``note`` (e.g. :func:`ema_note`) is written under the plots.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summaries)
    fig, axes = plt.subplots(len(rows), 4, figsize=(20, 4 * len(rows)), squeeze=False)
    for r, protocol in enumerate(rows):
        summary = summaries[protocol]
        for name, c in summary["samplers"].items():
            ep = np.array(c["epochs"], dtype=float)
            evals = np.array(c.get("model_evals_mean") or [math.nan] * len(ep))
            xs = [ep, np.array(c["optimizer_steps_mean"]), np.array(c["wallclock_s_mean"]), evals]
            mu, sd = np.array(c["reward_mean"]), np.array(c["reward_std"])
            lw = 2.2 if sampler_of(name) == "precise" else 1.2
            color = None
            for ax, x in zip(axes[r], xs, strict=True):
                (line,) = ax.plot(x, mu, marker="o", ms=2.5, label=name, lw=lw, color=color)
                color = line.get_color()
                ax.fill_between(x, mu - sd, mu + sd, color=color, alpha=0.12)
        for ax, xl in zip(
            axes[r],
            [
                "epoch",
                "optimizer steps",
                "training wall-clock (s, measured, mean over seeds)",
                "model evaluations (rollout forwards + training forwards and backwards)",
            ],
            strict=True,
        ):
            if summary["target"] is not None:
                ax.axhline(summary["target"], color="k", ls="--", lw=0.8, label=f"target ({summary['best_prior']})")
            ax.set_xlabel(xl)
            ax.set_ylabel(f"held-out reward ({protocol})")
            ax.grid(alpha=0.3)
        axes[r][0].set_title(f"{protocol}: {'own stochastic rollouts' if protocol == 'own' else 'ODE'}, EMA")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if note:
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.5 / fig.get_figheight())
        fig.text(0.01, 0.01, f"Note: {note}", fontsize=9, ha="left", va="bottom", wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_every_for(epochs: int, every: int) -> int:
    """Epochs between evaluations for a run of ``epochs``: scaled to its length.

    One every 5% of the run (:data:`MAX_EVALS` evaluations), but no more often than every
    :data:`MIN_EPOCHS_PER_EVAL` epochs (evaluations cost several epochs each), and once at the end of
    a run shorter than that. A config's ``eval.every`` asking for fewer evaluations is raised to this;
    one asking for more (``eval.every=1``) is kept.
    """
    scaled = max(epochs // MAX_EVALS, min(MIN_EPOCHS_PER_EVAL, epochs), 1)
    return min(every, scaled) if every else scaled


def compare_runs(
    items: list[str],
    seeds: int,
    samplers: list[str],
    output: Path,
    overwrite: bool = False,
    algorithms: list[str] | None = None,
) -> dict[str, Any]:
    """Train every (algorithm, sampler, seed) and return the summary of both protocols (also written to ``output``).

    ``algorithms``: None = the config's algorithm alone (runs labelled by sampler); several: every pair
    that can train (:func:`valid_pairs`), labelled ``algorithm/sampler``, each algorithm at its default
    knobs unless it is the config's. The output directory is locked for the whole comparison; a run
    directory left by an earlier comparison is refused unless ``overwrite`` (so finished runs are never
    lost by mistake).
    """
    from tqdm.auto import tqdm

    from ..config import AlgorithmConfig, validate
    from .logging import read_metrics
    from .preflight import check_config
    from .run_config import resolve_config, split_config_and_overrides
    from .rundir import check_foreign_files, check_fresh_run_dir, command_line, lock_run_dir, prepare_run_dir
    from .trainer import Trainer

    base = resolve_config(items, None)
    config_path, _ = split_config_and_overrides(items)
    keep = [Path(config_path)] if config_path else []  # the experiment file is never among what a run replaces
    base.eval.every = eval_every_for(base.train.epochs, base.eval.every)
    base.eval.samplers = ["ode", "own"]
    several = algorithms is not None and len(algorithms) > 1
    pairs, left_out = valid_pairs(algorithms or [base.algorithm.name], samplers)
    for note in left_out:
        print(f"compare: left out {note}")
    runs: dict[str, list[list[dict[str, Any]]]] = {run_label(a, s, several): [] for a, s in pairs}
    # Seed-major order: a machine that slows down or speeds up during the run hits every sampler alike.
    jobs = []
    for k in range(seeds):
        for algorithm, sampler in pairs:
            cfg = copy.deepcopy(base)
            if algorithm != base.algorithm.name:
                cfg.algorithm = AlgorithmConfig(algorithm, ALGORITHM_TABLE[algorithm].knobs())
            cfg.sampler.name = sampler
            cfg.sampler.eta = None  # each sampler at its reference eta
            cfg.seed = base.seed + k
            cfg.logging.progress = False
            validate(cfg)  # e.g. a group size the algorithm cannot take
            check_config(cfg, warn=not jobs)  # every run's config before any training; warnings once
            label = run_label(algorithm, sampler, several)
            jobs.append((label, cfg, output / "runs" / f"{label.replace('/', '-')}-seed{cfg.seed}"))
    with lock_run_dir(output, command_line()):
        if not overwrite:  # refuse before the first run, not after the first ones were trained
            for _, _, run_dir in jobs:
                check_fresh_run_dir(run_dir, "--overwrite", resume_hint=False)
                check_foreign_files(run_dir, "--overwrite")
        for label, cfg, run_dir in tqdm(jobs, desc="compare", dynamic_ncols=True):
            prepare_run_dir(run_dir, resuming=False, overwrite=overwrite, keep=keep)
            Trainer(cfg, run_dir).run()
            runs[label].append(read_metrics(run_dir / "metrics.jsonl"))
    summary = {protocol: summarise(runs, key) for protocol, key in PROTOCOLS.items()}
    ema = base.train.ema
    note = ema_note(runs, ema.every, ema.mode) if ema.enabled else None
    result = {
        "protocols": summary,
        "seeds": seeds,
        "config": items,
        "eval_every": base.eval.every,
        "algorithms": algorithms or [base.algorithm.name],
        "left_out": left_out,
        "ema_note": note,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "compare.json").write_text(json.dumps(result, indent=1))
    (output / "compare.md").write_text("\n".join(markdown_table(result)) + "\n")
    plot_comparison(summary, output / "compare.png", note=note)
    return result


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pm(mean: float | None, std: float | None, n: int, spec: str = ".4f") -> str:
    """``mean ± std``, or the mean alone where one value gives no spread."""
    if mean is None:
        return "-"
    return format(mean, spec) if n < 2 or std is None else f"{mean:{spec}} ± {std:{spec}}"


def print_summary(summary: dict[str, Any], protocol: str, seeds: int) -> None:
    """The table of one protocol, and precise's ratio (or why there is none)."""
    what = "own stochastic rollouts at each sampler's eta" if protocol == "own" else "deterministic ODE"
    print(f"\n== protocol {protocol} ({what}; held-out prompts, EMA weights)")
    print(f"target (best final prior reward, {summary['best_prior']}): {_fmt(summary['target'])}")
    if summary.get("headroom") is not None:
        print(
            f"reward ceiling {summary['reward_ceiling']:.4f}: the target leaves {summary['headroom']:.0%} of the way "
            "from the untrained model to it open"
        )
    head = f"{'run':>16} {'final reward':>18} {'epochs to target':>22} {'steps to target':>16} "
    print(head + f"{'wall-clock to target':>21} {'model evals to target':>22} {'train s/epoch':>14}")
    for name, c in summary["samplers"].items():
        final = _pm(c["final_reward_mean"], c["final_reward_std"], seeds)
        reached = c.get("seeds_reaching_target", 0)
        per_seed = _pm(c.get("epochs_to_target_seed_mean"), c.get("epochs_to_target_seed_std"), reached, ".1f")
        epochs = f"{_fmt(c['epochs_to_target'], '.1f')} ({per_seed}, {reached}/{seeds})"
        print(
            f"{name:>16} {final:>18} {epochs:>22} {_fmt(c['optimizer_steps_to_target'], '.1f'):>16} "
            f"{_fmt(c['wallclock_to_target_s'], '.1f') + ' s':>21} {_fmt(c.get('model_evals_to_target'), '.3g'):>22} "
            f"{c['epoch_cost_s']:>14.3f}"
        )
    ratio = summary.get("precise_time_ratio_vs_best_prior")
    if ratio is not None:
        pairs = [r for r in summary.get("precise_epoch_ratio_per_seed", []) if r is not None]
        spread = f"{', '.join(f'{r:.2f}' for r in pairs) or 'none'} ({len(pairs)} of {seeds} seed pairs reach it)"
        withheld = summary.get("saving_withheld")
        saved = "" if withheld else f"{summary['precise_time_saving_pct_vs_best_prior']:+.1f}% saved; "
        print(
            f"precise reaches the target in {summary['precise_epoch_ratio_vs_best_prior']:.2f}x the epochs and "
            f"{ratio:.2f}x the robust wall-clock of {summary['best_prior']} "
            f"({saved}measured wall-clock "
            f"{summary['precise_measured_time_ratio_vs_best_prior']:.2f}x; per seed pair {spread})"
        )
        if withheld:
            print(f"no time saving is stated: {withheld}")
    elif "precise" in summary["samplers"] and summary["target"] is not None:
        p = summary["samplers"]["precise"]
        if p["epochs_to_target"] is None:
            print(
                f"precise does not reach the target within {p['epochs'][-1]} epochs "
                f"(final {p['final_reward_mean']:.4f} against {summary['target']:.4f})"
            )
