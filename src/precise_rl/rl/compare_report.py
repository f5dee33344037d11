"""A comparison as a Markdown table: one row per run, the held-out reward under each protocol.

``precise-rl compare`` writes it as ``compare.md`` beside ``compare.json``, and the documentation renders
its tables from the kept JSON with this function, so the numbers on a page are the command's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["markdown_table", "MARKS"]

#: the shares of the run's length at which the table reads each run's seed-mean curve, beside its final reward
MARKS = (0.2, 0.4, 0.6)


def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.4f}" if seeds < 2 else f"{mean:.4f} ± {std:.4f}"


def _epochs(x: float | None) -> str:
    return "not reached" if x is None else format(round(x, 1), "g")


def markdown_table(result: dict[str, Any]) -> list[str]:
    """The comparison ``result`` (``compare.json``) as table lines.

    Per protocol: the seed-mean reward at the evaluations that fall at :data:`MARKS` of the run's length,
    the final reward (mean ± std over seeds; the best in bold), and the epochs its seed-mean curve takes to
    reach the protocol's target (the best final reward of a prior sampler; linear between evaluations).
    """
    protocols = result["protocols"]
    seeds = int(result["seeds"])
    first = next(iter(protocols.values()))
    runs = list(first["samplers"])
    epochs = first["samplers"][runs[0]]["epochs"]
    marks = [e for e in dict.fromkeys(round(epochs[-1] * f) for f in MARKS) if e in epochs and 0 < e < epochs[-1]]
    head = ["run"]
    for name, summary in protocols.items():
        if marks:
            head.append(f"`{name}` epoch " + " / ".join(map(str, marks)))
        head.append(f"`{name}` final")
        if summary["target"] is not None:
            head.append(f"`{name}` epochs to {summary['target']:.4f}")
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for run in runs:
        cells = [f"`{run}`"]
        for summary in protocols.values():
            c = summary["samplers"][run]
            if marks:
                cells.append(" / ".join(f"{c['reward_mean'][c['epochs'].index(e)]:.3f}" for e in marks))
            final = _pm(c["final_reward_mean"], c["final_reward_std"], seeds)
            best = max(s["final_reward_mean"] for s in summary["samplers"].values())
            cells.append(f"**{final}**" if c["final_reward_mean"] == best else final)
            if summary["target"] is not None:
                cells.append(_epochs(c["epochs_to_target"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
