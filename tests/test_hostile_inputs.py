"""Hostile and careless inputs to the command line: one sentence naming what to fix, exit code 2, nothing written.

Each test builds its bad input afresh (random bytes, random keys and values) and checks the
sentence against the facts of that input: the key and the lines it is on, the limit that was
passed, what the path really is.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from precise_rl.cli import main

from . import toy_task

toy_task.register()

ROOT = Path(__file__).resolve().parents[1]


def _toy_yaml(tmp_path: Path, **train: object) -> Path:
    cfg = json.loads(json.dumps(toy_task.TOY_CONFIG))
    cfg["train"].update(train)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"precise-rl {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- YAML read as written


def test_a_key_given_twice_is_named_with_both_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(os.urandom(8))
    key = rng.choice(["lr", "epochs", "group_size", "batch_size"])
    pad = rng.randint(0, 5)
    lines = ["seed: 1", "train:", *[f"  # {i}" for i in range(pad)], f"  {key}: 2", f"  {key}: 3"]
    path = tmp_path / "dup.yaml"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out)]) == 2
    line = _one_error(capsys, "train")
    first = lines.index(f"  {key}: 2") + 1
    assert f"key {key!r} appears twice (lines {first} and {first + 1})" in line, line
    assert not out.exists()
    assert main(["train", f"train.x={{{key}: 1, {key}: 2}}", "--output", str(out)]) == 2
    assert f"key {key!r} appears twice on line 1" in _one_error(capsys, "train")


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_an_empty_config_file_is_refused_not_run_as_the_default_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out)]) == 2
    assert "is empty" in _one_error(capsys, "train")
    assert not out.exists()


@pytest.mark.parametrize("depth", [65, 5000])
def test_a_config_nested_thousands_deep_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], depth: int
) -> None:
    path = tmp_path / "deep.yaml"
    block = rng_nest(depth)
    path.write_text(f"train:\n  lr: {block}\n")
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    assert "more than 64 levels deep" in _one_error(capsys, "train")


def rng_nest(depth: int) -> str:
    """A flow value nesting lists and mappings ``depth`` levels deep, in a random order."""
    rng = random.Random(os.urandom(8))
    opens = [rng.choice(["[", "{k: "]) for _ in range(depth - 1)]
    closes = ["]" if o == "[" else "}" for o in reversed(opens)]
    return "".join(opens) + "[]" + "".join(closes)


# --------------------------------------------------------------------------- source images of any bit depth


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` pixels and whose data is a few bytes (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _edit_prompts(tmp_path: Path, image: str) -> Path:
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "make it red", "image": image}) + "\n")
    return path


def test_a_16_bit_grey_png_is_scaled_to_8_bit_not_clipped_to_white(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from precise_rl.policies.edit import source_pixels
    from precise_rl.tasks.registry import read_prompt_file

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    grey = rng.integers(0, 65536, size=(11, 13), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")  # really 16 bits on disk
    (prompt,) = read_prompt_file(_edit_prompts(tmp_path, "deep.png"), "prompts.train")
    pixels = source_pixels(prompt).numpy()
    expected = grey.astype(np.float64) / 65535.0
    for channel in pixels:  # grey: the three channels alike, within half an 8-bit step of the 16-bit value
        assert np.abs(channel - expected).max() <= 0.5 / 255 + 1e-6
    assert pixels.std() > 0.2  # a clipped conversion would be nearly all white


def test_a_float_tiff_in_0_1_is_scaled_and_one_outside_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from PIL import Image

    from precise_rl.errors import UserError
    from precise_rl.policies.edit import source_pixels
    from precise_rl.tasks.registry import read_prompt_file

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    values = rng.random((7, 9)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "unit.tiff")
    assert Image.open(tmp_path / "unit.tiff").mode == "F"
    (prompt,) = read_prompt_file(_edit_prompts(tmp_path, "unit.tiff"), "prompts.train")
    assert np.abs(source_pixels(prompt).numpy()[0] - values).max() <= 0.5 / 255 + 1e-6
    top = float(rng.uniform(2, 300))
    Image.fromarray((values * top).astype(np.float32)).save(tmp_path / "hdr.tiff")
    with pytest.raises(UserError) as info:
        read_prompt_file(_edit_prompts(tmp_path, "hdr.tiff"), "prompts.train")
    message = str(info.value)
    assert "line 1 of prompt file" in message and "not [0, 1]" in message
    assert f"{float((values * top).max()):g}" in message  # the range found is named


@pytest.mark.parametrize("kind", ["bomb", "directory", "fifo", "missing"])
def test_a_bad_source_image_is_named_for_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from precise_rl.errors import UserError
    from precise_rl.tasks.registry import read_prompt_file

    image = tmp_path / "src.png"
    if kind == "bomb":
        _png_header_only(image, 30000, 30000)
    elif kind == "directory":
        image.mkdir()
    elif kind == "fifo":
        os.mkfifo(image)
    expected = {
        "bomb": "more than the 67108864 pixels (8192 x 8192)",
        "directory": "is a directory, not an image file",
        "fifo": "is a FIFO (named pipe), not an image file",
        "missing": "does not exist",
    }[kind]
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_file(_edit_prompts(tmp_path, "src.png"), "prompts.train")
    # sample --image checks the same before any model is built
    out = tmp_path / "out"
    assert main(["sample", "--model", "digits", "--image", str(image), "--prompt", "x", "-o", str(out)]) == 2
    line = _one_error(capsys, "sample")
    assert "--image" in line and expected in line, line
    assert not out.exists()


def test_an_image_just_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    from precise_rl.errors import UserError
    from precise_rl.images import MAX_SOURCE_PIXELS, read_rgb8

    side = int(MAX_SOURCE_PIXELS**0.5) + 1
    _png_header_only(tmp_path / "wide.png", side, side)
    with pytest.raises(UserError, match=f"is {side} x {side} pixels, more than"):
        read_rgb8(tmp_path / "wide.png", "source image 'wide.png'")


# --------------------------------------------------------------------------- sizes bounded up front


@pytest.mark.parametrize(
    ("key", "limit"),
    [
        ("sampler.num_steps", 1000),
        ("eval.num_steps", 1000),
        ("train.group_size", 4096),
        ("train.rollout_batch_size", 4096),
        ("train.batch_size", 4096),
        ("eval.samples_per_prompt", 4096),
        ("train.groups_per_epoch", 1_000_000),
        ("eval.max_prompts", 1_000_000),
    ],
)
def test_absurd_sizes_in_a_config_are_refused_naming_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, limit: int
) -> None:
    from precise_rl.config import load_config, validate

    validate(load_config(None, [f"{key}={limit}"]))  # the limit itself is allowed
    value = limit + random.Random(os.urandom(8)).randint(1, 10**8)
    out = tmp_path / "run"
    assert main(["train", f"{key}={value}", "--output", str(out)]) == 2
    line = _one_error(capsys, "train")
    assert f"'{key}' is {value}" in line and f"more than the limit of {limit}" in line, line
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "eval", "study"])
def test_absurd_step_counts_on_the_command_line_are_refused_naming_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    steps = 1000 + random.Random(os.urandom(8)).randint(1, 10**8)
    out = tmp_path / "out"
    argv = {
        "sample": ["sample", "--model", "digits", "--prompt", "a 7", "--steps", str(steps), "-o", str(out)],
        "eval": ["eval", str(tmp_path), "--steps", f"10,{steps}", "--output", str(out / "eval.json")],
        "study": ["study", "--steps", f"6,{steps}", "--output", str(out)],
    }[command]
    assert main(argv) == 2
    line = _one_error(capsys, command)
    assert f"--steps is {steps} steps, more than the limit of 1000 steps" in line, line
    assert not out.exists()


# --------------------------------------------------------------------------- reward weights that train nothing


def test_all_reward_weights_zero_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _toy_yaml(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "reward.weights.toy_brightness=0"]) == 2
    line = _one_error(capsys, "train")
    assert "every reward weight 0 (toy_brightness)" in line and "nothing would be trained" in line, line
    assert not out.exists()
    # a weight of 0 beside a non-zero one is allowed (logged, not trained on)
    from precise_rl.config import load_config, validate

    validate(load_config(cfg, ["reward.weights.other=0"]))


def test_a_weight_big_enough_to_overflow_is_refused_and_the_limit_never_overflows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    import torch

    from precise_rl.config import MAX_REWARD_WEIGHT
    from precise_rl.errors import UserError
    from precise_rl.rewards.base import check_weights, combine_rewards

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    big = float(MAX_REWARD_WEIGHT * rng.uniform(1.5, 1e200))
    cfg = _toy_yaml(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), f"reward.weights.toy_brightness={big!r}"]) == 2
    line = _one_error(capsys, "train")
    assert "beyond the limit of 1e+12" in line and "would overflow" in line, line
    assert not out.exists()
    with pytest.raises(UserError, match="beyond the limit"):
        check_weights({"a": 1.0, "b": -big})
    # at the limit, several rewards over a large batch (z-scores up to sqrt(n)) still combine to finite numbers
    n = 4096
    comps = {k: torch.from_numpy(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)) for k in "abc"}
    comps["a"][0] = 1e6  # one outlier: its z-score is nearly sqrt(n)
    weights = {"a": MAX_REWARD_WEIGHT, "b": -MAX_REWARD_WEIGHT, "c": MAX_REWARD_WEIGHT}
    combined = combine_rewards(comps, weights).numpy()
    assert np.isfinite(combined).all()
    z = {k: (v.numpy() - v.numpy().mean()) / (v.numpy().std() + 1e-8) for k, v in comps.items()}
    expected = sum(w * z[k] for k, w in weights.items())
    np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-5 * MAX_REWARD_WEIGHT)


# --------------------------------------------------------------------------- resume reads the run's config.yaml


def test_edits_to_a_runs_config_yaml_are_honoured_on_resume_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _toy_yaml(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(out), "train.epochs=2"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    epochs = random.Random(os.urandom(8)).randint(3, 4)
    saved["train"]["epochs"] = epochs
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"train.epochs 2 -> {epochs}" in err and "config.yaml" in err, err
    logged = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(epochs + 1))  # the edited epoch count was trained
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == epochs  # kept, not discarded
    # an edit the checkpoint cannot take (another sampler) is refused in one sentence, nothing changed
    saved["sampler"]["name"] = "flow_grpo"
    saved["sampler"]["eta"] = 0.7
    saved["train"]["epochs"] = epochs + 1
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    assert "another model or sampler" in _one_error(capsys, "train")
    assert (out / "metrics.jsonl").read_bytes() == before


# --------------------------------------------------------------------------- eval and sample name the run's state


def test_eval_refuses_another_runs_checkpoint_and_keeps_its_own_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    cfg = _toy_yaml(tmp_path)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert main(["train", str(cfg), "--output", str(ours), "train.epochs=2"]) == 0
    seed = random.Random(os.urandom(8)).randint(4, 10**6)
    assert main(["train", str(cfg), "--output", str(theirs), "train.epochs=2", f"seed={seed}"]) == 0
    assert main(["eval", str(ours), "--samplers", "ode"]) == 0
    before = (ours / "eval.json").read_bytes()
    foreign = theirs / "checkpoints" / "epoch_000002"
    capsys.readouterr()
    assert main(["eval", str(ours), "--samplers", "ode", "--checkpoint", str(foreign)]) == 2
    line = _one_error(capsys, "eval")
    assert "is not a checkpoint of run" in line and "differs in seed" in line and "--output" in line, line
    assert (ours / "eval.json").read_bytes() == before
    # to a file of its own it is evaluated; a copy of the run's own checkpoint elsewhere is the run's
    assert main(["eval", str(ours), "--checkpoint", str(foreign), "--output", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["checkpoint"] == str(foreign)
    copy = tmp_path / "copy" / "epoch_000002"
    shutil.copytree(ours / "checkpoints" / "epoch_000002", copy)
    assert main(["eval", str(ours), "--samplers", "ode", "--checkpoint", str(copy)]) == 0
    assert json.loads((ours / "eval.json").read_text())["checkpoint"] == str(copy)


def test_sampling_a_run_with_no_checkpoint_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _toy_yaml(tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--output", str(run), "train.epochs=1", "checkpoint.every=0"]) == 0
    for ckpt in (run / "checkpoints").glob("epoch_*"):
        import shutil

        shutil.rmtree(ckpt)  # as a run stopped before its first checkpoint leaves it
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["sample", "--model", str(run), "--prompt", "x", "-o", str(out)]) == 2
    line = _one_error(capsys, "sample")
    assert "is a training run with no checkpoint yet" in line and "diffusers" not in line, line
    assert not out.exists()


# --------------------------------------------------------------------------- no silent wait for a launch


@pytest.mark.parametrize("rank", ["0", "1"])
def test_leftover_launch_variables_end_in_one_sentence_within_the_bound(tmp_path: Path, rank: str) -> None:
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bound = random.Random(os.urandom(8)).uniform(2.0, 4.0)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "WORLD_SIZE": "2",
        "RANK": rank,
        "LOCAL_RANK": rank,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PRECISE_RL_DIST_TIMEOUT_S": f"{bound:.2f}",
    }
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "precise_rl.cli", "train", "--output", str(out), "train.epochs=1"]
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    waited = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "did not meet within" in lines[0] and f"WORLD_SIZE=2, RANK={rank}" in lines[0], lines[0]
    assert "PRECISE_RL_DIST_TIMEOUT_S" in lines[0]
    assert waited >= bound  # it did wait for the launch, and gave up (the 240 s cap above bounds a hang)


# --------------------------------------------------------------------------- SIGTERM names where to go on


def test_sigterm_names_the_last_checkpoint_and_the_resume_command(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from precise_rl.rl.checkpoint import list_checkpoints

    cfg = _toy_yaml(tmp_path, epochs=400)
    out = tmp_path / "run"
    code = (
        "import sys; from tests import toy_task; toy_task.register(); from precise_rl.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    argv = [sys.executable, "-c", code, "train", str(cfg), "--output", str(out), "checkpoint.every=1"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240  # a bound on a hang, not a timing assertion
    wanted = random.Random(os.urandom(8)).randint(1, 3)
    while proc.poll() is None and len(list_checkpoints(out / "checkpoints")) < wanted:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err[-2000:]  # still ended by the signal, nothing cleaned up
    last = list_checkpoints(out / "checkpoints")[-1]
    line = err.strip().splitlines()[-1]
    assert line.startswith("precise-rl train: terminated (SIGTERM); "), line
    assert f"the last checkpoint is {str(last)!r}" in line and f"precise-rl train --resume {out}" in line, line
    # and that command does go on from it
    assert main(["train", "--resume", str(out), f"train.epochs={int(last.name.split('_')[1]) + 1}"]) == 0


# --------------------------------------------------------------------------- words that say what is so


def test_the_hint_after_a_complete_run_proposes_more_epochs_than_were_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _toy_yaml(tmp_path)
    out = tmp_path / "run"
    done = random.Random(os.urandom(8)).randint(2, 4)
    assert main(["train", str(cfg), "--output", str(out), f"train.epochs={done}"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "train.epochs=1"]) == 0
    said = capsys.readouterr().out
    assert f"already complete ({done} epochs)" in said, said
    proposed = int(said.split("train.epochs=")[-1].split()[0])
    assert proposed > done


def test_a_memory_budget_too_small_is_shown_in_a_unit_that_shows_it() -> None:
    import re

    from precise_rl.errors import UserError
    from precise_rl.rl.memory import MemoryLine, human_bytes

    rng = random.Random(os.urandom(8))
    for _ in range(200):
        n = int(10 ** rng.uniform(0, 12))
        text = human_bytes(n)
        number, unit = text.split()
        scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
        assert abs(float(number) * scale - n) <= 0.006 * n + 0.5, (n, text)
        assert float(number) != 0 or n == 0
    budget = rng.randint(2_000, 900_000)  # bytes: "0.00 GB" before
    line = MemoryLine(fixed=budget, per_row=rng.randint(1, 1000))
    with pytest.raises(UserError) as info:
        line.largest(budget, most=8)
    message = str(info.value)
    assert "0.00 GB" not in message
    shown = re.search(r"budget of ([0-9.]+) (B|kB|MB)", message)
    assert shown is not None, message
    value = float(shown.group(1)) * {"B": 1, "kB": 1e3, "MB": 1e6}[shown.group(2)]
    assert abs(value - budget) <= 0.01 * budget


def test_a_study_never_removes_a_run_directory_holding_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _toy_yaml(tmp_path)
    out = tmp_path / "study"
    mine = out / "runs" / "N2-uniform" / f"precise-seed{toy_task.TOY_CONFIG['seed']}"
    mine.mkdir(parents=True)
    note = os.urandom(16).hex()
    (mine / "notes.txt").write_text(note)
    (mine / "metrics.jsonl").write_text("")  # beside what a killed run leaves
    argv = ["study", str(cfg), "train.epochs=1", "--seeds", "1", "--steps", "2", "--grids", "uniform"]
    assert main([*argv, "--samplers", "precise", "--workers", "1", "-o", str(out)]) == 2
    line = _one_error(capsys, "study")
    assert "holds files a run did not write (notes.txt)" in line, line
    assert (mine / "notes.txt").read_text() == note
