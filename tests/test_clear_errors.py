"""Inputs that used to end in a traceback, a silent misreading or a vague sentence: one clear sentence, exit code 2.

Each test checks the sentence against the facts of the case (the file on disk, the key and its
value, the arithmetic that makes it fail), and that nothing half-made is left behind.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from precise_rl.cli import COMMANDS, main
from precise_rl.rl.checkpoint import list_checkpoints

from . import toy_task

toy_task.register()

ROOT = Path(__file__).resolve().parents[1]


def _toy_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    return path


def _one_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"precise-rl {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- case 9: numbers that blow up


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["sampler.name=dance_grpo", "sampler.eta=1e200"], "beyond float32"),
        (["sampler.name=flow_grpo", "sampler.eta=1e6"], "produced NaN or inf"),
        # the digits model, whose weights overflow after one update at this rate (the toy one saturates)
        (
            [
                "digits",
                "train.lr=1e30",
                "train.groups_per_epoch=2",
                "train.group_size=4",
                "train.epochs=2",
                "logging.progress=false",
            ],
            "lower train.lr",
        ),
    ],
    ids=["eta-past-float32", "eta-huge", "lr-huge"],
)
def test_a_rollout_that_blows_up_stops_in_one_sentence_naming_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], fragment: str
) -> None:
    out = tmp_path / "run"
    config = [] if overrides[0] == "digits" else [str(_toy_yaml(tmp_path))]
    overrides = [o for o in overrides if o != "digits"]
    code = main(["train", *config, "--output", str(out), "eval.every=0", *overrides])
    line = _one_error(capsys, "train")
    assert code == 2
    assert line.startswith("precise-rl train: error: training stopped: ") and fragment in line, line
    ckpts = list_checkpoints(out / "checkpoints")
    if ckpts:  # the checkpoints written before the blow-up are kept and named
        assert f"the last checkpoint is {str(ckpts[-1])!r}" in line and f"--resume {out}" in line, line
    else:
        assert "no checkpoint was written yet" in line, line


@pytest.mark.parametrize("shift", ["1e-300", "1e300"])
def test_a_shift_that_rounds_the_grid_away_is_refused_before_the_run_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shift: str
) -> None:
    # 1e-300: 1 + (shift - 1) * 1 is 0 in float64, so t_0 = inf; 1e300: every point but the last rounds to 1
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "sampler.grid=shifted", f"sampler.shift={shift}"]) == 2
    line = _one_error(capsys, "train")
    assert "config key 'sampler.shift'" in line and "not finite and strictly decreasing" in line, line
    assert not out.exists()


# --------------------------------------------------------------------------- case 10: sample's own flags


def test_sample_refuses_a_file_as_output_and_devices_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sample", "--model", "digits", "--prompt", "a 3", "--steps", "2", "--num-images", "1"]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert main([*base, "-o", str(a_file)]) == 2
    assert f"--output {str(a_file)!r} is a file" in _one_error(capsys, "sample")
    assert a_file.read_text() == "not a directory"
    assert main([*base, "-o", str(a_file / "sub")]) == 2
    assert "is a file" in _one_error(capsys, "sample")
    assert main([*base, "-o", str(tmp_path / "s"), "--device", "bogus"]) == 2
    assert "--device 'bogus' is not a device" in _one_error(capsys, "sample")
    if not torch.cuda.is_available():
        assert main([*base, "-o", str(tmp_path / "s"), "--device", "cuda"]) == 2
        assert "--device 'cuda'" in _one_error(capsys, "sample")
    assert not (tmp_path / "s").exists()


def test_sample_refuses_a_seed_past_the_generator_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sample", "--model", "digits", "--prompt", "a 3", "--steps", "2", "-o", str(tmp_path / "s")]
    for seed in (str(2**64), "-1"):
        assert main([*base, "--seed", seed, "--num-images", "2"]) == 2
        assert "--seed must be in 0.." in _one_error(capsys, "sample")
    assert main([*base, "--seed", str(2**63 - 2), "--num-images", "2"]) == 0  # seeds 2**63-2 and 2**63-1


# --------------------------------------------------------------------------- case 11: a full disk, a file-size limit

_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
from tests import toy_task
toy_task.register()
from precise_rl.cli import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(["train", sys.argv[2], "--output", sys.argv[3]]))
"""


