"""The KL reference kept on the CPU (``train.reference_on_cpu``) and training at a lower resolution than evaluation
(``eval.height``/``eval.width``): the same numbers as without them, and clear errors where they do not apply."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from precise_rl.config import config_from_dict
from precise_rl.errors import UserError
from precise_rl.policies.flux2 import Flux2KleinPolicy
from precise_rl.rl.trainer import GRPOTrainer
from precise_rl.sde import kernel, rollout

from . import tiny_pipelines as tp
from . import toy_task

toy_task.register()


def _cfg(train: dict | None = None, algorithm: dict | None = None, **sections) -> object:
    data = copy.deepcopy(toy_task.TOY_CONFIG)
    data["train"].update({"epochs": 2, "ema": {"enabled": False}, **(train or {})})
    data["algorithm"].update(algorithm or {})
    data["eval"]["every"] = 0
    data.update(sections)
    return config_from_dict(data)


def test_reference_on_cpu_trains_to_the_same_weights_and_is_moved_only_for_its_forwards(tmp_path: Path) -> None:
    kl = {"kl_beta": float(torch.empty(()).uniform_(0.05, 0.5))}
    kept = GRPOTrainer(_cfg(algorithm=kl), tmp_path / "kept")
    kept.run()
    offloaded = GRPOTrainer(_cfg(train={"reference_on_cpu": True}, algorithm=kl), tmp_path / "offloaded")
    moves: list[str] = []
    ref = offloaded.ref_module
    to = ref.to

    def recording_to(*args, **kwargs):
        moves.append(str(args[0] if args else kwargs.get("device")))
        return to(*args, **kwargs)

    ref.to = recording_to
    offloaded.run()
    for a, b in zip(kept.params, offloaded.params, strict=True):
        assert torch.equal(a, b)
    assert all(p.device.type == "cpu" for p in ref.parameters())
    # each reference forward: to the compute device, then back to the CPU
    assert moves and len(moves) % 2 == 0
    assert moves[0::2] == [str(offloaded.accelerator.device)] * (len(moves) // 2)
    assert moves[1::2] == ["cpu"] * (len(moves) // 2)


def test_reference_on_cpu_is_refused_where_there_is_no_copy() -> None:
    with pytest.raises(UserError, match="reference_on_cpu' is for full fine-tunes"):
        _cfg(train={"reference_on_cpu": True, "lora": {"enabled": True}})


def test_eval_resolution_samples_what_a_model_built_at_it_samples() -> None:
    pipe = tp.flux2_klein_pipeline(seed=int(torch.randint(0, 1000, ())))
    low = Flux2KleinPolicy(pipe, **tp.adapter_options("flux2_klein", height=32, width=32))
    high = Flux2KleinPolicy(pipe, **tp.adapter_options("flux2_klein", height=64, width=48))

    def images(policy: Flux2KleinPolicy) -> torch.Tensor:
        cond = policy.encode_prompts(["a red cube", "a blue ball"])
        kern = kernel("precise", policy.time_grid(3))
        x1 = policy.sample_noise(2, generator=torch.Generator().manual_seed(5))
        traj = rollout(policy.velocity, x1, None, kern, cond=cond, generator=torch.Generator().manual_seed(6))
        return policy.decode(traj.sample)

    before = images(low)
    with low.at_resolution(64, 48):
        assert low.latent_shape == high.latent_shape
        assert torch.equal(low.time_grid(3), high.time_grid(3))
        at_eval = images(low)
    assert at_eval.shape[-2:] == (64, 48)
    assert torch.equal(at_eval, images(high))
    assert (low.height, low.width) == (32, 32)
    assert torch.equal(images(low), before)


def test_eval_resolution_is_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'eval.height' and 'eval.width' go together"):
        _cfg(eval={**toy_task.TOY_CONFIG["eval"], "height": 64})
    pipe = tp.flux2_klein_pipeline()
    policy = Flux2KleinPolicy(pipe, **tp.adapter_options("flux2_klein"))
    with pytest.raises(UserError, match="multiples of"):
        with policy.at_resolution(63, 64):
            pass
    cfg = _cfg(eval={**toy_task.TOY_CONFIG["eval"], "height": 64, "width": 64})
    with pytest.raises(UserError, match="one fixed resolution"):
        GRPOTrainer(cfg, tmp_path)
