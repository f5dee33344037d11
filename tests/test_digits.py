"""The built-in digits task: data, prompts, the shipped model and files, and deterministic pretraining."""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from sklearn.datasets import load_digits

from precise_rl.cli import main
from precise_rl.errors import UserError
from precise_rl.sde import rollout
from precise_rl.tasks.digits import (
    DIGIT_WORDS,
    EVAL_CLASSIFIER_FILE,
    FLOW_FILE,
    HELD_OUT_COMBOS,
    REPORT_FILE,
    REWARD_CLASSIFIER_FILE,
    STYLE_SYNONYMS,
    STYLES,
    DigitsFlowNet,
    DigitsPolicy,
    FlowNetConfig,
    PretrainSettings,
    assets_dir,
    encode_prompts,
    eval_prompts,
    ink_statistics,
    load_classifier,
    load_digit_data,
    parse_prompt,
    pretrain_digits,
    prompt_metadata,
    split_indices,
    train_prompts,
)
from precise_rl.tasks.digits.models import METADATA_KEY

WEIGHT_FILES = (FLOW_FILE, REWARD_CLASSIFIER_FILE, EVAL_CLASSIFIER_FILE)
# words with no digit or style meaning, to pad random prompts
FILLER = ("a", "the", "handwritten", "digit", "number", "please", "draw", "in", "strokes", "with", "ink", "nice")
#: a pretraining run small enough for a test (the full one takes minutes)
TINY = PretrainSettings(
    flow_steps=4, flow_batch=32, flow_warmup=2, classifier_steps=4, classifier_batch=32, eval_samples_per_prompt=2
)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random inputs per test, reproducible: numpy and torch seeded from the test's name."""
    seed = zlib.crc32(request.node.name.encode())
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 64)`` in [0, 1] as float64 and labels, straight from scikit-learn."""
    raw = load_digits()
    return raw.images.reshape(len(raw.images), 64).astype(np.float64) / 16.0, raw.target.astype(np.int64)


@pytest.fixture(scope="module")
def policy() -> DigitsPolicy:
    return DigitsPolicy.from_pretrained()


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((assets_dir() / REPORT_FILE).read_text())


def _random_prompt(rng: np.random.Generator) -> tuple[str, int, str]:
    d = int(rng.integers(10))
    digit_token = str(d) if rng.random() < 0.5 else DIGIT_WORDS[d]
    tokens = [digit_token] + list(rng.choice(FILLER, size=int(rng.integers(0, 5))))
    style = "plain"
    if rng.random() < 0.8:
        style = str(rng.choice(STYLES))
        tokens.append(str(rng.choice(STYLE_SYNONYMS[style])))
    rng.shuffle(tokens)
    tokens = [t.upper() if rng.random() < 0.2 else t.capitalize() if rng.random() < 0.2 else t for t in tokens]
    separators = [str(rng.choice([" ", ", ", " - ", "  "])) for _ in tokens]
    text = "".join(t + s for t, s in zip(tokens, separators, strict=True)).strip(" ,-")
    return text, d, style


# --------------------------------------------------------------------------- prompts


def test_random_prompts_parse_to_their_digit_and_style(rng) -> None:
    for _ in range(300):
        text, d, style = _random_prompt(rng)
        assert parse_prompt(text) == (d, style), text


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a bold handwritten 7", (7, "bold")),
        ("a thin 3", (3, "thin")),
        ("the digit four in heavy strokes", (4, "bold")),
        ("NINE, delicate", (9, "thin")),
        ("a handwritten 0", (0, "plain")),
        ("seven", (7, "plain")),
        ("a regular 5", (5, "plain")),
        ("7 seven, drawn 7 times", (7, "plain")),  # the same digit twice is one digit
        ("a bold, thick and heavy 2", (2, "bold")),  # synonyms of one style are one style
        ("someone wrote a 1", (1, "plain")),  # 'one' inside a word is not a digit
    ],
)
def test_known_prompts(prompt: str, expected: tuple[int, str]) -> None:
    assert parse_prompt(prompt) == expected


def test_every_style_synonym_parses_to_its_style(rng) -> None:
    assert set(STYLE_SYNONYMS) == set(STYLES)
    for style, words in STYLE_SYNONYMS.items():
        for word in words:
            d = int(rng.integers(10))
            assert parse_prompt(f"a {word} handwritten {d}") == (d, style)
            assert parse_prompt(f"{DIGIT_WORDS[d].upper()} in {word.upper()} strokes") == (d, style)


@pytest.mark.parametrize(
    "prompt",
    [
        "a bold handwritten digit",
        "",
        "a 3 and a 5",
        "three or 5",
        "12",
        "a handwritten 12",
        "a bold thin 7",
        "a plain heavy 4",
        "7.5",
        7,
        None,
        b"a 7",
        ["a 7"],
    ],
)
def test_malformed_prompts_raise_one_sentence_naming_the_prompt(prompt) -> None:
    with pytest.raises(UserError) as info:
        parse_prompt(prompt)
    msg = str(info.value)
    assert repr(prompt) in msg
    assert "\n" not in msg


def test_encode_prompts_and_metadata(rng) -> None:
    drawn = [_random_prompt(rng) for _ in range(40)]
    prompts = [p for p, _, _ in drawn]
    cond = encode_prompts(prompts)
    assert cond.dtype == torch.long and cond.shape == (40, 2)
    assert cond[:, 0].tolist() == [d for _, d, _ in drawn]
    assert [STYLES[i] for i in cond[:, 1].tolist()] == [s for _, _, s in drawn]
    assert prompt_metadata(prompts) == [{"digit": d, "style": s} for _, d, s in drawn]
    assert encode_prompts([]).shape == (0, 2)
    for fn in (encode_prompts, prompt_metadata):
        with pytest.raises(UserError, match="single string"):
            fn("a bold 7")
        with pytest.raises(UserError, match="'a 77'"):
            fn(["a 7", "a 77"])


def test_train_and_eval_prompt_sets() -> None:
    train, evals = train_prompts(), eval_prompts()
    assert len(train) == 48 and len(set(train)) == 48
    assert len(evals) == 36 and len(set(evals)) == 36
    held = set(HELD_OUT_COMBOS)
    assert len(held) == 6
    train_pairs = [parse_prompt(p) for p in train]
    assert not held & set(train_pairs)
    # every other (digit, style) pair is trained on, in two phrasings
    for d in range(10):
        for style in STYLES:
            assert train_pairs.count((d, style)) == (0 if (d, style) in held else 2)
    # eval: the held-out pairs first, then every pair paraphrased, in digit-major order
    assert [parse_prompt(p) for p in evals[:6]] == list(HELD_OUT_COMBOS)
    assert [parse_prompt(p) for p in evals[6:]] == [(d, s) for d in range(10) for s in STYLES]
    assert not set(evals) & set(train)
    # paraphrases share no word with the training prompts (digits are words there, style words differ)
    train_words = {w for p in train for w in p.split()}
    for p in evals[6:]:
        assert not set(p.split()) & train_words, p


# --------------------------------------------------------------------------- data


def test_data_matches_sklearn(sklearn_digits) -> None:
    images, labels = sklearn_digits
    data = load_digit_data()
    assert len(data) == 1797 and data.images.shape == (1797, 1, 8, 8)
    np.testing.assert_allclose(data.images.reshape(1797, 64), images, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(data.digits, labels)
    np.testing.assert_allclose(data.ink, images.mean(axis=1), rtol=1e-6)
    assert not data.images.flags.writeable and not data.styles.flags.writeable


def test_style_labels_are_ink_terciles_within_each_digit(sklearn_digits) -> None:
    images, labels = sklearn_digits
    ink = images.mean(axis=1)
    styles = load_digit_data().styles
    plain, bold, thin = (STYLES.index(s) for s in ("plain", "bold", "thin"))
    for d in range(10):
        idx = labels == d
        n = int(idx.sum())
        s, k = styles[idx], ink[idx]
        assert (s == thin).sum() == n // 3 and (s == bold).sum() == n // 3 and (s == plain).sum() == n - 2 * (n // 3)
        assert k[s == thin].max() <= k[s == plain].min() <= k[s == plain].max() <= k[s == bold].min()


def test_ink_statistics_match_numpy(sklearn_digits) -> None:
    images, labels = sklearn_digits
    ink = images.mean(axis=1)
    means, stds = ink_statistics()
    np.testing.assert_allclose(means, [ink[labels == d].mean() for d in range(10)], rtol=1e-6)
    np.testing.assert_allclose(stds, [ink[labels == d].std() for d in range(10)], rtol=1e-5)


@pytest.mark.parametrize("fraction", [0.2, 0.35])
def test_split_is_stratified_disjoint_and_a_function_of_the_seed(rng, fraction: float) -> None:
    labels = load_digit_data().digits
    seed = int(rng.integers(1 << 30))
    train, test = split_indices(labels, seed, fraction)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(len(labels)))
    for d in range(10):
        assert (labels[test] == d).sum() == round(fraction * (labels == d).sum())
    again = split_indices(labels, seed, fraction)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(split_indices(labels, seed + 1, fraction)[1], test)


# --------------------------------------------------------------------------- the policy


def test_policy_interface(policy: DigitsPolicy, rng) -> None:
    assert policy.latent_shape == (1, 8, 8)
    x = torch.randn(6, 1, 8, 8)
    cond = policy.encode_prompts(["a bold 1", "a thin 2", "three", "a fat 4", "a fine 5", "6"])
    assert cond.tolist() == [[1, 1], [2, 2], [3, 0], [4, 1], [5, 2], [6, 0]]
    t = float(rng.uniform(0.05, 0.95))
    v_scalar = policy.velocity(x, torch.tensor(t), cond)
    v_rows = policy.velocity(x, torch.full((6,), t), cond)
    assert v_scalar.dtype == torch.float32 and v_scalar.shape == x.shape
    torch.testing.assert_close(v_scalar, v_rows, rtol=0, atol=0)
    lat = torch.randn(5, 1, 8, 8) * 1.5
    np.testing.assert_allclose(policy.decode(lat).numpy(), np.clip((lat.numpy() + 1) / 2, 0, 1), atol=1e-7)
    modules = dict(policy.transformer.named_modules())
    assert all(isinstance(modules[n], torch.nn.Linear) for n in policy.lora_target_modules())
    with pytest.raises(TypeError, match="DigitsFlowNet"):
        DigitsPolicy(torch.nn.Linear(2, 2))


def test_from_config_is_seeded_and_keeps_the_global_rng() -> None:
    state = torch.get_rng_state()
    a = DigitsPolicy.from_config({"width": 32, "depth": 1}, seed=3)
    b = DigitsPolicy.from_config(FlowNetConfig(width=32, depth=1), seed=3)
    c = DigitsPolicy.from_config({"width": 32, "depth": 1}, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = (p.transformer.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["in_proj.weight"], sc["in_proj.weight"])
    assert a.transformer.in_proj.out_features == 32 and len(a.transformer.blocks) == 1
    with pytest.raises(UserError, match="widht"):
        DigitsPolicy.from_config({"widht": 32})


def test_shipped_model_draws_recognisable_digits_with_the_asked_ink(policy: DigitsPolicy) -> None:
    """ODE at 10 steps on the policy's grid: the held-out classifier reads >= 90%, ink is ordered by style."""
    per_prompt = 10
    prompts = [f"a {s} handwritten {d}" for d in range(10) for s in STYLES for _ in range(per_prompt)]
    cond = policy.encode_prompts(prompts)
    x1 = policy.sample_noise(len(prompts), generator=torch.Generator().manual_seed(20240))
    traj = rollout(policy.velocity, x1, policy.time_grid(10), "ode", cond=cond)
    images = policy.decode(traj.sample)
    assert images.shape == (300, 1, 8, 8)
    clf = load_classifier("eval")
    with torch.no_grad():
        recognised = (clf(images).argmax(dim=1) == cond[:, 0]).double()
    assert recognised.mean() >= 0.9
    per_digit = [float(recognised[cond[:, 0] == d].mean()) for d in range(10)]
    assert min(per_digit) >= 0.7, per_digit
    ink = images.double().flatten(1).mean(dim=1)
    mean_ink = {s: float(ink[cond[:, 1] == i].mean()) for i, s in enumerate(STYLES)}
    assert mean_ink["bold"] > mean_ink["plain"] > mean_ink["thin"], mean_ink


