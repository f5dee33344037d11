"""Sample grids: images tiled in place, each row labelled with its prompt or sampler."""

from __future__ import annotations

import numpy as np
import torch

from precise_rl.images import image_grid, labelled_grid


def test_labelled_grid_keeps_the_tiles_and_writes_each_label_in_its_row() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    images = torch.rand(6, 1, 8, 8, generator=gen)
    labels = ["a bold handwritten 7", "a thin 3", "the digit zero in heavy strokes"]
    plain = image_grid(images, 3, 2, scale=4)
    out = labelled_grid(images, labels, 2, scale=4)
    margin = out.shape[1] - plain.shape[1]
    assert out.dtype == np.uint8 and out.shape[0] == plain.shape[0] and margin > 0
    np.testing.assert_array_equal(out[:, margin:], plain)
    row_h = plain.shape[0] // 3
    ink = (out[:, :margin] < 128).any(axis=2)  # text is black on white
    inked_cols = [int(ink[k * row_h : (k + 1) * row_h].any(axis=0).sum()) for k in range(3)]
    assert all(c > 0 for c in inked_cols)
    assert inked_cols[2] > inked_cols[0] > inked_cols[1]  # longer labels take more columns
    wider = labelled_grid(images, [labels[2]] * 3, 2, scale=4)
    assert wider.shape[1] == out.shape[1]  # the margin fits the longest label


def test_long_labels_are_cut_so_the_grid_stays_narrow() -> None:
    from precise_rl.images import MAX_LABEL

    images = torch.rand(2, 3, 8, 8)
    cut = labelled_grid(images, ["x" * 300, "short"], 1, scale=2)
    at_limit = labelled_grid(images, ["x" * MAX_LABEL, "short"], 1, scale=2)
    assert cut.shape[1] <= at_limit.shape[1] + 1
    assert at_limit.shape[1] > labelled_grid(images, ["x" * (MAX_LABEL // 2), "short"], 1, scale=2).shape[1]
