"""The fidelity report: exact Gaussian numbers, the eta sweep, and Monte Carlo on a 2-D mixture.

:func:`run_lab` computes everything into one JSON-ready dict; :func:`format_tables` turns it
into the terminal tables; :func:`write_report` writes ``fidelity.json`` and the PNG plots.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..sde import DEFAULT_ETA, SAMPLER_TABLE, effective_eta, kernel, matched_precise_eta, rollout, time_grid
from .gaussian import GaussianTarget, propagate_gaussian
from .lab import LabConfig, sweep_eta_max
from .mixture import (
    GaussianMixture,
    default_mixture,
    mode_frequencies,
    mode_w2,
    residual_median,
    residual_noise,
    wasserstein2,
    weight_error,
)

__all__ = ["sweep_eta_max", "LabConfig", "eta_values", "grid_label", "run_lab", "format_tables", "write_report"]


def grid_label(grid: str, shift: float) -> str:
    """``uniform`` or ``shift-3`` (the shift in the label)."""
    return "uniform" if grid == "uniform" else f"shift-{shift:g}"


def eta_values(sampler: str, points: int, eta_max: Mapping[str, float]) -> list[float]:
    """The sweep of ``sampler``: ``points`` values evenly from 0 to its maximum, plus its default eta."""
    if not SAMPLER_TABLE[sampler].stochastic:
        return [0.0]
    values = set(np.round(np.linspace(0.0, eta_max[sampler], points), 10).tolist())
    values.add(DEFAULT_ETA[sampler])
    return sorted(float(v) for v in values)


def _finite(x: float) -> float | None:
    """JSON has no inf/NaN: store them as null."""
    return float(x) if math.isfinite(x) else None


def _gaussian_section(cfg: LabConfig, progress: bool) -> list[dict[str, Any]]:
    targets = [GaussianTarget(cfg.target_mean, c) for c in cfg.target_stds]
    jobs = [
        (grid, sampler, eta, n)
        for grid in cfg.grids
        for sampler in cfg.samplers
        for eta in eta_values(sampler, cfg.eta_points, cfg.eta_max)
        for n in cfg.nfe
    ]
    records = []
    for grid, sampler, eta, n in tqdm(jobs, desc="gaussian (exact)", disable=not progress, leave=False):
        kern = kernel(sampler, time_grid(n, grid, shift=cfg.shift), eta)
        for target in targets:
            prop = propagate_gaussian(kern, target)
            records.append(
                {
                    "target_std": target.std,
                    "grid": grid_label(grid, cfg.shift),
                    "sampler": sampler,
                    "eta": eta,
                    "default_eta": eta == DEFAULT_ETA[sampler],
                    "nfe": n,
                    "std_ratio": prop.std_ratio,
                    "mean_error": prop.mean_error,
                    "kl": _finite(prop.kl),
                    "exploration": _finite(prop.exploration),
                    "output_mean": prop.mean,
                    "output_std": prop.std,
                }
            )
    return records


def _effective_eta_section(cfg: LabConfig) -> list[dict[str, Any]]:
    """Each sampler (default eta) as a precise-family member: its effective eta per step, per grid and NFE,
    with the median/min/max over the steps, and the precise eta matched to cps's total noise share."""
    records = []
    for grid in cfg.grids:
        for n in cfg.nfe:
            sigmas = time_grid(n, grid, shift=cfg.shift)
            for sampler in cfg.samplers:
                eff = effective_eta(sampler, sigmas)
                records.append(
                    {
                        "grid": grid_label(grid, cfg.shift),
                        "nfe": n,
                        **eff.summary(),
                        "per_step": [_finite(float(v)) for v in eff.values],
                    }
                )
            if "cps" in SAMPLER_TABLE and "precise" in SAMPLER_TABLE:
                records.append(
                    {
                        "grid": grid_label(grid, cfg.shift),
                        "nfe": n,
                        "sampler": "precise matched to cps",
                        "eta": matched_precise_eta(sigmas, "cps"),
                    }
                )
    return records


