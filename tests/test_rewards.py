"""Rewards: the z-scored combination, the registry and RewardSet, the digits rewards and the JPEG rewards."""

from __future__ import annotations

import io
import math
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from sklearn.datasets import load_digits

from precise_rl.errors import UserError
from precise_rl.rewards import (
    FunctionReward,
    JpegCompressibility,
    JpegIncompressibility,
    Reward,
    RewardSet,
    available_rewards,
    build_reward,
    check_weights,
    combine_rewards,
    concat_components,
    jpeg_sizes_kb,
    register_reward,
    weighted_raw,
)
from precise_rl.tasks.digits import (
    EVAL_CLASSIFIER_FILE,
    REWARD_CLASSIFIER_FILE,
    STYLES,
    DigitAlignment,
    InkStyle,
    assets_dir,
)

# --------------------------------------------------------------------------- rewards registered by these tests


@register_reward("test_rewards.mean_pixel")
def mean_pixel(images: torch.Tensor, prompts, metadata, offset: float = 0.0) -> torch.Tensor:
    return images.flatten(1).mean(dim=1) + offset


@register_reward("test_rewards.stats")
class PixelStats(Reward):
    """The own field plus two extra measurements."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, images, prompts, metadata):
        flat = images.flatten(1)
        return {
            "test_rewards.stats": self.scale * flat.max(dim=1).values,
            "min": flat.min(dim=1).values,
            "n": 0 * flat[:, 0] + len(prompts),
        }


@register_reward("test_rewards.renamed")
def renamed(images, prompts, metadata):
    return {"whatever": images.flatten(1).std(dim=1)}


@register_reward("test_rewards.bad_shape")
def bad_shape(images, prompts, metadata):
    return images.flatten(1)[:, :2]


@register_reward("test_rewards.nan")
def nan_reward(images, prompts, metadata):
    out = images.flatten(1).mean(dim=1)
    out[-1] = math.nan
    return out


@register_reward("test_rewards.inf")
def inf_reward(images, prompts, metadata):
    out = images.flatten(1).mean(dim=1)
    out[0] = math.inf
    return out


@register_reward("test_rewards.broken")
def broken(images, prompts, metadata):
    """Mean pixel in float64, replaced by the image's metadata ``"bad"`` where it has one; an extra field too."""
    out = images.flatten(1).double().mean(dim=1)
    for k, meta in enumerate(metadata):
        if "bad" in meta:
            out[k] = meta["bad"]
    return {"test_rewards.broken": out, "double": 2 * out}


@register_reward("test_rewards.two_fields")
def two_fields(images, prompts, metadata):
    return {"a": images.flatten(1).mean(dim=1), "b": images.flatten(1).mean(dim=1)}


@register_reward("test_rewards.empty")
def empty(images, prompts, metadata):
    return {}


USER_MODULE = """
import torch

from precise_rl.rewards import Reward


class Contrast(Reward):
    def __init__(self, power: float = 1.0) -> None:
        self.power = power

    def __call__(self, images, prompts, metadata):
        flat = images.flatten(1)
        return {"contrast": (flat.max(dim=1).values - flat.min(dim=1).values) ** self.power}


def darkness(images, prompts, metadata, gain=1.0):
    return gain * (1.0 - images.flatten(1).mean(dim=1))


NOT_A_REWARD = 3
"""


