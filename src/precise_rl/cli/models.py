"""List the models a config's ``model.name`` takes: ``precise-rl models [--json]``.

One row per model: the built-in task, every registered adapter (``@register_policy``) with its
diffusers pipeline class, default checkpoint, guidance and time grid (``sampler.grid: model``), and
``diffusers``, which picks the adapter from a pipeline's ``model_index.json``. The table printed is
the README's models table.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_arguments", "run", "model_rows", "models_table"]

COLUMNS = ("`model.name`", "diffusers pipeline", "default checkpoint", "guidance", "time grid (`sampler.grid: model`)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")


def model_rows() -> list[dict[str, Any]]:
    """The rows of the listing, from the classes' own statements (nothing is loaded or built)."""
    from ..policies.registry import ADAPTERS
    from ..tasks.digits import DigitsPolicy

    def row(name: str, cls: Any, pipeline: str | None) -> dict[str, Any]:
        return {
            "name": name,
            "pipeline": pipeline,
            "default_model": cls.default_model,
            "guidance": cls.guidance_rule,
            "time_grid": cls.time_grid_rule,
        }

    rows = [row("digits", DigitsPolicy, None)]
    for name, cls in ADAPTERS.items():
        rows.append(row(name, cls, getattr(cls, "pipeline_class", None)))
    rows.append(
        {
            "name": "diffusers",
            "pipeline": "any of the above, read from the pipeline's `model_index.json`",
            "default_model": "(`model.path` required)",
            "guidance": "as above",
            "time_grid": "as above",
        }
    )
    return rows


def _cell(value: str | None, code: bool = False) -> str:
    if value is None:
        return "(built-in)"
    return f"`{value}`" if code and not value.startswith(("(", "the ", "any ")) else value


def models_table() -> str:
    """The listing as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for r in model_rows():
        cells = [
            f"`{r['name']}`",
            _cell(r["pipeline"], code=True),
            _cell(r["default_model"], code=True),
            r["guidance"],
            r["time_grid"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(model_rows(), indent=1) if args.json else models_table())
    return 0
