"""The built-in signs task: words and prompts, renders, the network, the shipped model and deterministic pretraining.

The slow tests sample the shipped model and read its images with the ``ocr`` reward (PP-OCRv4).
"""

from __future__ import annotations

import json
import random
import string
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.rewards import ocr
from precise_rl.tasks import build_task
from precise_rl.tasks.digits import assets_dir
from precise_rl.tasks.signs import (
    FLOW_FILE,
    REPORT_FILE,
    SignsFlowNet,
    SignsNetConfig,
    SignsPolicy,
    SignsPretrainSettings,
    encode_prompts,
    encode_words,
    eval_prompts,
    eval_words,
    is_held_out,
    parse_prompt,
    pretrain_signs,
    pretrain_words,
    prompt_metadata,
    render_signs,
    rl_words,
    train_prompts,
)

needs_rapidocr = pytest.mark.skipif(
    ocr.importlib.util.find_spec("rapidocr_onnxruntime") is None, reason="the ocr extra is not installed"
)
#: a pretraining run small enough for a test
TINY = SignsPretrainSettings(steps=3, batch=4, warmup=2, renders_per_word=1, num_words=16)


@pytest.fixture
def rng(request) -> random.Random:
    """Fresh random inputs per test, reproducible: seeded from the test's name."""
    seed = zlib.crc32(request.node.name.encode())
    torch.manual_seed(seed)
    return random.Random(seed)


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((assets_dir() / REPORT_FILE).read_text())


# --------------------------------------------------------------------------- words and prompts


def test_held_out_words_never_appear_in_pretraining_or_rl() -> None:
    pre, held, rl = set(pretrain_words()), set(eval_words()), set(rl_words())
    assert len(pre) == len(pretrain_words()) == 4000 and len(held) == len(eval_words()) == 48 and len(rl) == 64
    assert not pre & held and not rl & held
    assert rl <= pre
    # the split by an independent CRC-32 (zlib's, as binascii would give): 1 in 8 held out
    assert all(zlib.crc32(w.encode()) % 8 == 0 for w in held)
    assert all(zlib.crc32(w.encode()) % 8 != 0 for w in pre)
    assert all(3 <= len(w) <= 5 and set(w) <= set(string.ascii_uppercase) for w in pre | held)


def test_held_out_share_of_random_words_is_about_one_in_eight(rng: random.Random) -> None:
    words = ["".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 5))) for _ in range(4000)]
    share = sum(is_held_out(w) for w in words) / len(words)
    assert 0.10 < share < 0.15


