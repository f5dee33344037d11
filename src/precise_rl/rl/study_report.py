"""The study's Markdown report: per cell and protocol the comparison, per cell and run the exact numbers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..sde.samplers import prior_samplers
from .compare import PROTOCOLS
from .study_fidelity import BROAD_FIDELITY_STD, FIDELITY_STD
from .study_runs import MATCHED_CONTROL

__all__ = ["format_markdown", "map_lines", "ratio_text", "split_lines", "SATURATED_HEADROOM"]

#: a cell whose target leaves less of the way to the reward's ceiling open than this is "saturated"
SATURATED_HEADROOM = 0.1


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


def _offset_lines(result: dict[str, Any]) -> list[str]:
    """Per cell and run: the eta it ran at, its effective precise eta, the two fidelity numbers, and the
    untrained model's reward under each protocol with the gain over it."""
    head = ["grid", "steps", "run", "eta", "effective eta: median (min-max)", "std ratio sharp", "std ratio broad"]
    for p in PROTOCOLS:
        head += [f"untrained `{p}`", f"gain `{p}`"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for cell in result["cells"]:
        fid = cell.get("fidelity", {})
        trained = {label.rsplit("/", 1)[-1] for label in result["samplers"]}
        reference = [k for k in fid if "/" not in k and "@" not in k and k not in trained]
        for label in [*result["samplers"], *reference]:
            if label not in fid:
                continue
            f, e = fid[label], fid[label]["effective_eta"]
            eff = "-" if e["median"] is None else f"{e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f})"
            if e["match"] == "variance":
                eff += ", variance only"
            name = f"`{label}`" + (" (not trained)" if label in reference else "")
            row = [" = ".join(cell["grids"]), str(cell["steps"]), name, f"{f['eta']:.4g}", eff]
            row += [_f(f["std_ratio_sharp"], ".3g"), _f(f["std_ratio_broad"], ".3g")]
            for p in PROTOCOLS:
                c = cell["protocols"][p]["samplers"].get(label)
                if c is None:  # a reference row (the ODE, a sampler not trained here): no run of its own
                    row += ["-", "-"]
                    continue
                row.append(_f(c["initial_reward_mean"]))
                row.append(f"{c['final_reward_mean'] - c['initial_reward_mean']:+.4f}")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _paired(summary: dict[str, Any], a: str, b: str, key: str) -> tuple[float, float]:
    """Mean and std over seeds of run ``a``'s ``key`` (a per-seed list) minus run ``b``'s, seed k against seed k."""
    diff = np.asarray(summary["samplers"][a][key], dtype=float) - np.asarray(summary["samplers"][b][key], dtype=float)
    return float(diff.mean()), float(diff.std())


def split_lines(result: dict[str, Any]) -> list[str]:
    """Precise against cps, split by the eta-matched control: ``precise - cps = (precise - precise@cps)``, the
    effect of the exploration level, ``+ (precise@cps - cps)``, the effect of consistency at cps's exploration.

    Per cell and protocol, on the final reward and on the untrained reward, each the mean ± std over seed pairs.
    Empty unless the study ran ``precise``, ``cps`` and the control under one algorithm.
    """
    runs = ("precise", MATCHED_CONTROL, "cps")
    if not all(r in result["samplers"] for r in runs):
        return []
    head = ["grid", "steps", "protocol", "final: precise - cps", f"= precise - {MATCHED_CONTROL} (exploration)"]
    head += [f"+ {MATCHED_CONTROL} - cps (consistency)", f"untrained: {MATCHED_CONTROL} - cps"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for cell in result["cells"]:
        for protocol, summary in cell["protocols"].items():
            row = [" = ".join(cell["grids"]), str(cell["steps"]), protocol]
            for a, b in (("precise", "cps"), ("precise", MATCHED_CONTROL), (MATCHED_CONTROL, "cps")):
                mean, std = _paired(summary, a, b, "final_reward_per_seed")
                row.append(f"{mean:+.4f} ± {std:.4f}")
            start = [summary["samplers"][r]["reward_per_seed"] for r in (MATCHED_CONTROL, "cps")]
            diff = [x[0] - y[0] for x, y in zip(*start, strict=True)]
            row.append(f"{sum(diff) / len(diff):+.4f}")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _short_ratio(summary: dict[str, Any]) -> str:
    """Precise's epoch ratio on the seed-mean curves with the seed pairs' in brackets, or how far it ends short."""
    ratio = summary.get("precise_epoch_ratio_vs_best_prior")
    if ratio is None:
        if summary["target"] is None:
            return "-"
        return f"not reached ({summary['samplers']['precise']['final_reward_mean'] - summary['target']:+.3f})"
    done = [r for r in summary.get("precise_epoch_ratio_per_seed", []) if r is not None]
    return f"{ratio:.2f} ({', '.join(f'{r:.2f}' for r in done) or 'none'})"


def map_lines(result: dict[str, Any]) -> list[str]:
    """One row per cell, grid by grid: precise's ratio to the best prior under each protocol, precise - cps and
    its split into exploration and consistency (``own``), cps's effective and matched eta, and the broad-data
    std ratio of precise, cps and the ODE. The summary the site shows; empty unless the study ran ``precise``,
    ``cps`` and the eta-matched control."""
    if not all(r in result["samplers"] for r in ("precise", MATCHED_CONTROL, "cps")):
        return []
    head = ["grid", "steps", "precise epochs / best prior's, `own` (seed pairs)", "`ode` (seed pairs)"]
    head += ["precise - cps, own / ode", "of which exploration, own", "of which consistency, own"]
    head += ["cps's eta: effective (median) / matched", "broad-data std ratio, precise / cps / ODE"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    order = {g: k for k, g in enumerate(result["grids"])}
    for cell in sorted(result["cells"], key=lambda c: (order.get(c["grid"], len(order)), c["steps"])):
        own, ode = cell["protocols"]["own"], cell["protocols"]["ode"]
        fid = cell["fidelity"]
        diffs = [_paired(s, "precise", "cps", "final_reward_per_seed")[0] for s in (own, ode)]
        explore = _paired(own, "precise", MATCHED_CONTROL, "final_reward_per_seed")
        consist = _paired(own, MATCHED_CONTROL, "cps", "final_reward_per_seed")
        eff = fid["cps"]["effective_eta"]["median"]
        broad = [_f(fid.get(r, {}).get("std_ratio_broad"), ".3f") for r in ("precise", "cps", "ode")]
        row = [" = ".join(cell["grids"]), str(cell["steps"]), _short_ratio(own), _short_ratio(ode)]
        spread = result.get("seeds") != 1  # one seed has no spread to show
        split = [f"{m:+.3f}" + (f" ± {sd:.3f}" if spread else "") for m, sd in (explore, consist)]
        row += [f"{diffs[0]:+.3f} / {diffs[1]:+.3f}", *split, f"{_f(eff, '.2f')} / {fid[MATCHED_CONTROL]['eta']:.2f}"]
        row.append(" / ".join(broad))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def format_markdown(result: dict[str, Any]) -> str:
    samplers, seeds = result["samplers"], result["seeds"]
    head = ["grid", "steps", "protocol", "best prior", "target", "headroom", "precise epochs / best prior's"]
    head += [f"final `{s}`" for s in samplers]
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
            lines.append("| " + " | ".join(row) + " |")
    t = result["timings"]
    notes = [
        f"Sampler study: {len(samplers)} runs ({', '.join(f'`{s}`' for s in samplers)}) x {seeds} seeds x steps "
        f"{', '.join(map(str, result['steps']))} "
        f"x grids {', '.join(result['grids'])}; {result['epochs']} epochs per run, evaluated every "
        f"{result['eval_every']} epochs (up to {result['eval']['max_prompts']} held-out prompts x "
        f"{result['eval']['samples_per_prompt']} samples, EMA weights).",
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
        "- runs: `NAME` trains at the sampler's reference eta, `NAME@ETA` at that eta, and "
        f"`{MATCHED_CONTROL}` (the eta-matched control) is precise at the one eta that keeps, over the cell's "
        "grid, the same share of the noise estimate as cps at its reference eta (the product of the kept shares "
        "over the steps where cps has an effective eta): same exploration, but consistent. Its eta is in the "
        "second table, per cell.",
        "- effective eta: each step of a sampler written as a precise step, the eta that precise would need to "
        "inject the same fresh noise on that step (median and range over the steps that have one); exact for "
        "cps and the precise family (the same transition), a match of the fresh-noise variance only for the "
        "Euler-Maruyama samplers (`variance only`), whose means keep a different share of the noise.",
        f"- std ratio: the fidelity lab's output std / target std on Gaussian data, exact, on the cell's grid and "
        f"step count at the run's eta: sharp data (std {FIDELITY_STD}: 1 is exact, above 1 is excess noise) and "
        f"broad data (std {BROAD_FIDELITY_STD}: below 1 is contraction, where cps's bias shows at 20-30 steps).",
        "- untrained: the held-out reward of the model before any training (the evaluation at epoch 0), seed "
        "mean, under each protocol: under `own` each sampler's own rollouts start from a different offset; "
        "gain: final minus untrained. A lead in final reward that is only a lead in the untrained offset is "
        "no faster learning. Rows marked (not trained): the table's other samplers at their reference eta, for "
        "their exact numbers alone.",
        f"- precise against cps, split (where the study ran precise, cps and `{MATCHED_CONTROL}`): the final "
        f"reward's difference precise - cps is (precise - `{MATCHED_CONTROL}`), the effect of the exploration level "
        f"at precise's consistency, plus (`{MATCHED_CONTROL}` - cps), the effect of consistency at cps's "
        "exploration; each the mean ± std over seed pairs (seed k against seed k).",
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
    split = split_lines(result)
    if split:
        lines += ["", *split]
    lines += ["", *_offset_lines(result)]
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
