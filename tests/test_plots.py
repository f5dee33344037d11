"""Plots people read: short runs show their points, epochs are whole, measurements are apart, grids name columns."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from precise_rl.images import image_grid, labelled_grid
from precise_rl.rl.logging import plot_reward_curves


def _figure_of(records: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Any:
    """The matplotlib figure ``plot_reward_curves`` saves (kept open for inspection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    saved: list[Any] = []
    real = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    monkeypatch.setattr(plt, "close", lambda *a: None)
    plot_reward_curves(records, tmp_path / "curve.png", **kw)
    assert (tmp_path / "curve.png").stat().st_size > 0
    return saved[-1]


def _record(epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "reward_mean": 0.1 * epoch,
        "reward/ink_style": 0.2 * epoch,
        "reward/digit_alignment": -1.0 + 0.1 * epoch,
        "reward/ink_style/ink": 0.3,  # ink_style's raw ink fraction: a measurement, not a reward
    }


def test_a_one_epoch_curve_draws_its_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fig = _figure_of([_record(1)], tmp_path, monkeypatch)
    drawn = [line for ax in fig.axes for line in ax.lines if len(line.get_xdata()) == 1]
    assert drawn, "no single-point series"
    # a line through one point is invisible: each such series must have a marker
    assert all(line.get_marker() not in (None, "", "None", " ") for line in drawn)


@pytest.mark.parametrize("epochs", [(1,), (1, 2), (1, 2, 3)])
def test_epoch_ticks_are_whole_numbers_on_short_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epochs: tuple[int, ...]
) -> None:
    fig = _figure_of([_record(e) for e in epochs], tmp_path, monkeypatch)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)


def test_measurements_are_not_plotted_among_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import precise_rl.rewards  # noqa: F401 - registers the task's rewards

    fig = _figure_of([_record(e) for e in (1, 2, 3)], tmp_path, monkeypatch)
    by_title = {ax.get_title(): sorted(line.get_label() for line in ax.lines) for ax in fig.axes}
    rewards = sorted(label for k, v in by_title.items() if "train rollouts" in k for label in v)
    assert rewards == ["digit_alignment", "ink_style"]
    assert ["ink_style/ink"] in by_title.values()  # the ink fraction on a panel of its own


