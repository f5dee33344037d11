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
    rewards = next(v for k, v in by_title.items() if "reward components" in k)
    assert rewards == ["digit_alignment", "ink_style"]
    assert ["ink_style/ink"] in by_title.values()  # the ink fraction on a panel of its own


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
