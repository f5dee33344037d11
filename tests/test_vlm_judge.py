"""The ``vlm_judge`` reward against a scripted OpenAI-compatible judge on loopback (:mod:`tests.judge_server`).

The real ``openai`` client talks to the test server over HTTP. The reference's UnifiedReward-v2 template and
parsing are checked against the reference's code (Tencent-Hunyuan/Precise, ``precise_sde/rewards/remote.py``,
``unifiedreward_score_v2``, commit 9a84f91b5acc634fb22f846acecf40b8c55b3350), written out again here.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from precise_rl.errors import UserError
from precise_rl.rewards import RewardSet, build_reward
from precise_rl.rewards.failures import RewardServerDown, RewardServerRejected, RewardUnavailable
from precise_rl.rewards.judge_pairs import group_pairs, pairs_per_group, win_rates
from precise_rl.rewards.judge_templates import parse_pair_rank, parse_unifiedreward_v2, unifiedreward_v2_text
from tests.judge_server import JudgeServer, Reply, brightness_judgement

pytest.importorskip("openai")

FAST = {"backoff": 0.0, "image_format": "png", "resolution": None}


def _flat_images(values: torch.Tensor, size: int = 8) -> torch.Tensor:
    """One flat grey image per value: its brightness survives PNG exactly at 8 bits."""
    return values[:, None, None, None].expand(len(values), 3, size, size).clone()


def _8bit(values: torch.Tensor) -> torch.Tensor:
    return (values * 255).round() / 255


# ----------------------------------------------------------------------------- templates and parsing


def _reference_extract(text: str, acs_weights: dict | None) -> dict | None:
    """``_extract_acs_scores`` of the reference (remote.py, 9a84f91), with None for its sentinel -10."""
    raw = {}
    for key, pattern in [
        ("alignment", r"Alignment Score \(1-5\):\s*([\d.]+)"),
        ("coherence", r"Coherence Score \(1-5\):\s*([\d.]+)"),
        ("style", r"Style Score \(1-5\):\s*([\d.]+)"),
    ]:
        match = re.search(pattern, text)
        try:
            raw[key] = float(match.group(1)) if match else None
        except (AttributeError, ValueError):
            raw[key] = None
    if any(v is None for v in raw.values()):
        return None
    named = {k: max(0.0, min(v, 5.0)) / 5.0 for k, v in raw.items()}
    total = sum((acs_weights or {}).get(k, 0.0) for k in ("alignment", "coherence", "style"))
    if acs_weights and total > 0:
        named["avg"] = sum(named[k] * acs_weights.get(k, 0.0) for k in ("alignment", "coherence", "style")) / total
    else:
        named["avg"] = sum(named.values()) / 3.0
    return named


def test_unifiedreward_v2_instruction_is_the_references() -> None:
    prompt = f"a photo of {random.randint(0, 10**6)} cats"
    # remote.py lines 160-172 at 9a84f91, the f-string as the reference writes it
    expected = (
        "You are presented with a generated image and its associated text caption. "
        "Provide overall assessments along the following axes (each rated from 1 to 5):\n"
        "- Alignment Score: How well the image matches the caption.\n"
        "- Coherence Score: How logically consistent the image is.\n"
        "- Style Score: How aesthetically appealing the image looks.\n\n"
        "Output your evaluation using the format below:\n\n"
        "Alignment Score (1-5): X\n"
        "Coherence Score (1-5): Y\n"
        "Style Score (1-5): Z\n\n"
        f"Your task is provided as follows:\nText Caption: [{prompt}]"
    )
    assert unifiedreward_v2_text(prompt) == expected


def test_unifiedreward_v2_parsing_matches_the_reference_on_random_answers() -> None:
    rng = random.Random()
    for _ in range(300):
        scores = [rng.uniform(-1, 7) for _ in range(3)]
        lines = [
            f"{name} Score (1-5): {abs(s):.{rng.randint(0, 3)}f}"
            for name, s in zip(("Alignment", "Coherence", "Style"), scores, strict=True)
        ]
        rng.shuffle(lines)
        if rng.random() < 0.2:
            lines.pop(rng.randrange(3))  # a line missing
        if rng.random() < 0.1:
            lines[0] += "."  # "4.5." does not read as a number
        text = rng.choice(["", "Reasoning.\n"]) + "\n".join(lines) + rng.choice(["", "\nDone."])
        weights = rng.choice([None, {}, {"alignment": rng.random(), "style": rng.random()}, {"coherence": 0.0}])
        got, want = parse_unifiedreward_v2(text, weights), _reference_extract(text, weights)
        if want is None:
            assert got is None, text
        else:
            assert got is not None and got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_pair_rank_answers() -> None:
    assert parse_pair_rank("Image 1 is better.") == 1.0
    assert parse_pair_rank("After comparing, image 2 is better") == 0.0
    assert parse_pair_rank("Both images are equally good.") == 0.5
    assert (
        parse_pair_rank(
            "<think>Image 1 is better in style, Image 2 is better in detail</think><answer>Image 2 is better</answer>"
        )
        == 0.0
    )
    assert parse_pair_rank("Image 1 is better in style; Image 2 is better overall.") is None
    assert parse_pair_rank("I cannot decide.") is None


def test_score_1_10_and_file_templates(tmp_path: Path) -> None:
    judge = build_reward("vlm_judge", url="http://127.0.0.1:9", template="score_1_10")
    assert judge.template.parse("Score: 7.5") == {"score": 7.5}
    assert judge.template.parse("Score: 11") is None and judge.template.parse("no score") is None
    path = tmp_path / "t.txt"
    path.write_text("Rate {prompt} from 0 to 100. Say 'Final Score: N'.")
    judge = build_reward(
        "vlm_judge", url="http://127.0.0.1:9", template_file=str(path), score_pattern=r"Final Score:\s*(\d+)"
    )
    assert judge.template.text("a dog") == "Rate a dog from 0 to 100. Say 'Final Score: N'."
    assert judge.template.parse("...\nFinal Score: 83") == {"score": 83.0}
    with pytest.raises(UserError, match="exactly one group"):
        build_reward("vlm_judge", url="http://127.0.0.1:9", template_file=str(path), score_pattern=r"(\d)(\d)")
    path.write_text("no placeholder")
    with pytest.raises(UserError, match="no {prompt} placeholder"):
        build_reward("vlm_judge", url="http://127.0.0.1:9", template_file=str(path))
    with pytest.raises(UserError, match="unknown judge template 'nope'"):
        build_reward("vlm_judge", url="http://127.0.0.1:9", template="nope")
    with pytest.raises(UserError, match="needs url"):
        build_reward("vlm_judge")


# ----------------------------------------------------------------------------- pairwise bookkeeping


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9])
def test_pairs_are_bounded_and_balanced(n: int) -> None:
    everything = group_pairs(n, "all")
    assert len(everything) == pairs_per_group(n, "all") == n * (n - 1) // 2
    assert {frozenset(p) for p in everything} == {frozenset(p) for p in itertools.combinations(range(n), 2)}
    firsts = [a for a, _ in everything]
    assert all(abs(firsts.count(i) - (n - 1) / 2) <= (n - 1) / 2 for i in range(n))
    for k in (1, 2, 3):
        chosen = group_pairs(n, k)
        assert len({frozenset(p) for p in chosen}) == len(chosen)  # no pair twice
        if 2 * k < n - 1:
            assert len(chosen) == n * k
            assert all(sum(i in p for p in chosen) == 2 * k for i in range(n))  # every sample equally often
        else:
            assert len(chosen) == n * (n - 1) // 2


def _pref_grpo_win_rates(n: int, comparisons: list, verdicts: list) -> list[float]:
    """``_pairwise_win_rate`` of Pref-GRPO (fastvideo/rewards/unifiedreward_think.py, 3e787f6), before its
    rounding to 3 decimals: wins over comparisons, a tie one half each, 0.0 for a sample never compared."""
    wins, count = [0.0] * n, [0] * n
    for (first, second), v in zip(comparisons, verdicts, strict=True):
        count[first] += 1
        count[second] += 1
        if v == 1.0:
            wins[first] += 1
        elif v == 0.0:
            wins[second] += 1
        else:
            wins[first] += 0.5
            wins[second] += 0.5
    return [wins[i] / count[i] if count[i] else 0.0 for i in range(n)]


def test_win_rates_match_pref_grpo_where_every_answer_parses() -> None:
    rng = random.Random()
    for _ in range(50):
        n = rng.randint(2, 9)
        comparisons = group_pairs(n, "all")  # Pref-GRPO judges every pair (itertools.combinations)
        verdicts = [rng.choice([1.0, 0.0, 0.5]) for _ in comparisons]
        got = [rate for rate, _ in win_rates(n, comparisons, verdicts)]
        assert got == pytest.approx(_pref_grpo_win_rates(n, comparisons, verdicts), abs=1e-12)


def test_win_rates_against_a_direct_count() -> None:
    rng = random.Random()
    for _ in range(50):
        n = rng.randint(2, 9)
        comparisons = group_pairs(n, rng.choice(["all", 1, 2]))
        verdicts = [rng.choice([1.0, 0.0, 0.5, None]) for _ in comparisons]
        got = win_rates(n, comparisons, verdicts)
        for i in range(n):
            mine = [(p, v) for p, v in zip(comparisons, verdicts, strict=True) if i in p and v is not None]
            wins = sum(v if p[0] == i else 1 - v for p, v in mine)
            if mine:
                assert got[i][0] == pytest.approx(wins / len(mine)) and got[i][1] == len(mine)
            else:
                assert math.isnan(got[i][0]) and got[i][1] == 0


# ----------------------------------------------------------------------------- over HTTP


def test_scores_reach_their_rows_under_concurrency() -> None:
    n = random.randint(20, 40)
    values = torch.rand(n)
    delays = {}

    def jittered(seen):  # answers come back out of order
        delays.setdefault(round(seen.brightness[0], 6), random.uniform(0, 0.05))
        return Reply(brightness_judgement(seen).text, delay=delays[round(seen.brightness[0], 6)])

    with JudgeServer() as server:
        server.script = jittered
        judge = build_reward("vlm_judge", url=server.url, concurrency=6, **FAST)
        out = judge(_flat_images(values), [f"prompt {i}" for i in range(n)], [{}] * n)
        b = _8bit(values)
        assert torch.allclose(out["alignment"], (1 + 4 * b) / 5, atol=1e-4)
        assert torch.allclose(out["coherence"], (2 + 2 * b) / 5, atol=1e-4)
        assert torch.allclose(out["vlm_judge"], ((1 + 4 * b) / 5 + (2 + 2 * b) / 5 + 0.6) / 3, atol=1e-4)
        assert not out["parse_failed"].any() and not out["unscored"].any()
        assert sorted(r.text for r in server.requests) == sorted(unifiedreward_v2_text(f"prompt {i}") for i in range(n))
        assert {r.model for r in server.requests} == {"UnifiedReward"}
        # at most `concurrency` requests were in the server at once, and more than one was
        events = sorted([(r.started, 1) for r in server.requests] + [(r.finished, -1) for r in server.requests])
        peak = max(itertools.accumulate(e for _, e in events))
        assert 1 < peak <= 6


def test_requests_go_round_robin_over_servers() -> None:
    with JudgeServer() as first, JudgeServer() as second:
        judge = build_reward("vlm_judge", url=[first.url, second.url + "/v1/"], **FAST)
        n = 2 * random.randint(3, 8)
        out = judge(_flat_images(torch.rand(n)), ["p"] * n, [{}] * n)
        assert not out["unscored"].any()
        assert len(first.requests) == len(second.requests) == n // 2


def test_5xx_and_429_are_retried_and_4xx_is_not() -> None:
    count = itertools.count()
    with JudgeServer() as server:
        server.script = lambda seen: (
            Reply(status=[500, 429, 503][k]) if (k := next(count)) < 3 else brightness_judgement(seen)
        )
        judge = build_reward("vlm_judge", url=server.url, concurrency=1, retries=3, **FAST)
        values = torch.rand(2)
        out = judge(_flat_images(values), ["p", "q"], [{}, {}])
        assert not out["unscored"].any()
        assert judge.client.stats == {"requests": 5, "retries": 3}

        server.script = lambda seen: Reply(status=400) if seen.brightness[0] < 0.5 else brightness_judgement(seen)
        judge = build_reward("vlm_judge", url=server.url, retries=3, **FAST)
        values = torch.tensor([0.2, 0.8, 0.1, 0.9])
        out = judge(_flat_images(values), ["p"] * 4, [{}] * 4)
        assert out["unscored"].tolist() == [1.0, 0.0, 1.0, 0.0]
        assert out["parse_failed"].tolist() == [0.0] * 4  # a failed request is no misread answer
        assert judge.client.stats["retries"] == 0


def test_a_slow_judge_times_out_then_the_run_stops_after_calls_without_any_answer() -> None:
    with JudgeServer() as server:
        server.script = lambda seen: Reply(brightness_judgement(seen).text, delay=1.0)
        judge = build_reward("vlm_judge", url=server.url, timeout=0.2, retries=1, stop_after=2, **FAST)
        out = judge(_flat_images(torch.rand(2)), ["p", "q"], [{}, {}])
        assert out["unscored"].tolist() == [1.0, 1.0] and torch.isnan(out["vlm_judge"]).all()
        with pytest.raises(RewardServerDown, match=rf"judge server {re.escape(server.url)} gave no answer in 2 calls"):
            judge(_flat_images(torch.rand(2)), ["p", "q"], [{}, {}])


def test_malformed_answers_are_unscored_then_stop_the_run_past_the_limit() -> None:
    bad = "I think this image is lovely."
    with JudgeServer() as server:
        server.script = lambda seen: Reply(bad) if seen.brightness[0] > 0.5 else brightness_judgement(seen)
        judge = build_reward("vlm_judge", url=server.url, parse_window=8, max_parse_failures=0.5, **FAST)
        values = torch.tensor([0.1, 0.9, 0.2, 0.3])
        out = judge(_flat_images(values), ["p"] * 4, [{}] * 4)
        assert out["parse_failed"].tolist() == [0.0, 1.0, 0.0, 0.0]
        assert out["unscored"].tolist() == [0.0, 1.0, 0.0, 0.0]
        assert math.isnan(out["vlm_judge"][1]) and not torch.isnan(out["vlm_judge"][[0, 2, 3]]).any()
        out = judge(_flat_images(torch.tensor([0.6, 0.7, 0.1, 0.2])), ["p"] * 4, [{}] * 4)  # 3 of 8: under
        with pytest.raises(RewardUnavailable) as info:
            judge(_flat_images(torch.tensor([0.6, 0.7, 0.8, 0.2])), ["p"] * 4, [{}] * 4)  # 5 of 8
        message = str(info.value)
        assert server.url in message and "'UnifiedReward'" in message and repr(bad) in message
        assert "5 of the last 8 answers" in message and "\n" not in message


def test_a_refused_key_and_an_unknown_model_stop_in_one_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret, wrong = f"sk-test-{random.getrandbits(64):016x}", f"sk-wrong-{random.getrandbits(64):016x}"
    with JudgeServer(api_key=secret) as server:
        monkeypatch.setenv("MY_JUDGE_KEY", wrong)
        judge = build_reward("vlm_judge", url=server.url, api_key_env="MY_JUDGE_KEY", **FAST)
        with pytest.raises(RewardServerRejected) as info:
            judge(_flat_images(torch.rand(1)), ["p"], [{}])
        assert "refused the API key" in str(info.value) and wrong not in str(info.value)
        assert judge.client.stats["retries"] == 0
        key_file = tmp_path / "key"
        key_file.write_text(secret + "\n")
        judge = build_reward("vlm_judge", url=server.url, api_key_file=str(key_file), **FAST)
        assert not judge(_flat_images(torch.rand(1)), ["p"], [{}])["unscored"].any()
        assert server.requests[-1].authorization == f"Bearer {secret}"
        judge = build_reward("vlm_judge", url=server.url, api_key_file=str(key_file), model="Other", **FAST)
        with pytest.raises(UserError, match=r"has no model 'Other'") as info:
            judge(_flat_images(torch.rand(1)), ["p"], [{}])
        assert secret not in str(info.value)
    with pytest.raises(UserError) as info:
        build_reward("vlm_judge", url="http://127.0.0.1:9", api_key_env=secret)
    assert secret not in str(info.value) and "name of an environment variable" in str(info.value)


def test_pairwise_win_rates_within_groups_split_across_chunks() -> None:
    sizes = [random.randint(2, 6) for _ in range(3)]
    n = sum(sizes)
    values = torch.rand(n)
    groups = [g for g, size in enumerate(sizes) for _ in range(size)]
    prompts = [f"prompt {g}" for g in groups]
    with JudgeServer() as server:
        rewards = RewardSet({"vlm_judge": 1.0}, vlm_judge={"url": server.url, "template": "pair_rank", **FAST})
        assert rewards.wants_groups
        cut = random.randint(1, n - 1)  # a chunk boundary inside some group
        first = rewards.submit(_flat_images(values[:cut]), prompts[:cut], None, groups=groups[:cut])
        second = rewards.submit(_flat_images(values[cut:]), prompts[cut:], None, groups=groups[cut:])
        out = {k: torch.cat([first.result()[k], second.result()[k]]) for k in first.result()}
        assert len(server.requests) == sum(s * (s - 1) // 2 for s in sizes)
        assert all(len(r.brightness) == 2 and "two generated images" in r.text for r in server.requests)
        b = _8bit(values)
        for i in range(n):
            mates = [j for j in range(n) if groups[j] == groups[i] and j != i]
            want = sum(1.0 if b[i] > b[j] else 0.5 if b[i] == b[j] else 0.0 for j in mates) / len(mates)
            assert out["vlm_judge"][i] == pytest.approx(want)
            assert out["vlm_judge/comparisons"][i] == len(mates)
        # each prompt's requests carry its own caption
        for r in server.requests:
            assert any(r.text.endswith(f"[prompt {g}]") for g in range(3))

        # bounded: each sample in two comparisons, n calls per group of n > 3
        server.requests.clear()
        judge = build_reward("vlm_judge", url=server.url, template="pair_rank", pairs=1, **FAST)
        out = judge(_flat_images(torch.rand(12)), ["a"] * 6 + ["b"] * 6, [{}] * 12)
        assert len(server.requests) == 12 and out["comparisons"].tolist() == [2.0] * 12


def test_submission_returns_before_the_judge_answers() -> None:
    gate = threading.Event()
    with JudgeServer() as server:
        server.script = lambda seen: (gate.wait(10), brightness_judgement(seen))[1]
        rewards = RewardSet({"vlm_judge": 1.0}, vlm_judge={"url": server.url, **FAST})
        t0 = time.perf_counter()
        pending = rewards.submit(_flat_images(torch.rand(4)), ["p"] * 4)
        assert time.perf_counter() - t0 < 5 and not pending.done()
        gate.set()
        assert not pending.result()["vlm_judge/unscored"].any()


def test_videos_send_the_chosen_frames_together() -> None:
    values = torch.rand(2, 5)
    videos = values[:, :, None, None, None].expand(2, 5, 3, 8, 8).clone()
    with JudgeServer() as server:
        judge = build_reward("vlm_judge", url=server.url, frames="first,last", **FAST)
        out = judge(videos, ["p", "q"], [{}, {}])
        assert [len(r.brightness) for r in server.requests] == [2, 2]
        b = _8bit(values[:, [0, -1]]).mean(1)
        assert torch.allclose(out["alignment"], (1 + 4 * b) / 5, atol=1e-4)
        with pytest.raises(UserError, match="frames"):
            build_reward("vlm_judge", url=server.url, **FAST)(videos, ["p", "q"], [{}, {}])
        # whole videos as MP4s: one video part a request, every frame in it
        server.requests.clear()
        judge = build_reward("vlm_judge", url=server.url, video="mp4", fps=4, **FAST)
        out = judge(videos, ["p", "q"], [{}, {}])
        assert [(len(r.brightness), r.videos) for r in server.requests] == [(1, 1), (1, 1)]
        assert [r.media for r in server.requests] == [[("video/mp4", 8, 8)]] * 2
        b = _8bit(values).mean(1)  # H.264 keeps flat frames' levels to within a step or two
        assert torch.allclose(out["alignment"], (1 + 4 * b) / 5, atol=0.02)


# ----------------------------------------------------------------------------- the probe command


def test_probe_judge_checks_health_models_and_one_answer(capsys: pytest.CaptureFixture[str]) -> None:
    from precise_rl.cli import main

    with JudgeServer() as first, JudgeServer() as second:
        assert main(["probe-judge", "--url", first.url, "--url", second.url + "/v1"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split(":", 2)[:2] for line in lines] == [first.url.split(":")[:2], second.url.split(":")[:2]]
        assert all("/health 200" in line and "avg=" in line for line in lines)
        assert len(first.requests) == len(second.requests) == 1
        assert main(["probe-judge", "--url", first.url, "--template", "pair_rank"]) == 0
        out = capsys.readouterr().out
        verdict, answer = re.search(r"verdict (\S+) .*answer '(.*)'\)", out).groups()
        assert float(verdict) == parse_pair_rank(answer) and len(first.requests[-1].brightness) == 2

        assert main(["probe-judge", "--url", first.url, "--model", "Qwen"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"precise-rl probe-judge: error: judge server {first.url} serves models ['UnifiedReward'], not 'Qwen': "
            "set --model (reward.options.vlm_judge.model) to one of them"
        )
        second.script = lambda seen: Reply("It is a fine picture.")
        assert main(["probe-judge", "--url", first.url, "--url", second.url]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and "'It is a fine picture.', which does not parse as template 'unifiedreward_v2'" in err[0]
        )
        first.health_status = 503
        assert main(["probe-judge", "--url", first.url]) == 2
        assert "answers /health with HTTP 503" in capsys.readouterr().err
    assert main(["probe-judge", "--url", first.url]) == 2  # stopped: nothing listens there any more
    assert "cannot reach judge server" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training end to end

ROOT = Path(__file__).resolve().parents[1]


def _train(run: Path, url: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``precise-rl train`` on the built-in digits task with ``reward.weights={vlm_judge: 1}``, small epochs."""
    cmd = [sys.executable, "-m", "precise_rl.cli", "train", "--output", str(run), "reward.weights={vlm_judge: 1}"]
    cmd += [f"reward.options.vlm_judge.url={url}", "reward.options.vlm_judge.backoff=0"]
    cmd += ["train.epochs=2", "train.groups_per_epoch=4", "train.group_size=4", "eval.every=0", *overrides]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_digits_against_the_judge_with_a_key_that_appears_nowhere(tmp_path: Path) -> None:
    secret = f"sk-judge-{random.getrandbits(64):016x}"
    with JudgeServer(api_key=secret) as server:
        done = _train(tmp_path / "run", server.url, env={"PRECISE_RL_JUDGE_API_KEY": secret})
        assert done.returncode == 0, done.stderr
        assert len(server.requests) == 2 * 16 and {r.authorization for r in server.requests} == {f"Bearer {secret}"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "reward_mean" in r]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert r["unscored/vlm_judge"] == 0 and r["reward/vlm_judge/parse_failed"] == 0
        # the scripted judge: alignment (1 + 4 b) / 5 and coherence (2 + 2 b) / 5 of the same brightness b
        b = (5 * r["reward/vlm_judge/alignment"] - 1) / 4
        assert r["reward/vlm_judge/coherence"] == pytest.approx((2 + 2 * b) / 5, abs=1e-5)
        assert r["reward_mean"] == pytest.approx(r["reward/vlm_judge"], abs=1e-6)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert secret.encode() not in b"".join(p.read_bytes() for p in written)
    assert secret not in done.stdout + done.stderr