def test_a_checkpoint_write_cut_short_names_the_cause_and_the_path(tmp_path: Path) -> None:
    # The toy model's optimizer state (about 12 kB) is over the 8 kB file-size limit, its weights (6 kB)
    # under it: torch.save is cut short, which it reports only as "enforce fail ... unexpected pos".
    cfg, out = _toy_yaml(tmp_path), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    done = subprocess.run(
        [sys.executable, "-c", _LIMITED, "8000", str(cfg), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "enforce fail" not in lines[0] and "unexpected pos" not in lines[0], lines
    assert "File too large" in lines[0] and str(out / "checkpoints" / "epoch_000002") in lines[0], lines[0]
    assert not list_checkpoints(out / "checkpoints")  # nothing half-written left as a checkpoint


def test_a_write_failure_keeps_the_library_words_when_no_cause_is_found(tmp_path: Path) -> None:
    from precise_rl.rl.checkpoint import _write_reason

    hidden = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5952 vs 5844")
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        st = os.statvfs(tmp_path)
        if st.f_bavail * st.f_frsize >= 2**30:  # a disk with room and no size limit: no cause to name
            assert _write_reason(hidden, tmp_path) == str(hidden)
    assert _write_reason(RuntimeError("cannot pickle 'generator' object"), tmp_path) == (
        "cannot pickle 'generator' object"
    )


# --------------------------------------------------------------------------- case 12: YAML errors keep where


def test_a_yaml_error_names_its_line_column_and_cause(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "tab.yaml"
    bad.write_text("train:\n\tepochs: 3\n")  # a tab at line 2, column 1
    assert main(["train", str(bad), "--output", str(tmp_path / "run")]) == 2
    line = _one_error(capsys, "train")
    assert "line 2, column 1" in line and "'\\t'" in line and "tabs" in line, line
    unclosed = tmp_path / "flow.yaml"
    unclosed.write_text("sampler:\n  name: precise\ntrain: [1, 2\n")
    assert main(["train", str(unclosed), "--output", str(tmp_path / "run")]) == 2
    line = _one_error(capsys, "train")
    assert "expected ',' or ']'" in line and "line 4, column 1" in line, line


# --------------------------------------------------------------------------- case 13: precisions that would not run


def test_a_precision_that_would_be_ignored_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "model.dtype=float16"]) == 2
    line = _one_error(capsys, "train")
    assert "'model.dtype' is float16" in line and "float32" in line, line
    if not torch.cuda.is_available():
        assert main(["train", "--output", str(out), "train.mixed_precision=fp16"]) == 2
        line = _one_error(capsys, "train")
        assert "'train.mixed_precision' is fp16" in line and "CPU" in line, line
    assert not out.exists()
    # what is recorded is what runs: bf16 autocast exists on the CPU and is kept
    cfg = _toy_yaml(tmp_path)
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1", "train.mixed_precision=bf16"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"


# --------------------------------------------------------------------------- case 14: messages that say what to do


def test_one_step_says_why_no_step_is_trained_and_makes_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "sampler.num_steps=1"]) == 2
    line = _one_error(capsys, "train")
    assert "sampler.num_steps=1" in line and "t = 0" in line and "sampler.num_steps >= 2" in line, line
    assert not out.exists()
    # a fraction that keeps only deterministic steps: the floor arithmetic is spelled out
    assert (
        main(
            [
                "train",
                "--output",
                str(out),
                "sampler.window.size=2",
                "sampler.window.start=8",
                "algorithm.timestep_fraction=0.5",
            ]
        )
        == 2
    )
    line = _one_error(capsys, "train")
    assert "floor(0.5 x 10)) = 5" in line and "are [8];" in line, line  # step 9 ends at t = 0: no noise
    assert not out.exists()


