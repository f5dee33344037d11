"""Every shipped diffusers recipe against the knob tables of ``docs/reproduction.md``.

The tables are the one source of truth for the recipes' knobs: each row names a config key, the
reference's value with its citation, our recipes' value and why the two differ. A recipe fails
when one of its values differs from the table's "ours" value, when it sets a knob no table row
documents, or when the table's "ours" differs from the reference without a reason (or gives a
reason where the two agree).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from precise_rl.config import config_to_dict, load_config
from precise_rl.policies.registry import PIPELINE_ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reproduction.md"
#: the model names of the diffusers recipes: each adapter of a diffusers pipeline class, and the detecting name
DIFFUSERS_MODELS = {*PIPELINE_ADAPTERS.values(), "diffusers"}
#: the knob table that applies to each recipe, by the start of its file name (the longest match wins): a
#: model's recipes share one table unless a reference recipe of another variant sets other knobs
FAMILY = {
    "flux2_klein_": "flux2_klein",
    "sd35_": "sd35",
    "flux2_dev_": "flux2_dev",
    "qwen_image_edit_": "qwen_image_edit",
    "qwen_image_": "qwen_image",
    "z_image_turbo_": "z_image_turbo",
    "z_image_": "z_image",
    "flux1_kontext_": "flux1_kontext",
    "wan21_1_3b_": "wan21_1_3b",
    "wan22_5b_": "wan22_5b",
    "wan22_a14b_": "wan22_a14b",
    "sd35_nft_": "sd35_nft",
    "flux2_klein_nft_": "flux2_klein_nft",
    "sd35_awm_": "sd35_awm",
}
#: tables that apply by the recipe's reward (its name's end) within a model's recipes: (start, end) -> table
FAMILY_BY_REWARD = {("sd35_", "_ocr"): "sd35_ocr", ("flux2_klein_", "_ocr"): "flux2_klein_ocr"}
#: the columns of the per-recipe table
PER_RECIPE_KEYS = ("sampler.name", "sampler.eta", "reward.weights", "reward.eval_only")
#: free-form mappings: a key inside them that a recipe does not set has no default to compare with
FREE_FORM = ("model.options.", "reward.options.")
#: knobs every family table must document (the reference recipe's training and evaluation setup)
REQUIRED = {
    "model.name", "sampler.num_steps", "sampler.grid", "train.group_size", "train.groups_per_epoch",
    "derived.samples_per_step",
    "derived.steps_per_epoch", "train.inner_epochs", "train.lr", "train.weight_decay", "train.adam_betas",
    "train.adam_eps", "train.grad_clip", "train.lora.rank", "train.lora.alpha", "train.lora.init",
    "model.options.lora_targets", "model.dtype", "train.mixed_precision", "model.options.max_sequence_length",
    "train.ema.enabled", "train.ema.decay", "train.ema.every", "train.ema.mode", "model.options.guidance_scale",
    "eval.samplers", "eval.num_steps", "eval.max_prompts", "model.options.height", "prompts.train", "prompts.eval",
    "prompts.order",
}  # fmt: skip
#: knobs each algorithm's tables must document besides (its own knobs; a table names its algorithm in an
#: ``algorithm.name`` row, GRPO where it has none)
ALGORITHM_REQUIRED = {
    "grpo": {"algorithm.clip_range", "algorithm.guard", "algorithm.kl_beta", "algorithm.timestep_fraction",
             "derived.trained_steps"},
    "nft": {"algorithm.name", "algorithm.beta", "algorithm.kl_beta", "algorithm.adv_clip", "algorithm.adv_std",
            "algorithm.timestep_fraction", "derived.trained_steps", "algorithm.old_decay_flat",
            "algorithm.old_decay_rate", "algorithm.old_decay_max", "algorithm.rollout_with_old"},
    "awm": {"algorithm.name", "algorithm.adv_clip", "algorithm.advantage_max", "algorithm.adv_std",
            "algorithm.clip_range", "algorithm.weighting", "algorithm.ghuber_power", "algorithm.train_timesteps",
            "algorithm.timestep_fraction", "algorithm.time_type", "algorithm.kl_beta", "algorithm.ema_kl_beta",
            "algorithm.ema_decay_max", "algorithm.ema_decay_rate"},
}  # fmt: skip
#: required knobs that only a LoRA recipe has
LORA_KNOBS = {"train.lora.rank", "train.lora.alpha", "train.lora.init", "model.options.lora_targets"}


def _family(stem: str) -> str | None:
    """The knob table of the recipe ``stem`` (None: no table names it)."""
    for (start, end), name in FAMILY_BY_REWARD.items():
        if stem.startswith(start) and stem.endswith(end):
            return name
    prefixes = [p for p in FAMILY if stem.startswith(p)]
    return FAMILY[max(prefixes, key=len)] if prefixes else None


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(text: str, name: str) -> list[list[str]]:
    """The rows (lists of cells) of the table that follows ``<!-- knobs: name -->``."""
    marker = f"<!-- knobs: {name} -->"
    assert text.count(marker) == 1, f"docs/reproduction.md must hold one table marked {marker}"
    lines = text.split(marker, 1)[1].strip().splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    assert len(rows) > 2 and set(rows[1][0]) <= set("-: "), f"table {name} has no header and rows"
    width = len(rows[0])
    assert all(len(r) == width for r in rows), f"table {name} has rows of different widths"
    return rows[2:]


def _ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def _value(text: str) -> Any:
    return yaml.safe_load(text)


def _leading(cell: str, n: int) -> list[Any] | None:
    """The first ``n`` backticked values of a cell that starts with one, parsed; None for "no value" (—)."""
    if not cell.startswith("`"):
        return None
    ticks = _ticks(cell)
    assert len(ticks) >= n, f"cell {cell!r} must start with {n} backticked values"
    return [_value(t) for t in ticks[:n]]


def _knob_rows(name: str) -> dict[str, tuple[Any | None, bool, Any, str]]:
    """``key -> (reference value or None, whether the reference gives one, ours, why)`` of a family table."""
    out = {}
    for key_cell, ref_cell, ours_cell, why in _table(DOC.read_text(), name):
        if not key_cell.startswith("`"):
            continue  # behaviour no config key controls: documented, not checked
        (key,) = _ticks(key_cell)
        assert key not in out, f"table {name} documents {key} twice"
        ref = _leading(ref_cell, 1)
        ours = _ticks(ours_cell)
        assert len(ours) == 1, f"table {name}, {key}: the 'ours' cell must hold one backticked value"
        out[key] = (None if ref is None else ref[0], ref is not None, _value(ours[0]), why)
    return out


def _per_recipe_rows() -> dict[str, tuple[list[Any] | None, list[Any], str]]:
    out = {}
    for cells in _table(DOC.read_text(), "recipes"):
        name_cell, *values, ref_cell, why = cells
        (name,) = _ticks(name_cell)
        assert len(values) == len(PER_RECIPE_KEYS)
        ours = [_value(_ticks(v)[0]) for v in values]
        out[name] = (_leading(ref_cell, len(PER_RECIPE_KEYS)), ours, why)
    return out


def _recipes() -> list[Path]:
    found = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data.get("model"), dict) and data["model"].get("name") in DIFFUSERS_MODELS:
            found.append(path)
    return found


RECIPES = _recipes()


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("reward.weights",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _derived(cfg: Any) -> dict[str, Any]:
    t = cfg.train
    images = t.groups_per_epoch * t.group_size
    per_step = t.batch_size * t.grad_accum
    steps = images / per_step
    return {
        "derived.images_per_epoch": images,
        "derived.samples_per_step": per_step,
        "derived.steps_per_epoch": int(steps) if steps == int(steps) else steps,
        "derived.trained_steps": math.floor(
            getattr(cfg.algorithm.knobs, "timestep_fraction", 0.0) * cfg.sampler.num_steps + 1e-9
        ),
    }


def _recipe_value(cfg: Any, flat: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``(found, value)`` of ``key`` in the loaded config (defaults included, outside the free-form mappings)."""
    if key.startswith("derived."):
        return True, _derived(cfg)[key]
    if key.startswith(FREE_FORM):
        return (key in flat, flat.get(key))
    node: Any = config_to_dict(cfg)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def test_the_doc_has_every_table_and_each_row_agrees_with_its_reason() -> None:
    """Where ours equals the reference the reason is empty; where they differ (or the reference has no such
    value) a reason is given. Each family table documents every required knob."""
    for name in [*FAMILY.values(), *FAMILY_BY_REWARD.values()]:
        rows = _knob_rows(name)
        lora = rows["train.lora.enabled"][2]
        algorithm = rows["algorithm.name"][2] if "algorithm.name" in rows else "grpo"
        required = (REQUIRED if lora else REQUIRED - LORA_KNOBS) | ALGORITHM_REQUIRED[algorithm]
        assert required <= set(rows), f"table {name} lacks {sorted(required - set(rows))}"
        if not lora:
            assert not LORA_KNOBS & set(rows), f"table {name} trains without LoRA but documents LoRA knobs"
        for key, (ref, has_ref, ours, why) in rows.items():
            same = has_ref and ref == ours
            assert same == (why == ""), f"table {name}, {key}: reference {ref!r}, ours {ours!r}, reason {why!r}"
    for name, (ref, ours, why) in _per_recipe_rows().items():
        same = ref is not None and ref == ours
        assert same == (why == ""), f"recipe row {name}: reference {ref!r}, ours {ours!r}, reason {why!r}"