# --------------------------------------------------------------------------- shipped files


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


def test_report_is_consistent_with_the_shipped_files(report: dict, sklearn_digits) -> None:
    assets = assets_dir()
    assert report["format"] == "precise_rl.digits/1"
    assert report["settings"] == asdict(PretrainSettings())
    for section, kind in (("flow", "digits_flow"), ("reward_classifier", None), ("eval_classifier", None)):
        path = assets / report[section]["file"]
        meta = _metadata(path)
        assert meta["kind"] == (kind or "digits_classifier")
        assert meta["config"] == report[section]["config"]
    assert {report[s]["file"] for s in ("flow", "reward_classifier", "eval_classifier")} == set(WEIGHT_FILES)
    # the flow file's tensors are exactly the parameters of the network its config builds
    tensors = load_numpy(str(assets / FLOW_FILE))
    assert sum(t.size for t in tensors.values()) == report["flow"]["parameters"]
    net = DigitsFlowNet(FlowNetConfig(**report["flow"]["config"]))
    assert sum(p.numel() for p in net.parameters()) == report["flow"]["parameters"]
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: v.shape for k, v in tensors.items()}
    # data section: the split and the ink statistics, recomputed
    _, labels = sklearn_digits
    data = report["data"]
    assert data["num_images"] == len(labels)
    seed = report["seed"]
    assert data["split_seed"] == seed
    _, test = split_indices(labels, seed, report["settings"]["test_fraction"])
    assert data["test_indices"] == test.tolist()
    _, eval_test = split_indices(labels, data["eval_classifier_split_seed"], report["settings"]["test_fraction"])
    assert data["eval_classifier_test_indices"] == eval_test.tolist()
    assert report["flow"]["train_images"] == len(labels) - len(test)
    means, stds = ink_statistics()
    np.testing.assert_allclose(data["ink_mean_by_digit"], means, rtol=1e-6)
    np.testing.assert_allclose(data["ink_std_by_digit"], stds, rtol=1e-6)
    m = report["metrics"]
    assert m["sampler"] == "ode" and m["num_steps"] == 10 and m["num_samples"] == 3000
    assert m["eval_classifier_recognition"] >= 0.9
    assert m["mean_ink_by_style"]["bold"] > m["mean_ink_by_style"]["plain"] > m["mean_ink_by_style"]["thin"]


