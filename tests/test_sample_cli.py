"""``precise-rl sample``: images and sampler grids from the built-in digits model and a tiny pipeline directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from precise_rl.cli import main
from precise_rl.cli import sample as sample_cli
from precise_rl.sde import SAMPLERS, kernel, rollout
from precise_rl.tasks.digits import DigitsPolicy

from . import tiny_pipelines as tp

diffusers_logging.disable_progress_bar()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_digits_samples_and_grid(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["sample", "--model", "digits", "--prompt", "a bold 7", "--prompt", "a thin 2", "--steps", "6"]
    argv += ["--num-images", "3", "--seed", "11", "--grid", "--grid-samplers", "ode,cps", "-o", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["adapter"] == "digits" and record["seeds"] == [11, 12, 13]
    assert list(record["samplers"]) == ["precise", "ode", "cps"]
    assert record["samplers"]["precise"]["eta"] == 1.5
    for slug in ("a_bold_7", "a_thin_2"):
        for s in ("precise", "ode", "cps"):
            for seed in (11, 12, 13):
                img = _png(out / slug / f"{s}_seed{seed}.png")
                assert img.shape == (64, 64, 3)  # 8x8 digits enlarged 8 times
        grid = Image.open(out / slug / "grid.png")
        assert grid.height > 3 * 64 and grid.width > 3 * 64


def test_an_image_depends_only_on_its_seed(tmp_path: Path) -> None:
    """Image ``seed`` is the same alone, inside a batch, or split over batches; and it is our rollout's image."""
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["sample", "--model", "digits", "--prompt", "a 4", "--steps", "5", "--sampler", "flow_grpo"]
    assert main([*base, "--num-images", "3", "--seed", "20", "--batch-size", "2", "-o", str(a)]) == 0
    assert main([*base, "--num-images", "1", "--seed", "22", "-o", str(b)]) == 0
    np.testing.assert_array_equal(_png(a / "a_4" / "flow_grpo_seed22.png"), _png(b / "a_4" / "flow_grpo_seed22.png"))
    assert np.abs(_png(a / "a_4" / "flow_grpo_seed20.png") - _png(a / "a_4" / "flow_grpo_seed22.png")).max() > 0
    # independent reference: the sde rollout with one generator seeded 22 for noise and sampler noise
    policy = DigitsPolicy.from_pretrained()
    sigmas = policy.time_grid(5)
    gen = torch.Generator().manual_seed(22)
    x1 = policy.sample_noise(1, generator=gen)
    traj = rollout(policy.velocity, x1, sigmas, kernel("flow_grpo", sigmas), cond=policy.encode_prompts(["a 4"]),
                   generator=gen)  # fmt: skip
    ref = (policy.decode(traj.sample)[0, 0].clamp(0, 1) * 255).round().numpy()
    got = _png(b / "a_4" / "flow_grpo_seed22.png")[::8, ::8, 0]
    np.testing.assert_array_equal(got, ref.astype(np.int16))


