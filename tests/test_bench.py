"""``precise-rl bench`` at reduced width on the CPU: the real architectures' code paths, the table and the JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.policies.random_pipeline import random_pipeline
from precise_rl.policies.sizes import model_size
from precise_rl.rl.bench import TABLE_COLUMNS, BenchSettings, peak_rss_bytes, reset_peak_rss, run_case


def test_bench_cli_writes_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--models", "flux2_klein_4b", "--device", "cpu", "--dtype", "float32"]
    args += ["--width-scale", "8", "--resolution", "64", "--steps", "2", "--groups", "1", "--group-size", "2"]
    args += ["--max-sequence-length", "8", "--warmup", "0", "--trainings", "lora", "full", "--kl-beta", "0.1"]
    args += ["--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert len(lines) == 2 + 2 * 2  # header, rule, 2 trainings x 2 memory settings
    assert (out / "bench.md").read_text().strip() == "\n".join(lines)
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["width_scale"] == 8
    rows = data["rows"]
    assert {(r["training"], r["memory_options"]) for r in rows} == {
        (t, o) for t in ("lora", "full") for o in ("off", "on")
    }
    for r in rows:
        assert r["error"] is None
        for key in ("seconds_per_step", "images_per_device_per_s", "rollout_images_per_s", "train_s_per_image"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["peak_memory_bytes"] > 0 and r["images_per_step"] == 2 and r["count"] == 1
        assert r["seconds_per_step"] == pytest.approx(r["rollout_s"] + r["train_s"])
        assert r["images_per_device_per_s"] == pytest.approx(2 / r["seconds_per_step"])
        on = r["memory_options"] == "on"
        assert r["options"].get("gradient_checkpointing", False) is on
        assert r["options"].get("latents_dtype", "float32") == ("bfloat16" if on else "float32")
        assert r["options"].get("reference_on_cpu", False) is (on and r["training"] == "full")
    lora = {r["trainable_parameters"] for r in rows if r["training"] == "lora"}
    full = {r["trainable_parameters"] for r in rows if r["training"] == "full"}
    assert len(lora) == len(full) == 1 and 0 < min(lora) < min(full)


def test_bench_case_of_sd35_with_cfg_and_every_memory_option() -> None:
    s = BenchSettings(
        models=("sd35_medium",),
        device="cpu",
        dtype="float32",
        resolution=64,
        steps=2,
        groups=1,
        group_size=2,
        forward_batch=2,
        max_sequence_length=8,
        width_scale=8,
        kl_beta=0.1,
        warmup=0,
    )
    row = run_case(s, "sd35_medium", "full", "on")
    assert row.error is None and row.options["reference_on_cpu"] and row.options["latents_on_cpu"]
    assert math.isfinite(row.seconds_per_step) and row.seconds_per_step > 0
    assert row.peak_memory_bytes >= max(row.rollout_peak_bytes, row.train_peak_bytes) > 0


def test_full_width_builds_the_shipped_architecture_with_its_parameter_count() -> None:
    # on the meta device's counterpart: the random pipeline's transformer and VAE count what models --memory counts
    counted = {c.role: c.parameters for c in model_size(_config("sd35_medium")).components}
    pipe, adapter = random_pipeline("sd35_medium", torch.bfloat16, "meta")
    assert adapter == "sd3"
    assert sum(p.numel() for p in pipe.transformer.parameters()) == counted["transformer"]
    assert sum(p.numel() for p in pipe.vae.parameters()) == counted["vae"]
    assert pipe.transformer.dtype == torch.bfloat16
    assert all(p.is_meta for p in pipe.text_encoder_3.parameters())  # never allocated


def _config(stem: str) -> Path:
    from precise_rl.policies.sizes import config_files

    return next(p for p in config_files() if p.stem == stem)


def test_a_width_scale_that_does_not_divide_a_width_is_one_sentence() -> None:
    with pytest.raises(UserError, match="--width-scale 7 does not divide"):
        random_pipeline("flux2_klein_4b", torch.float32, "meta", width_scale=7)
    with pytest.raises(UserError, match="no benchable model config 'wan21_t2v_1_3b'"):
        random_pipeline("wan21_t2v_1_3b", torch.float32, "meta")


def test_bench_settings_refuse_bad_values() -> None:
    with pytest.raises(UserError, match="--steps must be a positive integer"):
        BenchSettings(device="cpu", steps=0).check()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            BenchSettings(device="cuda").check()


def test_peak_rss_is_reset_and_grows_with_an_allocation() -> None:
    if not reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak resident memory")
    before = peak_rss_bytes()
    # 256 MiB, touched; the margin leaves room for file-backed pages the kernel may drop meanwhile on a busy machine
    block = torch.ones(256 * 2**20 // 4)
    grown = peak_rss_bytes()
    assert grown >= before + 192 * 2**20
    del block
    assert reset_peak_rss()
    assert peak_rss_bytes() <= grown - 192 * 2**20  # the peak is the current resident memory again
