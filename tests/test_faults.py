"""Faults that must lose nothing: kill -9, a full disk, NaN rewards and gradients, bad checkpoints.

* ``kill -9`` of a training process at random moments, several times, resuming each time: the
  final weights, EMA, optimizer state and metrics are those of an uninterrupted run (bit for bit).
* A disk that fills up while a checkpoint is written (a real ``EFBIG`` from ``RLIMIT_FSIZE``), a
  file where the checkpoint directory should be, a read-only directory (not as root: root writes
  through ``chmod``), and a write failing at each step of a checkpoint: one sentence, no
  half-written checkpoint, and a resume from the last one reaches the uninterrupted weights.
* NaN or inf gradients skip their update (counted in ``skipped_updates``) and stop the run after
  ``train.max_nonfinite`` in a row, the last checkpoint intact. NaN or inf from any reward (one
  that may fail, a remote one, or an ordinary one) leaves those images out of the statistics and
  the update, counted in ``unscored_samples`` and ``unscored/<reward>`` (an ordinary reward is
  named in one warning); epochs with no finite reward at all count toward ``train.max_nonfinite``.
  A reward that returns the wrong shape stops the run with a checkpoint of the epochs done.
* Every file of a checkpoint, truncated or with one byte changed, is refused naming the file; a
  pickle that would run code is refused without running it.

The subprocess tests run the built-in digits task with ``python -m precise_rl.cli`` (one thread, so
that a resumed run can be compared bit for bit); the others run the toy task in this process.
"""

from __future__ import annotations

import builtins
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from precise_rl.cli import main
from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.rewards.base import Reward, register_reward
from precise_rl.rl import checkpoint as ckpt_mod
from precise_rl.rl.checkpoint import list_checkpoints, read_checkpoint, verify_checkpoint
from precise_rl.rl.trainer import GRPOTrainer

from . import toy_task

toy_task.register()
ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("elapsed_s", "train_elapsed_s")


# --------------------------------------------------------------------------- helpers


@register_reward("faults_brightness")
class FaultyBrightness(Reward):
    """The toy reward (mean pixel value), NaN (or ``value``) at the calls in ``bad_calls``, for ``rows`` or all.

    The trainer calls a reward once per rollout chunk (``train.rollout_batch_size`` images), so ``rows``
    are positions in a chunk. ``value`` is a number or its name ("nan", "inf", "-inf"), "short" (one
    score too few), "raise" (a UserError, as a reward raises for input it cannot score) or "runtime" (a
    RuntimeError, as a reward with a bug or out of device memory raises).
    """

    def __init__(
        self,
        bad_calls: Sequence[int] = (),
        rows: Sequence[int] | None = None,
        may_fail: bool = False,
        value: float | str = math.nan,
    ) -> None:
        self.bad_calls, self.rows, self.may_fail = set(bad_calls), rows, may_fail
        self.value = value if value in ("short", "raise", "runtime") else float(value)
        self.calls = 0

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        r = images.flatten(1).mean(dim=1).clone()
        if self.calls in self.bad_calls:
            if self.value == "raise":
                raise UserError(f"faults_brightness cannot score call {self.calls}")
            if self.value == "runtime":
                raise RuntimeError(f"CUDA out of memory at call {self.calls}\nsecond line of the message")
            if self.value == "short":
                r = r[:-1]
            else:
                r[list(self.rows) if self.rows is not None else slice(None)] = self.value
        self.calls += 1
        return {"faults_brightness": r}


class _Late:
    """A background scoring whose result is ``scores``, or raises RuntimeError when ``fail``."""

    def __init__(self, scores: torch.Tensor, fail: bool, call: int) -> None:
        self.scores, self.fail, self.call = scores, fail, call

    def done(self) -> bool:
        return True

    def result(self) -> torch.Tensor:
        if self.fail:
            raise RuntimeError(f"the connection pool broke at call {self.call}")
        return self.scores


