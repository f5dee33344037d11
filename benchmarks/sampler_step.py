"""Cost of one stochastic sampler step beyond the model call.

Run with ``python benchmarks/sampler_step.py`` (``--device cuda`` for a GPU, ``--quick`` for a
smoke run, ``--threads N`` to override torch's default thread count). Two ratios, measured
side by side in one run, per stochastic sampler and tensor size:

(a) ``step / floor``: the batched step as ``rollout`` calls it (sample + log-prob,
    ``step(kern, i, x, v, generator=g, validate=False)``) against its floor, an Euler update
    ``x - d * v`` (one fused ``torch.add``) plus drawing the Gaussian noise with ``torch.randn``.
    Goal: <= 1.5x.
(b) ``per-row / batched``: a loop that, like the reference Flow-GRPO ``sde_step_with_logprob``,
    handles one row at a time and recomputes the schedule (std, coefficients from the sigmas)
    with torch ops on every call, against the batched step. Goal: >= 10x at batch 16 on the
    built-in task's small tensors (reported for the other sizes too).

The three calls are timed interleaved (floor, step, per-row, floor, ...) in blocks, and each
figure is the median over the blocks, so drift on a shared machine hits all three alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from _results import write

from precise_rl.sde import Kernel, kernel, shifted_sigmas, step

SAMPLERS = ("flow_grpo", "dance_grpo", "cps", "precise", "dance_precise")
ETA = {"flow_grpo": 0.7, "dance_grpo": 0.3, "cps": 0.7, "precise": 1.5, "dance_precise": 0.3}
SHAPES: dict[str, tuple[int, ...]] = {
    "latent 8x16x128x128": (8, 16, 128, 128),
    "packed 16x1024x128": (16, 1024, 128),
    "task 16x1x8x8": (16, 1, 8, 8),
}
NUM_STEPS = 10
STEP_INDEX = 4  # a middle step: stochastic for every sampler, t and s away from the ends
FLOOR_GOAL = 1.5
LOOP_GOAL = 10.0
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def per_row_reference_step(
    name: str,
    sigmas: torch.Tensor,
    eta: float,
    i: int,
    x: torch.Tensor,
    v: torch.Tensor,
    generator: torch.Generator | list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row at a time, schedule recomputed from ``sigmas`` with torch ops on every call."""
    samples, log_probs = [], []
    for r in range(x.shape[0]):
        gen = generator[r] if isinstance(generator, list) else generator
        xr, vr = x[r : r + 1], v[r : r + 1]
        t, s = sigmas[i], sigmas[i + 1]
        dt = s - t
        if name in ("flow_grpo", "dance_grpo"):
            if name == "flow_grpo":
                g = torch.sqrt(t / (1 - torch.where(t == 1, sigmas[1], t))) * eta
            else:
                g = torch.full_like(t, eta)
            std = g * torch.sqrt(-dt)
            mean = xr * (1 + g**2 / (2 * t) * dt) + vr * (1 + g**2 * (1 - t) / (2 * t)) * dt
        else:
            if name == "cps":
                std = s * math.sin(eta * math.pi / 2)
                c = torch.sqrt(s**2 - std**2)
            else:
                if name == "precise":
                    rho = (s * (1 - t) / (t * (1 - s))) ** (eta**2 / 2)
                else:
                    rho = torch.exp(-(eta**2 / 2) * (1 / s - 1 / t))
                std = s * torch.sqrt(1 - rho**2)
                c = s * rho
            x0_hat = xr - t * vr
            eps_hat = xr + (1 - t) * vr
            mean = (1 - s) * x0_hat + c * eps_hat
        noise = torch.randn(xr.shape, generator=gen, device=x.device, dtype=x.dtype)
        sample = mean + std * noise
        lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
        samples.append(sample)
        log_probs.append(lp.mean(dim=tuple(range(1, lp.ndim))))
    return torch.cat(samples), torch.cat(log_probs)


