"""List the models a config's ``model.name`` takes: ``precise-rl models [--json] [--memory]``.

One row per model: the built-in task, every registered adapter (``@register_policy``) with its
diffusers pipeline class, default checkpoint, guidance and time grid (``sampler.grid: model``), and
``diffusers``, which picks the adapter from a pipeline's ``model_index.json``. The table printed is
the README's models table. ``--memory`` prints instead the models page's table of what the memory options
take off the device for the real checkpoints, counted from their shipped configs on the meta device
(:mod:`precise_rl.policies.sizes`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_arguments", "run", "model_rows", "models_table", "memory_rows", "memory_table"]

COLUMNS = ("`model.name`", "diffusers pipeline", "default checkpoint", "guidance", "time grid (`sampler.grid: model`)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    p.add_argument(
        "--memory",
        action="store_true",
        help="print the parameters of the real checkpoints' components and the bf16 GB that the memory options "
        "(offload_text_encoders, free_text_encoders, offload_vae) take off the device, from the shipped configs",
    )


def model_rows() -> list[dict[str, Any]]:
    """The rows of the listing, from the classes' own statements (nothing is loaded or built)."""
    from ..policies.registry import ADAPTERS
    from ..tasks.digits import DigitsPolicy
    from ..tasks.signs import SignsPolicy

    def row(name: str, cls: Any, pipeline: str | None) -> dict[str, Any]:
        return {
            "name": name,
            "pipeline": pipeline,
            "default_model": cls.default_model,
            "guidance": cls.guidance_rule,
            "time_grid": cls.time_grid_rule,
        }

    rows = [row("digits", DigitsPolicy, None), row("signs", SignsPolicy, None)]
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


MEMORY_COLUMNS = (
    "`model.name`",
    "checkpoint",
    "transformer (B params)",
    "text encoders (B params)",
    "VAE (B params)",
    "`offload_text_encoders` / `free_text_encoders` take off (GB)",
    "`offload_vae` takes off (GB)",
    "transformer stays (GB)",
)
BF16_BYTES = 2


def memory_rows() -> list[dict[str, Any]]:
    """Per shipped checkpoint config: each component's parameter count and the bf16 bytes per option."""
    from ..policies.sizes import model_sizes

    rows = []
    for m in model_sizes():
        rows.append(
            {
                "name": m.adapter,
                "checkpoint": m.checkpoint,
                "components": {
                    c.role: {"class": c.class_name, "parameters": c.parameters, "source": c.source}
                    for c in m.components
                },
                "text_encoders_bytes": m.parameters("text_encoder") * BF16_BYTES,
                "vae_bytes": m.parameters("vae") * BF16_BYTES,
                "transformer_bytes": m.parameters("transformer") * BF16_BYTES,
            }
        )
    return rows


def _billions(components: dict[str, dict[str, Any]], kind: str, digits: int) -> str:
    """The parameter counts (billions) of the components whose role starts with ``kind``, joined by ``+``."""
    return " + ".join(f"{c['parameters'] / 1e9:.{digits}f}" for role, c in components.items() if role.startswith(kind))


def memory_table() -> str:
    """The memory listing as a Markdown table (parameters in billions, bytes in GB of 10^9, bfloat16)."""
    lines = ["| " + " | ".join(MEMORY_COLUMNS) + " |", "|" + " --- |" * len(MEMORY_COLUMNS)]
    for r in memory_rows():
        cells = [
            f"`{r['name']}`",
            f"`{r['checkpoint']}`",
            _billions(r["components"], "transformer", 2),
            _billions(r["components"], "text_encoder", 2),
            _billions(r["components"], "vae", 3),
            f"{r['text_encoders_bytes'] / 1e9:.1f}",
            f"{r['vae_bytes'] / 1e9:.2f}",
            f"{r['transformer_bytes'] / 1e9:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.memory:
        print(json.dumps(memory_rows(), indent=1) if args.json else memory_table())
        return 0
    print(json.dumps(model_rows(), indent=1) if args.json else models_table())
    return 0