@register_reward("faults_late")
class LateFailure(Reward):
    """Mean pixel, scored in the background like a remote reward (a ``submit`` method); the result of the calls
    in ``bad_calls`` raises a RuntimeError, so the failure shows only when the trainer reads the scores."""

    def __init__(self, bad_calls: Sequence[int] = ()) -> None:
        self.bad_calls, self.calls = set(bad_calls), 0

    def submit(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> _Late:
        call, self.calls = self.calls, self.calls + 1
        return _Late(images.flatten(1).mean(dim=1), call in self.bad_calls, call)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return self.submit(images, prompts, metadata).result()


class RankFaults(Reward):
    """Mean pixel ``r`` and an extra field ``plus``: ``r + 10`` on process 0, ``r + 20`` on the others.

    On process ``rank`` (the launcher's ``RANK``) alone, the call ``no_extra`` returns no ``plus`` (as a remote
    reward whose server answered none of the process's requests) and the call ``fail`` raises a RuntimeError.
    """

    def __init__(self, rank: int = 1, no_extra: int = -1, fail: int = -1) -> None:
        self.rank, self.no_extra, self.fail, self.calls = rank, no_extra, fail, 0

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        me = int(os.environ.get("RANK", "0"))
        call, self.calls = self.calls, self.calls + 1
        if me == self.rank and call == self.fail:
            raise RuntimeError(f"process {me} fell over at call {call}")
        r = images.flatten(1).mean(dim=1)
        out = {self.name: r}
        if not (me == self.rank and call == self.no_extra):
            out["plus"] = r + (10.0 if me == 0 else 20.0)
        return out


def _toy(epochs: int = 3, reward: dict | None = None, **train: Any) -> dict[str, Any]:
    """The toy config without evaluation (a reward is then called once per epoch), a checkpoint per epoch."""
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["train"].update(epochs=epochs, **train)
    data["eval"]["every"] = 0
    data["checkpoint"] = {"every": 1, "keep": 10}
    data["reward"] = {"weights": {"faults_brightness": 1.0}, "options": {"faults_brightness": reward or {}}}
    return data


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _metrics(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time_")} for r in rows]


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers equal bit for bit (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        assert torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and sorted(a, key=str) == sorted(b, key=str), (where, sorted(a), sorted(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def _assert_same_checkpoint(got: Path, want: Path) -> None:
    """Weights, EMA, optimizer state and counters of two checkpoints equal bit for bit."""
    g_tensors, g_objects, g_state = read_checkpoint(got)
    w_tensors, w_objects, w_state = read_checkpoint(want)
    _assert_same(g_tensors, w_tensors, "tensors")
    _assert_same(g_objects, w_objects, "optimizer")
    for key in ("epoch", "global_step", "ema_steps", "first_eval", "param_names"):
        _assert_same(g_state[key], w_state[key], key)


def _no_leftovers(root: Path) -> None:
    left = [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert not left, left


# --------------------------------------------------------------------------- subprocesses on the digits task

DIGITS = [
    "seed=11",
    "train.epochs=8",
    "train.groups_per_epoch=4",
    "train.group_size=4",
    "train.batch_size=4",
    "train.grad_accum=2",
    "train.rollout_batch_size=8",
    "train.lr=1e-3",
    "algorithm.clip_range=0.2",
    "sampler.num_steps=4",
    "eval.every=4",
    "eval.max_prompts=3",
    "eval.samples_per_prompt=1",
    "eval.num_steps=4",
    "eval.grid_prompts=0",
    "train.ema.every=1",
    "checkpoint.every=1",
    "checkpoint.keep=2",
    "logging.tensorboard=false",
    "logging.progress=false",
]
EPOCHS = 8


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _start(run: Path, log: Path) -> subprocess.Popen:
    """``precise-rl train`` as a user runs it: fresh, or ``--resume`` once the run has a checkpoint.

    A fresh start says ``--overwrite``: a run killed after logging an epoch but before its first
    checkpoint holds metrics that ``train`` refuses to replace unless told to.
    """
    fresh = [*DIGITS, "--output", str(run), "--overwrite"]
    args = ["--resume", str(run)] if list_checkpoints(run / "checkpoints") else fresh
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "precise_rl.cli", "train", *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait_until_started(proc: subprocess.Popen, run: Path, since_ns: int) -> bool:
    """Wait until the run wrote its config.yaml (set-up done); False if the process ended first."""
    cfg = run / "config.yaml"
    while proc.poll() is None:
        if cfg.exists() and cfg.stat().st_mtime_ns >= since_ns:
            return True
        time.sleep(0.005)
    return False


def _newest_epoch(run: Path) -> int:
    ckpts = list_checkpoints(run / "checkpoints")
    return int(ckpts[-1].name.split("_")[1]) if ckpts else 0


def _logged_epoch(run: Path) -> int:
    """The last epoch in metrics.jsonl (-1 before the first line)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["epoch"])
        except (ValueError, KeyError):
            continue
    return -1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The reference run, and the time of one of its epochs with its checkpoint (to place the kills)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    log = run.parent / "stderr.txt"
    proc = _start(run, log)
    proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    last, before = (p.stat().st_mtime for p in reversed(list_checkpoints(run / "checkpoints")))
    return run, max(last - before, 0.01)


def _assert_matches_uninterrupted(run: Path, reference: Path, note: str = "") -> None:
    want = list_checkpoints(reference / "checkpoints")
    got = list_checkpoints(run / "checkpoints")
    assert [p.name for p in got] == [p.name for p in want], note
    _no_leftovers(run / "checkpoints")
    for g, w in zip(got, want, strict=True):
        _assert_same_checkpoint(g, w)
    _assert_same(_metrics(run), _metrics(reference), "metrics")
    assert json.loads((run / "summary.json").read_text())["epochs"] == EPOCHS


def test_a_resume_finishes_the_prune_that_a_kill_after_a_checkpoint_left_undone(
    uninterrupted: tuple[Path, float], tmp_path: Path
) -> None:
    """Killed between writing a checkpoint and pruning the old ones, a run holds one checkpoint too many; its
    resume prunes it as the save would have (here: an extra older checkpoint beside the reference's two)."""
    reference, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    kept = list_checkpoints(run / "checkpoints")
    older = run / "checkpoints" / f"epoch_{int(kept[0].name.split('_')[1]) - 1:06d}"
    shutil.copytree(kept[0], older)
    assert [p.name for p in list_checkpoints(run / "checkpoints")][0] == older.name
    proc = _start(run, tmp_path / "stderr.txt")
    proc.wait(timeout=300)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    _assert_matches_uninterrupted(run, reference)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_reaches_the_uninterrupted_run(
    uninterrupted: tuple[Path, float], tmp_path: Path
) -> None:
    """Three kills, each at a random moment of a random epoch still to come (rollout, update, logging,
    checkpoint write or pruning), then ``--resume`` as a user would; PRECISE_RL_KILL_SEED repeats a draw."""
    reference, epoch_s = uninterrupted
    seed = int(os.environ.get("PRECISE_RL_KILL_SEED") or int.from_bytes(os.urandom(4), "little"))
    rng = random.Random(seed)
    run = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    history: list[str] = []
    note = lambda: f"PRECISE_RL_KILL_SEED={seed}: {history}"  # noqa: E731
    kills = 0
    while kills < 3:
        done = _newest_epoch(run)
        if done == EPOCHS:
            break  # killed after the last checkpoint, while the run wrote its summary: the resume below ends it
        since = time.time_ns()
        proc = _start(run, log)
        # After epoch `target` is logged, a moment within the next one and a half epochs.
        target = rng.randint(done, EPOCHS - 1)
        delay = rng.uniform(0.0, 1.5 * epoch_s)
        started = _wait_until_started(proc, run, since)
        while started and proc.poll() is None and _logged_epoch(run) < target:
            time.sleep(0.001)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=300)
        history.append(
            f"from {done}: after epoch {target} + {delay:.3f}s -> rc {proc.returncode}, {_newest_epoch(run)}"
        )
        assert proc.returncode == (-signal.SIGKILL if killed else 0), (note(), log.read_text()[-3000:])
        # Whatever the moment, every checkpoint that resume could pick is whole.
        for c in list_checkpoints(run / "checkpoints"):
            verify_checkpoint(c)
        if not killed:
            break
    if killed:
        proc = _start(run, log)
        proc.wait(timeout=300)
        assert proc.returncode == 0, (note(), log.read_text()[-3000:])
    _assert_matches_uninterrupted(run, reference, note())
    print(note())


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("resource"), "prlimit"), reason="needs Linux prlimit")
def test_disk_full_while_writing_a_checkpoint_is_one_sentence_and_resume_loses_nothing(
    uninterrupted: tuple[Path, float], tmp_path: Path
) -> None:
    """A file-size limit (RLIMIT_FSIZE) set on the running process: the next checkpoint write fails with EFBIG."""
    import resource

    reference, _ = uninterrupted
    run = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    proc = _start(run, log)
    while proc.poll() is None and len(list_checkpoints(run / "checkpoints")) < 2:
        time.sleep(0.002)
    limit = 256 * 1024  # below the 1.4 MB weight files, above metrics.jsonl
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    proc.wait(timeout=300)
    lines = log.read_text().strip().splitlines()
    assert proc.returncode == 2, lines[-20:]
    assert len(lines) == 1, lines
    match = re.fullmatch(
        r"precise-rl train: error: could not write checkpoint '(.+/epoch_(\d{6}))': File too large "
        r"\(nothing was left half-written\)",
        lines[0],
    )
    assert match, lines[0]
    failed = int(match.group(2))
    ckpts = list_checkpoints(run / "checkpoints")
    assert ckpts and int(ckpts[-1].name.split("_")[1]) == failed - 1
    _no_leftovers(run / "checkpoints")
    for c in ckpts:
        verify_checkpoint(c)
    proc = _start(run, log)  # the disk has room again
    proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    _assert_matches_uninterrupted(run, reference)


# --------------------------------------------------------------------------- unwritable checkpoint directories


def test_a_file_where_the_checkpoint_directory_should_be_is_one_sentence_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What root cannot get from chmod: the directory cannot be made at all. A file of the user's in its place
    is one the run did not write, so the start refuses the directory, naming it, and leaves the file alone."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("in the way")
    cfg = _write_yaml(tmp_path / "toy.yaml", _toy())
    assert main(["train", str(cfg), "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"precise-rl train: error: output directory '{run}' holds files precise-rl did not write (checkpoints); "
    ), err
    assert (run / "checkpoints").read_text() == "in the way"
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_checkpoint_directory_is_one_sentence_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints").chmod(0o555)
    try:
        cfg = _write_yaml(tmp_path / "toy.yaml", _toy())
        assert main(["train", str(cfg), "--output", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"precise-rl train: error: checkpoint directory '{run / 'checkpoints'}' is not writable: Permission denied"
        ]
        assert list((run / "checkpoints").iterdir()) == []
    finally:
        (run / "checkpoints").chmod(0o755)


TORCH_FULL = "[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: write failed"


def _fail_in(monkeypatch: pytest.MonkeyPatch, stage: str, when: Any) -> None:
    """Make one step of ``write_checkpoint`` fail while ``when()`` is true, as a full or read-only disk does."""

    def boom(real: Any, exc: BaseException) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if when():
                raise exc
            return real(*args, **kwargs)

        return wrapped

    full = OSError(28, "No space left on device")
    if stage == "safetensors":
        monkeypatch.setattr(ckpt_mod, "save_file", boom(ckpt_mod.save_file, full))
    elif stage == "torch.save":  # torch wraps the OS error in a RuntimeError
        monkeypatch.setattr(
            ckpt_mod.torch,
            "save",
            boom(
                torch.save,
                RuntimeError(TORCH_FULL),
            ),
        )
    elif stage == "manifest":
        monkeypatch.setattr(ckpt_mod, "_sha256", boom(ckpt_mod._sha256, OSError(5, "Input/output error")))
    elif stage == "rename":
        monkeypatch.setattr(ckpt_mod.os, "replace", boom(os.replace, OSError(30, "Read-only file system")))
    else:
        raise AssertionError(stage)


@pytest.mark.parametrize(
    ("stage", "reason"),
    [
        ("safetensors", "No space left on device"),
        (
            "torch.save",
            TORCH_FULL,
        ),
        ("manifest", "Input/output error"),
        ("rename", "Read-only file system"),
    ],
)
def test_a_checkpoint_write_that_fails_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, reason: str
) -> None:
    data = _toy(epochs=3)
    clean = tmp_path / "clean"
    GRPOTrainer(config_from_dict(data), clean).run()
    run = tmp_path / "run"
    trainer = GRPOTrainer(config_from_dict(data), run)
    _fail_in(monkeypatch, stage, lambda: trainer.epoch == 2)
    with pytest.raises(UserError) as info:
        trainer.run()
    monkeypatch.undo()
    message = str(info.value)
    assert message == (
        f"could not write checkpoint '{run / 'checkpoints' / 'epoch_000002'}': {reason} (nothing was left half-written)"
    )
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["epoch_000001"]
    _no_leftovers(run / "checkpoints")
    _assert_same_checkpoint(run / "checkpoints" / "epoch_000001", clean / "checkpoints" / "epoch_000001")
    assert main(["train", "--resume", str(run)]) == 0
    for name in ("epoch_000002", "epoch_000003"):
        _assert_same_checkpoint(run / "checkpoints" / name, clean / "checkpoints" / name)


# --------------------------------------------------------------------------- NaN and inf


def _poison_gradients(trainer: GRPOTrainer, bad_updates: set[int] | Any, value: float) -> list[dict]:
    """Turn one gradient NaN/inf just before clipping at the chosen updates; returns the weights seen at each."""
    clip = trainer.accelerator.clip_grad_norm_
    seen: list[dict] = []

    def poisoned(params: Any, max_norm: float) -> torch.Tensor:
        k = len(seen)
        seen.append({n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)})
        if k in bad_updates:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = value
        return clip(params, max_norm)

    trainer.accelerator.clip_grad_norm_ = poisoned
    return seen


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_bad_gradient_skips_its_update_and_is_counted(tmp_path: Path, value: float) -> None:
    trainer = GRPOTrainer(config_from_dict(_toy(epochs=3, max_nonfinite=2)), tmp_path)
    bad = {1, 4}  # never two in a row: the run goes on
    seen = _poison_gradients(trainer, bad, value)
    trainer.run()
    records = _metrics(tmp_path)
    n = len(seen)
    assert n == 9  # 3 epochs of 3 groups of 4, 4 samples per update
    assert [r["skipped_updates"] for r in records] == [1.0, 1.0, 0.0]
    assert records[-1]["optimizer_steps"] == trainer.global_step == n - len(bad)
    for k in range(n - 1):
        same = all(torch.equal(seen[k][p], seen[k + 1][p]) for p in seen[k])
        assert same == (k in bad), k  # a skipped update leaves every weight as it was, the others move them
    for state in trainer.optimizer.state.values():
        assert float(state["step"]) == n - len(bad)
    for c in list_checkpoints(tmp_path / "checkpoints"):
        tensors, _, _ = read_checkpoint(c)
        assert all(bool(torch.isfinite(t).all()) for group in tensors.values() for t in group.values())


def test_bad_gradients_in_a_row_stop_the_run_and_resume_from_the_last_checkpoint_loses_nothing(
    tmp_path: Path,
) -> None:
    data = _toy(epochs=3, max_nonfinite=2)
    clean = tmp_path / "clean"
    GRPOTrainer(config_from_dict(data), clean).run()
    run = tmp_path / "run"
    trainer = GRPOTrainer(config_from_dict(data), run)
    seen = _poison_gradients(trainer, range(4, 100), math.nan)  # from epoch 2's second update on
    with pytest.raises(UserError) as info:
        trainer.run()
    assert len(seen) == 6  # updates 4 and 5 skipped: two in a row
    assert str(info.value) == (
        "training stopped: 2 updates in a row had a NaN or infinite loss or gradient, or rewards that scored no "
        f"image (train.max_nonfinite); the last good checkpoint is '{run / 'checkpoints' / 'epoch_000001'}' "
        f"(continue with --resume '{run}')"
    )
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["epoch_000001"]
    _assert_same_checkpoint(run / "checkpoints" / "epoch_000001", clean / "checkpoints" / "epoch_000001")
    assert main(["train", "--resume", str(run)]) == 0  # the cause gone
    for name in ("epoch_000002", "epoch_000003"):
        _assert_same_checkpoint(run / "checkpoints" / name, clean / "checkpoints" / name)


@pytest.mark.parametrize(
    ("value", "chunk", "call", "reason"),
    [
        ("short", 64, 2, "reward 'faults_brightness' returned shape (11,); expected (12,), one score per image"),
        ("raise", 5, 7, "faults_brightness cannot score call 7"),  # epoch 3's second chunk of three
        ("runtime", 5, 7, "reward 'faults_brightness' raised RuntimeError: CUDA out of memory at call 7"),
    ],
)
def test_a_reward_that_errs_stops_with_a_checkpoint_of_the_epochs_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, chunk: int, call: int, reason: str
) -> None:
    """A reward that returned one score too few, or raised, at epoch 3: nothing is trained on it, epochs 1-2
    are saved; a reward that raises on one chunk stops the run when the scores are read, not mid-rollout."""
    clean_cfg = _toy(epochs=4, rollout_batch_size=chunk)
    clean = tmp_path / "clean"
    GRPOTrainer(config_from_dict(clean_cfg), clean).run()
    data = _toy(epochs=4, rollout_batch_size=chunk, reward={"bad_calls": [call], "value": value})
    data["checkpoint"]["every"] = 10  # only the stop itself writes one before the end
    run = tmp_path / "run"
    assert main(["train", str(_write_yaml(tmp_path / "short.yaml", data)), "--output", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"precise-rl train: error: training stopped: {reason}; the checkpoint of epoch 2 is "
        f"{run / 'checkpoints' / 'epoch_000002'}; continue with --resume {run} once the reward is fixed"
    ]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["epoch_000002"]
    _assert_same_checkpoint(run / "checkpoints" / "epoch_000002", clean / "checkpoints" / "epoch_000002")
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]
    fixed = _write_yaml(tmp_path / "fixed.yaml", clean_cfg)
    assert main(["train", str(fixed), "--resume", str(run)]) == 0
    _assert_same_checkpoint(run / "checkpoints" / "epoch_000004", clean / "checkpoints" / "epoch_000004")
    _assert_same(_metrics(run), _metrics(clean), "metrics")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("short", "reward 'faults_brightness' returned shape (1,); expected (2,), one score per image"),
        ("runtime", "reward 'faults_brightness' raised RuntimeError: CUDA out of memory at call 3"),
    ],
)
def test_a_reward_that_errs_in_an_evaluation_stops_with_a_checkpoint_of_the_epochs_done(
    tmp_path: Path, value: str, reason: str
) -> None:
    """Calls: 0 the evaluation before training, 1 and 2 epochs 1 and 2, 3 the evaluation after epoch 2 (two
    images), which errs: the run stops with the checkpoint of epoch 2, written by the stop, and epoch 2 logged."""
    data = _toy(epochs=4, reward={"bad_calls": [3], "value": value})
    data["eval"]["every"] = 2
    data["checkpoint"]["every"] = 10
    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        GRPOTrainer(config_from_dict(data), run).run()
    assert str(info.value) == (
        f"training stopped: {reason}; the checkpoint of epoch 2 is {run / 'checkpoints' / 'epoch_000002'}; "
        f"continue with --resume {run} once the reward is fixed"
    )
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["epoch_000002"]
    verify_checkpoint(run / "checkpoints" / "epoch_000002")
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert "eval_ode_reward" in records[0] and not any(k.startswith("eval_") for k in records[2])
    resumed = GRPOTrainer(config_from_dict(_toy(epochs=4)), run, resume=run)
    assert resumed.epoch == 2


def test_a_reward_whose_scores_raise_when_read_stops_with_a_checkpoint_of_the_epochs_done(tmp_path: Path) -> None:
    """A RuntimeError out of a background scoring (the remote rewards' way) at epoch 3, raised where the trainer
    reads the scores: one sentence naming the reward, the checkpoint of epochs 1-2 written by the stop."""
    data = _toy(epochs=4)
    data["reward"] = {"weights": {"faults_late": 1.0}, "options": {"faults_late": {"bad_calls": [2]}}}
    data["checkpoint"]["every"] = 10
    run = tmp_path / "run"
    trainer = GRPOTrainer(config_from_dict(data), run)
    with pytest.raises(UserError) as info:
        trainer.run()
    assert str(info.value) == (
        "training stopped: reward 'faults_late' raised RuntimeError: the connection pool broke at call 2; "
        f"the checkpoint of epoch 2 is {run / 'checkpoints' / 'epoch_000002'}; continue with --resume {run} "
        "once the reward is fixed"
    )
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["epoch_000002"]
    verify_checkpoint(run / "checkpoints" / "epoch_000002")
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def _expected_advantages(r: np.ndarray, group_size: int, clip: float = 5.0) -> np.ndarray:
    """z-score over the scored images, then (z - group mean) / (group std + 1e-4), in float64; NaN stays NaN."""
    ok = ~np.isnan(r)
    z = (r - r[ok].mean()) / (r[ok].std() + 1e-8)
    adv = np.full_like(r, np.nan)
    for g in range(len(r) // group_size):
        sl = slice(g * group_size, (g + 1) * group_size)
        zg, okg = z[sl], ok[sl]
        vals = zg[okg]
        std = vals.std()
        a = np.zeros_like(vals) if std == 0 else (vals - vals.mean()) / (std + 1e-4)
        out = np.full(group_size, np.nan)
        out[okg] = np.clip(a, -clip, clip)
        adv[sl] = out
    return adv


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_or_inf_from_an_ordinary_reward_leaves_single_images_out_of_the_epoch(tmp_path: Path, value: str) -> None:
    """Chunks of 3: the epoch's 12 images are scored in 4 calls, a random image of two random calls gets NaN/inf.
    The advantages are those of float64 arithmetic that z-scores the other images over the whole epoch (not
    chunk by chunk: chunks of 3 cut across the groups of 4), then over each group's remaining images."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    calls, rows = sorted(rng.sample(range(4), 2)), [rng.randrange(3)]
    bad_rows = [3 * c + r for c in calls for r in rows]
    note = f"bad images {bad_rows}"
    data = _toy(epochs=1, rollout_batch_size=3, reward={"bad_calls": calls, "rows": rows, "value": value})
    trainer = GRPOTrainer(config_from_dict(data), tmp_path)
    batch = trainer.collect(0)
    assert len(batch.pending) == 4
    comps, adv, raw = trainer.score(batch)
    r = batch.images.double().flatten(1).mean(dim=1).numpy()
    r[bad_rows] = np.nan
    assert torch.isnan(comps["faults_brightness"]).nonzero().flatten().tolist() == bad_rows, note
    assert torch.isnan(raw).nonzero().flatten().tolist() == bad_rows, note
    np.testing.assert_allclose(adv.double().numpy(), _expected_advantages(r, 4), rtol=1e-4, atol=1e-5, err_msg=note)
    trained = torch.cat([m for u in trainer.update_plan(batch, adv, 0, 0) for m in u]).tolist()
    assert sorted(trained) == [i for i in range(12) if i not in bad_rows], note


def test_unscored_images_of_an_ordinary_reward_are_counted_and_named_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two images of epoch 1 and two of epoch 3 get NaN: counted in each epoch's metrics, one warning in all."""
    data = _toy(epochs=3, rollout_batch_size=3, reward={"bad_calls": [1, 10], "rows": [0, 2]})
    run = tmp_path / "run"
    assert main(["train", str(_write_yaml(tmp_path / "nan.yaml", data)), "--output", str(run)]) == 0
    records = _metrics(run)
    assert [r["unscored_samples"] for r in records] == [2, 0, 2]  # images 3, 5 of epoch 1, 6, 8 of epoch 3
    assert [r["unscored/faults_brightness"] for r in records] == [2, 0, 2]
    assert [r["skipped_updates"] for r in records] == [0.0, 0.0, 0.0]
    # epoch 1's reward is the mean over its other ten images (replayed: a reward does not change the rollouts)
    replay = GRPOTrainer(config_from_dict(_toy(epochs=1)), tmp_path / "replay", read_only=True).collect(0)
    brightness = replay.images.double().flatten(1).mean(dim=1)
    kept = [i for i in range(12) if i not in (3, 5)]
    assert records[0]["reward_mean"] == pytest.approx(float(brightness[kept].mean()), rel=1e-6)
    assert records[0]["reward/faults_brightness"] == pytest.approx(float(brightness[kept].mean()), rel=1e-6)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: reward 'faults_brightness' returned NaN or inf for 2 of the 12 images of epoch 1; such images are "
        "left out of training and counted in the metrics (unscored_samples, unscored/faults_brightness); this "
        "warning is not repeated"
    ]


def test_nan_from_a_reward_of_weight_0_is_counted_but_leaves_no_image_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reward of weight 0 is only logged: its NaN images are still trained on (the weighted reward scored
    them), not in unscored_samples, but counted in unscored/<name>, and the warning says so."""
    bad_rows = sorted(random.Random(int.from_bytes(os.urandom(4), "little")).sample(range(12), 2))
    data = _toy(epochs=1)
    data["reward"] = {
        "weights": {"faults_brightness": 1.0, "faults_brightness@zero": 0.0},
        "options": {"faults_brightness@zero": {"bad_calls": [0, 1], "rows": bad_rows}},
    }
    trainer = GRPOTrainer(config_from_dict(data), tmp_path / "a")
    batch = trainer.collect(0)
    comps, adv, raw = trainer.score(batch)
    assert torch.isnan(comps["faults_brightness@zero"]).nonzero().flatten().tolist() == bad_rows, bad_rows
    r = batch.images.double().flatten(1).mean(dim=1).numpy()
    np.testing.assert_allclose(adv.double().numpy(), _expected_advantages(r, 4), rtol=1e-4, atol=1e-5)
    trained = torch.cat([m for u in trainer.update_plan(batch, adv, 0, 0) for m in u]).tolist()
    assert sorted(trained) == list(range(12)), bad_rows
    trainer = GRPOTrainer(config_from_dict(data), tmp_path / "b")
    trainer.run()
    (record,) = _metrics(tmp_path / "b")
    assert record["unscored_samples"] == 0 and record["optimizer_steps"] == 3 and record["skipped_updates"] == 0
    assert record["unscored/faults_brightness@zero"] == 2 and record["unscored/faults_brightness"] == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: reward 'faults_brightness@zero' returned NaN or inf for 2 of the 12 images of epoch 1; its weight "
        "is 0: it is only logged, leaves no image out of training and is counted in the metrics "
        "(unscored/faults_brightness@zero); this warning is not repeated"
    ]


def test_nan_from_a_reward_that_may_fail_leaves_those_images_out_and_counts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_rows = sorted(random.Random(int.from_bytes(os.urandom(4), "little")).sample(range(12), 3))
    cfg = config_from_dict(_toy(epochs=1, reward={"bad_calls": [0], "rows": bad_rows, "may_fail": True}))
    trainer = GRPOTrainer(cfg, tmp_path / "a")
    batch = trainer.collect(0)
    _, adv, raw = trainer.score(batch)
    r = batch.images.double().flatten(1).mean(dim=1).numpy()
    r[bad_rows] = np.nan
    want = _expected_advantages(r, 4)
    assert torch.isnan(raw).nonzero().flatten().tolist() == bad_rows, bad_rows
    np.testing.assert_allclose(adv.double().numpy(), want, rtol=1e-4, atol=1e-5)
    plan = trainer.update_plan(batch, adv, 0, 0)
    trained = torch.cat([m for u in plan for m in u]).tolist()
    # the scored images are trained on, but one left alone in its group of 4 has no one to be compared
    # with (advantage 0), as a group of equal rewards
    scored = {g: [i for i in range(4 * g, 4 * g + 4) if i not in bad_rows] for g in range(3)}
    assert sorted(trained) == [i for rows in scored.values() if len(rows) > 1 for i in rows], bad_rows
    # A whole epoch (the same rollouts): the images are counted, the others trained on.
    trainer = GRPOTrainer(cfg, tmp_path / "b")
    trainer.run()
    (record,) = _metrics(tmp_path / "b")
    assert record["unscored_samples"] == 3 and record["optimizer_steps"] == len(plan) and record["skipped_updates"] == 0
    assert record["unscored/faults_brightness"] == 3
    assert "warning" not in capsys.readouterr().err  # a reward that may fail is not warned about


@pytest.mark.parametrize("may_fail", [True, False])
def test_epochs_in_which_no_image_could_be_scored_count_toward_the_stop(tmp_path: Path, may_fail: bool) -> None:
    """NaN for every image (a reward server answering errors, or a broken reward): no update can happen.
    Epoch 2 has none, epoch 3 trains again (the count starts over), epochs 4 and 5 have none: the run stops."""
    data = _toy(epochs=6, max_nonfinite=2, reward={"bad_calls": [1, 3, 4], "may_fail": may_fail})
    run = tmp_path / "run"
    trainer = GRPOTrainer(config_from_dict(data), run)
    with pytest.raises(UserError) as info:
        trainer.run()
    ckpts = run / "checkpoints"
    assert str(info.value) == (
        "training stopped: 2 updates in a row had a NaN or infinite loss or gradient, or rewards that scored no "
        f"image (train.max_nonfinite); the last good checkpoint is '{ckpts / 'epoch_000004'}' "
        f"(continue with --resume '{run}')"
    )
    records = _metrics(run)
    assert [
        (r["epoch"], r["unscored_samples"], r["unscored/faults_brightness"], r["optimizer_steps"]) for r in records
    ] == [
        (1, 0, 0, 3.0),
        (2, 12, 12, 3.0),
        (3, 0, 0, 6.0),
        (4, 12, 12, 6.0),
    ]
    assert [p.name for p in list_checkpoints(ckpts)] == [f"epoch_00000{k}" for k in range(1, 5)]
    for no_update, before in ((2, 1), (4, 3)):
        _assert_same(
            read_checkpoint(ckpts / f"epoch_00000{no_update}")[0], read_checkpoint(ckpts / f"epoch_00000{before}")[0]
        )
    for c in list_checkpoints(ckpts):
        verify_checkpoint(c)


# --------------------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy run with LoRA and EMA: checkpoints of epochs 1 and 2, each with an adapter directory."""
    run = tmp_path_factory.mktemp("lora") / "run"
    data = _toy(epochs=2, lora={"enabled": True, "rank": 2})
    GRPOTrainer(config_from_dict(data), run).run()
    return run


CHECKPOINT_FILES = [
    "trainable.safetensors",
    "ema.safetensors",
    "optimizer.pt",
    "state.json",
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
]


def test_the_checkpoint_files_are_those_listed(lora_run: Path) -> None:
    manifest = json.loads((lora_run / "checkpoints" / "epoch_000002" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(CHECKPOINT_FILES)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_checkpoint_file_is_refused_naming_it(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, damage: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    target = run / "checkpoints" / "epoch_000002" / name
    data = bytearray(target.read_bytes())
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    if damage == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(data))
    assert main(["train", "--resume", str(run)]) == 2, seed
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"precise-rl train: error: checkpoint file '{target}' is corrupt or truncated (checksum mismatch); "
        f"to go on from the one before, resume from '{run / 'checkpoints' / 'epoch_000001'}'"
    ], seed


def test_a_missing_or_damaged_manifest_is_refused(lora_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    manifest = run / "checkpoints" / "epoch_000002" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"precise-rl train: error: checkpoint '{manifest.parent}' has a missing or unreadable manifest.json; "
        f"to go on from the one before, resume from '{run / 'checkpoints' / 'epoch_000001'}'"
    ]


class _RunsCode:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (builtins.open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    ckpt = run / "checkpoints" / "epoch_000002"
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "x": _RunsCode(marker)}, ckpt / "optimizer.pt")
    # The manifest made to match, as an attacker would: the checksums alone cannot stop this file.
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"precise-rl train: error: checkpoint file '{ckpt / 'optimizer.pt'}' could not be loaded safely: "
    ), err
    assert not marker.exists()
    torch.load(ckpt / "optimizer.pt", weights_only=False)  # the file does hold code: unsafe loading runs it
    assert marker.exists()


