"""The algorithm table and the update engine: DiffusionNFT, Flow-GRPO-Fast, and what every algorithm shares.

Formula tests compare against transcriptions of the reference code (file and commit cited in each
transcription), on fresh random inputs; training tests run the built-in digits task. Every
algorithm of the table trains on two processes (DDP, and FSDP2 on gloo) to the numbers of one
process, and resumes exactly. AWM and DPO have their formula tests in their own files.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from precise_rl.algorithm_table import ALGORITHM_TABLE
from precise_rl.cli import main
from precise_rl.config import config_from_dict, config_to_dict, load_config
from precise_rl.errors import UserError
from precise_rl.rl import seeds
from precise_rl.rl.algorithms.grpo import fast_window_start
from precise_rl.rl.algorithms.nft import nft_loss, old_decay
from precise_rl.rl.trainer import Trainer
from precise_rl.sde import SAMPLER_TABLE, trainable_samplers

from .test_distributed import ACCELERATE, ROOT, _env, _free_port
from .test_distributed import ARGS as DDP_ARGS

FRESH = int(torch.randint(0, 2**31 - 1, ()))

# The distributed tests' small digits run (4 groups of 4, 4 steps, 3 epochs, a checkpoint per epoch) without its GRPO
# knob, every checkpoint kept.
SMALL = [a for a in DDP_ARGS if not a.startswith(("algorithm.clip_range", "checkpoint.keep"))] + ["checkpoint.keep=5"]
#: each algorithm's variant in the multi-process and resume tests (its own knobs beside the small run)
VARIANTS = {
    "nft": ["algorithm.name=nft", "sampler.name=precise"],
    "awm": ["algorithm.name=awm"],
    "dpo": ["algorithm.name=dpo", "algorithm.pairs=all"],
    "grpo_fast": ["algorithm.fast_window=2", "algorithm.fast_start_max=1", "algorithm.clip_range=0.2"],
}


# --------------------------------------------------------------------------- the config and the table


def test_every_algorithm_is_in_the_table_with_a_loadable_implementation() -> None:
    assert {"grpo", "nft", "awm", "dpo"} <= set(ALGORITHM_TABLE)
    for entry in ALGORITHM_TABLE.values():
        assert entry.summary and entry.reference
        assert callable(entry.load())


def test_grpo_knobs_under_train_are_read_into_the_algorithm_section_or_refused_naming_the_new_key() -> None:
    cfg = config_from_dict({"train": {"clip_range": 0.2, "kl_beta": 0.01, "adv_std": "batch", "lr": 1e-3}})
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.clip_range == 0.2 and cfg.algorithm.kl_beta == 0.01
    assert cfg.algorithm.adv_std == "batch" and cfg.train.lr == 1e-3
    # the saved config holds the new layout and reads back the same
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(cfg)["algorithm"]["clip_range"] == 0.2 and "clip_range" not in config_to_dict(cfg)["train"]
    with pytest.raises(UserError, match=r"'train.clip_range' is a GRPO knob, now 'algorithm.clip_range'"):
        config_from_dict({"train": {"clip_range": 0.2}, "algorithm": {"name": "nft"}})
    with pytest.raises(UserError, match=r"'train.kl_beta' and 'algorithm.kl_beta' disagree"):
        config_from_dict({"train": {"kl_beta": 0.1}, "algorithm": {"kl_beta": 0.2}})
    with pytest.raises(UserError, match=r"'algorithm.beta' is not a knob of algorithm 'grpo'"):
        config_from_dict({"algorithm": {"beta": 1.0}})
    with pytest.raises(UserError, match=r"'algorithm.name' must be one of 'grpo', 'nft'"):
        config_from_dict({"algorithm": {"name": "ppo"}})
    with pytest.raises(UserError, match=r"'algorithm.old_decay_max' must be in \[0, 1\]"):
        config_from_dict({"algorithm": {"name": "nft", "old_decay_max": 2.0}})


def test_each_algorithm_takes_the_samplers_its_entry_says_and_defaults_to_its_reference_sampler() -> None:
    assert load_config(None).sampler.name == "precise"  # GRPO's default, as before
    for name, entry in ALGORITHM_TABLE.items():
        cfg = load_config(None, [f"algorithm.name={name}"])
        assert cfg.sampler.name == entry.default_sampler
        allowed = list(SAMPLER_TABLE) if entry.samplers == "any" else trainable_samplers()
        for sampler in SAMPLER_TABLE:
            if sampler in allowed:
                assert load_config(None, [f"algorithm.name={name}", f"sampler.name={sampler}"]).sampler.name == sampler
            else:
                with pytest.raises(UserError, match=f"algorithm '{name}' trains on per-step log-probs"):
                    load_config(None, [f"algorithm.name={name}", f"sampler.name={sampler}"])
    assert load_config(None, ["algorithm.name=nft"]).sampler.name == "ode"


def test_no_two_random_streams_share_a_key_but_the_documented_pair() -> None:
    keys = seeds.stream_keys(FRESH % 1000, epochs=12, rows=40)
    owner: dict[tuple[int, ...], str] = {}
    clashes = set()
    for name, ks in keys.items():
        for k in ks:
            if k in owner and owner[k] != name:
                clashes.add(tuple(sorted((owner[k], name))))
            owner.setdefault(k, name)
    assert clashes <= {("eval", "prompt_pass")}  # (seed, 7, 5): said in the seeds module, kept for old runs
    # the hashed seeds of distinct keys differ too
    flat = [seeds.mix(*k) for k in owner]
    assert len(set(flat)) == len(flat)


# --------------------------------------------------------------------------- DiffusionNFT: the formulas


def _nft_optimality_reference(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """NVlabs/DiffusionNFT @ 24af5554898d85e93efa492f42b5e9cdf4156e9b, train_nft_sd3.py L910-929 (adv_mode all)."""
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    return advantages_clip, r


def _nft_loss_reference(x0, noise, t, forward_prediction, old_prediction, advantages, beta, adv_clip_max,
                        ref_forward_prediction, train_beta):  # fmt: skip
    """NVlabs/DiffusionNFT @ 24af5554898d85e93efa492f42b5e9cdf4156e9b, scripts/train_nft_sd3.py L862-975.

    One micro-batch at one timestep column, transcribed with the reference's names and order.
    """
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    xt = (1 - t_expanded) * x0 + t_expanded * noise
    advantages_clip, r = _nft_optimality_reference(advantages, adv_clip_max)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return policy_loss + train_beta * torch.mean(kl_div_loss)


def _nvlabs_return_decay(step: int, decay_type: int) -> float:
    """NVlabs/DiffusionNFT @ 24af5554898d85e93efa492f42b5e9cdf4156e9b, scripts/train_nft_sd3.py L169-189 (verbatim)."""
    if decay_type == 0:
        flat, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat, uprate, uphold = 0, 0.001, 0.5
    else:
        flat, uprate, uphold = 75, 0.0075, 0.999
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@pytest.mark.parametrize("trial", range(4))
def test_nft_loss_and_its_gradient_equal_the_reference_on_random_inputs(trial: int) -> None:
    gen = torch.Generator().manual_seed(FRESH + trial)
    b, shape = 6, (3, 5, 4)
    # float64 throughout, so that the two orders of summation agree to rounding
    x0, noise, v_old, v_ref = (torch.randn(b, *shape, generator=gen, dtype=torch.float64) for _ in range(4))
    t = torch.rand(b, generator=gen, dtype=torch.float64).clamp(0.01, 1.0)
    adv = torch.randn(b, generator=gen, dtype=torch.float64) * 4  # some beyond the clip
    beta = float(torch.rand((), generator=gen)) * 2 + 0.05
    kl_beta = float(torch.rand((), generator=gen)) * 1e-2
    v = torch.randn(b, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
    v2 = v.detach().clone().requires_grad_(True)
    want = _nft_loss_reference(x0, noise, t, v, v_old, adv, beta, 5.0, v_ref, kl_beta)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    rows, _ = nft_loss(x0, xt, t, v2, v_old, adv, beta, 5.0, v_ref, kl_beta)
    got = rows.mean()  # the engine's loss: the mean over the update's rows
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g_want,) = torch.autograd.grad(want, v)
    (g_got,) = torch.autograd.grad(got, v2)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_nft_old_policy_decay_is_the_references_return_decay() -> None:
    for step in [0, 1, 5, 74, 75, 76, 200, 499, 500, 501, 10_000]:
        assert old_decay(step, 0, 0.001, 0.5) == _nvlabs_return_decay(step, 1)
        assert old_decay(step, 75, 0.0075, 0.999) == _nvlabs_return_decay(step, 2)
        assert old_decay(step, 0, 0.0, 0.0) == _nvlabs_return_decay(step, 0)


# --------------------------------------------------------------------------- DiffusionNFT: in the trainer


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config(None, [*SMALL, *overrides])
    return Trainer(cfg, tmp_path / "run")


def test_nft_keeps_final_latents_only_trains_distinct_grid_times_and_rolls_out_with_the_old_policy(
    tmp_path: Path,
) -> None:
    tr = _trainer(tmp_path, "algorithm.name=nft", "sampler.name=precise")
    batch = tr.collect(0)
    assert batch.latents.shape[1] == 1 and batch.means is None  # no per-step store: the final latents alone
    grpo = _trainer(tmp_path / "g").collect(0)
    assert grpo.latents.shape[1] == 5 and torch.equal(grpo.latents[:, -1], batch.latents[:, -1])
    _, targets, _ = tr.score(batch)
    algo = tr.algorithm
    algo.begin(batch, targets, 0, 0)
    assert algo.items() == math.floor(4 * 0.99) == 3
    grid = batch.kernel.sigmas[:-1].float()
    for row in batch.row_ids.tolist():
        times = algo._row_times(row)
        assert len(set(times.tolist())) == 3 and all(bool((grid == x).any()) for x in times)
    # a row's loss does not depend on the rows it is computed with (per-row seeded times and noise)
    units = batch.row_ids[:6]
    items = torch.tensor([0, 1, 2, 0, 1, 2])
    together = algo.loss(units, items).loss.detach()
    alone = torch.cat([algo.loss(units[i : i + 1], items[i : i + 1]).loss.detach() for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-8)
    # after an epoch the old policy differs from the trained weights, and rollouts use it
    tr.train_on(batch, targets, 0)
    old = [w.clone() for w in algo.old.weights]
    assert any(not torch.equal(w, p.detach()) for w, p in zip(old, tr.params, strict=True))
    with algo.rollout_weights():
        assert all(torch.equal(w, p.detach()) for w, p in zip(old, tr.params, strict=True))
    assert any(not torch.equal(w, p.detach()) for w, p in zip(old, tr.params, strict=True))


# --------------------------------------------------------------------------- Flow-GRPO-Fast


def test_fast_window_starts_are_uniform_over_the_reference_range_and_the_same_for_a_seed() -> None:
    starts = [fast_window_start(FRESH, e, 2) for e in range(3000)]
    counts = [starts.count(k) for k in range(3)]
    assert min(counts) > 850 and max(counts) < 1150  # uniform over {0, 1, 2}: the reference's randint(0, 5 - 3)
    assert starts == [fast_window_start(FRESH, e, 2) for e in range(3000)]


@pytest.mark.parametrize("sampler", trainable_samplers())
def test_fast_trains_the_window_only_with_every_stochastic_sampler_at_ratio_one(tmp_path: Path, sampler: str) -> None:
    tr = _trainer(tmp_path, f"sampler.name={sampler}", "sampler.num_steps=8", "algorithm.fast_window=2")
    for epoch in range(3):
        kern = tr.kernel_for_epoch(epoch)
        start = fast_window_start(5, epoch, 8 // 2 - 2)
        assert torch.nonzero(kern.stochastic).flatten().tolist() == [start, start + 1]
    batch = tr.collect(1)
    _, adv, _ = tr.score(batch)
    tr.algorithm.begin(batch, adv, 1, 0)
    start = fast_window_start(5, 1, 2)
    assert tr.algorithm.steps == [start, start + 1]
    # the first pass recomputes the stored log-probs exactly: the ratio is 1
    rows = torch.arange(len(batch.row_ids)).repeat_interleave(2)
    steps = torch.tensor([start, start + 1]).repeat(len(batch.row_ids))
    with torch.no_grad():
        out = tr.recompute(batch, rows, steps)
    torch.testing.assert_close(out.log_prob, batch.log_probs[rows, steps], rtol=1e-5, atol=1e-4)


def test_fast_with_a_shared_start_branches_one_trajectory_at_the_window(tmp_path: Path) -> None:
    tr = _trainer(tmp_path, "sampler.num_steps=8", "algorithm.fast_window=2", "algorithm.fast_shared_start=true")
    batch = tr.collect(0)
    start = fast_window_start(5, 0, 2)
    lat = batch.latents.reshape(4, 4, *batch.latents.shape[1:])  # (group, member, step, ...)
    for g in range(4):
        for j in range(1, 4):
            # one trajectory up to the window (up to the rounding of the rollout chunks' batched arithmetic) ...
            torch.testing.assert_close(lat[g, j, : start + 1], lat[g, 0, : start + 1], rtol=1e-5, atol=1e-6)
            # ... and branches there
            assert (lat[g, j, start + 1] - lat[g, 0, start + 1]).abs().max() > 1e-2
    with pytest.raises(UserError, match="does not fit in sampler.num_steps=4"):
        _trainer(tmp_path / "x", "algorithm.fast_window=3").kernel_for_epoch(0)
    with pytest.raises(UserError, match="fast_window .* and sampler.window both choose"):
        _trainer(tmp_path / "y", "algorithm.fast_window=1", "sampler.window.size=2")


# --------------------------------------------------------------------------- an algorithm from outside


@pytest.fixture
def extension_algorithm():
    import importlib
    import sys

    saved = dict(ALGORITHM_TABLE)
    module = "tests.extensions.filtered_fm_algorithm"
    if module in sys.modules:
        importlib.reload(sys.modules[module])
    else:
        importlib.import_module(module)
    yield
    ALGORITHM_TABLE.clear()
    ALGORITHM_TABLE.update(saved)


def test_an_algorithm_from_outside_in_one_file_trains_evaluates_and_compares_by_name(
    extension_algorithm: None, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main(["train", *SMALL, "algorithm.name=filtered_fm", "algorithm.times=3", "--output", str(run)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "fm_error" in records[-1] and records[-1]["updates"] > 0
    # its sampler is the ODE: ``own`` is the same deterministic protocol, scored once and reported under both keys
    assert records[-1]["eval_own_reward"] == records[-1]["eval_ode_reward"]
    assert records[-1]["eval_ode_reward"] != records[0]["eval_ode_reward"]
    saved = json.loads(json.dumps(config_to_dict(load_config(run / "config.yaml"))))
    assert saved["algorithm"] == {"name": "filtered_fm", "times": 3} and saved["sampler"]["name"] == "ode"
    assert main(["eval", str(run), "--max-prompts", "2"]) == 0
    # compare and study read the table: the new name is one of theirs with no edit
    from precise_rl.rl.compare import parse_algorithms, valid_pairs

    pairs, left = valid_pairs(parse_algorithms("grpo,filtered_fm"), ["ode", "precise"])
    assert pairs == [("grpo", "precise"), ("filtered_fm", "ode"), ("filtered_fm", "precise")] and len(left) == 1


def test_the_table_holds_no_extension_outside_the_fixture() -> None:
    assert "filtered_fm" not in ALGORITHM_TABLE


# --------------------------------------------------------------------------- every algorithm: processes and resume


def _weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"epoch_{epoch:06d}"
    out = {f"trainable/{k}": v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()}
    if (ckpt / "algorithm.safetensors").is_file():
        out.update({f"algorithm/{k}": v for k, v in load_file(str(ckpt / "algorithm.safetensors")).items()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_algorithm_resumes_exactly_after_a_stop(variant: str, tmp_path: Path) -> None:
    args = [*SMALL, *VARIANTS[variant]]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *args, "--output", str(straight)]) == 0
    assert main(["train", *args, "train.epochs=2", "--output", str(split)]) == 0
    assert main(["train", *args, "--output", str(split), "--resume", str(split)]) == 0
    a, b = _weights(straight, 3), _weights(split, 3)
    assert a.keys() == b.keys()
    if variant in ("nft", "awm"):
        assert any(k.startswith("algorithm/") for k in a)  # the old / EMA policy is checkpointed
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _launch(config: str, run: Path, args: list[str]) -> None:
    cmd = [*ACCELERATE, "--config_file", config, "--num_processes", "2", "--main_process_port", str(_free_port())]
    cmd += ["-m", "precise_rl.cli", "train", *args, "--output", str(run)]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for variant, extra in VARIANTS.items():
        run = tmp_path_factory.mktemp(variant) / "one"
        assert main(["train", *SMALL, *extra, "--output", str(run)]) == 0
        runs[variant] = run
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_algorithm_on_two_processes_trains_to_the_one_process_numbers(
    variant: str, launch: str, one_process_runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / launch
    extra = ["train.fsdp=true"] if launch == "fsdp" else []
    _launch(f"configs/accelerate/{launch}.yaml", run, [*SMALL, *VARIANTS[variant], *extra])
    one = one_process_runs[variant]
    got, want = _weights(run, 3), _weights(one, 3)
    assert got.keys() == want.keys()
    # Equal up to float rounding, measured against how far training moved the weights: Adam can move a
    # weight whose gradient is ~0 by a share of the learning rate on rounding noise alone.
    init = load_file(str(ROOT / "src/precise_rl/assets/digits_flow.safetensors"))
    for part in ("trainable/", "algorithm/"):
        keys = [k for k in want if k.startswith(part)]
        if not keys:
            continue
        start = {
            k: init[k.split("/", 1)[1].split(".", 1)[1] if part == "algorithm/" else k.split("/", 1)[1]] for k in keys
        }
        moved = torch.cat([(want[k] - start[k]).flatten() for k in keys])
        diff = torch.cat([(got[k] - want[k]).flatten() for k in keys])
        assert moved.norm() > 0, f"training changed no {part} weight"
        assert diff.norm() <= 1e-3 * moved.norm(), (part, float(diff.norm()), float(moved.norm()))
        assert diff.abs().max() <= 0.05 * 1e-3, (part, float(diff.abs().max()))  # well below one step at lr 1e-3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in base]
    for r, w in zip(rows, base, strict=True):
        for key in ("reward_mean", "loss", "updates", "model_evals", "eval_ode_reward"):
            if key in w:
                assert r[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (key, r["epoch"])
    shutil.rmtree(run, ignore_errors=True)


def test_the_readme_lists_every_algorithm_of_the_table_and_no_other() -> None:
    text = (ROOT / "README.md").read_text().split("## Algorithms", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    named = {line.split("`")[1] for line in rows} - {"algorithm.name"}  # the header of the algorithms' table
    assert named == set(ALGORITHM_TABLE)  # its rows, and the speed table's below it
    done = subprocess.run([sys.executable, "-m", "precise_rl.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    for name, entry in ALGORITHM_TABLE.items():  # --help lists them from the table
        assert f"  {name}" in done.stdout and entry.summary.split(":")[0] in done.stdout
