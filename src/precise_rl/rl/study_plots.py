"""The study's figures: where precise wins (heatmap), reward curves, an eta sweep, and algorithms x samplers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .compare import PROTOCOLS, sampler_of
from .study_report import ratio_text
from .study_runs import sweep_runs

__all__ = ["plot_heatmap", "plot_curves", "plot_etas", "plot_algorithms"]


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


def plot_etas(result: dict[str, Any], path: Path) -> None:
    """An eta sweep: final and untrained reward (seed mean ± std) against eta, one subplot per cell and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, protocols = result["cells"], list(PROTOCOLS)
    runs = sweep_runs(result["samplers"])
    names = sorted({sampler_of(label) for label in runs})
    fig, axes = plt.subplots(len(cells), len(protocols), figsize=(5 * len(protocols), 3 * len(cells)), squeeze=False)
    for r, cell in enumerate(cells):
        for col, protocol in enumerate(protocols):
            ax = axes[r][col]
            summary = cell["protocols"][protocol]["samplers"]
            for i, name in enumerate(names):
                mine = sorted((eta, label) for label, eta in runs.items() if sampler_of(label) == name)
                etas = [eta for eta, _ in mine]
                final = np.array([summary[label]["final_reward_mean"] for _, label in mine])
                spread = np.array([summary[label]["final_reward_std"] for _, label in mine])
                start = [summary[label]["initial_reward_mean"] for _, label in mine]
                ax.errorbar(etas, final, yerr=spread, marker="o", color=f"C{i}", capsize=3, label=f"{name}: final")
                ax.plot(etas, start, ls="--", marker=".", color=f"C{i}", label=f"{name}: untrained")
            ax.set_title(f"N={cell['steps']} {' = '.join(cell['grids'])}, {protocol}", fontsize=10)
            ax.set_xlabel("eta")
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