def test_prompts_parse_to_their_quoted_words(rng: random.Random) -> None:
    for _ in range(50):
        word = "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 6)))
        prefix = rng.choice(["a sign that says", "a neon sign reading", "graffiti:", ""])
        prompt = f'{prefix} "{word}" {rng.choice(["", "on a wall", "please"])}'
        assert parse_prompt(prompt) == word.upper()
        tokens = encode_prompts([prompt])[0].tolist()
        # A is 1 ... Z is 26, zero-padded to six slots
        assert tokens == [ord(c) - ord("A") + 1 for c in word.upper()] + [0] * (6 - len(word))
    assert [m["word"] for m in prompt_metadata(train_prompts())] == list(rl_words())
    assert [parse_prompt(p) for p in eval_prompts()] == list(eval_words())


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a sign that says MOON", "has no quoted word"),
        ('a sign that says "M00N"', "letters A-Z only"),
        ('a sign that says ""', "letters A-Z only"),
        ('a sign that says "TOOLONG"', "at most 6"),
    ],
)
def test_unreadable_prompts_are_refused_by_name(prompt: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_prompt(prompt)
    with pytest.raises(UserError, match="expected a list of prompts"):
        encode_prompts(prompt)


# --------------------------------------------------------------------------- renders and network


def test_renders_are_one_dark_line_on_a_light_ground(rng: random.Random) -> None:
    words = [rng.choice(pretrain_words()) for _ in range(12)]
    images = render_signs(words, random.Random(rng.random()))
    assert images.shape == (12, 3, 32, 128) and images.dtype == np.uint8
    gray = images.astype(np.float64).mean(axis=1)
    for g in gray:
        ink = g < 110  # the text colours are under 90 in every channel, the grounds over 170
        assert 0.02 < ink.mean() < 0.5
        rows = np.flatnonzero(ink.any(axis=1))
        assert rows.max() - rows.min() < 32  # inside the image: one line
    again = render_signs(words, random.Random(0))
    assert np.array_equal(again, render_signs(words, random.Random(0)))


@needs_rapidocr
def test_the_recogniser_reads_clean_renders(rng: random.Random) -> None:
    from precise_rl.rewards import build_reward

    words = [rng.choice(pretrain_words()) for _ in range(16)]
    images = torch.from_numpy(render_signs(words, random.Random(rng.random()))).float() / 255
    scores = build_reward("ocr", detect=False)(images, [f'"{w}"' for w in words], [{}] * 16)["ocr"]
    assert float(scores.mean()) > 0.9


def test_the_layout_puts_each_letter_where_the_renders_draw_it(rng: random.Random) -> None:
    from precise_rl.tasks.signs.render import FONTS, JITTER_X, WIDTH, _fitting_size, _font, letter_advance

    net = SignsFlowNet(SignsNetConfig())
    for _ in range(20):
        word = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(1, 6)))
        n = len(word)
        # independent of the model: the advance of each face at its mean size, from PIL
        advances = []
        for face in range(len(FONTS)):
            size = _fitting_size("H" * n, face, 0.9)
            advances.append(_font(face, size).getlength("H" * n) / n * (0.95 + 1.0) / 2)
        assert abs(letter_advance(n) - sum(advances) / len(advances)) < 1e-6
        # the renders centre the text (within the jitter): the ink spans about n advances around the middle
        image = render_signs([word], random.Random(rng.random()))[0].astype(np.float64).mean(axis=0)
        cols = np.flatnonzero((image < 110).any(axis=0))
        centre = (cols.min() + cols.max() + 1) / 2
        assert abs(centre - WIDTH / 2) <= JITTER_X + 0.1 * letter_advance(n) + 1
        # any shape of positions: random ones in a (4, 2) block, or every pixel centre
        x = np.array([rng.uniform(0, WIDTH) for _ in range(8)]).reshape(4, 2) if rng.random() < 0.5 else None
        x = np.arange(WIDTH) + 0.5 if x is None else x
        letters, phase = net.layout(encode_words([word]), torch.from_numpy(x))
        start = WIDTH / 2 - n * letter_advance(n) / 2
        slot = np.floor((x - start) / letter_advance(n)).astype(int)
        codes = np.array([0] + [ord(c) - 64 for c in word])  # 0 outside the word
        expect = codes[np.where((slot >= 0) & (slot < n), slot + 1, 0)]
        assert letters[0].tolist() == expect.tolist()
        assert torch.allclose(phase[0].norm(dim=-1), torch.tensor((expect > 0).astype(np.float32)))


