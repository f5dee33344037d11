"""The ``ocr`` reward: Flow-GRPO's definition (yifan123/flow_grpo ``flow_grpo/ocr.py`` at commit
ac4c86e8cae021841f1fde853d340e0db67690dd) on PP-OCRv4, checked on text rendered with PIL in matplotlib's
DejaVu fonts.

The expected scores are computed here from what the recogniser read, with a Levenshtein distance of this
file's own (a full-table dynamic programme); separately, the recogniser must read clean renders exactly, so
that the expected values are the ones the edits were made for (a dropped letter of four: 0.75).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.rewards import RewardSet, build_reward, ocr
from precise_rl.rewards.ocr import levenshtein, normalise, ocr_score, target_text

from .text_renders import fitting_size, render

# ----------------------------------------------------------------------------- the formula, independently


def dp_distance(a: str, b: str) -> int:
    """Levenshtein distance by the full (len(a) + 1) x (len(b) + 1) table."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            substitution = table[i - 1][j - 1] + (0 if a[i - 1] == b[j - 1] else 1)
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, substitution)
    return table[len(a)][len(b)]


def expected_score(read: str, prompt: str) -> float:
    """Flow-GRPO's ``OcrScorer`` on one image whose recognised text is ``read``, written out again."""
    target = prompt.split('"')[1].replace(" ", "").lower()
    read = read.replace(" ", "").lower()
    dist = 0 if target in read else dp_distance(read, target)
    dist = min(dist, len(target))
    return 1 - dist / len(target)


def _prompt(text: str) -> str:
    return f'a sign that says "{text}"'


def test_levenshtein_known_values() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "moon") == 4 and levenshtein("moon", "") == 4
    assert levenshtein("flaw", "lawn") == 2 and levenshtein("moon", "moon") == 0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcMO \u3000", max_size=9), st.text(alphabet="abcMO ", max_size=9))
def test_levenshtein_equals_the_full_table(a: str, b: str) -> None:
    assert levenshtein(a, b) == dp_distance(a, b) == levenshtein(b, a)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcMO \u3000", max_size=12), st.text(alphabet="abcMO", min_size=1, max_size=8))
def test_score_follows_flow_grpo(read: str, target: str) -> None:
    prompt = _prompt(target)
    assert ocr_score(read, target_text(prompt)) == pytest.approx(expected_score(read, prompt), abs=1e-12)


def test_target_is_the_first_quoted_text_without_spaces_or_case() -> None:
    assert target_text('a sign that says "MOON"') == "MOON"
    assert target_text('"one" and "two"') == "one"  # the first pair, as prompt.split('"')[1]
    assert target_text('a sign that says "open late') == "open late"  # one quote: the rest of the prompt
    assert normalise("Open  Late ") == "openlate"
    assert ocr_score("OPEN LATE", "open late") == 1.0
    assert ocr_score("xxOpenLatexx", "Open Late") == 1.0  # the target within more text
    assert ocr_score("open\u3000late", "open late") == pytest.approx(1 - 1 / 8)  # only ' ' counts as a space
    assert ocr_score("", "moon") == 0.0
    assert ocr_score("completely different", "moon") == 0.0  # distance capped at the target's length
    with pytest.raises(UserError, match="between double quotes.*has none"):
        target_text("a sign that says MOON")
    with pytest.raises(UserError, match="empty once spaces go"):
        ocr_score("moon", "  ")


# ----------------------------------------------------------------------------- on PP-OCRv4

needs_rapidocr = pytest.mark.skipif(
    ocr.importlib.util.find_spec("rapidocr_onnxruntime") is None, reason="the ocr extra is not installed"
)

#: (text, width, height, family, weight, text colour, ground colour, share of the image the text fills)
CLEAN = [
    ("MOON", 256, 64, "DejaVu Sans", "bold", (0, 0, 0), (255, 255, 255), 0.9),
    ("coffee", 256, 64, "DejaVu Sans Mono", "bold", (120, 0, 0), (255, 255, 255), 0.8),
    ("hello world", 384, 96, "DejaVu Serif", "normal", (20, 20, 120), (250, 240, 200), 0.9),
    ("river stone", 320, 80, "DejaVu Serif", "bold", (90, 40, 0), (200, 230, 255), 0.8),
    ("Precise RL", 512, 128, "DejaVu Sans", "normal", (255, 255, 255), (30, 60, 90), 0.9),  # light on dark
    ("OPEN 24 HOURS", 512, 128, "DejaVu Sans", "bold", (0, 90, 0), (230, 230, 230), 0.9),
]