@pytest.mark.slow
def test_a_judge_whose_answers_do_not_parse_stops_training_in_one_sentence(tmp_path: Path) -> None:
    with JudgeServer() as server:
        server.script = lambda seen: Reply("A charming digit, 10/10!")
        done = _train(tmp_path / "run", server.url, "reward.options.vlm_judge.parse_window=8")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith("precise-rl train: error: training stopped: 8 of the last 8 answers of judge server ")
    assert f"{server.url} (model 'UnifiedReward')" in err and "'A charming digit, 10/10!'" in err
    assert "--resume" in err and (tmp_path / "run" / "checkpoints").is_dir()


@pytest.mark.slow
def test_train_digits_on_pairwise_win_rates_with_groups_split_across_chunks(tmp_path: Path) -> None:
    with JudgeServer() as server:
        # chunks of 6 rows split groups of 4: each group is still judged whole, 6 pairs a group
        done = _train(
            tmp_path / "run", server.url, "reward.options.vlm_judge.template=pair_rank", "train.rollout_batch_size=6"
        )
        assert done.returncode == 0, done.stderr
        assert len(server.requests) == 2 * 4 * 6
        captions = [r.text.rsplit("[", 1)[1] for r in server.requests]
        assert all(captions.count(c) % 6 == 0 for c in set(captions))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "reward_mean" in r]
    for r in records:
        assert r["reward/vlm_judge"] == pytest.approx(0.5)  # win rates of a group average one half
        assert r["reward/vlm_judge/comparisons"] == 3 and r["unscored/vlm_judge"] == 0