# --------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_fault_on_one_process_is_handled_alike_on_every_process(tmp_path: Path) -> None:
    """Two processes (gloo) through ddp.yaml, each rolling out 2 groups of 4 per epoch:

    * epoch 2: the reward gives NaN for every image of process 1 only: both processes train on process 0's
      groups alone (their weights agree, else no checkpoint is written), the 8 images are counted, and the
      main process names the reward in one warning;
    * epoch 3: a NaN gradient on process 1 only makes both skip that update;
    * epochs 4 and 5: no image of either process gets a finite reward: both stop with the same sentence
      after train.max_nonfinite = 2 such epochs, the checkpoint of epoch 4 the last good one."""
    run = tmp_path / "run"
    env = _env()
    env.update(
        ACCELERATE_USE_CPU="true",
        PRECISE_RL_TEST_FAULTS=json.dumps({"nan_grad": [1, 3], "nan_reward": [1, 1]}),
    )
    reward = "tests.test_faults:FaultyBrightness"
    args = [a for a in DIGITS if not a.startswith(("train.epochs", "eval.every", "checkpoint.keep"))]
    args += [
        *("train.epochs=6", "train.max_nonfinite=2", "eval.every=0", "checkpoint.keep=10"),
        f"reward.weights={json.dumps({reward: 1.0})}",
        f"reward.options={json.dumps({reward: {'bad_calls': [3, 4]}})}",  # one call per epoch on each process
    ]
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2"),
        *("--main_process_port", str(_free_port())),
        *("tests/dist_entry.py", "train", *args, "--output", str(run)),
    ]
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:  # a hang at the distributed stop: show what each process said
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"the two processes did not end within 300 s; their stderr:\n{err[-8000:]}")
    ckpts = run / "checkpoints"
    sentence = (
        "precise-rl train: error: training stopped: 2 updates in a row had a NaN or infinite loss or gradient, or "
        f"rewards that scored no image (train.max_nonfinite); the last good checkpoint is "
        f"'{ckpts / 'epoch_000004'}' (continue with --resume '{run}')"
    )
    # Every process raises the same sentence and exits with code 2 (the launcher may end the second one
    # with SIGTERM before it prints); none hangs, aborts or shows a traceback of this package.
    assert res.returncode != 0
    assert res.stderr.count(sentence) >= 1, res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr and "SIGABRT" not in res.stderr, res.stderr[-3000:]
    assert str(ROOT / "src") not in res.stderr, res.stderr[-3000:]
    warning = f"warning: reward '{reward}' returned NaN or inf for 8 of the 16 images of epoch 2; "
    assert res.stderr.count(warning) == 1 and res.stderr.count("warning: reward") == 1, res.stderr[-3000:]
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["unscored_samples"] for r in records] == [0, 8, 0, 16]
    assert [r[f"unscored/{reward}"] for r in records] == [0, 8, 0, 16]
    # epoch 2 trains on 8 samples (one update of 2 x 4), epoch 3 skips one of its two, epoch 4 has none
    assert [r["skipped_updates"] for r in records] == [0.0, 0.0, 1.0, 0.0]
    assert [r["optimizer_steps"] for r in records] == [2.0, 3.0, 4.0, 4.0]
    # Written after the processes' weights were compared (they must agree for a checkpoint to exist).
    assert [p.name for p in list_checkpoints(ckpts)] == [f"epoch_00000{k}" for k in range(1, 5)]
    for c in list_checkpoints(ckpts):
        verify_checkpoint(c)
    _assert_same(read_checkpoint(ckpts / "epoch_000004")[0], read_checkpoint(ckpts / "epoch_000003")[0])
    assert not _same_weights(ckpts / "epoch_000002", ckpts / "epoch_000001")  # epoch 2 did train