def test_a_remote_reward_without_url_warns_where_it_looks(capsys: pytest.CaptureFixture[str]) -> None:
    from precise_rl.rewards import build_reward

    reward = build_reward("remote", retries=0)
    assert reward.url == "http://127.0.0.1:18085"
    err = capsys.readouterr().err
    assert "warning: remote reward has no url; using http://127.0.0.1:18085" in err
    build_reward("remote", url="http://127.0.0.1:9", retries=0)
    assert "warning" not in capsys.readouterr().err


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from precise_rl.rl.trainer import GRPOTrainer

    cfg, out = _toy_yaml(tmp_path), tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=2"]) == 0
    newest = list_checkpoints(out / "checkpoints")[-1]

    def interrupted(self: GRPOTrainer) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(GRPOTrainer, "run", interrupted)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "train.epochs=4"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("precise-rl train: interrupted; ")
    assert f"the last checkpoint is {str(newest)!r}" in err and f"precise-rl train --resume {out}" in err, err
    assert list_checkpoints(out / "checkpoints")[-1] == newest  # the interrupted resume kept the run


def test_resuming_a_finished_run_says_it_is_complete_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, out = _toy_yaml(tmp_path), tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=2"]) == 0
    before = {p.name: p.read_bytes() for p in (out / "metrics.jsonl", out / "summary.json")}
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"the run in {out} is already complete (2 of 2 epochs)" in printed, printed
    assert "train.epochs=4" in printed
    assert {p.name: p.read_bytes() for p in (out / "metrics.jsonl", out / "summary.json")} == before


def test_resuming_a_run_killed_between_its_last_checkpoint_and_its_summary_finishes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, out = _toy_yaml(tmp_path), tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = (out / "metrics.jsonl").read_bytes()
    (out / "summary.json").unlink()  # as if killed after the last checkpoint, before the summary
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "already complete" not in printed and "held-out reward before -> after" in printed, printed
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing trained again
    again = json.loads((out / "summary.json").read_text())
    assert again["reward_after"] == summary["reward_after"] and again["epochs"] == summary["epochs"] == 2


# --------------------------------------------------------------------------- case 15: quick answers


#: an argument error of each subcommand, answered by argparse or the first checks of ``run``
_ARGUMENT_ERRORS = {
    "fidelity": ["fidelity", "--nfe", "0"],
    "train": ["train", "train.lr=-1"],
    "eval": ["eval", "/no/such/run"],
    "compare": ["compare", "--seeds", "0"],
    "study": ["study", "--steps", "x"],
    "models": ["models", "--no-such-flag"],
    "sample": ["sample", "--model", "digits"],
    "serve-reward": ["serve-reward"],
    "pretrain": ["pretrain", "nothing"],
    "probe-judge": ["probe-judge", "--url", "http://127.0.0.1:9", "--timeout", "-1"],
    "bench": ["bench", "--steps", "0"],
}


def test_every_subcommand_has_an_argument_error_case() -> None:
    assert sorted(_ARGUMENT_ERRORS) == sorted(COMMANDS)


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "nope.yaml"]]
    + [[name, "--help"] for name in COMMANDS]
    + [_ARGUMENT_ERRORS[name] for name in COMMANDS],
    ids=["help", "train-missing-config"] + [f"{n}-help" for n in COMMANDS] + [f"{n}-bad-args" for n in COMMANDS],
)
def test_help_and_config_errors_import_no_heavy_library(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from precise_rl.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules)\n"
        "print(rc, heavy, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    rc, heavy = last.split(" ", 1)
    assert rc in ("0", "2"), done.stderr
    assert heavy == "[]", f"{argv} imported {heavy}"


# --------------------------------------------------------------------------- case 16: sampling a trained run


def _png_levels(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.int64))


