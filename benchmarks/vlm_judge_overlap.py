"""A ``vlm_judge`` epoch with the judge's requests overlapping the rollouts, against scoring after the rollouts.

Run with ``python benchmarks/vlm_judge_overlap.py`` (``--quick`` for a smoke run; ``--latency S`` the judge's
seconds per request, default 0.2; ``--concurrency N`` the requests in flight, default 16; ``--epochs``,
``--chunk`` (``train.rollout_batch_size``), ``--steps`` (``sampler.num_steps``), ``--resolution`` (the side
images are sent at; by default the digits' own 28 pixels, so that the client's encoding, which takes a CPU
core's milliseconds per image at 512, does not compete with the rollouts on a small machine)). Needs the
``judge`` extra.

The judge is the tests' OpenAI-compatible server on loopback (:mod:`tests.judge_server`) answering every
request after a fixed ``--latency``, a scripted UnifiedReward-v2 judgement; the ``openai`` client talks to
it over HTTP. The run is the built-in digits task (64 samples an epoch: 8 groups of 8) trained with
``reward.weights={vlm_judge: 1}``. Two ways of scoring, on the same trainer code:

- overlapped (what the trainer does): each chunk of ``--chunk`` rollouts is sent to the judge as soon as it
  is decoded, and its requests are in flight while the next chunk is sampled;
- after sampling: every chunk's requests are sent only once the whole epoch has been sampled (the requests
  of all chunks then go out together, as many in flight as the concurrency allows).

The table gives, per mode, the median over epochs (the first, a warm-up, left out) of the trainer's own
timings: rollouts (``time_rollout_s``), the wait for the rewards after the rollouts (``time_reward_s``),
the update (``time_train_s``) and their sum, the epoch. Sampling alone is the rollout time. With enough
concurrency the overlapped epoch costs little more than sampling and training alone: the judge's wait
that is left is the last chunk's latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' judge server

from _results import write  # noqa: E402

from precise_rl.config import config_from_dict  # noqa: E402
from precise_rl.rewards import RewardSet  # noqa: E402
from precise_rl.rl.logging import read_metrics  # noqa: E402
from precise_rl.rl.trainer import GRPOTrainer  # noqa: E402
from tests.judge_server import JudgeServer, Reply, brightness_judgement  # noqa: E402


class _AfterSampling:
    """Every chunk's scoring held until a result is asked for, then all chunks' requests sent at once."""

    def __init__(self, rewards: RewardSet, held: list) -> None:
        self.rewards, self.held, self.pending = rewards, held, None

    def start(self, *args: Any, **kwargs: Any) -> _AfterSampling:
        self.args, self.kwargs = args, kwargs
        self.held.append(self)
        return self

    def done(self) -> bool:
        return False

    def result(self) -> Any:
        for chunk in self.held:  # the first result asked for sends every held chunk
            chunk.pending = RewardSet.submit(chunk.rewards, *chunk.args, **chunk.kwargs)
        self.held.clear()
        return self.pending.result()


def run_mode(url: str, mode: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cfg = config_from_dict(
        {
            "reward": {
                "weights": {"vlm_judge": 1.0},
                "options": {"vlm_judge": {"url": url, "concurrency": args.concurrency, "resolution": args.resolution}},
            },
            "sampler": {"num_steps": args.steps},
            "train": {"epochs": args.epochs, "rollout_batch_size": args.chunk},
            "eval": {"every": 0},
            "checkpoint": {"every": 0, "keep": 1},
            "logging": {"tensorboard": False, "progress": False},
        }
    )
    trainer = GRPOTrainer(cfg, out / mode)
    if mode == "after sampling":
        rewards, held = trainer.rewards, []
        trainer.rewards.submit = lambda *a, **k: _AfterSampling(rewards, held).start(*a, **k)
    trainer.run()
    records = [r for r in read_metrics(out / mode / "metrics.jsonl") if "reward_mean" in r][1:]
    keys = ("time_rollout_s", "time_reward_s", "time_train_s")
    row = {k: statistics.median(r[k] for r in records) for k in keys}
    row["epoch_s"] = statistics.median(sum(r[k] for k in keys) for r in records)
    row["unscored"] = sum(r["unscored_samples"] for r in records)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.2, help="the judge's seconds per request")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--chunk", type=int, default=16, help="rollouts sampled and sent together")
    p.add_argument("--steps", type=int, default=100, help="sampler steps (enough that a chunk takes about a latency)")
    p.add_argument("--resolution", type=int, default=None, help="the side images are sent at (default: as sampled, 28)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 epochs")
    args = p.parse_args()
    if args.quick:
        args.epochs = 3
    with JudgeServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.script = lambda seen: Reply(brightness_judgement(seen).text, delay=args.latency)
        rows = {}
        for mode in ("overlapped", "after sampling"):
            t0 = time.perf_counter()
            rows[mode] = run_mode(server.url, mode, args, Path(tmp))
            rows[mode]["run_s"] = time.perf_counter() - t0
    print(
        f"digits, 64 samples an epoch in chunks of {args.chunk}, {args.steps} steps, sent at "
        f"{args.resolution or 28} px; judge latency "
        f"{args.latency * 1000:.0f} ms a request, {args.concurrency} in flight; medians of epochs 2..{args.epochs}"
    )
    print(f"{'mode':<16}{'rollout s':>11}{'reward wait s':>15}{'train s':>9}{'epoch s':>9}{'unscored':>10}")
    for mode, r in rows.items():
        print(
            f"{mode:<16}{r['time_rollout_s']:>11.3f}{r['time_reward_s']:>15.3f}{r['time_train_s']:>9.3f}"
            f"{r['epoch_s']:>9.3f}{r['unscored']:>10d}"
        )
    a, b = rows["overlapped"], rows["after sampling"]
    alone = a["time_rollout_s"] + a["time_train_s"]
    print(
        f"overlapped epoch {a['epoch_s']:.3f} s against {b['epoch_s']:.3f} s scored after sampling; "
        f"sampling and training alone {alone:.3f} s"
    )
    if not args.quick:
        table = ["| scoring | rollout s | reward wait s | update s | epoch s |", "| --- | --- | --- | --- | --- |"]
        for mode, r in rows.items():
            table.append(
                f"| {mode} | {r['time_rollout_s']:.3f} | {r['time_reward_s']:.3f} | {r['time_train_s']:.3f} "
                f"| {r['epoch_s']:.3f} |"
            )
        write(
            "vlm_judge_overlap", "\n".join([*table, "", f"Sampling and update alone (overlapped run): {alone:.3f} s."])
        )


if __name__ == "__main__":
    main()