def test_score_1_10_over_http() -> None:
    values = torch.rand(5)
    with JudgeServer() as server:
        judge = build_reward("vlm_judge", url=server.url, template="score_1_10", **FAST)
        out = judge(_flat_images(values), ["p"] * 5, [{}] * 5)
        assert torch.allclose(out["vlm_judge"], 1 + 9 * _8bit(values), atol=1e-3)
        assert all("Score: N" in r.text and r.text.endswith("[p]") for r in server.requests)
        assert judge.max_score(["p"], [{}]).tolist() == [10.0]


def test_the_judge_answers_a_chunk_while_the_next_is_rolled_out(tmp_path: Path) -> None:
    """Three rollout chunks an epoch: the first chunk's requests reach the judge, and are answered, before
    the last chunk's rollout steps are done; the scores are still each image's own."""
    import copy

    from precise_rl.config import config_from_dict
    from precise_rl.rl.rollouts import wait_scores
    from precise_rl.rl.trainer import GRPOTrainer
    from tests import toy_task

    toy_task.register()
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["train"].update(epochs=1, rollout_batch_size=4)
    data["eval"]["every"] = 0
    with JudgeServer() as server:
        server.script = lambda seen: Reply(brightness_judgement(seen).text, delay=0.05)
        data["reward"] = {"weights": {"vlm_judge": 1.0}, "options": {"vlm_judge": {"url": server.url, **FAST}}}
        trainer = GRPOTrainer(config_from_dict(data), tmp_path / "run")
        steps: list[float] = []
        velocity = trainer.policy.velocity

        def timed(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
            if not torch.is_grad_enabled():  # a rollout step
                steps.append(time.perf_counter())
                time.sleep(0.03)  # a model step that takes time, as a real one does
            return velocity(x, t, cond)

        trainer.policy.velocity = timed
        batch = trainer.collect(0)
        scores = wait_scores(trainer.rewards, batch)
    first_chunk = sorted(server.requests, key=lambda r: r.started)[:4]
    assert len(steps) == 3 * trainer.cfg.sampler.num_steps
    assert all(r.finished < steps[-1] for r in first_chunk)  # answered while the last chunk was sampled
    b = (batch.images * 255).round().flatten(1).mean(1) / 255
    assert torch.allclose(scores["vlm_judge/alignment"], (1 + 4 * b) / 5, atol=1e-4)


def test_images_go_as_data_urls_at_the_chosen_resolution_and_format() -> None:
    h, w = random.choice([(8, 16), (16, 8), (12, 12)])
    resolution = random.choice([24, 64])
    values = torch.rand(3)
    images = values[:, None, None, None].expand(3, 3, h, w).clone()
    with JudgeServer() as server:
        judge = build_reward("vlm_judge", url=server.url, resolution=resolution, backoff=0.0)  # JPEG by default
        out = judge(images, ["p"] * 3, [{}] * 3)
        scale = resolution / max(h, w)
        assert [r.media for r in server.requests] == [[("image/jpeg", round(w * scale), round(h * scale))]] * 3
        # a flat grey survives JPEG at quality 95 and bicubic scaling to within a level or two
        assert torch.allclose(out["alignment"], (1 + 4 * _8bit(values)) / 5, atol=0.01)
        server.requests.clear()
        judge = build_reward("vlm_judge", url=server.url, resolution=None, image_format="png", backoff=0.0)
        out = judge(images, ["p"] * 3, [{}] * 3)
        assert [r.media for r in server.requests] == [[("image/png", w, h)]] * 3
        assert torch.allclose(out["alignment"], (1 + 4 * _8bit(values)) / 5, atol=1e-4)
    with pytest.raises(UserError, match="image_format must be 'jpeg' or 'png'"):
        build_reward("vlm_judge", url="http://127.0.0.1:9", image_format="webp")


def test_backoff_doubles_up_to_its_limit() -> None:
    count = itertools.count()
    with JudgeServer() as server:
        server.script = lambda seen: Reply(status=502) if next(count) < 4 else brightness_judgement(seen)
        judge = build_reward(
            "vlm_judge", url=server.url, retries=4, backoff=0.1, backoff_max=0.25, image_format="png", resolution=None
        )
        out = judge(_flat_images(torch.rand(1)), ["p"], [{}])
        assert not out["unscored"].any()
        starts = [r.started for r in server.requests]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # waits of 0.1, 0.2, then 0.4 and 0.8 capped at 0.25
        assert len(gaps) == 4 and all(g >= want - 0.01 for g, want in zip(gaps, [0.1, 0.2, 0.25, 0.25], strict=True))
        assert gaps[3] < 0.6  # the cap holds (0.8 s uncapped)


def test_a_rate_limited_judge_is_waited_for_as_its_retry_after_asks() -> None:
    n = random.randint(4, 6)
    values = torch.rand(n)
    with JudgeServer() as server:
        # two answered at a time, each in 0.3 s; the others are refused with Retry-After: 0.8
        server.max_in_flight, server.retry_after = 2, 0.8
        server.script = lambda seen: Reply(brightness_judgement(seen).text, delay=0.3)
        judge = build_reward("vlm_judge", url=server.url, concurrency=n, retries=20, **{**FAST, "backoff": 0.01})
        t0 = time.perf_counter()
        out = judge(_flat_images(values), [f"p{i}" for i in range(n)], [{}] * n)
        assert not out["unscored"].any()
        assert torch.allclose(out["alignment"], (1 + 4 * _8bit(values)) / 5, atol=1e-4)
        assert server.refused > 0 and judge.client.stats == {"requests": n + server.refused, "retries": server.refused}
        # the refused ones came back after the 0.8 s asked for; a 0.01 s backoff alone would have retried
        # at 0.01, 0.03, ... 0.31 s and got in at about 0.31 s, when the first two were answered
        third = sorted(r.started for r in server.requests)[2]
        assert third - t0 >= 0.8 - 0.02
        events = sorted([(r.started, 1) for r in server.requests] + [(r.finished, -1) for r in server.requests])
        assert max(itertools.accumulate(e for _, e in events)) <= 2


@pytest.mark.slow
def test_answers_that_do_not_parse_are_counted_per_epoch_in_the_metrics(tmp_path: Path) -> None:
    misread: set[int] = set()
    share = random.uniform(0.2, 0.4)

    def sometimes_malformed(seen):
        if random.random() < share:
            misread.add(id(seen))
            return Reply("Alignment looks fine; the style, less so.")
        return brightness_judgement(seen)

    with JudgeServer() as server:
        server.script = sometimes_malformed
        done = _train(tmp_path / "run", server.url, "reward.options.vlm_judge.max_parse_failures=1.0")
        assert done.returncode == 0, done.stderr
        requests = list(server.requests)
    assert len(requests) == 2 * 16
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "reward_mean" in r]
    for epoch, r in enumerate(records):
        bad = sum(id(seen) in misread for seen in requests[16 * epoch : 16 * (epoch + 1)])
        assert r["unscored/vlm_judge"] == bad
        assert r["reward/vlm_judge/parse_failed"] == pytest.approx(bad / 16)