def test_a_fresh_network_is_zero_and_its_config_refuses_unknown_keys() -> None:
    net = SignsFlowNet(SignsNetConfig())
    x = torch.randn(3, 3, 32, 128)
    out = net(x, torch.rand(3), encode_words(["MOON", "ABC", "QWERT"]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # the zero-initialised head
    with pytest.raises(UserError, match="unknown signs model config keys"):
        SignsNetConfig.from_dict({"widht": 64})
    with pytest.raises(UserError, match="does not tile"):
        SignsNetConfig.from_dict({"patch_w": 7})


# --------------------------------------------------------------------------- the shipped model


def test_the_task_builds_from_the_shipped_weights_and_samples_images(report: dict) -> None:
    from precise_rl.config import config_from_dict

    task = build_task(config_from_dict({"model": {"name": "signs"}}).model, "cpu")
    policy = task.policy
    assert isinstance(policy, SignsPolicy)
    assert task.default_rewards == {"ocr": 1.0} and task.reward_options == {"ocr": {"detect": False}}
    assert task.eval_prompts == eval_prompts() and task.train_prompts == train_prompts()
    params = sum(p.numel() for p in policy.transformer.parameters())
    assert params == report["flow"]["parameters"]
    with safe_open(str(assets_dir() / FLOW_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["precise_rl"])
    assert meta["config"] == report["flow"]["config"]
    cond = policy.encode_prompts(['a sign that says "MOON"', 'a sign that says "cat"'])
    x = policy.sample_noise(2, torch.Generator().manual_seed(0))
    grid = policy.time_grid(3)
    with torch.no_grad():
        for k in range(3):
            x = x + (grid[k + 1] - grid[k]).float() * policy.velocity(x, grid[k].float().expand(2), cond)
    images = policy.decode(x)
    assert images.shape == (2, 3, 32, 128) and 0 <= float(images.min()) <= float(images.max()) <= 1


def test_the_report_states_a_held_out_reward_in_the_headroom_window(report: dict) -> None:
    m = report["metrics"]
    assert m["sampler"] == "ode" and m["num_steps"] == 10
    assert 0.3 <= m["held_out_ocr"] <= 0.7
    assert report["settings"]["steps"] == SignsPretrainSettings().steps


@needs_rapidocr
@pytest.mark.slow
def test_the_shipped_model_scores_in_the_headroom_window_on_held_out_words(report: dict) -> None:
    from precise_rl.tasks.signs import evaluate_ocr, load_signs_flow

    result = evaluate_ocr(load_signs_flow(), eval_words(), 10, 4, seed=12345)  # noise the report never used
    assert 0.3 <= result["ocr"] <= 0.7
    assert abs(result["ocr"] - report["metrics"]["held_out_ocr"]) < 0.1


# --------------------------------------------------------------------------- pretraining


def test_pretraining_is_deterministic_and_depends_on_the_seed(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        pretrain_signs(tmp_path / name, seed=seed, progress=False, settings=TINY, evaluate=False)
    assert torch.equal(torch.get_rng_state(), state), "pretraining must leave the caller's RNG alone"
    a, b, c = ((tmp_path / n / FLOW_FILE).read_bytes() for n in "abc")
    assert a == b and a != c
    assert (tmp_path / "a" / REPORT_FILE).read_text() == (tmp_path / "b" / REPORT_FILE).read_text()
    SignsPolicy.from_pretrained(tmp_path / "a")


def test_pretraining_refuses_bad_arguments(tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError, match="steps must be at least 1, got 0"):
        pretrain_signs(tmp_path / "x", steps=0, progress=False, settings=TINY)
    with pytest.raises(UserError, match="num_words must be between 1 and 4000"):
        pretrain_signs(tmp_path / "x", progress=False, settings=SignsPretrainSettings(num_words=0))
    assert not (tmp_path / "x").exists()
    assert main(["pretrain", "signs", "--classifier-steps", "3", "--output", str(tmp_path / "y")]) == 2
    assert "the signs task trains no classifier" in capsys.readouterr().err
    with pytest.raises(UserError, match="expected a 'signs_flow' one"):
        SignsPolicy.from_pretrained(assets_dir() / "digits_flow.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        SignsPolicy.from_pretrained(tmp_path / "nothing")


# --------------------------------------------------------------------------- training on the task


@needs_rapidocr
@pytest.mark.slow
def test_a_short_run_of_the_signs_config_trains_and_evaluates_with_the_ocr_reward(tmp_path: Path) -> None:
    """``configs/signs_precise.yaml``, cut to one epoch: rollouts scored by PP-OCRv4, an update, both protocols."""
    config = Path(__file__).resolve().parents[1] / "configs" / "signs_precise.yaml"
    run = tmp_path / "run"
    args = ["train", str(config), "--output", str(run), "train.epochs=1", "train.groups_per_epoch=2"]
    args += ["train.group_size=4", "train.batch_size=8", "eval.every=1", "eval.max_prompts=2", "logging.progress=false"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "reward/ocr" in r)
    assert 0.0 <= first["reward/ocr"] <= 1.0 and first["model_evals_rollout"] == 8 * 10
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["protocols"]) == {"ode", "own"}
    for protocol in ("ode", "own"):
        assert 0.0 <= summary["final_eval"][f"eval_{protocol}/ocr"] <= 1.0
    assert summary["final_eval"]["eval_reward_ceiling"] == 1.0