def _render(text: str, width: int, height: int, family: str, weight: str, fg: Any, bg: Any, fill: float):
    return render(text, width, height, fitting_size(text, width, height, family, weight, fill), family, weight, fg, bg)


def _line(text: str) -> torch.Tensor:
    """``text`` in DejaVu Sans Bold, black on white, filling 90% of a 256x64 image."""
    return _render(text, 256, 64, "DejaVu Sans", "bold", (0, 0, 0), (255, 255, 255), 0.9)


@pytest.fixture(scope="module", params=[True, False], ids=["detect", "recognition-only"])
def reward(request: pytest.FixtureRequest) -> Any:
    return build_reward("ocr", detect=request.param)


@needs_rapidocr
@pytest.mark.parametrize("case", CLEAN, ids=[c[0] for c in CLEAN])
def test_clean_renders_are_read_exactly_and_score_one(reward: Any, case: tuple) -> None:
    image = _render(*case)[None]
    (read,) = reward.read(image)
    assert normalise(read) == normalise(case[0]), read
    if reward.detect:  # detection reads case too (recognition alone read "OPEN 24 HouRs"), not spaces between boxes
        assert read.replace(" ", "") == case[0].replace(" ", ""), read
    assert reward(image, [_prompt(case[0])], [{}])["ocr"].tolist() == [1.0]


#: (rendered, quoted in the prompt, the score when the render is read as rendered)
EDITS = [
    ("MON", "MOON", 0.75),  # a dropped letter
    ("MQON", "MOON", 0.75),  # a substituted letter
    ("MOOM", "MOON", 0.75),
    ("MOON CAKE", "MOON", 1.0),  # an extra word: the target occurs in the text read
    ("MOONS", "MOON", 1.0),
    ("MOON", "MOON CAKE", 0.5),  # a missing word: 4 letters of "mooncake" to insert
    ("ZEBRA", "MOON", 0.0),  # distance 5, capped at 4
    ("MOON CAKE", "Moon Cake", 1.0),  # spaces and case do not count
]


@needs_rapidocr
def test_known_edits_score_what_the_formula_says(reward: Any) -> None:
    images = torch.stack([_line(rendered) for rendered, _, _ in EDITS])
    prompts = [_prompt(quoted) for _, quoted, _ in EDITS]
    reads = reward.read(images)
    scores = reward(images, prompts, [{}] * len(EDITS))["ocr"]
    for (rendered, _, nominal), read, prompt, score in zip(EDITS, reads, prompts, scores.tolist(), strict=True):
        assert normalise(read) == normalise(rendered), (rendered, read)  # so the formula gives the nominal value
        assert score == pytest.approx(expected_score(read, prompt), abs=1e-7)
        assert score == pytest.approx(nominal, abs=1e-7)


@needs_rapidocr
def test_batches_score_as_images_one_by_one() -> None:
    texts = ["MOON", "MON", "coffee", "ZEBRA", "MOON CAKE", "hello", "MQON"]
    images = torch.stack([_line(t) for t in texts])
    prompts = [_prompt("MOON")] * len(texts)
    for detect in (True, False):
        single = build_reward("ocr", detect=detect, batch_size=1, workers=1)
        one_by_one = torch.cat([single(images[k : k + 1], prompts[k : k + 1], [{}])["ocr"] for k in range(len(texts))])
        reads = [single.read(images[k : k + 1])[0] for k in range(len(texts))]
        for batch_size in (3, 32):
            batched = build_reward("ocr", detect=detect, batch_size=batch_size, workers=2)
            assert torch.equal(batched(images, prompts, [{}] * len(texts))["ocr"], one_by_one)
            assert batched.read(images) == reads


@needs_rapidocr
def test_grey_images_read_as_rgb_grey() -> None:
    rgb = torch.stack([_line("MOON"), _line("MON")])
    grey = rgb[:, :1]
    reward = build_reward("ocr", detect=False)
    assert reward.read(grey) == reward.read(rgb)