def test_each_reward_component_has_an_axis_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flat component (digit_alignment near 0) beside one of another scale is not drawn as a flat line."""
    records = [
        {"epoch": e, "reward_mean": 0.1 * e, "reward/ink_style": 1.5 * e, "reward/digit_alignment": -1e-3 * e}
        for e in (1, 2, 3, 4)
    ]
    fig = _figure_of(records, tmp_path, monkeypatch, reward_names=["ink_style", "digit_alignment"])
    panels = {line.get_label(): ax for ax in fig.axes for line in ax.lines if line.get_label() != "train (rollouts)"}
    flat = panels["digit_alignment"]
    assert flat is not panels["ink_style"]
    lo, hi = flat.get_ylim()
    assert hi - lo < 0.01  # its own axis spans its own small range: its change fills the panel


def test_a_reward_named_by_import_path_gets_a_legend_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib hides labels starting with '_' (and warns that the legend is empty): '__main__:ink' shows."""
    import warnings

    records = [{"epoch": e, "reward_mean": 0.1 * e, "reward/__main__:ink": 0.2 * e} for e in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "No artists with labels found to put in legend" is a UserWarning
        fig = _figure_of(records, tmp_path, monkeypatch, reward_names=["__main__:ink"])
    texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("__main__:ink" in t for t in texts), texts


def test_a_grid_title_heads_the_grid_without_moving_the_tiles() -> None:
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = labelled_grid(images, ["a 1", "a 2"], 2, scale=4)
    titled = labelled_grid(images, ["a 1", "a 2"], 2, scale=4, title="epoch 100: ode (deterministic), 10 steps")
    band = titled.shape[0] - plain.shape[0]
    assert band > 0 and titled.shape[1] >= plain.shape[1]
    np.testing.assert_array_equal(titled[band:, : plain.shape[1]], plain)
    assert (titled[:band] < 128).any()  # the title is written in the band


def test_an_evaluation_grid_names_its_epoch_sampler_eta_and_steps() -> None:
    from precise_rl.rl.logging import grid_title

    assert grid_title(40, "own", "cps", 0.7, 10, True) == (
        "epoch 40: cps at eta 0.7, 10 steps (protocol own, EMA weights)"
    )
    assert (
        grid_title(0, "ode", "ode", 0.0, 6, False)
        == "epoch 0: ode (deterministic), 6 steps (protocol ode, trained weights)"
    )


def test_study_heatmap_text_stays_inside_its_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five seed pairs and a merged grid made the longest cell text; it must fit within its cell's borders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from precise_rl.rl.study import plot_heatmap

    seeds = 5

    def summary(reached: bool) -> dict[str, Any]:
        return {
            "target": 1.0,
            "samplers": {"precise": {"final_reward_mean": 0.98}},
            "precise_epoch_ratio_vs_best_prior": 0.93 if reached else None,
            "precise_epoch_ratio_per_seed": [1.09, 0.91, 1.0, 0.87, 1.12] if reached else [],
            "saturated": not reached,
        }

    grids = ["uniform", "shift3", "model"]
    cells = [
        {
            "steps": n,
            "grid": "shift3" if g == "model" else g,
            "grids": [g],
            "protocols": {p: summary(n != 20) for p in ("own", "ode")},
        }
        for n in (6, 10, 20)
        for g in grids
    ]
    saved: list[Any] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or real(self, *a, **k))
    monkeypatch.setattr(plt, "close", lambda *a: None)
    plot_heatmap(
        {"steps": [6, 10, 20], "grids": grids, "seeds": seeds, "cells": cells, "epochs": 100}, tmp_path / "h.png"
    )
    fig = saved[-1]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    checked = 0
    for ax in fig.axes:
        for text in ax.texts:
            j, i = text.get_position()
            (x0, y0), (x1, y1) = ax.transData.transform([(j - 0.5, i - 0.5), (j + 0.5, i + 0.5)])
            box = text.get_window_extent(renderer)
            assert min(x0, x1) <= box.x0 and box.x1 <= max(x0, x1), text.get_text()
            assert min(y0, y1) <= box.y0 and box.y1 <= max(y0, y1), text.get_text()
            checked += 1
    assert checked == 2 * 9


def test_grids_can_name_their_columns() -> None:
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = labelled_grid(images, ["ode", "precise"], 3, scale=4)
    named = labelled_grid(images, ["ode", "precise"], 3, scale=4, col_labels=["seed 0", "seed 1", "seed 2"])
    band = named.shape[0] - plain.shape[0]
    assert band > 0 and named.shape[1] == plain.shape[1]
    tiles = image_grid(images, 2, 3, scale=4)
    margin = named.shape[1] - tiles.shape[1]
    np.testing.assert_array_equal(named[band:, margin:], tiles)  # the tiles are where they were, below the band
    ink = (named[:band, margin:] < 128).any(axis=2)
    col_w = tiles.shape[1] // 3
    assert all(ink[:, k * col_w : (k + 1) * col_w].any() for k in range(3))  # a label over every column


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is (progress bars show only on terminals)."""

    def isatty(self) -> bool:
        return True


def test_sample_and_eval_show_progress_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from precise_rl.cli import main

    from . import toy_task

    toy_task.register()
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(run), "train.epochs=2"]) == 0
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    argv = ["sample", "--model", "digits", "--steps", "2", "--num-images", "1", "-o", str(tmp_path / "s")]
    assert main([*argv, "--prompt", "a 1", "--prompt", "a 2"]) == 0
    assert "sampling:" in term.getvalue() and "/2 " in term.getvalue(), term.getvalue()  # a bar over 2 rollouts
    term.seek(0)
    term.truncate()
    assert main(["eval", str(run), "--samplers", "ode", "--steps", "2,3"]) == 0
    assert "evaluating:" in term.getvalue() and "/2 " in term.getvalue(), term.getvalue()  # over 2 step counts