def test_shipped_classifiers_read_the_held_out_test_images(report: dict, sklearn_digits) -> None:
    images, labels = sklearn_digits
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
    for which, section, key in (
        ("reward", "reward_classifier", "test_indices"),
        ("eval", "eval_classifier", "eval_classifier_test_indices"),
    ):
        idx = np.array(report["data"][key])
        with torch.no_grad():
            acc = float((load_classifier(which)(x[idx]).argmax(dim=1).numpy() == labels[idx]).mean())
        assert acc == pytest.approx(report[section]["test_accuracy"], abs=1e-6)
        assert acc > 0.95
    with pytest.raises(ValueError, match="'reward' or 'eval'"):
        load_classifier("judge")


def test_missing_and_corrupt_weights_are_user_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / FLOW_FILE
    with pytest.raises(UserError, match="does not exist"):
        DigitsPolicy.from_pretrained(missing)
    with pytest.raises(UserError, match="does not exist"):
        DigitsPolicy.from_pretrained(tmp_path)  # a directory without the file
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError, match="garbage.safetensors is not a precise-rl digits weights file"):
        DigitsPolicy.from_pretrained(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((assets_dir() / FLOW_FILE).read_bytes()[:50_000])
    with pytest.raises(UserError, match="truncated.safetensors"):
        DigitsPolicy.from_pretrained(truncated)
    # a classifier file is not a flow model, and the other way round
    with pytest.raises(UserError, match="'digits_classifier' network, expected a 'digits_flow'"):
        DigitsPolicy.from_pretrained(assets_dir() / REWARD_CLASSIFIER_FILE)
    with pytest.raises(UserError, match="expected a 'digits_classifier'"):
        load_classifier("eval", assets_dir() / FLOW_FILE)
    # a safetensors file without our metadata
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="plain.safetensors is not a precise-rl digits weights file"):
        load_classifier("reward", plain)


