"""CPU threads: the default digits run with 1, 2 and torch's default number of intra-op threads.

Run with ``python benchmarks/cpu_threads.py`` (``--epochs N`` per run, default 20; ``--repeats R``,
default 3; ``--busy K``, default 2: the busy processes of the loaded half; ``--quick`` for a smoke run).

Each run is ``precise-rl train train.epochs=N train.threads=T`` (the default recipe: digits, GRPO,
precise, evaluated every 10 epochs) in a fresh process, timed from outside (the whole command) and
from inside (``train_elapsed_s``: rollouts, rewards and updates). The thread counts are run
interleaved, ``R`` times each, first on the machine as it is ("quiet": nothing started here; other
jobs may share it, so its load average is printed) and then beside ``K`` processes started here that
spin on a core each ("busy"), stopped at the end. Figures are medians; the ratio is each count's
time over one thread's. The held-out reward after training is printed per run: runs with the same
count give the same numbers; with different counts they may differ where torch splits a reduction
over threads (it did not for the digits model here), which is why a run records its count in
``config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write

ROOT = Path(__file__).resolve().parents[1]

#: the child: one training run of the default recipe, with progress bars and TensorBoard off
CHILD = """
import sys
from precise_rl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _torch_default_threads() -> int:
    """The thread count torch picks by itself in a fresh process on this machine."""
    code = "import torch; print(torch.get_num_threads())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env())
    return int(done.stdout.strip())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's own default, not an inherited setting
        env.pop(var, None)
    return env


def one_run(epochs: int, threads: int, workdir: Path) -> dict[str, float]:
    """Train once with ``threads``; the command's wall-clock, the training seconds and the reward after."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    argv = [
        "train",
        "--output",
        str(out),
        f"train.epochs={epochs}",
        f"train.threads={threads}",
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.every=0",
        "checkpoint.keep=1",
    ]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, capture_output=True, env=_env())
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    recorded = (out / "config.yaml").read_text()
    assert f"threads: {threads}" in recorded, "the run did not record the thread count it was given"
    return {"wall_s": wall, "train_s": float(summary["train_elapsed_s"]), "reward_after": summary["reward_after"]}


def measure(counts: list[int], epochs: int, repeats: int, workdir: Path) -> dict[int, list[dict[str, float]]]:
    """``repeats`` runs of each thread count, interleaved so that a change of load hits every count alike."""
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            runs[n].append(one_run(epochs, n, workdir))
    return runs


def start_busy(k: int) -> list[subprocess.Popen]:
    """``k`` processes that keep a core busy each (stopped by :func:`stop_busy`)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


HEAD = [
    "| machine | threads | training s (median) | x one thread | whole command s (median) | reward after (each run) |",
    "| --- | --- | --- | --- | --- | --- |",
]


def report(label: str, runs: dict[int, list[dict[str, float]]], default: int, load: tuple[float, float]) -> list[str]:
    """Print and return the table rows of one half (``label`` names the machine's state and its load)."""
    one = statistics.median(r["train_s"] for r in runs[1])
    label = f"{label} (load average {load[0]:.1f} before, {load[1]:.1f} after)"
    rows = []
    for n, rs in runs.items():
        train = statistics.median(r["train_s"] for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        rewards = ", ".join(f"{r['reward_after']:.4f}" for r in rs)
        name = f"{n} (torch default)" if n == default else str(n)
        rows.append(f"| {label} | {name} | {train:.2f} | {train / one:.2f}x | {wall:.1f} | {rewards} |")
    print("\n".join(["", *HEAD, *rows]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy processes started for the loaded half")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 repeat: a smoke run")
    args = parser.parse_args()
    epochs, repeats = (2, 1) if args.quick else (args.epochs, args.repeats)
    default = _torch_default_threads()
    counts = sorted({1, 2, default})
    print(
        f"default digits run, {epochs} epochs, {repeats} runs per thread count; {os.cpu_count()} CPUs, "
        f"torch's default {default} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        before = os.getloadavg()[0]
        quiet = measure(counts, epochs, repeats, Path(tmp))
        rows = report("as it was (nothing started here)", quiet, default, (before, os.getloadavg()[0]))
        busy_procs = start_busy(args.busy)
        try:
            time.sleep(2)  # let the spinners take their cores
            before = os.getloadavg()[0]
            busy = measure(counts, epochs, repeats, Path(tmp))
            after = os.getloadavg()[0]
        finally:
            stop_busy(busy_procs)
        rows += report(f"+ {args.busy} busy processes", busy, default, (before, after))
    if not args.quick:
        write("cpu_threads", "\n".join([*HEAD, *rows]))


if __name__ == "__main__":
    main()
