"""The training state: the counters a checkpoint saves and a resume restores, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Where a run stands. Checkpoints save the first six fields (``state.json``); the rest are per session."""

    epoch: int = 0  #: completed epochs
    global_step: int = 0  #: optimizer steps taken since the start of the run
    elapsed: float = 0.0  #: seconds of the run so far (rollouts, rewards, training, evaluations)
    train_elapsed: float = 0.0  #: seconds of the epochs themselves (no evaluation, no checkpoint)
    first_eval: dict[str, float] | None = None  #: the evaluation before training
    #: model evaluations spent on training so far, every process's: rollout forwards (one per sample and step)
    #: and the training passes' forwards and backwards (one each per row; an old or reference policy's too)
    model_evals: float = 0.0
    #: rows per training forward; with ``train.forward_batch: auto`` chosen at the first training pass and
    #: kept in the checkpoints, so that a resumed run chunks its passes as the run did
    forward_batch: int | None = None
    nonfinite_streak: int = 0  #: updates lost to a bad number in a row
    skipped_updates: int = 0  #: updates lost to a bad number in this session
    resumed_from: Path | None = None  #: the checkpoint this session started from

    def saved(self) -> dict[str, Any]:
        """The fields ``state.json`` holds."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "elapsed_s": self.elapsed,
            "train_elapsed_s": self.train_elapsed,
            "first_eval": self.first_eval,
            "forward_batch": self.forward_batch,
            "model_evals": self.model_evals,
        }

    def restore(self, saved: dict[str, Any], keep_forward_batch: bool) -> None:
        """Take the fields of a checkpoint's ``state.json`` (``keep_forward_batch``: the rows ``auto`` chose)."""
        self.epoch = int(saved["epoch"])
        self.global_step = int(saved["global_step"])
        self.elapsed = float(saved.get("elapsed_s", 0.0))
        self.train_elapsed = float(saved.get("train_elapsed_s", 0.0))
        self.first_eval = saved.get("first_eval")
        self.model_evals = float(saved.get("model_evals", 0.0))
        if keep_forward_batch and isinstance(saved.get("forward_batch"), int):
            self.forward_batch = saved["forward_batch"]  # the rows the run chose, not a new measurement
