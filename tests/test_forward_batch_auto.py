"""``train.forward_batch: auto``: rows per training forward chosen by a memory budget (precise_rl.rl.memory).

The CPU peak measurement is checked against allocations of known sizes; the line and its largest
row count against closed forms; on a tiny FLUX.2 Klein, the count ``auto`` chooses against the peaks
of real training passes at that count and one more, measured apart, and the trained weights against
those of the same count given by hand (the probe passes change nothing).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from precise_rl.config import config_from_dict, config_to_dict
from precise_rl.errors import UserError
from precise_rl.rl.memory import HEADROOM, MemoryLine, budget_bytes, fit_line, live_bytes, peak_bytes
from precise_rl.rl.trainer import GRPOTrainer

from . import diffusers_checks as dc
from . import tiny_pipelines as tp

CPU = torch.device("cpu")


def test_cpu_peak_is_the_most_bytes_live_at_once() -> None:
    sizes = torch.randint(1000, 100_000, (3,)).tolist()
    kept: list[torch.Tensor] = []

    def work() -> None:
        a = torch.empty(sizes[0], dtype=torch.uint8)
        b = torch.empty(sizes[1], dtype=torch.uint8)
        del a
        c = torch.empty(sizes[2], dtype=torch.uint8)
        kept.append(c)
        del b

    assert peak_bytes(work, CPU) == max(sizes[0] + sizes[1], sizes[1] + sizes[2])
    # what was live before the call is not counted, and a float32 tensor is 4 bytes an element
    before = torch.empty(50_000)
    assert peak_bytes(lambda: kept.append(before.clone()), CPU) == before.numel() * 4


def test_the_line_takes_the_most_rows_within_the_budget() -> None:
    fixed, per_row = (int(x) for x in torch.randint(10_000, 1_000_000, (2,)))
    line = MemoryLine(fixed, per_row)
    budget = int((fixed + 7.5 * per_row) / HEADROOM)
    assert line.largest(budget, most=100) == 7  # peak(7) <= 0.95 budget < peak(8)
    assert line.peak(7) <= HEADROOM * budget < line.peak(8)
    assert line.largest(budget, most=3) == 3
    assert MemoryLine(fixed, 0).largest(fixed * 2, most=12) == 12
    with pytest.raises(UserError, match=r"row per forward takes [0-9.]+ (kB|MB), more than 95% of the"):
        line.largest(fixed + per_row, most=10)
    # through (1, fixed + per_row) and (2, fixed + 2 per_row), with what is live and the optimizer's moments
    assert fit_line(100, fixed + per_row, fixed + 2 * per_row, 20) == MemoryLine(fixed + 120, per_row)


def test_the_budget_is_the_config_s_else_the_gpu_s() -> None:
    assert budget_bytes(2.5, CPU) == 2_500_000_000
    with pytest.raises(UserError, match="forward_batch: auto on a cpu device needs train.memory_budget_gb"):
        budget_bytes(None, CPU)


def test_live_bytes_counts_each_cpu_storage_once() -> None:
    gc.collect()
    before = live_bytes(CPU)
    t = torch.empty(123_456, dtype=torch.uint8)
    view = t[10:]  # the same storage
    assert live_bytes(CPU) - before == 123_456
    del t, view


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tp.save_pipeline("flux2_klein", tmp_path_factory.mktemp("klein") / "klein")
    return {"name": "flux2_klein", "path": str(path), "options": tp.adapter_options("flux2_klein", height=64, width=64)}


def _trainer(model: dict, out: Path, forward_batch, budget: float | None = None) -> GRPOTrainer:
    torch.manual_seed(0)  # the same run seed, hence the same rollouts, for every trainer
    return dc.lora_trainer(
        model, out, groups_per_epoch=2, group_size=4, batch_size=8, forward_batch=forward_batch, memory_budget_gb=budget
    )


def _pass_peak(trainer: GRPOTrainer) -> tuple[int, dict[str, torch.Tensor], float]:
    """Live bytes plus the peak of one training pass on the trainer's first rollouts; the trained LoRA weights."""
    batch = trainer.collect(epoch=0)
    adv = torch.linspace(-1.5, 1.5, len(batch.row_ids))
    gc.collect()
    live = live_bytes(CPU)
    stats: dict = {}
    peak = peak_bytes(lambda: stats.update(trainer.train_on(batch, adv, 0)), CPU)
    weights = {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params, strict=True)}
    return live + peak, weights, stats["forward_batch"]


def test_auto_chooses_the_most_rows_whose_pass_fits_and_trains_as_that_count_does(klein: dict, tmp_path: Path) -> None:
    budget_gb = float(torch.empty(()).uniform_(0.010, 0.016))  # a few rows of the tiny model at 64x64
    auto = _trainer(klein, tmp_path / "auto", "auto", budget_gb)
    assert auto.forward_batch is None
    _, auto_weights, logged = _pass_peak(auto)
    k = auto.forward_batch
    assert logged == k and 1 <= k < 16  # 8 samples x 2 trained steps in a micro-batch
    del auto
    peak_k, fixed_weights, _ = _pass_peak(_trainer(klein, tmp_path / "k", k))
    peak_more, _, _ = _pass_peak(_trainer(klein, tmp_path / "k1", k + 1))
    assert peak_k <= budget_gb * 1e9, (k, peak_k)
    assert peak_more > HEADROOM * budget_gb * 1e9, (k, peak_more)  # one more row would not have been planned
    # the probe passes (weight 0, gradients dropped) leave the update what the same count by hand gives
    for name, w in fixed_weights.items():
        assert torch.equal(auto_weights[name], w), name


def test_the_chosen_count_is_kept_by_checkpoints_and_resumes(klein: dict, tmp_path: Path) -> None:
    trainer = _trainer(klein, tmp_path / "run", "auto", 0.012)
    trainer.run()
    chosen = trainer.forward_batch
    assert chosen is not None
    cfg = config_to_dict(trainer.cfg)
    cfg["train"]["epochs"] = 2
    resumed = GRPOTrainer(config_from_dict(cfg), tmp_path / "run", resume=tmp_path / "run")
    assert resumed.forward_batch == chosen  # read from the checkpoint, not measured again


def test_bad_budgets_are_one_sentence(klein: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="forward_batch: auto on a cpu device needs train.memory_budget_gb"):
        _trainer(klein, tmp_path / "none", "auto")
    with pytest.raises(UserError, match=r"config key 'train.memory_budget_gb' must be > 0, got -1"):
        _trainer(klein, tmp_path / "neg", "auto", -1.0)
    with pytest.raises(UserError, match=r"config key 'train.forward_batch' must be an integer or 'auto'|one of 'auto'"):
        _trainer(klein, tmp_path / "word", "most")
    # a budget so small that not even the rollouts' decode fits stops the trainer's set-up, naming decode_batch
    with pytest.raises(UserError, match="VAE decode of 8 images at once .* lower model option 'decode_batch'"):
        _trainer(klein, tmp_path / "tiny", "auto", 1e-6)
    # the same budget set after the set-up's decode check: the training pass's own sentence
    tiny = _trainer(klein, tmp_path / "tiny_pass", "auto", 100.0)
    tiny.cfg.train.memory_budget_gb = 1e-6
    batch = tiny.collect(epoch=0)
    with pytest.raises(UserError, match="more than 95% of the budget of 1.00 kB: raise train.memory_budget_gb"):
        tiny.train_on(batch, torch.ones(len(batch.row_ids)), 0)