@needs_rapidocr
def test_detection_reads_square_images_that_recognition_alone_cannot() -> None:
    """Why detection is the default: a word in the middle of a square image is a few pixels tall at the
    recogniser's 48-pixel height when the whole image is read as one line."""
    images = torch.stack([render(t, 256, 256, 40, "DejaVu Sans") for t in ("MOON", "coffee", "river")])
    prompts = [_prompt(t) for t in ("MOON", "coffee", "river")]
    detected = build_reward("ocr", detect=True)(images, prompts, [{}] * 3)["ocr"]
    whole = build_reward("ocr", detect=False)(images, prompts, [{}] * 3)["ocr"]
    assert detected.tolist() == [1.0, 1.0, 1.0]
    assert float(whole.mean()) < 0.5


@needs_rapidocr
def test_reward_set_and_config_take_the_ocr_reward() -> None:
    cfg = config_from_dict({"reward": {"weights": {"ocr": 1.0}, "options": {"ocr": {"detect": False}}}})
    assert cfg.reward.weights == {"ocr": 1.0}
    rs = RewardSet(cfg.reward.weights, "cpu", **cfg.reward.options)
    assert rs.rewards["ocr"].detect is False
    prompts = [_prompt("MOON"), _prompt("MOON")]
    out = rs.score(torch.stack([_line("MOON"), _line("MON")]), prompts)
    assert out["ocr"].tolist() == [1.0, 0.75]
    assert rs.max_weighted_raw(prompts, [{}, {}]).tolist() == [1.0, 1.0]


@needs_rapidocr
def test_served_ocr_reward_scores_as_the_local_one() -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from .test_reward_server import _free_port, start_server_process

    images = torch.stack([_line(t) for t in ("MOON", "MON", "ZEBRA", "MOON CAKE", "MQON")])
    prompts = [_prompt("MOON")] * 4 + [_prompt("moon cake")]
    local = build_reward("ocr", detect=False)(images, prompts, [{}] * 5)["ocr"]
    port = _free_port()
    proc = start_server_process(port, "ocr", "--set", "detect=false", "--preload")
    try:
        remote = build_reward("remote", url=f"http://127.0.0.1:{port}", max_batch=2, retries=0, timeout=120)
        served = remote(images, prompts, [{}] * 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert torch.equal(served["remote"].float(), local)
    assert served["unscored"].tolist() == [0.0] * 5
    assert local.tolist() == [1.0, 0.75, 0.0, 1.0, 1.0 - 5 / 8]  # "mqon" to "mooncake": one change, four inserts


@needs_rapidocr
def test_a_cuda_device_without_the_cuda_provider_runs_on_the_cpu_with_a_warning() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    reward = build_reward("ocr", detect=False, device="cuda")
    assert (reward.batch_size, reward.workers) == (32, 1)  # a GPU's defaults
    with pytest.warns(UserWarning, match="runs on the CPU: onnxruntime has no CUDA provider"):
        assert reward.read(_line("MOON")[None]) == ["MOON"]
    assert reward.model.providers == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- errors a user can cause


def test_a_missing_package_is_one_sentence_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocr.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"^reward 'ocr' needs rapidocr-onnxruntime: pip install 'precise-rl\[ocr\]'$"):
        build_reward("ocr")


@needs_rapidocr
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"detect": "yes"}, "detect must be true or false"),
        ({"resize": "cubic"}, "resize must be 'linear' or 'area'"),
        ({"det_limit": "both"}, "det_limit must be 'max' or 'min'"),
        ({"det_side": 16}, "det_side must be an integer of at least 32"),
        ({"threads": -1}, "threads must be an integer"),
        ({"min_confidence": 1.5}, r"min_confidence must be a number in \[0, 1\]"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"colour": "red"}, "cannot build reward 'ocr'"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_reward("ocr", **options)


@needs_rapidocr
def test_prompts_without_a_target_and_bad_images_are_refused() -> None:
    reward = build_reward("ocr", detect=False)
    image = _line("MOON")[None]
    with pytest.raises(UserError, match="between double quotes"):
        reward(image, ["a sign that says MOON"], [{}])
    with pytest.raises(UserError, match="empty once spaces go"):
        reward(image, ['a sign that says " "'], [{}])
    with pytest.raises(UserError, match=r"shaped \(B, 1 or 3, H, W\)"):
        reward(torch.rand(1, 4, 8, 8), [_prompt("x")], [{}])
