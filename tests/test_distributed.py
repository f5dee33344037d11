"""Data-parallel training on CPU processes (gloo), launched with ``accelerate launch`` as the README says.

The built-in digits task with tiny settings: two processes through ``configs/accelerate/ddp.yaml``
must end with identical weights on both and the metrics of a one-process run of the same config;
two "machines" on this host through ``configs/accelerate/multinode.yaml`` (one process each), then
a resume on two processes and another on one process, must reach the same weights as the
one-process run. A GPU config launched without GPUs must stop instead of training N separate
copies. The pure planning parts (who rolls out what, which samples each update trains) are
checked in-process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from precise_rl.cli import main
from precise_rl.config import config_from_dict
from precise_rl.rl.trainer import GRPOTrainer

from . import toy_task

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
# Tiny digits run: 4 groups of 4 over 2 processes, 2 updates per epoch (grad_accum 2), uneven forward
# chunks (forward_batch 5), 3 eval prompts (the second process's share is padded), a checkpoint per epoch.
ARGS = [
    "seed=5",
    "train.epochs=3",
    "train.groups_per_epoch=4",
    "train.group_size=4",
    "train.batch_size=4",
    "train.grad_accum=2",
    "train.forward_batch=5",
    "train.rollout_batch_size=3",
    "train.lr=1e-3",
    "algorithm.clip_range=0.2",
    "sampler.num_steps=4",
    "eval.every=3",
    "eval.max_prompts=3",
    "eval.samples_per_prompt=1",
    "eval.num_steps=4",
    "eval.grid_prompts=3",
    "train.ema.every=1",
    "checkpoint.every=1",
    "checkpoint.keep=2",
    "logging.tensorboard=false",
    "logging.progress=false",
]
IGNORED = ("elapsed_s", "train_elapsed_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _launch(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in IGNORED and not k.startswith("time_")} for r in rows]


def _assert_metrics_close(got: list[dict], want: list[dict], extra_eval_at: tuple[int, ...] = ()) -> None:
    """Same records and keys, values within float rounding (``extra_eval_at``: epochs where only ``got`` evaluated)."""
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want, strict=True):
        if g["epoch"] in extra_eval_at:
            g = {k: v for k, v in g.items() if not k.startswith("eval_")}
        assert sorted(g) == sorted(w), (sorted(set(g) ^ set(w)), g["epoch"])
        for key, value in w.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(g[key]), key
            else:
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, g["epoch"], g[key], value)


def _assert_same_training(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Both runs moved the weights the same way, up to float rounding.

    Adam divides by the root of the squared-gradient average, so a weight whose gradients are
    ~0 can move by up to the learning rate on rounding noise alone: compare the whole step
    from the initial weights instead, which rounding changes by a tiny fraction.
    """
    init = load_file(str(ROOT / "src/precise_rl/assets/digits_flow.safetensors"))
    moved = torch.cat([(want[n] - init[n]).flatten() for n in want])
    diff = torch.cat([(got[n] - want[n]).flatten() for n in want])
    assert moved.norm() > 0, "training changed nothing"
    assert diff.norm() <= 1e-3 * moved.norm(), (float(diff.norm()), float(moved.norm()))
    assert diff.abs().max() <= 0.05 * 1e-3  # well below one Adam step (lr 1e-3)


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((run / "checkpoints").glob("epoch_*"))[-1]
    return load_file(str(ckpt / "trainable.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same config on one process (this one)."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", *ARGS, "--output", str(run)]) == 0
    return run


@pytest.mark.slow
def test_two_processes_hold_identical_weights_and_match_one_process(one_process: Path, tmp_path: Path) -> None:
    run = tmp_path / "two"
    cmd = [
        *ACCELERATE,
        "--config_file",
        "configs/accelerate/ddp.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "tests/dist_entry.py",
        "train",
        *ARGS,
        "--output",
        str(run),
    ]
    res = _launch(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    rank0, rank1 = (load_file(str(run / f"rank{k}.safetensors")) for k in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("ema/") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Only the main process writes: one metrics line per epoch (plus the first eval), one checkpoint set.
    _assert_metrics_close(_metrics(run), _metrics(one_process))
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["epoch_000002", "epoch_000003"]
    got = _final_weights(run)
    _assert_same_training(got, _final_weights(one_process))
    for name, w in got.items():
        assert torch.equal(rank0[f"trainable/{name}"], w), name
    grid = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in grid] == [p.name for p in sorted((one_process / "samples").glob("*.png"))]


@pytest.mark.slow
def test_two_machines_then_resume_on_two_processes_reach_the_one_process_weights(
    one_process: Path, tmp_path: Path
) -> None:
    run = tmp_path / "multi"
    port = str(_free_port())
    first = [a if a != "train.epochs=3" else "train.epochs=2" for a in ARGS]
    machines = []
    for rank in (0, 1):
        cmd = [
            *ACCELERATE,
            "--config_file",
            "configs/accelerate/multinode.yaml",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "-m",
            "precise_rl.cli",
            "train",
            *first,
            "--output",
            str(run),
        ]
        machines.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outs[0][1].decode()[-2000:] + outs[1][1].decode()[-2000:]
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["epoch_000001", "epoch_000002"]
    # The same two-process checkpoint resumed on one process (this one) reaches the one-process run too.
    alone = tmp_path / "alone"
    shutil.copytree(run, alone)
    assert main(["train", "train.epochs=3", "--resume", str(alone)]) == 0
    _assert_metrics_close(_metrics(alone), _metrics(one_process), extra_eval_at=(2,))
    _assert_same_training(_final_weights(alone), _final_weights(one_process))
    resume = [
        *ACCELERATE,
        "--config_file",
        "configs/accelerate/ddp.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "precise_rl.cli",
        "train",
        "train.epochs=3",
        "--resume",
        str(run),
    ]
    res = _launch(resume)
    assert res.returncode == 0, res.stderr[-3000:]
    # The two-epoch run evaluated at its last epoch, the reference did not.
    _assert_metrics_close(_metrics(run), _metrics(one_process), extra_eval_at=(2,))
    _assert_same_training(_final_weights(run), _final_weights(one_process))


# --------------------------------------------------------------------------- planning, in-process

toy_task.register()


def _toy_trainer(tmp_path: Path, **train: object) -> GRPOTrainer:
    data = json.loads(json.dumps(toy_task.TOY_CONFIG))
    data["train"].update(train)
    data["eval"]["every"] = 0
    return GRPOTrainer(config_from_dict(data), tmp_path)


@pytest.mark.parametrize("world", [2, 4])
def test_groups_stay_whole_and_samples_do_not_depend_on_the_process(tmp_path: Path, world: int) -> None:
    trainer = _toy_trainer(tmp_path, groups_per_epoch=4, group_size=3, rollout_batch_size=2)
    whole = trainer.collect(epoch=1)
    seen = []
    for rank in range(world):
        trainer.rank, trainer.world = rank, world
        part = trainer.collect(epoch=1)
        assert set(part.group_ids.tolist()) == {g for g in range(4) if g % world == rank}
        assert torch.equal(part.row_ids // 3, part.group_ids)
        for i, r in enumerate(part.row_ids.tolist()):
            j = whole.row_ids.tolist().index(r)
            assert part.prompts[i] == whole.prompts[j]
            torch.testing.assert_close(part.latents[i], whole.latents[j], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(part.log_probs[i], whole.log_probs[j], rtol=1e-5, atol=1e-5, equal_nan=True)
        seen += part.row_ids.tolist()
    assert sorted(seen) == list(range(12))


def test_update_plan_is_global_and_skips_unusable_samples(tmp_path: Path) -> None:
    trainer = _toy_trainer(tmp_path, groups_per_epoch=4, group_size=4, batch_size=3, grad_accum=2)
    batch = trainer.collect(0)
    adv = torch.randn(16, generator=torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little")))
    adv[4:8] = 0.0  # group 1: equal rewards, no signal
    adv[9] = math.nan  # a sample no reward could score
    plan = trainer.update_plan(batch, adv, epoch=0, inner=0)
    rows = torch.cat([m for u in plan for m in u]).tolist()
    assert sorted(rows) == [r for r in range(16) if r // 4 != 1 and r != 9]
    assert all(len(m) == 3 for u in plan for m in u[:-1]) and all(1 <= len(u) <= 2 for u in plan)
    # Slot by slot: one member of each trained group in turn (group 2's unscored member left out).
    cycle = [0, 2, 3] * 4
    assert any([r // 4 for r in rows] == cycle[:i] + cycle[i + 1 :] for i in range(1, 12, 3))
    again = trainer.update_plan(batch, adv, epoch=0, inner=0)
    assert [m.tolist() for u in again for m in u] == [m.tolist() for u in plan for m in u]
    other = trainer.update_plan(batch, adv, epoch=0, inner=1)
    assert sorted(torch.cat([m for u in other for m in u]).tolist()) == sorted(rows)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs this config trains; this checks machines without")
def test_a_gpu_config_launched_without_gpus_stops_instead_of_training_n_separate_copies(tmp_path: Path) -> None:
    """accelerate falls back to one independent process per rank: each would write the same run directory."""
    run = tmp_path / "run"
    env = _env()
    env.pop("ACCELERATE_USE_CPU")
    cmd = [
        *ACCELERATE,
        *("--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "2"),
        *("--main_process_port", str(_free_port())),
        *("-m", "precise_rl.cli", "train", *ARGS, "--output", str(run)),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    sentence = (
        "precise-rl train: error: this process was launched as one of 2 but accelerate set up a single process "
        "(distributed type NO); without GPUs launch with configs/accelerate/ddp.yaml and ACCELERATE_USE_CPU=true"
    )
    assert res.returncode != 0 and sentence in res.stderr, res.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
