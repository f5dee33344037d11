"""Sharded training (``train.fsdp``, FSDP2) on CPU processes (gloo), launched as the README says, against one process.

The digits task (a full fine-tune with EMA and a KL term, two micro-batches per update, uneven forward chunks):
two sharded processes started from scratch train epoch 1 to the one-process weights; a one-process
run's checkpoint of epoch 1 resumed on two sharded processes (1 -> 2) trains epochs 2 and 3 to the
one-process weights, every weight held as a half-sized shard on each process; that sharded run's
checkpoint of epoch 2 resumed on two processes ends bit-identical to it, and resumed on one process
(2 -> 1) reaches the one-process weights. A tiny FLUX.2 Klein trains LoRA sharded in bf16: the frozen
base is sharded, the LoRA weights are float32, and the adapter its checkpoint holds draws in
``precise-rl sample`` the images of the checkpoint's weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from precise_rl.cli import main

from . import tiny_pipelines as tp
from .test_distributed import (
    ACCELERATE,
    ROOT,
    _assert_metrics_close,
    _assert_same_training,
    _env,
    _final_weights,
    _free_port,
    _metrics,
)
from .test_distributed import ARGS as DDP_ARGS

# The distributed tests' digits run, every checkpoint kept, with a KL term (whose frozen copy of the
# initial weights is sharded too) and a gradient clip that binds (the gradient norms are ~0.3).
ARGS = [a for a in DDP_ARGS if not a.startswith("checkpoint.keep=")]
ARGS += ["checkpoint.keep=3", "algorithm.kl_beta=0.05", "train.grad_clip=0.1"]


def _launch(*argv: str, processes: int = 2) -> None:
    """``accelerate launch`` of ``tests/dist_entry.py`` (precise-rl plus a dump of each process's weights)."""
    cmd = [*ACCELERATE, "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", str(processes)]
    cmd += ["--main_process_port", str(_free_port()), "tests/dist_entry.py", *argv]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _rank_dumps(run: Path) -> list[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """Each process's whole weights and its metadata (see tests/dist_entry.py)."""
    out = []
    for k in (0, 1):
        with safe_open(str(run / f"rank{k}.safetensors"), "pt") as f:
            meta = f.metadata()
        out.append((load_file(str(run / f"rank{k}.safetensors")), meta))
    return out


def _assert_sharded(dumps: list[tuple[dict[str, torch.Tensor], dict[str, str]]]) -> dict[str, dict]:
    """Every weight is a shard on both processes, their shares make the whole; returns process 0's layout."""
    layouts = [json.loads(meta["layout"]) for _, meta in dumps]
    assert all(
        meta["sharded"] == "True" and meta["distributed_type"] == "DistributedType.MULTI_CPU" for _, meta in dumps
    )
    assert layouts[0].keys() == layouts[1].keys()
    for name, w in layouts[0].items():
        v = layouts[1][name]
        assert w["dtensor"] and v["dtensor"], name
        assert w["local"] + v["local"] == w["numel"] == v["numel"], name
    # the largest weight is split in two halves, not held by one process
    big = max(layouts[0], key=lambda n: layouts[0][n]["numel"])
    assert layouts[0][big]["local"] == layouts[1][big]["local"] == layouts[0][big]["numel"] // 2
    return layouts[0]


def _drop_last_checkpoint(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    shutil.rmtree(sorted((dst / "checkpoints").glob("epoch_*"))[-1])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: three epochs on one process (this one), unsharded, a checkpoint per epoch."""
    run = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", *ARGS, "--output", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def sharded(one_process: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process checkpoint of epoch 1 resumed on two sharded processes (1 -> 2) to epoch 3."""
    run = tmp_path_factory.mktemp("sharded") / "run"
    shutil.copytree(one_process, run)
    for ckpt in sorted((run / "checkpoints").glob("epoch_*"))[1:]:
        shutil.rmtree(ckpt)
    _launch("train", "train.epochs=3", "train.fsdp=true", "--resume", str(run))
    return run


@pytest.mark.slow
def test_two_sharded_processes_hold_half_of_every_weight_and_train_the_one_process_weights(
    one_process: Path, sharded: Path
) -> None:
    dumps = _rank_dumps(sharded)
    layout = _assert_sharded(dumps)
    # each block (the model's _no_split_modules), then the root
    assert [json.loads(meta["fsdp_units"]) for _, meta in dumps] == [["", "blocks.0", "blocks.1", "blocks.2"]] * 2
    assert all(w["trainable"] and w["dtype"] == "torch.float32" for w in layout.values())  # a full fine-tune
    assert all(meta["ema_dtensor"] == "True" for _, meta in dumps)  # the EMA is kept as shards too
    (rank0, _), (rank1, _) = dumps
    assert rank0.keys() == rank1.keys() and any(k.startswith("ema/") for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # The metrics of epochs 2 and 3 (grad_norm: the global norm over the shards, clipped to 0.1) and the
    # weights are the one-process run's up to float rounding; the checkpoint holds the whole weights.
    assert all(r["grad_norm"] > 0.1 for r in _metrics(one_process) if "grad_norm" in r)
    _assert_metrics_close(_metrics(sharded), _metrics(one_process))
    got = _final_weights(sharded)
    _assert_same_training(got, _final_weights(one_process))
    for name, w in got.items():
        assert torch.equal(rank0[f"trainable/{name}"], w), name
    ema = load_file(str(sorted((sharded / "checkpoints").glob("epoch_*"))[-1] / "ema.safetensors"))
    want = load_file(str(sorted((one_process / "checkpoints").glob("epoch_*"))[-1] / "ema.safetensors"))
    _assert_same_training(ema, want)


@pytest.mark.slow
def test_two_sharded_processes_from_scratch_train_the_one_process_weights(one_process: Path, tmp_path: Path) -> None:
    # No checkpoint to start from: each process builds the model, shards it and draws its share of the
    # rollouts; after one epoch the weights and the metrics (of the start and of epoch 1) are the one-process run's.
    run = tmp_path / "run"
    _launch("train", *ARGS, "train.epochs=1", "train.fsdp=true", "--output", str(run))
    _assert_sharded(_rank_dumps(run))
    first = sorted((one_process / "checkpoints").glob("epoch_*"))[0]
    assert first.name == "epoch_000001"
    _assert_metrics_close(_metrics(run), _metrics(one_process)[:2], extra_eval_at=(1,))  # its last epoch evaluates
    _assert_same_training(_final_weights(run), load_file(str(first / "trainable.safetensors")))


@pytest.mark.slow
def test_forward_batch_auto_on_two_sharded_processes_trains_the_one_process_weights(
    one_process: Path, tmp_path: Path
) -> None:
    # The probe passes of ``auto`` run on every process (the shards' all-gathers stay matched) with no
    # gradient reduced; the processes agree on one count, and the epoch trains what one process does
    # with its hand-set forward_batch, to float rounding (only the chunking of the passes differs).
    run = tmp_path / "run"
    args = [a for a in ARGS if not a.startswith("train.forward_batch=")]
    args += ["train.forward_batch=auto", "train.memory_budget_gb=1", "train.epochs=1", "train.fsdp=true"]
    _launch("train", *args, "--output", str(run))
    _assert_sharded(_rank_dumps(run))
    first = sorted((one_process / "checkpoints").glob("epoch_*"))[0]
    _assert_same_training(_final_weights(run), load_file(str(first / "trainable.safetensors")))
    logged = [r["forward_batch"] for r in _metrics(run) if "forward_batch" in r]
    assert logged == [12.0]  # a micro-batch's 4 samples x 3 trained steps: the budget holds them all
    state = json.loads((sorted((run / "checkpoints").glob("epoch_*"))[-1] / "state.json").read_text())
    assert state["forward_batch"] == 12


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_exactly_on_two_processes_and_onto_one(
    one_process: Path, sharded: Path, tmp_path: Path
) -> None:
    # Two processes again, from the sharded run's checkpoint of epoch 2: the same computation in the
    # same order (the collectives of gloo reduce in a fixed order), so epoch 3 is bit-identical.
    again = tmp_path / "again"
    _drop_last_checkpoint(sharded, again)
    _launch("train", "train.epochs=3", "--resume", str(again))
    last = sorted((sharded / "checkpoints").glob("epoch_*"))[-1]
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.pt"):
        assert (again / "checkpoints" / last.name / name).read_bytes() == (last / name).read_bytes(), name
    _assert_metrics_close(_metrics(again), _metrics(sharded))
    # One process (this one), from the same checkpoint: its config says train.fsdp, and on one process
    # the model is held whole; the checkpoint loads all the same and the run reaches the one-process weights.
    alone = tmp_path / "alone"
    _drop_last_checkpoint(sharded, alone)
    assert yaml.safe_load((alone / "config.yaml").read_text())["train"]["fsdp"] is True
    assert main(["train", "train.epochs=3", "--resume", str(alone)]) == 0
    _assert_metrics_close(_metrics(alone), _metrics(one_process))
    _assert_same_training(_final_weights(alone), _final_weights(one_process))


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


@pytest.mark.slow
def test_sharded_lora_on_a_tiny_flux2_klein_keeps_the_base_sharded_and_the_adapter_whole(tmp_path: Path) -> None:
    pipe = tp.save_pipeline("flux2_klein", tmp_path / "pipe")
    opts = tp.adapter_options("flux2_klein")
    config = {
        "seed": 3,
        "model": {"name": "flux2_klein", "path": str(pipe), "dtype": "bfloat16", "options": opts},
        "sampler": {"name": "precise", "num_steps": 3},
        "reward": {"weights": {"jpeg_incompressibility": 1.0}},
        "train": {
            "epochs": 1,
            "groups_per_epoch": 2,
            "group_size": 4,
            "batch_size": 4,
            "lr": 1e-2,
            "clip_range": 0.2,
            "mixed_precision": "bf16",
            "fsdp": True,
            "lora": {"enabled": True, "rank": 2, "alpha": 2},
            "ema": {"enabled": False},
        },
        "eval": {"every": 0},
        "checkpoint": {"every": 1},
        "logging": {"tensorboard": False, "progress": False},
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    _launch("train", str(tmp_path / "lora.yaml"), "--output", str(run))
    dumps = _rank_dumps(run)
    layout = _assert_sharded(dumps)
    units = ["", "transformer_blocks.0", "single_transformer_blocks.0"]  # Flux2's _no_split_modules, the root
    assert [json.loads(meta["fsdp_units"]) for _, meta in dumps] == [units] * 2
    frozen = {n: w for n, w in layout.items() if not w["trainable"]}
    trained = {n: w for n, w in layout.items() if w["trainable"]}
    assert frozen and all(w["dtype"] == "torch.bfloat16" for w in frozen.values())
    assert trained and all(".lora_" in n and w["dtype"] == "torch.float32" for n, w in trained.items())
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["updates"] >= 1
    # The adapter is the checkpoint's whole LoRA weights, in float32, and they were trained (B starts at 0).
    ckpt = run / "checkpoints" / "epoch_000001"
    weights = load_file(str(ckpt / "trainable.safetensors"))
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(n.replace(".default", "") for n in weights)
    for name, w in weights.items():
        assert adapter[name.replace(".default", "")].dtype == torch.float32
        assert torch.equal(adapter[name.replace(".default", "")], w), name
    assert any(".lora_B." in n and bool(w.abs().max() > 0) for n, w in weights.items())
    # `precise-rl sample` with the adapter draws what the run's checkpoint weights draw (--model RUN_DIR,
    # which loads trainable.safetensors by parameter name).
    common = ["--prompt", "a cat", "--steps", "3", "--num-images", "2", "--seed", "5", "--device", "cpu"]
    common += ["--dtype", "bfloat16"]
    model = ["--model", str(pipe), "--lora", str(run), "--height", str(opts["height"]), "--width", str(opts["width"])]
    model += [
        f"--option=max_sequence_length={opts['max_sequence_length']}",
        "--option=text_encoder_out_layers=[1, 2, 3]",
    ]
    assert main(["sample", *model, *common, "-o", str(tmp_path / "adapter")]) == 0
    assert main(["sample", "--model", str(run), *common, "-o", str(tmp_path / "checkpoint")]) == 0
    drawn, want = _pngs(tmp_path / "adapter"), _pngs(tmp_path / "checkpoint")
    assert drawn.keys() == want.keys() and len(drawn) >= 2
    for name in drawn:
        assert np.array_equal(drawn[name], want[name]), name


def test_sharding_refuses_fp16_and_accelerates_own_fsdp_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "train.epochs=1", "train.fsdp=true", "--output", str(tmp_path / "run")]
    assert main([*argv, "train.mixed_precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert "config key 'train.fsdp' takes train.mixed_precision 'no' or 'bf16', got 'fp16'" in err
    assert len(err.strip().splitlines()) == 1
    # What accelerate sets for a config of distributed_type FSDP (on CPU processes it would then run DDP).
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "accelerate's FSDP plugin (distributed_type: FSDP), which precise-rl does not use: set train.fsdp=true" in err
    )
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()
