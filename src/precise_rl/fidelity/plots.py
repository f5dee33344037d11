"""PNG plots of the fidelity report (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .mixture import GaussianMixture  # noqa: E402
from .report import select  # noqa: E402

__all__ = ["plot_error_vs_nfe", "plot_frontier", "plot_scatter", "sampler_colors"]

_DPI = 90


def sampler_colors(samplers: list[str]) -> dict[str, Any]:
    """One fixed colour per sampler (``ode`` in black)."""
    cmap = plt.get_cmap("tab10")
    colors: dict[str, Any] = {}
    i = 0
    for s in samplers:
        if s == "ode":
            colors[s] = "black"
        else:
            colors[s] = cmap(i)
            i += 1
    return colors


def _positive(values: list[float | None], floor: float = 1e-8) -> list[float]:
    """Values for a log axis: null (inf) stays NaN (a gap), tiny values are lifted to ``floor``."""
    return [math.nan if v is None else max(v, floor) for v in values]


def plot_error_vs_nfe(results: Mapping[str, Any], path: Path) -> Path:
    """KL(output || target) vs NFE on Gaussian data (exact), within-mode W2 vs NFE on the mixture; a row per grid."""
    meta = results["meta"]
    samplers, grids, stds = meta["samplers"], meta["grid_labels"], meta["target_stds"]
    colors = sampler_colors(samplers)
    ncols = len(stds) + 1
    fig, axes = plt.subplots(len(grids), ncols, figsize=(4.1 * ncols, 3.2 * len(grids)), squeeze=False)
    gauss = select(results["gaussian"], default_eta=True)
    for row, grid in enumerate(grids):
        for col, c in enumerate(stds):
            ax = axes[row][col]
            for s in samplers:
                recs = sorted(select(gauss, target_std=c, grid=grid, sampler=s), key=lambda r: r["nfe"])
                ax.plot(
                    [r["nfe"] for r in recs],
                    _positive([r["kl"] for r in recs]),
                    "o-",
                    ms=3,
                    color=colors[s],
                    label=f"{s} (eta {meta['default_eta'][s]:g})",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"Gaussian c={c:g}, {grid}: KL (exact)", fontsize=9)
            ax.set_xlabel("NFE", fontsize=8)
            ax.set_ylabel("KL(output || target) [nats]", fontsize=8)
            ax.grid(True, which="major", alpha=0.3)
            ax.tick_params(labelsize=7)
        ax = axes[row][-1]
        for s in samplers:
            recs = sorted(select(results["mixture"], grid=grid, sampler=s), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in recs], [r["mode_w2"] for r in recs], "o-", ms=3, color=colors[s])
        ax.axhline(results["mixture_reference"]["mode_w2"], color="gray", ls="--", lw=1, label="exact samples")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"2-D mixture, {grid}: within-mode W2 ({meta['samples']} samples)", fontsize=9)
        ax.set_xlabel("NFE", fontsize=8)
        ax.set_ylabel("W2 within each mode / mode std", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Distribution error vs NFE, every sampler at its default eta", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_frontier(results: Mapping[str, Any], path: Path) -> Path:
    """Exploration (x) vs KL (y) over each sampler's eta sweep at the frontier NFE; default eta starred."""
    meta = results["meta"]
    samplers, grids, stds, fn = meta["samplers"], meta["grid_labels"], meta["target_stds"], meta["frontier_nfe"]
    colors = sampler_colors(samplers)
    fig, axes = plt.subplots(len(stds), len(grids), figsize=(4.6 * len(grids), 3.4 * len(stds)), squeeze=False)
    for row, c in enumerate(stds):
        for col, grid in enumerate(grids):
            ax = axes[row][col]
            for s in samplers:
                recs = sorted(
                    select(results["gaussian"], target_std=c, grid=grid, sampler=s, nfe=fn), key=lambda r: r["eta"]
                )
                xs = [math.nan if r["exploration"] is None else r["exploration"] for r in recs]
                ys = _positive([r["kl"] for r in recs])
                sweep = meta["eta_sweep"][s]
                label = s if s == "ode" else f"{s} (eta {sweep[0]:g}-{sweep[-1]:g})"
                ax.plot(xs, ys, "o-" if len(recs) > 1 else "o", ms=3, color=colors[s], label=label)
                default = [r for r in recs if r["default_eta"]]
                for r in default:
                    ax.plot(
                        r["exploration"], _positive([r["kl"]])[0], "*", ms=11, color=colors[s], mec="black", mew=0.6
                    )
            ax.set_yscale("log")
            ax.set_xlim(-0.03, 1.03)
            ax.set_title(f"Gaussian c={c:g}, {grid}, NFE {fn}", fontsize=9)
            ax.set_xlabel("exploration  E[Var(x0|x1)] / Var(x0)", fontsize=8)
            ax.set_ylabel("KL(output || target) [nats]", fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Exploration-stability frontier over eta (star: default eta; lower right is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_scatter(
    results: Mapping[str, Any], scatter: Mapping[str, Mapping[str, np.ndarray]], path: Path, max_points: int = 2000
) -> Path:
    """One panel per sampler (plus the target) of mixture samples at the scatter NFE over the density contours."""
    meta = results["meta"]
    spec = results["mixture_spec"]
    mix = GaussianMixture(
        weights=tuple(spec["weights"]), means=tuple(tuple(m) for m in spec["means"]), stds=tuple(spec["stds"])
    )
    labels = meta["grid_labels"]
    grid = next((g for g in labels if g != "uniform"), labels[0])
    panels = scatter[grid]
    names = ["target", *[s for s in meta["samplers"] if s in panels]]
    colors = sampler_colors(meta["samplers"])
    colors["target"] = "gray"

    means = np.asarray(spec["means"], dtype=np.float64)
    pad = 4 * max(spec["stds"]) + 0.6
    lo, hi = means.min(axis=0) - pad, means.max(axis=0) + pad
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    pts = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], axis=1))
    logp = mix.log_density(pts).numpy().reshape(gx.shape)
    levels = np.linspace(logp.max() - 12, logp.max(), 7)

    ncols = 4
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 3.1 * nrows), squeeze=False)
    recs = {r["sampler"]: r for r in select(results["mixture"], grid=grid, nfe=meta["scatter_nfe"])}
    ref = results["mixture_reference"]
    for ax, name in zip(axes.ravel(), names, strict=False):
        x = panels[name][:max_points]
        ax.contour(gx, gy, logp, levels=levels, colors="black", linewidths=0.5, alpha=0.5)
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, color=colors[name], rasterized=True)
        r = ref if name == "target" else recs[name]
        title = "target (fresh samples)" if name == "target" else f"{name} (eta {meta['default_eta'][name]:g})"
        ax.set_title(title, fontsize=9)
        ax.text(
            0.02,
            0.02,
            f"W2 {r['w2']:.2f}  weights TV {r['weight_error']:.3f}\n"
            f"residual RMS {r['residual_noise']:.2f}  median {r['residual_median']:.2f}",
            transform=ax.transAxes,
            fontsize=7,
            va="bottom",
        )
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.suptitle(f"2-D mixture, NFE {meta['scatter_nfe']}, {grid} grid: samples over the target density", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path
