"""``precise-rl`` for the multi-process tests, plus a dump of every process's weights and optional faults.

Launched exactly like the real command (``accelerate launch --config_file ... tests/dist_entry.py
train ...``); when training finishes, process ``k`` writes its own trainable weights and EMA to
``OUTPUT/rank{k}.safetensors`` (metadata: whether FSDP sharded the weights), so that a test can
compare what each process holds; its metadata also says how the process holds each weight of the model
(a shard or whole, how many of its elements, its dtype) and which modules FSDP sharded as units.

``PRECISE_RL_TEST_FAULTS`` (JSON) injects faults on one process only, to check that every process
takes the same decision:

* ``{"nan_grad": [rank, update]}``: that process's gradient turns NaN just before the clipping of
  its ``update``-th optimizer update (counted from 0 over the run);
* ``{"nan_reward": [rank, call]}``: the first weighted reward returns NaN for every image of that
  process at its ``call``-th scoring (counted from 0; with ``eval.every=0``, the epoch index).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save_file

from precise_rl.cli import main
from precise_rl.rewards.base import Reward
from precise_rl.rl.sharding import is_dtensor, whole
from precise_rl.rl.trainer import GRPOTrainer

_finish = GRPOTrainer.finish
_init = GRPOTrainer.__init__


def _finish_and_dump(self: GRPOTrainer) -> dict[str, Any]:
    tensors = {f"trainable/{n}": t.detach().contiguous().cpu() for n, t in self._trainable_state().items()}
    if self.ema is not None:
        for n, t in self.ema.state_tensors(self.param_names).items():
            tensors[f"ema/{n}"] = whole(t).contiguous().cpu()
    # How this process holds every weight of the model (frozen ones too): a shard or not, its share, its dtype.
    layout = {
        n: {
            "dtensor": is_dtensor(p),
            "local": (p.to_local() if is_dtensor(p) else p).numel(),
            "numel": p.numel(),
            "dtype": str(p.dtype),
            "trainable": p.requires_grad,
        }
        for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
    }
    from torch.distributed.fsdp import FSDPModule

    model = self.accelerator.unwrap_model(self.model)
    meta = {
        "fsdp_units": json.dumps([n for n, m in model.named_modules() if isinstance(m, FSDPModule)]),
        "sharded": str(self._sharded),
        "distributed_type": str(self.accelerator.distributed_type),
        "layout": json.dumps(layout),
        "ema_dtensor": str(self.ema is not None and all(is_dtensor(s) for s in self.ema.shadow)),
    }
    save_file(tensors, str(self.out / f"rank{self.rank}.safetensors"), metadata=meta)
    return _finish(self)


class _NanAt(Reward):
    """A reward that returns NaN for every image at its ``at``-th call."""

    def __init__(self, inner: Reward, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0
        self.name = inner.name
        self.may_fail = getattr(inner, "may_fail", False)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> dict[str, torch.Tensor]:
        out = dict(self.inner(images, prompts, metadata))
        if self.calls == self.at:
            out = {k: torch.full((len(prompts),), math.nan) for k in out}
        self.calls += 1
        return out


def _init_with_faults(self: GRPOTrainer, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    faults = json.loads(os.environ.get("PRECISE_RL_TEST_FAULTS", "{}"))
    if "nan_grad" in faults and faults["nan_grad"][0] == self.rank:
        update = faults["nan_grad"][1]
        clip = self.accelerator.clip_grad_norm_
        calls = [0]

        def poisoned_clip(params: Any, max_norm: float) -> torch.Tensor:
            if calls[0] == update:
                params[0].grad.fill_(math.nan)
            calls[0] += 1
            return clip(params, max_norm)

        self.accelerator.clip_grad_norm_ = poisoned_clip
    if "nan_reward" in faults and faults["nan_reward"][0] == self.rank:
        name = next(iter(self.rewards.rewards))
        self.rewards.rewards[name] = _NanAt(self.rewards.rewards[name], faults["nan_reward"][1])


GRPOTrainer.finish = _finish_and_dump  # type: ignore[method-assign]
GRPOTrainer.__init__ = _init_with_faults  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