def _mixture_metrics(
    mix: GaussianMixture, x: torch.Tensor, reference: torch.Tensor, generator: torch.Generator
) -> dict[str, Any]:
    freq = mode_frequencies(mix, x)
    return {
        "w2": wasserstein2(x, reference),
        "mode_w2": mode_w2(mix, x, generator),
        "weight_error": weight_error(freq, mix.weights),
        "mode_frequencies": [float(f) for f in freq],
        "residual_noise": residual_noise(mix, x),
        "residual_median": residual_median(mix, x),
    }


def _mixture_section(
    cfg: LabConfig, mix: GaussianMixture, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Rollouts of every sampler (default eta) on the mixture; returns records, the target's own
    values (two independent target sets) and the scatter samples ``{grid: {sampler: array}}``."""
    root = np.random.SeedSequence(cfg.seed)
    gen = torch.Generator().manual_seed(int(root.generate_state(1)[0]))
    ref_a, _ = mix.sample(cfg.samples, gen)
    ref_b, _ = mix.sample(cfg.samples, gen)
    reference = {**_mixture_metrics(mix, ref_a, ref_b, gen), "samples": cfg.samples}

    jobs = [(grid, n) for grid in cfg.grids for n in cfg.nfe]
    seeds = root.spawn(len(jobs))
    records: list[dict[str, Any]] = []
    scatter: dict[str, dict[str, np.ndarray]] = {}
    bar = tqdm(total=len(jobs) * len(cfg.samplers), desc="mixture (Monte Carlo)", disable=not progress, leave=False)
    for (grid, n), seq in zip(jobs, seeds, strict=True):
        label = grid_label(grid, cfg.shift)
        sigmas = time_grid(n, grid, shift=cfg.shift)
        states = seq.generate_state(len(cfg.samplers) + 3)
        # Common random numbers: every sampler starts from the same noise on this grid.
        x1 = torch.randn((cfg.samples, mix.dim), generator=torch.Generator().manual_seed(int(states[0])))
        fresh, _ = mix.sample(cfg.samples, torch.Generator().manual_seed(int(states[1])))
        metric_gen = torch.Generator().manual_seed(int(states[2]))
        for sampler, state in zip(cfg.samplers, states[3:], strict=True):
            gen = torch.Generator().manual_seed(int(state))
            traj = rollout(mix.velocity, x1, sigmas, sampler, generator=gen, store_means=False)
            x = traj.sample.to(torch.float64)
            records.append(
                {
                    "grid": label,
                    "sampler": sampler,
                    "eta": DEFAULT_ETA[sampler],
                    "nfe": n,
                    **_mixture_metrics(mix, x, fresh, metric_gen),
                }
            )
            if n == cfg.scatter_nfe:
                scatter.setdefault(label, {})[sampler] = x.numpy()
            bar.update()
    bar.close()
    scatter_target = {label: ref_a.numpy() for label in scatter}
    for label in scatter:
        scatter[label]["target"] = scatter_target[label]
    return records, reference, scatter


def run_lab(cfg: LabConfig, progress: bool = True) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Run the whole lab. Returns the JSON-ready results and the scatter samples for the plots."""
    cfg = cfg.validated()
    start = time.perf_counter()
    mix = default_mixture(cfg.modes)
    threads = torch.get_num_threads()
    # Every tensor here is small: one thread is fastest, and far faster on a busy machine
    # (intra-op threads then wait for each other on every call).
    torch.set_num_threads(1)
    try:
        gaussian = _gaussian_section(cfg, progress)
        effective = _effective_eta_section(cfg)
        mixture, reference, scatter = _mixture_section(cfg, mix, progress)
    finally:
        torch.set_num_threads(threads)
    meta = asdict(cfg)
    meta.update(
        {
            "version": __version__,
            "grid_labels": [grid_label(g, cfg.shift) for g in cfg.grids],
            "default_eta": {s: DEFAULT_ETA[s] for s in cfg.samplers},
            "eta_sweep": {s: eta_values(s, cfg.eta_points, cfg.eta_max) for s in cfg.samplers},
            "initial_noise": "x_1 ~ N(0, I)",
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    results = {
        "meta": meta,
        "definitions": {
            "std_ratio": "output std / target std (exact, Gaussian data)",
            "mean_error": "(output mean - target mean) / target std",
            "kl": "KL(output || target) per dimension, nats",
            "exploration": "E[Var(x0 | x1)] / Var(x0): share of output variance from the sampler's own noise",
            "w2": "exact W2 (POT emd2) between the samples and as many fresh target samples",
            "weight_error": "0.5 * sum_k |share of samples owned by mode k - w_k| (owner: max responsibility at t=0)",
            "mode_w2": "within-mode W2 / c_k: owned samples vs as many fresh draws of mode k, averaged over samples",
            "residual_noise": "RMS(|x - m_k| / (c_k sqrt(dim))) over samples, k the owning mode (about 1 if exact)",
            "residual_median": "median(|x - m_k| / c_k) over its value for exact samples (about 1 if exact)",
            "effective_eta": "per step, the eta of the precise step (logSNR schedule) that injects the same fresh "
            "noise, sqrt(-log(1 - (std / s)^2) / dlambda); null where no precise step matches (t = 1 unless "
            "std = s, s = 0, std >= s); match 'exact' where that precise step is the same transition (mean too), "
            "'variance' where only the fresh-noise std matches (Euler-Maruyama); summaries over the matched steps",
            "precise matched to cps": "the precise eta keeping cps's product of kept noise shares over the "
            "steps where cps has an effective eta: sqrt(sum eta_i^2 dlambda_i / sum dlambda_i)",
        },
        "mixture_spec": {"weights": list(mix.weights), "means": [list(m) for m in mix.means], "stds": list(mix.stds)},
        "gaussian": gaussian,
        "effective_eta": effective,
        "mixture": mixture,
        "mixture_reference": reference,
    }
    return results, scatter


def select(records: Iterable[Mapping[str, Any]], **keys: Any) -> list[Mapping[str, Any]]:
    """The records whose fields equal all of ``keys``."""
    return [r for r in records if all(r.get(k) == v for k, v in keys.items())]


def _num(x: float | None) -> str:
    """A number in at most 6 characters, 3 significant digits (``inf`` for null)."""
    if x is None or not math.isfinite(x):
        return "inf"
    if x != 0 and (abs(x) >= 1000 or abs(x) < 0.01):
        mantissa, exponent = f"{x:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.3g}"


def _row(label: str, cells: Iterable[str], width: int, first: int = 22) -> str:
    return "  " + label.ljust(first) + "".join(c.rjust(width) for c in cells)


def format_tables(results: Mapping[str, Any]) -> str:
    """The terminal summary: exact Gaussian table, frontier summary and mixture table."""
    meta = results["meta"]
    nfe, samplers, grids = meta["nfe"], meta["samplers"], meta["grid_labels"]
    gauss = results["gaussian"]
    defaults = select(gauss, default_eta=True)
    lines = [
        f"Gaussian data N({meta['target_mean']:g}, c^2), exact, default eta: "
        "output std / target std  (KL(output || target), nats per dimension)"
    ]
    for c in meta["target_stds"]:
        for grid in grids:
            lines.append("")
            lines.append(_row(f"c={c:g}, {grid}", [f"NFE {n}" for n in nfe], 16))
            for s in samplers:
                cells = []
                for n in nfe:
                    (r,) = select(defaults, target_std=c, grid=grid, sampler=s, nfe=n)
                    cells.append(f"{_num(r['std_ratio'])} ({_num(r['kl'])})")
                lines.append(_row(f"{s} ({meta['default_eta'][s]:g})", cells, 16))

    fn = meta["frontier_nfe"]
    lines += [
        "",
        f"Exploration E[Var(x0|x1)]/Var(x0) and KL at NFE {fn} over each sampler's eta sweep: at the default eta,",
        "at the eta of least KL, and at the eta of most exploration whose KL stays within 10% of the ODE's",
    ]
    for c in meta["target_stds"]:
        for grid in grids:
            lines.append("")
            lines.append(f"  {f'c={c:g}, {grid}':<20}| default eta           | least KL                     | max expl")
            lines.append(f"  {'':<20}|   expl  ratio     KL  |   eta   expl  ratio     KL  |   eta   expl")
            ode = select(gauss, target_std=c, grid=grid, sampler="ode", nfe=fn)
            for s in samplers:
                recs = sorted(select(gauss, target_std=c, grid=grid, sampler=s, nfe=fn), key=lambda r: r["eta"])
                (d,) = [r for r in recs if r["default_eta"]]
                kl = [math.inf if r["kl"] is None else r["kl"] for r in recs]
                best = recs[int(np.argmin(kl))]
                ref_kl = ode[0]["kl"] if ode and ode[0]["kl"] is not None else min(kl)
                ok = [
                    (r["exploration"] or 0.0, r["eta"], r) for r, k in zip(recs, kl, strict=True) if k <= 1.1 * ref_kl
                ]
                most = max(ok, key=lambda e: e[:2])[2] if ok else None
                row = f"  {s:<20}| {_num(d['exploration']):>6} {_num(d['std_ratio']):>6} {_num(d['kl']):>6}  |"
                row += f" {best['eta']:5.2g} {_num(best['exploration']):>6} {_num(best['std_ratio']):>6}"
                row += f" {_num(best['kl']):>6}  |"
                row += f" {most['eta']:5.2g} {_num(most['exploration']):>6}" if most else "     -      -"
                lines.append(row)

    lines += ["", *_effective_eta_lines(results)]

    ref = results["mixture_reference"]
    sn = meta["scatter_nfe"]
    lines += [
        "",
        f"2-D mixture ({meta['modes']} modes), Monte Carlo, {meta['samples']} samples, default eta. "
        "Per NFE: within-mode W2 / c_k (blur or collapse of the modes); at NFE "
        f"{sn}: W2 to fresh target samples, mode-weight error (TV), residual RMS and median (1 = exact)",
    ]
    for grid in grids:
        lines.append("")
        lines.append(_row(f"{grid}", [f"NFE {n}" for n in nfe], 9, 14) + " |    W2     TV    RMS median")
        for s in samplers:
            recs = {r["nfe"]: r for r in select(results["mixture"], grid=grid, sampler=s)}
            r = recs[sn]
            tail = f" | {_num(r['w2']):>5} {_num(r['weight_error']):>6} {_num(r['residual_noise']):>6} "
            tail += f"{_num(r['residual_median']):>6}"
            lines.append(_row(s, [_num(recs[n]["mode_w2"]) for n in nfe], 9, 14) + tail)
        tail = f" | {_num(ref['w2']):>5} {_num(ref['weight_error']):>6} {_num(ref['residual_noise']):>6} "
        tail += f"{_num(ref['residual_median']):>6}"
        lines.append(_row("target (fresh)", [_num(ref["mode_w2"])], 9, 14).ljust(16 + 9 * len(nfe)) + tail)
    return "\n".join(lines)


def _effective_eta_lines(results: Mapping[str, Any]) -> list[str]:
    """Per grid: each sampler's effective precise eta, median [min, max] over the steps, per NFE."""
    meta = results["meta"]
    nfe, grids = meta["nfe"], meta["grid_labels"]
    records = results.get("effective_eta", [])
    lines = [
        "Each sampler as a precise step per step: the effective eta (default eta), median [min, max] over the "
        "steps that have one; ~ marks a match of the fresh-noise variance only (Euler-Maruyama)"
    ]
    for grid in grids:
        lines.append("")
        lines.append(_row(f"{grid}", [f"NFE {n}" for n in nfe], 22, 24))
        for s in [*meta["samplers"], "precise matched to cps"]:
            cells = []
            for n in nfe:
                found = select(records, grid=grid, sampler=s, nfe=n)
                if not found:
                    break
                r = found[0]
                if "median" not in r:  # the matched eta: one number
                    cells.append(f"{r['eta']:.3g}")
                elif r["median"] is None:
                    cells.append("-")
                else:
                    mark = "~" if r["match"] == "variance" else ""
                    cells.append(f"{mark}{r['median']:.3g} [{r['min']:.3g}, {r['max']:.3g}]")
            if len(cells) == len(nfe):
                lines.append(_row(s, cells, 22, 24))
    return lines


def write_report(results: Mapping[str, Any], scatter: Mapping[str, Mapping[str, np.ndarray]], out: Path) -> list[Path]:
    """Write ``fidelity.json`` and the PNG plots into ``out``; returns the paths written."""
    from .plots import plot_error_vs_nfe, plot_frontier, plot_scatter

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "fidelity.json"]
    paths[0].write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    paths.append(plot_error_vs_nfe(results, out / "error_vs_nfe.png"))
    paths.append(plot_frontier(results, out / "frontier.png"))
    paths.append(plot_scatter(results, scatter, out / "mixture_scatter.png"))
    return paths