def check_agreement(name: str, kern: Kernel, sigmas32: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> float:
    """Max |log-prob difference| between the two implementations given the same per-row noise."""
    seeds = range(x.shape[0])
    out = step(kern, STEP_INDEX, x, v, generator=[torch.Generator(x.device).manual_seed(k) for k in seeds])
    ref_sample, ref_lp = per_row_reference_step(
        name, sigmas32, kern.eta, STEP_INDEX, x, v, [torch.Generator(x.device).manual_seed(k) for k in seeds]
    )
    if not torch.allclose(out.sample, ref_sample, rtol=1e-4, atol=1e-4):
        raise AssertionError(f"{name}: batched and per-row samples differ")
    return float((out.log_prob - ref_lp).abs().max())


def time_interleaved(
    fns: dict[str, Callable[[], object]], sync: Callable[[], None], budget_s: float, min_block_s: float = 2e-3
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved blocks after a warmup."""
    calls = {}
    for key, fn in fns.items():
        for _ in range(3):  # warmup: allocator, caches, lazy init
            fn()
        sync()
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < min_block_s or n < 1:
            fn()
            n += 1
        sync()
        calls[key] = n
    per_call: dict[str, list[float]] = {key: [] for key in fns}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 200):
        for key, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls[key]):
                fn()
            sync()
            per_call[key].append((time.perf_counter() - start) / calls[key])
        rounds += 1
    return {key: statistics.median(values) for key, values in per_call.items()}


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="short timing budget (smoke run)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per (size, sampler) cell")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 2.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    sigmas = shifted_sigmas(NUM_STEPS, 3.0)
    sigmas32 = sigmas.to(device=device, dtype=torch.float32)
    d = float(sigmas[STEP_INDEX] - sigmas[STEP_INDEX + 1])
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"grid shifted(3.0) N={NUM_STEPS}, step {STEP_INDEX}"
    )
    print(
        f"(a) step / floor: step(kern, i, x, v, generator=g, validate=False) vs torch.add(x, v, alpha=-d) + "
        f"torch.randn; goal <= {FLOOR_GOAL}x"
    )
    print(f"(b) per-row / batched: per-row loop recomputing the schedule vs the batched step; goal >= {LOOP_GOAL}x")
    print()
    header = (
        f"{'size':<22}{'sampler':<15}{'floor':>12}{'step':>12}{'per-row':>12}"
        f"{'(a) step/floor':>16}{'(b) per-row/batched':>21}{'|dlogp|':>10}"
    )
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, str], tuple[float, float]] = {}
    rows = ["| tensors | sampler | floor | step | per-row | (a) step / floor | (b) per-row / batched |"]
    rows.append("| --- | --- | --- | --- | --- | --- | --- |")
    for size, shape in SHAPES.items():
        gen = torch.Generator(device).manual_seed(0)
        x = torch.randn(shape, generator=gen, device=device)
        v = torch.randn(shape, generator=gen, device=device)
        for name in SAMPLERS:
            kern = kernel(name, sigmas, ETA[name])
            err = check_agreement(name, kern, sigmas32, x, v)
            g = torch.Generator(device).manual_seed(1)
            times = time_interleaved(
                {
                    "floor": lambda x=x, v=v, g=g: (torch.add(x, v, alpha=-d), torch.randn(x.shape, generator=g)),
                    "step": lambda kern=kern, x=x, v=v, g=g: step(kern, STEP_INDEX, x, v, generator=g, validate=False),
                    "per-row": lambda name=name, x=x, v=v, g=g: per_row_reference_step(
                        name, sigmas32, ETA[name], STEP_INDEX, x, v, g
                    ),
                },
                sync,
                budget,
            )
            ratio_a = times["step"] / times["floor"]
            ratio_b = times["per-row"] / times["step"]
            results[(size, name)] = (ratio_a, ratio_b)
            rows.append(
                f"| {size} | `{name}` | {fmt_time(times['floor']).strip()} | {fmt_time(times['step']).strip()} | "
                f"{fmt_time(times['per-row']).strip()} | {ratio_a:.2f}x | {ratio_b:.1f}x |"
            )
            print(
                f"{size:<22}{name:<15}{fmt_time(times['floor']):>12}{fmt_time(times['step']):>12}"
                f"{fmt_time(times['per-row']):>12}{ratio_a:>15.2f}x{ratio_b:>20.1f}x{err:>10.1e}",
                flush=True,
            )
    print()
    worst = [
        f"| tensors | (a) worst step / floor (goal <= {FLOOR_GOAL}x) "
        f"| (b) worst per-row / batched (goal >= {LOOP_GOAL}x) |"
    ]
    worst.append("| --- | --- | --- |")
    for size in SHAPES:
        worst_a = max(results[(size, n)][0] for n in SAMPLERS)
        worst_b = min(results[(size, n)][1] for n in SAMPLERS)
        met_a = "met" if worst_a <= FLOOR_GOAL else "MISSED"
        goal_b = size.startswith("task")
        met_b = ("met" if worst_b >= LOOP_GOAL else "MISSED") if goal_b else "reported"
        print(
            f"{size:<22} (a) worst step/floor {worst_a:5.2f}x <= {FLOOR_GOAL}x: {met_a:<7} "
            f"(b) worst per-row/batched {worst_b:6.1f}x >= {LOOP_GOAL}x: {met_b}"
        )
        worst.append(f"| {size} | {worst_a:.2f}x ({met_a.lower()}) | {worst_b:.1f}x ({met_b.lower()}) |")
    if not args.quick:
        write("sampler_step", "\n".join([*worst, "", "Each sampler:", "", *rows]), device)


if __name__ == "__main__":
    main()