@pytest.fixture
def rng(request) -> np.random.Generator:
    """Fresh random inputs per test, reproducible: numpy and torch seeded from the test's name."""
    seed = zlib.crc32(request.node.name.encode())
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch) -> str:
    """A module of the user's rewards, importable by path."""
    name = "precise_rl_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return name


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, ``(N, 64)`` float64 in [0, 1], and labels."""
    raw = load_digits()
    return raw.images.reshape(len(raw.images), 64).astype(np.float64) / 16.0, raw.target.astype(np.int64)


def _numpy_combine(components: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    total = 0.0
    for name, w in weights.items():
        if w == 0:
            continue
        r = components[name].astype(np.float64)
        z = (r - np.nanmean(r)) / (np.nanstd(r) + 1e-8)
        total = total + w * z
    return np.broadcast_to(total, next(iter(components.values())).shape)


# --------------------------------------------------------------------------- combination


def test_combine_rewards_equals_numpy_zscore_and_weights(rng) -> None:
    for _ in range(20):
        batch = int(rng.integers(2, 40))
        comps = {f"r{k}": rng.normal(rng.uniform(-5, 5), rng.uniform(0.01, 10), size=batch) for k in range(3)}
        comps["flat"] = np.full(batch, float(rng.normal()))
        weights = {name: float(rng.uniform(-2, 2)) for name in comps}
        tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in comps.items()}
        comps32 = {k: t.numpy() for k, t in tensors.items()}
        got = combine_rewards(tensors, weights)
        assert got.dtype == torch.float32 and got.shape == (batch,)
        np.testing.assert_allclose(got.numpy(), _numpy_combine(comps32, weights), rtol=1e-5, atol=1e-5)
        # the constant component contributes (almost exactly) nothing
        assert combine_rewards(tensors, {"flat": 3.0}).abs().max() < 1e-6
        # the raw weighted sum, in float64
        ref = sum(w * comps32[k].astype(np.float64) for k, w in weights.items())
        np.testing.assert_allclose(weighted_raw(tensors, weights).numpy(), ref, rtol=1e-6, atol=1e-6)


def test_combine_rewards_details(rng) -> None:
    r = torch.tensor(rng.normal(size=7), dtype=torch.float32)
    other = torch.tensor(rng.normal(size=7), dtype=torch.float32)
    # the population std: a z-scored component has mean 0 and population std 1
    z = combine_rewards({"r": r}, {"r": 1.0}).double()
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std(correction=0)) - 1.0) < 1e-6
    # weights scale linearly, unweighted components are ignored, a batch of one scores 0
    torch.testing.assert_close(combine_rewards({"r": r, "x": other}, {"r": 2.5}), 2.5 * z.float())
    assert combine_rewards({"r": r[:1]}, {"r": 1.0}).tolist() == [0.0]
    # a weight of 0 only logs
    torch.testing.assert_close(combine_rewards({"r": r, "x": other}, {"r": 1.0, "x": 0.0}), z.float())
    assert combine_rewards({"r": r}, {"r": 0.0}).tolist() == [0.0] * 7
    with pytest.raises(ValueError, match="no scores for rewards \\['missing'\\]"):
        combine_rewards({"r": r}, {"r": 1.0, "missing": 1.0})
    with pytest.raises(ValueError, match="missing"):
        weighted_raw({"r": r}, {"missing": 1.0})


def test_check_weights() -> None:
    assert check_weights({"a": 1, "b": -0.5}) == {"a": 1.0, "b": -0.5}
    for bad in ({}, [("a", 1.0)], {"a": math.nan}, {"a": math.inf}, {"a": True}, {"a": "1"}, {"": 1.0}, {3: 1.0}):
        with pytest.raises(UserError):
            check_weights(bad)


# --------------------------------------------------------------------------- registry and RewardSet


def test_reward_set_scores_and_names_extra_fields(rng) -> None:
    images = torch.rand(6, 1, 8, 8)
    prompts = [f"a {d}" for d in range(6)]
    rs = RewardSet(
        {"test_rewards.mean_pixel": 1.0, "test_rewards.stats": -0.5, "test_rewards.renamed": 0.0},
        **{"test_rewards.mean_pixel": {"offset": 0.25}, "test_rewards.stats": {"scale": 3.0}},
    )
    comps = rs.score(images, prompts)
    assert set(comps) == {
        "test_rewards.mean_pixel",
        "test_rewards.stats",
        "test_rewards.stats/min",
        "test_rewards.stats/n",
        "test_rewards.renamed",
    }
    flat = images.flatten(1).double().numpy()
    np.testing.assert_allclose(comps["test_rewards.mean_pixel"].numpy(), flat.mean(1) + 0.25, rtol=1e-6)
    np.testing.assert_allclose(comps["test_rewards.stats"].numpy(), 3.0 * flat.max(1), rtol=1e-6)
    np.testing.assert_allclose(comps["test_rewards.stats/min"].numpy(), flat.min(1), rtol=1e-6)
    assert comps["test_rewards.stats/n"].tolist() == [6.0] * 6
    np.testing.assert_allclose(comps["test_rewards.renamed"].numpy(), flat.std(1, ddof=1), rtol=1e-5)
    assert all(v.dtype == torch.float32 and v.shape == (6,) for v in comps.values())
    np32 = {k: v.numpy() for k, v in comps.items()}
    np.testing.assert_allclose(rs.combine(comps).numpy(), _numpy_combine(np32, rs.weights), rtol=1e-5, atol=1e-5)
    assert rs(images, prompts).keys() == comps.keys()
    ref = np32["test_rewards.mean_pixel"].astype(np.float64) - 0.5 * np32["test_rewards.stats"]
    np.testing.assert_allclose(rs.weighted_raw(comps).numpy(), ref, rtol=1e-6)


def test_chunks_submitted_one_by_one_score_like_the_whole_batch(rng) -> None:
    images = torch.from_numpy(rng.random((7, 1, 8, 8))).float()
    prompts = [f"a {d}" for d in range(7)]
    rs = RewardSet(
        {"test_rewards.stats": 1.0, "jpeg_compressibility": 0.5},
        **{"test_rewards.stats": {"scale": 2.0}},
    )
    pending = [rs.submit(images[lo : lo + 3], prompts[lo : lo + 3]) for lo in range(0, 7, 3)]
    assert all(p.done() for p in pending)  # local rewards are computed on submit
    parts = [p.result() for p in pending]
    comps = concat_components(parts)
    assert list(comps) == [
        "test_rewards.stats",
        "test_rewards.stats/min",
        "test_rewards.stats/n",
        "jpeg_compressibility",
    ]
    flat = images.flatten(1).double().numpy()
    np.testing.assert_allclose(comps["test_rewards.stats"].numpy(), 2.0 * flat.max(1), rtol=1e-6)
    np.testing.assert_allclose(comps["test_rewards.stats/min"].numpy(), flat.min(1), rtol=1e-6)
    assert comps["test_rewards.stats/n"].tolist() == [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 1.0]  # prompts per chunk
    # 8x8 images are upscaled 8 times to the default min_side of 64
    np.testing.assert_allclose(
        comps["jpeg_compressibility"].numpy(), -_pillow_sizes_kb(flat.reshape(7, 1, 8, 8), 95, 8), rtol=1e-6
    )
    # a chunk without some field (a remote reward's extra field, when its server answered nothing for the
    # chunk): NaN there, for that chunk's images; a field only later chunks have is NaN for the earlier ones
    lacking = {"test_rewards.stats": parts[1]["test_rewards.stats"], "late": torch.ones(3)}
    joined = concat_components([parts[0], lacking, parts[2]])
    assert list(joined) == [*comps, "late"]
    for key, value in comps.items():
        got = joined[key]
        assert got.shape == (7,) and got.dtype == torch.float32
        if key == "test_rewards.stats":
            assert torch.equal(got, value)
        else:
            assert torch.equal(got[[0, 1, 2, 6]], value[[0, 1, 2, 6]]) and torch.isnan(got[3:6]).all()
    assert torch.isnan(joined["late"][[0, 1, 2, 6]]).all() and joined["late"][3:6].tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="chunk 1 has no reward fields"):
        concat_components([parts[0], {}])
    with pytest.raises(ValueError, match="no reward components"):
        concat_components([])
    with pytest.raises(UserError, match="got 3 images, 2 prompts"):
        rs.submit(images[:3], prompts[:2])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("test_rewards.bad_shape", "returned shape \\(5, 2\\); expected \\(5,\\)"),
        ("test_rewards.two_fields", "one of them must be named 'test_rewards.two_fields'"),
        ("test_rewards.empty", "returned no scores"),
    ],
)
def test_reward_set_rejects_bad_scores(name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        RewardSet({name: 1.0}).score(torch.rand(5, 1, 8, 8), ["a 1"] * 5)


def test_nan_and_inf_of_any_reward_mark_their_images_unscored(rng) -> None:
    """NaN, +-inf, or a float64 score beyond float32: NaN in every field, the rest kept as they were;
    the combination leaves those images out of the z-scores (numpy over the remaining images)."""
    n = 11
    images = torch.from_numpy(rng.random((n, 1, 8, 8))).float()
    prompts = [f"a {k}" for k in range(n)]
    bad_rows = sorted(rng.choice(n, size=3, replace=False).tolist())
    values = [math.nan, math.inf, -math.inf, 1e300]
    metadata = [{} for _ in range(n)]
    for k in bad_rows:
        metadata[k] = {"bad": values[int(rng.integers(len(values)))]}
    rs = RewardSet({"test_rewards.broken": 1.0, "test_rewards.mean_pixel": 0.5, "test_rewards.inf": 0.0})
    whole = rs.score(images, prompts, metadata)
    # the same batch submitted in chunks of 4 gives the same components
    parts = concat_components(
        [rs.submit(images[lo : lo + 4], prompts[lo : lo + 4], metadata[lo : lo + 4]).result() for lo in range(0, n, 4)]
    )
    flat = images.flatten(1).double().numpy()
    good = np.array([k not in bad_rows for k in range(n)])
    for comps, first_rows in ((whole, [0]), (parts, [0, 4, 8])):
        assert torch.isnan(comps["test_rewards.broken"]).nonzero().flatten().tolist() == bad_rows
        assert torch.isnan(comps["test_rewards.broken/double"]).nonzero().flatten().tolist() == bad_rows
        np.testing.assert_allclose(comps["test_rewards.broken"].numpy()[good], flat.mean(1)[good], rtol=1e-6)
        assert not torch.isnan(comps["test_rewards.mean_pixel"]).any()
        # an unweighted reward's inf (at the first image of each call) is unscored too, but only logged
        assert torch.isnan(comps["test_rewards.inf"]).nonzero().flatten().tolist() == first_rows
        combined = rs.combine(comps).double().numpy()
        assert np.isnan(combined).nonzero()[0].tolist() == bad_rows
        r, m = flat.mean(1)[good], flat.mean(1)[good]
        z = lambda x: (x - x.mean()) / (x.std() + 1e-8)  # noqa: E731
        np.testing.assert_allclose(combined[good], z(r) + 0.5 * z(m), rtol=1e-5, atol=1e-5)
        raw = rs.weighted_raw(comps).numpy()
        assert np.isnan(raw).nonzero()[0].tolist() == bad_rows
    # a NaN row of a reward of its own (the last image) is left out alike
    comps = RewardSet({"test_rewards.nan": 1.0}).score(images, prompts)
    assert torch.isnan(comps["test_rewards.nan"]).nonzero().flatten().tolist() == [n - 1]


def test_reward_set_rejects_bad_inputs() -> None:
    rs = RewardSet({"test_rewards.mean_pixel": 1.0})
    with pytest.raises(UserError, match="got 4 images, 3 prompts and 4 metadata entries"):
        rs.score(torch.rand(4, 1, 8, 8), ["a 1"] * 3)
    with pytest.raises(UserError, match="got 4 images, 4 prompts and 2 metadata entries"):
        rs.score(torch.rand(4, 1, 8, 8), ["a 1"] * 4, [{}, {}])
    with pytest.raises(UserError, match="shaped \\(B, C, H, W\\)"):
        rs.score(torch.rand(4, 8, 8), ["a 1"] * 4)
    with pytest.raises(UserError, match="unknown reward 'no_such_reward'"):
        RewardSet({"no_such_reward": 1.0})
    with pytest.raises(UserError, match="options given for rewards \\['ink_style'\\] that have no weight"):
        RewardSet({"test_rewards.mean_pixel": 1.0}, ink_style={"cap": 3.0})
    with pytest.raises(UserError, match="takes no options \\['gain'\\]"):
        RewardSet({"test_rewards.mean_pixel": 1.0}, **{"test_rewards.mean_pixel": {"gain": 2.0}})
    with pytest.raises(UserError, match="cannot build reward 'test_rewards.stats' with options \\['shift'\\]"):
        RewardSet({"test_rewards.stats": 1.0}, **{"test_rewards.stats": {"shift": 2.0}})
    with pytest.raises(UserError, match="finite number"):
        RewardSet({"test_rewards.mean_pixel": math.nan})


def test_register_reward_class_and_function_and_duplicates() -> None:
    names = available_rewards()
    for name in ("digit_alignment", "digit_recognised", "ink_style", "jpeg_compressibility", "jpeg_incompressibility"):
        assert name in names
    assert "test_rewards.mean_pixel" in names and "test_rewards.stats" in names
    fn = build_reward("test_rewards.mean_pixel")
    assert isinstance(fn, FunctionReward) and fn.name == "test_rewards.mean_pixel"
    images = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(fn(images, ["1"] * 3, [{}] * 3)["test_rewards.mean_pixel"], images.mean(dim=(1, 2, 3)))
    cls = build_reward("test_rewards.stats", scale=2.0)
    assert isinstance(cls, PixelStats) and cls.scale == 2.0 and cls.name == "test_rewards.stats"
    # registering the same object again is harmless; another object under a taken name is refused
    assert register_reward("test_rewards.mean_pixel")(mean_pixel) is mean_pixel
    with pytest.raises(ValueError, match="'test_rewards.mean_pixel' is already registered"):
        register_reward("test_rewards.mean_pixel")(lambda images, prompts, metadata: images.mean())
    with pytest.raises(ValueError, match="'ink_style' is already registered"):
        register_reward("ink_style")(PixelStats)
    for bad in ("", "pkg.mod:Name", 3):
        with pytest.raises(ValueError, match="non-empty string"):
            register_reward(bad)


def test_rewards_by_import_path(user_module: str) -> None:
    images = torch.rand(4, 1, 8, 8)
    flat = images.flatten(1).double()
    rs = RewardSet(
        {f"{user_module}:Contrast": 1.0, f"{user_module}:darkness": 2.0},
        **{f"{user_module}:Contrast": {"power": 2.0}, f"{user_module}:darkness": {"gain": 3.0}},
    )
    comps = rs.score(images, ["a 1"] * 4)
    # the Contrast class names its field "contrast": a single field takes the reward's name
    assert set(comps) == {f"{user_module}:Contrast", f"{user_module}:darkness"}
    contrast = (flat.max(dim=1).values - flat.min(dim=1).values) ** 2
    torch.testing.assert_close(comps[f"{user_module}:Contrast"].double(), contrast, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        comps[f"{user_module}:darkness"].double(), 3.0 * (1 - flat.mean(dim=1)), rtol=1e-6, atol=1e-6
    )
    # a path into this package works too
    jpeg = build_reward("precise_rl.rewards.image:JpegCompressibility", quality=50)
    assert isinstance(jpeg, JpegCompressibility) and jpeg.quality == 50
    for bad, message in (
        ("no_such_module_xyz:Name", "cannot import the module"),
        (f"{user_module}:Missing", "has no attribute 'Missing'"),
        (f"{user_module}:NOT_A_REWARD", "neither a class nor a function"),
        (":Contrast", "not an import path"),
        (".relative:Contrast", "not an import path"),
        (f"{user_module}:", "not an import path"),
    ):
        with pytest.raises(UserError, match=message):
            build_reward(bad)


# --------------------------------------------------------------------------- the digits rewards


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))


def _mlp_logits(images: np.ndarray) -> np.ndarray:
    """The shipped reward classifier by hand, in float64: an MLP on pixels scaled to [-1, 1]."""
    w = {k: v.astype(np.float64) for k, v in load_numpy(str(assets_dir() / REWARD_CLASSIFIER_FILE)).items()}
    h = images.reshape(len(images), 64) * 2.0 - 1.0
    h = _silu(h @ w["fc1.weight"].T + w["fc1.bias"])
    h = _silu(h @ w["fc2.weight"].T + w["fc2.bias"])
    return h @ w["fc3.weight"].T + w["fc3.bias"]


def _conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack([xp[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2)
    return np.einsum("bckij,ock->boij", patches, weight.reshape(weight.shape[0], c, 9)) + bias[None, :, None, None]


def _conv_logits(images: np.ndarray) -> np.ndarray:
    """The shipped held-out classifier by hand, in float64: two 3x3 convs, 2x2 average pool, two linears."""
    w = {k: v.astype(np.float64) for k, v in load_numpy(str(assets_dir() / EVAL_CLASSIFIER_FILE)).items()}
    h = images.reshape(len(images), 1, 8, 8) * 2.0 - 1.0
    h = _silu(_conv3x3(h, w["conv1.weight"], w["conv1.bias"]))
    h = _silu(_conv3x3(h, w["conv2.weight"], w["conv2.bias"]))
    n, c = h.shape[:2]
    h = h.reshape(n, c, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(n, -1)
    h = _silu(h @ w["fc1.weight"].T + w["fc1.bias"])
    return h @ w["fc2.weight"].T + w["fc2.bias"]


def _digit_batch(rng: np.random.Generator, data, n: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Real digits with noise and random ink, plus pure noise; asked-for digits right or wrong."""
    images, labels = data
    idx = rng.choice(len(labels), size=n, replace=False)
    x = images[idx] * rng.uniform(0.6, 1.4, size=(n, 1)) + rng.normal(0, 0.05, size=(n, 64))
    x[: n // 5] = rng.uniform(0, 1, size=(n // 5, 64))
    x = np.clip(x, 0, 1).astype(np.float32).astype(np.float64)
    asked = [int(labels[i]) if rng.random() < 0.7 else int(rng.integers(10)) for i in idx]
    styles = [str(rng.choice(STYLES)) for _ in range(n)]
    return x, asked, styles


def test_digit_alignment_is_log_softmax_of_the_reward_classifier(rng, data) -> None:
    x, asked, styles = _digit_batch(rng, data, 64)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
    prompts = [f"a {s} handwritten {d}" for d, s in zip(asked, styles, strict=True)]
    expected = _log_softmax(_mlp_logits(x))[np.arange(len(asked)), asked]
    reward = build_reward("digit_alignment")
    assert isinstance(reward, DigitAlignment)
    meta = [{"digit": d, "style": s} for d, s in zip(asked, styles, strict=True)]
    got = reward(images, prompts, meta)["digit_alignment"]
    assert got.dtype == torch.float32 and got.shape == (64,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert (got <= 0).all() and expected.min() < -1.0 and expected.max() > -0.1
    # from the prompts alone (no metadata) it is the same
    np.testing.assert_allclose(reward(images, prompts, [{}] * 64)["digit_alignment"].numpy(), got.numpy())


def test_digit_recognised_is_argmax_of_the_eval_classifier(rng, data) -> None:
    x, asked, _ = _digit_batch(rng, data, 80)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
    prompts = [f"the digit {d}" for d in asked]
    logits = _conv_logits(x)
    top2 = np.sort(logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # float32 and float64 can only disagree at near-ties
    assert clear.mean() > 0.9
    expected = (logits.argmax(axis=1) == np.array(asked)).astype(np.float32)
    rs = RewardSet({"digit_recognised": 0.0})
    got = rs.score(images, prompts)["digit_recognised"].numpy()
    assert set(np.unique(got)) == {0.0, 1.0}
    np.testing.assert_array_equal(got[clear], expected[clear])


def _ink_reference(x: np.ndarray, digits: list[int], styles: list[str], data, cap: float | None) -> np.ndarray:
    """The docstring's formula with numpy: per-digit ink mean and population std over the data set."""
    images, labels = data
    data_ink = images.mean(axis=1)
    mean = np.array([data_ink[labels == d].mean() for d in range(10)])
    std = np.array([data_ink[labels == d].std() for d in range(10)])
    z = (x.mean(axis=1) - mean[digits]) / std[digits]
    out = np.empty_like(z)
    for i, s in enumerate(styles):
        directed = z[i] if s == "bold" else -z[i]
        if s == "plain":
            out[i] = -abs(z[i])
        else:
            out[i] = directed if cap is None else min(directed, cap)
    return out


@pytest.mark.parametrize("cap", [2.0, None, "random"])
def test_ink_style_matches_its_formula(rng, data, cap) -> None:
    cap = float(rng.uniform(0.5, 3.0)) if cap == "random" else cap
    x, asked, styles = _digit_batch(rng, data, 120)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
    prompts = [f"a {s} {d}" for d, s in zip(asked, styles, strict=True)]
    reward = InkStyle() if cap == 2.0 else build_reward("ink_style", cap=cap)
    out = reward(images, prompts, [{}] * len(prompts))
    expected = _ink_reference(x, asked, styles, data, cap)
    np.testing.assert_allclose(out["ink_style"].numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["ink"].numpy(), x.mean(axis=1), rtol=1e-6)
    directed = np.array([s != "plain" for s in styles])
    uncapped = _ink_reference(x, asked, styles, data, None)
    if cap is None:
        assert uncapped[directed].max() > 3.0  # the batch does reach far past any cap
    else:
        # the batch has both capped and uncapped strokes, so the cap is really exercised
        assert (uncapped[directed] > cap + 0.1).any() and (uncapped[directed] < cap - 0.1).any()
        assert out["ink_style"].max() <= cap + 1e-6


def test_ink_style_through_reward_set_with_metadata(rng, data) -> None:
    x, asked, styles = _digit_batch(rng, data, 30)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)
    meta = [{"digit": d, "style": s} for d, s in zip(asked, styles, strict=True)]
    rs = RewardSet({"ink_style": 1.0, "digit_alignment": 1.0}, ink_style={"cap": 1.5})
    comps = rs.score(images, ["ignored when metadata is given"] * 30, meta)
    assert set(comps) == {"ink_style", "ink_style/ink", "digit_alignment"}
    np.testing.assert_allclose(
        comps["ink_style"].numpy(), _ink_reference(x, asked, styles, data, 1.5), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("cap", [0, -1.0, math.nan, True, "2", [2.0]])
def test_ink_style_refuses_a_bad_cap(cap) -> None:
    with pytest.raises(UserError, match="ink_style cap must be a positive number or null"):
        InkStyle(cap=cap)
    with pytest.raises(UserError, match="ink_style cap"):
        RewardSet({"ink_style": 1.0}, ink_style={"cap": cap})


def test_digits_rewards_refuse_bad_images_and_targets() -> None:
    for name in ("digit_alignment", "digit_recognised", "ink_style"):
        reward = build_reward(name)
        with pytest.raises(UserError, match="shaped \\(B, 1, 8, 8\\), got \\(2, 3, 8, 8\\)"):
            reward(torch.rand(2, 3, 8, 8), ["a 1", "a 2"], [{}, {}])
        with pytest.raises(UserError, match="must hold a digit 0-9"):
            reward(torch.rand(1, 1, 8, 8), ["a 1"], [{"digit": 12, "style": "bold"}])
        with pytest.raises(UserError, match="must hold a digit 0-9"):
            reward(torch.rand(1, 1, 8, 8), ["a 1"], [{"digit": 1, "style": "wobbly"}])
        with pytest.raises(UserError, match="'a 12'"):
            reward(torch.rand(1, 1, 8, 8), ["a 12"], [{}])


# --------------------------------------------------------------------------- JPEG


def _pillow_sizes_kb(x: np.ndarray, quality: int, factor: int) -> np.ndarray:
    """Quantise, upscale with Pillow's nearest-neighbour resize, encode, measure: ``(B,)`` kB."""
    pixels = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    sizes = []
    for img in pixels:
        pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(np.moveaxis(img, 0, -1))
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        sizes.append(len(buf.getvalue()) / 1000.0)
    return np.array(sizes)


def _random_blocky(rng: np.random.Generator, batch: int, channels: int, h: int, w: int) -> np.ndarray:
    """Random images on the 8-bit grid (no rounding ambiguity) with varying amounts of texture."""
    levels = rng.integers(0, 256, size=(batch, channels, h, w))
    smooth = rng.integers(0, 256, size=(batch, channels, 1, 1))
    mix = rng.uniform(0, 1, size=(batch, 1, 1, 1)) < 0.5
    return (np.where(mix, levels, smooth) / 255.0).astype(np.float32)


@pytest.mark.parametrize(
    ("channels", "h", "w", "min_side", "factor"),
    [(1, 8, 8, 64, 8), (3, 8, 8, 64, 8), (1, 8, 12, 20, 3), (3, 16, 10, 64, 7), (1, 70, 66, 64, 1)],
)
def test_jpeg_sizes_match_pillow(rng, channels: int, h: int, w: int, min_side: int, factor: int) -> None:
    x = _random_blocky(rng, 5, channels, h, w)
    quality = int(rng.integers(30, 96))
    got = jpeg_sizes_kb(torch.from_numpy(x), quality=quality, min_side=min_side)
    assert got.dtype == torch.float32 and got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), _pillow_sizes_kb(x, quality, factor), rtol=1e-6)
    inc = JpegIncompressibility(quality=quality, min_side=min_side)(torch.from_numpy(x), [""] * 5, [{}] * 5)
    comp = JpegCompressibility(quality=quality, min_side=min_side)(torch.from_numpy(x), [""] * 5, [{}] * 5)
    torch.testing.assert_close(inc["jpeg_incompressibility"], got, rtol=0, atol=0)
    torch.testing.assert_close(comp["jpeg_compressibility"], -got, rtol=0, atol=0)


def test_jpeg_defaults_clamping_and_reward_set(rng) -> None:
    x = _random_blocky(rng, 4, 3, 8, 8)
    np.testing.assert_allclose(jpeg_sizes_kb(torch.from_numpy(x)).numpy(), _pillow_sizes_kb(x, 95, 8), rtol=1e-6)
    out_of_range = torch.from_numpy(x) * 3.0 - 1.0
    np.testing.assert_allclose(
        jpeg_sizes_kb(out_of_range).numpy(), _pillow_sizes_kb(np.clip(x * 3 - 1, 0, 1), 95, 8), rtol=1e-6
    )
    rs = RewardSet({"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.0}, jpeg_compressibility={"quality": 40})
    comps = rs.score(torch.from_numpy(x), [""] * 4)
    np.testing.assert_allclose(comps["jpeg_compressibility"].numpy(), -_pillow_sizes_kb(x, 40, 8), rtol=1e-6)
    np.testing.assert_allclose(comps["jpeg_incompressibility"].numpy(), _pillow_sizes_kb(x, 95, 8), rtol=1e-6)


def test_noise_is_less_compressible_than_a_flat_image(rng) -> None:
    for channels in (1, 3):
        flat = torch.full((1, channels, 32, 32), float(rng.uniform(0.2, 0.8)))
        noisy = torch.rand(1, channels, 32, 32)
        stripes = flat.clone()
        stripes[..., ::2, :] = 1.0 - stripes[..., ::2, :]
        reward = JpegCompressibility()
        scores = [float(reward(img, [""], [{}])["jpeg_compressibility"]) for img in (flat, stripes, noisy)]
        assert scores[0] > scores[1] > scores[2], scores


@pytest.mark.parametrize("quality", [0, 96, 50.0, True, "80", None])
def test_jpeg_refuses_a_bad_quality(quality) -> None:
    for cls in (JpegCompressibility, JpegIncompressibility):
        with pytest.raises(UserError, match="JPEG quality must be an integer in \\[1, 95\\]"):
            cls(quality=quality)
    with pytest.raises(UserError, match="JPEG quality"):
        RewardSet({"jpeg_compressibility": 1.0}, jpeg_compressibility={"quality": quality})


def test_jpeg_refuses_bad_images_and_min_side() -> None:
    with pytest.raises(UserError, match="min_side must be a positive integer"):
        JpegCompressibility(min_side=0)
    for shape in ((2, 2, 8, 8), (2, 8, 8), (2, 4, 8, 8)):
        with pytest.raises(UserError, match="\\(B, 1 or 3, H, W\\)"):
            jpeg_sizes_kb(torch.rand(shape))