@pytest.mark.slow
def test_fields_and_failures_of_a_reward_on_one_process_are_handled_alike_on_every_process(tmp_path: Path) -> None:
    """Two processes (gloo), one reward call per epoch on each: at epoch 2 process 1's reward has no extra field
    (NaN there: the processes gather the same fields, each paired with its own); at epoch 3 it raises a
    RuntimeError on process 1 alone: both stop with the same sentence after the checkpoint of epoch 2."""
    run = tmp_path / "run"
    env = _env()
    env["ACCELERATE_USE_CPU"] = "true"
    reward = "tests.test_faults:RankFaults"
    drop = ("train.epochs", "eval.every", "checkpoint.keep", "checkpoint.every")
    args = [a for a in DIGITS if not a.startswith(drop)]
    args += [
        *("train.epochs=4", "eval.every=0", "checkpoint.every=10", "checkpoint.keep=10"),
        f"reward.weights={json.dumps({reward: 1.0})}",
        f"reward.options={json.dumps({reward: {'rank': 1, 'no_extra': 1, 'fail': 2}})}",
    ]
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", "configs/accelerate/ddp.yaml", "--num_processes", "2"),
        *("--main_process_port", str(_free_port())),
        *("tests/dist_entry.py", "train", *args, "--output", str(run)),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    ckpts = run / "checkpoints"
    sentence = (
        f"precise-rl train: error: training stopped: reward '{reward}' raised RuntimeError: process 1 fell over at "
        f"call 2; the checkpoint of epoch 2 is {ckpts / 'epoch_000002'}; continue with --resume {run} once the "
        "reward is fixed"
    )
    assert res.returncode != 0
    assert res.stderr.count(sentence) >= 1, res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr and "SIGABRT" not in res.stderr, res.stderr[-3000:]
    assert str(ROOT / "src") not in res.stderr, res.stderr[-3000:]
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["unscored_samples"] for r in records] == [0, 0]
    # plus - r is 10 on process 0's images and 20 on process 1's: 15 over both, 10 +- 1 over process 0's alone
    gap = [r[f"reward/{reward}/plus"] - r[f"reward/{reward}"] for r in records]
    assert gap[0] == pytest.approx(15.0, abs=1e-4) and 9.0 <= gap[1] <= 11.0, gap
    assert [p.name for p in list_checkpoints(ckpts)] == ["epoch_000002"]
    verify_checkpoint(ckpts / "epoch_000002")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_checkpoint(a)[0]["trainable"], read_checkpoint(b)[0]["trainable"]
    return all(torch.equal(wa[n], wb[n]) for n in wa)


def test_a_process_group_that_will_not_be_left_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    """Leaving the group hung once (both processes in destroy_process_group after an agreed error): the exit
    code decided before it still comes out, after ``LEAVE_TIMEOUT_S``, and the process ends."""
    port = _free_port()
    code = (
        "import sys, time, torch.distributed as dist\n"
        "from precise_rl import cli\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
        "dist.destroy_process_group = lambda *a, **k: time.sleep(3600)\n"
        "cli.LEAVE_TIMEOUT_S = 1.0\n"
        "sys.exit(cli.main(['train', 'train.lr=-1']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "config key 'train.lr'" in done.stderr
    assert "leaving the process group did not finish within 1 s; exiting without it" in done.stderr
    assert time.monotonic() - t0 < 60
