"""Nothing lost: run directories are never clobbered nor written by two processes, outputs never overwrite each other.

Each test states the fact it checks against something the code under test did not produce: the
bytes of files written before, the number of files on disk, a lock held by another process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from precise_rl.cli import main
from precise_rl.rl.checkpoint import list_checkpoints

from . import toy_task

toy_task.register()

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **train: object) -> Path:
    cfg = json.loads(json.dumps(toy_task.TOY_CONFIG))
    cfg["train"].update(train)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` except the lock file (it names the last holder)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".precise-rl.lock"
    }


def _one_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"precise-rl {command}: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- case 1: no clobbering


def test_training_into_a_directory_holding_a_run_is_refused_and_leaves_it_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out)]) == 0
    before = _digests(out)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5  # epoch 0 (eval) and epochs 1-4
    capsys.readouterr()
    # another recipe (one epoch, another seed) into the same directory: refused before any work
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1", "seed=9"]) == 2
    line = _one_error(capsys, "train")
    assert "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert _digests(out) == before  # not one byte changed


def test_overwrite_replaces_the_old_run_whole_and_prunes_only_its_own_checkpoints(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out)]) == 0  # checkpoints of epochs 2 and 4 (keep=2)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["epoch_000002", "epoch_000004"]
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1", "--overwrite"]) == 0
    # the new one-epoch run alone: its own checkpoint kept (the old epochs 2 and 4 would have outlived it)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["epoch_000001"]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 1
    assert not list((out / "samples").glob("epoch_0004_*"))  # no sample grid of the old run is left


def test_resume_into_its_own_directory_is_allowed_and_overwrite_with_resume_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=2"]) == 0
    assert main(["train", "--resume", str(out), "train.epochs=4"]) == 0
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4]
    capsys.readouterr()
    before = _digests(out)
    assert main(["train", "--resume", str(out), "--overwrite", "train.epochs=5"]) == 2
    assert "--overwrite would delete the run" in _one_error(capsys, "train")
    assert _digests(out) == before


def test_a_bad_config_is_reported_before_the_directory_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert main(["train", "--output", str(out), "train.lr=-1"]) == 2
    _one_error(capsys, "train")
    assert not out.exists()


# --------------------------------------------------------------------------- case 2: one writer at a time

_HOLDER = """
import sys, time
from precise_rl.rl.rundir import lock_run_dir
with lock_run_dir(sys.argv[1], "precise-rl train (test holder)"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock(directory: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # blocks until the lock is held (or the holder died)
    assert line.strip() == "locked", proc.stderr.read().decode() if proc.stderr else line
    return proc


@pytest.mark.parametrize("command", ["train", "resume", "eval"])
def test_a_directory_in_use_by_a_live_process_is_refused_and_free_once_it_is_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "run"
    if command != "train":
        assert main(["train", str(cfg), "--output", str(out), "train.epochs=2"]) == 0
    argv = {
        "train": ["train", str(cfg), "--output", str(out), "train.epochs=1"],
        "resume": ["train", "--resume", str(out), "train.epochs=3"],
        "eval": ["eval", str(out), "--samplers", "ode"],
    }[command]
    before = _digests(out) if out.exists() else {}
    proc = _hold_lock(out)
    try:
        capsys.readouterr()
        assert main(argv) == 2
        line = _one_error(capsys, "eval" if command == "eval" else "train")
        assert f"is in use by process {proc.pid}" in line, line
        assert _digests(out) == before  # the refused command wrote nothing
    finally:
        proc.send_signal(signal.SIGKILL)  # the holder dies without any clean-up of its own
        proc.wait(timeout=30)
    # the dead holder's lock is stale: the kernel released it, and the command now runs
    assert main(argv) == 0


def test_the_lock_is_released_when_the_command_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from precise_rl.rl.rundir import lock_run_dir

    out = tmp_path / "run"
    # fails inside the locked block (the prompts file is missing: found when the trainer is built)
    assert main(["train", "--output", str(out), f"prompts.train={tmp_path / 'none.txt'}"]) == 2
    with lock_run_dir(out):  # would raise RunDirBusy if the failed command had kept it
        pass


def test_two_locks_of_one_directory_exclude_each_other_within_a_process(tmp_path: Path) -> None:
    from precise_rl.rl.rundir import RunDirBusy, lock_run_dir

    with lock_run_dir(tmp_path / "d"):
        with pytest.raises(RunDirBusy, match=f"in use by process {os.getpid()}"):
            with lock_run_dir(tmp_path / "d"):
                pass
    with lock_run_dir(tmp_path / "d"):
        pass


def test_two_train_commands_at_once_never_interleave_metrics(tmp_path: Path) -> None:
    """Two real ``train`` processes started together on one directory: one runs, the other is refused."""
    cfg = _config(tmp_path, epochs=3)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    code = (
        "import sys; from tests import toy_task; toy_task.register(); from precise_rl.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", code, "train", str(cfg), "--output", str(out)]
    procs = [subprocess.Popen([*argv, f"seed={s}"], cwd=ROOT, env=env, stderr=subprocess.PIPE) for s in (1, 2)]
    deadline = time.monotonic() + 300  # a bound on a hang, not a timing assertion
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        results.append((proc.returncode, err.decode()))
    codes = sorted(rc for rc, _ in results)
    # Either one ran while the other was refused (in use / already holds a run), or, if the second
    # started only after the first ended, it was refused as a directory holding a run: never two writers.
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    # "in use by process N (...)", or "by another process" when the holder was still writing its lock file
    assert "is in use by" in refused or "already holds a run" in refused, refused
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]
    winner_seed = yaml.safe_load((out / "config.yaml").read_text())["seed"]
    assert json.loads((out / "summary.json").read_text())["seed"] == winner_seed


# --------------------------------------------------------------------------- case 3: sample names are unique


def test_sample_never_overwrites_its_own_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long_start = "a bold handwritten 7 drawn carefully with a thick black marker on a white page, "
    prompts = [
        "a bold 7",
        "a bold 7!",
        "A  bold 7",
        long_start + "first version",
        long_start + "second version",
        "a bold 7",  # the same prompt twice: two entries, two sets of files
    ]
    out = tmp_path / "samples"
    argv = ["sample", "--model", "digits", "--sampler", "ode", "--steps", "2", "--num-images", "2", "-o", str(out)]
    for p in prompts:
        argv += ["--prompt", p]
    assert main(argv) == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == len(prompts) * 2  # one file per image, as many as were drawn
    record = json.loads((out / "samples.json").read_text())
    assert [e["prompt"] for e in record["prompts"]] == prompts
    listed = [f for e in record["prompts"] for f in e["files"]]
    assert len(set(listed)) == len(listed) == len(pngs)
    assert sorted(Path(f) for f in listed) == pngs
    assert f"wrote {len(pngs)} images" in capsys.readouterr().out


# --------------------------------------------------------------------------- case 4: eval loses nothing


def _trained(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    assert main(["train", str(_config(tmp_path)), "--output", str(out), "train.epochs=2"]) == 0
    return out


def test_eval_refuses_an_empty_sampler_list_and_keeps_the_earlier_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _trained(tmp_path)
    assert main(["eval", str(run), "--samplers", "ode"]) == 0
    before = (run / "eval.json").read_bytes()
    assert json.loads(before)["results"]
    capsys.readouterr()
    for flags in (["--samplers", ","], ["--steps", ","]):
        assert main(["eval", str(run), *flags]) == 2
        assert "names no" in _one_error(capsys, "eval")
    assert (run / "eval.json").read_bytes() == before


@pytest.mark.parametrize("where", ["directory", "missing-parent", "unwritable"])
def test_eval_checks_its_output_before_evaluating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    run = _trained(tmp_path)
    target = {
        "directory": tmp_path,
        "missing-parent": tmp_path / "no" / "such" / "eval.json",
        "unwritable": tmp_path / "ro" / "eval.json",
    }[where]
    if where == "unwritable":
        target.parent.mkdir()
        target.parent.chmod(0o500)
        if os.access(target.parent, os.W_OK):  # as root permissions do not bind; /proc takes no new file
            target = Path("/proc/precise-rl-eval.json")
    from precise_rl.rl.trainer import GRPOTrainer

    evaluated = []
    monkeypatch.setattr(GRPOTrainer, "evaluate", lambda self, *a, **k: evaluated.append(1) or {})
    capsys.readouterr()
    try:
        assert main(["eval", str(run), "--samplers", "ode", "--output", str(target)]) == 2
    finally:
        if where == "unwritable":
            target.parent.chmod(0o700)
    line = _one_error(capsys, "eval")
    assert str(target) in line
    assert not evaluated  # refused before any evaluation work


def test_eval_names_its_own_arguments_not_a_resume_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "nope")]) == 2
    line = _one_error(capsys, "eval")
    assert "resume" not in line and f"run directory {str(tmp_path / 'nope')!r} does not exist" in line
    run = _trained(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(run), "--checkpoint", str(tmp_path / "nockpt")]) == 2
    line = _one_error(capsys, "eval")
    assert "resume" not in line and "--checkpoint" in line
