"""The ``precise-rl`` entry point: every subcommand has --help, overrides may follow flags, bad flags exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from precise_rl.cli import COMMANDS, main

from . import toy_task

ROOT = Path(__file__).resolve().parents[1]

toy_task.register()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"precise-rl {command}" in capsys.readouterr().out


def test_overrides_may_follow_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump(toy_task.TOY_CONFIG))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=1", "eval.every=0"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 1
    assert resolved["eval"]["every"] == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# --------------------------------------------------------------------------- malformed input: one sentence, exit 2


def _files(tmp: Path) -> dict[str, Path]:
    """Malformed files of every kind a user can hand over."""
    f = {
        "bad_yaml": tmp / "bad.yaml",
        "binary": tmp / "binary.yaml",
        "list_yaml": tmp / "list.yaml",
        "typo_yaml": tmp / "typo.yaml",
        "nested_yaml": tmp / "nested.yaml",
        "scalar_section": tmp / "scalar.yaml",
        "wrong_type_yaml": tmp / "wrongtype.yaml",
        "ok_yaml": tmp / "ok.yaml",
        "latin1_prompts": tmp / "latin1.txt",
        "comment_prompts": tmp / "comments.txt",
        "no_digit_prompts": tmp / "nodigit.txt",
        "fake_weights": tmp / "fake.safetensors",
        "text_weights": tmp / "weights.txt",
        "a_dir": tmp / "a_dir",
        "a_file": tmp / "a_file",
        "run_without_ckpt": tmp / "empty_run",
    }
    f["bad_yaml"].write_text("train: [1, 2\n")
    f["binary"].write_bytes(b"\xff\xfe\x00\x01")
    f["list_yaml"].write_text("- a\n- b\n")
    f["typo_yaml"].write_text("trian:\n  lr: 1e-3\n")
    f["nested_yaml"].write_text("train:\n  lr: 1e-3\n  bogus: 1\n")
    f["scalar_section"].write_text("train: 3\n")
    f["wrong_type_yaml"].write_text("train:\n  epochs: ten\n")
    f["ok_yaml"].write_text("train:\n  epochs: 1\n")
    f["latin1_prompts"].write_bytes("un 7 élégant\n".encode("latin-1"))
    f["comment_prompts"].write_text("# nothing but comments\n\n   \n")
    f["no_digit_prompts"].write_text("a dog riding a bike\n")
    f["fake_weights"].write_bytes(b"not a safetensors file at all")
    f["text_weights"].write_text("{}")
    f["a_dir"].mkdir()
    f["a_file"].write_text("x")
    (f["run_without_ckpt"] / "checkpoints").mkdir(parents=True)
    return f


#: (id, arguments with {name} standing for a file of _files, a fragment of the one-sentence error)
MALFORMED: list[tuple[str, list[str], str]] = [
    # config files
    ("config-missing", ["train", "{a_dir}/nope.yaml"], "config file '{a_dir}/nope.yaml' does not exist"),
    ("config-directory", ["train", "{a_dir}"], "config file '{a_dir}' is a directory; give a YAML file"),
    ("config-bad-yaml", ["train", "{bad_yaml}"], "config file '{bad_yaml}' is not valid YAML"),
    ("config-binary", ["train", "{binary}"], "config file '{binary}' is not a text file"),
    ("config-list", ["train", "{list_yaml}"], "must hold a mapping of keys to values"),
    ("config-typo", ["train", "{typo_yaml}"], "unknown config key 'trian' (did you mean 'train'?)"),
    ("config-nested-unknown", ["train", "{nested_yaml}"], "unknown config key 'train.bogus'"),
    ("config-scalar-section", ["train", "{scalar_section}"], "config key 'train' must be a mapping, got 3"),
    ("config-wrong-type", ["train", "{wrong_type_yaml}"], "config key 'train.epochs' must be an integer, got 'ten'"),
    ("config-two-files", ["train", "{ok_yaml}", "{ok_yaml}"], "give one config file, then key.path=value overrides"),
    # overrides
    ("override-empty-key", ["train", "=3"], "override '=3' has an empty key"),
    ("override-empty-part", ["train", "train..lr=3"], "has an empty key"),
    ("override-empty-value", ["train", "train.lr="], "config key 'train.lr' must be a number, got None"),
    ("override-not-a-section", ["train", "train.lr.x=3"], "config key 'train.lr' must be a number"),
    ("override-nan", ["train", "train.lr=nan"], "config key 'train.lr' must be a finite number, got nan"),
    ("override-inf", ["train", "train.lr=.inf"], "config key 'train.lr' must be a finite number, got inf"),
    ("override-eta-nan", ["train", "sampler.eta=.nan"], "config key 'sampler.eta' must be a finite number"),
    ("override-negative-lr", ["train", "train.lr=-1"], "config key 'train.lr' must be > 0, got -1.0"),
    ("override-sampler", ["train", "sampler.name=euler"], "config key 'sampler.name' must be one of 'precise'"),
    ("override-precision", ["train", "train.mixed_precision=fp8"], "config key 'train.mixed_precision' must be one"),
    ("override-groups", ["train", "train.groups_per_epoch=0"], "config key 'train.groups_per_epoch' must be > 0"),
    (
        "override-fraction",
        ["train", "algorithm.timestep_fraction=1.5"],
        "'algorithm.timestep_fraction' must be in (0, 1]",
    ),
    ("override-window", ["train", "sampler.window.size=20"], "config key 'sampler.window' does not fit in 10 steps"),
    ("override-no-eval-sampler", ["train", "eval.samplers=[]"], "config key 'eval.samplers' names no sampler"),
    ("override-eval-sampler", ["train", "eval.samplers=[euler]"], "'eval.samplers' has unknown sampler 'euler'"),
    ("override-betas", ["train", "train.adam_betas=[0.9]"], "config key 'train.adam_betas' must be two numbers"),
    ("override-keep", ["train", "checkpoint.keep=0"], "config key 'checkpoint.keep' must be > 0, got 0"),
    ("override-seed", ["train", "seed=zero"], "config key 'seed' must be an integer, got 'zero'"),
    ("override-max-nonfinite", ["train", "train.max_nonfinite=0"], "config key 'train.max_nonfinite' must be > 0"),
    ("override-huge-int-float", ["train", "train.lr=" + "9" * 400], "config key 'train.lr' must be a finite number"),
    ("reward-unknown", ["train", "reward.weights.nosuch=1"], "unknown reward 'nosuch'"),
    ("reward-weight-nan", ["train", "reward.weights.ink_style=.nan"], "'reward.weights.ink_style' must be a finite"),
    ("reward-bad-option", ["train", "reward.options.ink_style.bogus=1"], "cannot build reward 'ink_style'"),
    ("reward-option-unweighted", ["train", "reward.options.nosuch.x=1"], "options given for rewards ['nosuch']"),
    ("nothing-to-train", ["train", "train.full_finetune=false"], "nothing to train: set train.lora.enabled=true"),
    # prompt files
    ("prompts-missing", ["train", "prompts.train={a_dir}/p.txt"], "prompt file '{a_dir}/p.txt' (config key"),
    ("prompts-directory", ["train", "prompts.train={a_dir}"], "(config key 'prompts.train') is a directory"),
    ("prompts-eval-missing", ["train", "prompts.eval={a_dir}/p.txt"], "(config key 'prompts.eval') does not exist"),
    ("prompts-not-utf8", ["train", "prompts.train={latin1_prompts}"], "prompt file '{latin1_prompts}' is not UTF-8"),
    ("prompts-only-comments", ["train", "prompts.train={comment_prompts}"], "holds no prompts"),
    ("prompts-no-digit", ["train", "prompts.train={no_digit_prompts}"], "cannot find a digit 0-9 in the prompt"),
    ("prompts-eval-no-digit", ["train", "prompts.eval={no_digit_prompts}"], "cannot find a digit 0-9 in the prompt"),
    # models and model paths
    ("model-unknown", ["train", "model.name=nosuch"], "unknown model 'nosuch' in config key 'model.name'"),
    ("model-path-missing", ["train", "model.path={a_dir}/w.safetensors"], "does not exist"),
    ("model-path-not-weights", ["train", "model.path={fake_weights}"], "is not a precise-rl digits weights file"),
    ("model-path-text", ["train", "model.path={text_weights}"], "is not a precise-rl digits weights file"),
    ("model-options", ["train", "model.options.bogus=1"], "config key 'model.options' does not fit model 'digits'"),
    ("model-not-a-pipeline", ["train", "model.name=sd3", "model.path={a_dir}"], "is not a diffusers pipeline"),
    ("model-pipeline-missing", ["train", "model.name=flux2_klein", "model.path={a_dir}/x"], "does not exist"),
    # flags
    ("flag-unknown", ["train", "--bogus"], "unrecognized arguments: --bogus"),
    ("flag-resume-no-value", ["train", "--resume"], "argument --resume: expected one argument"),
    ("flag-resume-missing", ["train", "--resume", "{a_dir}/run"], "resume path '{a_dir}/run' does not exist"),
    ("flag-resume-no-checkpoint", ["train", "--resume", "{run_without_ckpt}"], "no checkpoint found in"),
    ("flag-output-is-file", ["train", "--output", "{a_file}"], "cannot write to output directory '{a_file}'"),
    ("command-unknown", ["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    ("eval-no-run", ["eval"], "the following arguments are required: run_dir"),
    ("eval-steps-text", ["eval", "{a_dir}", "--steps", "a,b"], "expected a comma-separated list of int, got 'a,b'"),
    ("eval-steps-zero", ["eval", "{a_dir}", "--steps", "0"], "--steps must be positive integers"),
    ("eval-sampler", ["eval", "{a_dir}", "--samplers", "euler"], "--samplers has unknown sampler 'euler'"),
    ("eval-samples", ["eval", "{a_dir}", "--samples-per-prompt", "0"], "--samples-per-prompt must be a positive"),
    ("eval-no-checkpoint", ["eval", "{run_without_ckpt}"], "no checkpoint found in"),
    ("compare-seeds", ["compare", "--seeds", "0"], "--seeds must be a positive integer, got 0"),
    ("compare-samplers", ["compare", "--samplers", "euler"], "--samplers: unknown sampler 'euler'; choose"),
]


def test_at_least_thirty_malformed_inputs_are_covered() -> None:
    assert len(MALFORMED) >= 30
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(("args", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_input_is_one_sentence_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    files = {k: str(v) for k, v in _files(tmp_path).items()}
    argv = [a.format(**files) for a in args]
    if argv[0] == "train" and "--output" not in argv:
        argv += ["--output", str(tmp_path / "run")]  # a bad input must fail before any run directory matters
    if argv[0] == "compare":
        argv += ["--output", str(tmp_path / "cmp")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (argv, captured.err[-2000:])
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"precise-rl{' ' + argv[0] if argv[0] in COMMANDS else ''}: error: "), lines[0]
    assert fragment.format(**files) in lines[0], lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_models_lists_every_registered_adapter_and_is_the_readmes_table(capsys: pytest.CaptureFixture[str]) -> None:
    from precise_rl.cli.models import model_rows, models_table
    from precise_rl.policies.registry import ADAPTERS

    assert main(["models"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == models_table()
    assert printed in (ROOT / "README.md").read_text()
    rows = {r["name"]: r for r in model_rows()}
    assert set(ADAPTERS) | {"digits", "signs", "diffusers"} == set(rows)
    for name, cls in ADAPTERS.items():
        assert rows[name]["pipeline"] == cls.pipeline_class and rows[name]["default_model"] == cls.default_model
    assert main(["models", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == [r["name"] for r in model_rows()]


@pytest.mark.parametrize("argv", [["models", "--json"], ["models"], ["--help"]], ids=["models-json", "models", "help"])
def test_a_reader_that_leaves_early_gets_no_traceback(argv: list[str]) -> None:
    """``precise-rl models --json | head -c 600``: the reader closes the pipe before the command is done writing."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = "import sys; from precise_rl.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=write, stderr=subprocess.PIPE, env=env)
    os.close(write)
    os.close(read)  # gone before the first write: every write of the command meets a closed pipe
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert proc.returncode in (0, 141), err.decode()  # 141: a shell's code for a command ended by a closed pipe
