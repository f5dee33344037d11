"""Train one recipe with every sampler side by side: ``precise-rl compare [CONFIG] [key=value ...] --seeds N``.

Each sampler runs at its reference eta over N seeds, one after another in this process, on the
same prompts, rewards and evaluation noise. Writes ``compare.json`` and ``compare.png`` (held-out
reward against training wall-clock, one curve per sampler). The in-domain reward is the ODE
evaluation reward (EMA weights, fixed noise); the target is the best final reward among the
prior samplers (flow_grpo, dance_grpo, cps); wall-clock excludes evaluation time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

__all__ = ["add_arguments", "run", "compare_runs", "summarise"]

ALL_SAMPLERS = ["precise", "flow_grpo", "dance_grpo", "cps", "dance_precise"]
PRIOR_SAMPLERS = ["flow_grpo", "dance_grpo", "cps"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="*", metavar="CONFIG | key=value", help="an optional YAML file, then overrides")
    p.add_argument("--seeds", type=int, default=2, help="seeds per sampler (default 2)")
    p.add_argument(
        "--samplers",
        default=",".join(ALL_SAMPLERS),
        help=f"comma-separated samplers (default: {','.join(ALL_SAMPLERS)})",
    )
    p.add_argument("--output", "-o", type=Path, default=Path("runs/compare"), help="directory for runs and results")


def _eval_curve(records: list[dict[str, Any]], key: str) -> list[tuple[int, float, float]]:
    """``(epoch, train wall-clock, reward)`` of every evaluation in a run."""
    return [(int(r["epoch"]), float(r["train_elapsed_s"]), float(r[key])) for r in records if key in r]


def summarise(runs: dict[str, list[list[dict[str, Any]]]], key: str = "eval_ode_reward") -> dict[str, Any]:
    """The comparison from each sampler's per-seed metrics records (pure: no training here)."""
    curves: dict[str, dict[str, Any]] = {}
    for sampler, seeds in runs.items():
        per_seed = [_eval_curve(rec, key) for rec in seeds]
        n_eval = min(len(c) for c in per_seed)
        if n_eval == 0:
            raise UserError(f"the {sampler} runs have no '{key}' evaluations: set eval.every > 0")
        arr = np.array([[pt for pt in c[:n_eval]] for c in per_seed], dtype=np.float64)  # (seeds, evals, 3)
        finals = arr[:, -1, 2]
        curves[sampler] = {
            "epochs": arr[0, :, 0].astype(int).tolist(),
            "wallclock_s_mean": arr[:, :, 1].mean(axis=0).tolist(),
            "reward_mean": arr[:, :, 2].mean(axis=0).tolist(),
            "reward_std": arr[:, :, 2].std(axis=0).tolist(),
            "final_reward_mean": float(finals.mean()),
            "final_reward_std": float(finals.std()),
            "final_reward_per_seed": finals.tolist(),
            "initial_reward_mean": float(arr[:, 0, 2].mean()),
        }
    priors = [s for s in PRIOR_SAMPLERS if s in curves]
    target = max((curves[s]["final_reward_mean"] for s in priors), default=None)
    best_prior = max(priors, key=lambda s: curves[s]["final_reward_mean"]) if priors else None
    for c in curves.values():
        c["epochs_to_target"] = None
        c["wallclock_to_target_s"] = None
        if target is None:
            continue
        # The seed-averaged curve reaching the target for the first time.
        for ep, wc, r in zip(c["epochs"], c["wallclock_s_mean"], c["reward_mean"], strict=True):
            if ep > 0 and r >= target:
                c["epochs_to_target"] = ep
                c["wallclock_to_target_s"] = wc
                break
    result: dict[str, Any] = {"metric": key, "target": target, "best_prior": best_prior, "samplers": curves}
    if "precise" in curves and best_prior is not None:
        p = curves["precise"]["wallclock_to_target_s"]
        b = curves[best_prior]["wallclock_to_target_s"]
        reached = [curves[s]["wallclock_to_target_s"] for s in priors if curves[s]["wallclock_to_target_s"]]
        result["precise_time_ratio_vs_best_prior"] = p / b if p and b else None
        result["precise_time_ratio_vs_fastest_prior"] = p / min(reached) if p and reached else None
        result["precise_time_saving_pct_vs_best_prior"] = (1 - p / b) * 100 if p and b else None
    return result


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, c in summary["samplers"].items():
        wc = np.array(c["wallclock_s_mean"])
        mu = np.array(c["reward_mean"])
        sd = np.array(c["reward_std"])
        ep = np.array(c["epochs"])
        (line,) = axes[0].plot(wc, mu, marker="o", ms=3, label=name, lw=2 if name == "precise" else 1.2)
        axes[0].fill_between(wc, mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
        axes[1].plot(ep, mu, marker="o", ms=3, label=name, color=line.get_color(), lw=2 if name == "precise" else 1.2)
    for ax, xl in zip(axes, ["training wall-clock (s, mean over seeds)", "epoch"], strict=True):
        if summary["target"] is not None:
            ax.axhline(summary["target"], color="k", ls="--", lw=0.8, label="best prior final")
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out reward (ODE, EMA)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("reward vs wall-clock")
    axes[1].set_title("reward vs epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(items: list[str], seeds: int, samplers: list[str], output: Path) -> dict[str, Any]:
    """Train every (sampler, seed) and return the summary (also written to ``output``)."""
    from tqdm.auto import tqdm

    from .logging import read_metrics
    from .train_cli import resolve_config
    from .trainer import GRPOTrainer

    base = resolve_config(items, None)
    if base.eval.every == 0:
        raise UserError("compare needs evaluations: set eval.every > 0")
    if "ode" not in base.eval.samplers:
        base.eval.samplers = ["ode", *base.eval.samplers]
    runs: dict[str, list[list[dict[str, Any]]]] = {s: [] for s in samplers}
    # Seed-major order: a machine that slows down or speeds up during the run hits every sampler alike.
    jobs = [(s, k) for k in range(seeds) for s in samplers]
    for sampler, k in tqdm(jobs, desc="compare", dynamic_ncols=True):
        cfg = copy.deepcopy(base)
        cfg.sampler.name = sampler
        cfg.sampler.eta = None  # each sampler at its reference eta
        cfg.seed = base.seed + k
        cfg.logging.progress = False
        run_dir = output / "runs" / f"{sampler}-seed{cfg.seed}"
        GRPOTrainer(cfg, run_dir).run()
        runs[sampler].append(read_metrics(run_dir / "metrics.jsonl"))
    summary = summarise(runs)
    summary["seeds"] = seeds
    summary["config"] = items
    output.mkdir(parents=True, exist_ok=True)
    (output / "compare.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, output / "compare.png")
    return summary


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def run(args: argparse.Namespace) -> int:
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in ALL_SAMPLERS]
    if unknown or not samplers:
        raise UserError(f"--samplers must name some of {', '.join(ALL_SAMPLERS)}; got {args.samplers!r}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be a positive integer, got {args.seeds}")
    summary = compare_runs(args.items, args.seeds, samplers, args.output)
    print(f"target (best final prior reward, {summary['best_prior']}): {_fmt(summary['target'])}")
    print(
        f"{'sampler':>14} {'final reward':>18} {'epochs to target':>17} {'wall-clock to target':>21} "
        f"{'train s/epoch':>14}"
    )
    for name, c in summary["samplers"].items():
        final = f"{c['final_reward_mean']:.4f} ± {c['final_reward_std']:.4f}"
        per_epoch = c["wallclock_s_mean"][-1] / c["epochs"][-1] if c["epochs"][-1] else float("nan")
        print(
            f"{name:>14} {final:>18} {_fmt(c['epochs_to_target'], 'd'):>17} "
            f"{_fmt(c['wallclock_to_target_s'], '.1f') + ' s':>21} {per_epoch:>14.3f}"
        )
    ratio = summary.get("precise_time_ratio_vs_best_prior")
    if ratio is not None:
        print(
            f"precise reaches the target in {ratio:.2f}x the wall-clock of {summary['best_prior']} "
            f"({summary['precise_time_saving_pct_vs_best_prior']:+.1f}% saved)"
        )
    elif "precise" in summary["samplers"] and summary["target"] is not None:
        p = summary["samplers"]["precise"]
        print(
            f"precise does not reach the target within {p['epochs'][-1]} epochs "
            f"(final {p['final_reward_mean']:.4f} against {summary['target']:.4f})"
        )
    print(f"wrote {args.output / 'compare.json'} and {args.output / 'compare.png'}")
    return 0