def test_tiny_pipeline_directory(tmp_path: Path) -> None:
    path = tp.save_pipeline("flux1", tmp_path / "pipe")
    out = tmp_path / "out"
    argv = ["sample", "--model", str(path), "--prompt", "a red fox", "--steps", "3", "--num-images", "2"]
    argv += ["--height", str(tp.HEIGHT), "--width", str(tp.WIDTH), "--option", "max_sequence_length=16"]
    argv += ["--sampler", "cps", "--eta", "0.5", "--grid", "--grid-samplers", "ode", "--device", "cpu", "-o", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["adapter"] == "flux1" and record["samplers"]["cps"]["eta"] == 0.5
    img = _png(out / "a_red_fox" / "cps_seed0.png")
    assert img.shape == (tp.HEIGHT * 4, tp.WIDTH * 4, 3)  # small images are enlarged to >= 64 pixels a side
    assert (out / "a_red_fox" / "grid.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give at least one --prompt"),
        (["--prompt", "a 1", "--steps", "0"], "--steps must be a positive integer"),
        (["--prompt", "a 1", "--sampler", "cps", "--eta", "1.5"], "sampler 'cps'"),
        (["--prompt", "a 1", "--grid", "--grid-samplers", "ode,euler"], "unknown sampler 'euler'"),
        (["--prompt", "a 1", "--height", "64"], "takes no model options"),
        (["--prompt", "a 1", "--lora", "/no/such/dir"], "--lora '/no/such/dir' does not exist"),
        (["--prompt", "a 1", "--adapter", "sdxl"], "--adapter 'sdxl' is unknown"),
    ],
)
def test_bad_input_is_one_clear_sentence(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["sample", "--model", "digits", "-o", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_bad_model_and_lora_directories(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tp.save_pipeline("sd3", tmp_path / "pipe")
    tp.set_pipeline_class(path, "KandinskyPipeline")
    assert main(["sample", "--model", str(path), "--prompt", "x", "-o", str(tmp_path / "o")]) == 2
    assert "pipeline class 'KandinskyPipeline'" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    argv = ["sample", "--model", "digits", "--prompt", "a 1", "--lora", str(tmp_path / "empty"), "-o", str(tmp_path)]
    assert main(argv) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["flux2_klein", "sd3", "flux1"])
def test_a_resolution_the_model_cannot_take_is_one_sentence(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tp.save_pipeline(kind, tmp_path / "pipe")
    opts = {k: v for k, v in tp.adapter_options(kind).items() if k not in ("height", "width")}
    base = ["sample", "--model", str(path), "--prompt", "x", "--device", "cpu", "-o", str(tmp_path / "out")]
    base += [f"--option={k}={v}" for k, v in opts.items()]
    capsys.readouterr()
    assert main([*base, "--height", "30", "--width", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("precise-rl sample: error: ") and "cannot take a 30x16 image" in err[-1]
    assert sum("error" in line for line in err) == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()  # nothing written
    if kind == "sd3":  # beyond the position embedding (16 patches of 2 latents of 2 pixels)
        assert main([*base, "--height", "128", "--width", "64"]) == 2
        assert "at most 64 pixels per side" in capsys.readouterr().err.strip().splitlines()[-1]


def test_every_sampler_is_offered() -> None:
    parser = __import__("argparse").ArgumentParser()
    sample_cli.add_arguments(parser)
    args = parser.parse_args(["--model", "digits", "--grid"])
    assert args.grid_samplers == list(SAMPLERS)
    how = sample_cli.sampling_settings(args, None)  # a model, not a run: the command's own defaults
    assert how["sampler"] == "precise" and how["steps"] == 20 and how["sigmas"] == "model"
    assert how["eta"] is None and how["from_run"] == []


@pytest.fixture(scope="module")
def cps_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run trained with cps at eta 0.4 on 4 steps of the uniform grid (one small epoch)."""
    run = tmp_path_factory.mktemp("cps") / "run"
    argv = ["train", "-o", str(run), "sampler.name=cps", "sampler.eta=0.4", "sampler.num_steps=4"]
    argv += ["sampler.grid=uniform", "train.epochs=1", "train.groups_per_epoch=2", "train.group_size=4"]
    argv += ["eval.every=0", "logging.tensorboard=false", "logging.progress=false"]
    assert main(argv) == 0
    return run


def test_a_run_is_sampled_with_its_own_sampler_eta_grid_and_steps(
    cps_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    capsys.readouterr()
    argv = ["sample", "--model", str(cps_run), "--prompt", "a bold 7", "--num-images", "2", "-o", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "samples.json").read_text())
    assert list(record["samplers"]) == ["cps"] and record["samplers"]["cps"]["eta"] == 0.4
    assert record["steps"] == 4 and record["grid"] == "uniform"
    assert record["sigmas"] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert {"sampler", "eta", "steps", "sigmas"} <= set(record["from_run"])
    printed = capsys.readouterr().out
    assert "cps at eta 0.4, 4 steps on the uniform grid (the run's)" in printed
    # the images are the rollouts of that kernel: the same seed through generate() with the run's settings
    policy, *_ = sample_cli.policy_from_run(
        __import__("argparse").Namespace(model=str(cps_run), adapter=None, revision=None, lora=None, dtype=None),
        torch.device("cpu"),
    )
    want = sample_cli.generate(policy, "a bold 7", "cps", torch.tensor(record["sigmas"]), 0.4, [0])
    got = _png(out / "a_bold_7" / "cps_seed0.png")[::8, ::8, 0]
    np.testing.assert_array_equal(got, (want[0, 0].clamp(0, 1) * 255).round().numpy().astype(np.int16))


def test_flags_override_the_runs_sampling_and_another_sampler_takes_its_own_eta(cps_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["sample", "--model", str(cps_run), "--prompt", "a 3", "--num-images", "1", "-o", str(out)]
    assert main([*argv, "--sampler", "precise", "--steps", "6"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["samplers"] == {"precise": {"eta": 1.5}}  # precise's reference eta, not the run's cps eta
    assert record["steps"] == 6 and record["grid"] == "uniform"  # the grid is still the run's
    assert "sampler" not in record["from_run"] and "sigmas" in record["from_run"]
    assert main([*argv, "--eta", "0.2"]) == 0
    assert json.loads((out / "samples.json").read_text())["samplers"] == {"cps": {"eta": 0.2}}
