"""``precise-rl`` for the multi-process tests, plus a dump of every process's weights when a run ends.

Launched exactly like the real command (``accelerate launch --config_file ... tests/dist_entry.py
train ...``); when training finishes, process ``k`` writes its own trainable weights and EMA to
``OUTPUT/rank{k}.safetensors``, so that a test can compare what each process holds.
"""

from __future__ import annotations

import sys
from typing import Any

from safetensors.torch import save_file

from precise_rl.cli import main
from precise_rl.rl.trainer import GRPOTrainer

_finish = GRPOTrainer.finish


def _finish_and_dump(self: GRPOTrainer) -> dict[str, Any]:
    tensors = {f"trainable/{n}": t.detach().contiguous().cpu() for n, t in self._trainable_state().items()}
    if self.ema is not None:
        for n, t in self.ema.state_tensors(self.param_names).items():
            tensors[f"ema/{n}"] = t.detach().contiguous().cpu()
    save_file(tensors, str(self.out / f"rank{self.rank}.safetensors"))
    return _finish(self)


GRPOTrainer.finish = _finish_and_dump  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
