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


# --------------------------------------------------------------------------- case 5: only the tool's own files


def test_a_fresh_start_refuses_a_directory_with_the_users_files_and_deletes_none_of_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "mine"
    photo = os.urandom(257)
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "photo.png").write_bytes(photo)
    (out / "eval.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    before = _digests(out)
    capsys.readouterr()
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1"]) == 2
    line = _one_error(capsys, "train")
    assert "did not write" in line and "--overwrite" in line and "samples/" in line and "notes.txt" in line
    assert _digests(out) == before
    # told to overwrite: what a run writes is replaced, the rest stays
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "samples" / "photo.png").exists()
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_a_fresh_start_clears_only_what_an_earlier_start_recorded(tmp_path: Path) -> None:
    from precise_rl.rl.rundir import MARKER_NAME

    cfg = _config(tmp_path)
    out = tmp_path / "run"
    # a start that fails before training (a missing prompt file) leaves the directory it did not make as it was
    out.mkdir()
    assert main(["train", str(cfg), "--output", str(out), f"prompts.train={tmp_path / 'none.txt'}"]) == 2
    created = set(json.loads((out / MARKER_NAME).read_text())["created"])
    assert {"config.yaml", "samples", "checkpoints", "metrics.jsonl"} <= created
    # what a start writes under the names it recorded is its own (here as an earlier start would leave them)
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / "epoch_0009_old.png").write_bytes(os.urandom(32))
    (out / "config.yaml").write_text("seed: 1\n")
    # the next start removes them without being told to, and they are not mixed into the new run
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1"]) == 0
    assert not (out / "samples" / "epoch_0009_old.png").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 1
    # the names recorded were those absent when the start began: a user's file is never among them
    (out / "notes.txt").write_text("mine")
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1", "--overwrite"]) == 0
    assert "notes.txt" not in json.loads((out / MARKER_NAME).read_text())["created"]
    assert (out / "notes.txt").read_text() == "mine"


def test_training_into_the_experiment_files_own_directory_never_overwrites_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    text = _config(tmp_path).read_text() + f"# {os.urandom(8).hex()}\n"
    (exp / "config.yaml").write_text(text)
    (exp / "samples").mkdir()
    (exp / "samples" / "ref.png").write_bytes(os.urandom(64))
    before = _digests(exp)
    monkeypatch.chdir(exp)
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main(["train", "config.yaml", "--output", ".", "train.epochs=1", *extra]) == 2
        line = _one_error(capsys, "train")
        assert "experiment file 'config.yaml'" in line and "would be overwritten" in line, line
        assert _digests(exp) == before
    # an experiment file in a folder the run would replace (with --overwrite) is kept too
    (exp / "samples" / "exp.yaml").write_text(text)
    capsys.readouterr()
    assert main(["train", "samples/exp.yaml", "--output", ".", "train.epochs=1", "--overwrite"]) == 2
    assert "would be overwritten" in _one_error(capsys, "train")
    assert (exp / "samples" / "exp.yaml").read_text() == text


@pytest.mark.parametrize("command", ["train", "sample", "eval", "compare", "study", "fidelity", "pretrain"])
def test_an_empty_output_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.chdir(tmp_path)
    argv = {
        "train": ["train", "--output", ""],
        "sample": ["sample", "--prompt", "a 7", "--output", " "],
        "eval": ["eval", str(tmp_path), "--output", ""],
        "compare": ["compare", "-o", ""],
        "study": ["study", "--output", ""],
        "fidelity": ["fidelity", "--output", ""],
        "pretrain": ["pretrain", "digits", "--output", ""],
    }[command]
    proc = subprocess.run(
        [sys.executable, "-m", "precise_rl.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is empty" in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # nothing written in the current directory


def test_compare_refuses_a_run_directory_holding_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, epochs=1)
    out = tmp_path / "cmp"
    mine = out / "runs" / f"precise-seed{toy_task.TOY_CONFIG['seed']}"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    capsys.readouterr()
    from precise_rl.rl.compare import compare_runs

    with pytest.raises(Exception, match="did not write"):
        compare_runs([str(cfg)], 1, ["precise"], out, False)
    assert (mine / "notes.txt").read_text() == "mine"