def _expected_levels(
    weights: dict[str, torch.Tensor] | None, prompt: str, seed: int, lora_dir: Path | None
) -> torch.Tensor:
    """The ODE sample of the toy policy with the given weights, drawn here, as the 8-bit grey PNG sample writes."""
    from precise_rl.policies.lora import load_adapter
    from precise_rl.sde import kernel, rollout, uniform_sigmas

    policy = toy_task.ToyPolicy()
    if lora_dir is not None:
        policy.transformer = load_adapter(policy.transformer, lora_dir)
    if weights is not None:
        policy.transformer.load_state_dict(weights, strict=False)
    policy.transformer.eval()
    gen = torch.Generator().manual_seed(seed)
    x1 = policy.sample_noise(1, generator=gen)
    with torch.no_grad():
        traj = rollout(
            policy.velocity,
            x1,
            None,
            kernel("ode", uniform_sigmas(4), None),
            cond=policy.encode_prompts([prompt]),
            generator=[gen],
        )
        img = policy.decode(traj.sample)[0, 0]
    levels = (img.clamp(0, 1) * 255).round().long()
    return levels.repeat_interleave(32, 0).repeat_interleave(32, 1)  # sample enlarges 2x2 images 32 times


@pytest.mark.parametrize("lora", [False, True], ids=["full-finetune", "lora"])
def test_sample_draws_from_a_runs_newest_ema_weights(tmp_path: Path, lora: bool) -> None:
    from safetensors.torch import load_file

    cfg = _toy_yaml(tmp_path)
    run = tmp_path / "run"
    extra = ["train.lora.enabled=true", "train.lora.rank=2", "train.lr=0.05"] if lora else []
    assert main(["train", str(cfg), "--output", str(run), "train.epochs=2", *extra]) == 0
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(run), "--sampler", "ode", "--sigmas", "uniform", "--steps", "4"]
    assert main([*argv, "--prompt", "prompt 1", "--num-images", "2", "--seed", "5", "-o", str(out)]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["checkpoint"] == str(ckpt) and record["adapter"] == "toy"
    files = record["prompts"][0]["files"]
    if lora:
        want = [_expected_levels(None, "prompt 1", s, ckpt / "adapter") for s in (5, 6)]
    else:
        ema = load_file(str(ckpt / "ema.safetensors"))  # the EMA weights, read here by name
        want = [_expected_levels(ema, "prompt 1", s, None) for s in (5, 6)]
    untrained = [_expected_levels(None, "prompt 1", s, None) for s in (5, 6)]
    got = [_png_levels(Path(f)) for f in files]
    for g, w, u in zip(got, want, untrained, strict=True):
        assert torch.equal(g, w)
        assert not torch.equal(w, u) or lora  # the trained weights were applied (full fine-tuning moves them)


# --------------------------------------------------------------------------- case 17: many micro-batches


def test_many_micro_batches_per_update_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, out = _toy_yaml(tmp_path), tmp_path / "run"
    argv = ["train", str(cfg), "--output", str(out), "train.epochs=1", "eval.every=0", "train.batch_size=1"]
    assert main([*argv, "train.grad_accum=1000"]) == 0
    err = capsys.readouterr().err
    assert "warning: train.grad_accum=1000 runs 1000 forward/backward passes" in err
    assert "train.batch_size=1000 with train.grad_accum=1" in err
    assert main([*argv, "train.grad_accum=2", "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_an_update_is_the_same_however_it_is_cut_into_micro_batches(tmp_path: Path) -> None:
    """What the warning promises: batch_size x grad_accum fixed, the trained weights agree."""
    from precise_rl.config import config_from_dict
    from precise_rl.rl.trainer import GRPOTrainer

    weights = []
    for bs, ga in ((12, 1), (1, 12), (4, 3)):
        data = json.loads(json.dumps(toy_task.TOY_CONFIG))
        data["train"].update(epochs=2, batch_size=bs, grad_accum=ga)
        data["eval"]["every"] = 0
        trainer = GRPOTrainer(config_from_dict(data), tmp_path / f"run{bs}x{ga}", read_only=True)
        for epoch in range(2):
            batch = trainer.collect(epoch)
            _, adv, _ = trainer.score(batch)
            trainer.train_on(batch, adv, epoch)
            trainer.epoch += 1
        weights.append(torch.cat([p.detach().flatten() for p in trainer.params]))
    for w in weights[1:]:
        torch.testing.assert_close(w, weights[0], rtol=1e-4, atol=1e-6)