# --------------------------------------------------------------------------- pretraining


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in (*WEIGHT_FILES, REPORT_FILE)}


def test_pretraining_is_deterministic_and_depends_on_the_seed(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    reports = [
        pretrain_digits(tmp_path / name, seed=seed, progress=False, settings=TINY)
        for name, seed in (("a", 5), ("b", 5), ("c", 6))
    ]
    assert torch.equal(torch.get_rng_state(), state), "pretraining must leave the caller's RNG alone"
    a, b, c = (_file_bytes(tmp_path / name) for name in "abc")
    assert a == b
    for name in WEIGHT_FILES:
        assert a[name] != c[name], name
    assert reports[0] == reports[1] == json.loads(a[REPORT_FILE])
    assert reports[0]["settings"] == asdict(TINY) and reports[0]["seed"] == 5
    assert reports[0]["metrics"]["num_samples"] == 10 * len(STYLES) * TINY.eval_samples_per_prompt
    # what it wrote loads back as the task's networks
    policy = DigitsPolicy.from_pretrained(tmp_path / "a")
    assert sum(p.numel() for p in policy.transformer.parameters()) == reports[0]["flow"]["parameters"]
    load_classifier("reward", tmp_path / "a")
    load_classifier("eval", tmp_path / "a" / EVAL_CLASSIFIER_FILE)
    # steps/classifier_steps override the settings
    report = pretrain_digits(tmp_path / "d", seed=5, steps=2, classifier_steps=3, progress=False, settings=TINY)
    assert report["settings"]["flow_steps"] == 2 and report["settings"]["classifier_steps"] == 3


def test_pretraining_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="flow steps must be at least 1, got 0"):
        pretrain_digits(tmp_path / "x", steps=0, progress=False, settings=TINY)
    with pytest.raises(UserError, match="classifier steps must be at least 1, got -2"):
        pretrain_digits(tmp_path / "x", classifier_steps=-2, progress=False, settings=TINY)
    with pytest.raises(UserError, match="threads must be at least 1"):
        pretrain_digits(tmp_path / "x", threads=0, progress=False, settings=TINY)
    assert not (tmp_path / "x").exists()
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(UserError, match="is not a directory"):
        pretrain_digits(a_file, progress=False, settings=TINY)


def test_pretrain_command_writes_the_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "weights"
    args = ["pretrain", "digits", "--steps", "3", "--classifier-steps", "2", "--output", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output"] == str(out)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["settings"]["flow_steps"] == 3 and report["settings"]["classifier_steps"] == 2
    assert report["seed"] == 0
    assert summary["eval_classifier_test_accuracy"] == round(report["eval_classifier"]["test_accuracy"], 4)
    for name in WEIGHT_FILES:
        assert (out / name).stat().st_size > 0
    DigitsPolicy.from_pretrained(out)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "-4"], "--steps must be at least 1, got -4"),
        (["--classifier-steps", "0"], "--classifier-steps must be at least 1"),
        (["--threads", "0"], "threads must be at least 1"),
    ],
)
def test_pretrain_command_refuses_bad_flags(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    out = tmp_path / "weights"
    assert main(["pretrain", "digits", "--output", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_pretrain_command_refuses_a_non_integer_step_count(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "digits", "--steps", "many", "--output", str(tmp_path / "w")])
    assert info.value.code == 2
    assert "--steps" in capsys.readouterr().err