def test_every_diffusers_recipe_has_a_table_and_a_row() -> None:
    names = {p.stem for p in RECIPES}
    assert {f"flux2_klein_{s}_mix" for s in ("precise", "flow_grpo", "dance_grpo", "cps")} <= names
    assert set(_per_recipe_rows()) == names  # one row per shipped recipe, and no row for a missing one
    for path in RECIPES:
        assert _family(path.stem), f"{path.name}: no knob table in docs/reproduction.md names recipes like it"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_matches_the_knob_tables(path: Path) -> None:
    cfg = load_config(path)  # every recipe loads with the config schema
    raw = yaml.safe_load(path.read_text())
    flat = _flatten(raw)
    rows = _knob_rows(_family(path.stem))  # its model.name row checks that the table is the model's
    used_rewards = set(cfg.reward.weights) | set(cfg.reward.eval_only)
    for key, (_, _, ours, _) in rows.items():
        if key.startswith("reward.options.") and key.split(".")[2] not in used_rewards:
            assert key not in flat, f"{path.name} sets {key} for a reward it does not use"
            continue
        found, value = _recipe_value(cfg, flat, key)
        assert found, f"{path.name} does not set {key} (docs/reproduction.md: {ours!r})"
        assert value == ours, f"{path.name}: {key} is {value!r}, docs/reproduction.md says {ours!r}"
    ref, ours, _ = _per_recipe_rows()[path.stem]
    got = [_recipe_value(cfg, flat, k)[1] for k in PER_RECIPE_KEYS]
    assert got == ours, f"{path.name}: {dict(zip(PER_RECIPE_KEYS, got, strict=True))} != the per-recipe row {ours}"
    # no knob that the tables leave undocumented
    documented = set(rows) | set(PER_RECIPE_KEYS)
    undocumented = sorted(k for k in flat if k not in documented)
    assert not undocumented, f"{path.name} sets knobs docs/reproduction.md does not document: {undocumented}"
    # the header says what it reproduces, where its knobs come from and how to launch it
    text = path.read_text()
    assert "docs/reproduction.md" in text.split("\nseed:")[0]
    assert f"-m precise_rl.cli train configs/{path.name} --output runs/{path.stem}" in text


def test_mix_recipes_differ_only_in_the_sampler() -> None:
    """The main table's four recipes are one recipe with four samplers, each at its reference noise level."""
    files = {s: ROOT / "configs" / f"flux2_klein_{s}_mix.yaml" for s in ("precise", "flow_grpo", "dance_grpo", "cps")}
    data = {s: yaml.safe_load(p.read_text()) for s, p in files.items()}
    samplers = {s: d.pop("sampler") for s, d in data.items()}
    first = data["precise"]
    assert all(d == first for d in data.values())
    assert {s: (v["name"], v["eta"]) for s, v in samplers.items()} == {
        "precise": ("precise", 1.5), "flow_grpo": ("flow_grpo", 0.7), "dance_grpo": ("dance_grpo", 0.3),
        "cps": ("cps", 0.7),
    }  # fmt: skip
    assert first["reward"]["weights"] == {"pickscore": 1.0, "clipscore": 1.0, "hpsv2": 1.0}
    assert first["reward"]["eval_only"] == ["imagereward"]
