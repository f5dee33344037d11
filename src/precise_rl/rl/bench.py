"""``precise-rl bench``: rollout and training speed and peak memory of a real architecture with random weights.

Each case builds the model of a shipped config (:func:`precise_rl.policies.random_pipeline.random_pipeline`:
transformer and VAE at full size, or ``width_scale`` times narrower, random weights; prompts as cached
random conditioning of the text encoders' shapes, the text encoders never built), hands it to the
:class:`~precise_rl.rl.trainer.Trainer` as a task of its own and times the trainer's own stages on it:
the rollout (:meth:`Trainer.collect`: sampler, decode, reward) and scoring, then the training pass
(:meth:`Trainer.train_on`: one optimizer step over the epoch's images). Nothing is mocked: these
are the stages a run executes.

The first ``warmup`` epochs are not timed (CUDA kernels' first launch, the allocator's growth,
``forward_batch: auto``'s probe). Peak memory is the device's: ``torch.cuda.max_memory_allocated`` on a
GPU, the process's peak resident memory on the CPU (``VmHWM``, reset per case through
``/proc/self/clear_refs``), both over the timed epochs and the model build.

A case is (training, memory options): ``lora`` or ``full`` (every transformer weight, in float32), and
memory options ``off`` or ``on`` (:data:`MEMORY_ON`). One model is alive at a time: each case builds
its own and frees it before the next.
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .memory import GB

__all__ = [
    "BenchSettings",
    "BenchRow",
    "MEMORY_ON",
    "MEMORY_ON_TRAIN",
    "bench_config",
    "run_bench",
    "bench_table",
    "write_results",
    "peak_rss_bytes",
    "reset_peak_rss",
]

#: the adapter's memory options of ``memory: on`` (``offload_vae`` keeps the VAE off the device but for decoding)
MEMORY_ON = {"gradient_checkpointing": True, "offload_vae": True}
#: the ``train:`` memory options of ``memory: on`` (and ``reference_on_cpu`` for a full fine-tune with a KL term)
MEMORY_ON_TRAIN: dict[str, Any] = {"latents_on_cpu": True, "latents_dtype": "bfloat16"}
TRAININGS = ("lora", "full")
MEMORIES = ("off", "on")


@dataclass(frozen=True)
class BenchSettings:
    """What one bench measures (the CLI's options)."""

    models: tuple[str, ...] = ("flux2_klein_4b",)
    device: str = "cuda"
    dtype: str = "bfloat16"
    resolution: int = 512
    sampler: str = "precise"
    steps: int = 10
    groups: int = 2
    group_size: int = 4
    #: (sample, step) rows per training forward: an integer, 0 (a whole micro-batch) or ``auto``
    forward_batch: int | str = "auto"
    memory_budget_gb: float | None = None
    lora_rank: int = 32
    #: GRPO's KL weight to the initial weights (a full fine-tune then keeps a frozen copy of them)
    kl_beta: float = 0.0
    max_sequence_length: int | None = None
    width_scale: int = 1
    trainings: tuple[str, ...] = TRAININGS
    memories: tuple[str, ...] = MEMORIES
    warmup: int = 1
    repeats: int = 1
    seed: int = 0

    def check(self) -> None:
        for name in ("resolution", "steps", "groups", "group_size", "lora_rank", "width_scale", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"bench option --{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.warmup < 0:
            raise UserError(f"bench option --warmup must be >= 0, got {self.warmup!r}")
        bad = [t for t in self.trainings if t not in TRAININGS] + [m for m in self.memories if m not in MEMORIES]
        if bad:
            raise UserError(f"bench option {bad[0]!r} is none of {', '.join(TRAININGS + MEMORIES)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("bench --device cuda needs a CUDA GPU, and this machine has none (use --device cpu)")


@dataclass
class BenchRow:
    """One case's measurements (seconds and bytes), as the JSON holds them."""

    model: str
    training: str
    memory_options: str
    device: str
    device_name: str
    count: int
    dtype: str
    width_scale: int
    resolution: int
    sampler: str
    steps: int
    images_per_step: int
    rollout_s: float
    train_s: float
    peak_memory_bytes: int
    #: what the peak measures: ``max_memory_allocated`` (GPU) or ``peak RSS`` (CPU)
    peak_memory_kind: str
    build_s: float
    #: the peak of each stage: the build (model and trainer), the rollouts with their scoring, the training step
    build_peak_bytes: int
    rollout_peak_bytes: int
    train_peak_bytes: int
    forward_batch: int
    trainable_parameters: int
    error: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds_per_step(self) -> float:
        return self.rollout_s + self.train_s

    def derived(self) -> dict[str, float]:
        n, s = self.images_per_step, self.seconds_per_step
        return {
            "seconds_per_step": s,
            "images_per_device_per_s": n / s / self.count if s > 0 else math.nan,
            "rollout_images_per_s": n / self.rollout_s if self.rollout_s > 0 else math.nan,
            "train_s_per_image": self.train_s / n,
            "peak_memory_gb": self.peak_memory_bytes / GB,
        }


# ---------------------------------------------------------------------- peak memory


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (Linux ``VmHWM``) to the current one; False where it cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident memory since the last :func:`reset_peak_rss` (or its start), in bytes."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class _Peak:
    """The device's peak memory over a stretch of work (see the module's docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS"

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_peak_rss():
            self.kind = "peak RSS (since the process started)"

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- one case


def bench_prompts(n: int) -> list[str]:
    """The bench's prompts (their conditioning is random; only their number matters)."""
    return [f"bench prompt {i}" for i in range(n)]


def _train_memory_options(s: BenchSettings, training: str) -> dict[str, Any]:
    extra = {"reference_on_cpu": True} if training == "full" and s.kl_beta > 0 else {}
    return {**MEMORY_ON_TRAIN, **extra}


def bench_config(s: BenchSettings, adapter: str, training: str, memory: str, **train_options: Any) -> Any:
    """The run config of one case: one epoch of ``s.groups`` prompts x ``s.group_size`` images, one optimizer
    step, the JPEG reward (cheap, any image); ``train_options`` added to its ``train:`` section."""
    from ..config import config_from_dict

    train: dict[str, Any] = {
        "groups_per_epoch": s.groups,
        "group_size": s.group_size,
        "rollout_batch_size": s.groups * s.group_size,
        "batch_size": s.groups * s.group_size,  # one optimizer step per epoch
        "forward_batch": s.forward_batch,
        "memory_budget_gb": s.memory_budget_gb,
        "mixed_precision": "bf16" if s.dtype == "bfloat16" else "no",
        "lora": {"enabled": training == "lora", "rank": s.lora_rank, "alpha": s.lora_rank},
        "full_finetune": training == "full",
        "ema": {"enabled": False},
    }
    if memory == "on":
        train.update(_train_memory_options(s, training))
    train.update(train_options)
    return config_from_dict(
        {
            "seed": s.seed,
            "model": {"name": adapter},
            "sampler": {"name": s.sampler, "num_steps": s.steps},
            "reward": {"weights": {"jpeg_incompressibility": 1.0}},
            "algorithm": {"name": "grpo", "kl_beta": s.kl_beta},
            "train": train,
            "eval": {"every": 0},
            "checkpoint": {"every": 0},
            "logging": {"tensorboard": False, "progress": False},
        }
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine() or "cpu"


def run_case(
    s: BenchSettings, model: str, training: str, memory: str, log: Callable[[str], None] = lambda _: None
) -> BenchRow:
    """Build ``model`` and measure one (training, memory options) case; an out-of-memory error is the row's."""
    from ..policies.loading import DTYPES
    from ..policies.random_pipeline import fill_prompt_cache, random_pipeline
    from ..policies.registry import ADAPTERS
    from ..tasks.registry import TaskSpec
    from .dist import make_accelerator
    from .trainer import Trainer

    device = torch.device(s.device)
    peak = _Peak(device)
    dtype = DTYPES[s.dtype]
    options: dict[str, Any] = {
        "height": s.resolution,
        "width": s.resolution,
        "cache_prompts": True,
        "free_text_encoders": True,
        **(MEMORY_ON if memory == "on" else {}),
    }
    if s.max_sequence_length is not None:
        options["max_sequence_length"] = s.max_sequence_length
    row = BenchRow(
        model=model,
        training=training,
        memory_options=memory,
        device=device.type,
        device_name=_device_name(device),
        count=1,
        dtype=s.dtype,
        width_scale=s.width_scale,
        resolution=s.resolution,
        sampler=s.sampler,
        steps=s.steps,
        images_per_step=s.groups * s.group_size,
        rollout_s=math.nan,
        train_s=math.nan,
        peak_memory_bytes=0,
        peak_memory_kind=peak.kind,
        build_s=math.nan,
        build_peak_bytes=0,
        rollout_peak_bytes=0,
        train_peak_bytes=0,
        forward_batch=0,
        trainable_parameters=0,
        options={**options, **(_train_memory_options(s, training) if memory == "on" else {})},
    )
    peak.reset()
    trainer = None
    try:
        t0 = time.perf_counter()
        pipe, adapter = random_pipeline(model, dtype, device, s.width_scale, s.seed)
        policy = ADAPTERS[adapter](pipe, **options)
        prompts = bench_prompts(s.groups)
        fill_prompt_cache(policy, adapter, prompts, s.seed)
        task = TaskSpec(policy, prompts, prompts[:1], default_rewards={"jpeg_incompressibility": 1.0})
        with tempfile.TemporaryDirectory(prefix="precise_rl_bench_") as tmp:
            cfg = bench_config(s, adapter, training, memory)
            trainer = Trainer(
                cfg, tmp, task=task, accelerator=make_accelerator(cfg.train.mixed_precision, cpu=device.type == "cpu")
            )
            _sync(device)
            row.build_s = time.perf_counter() - t0
            row.build_peak_bytes = peak.read()
            row.trainable_parameters = sum(p.numel() for p in trainer.params)
            log(f"{model} {training} memory {memory}: built in {row.build_s:.1f} s")
            rollout, train = [], []
            for epoch in range(s.warmup + s.repeats):
                peak.reset()
                t0 = time.perf_counter()
                batch = trainer.collect(epoch)
                _, targets, _ = trainer.score(batch)
                _sync(device)
                rollout_s = time.perf_counter() - t0
                row.rollout_peak_bytes = max(row.rollout_peak_bytes, peak.read())
                peak.reset()
                t1 = time.perf_counter()
                trainer.train_on(batch, targets, epoch)
                _sync(device)
                t2 = time.perf_counter()
                row.train_peak_bytes = max(row.train_peak_bytes, peak.read())
                del batch, targets
                if epoch >= s.warmup:
                    rollout.append(rollout_s)
                    train.append(t2 - t1)
                log(
                    f"{model} {training} memory {memory}: epoch {epoch} rollout {rollout_s:.2f} s, "
                    f"train {t2 - t1:.2f} s"
                )
            row.rollout_s = sum(rollout) / len(rollout)
            row.train_s = sum(train) / len(train)
            row.forward_batch = int(trainer.forward_batch or 0)
    except torch.cuda.OutOfMemoryError as exc:
        row.error = f"out of memory: {str(exc).splitlines()[0]}"
        row.train_peak_bytes = max(row.train_peak_bytes, peak.read())
    except UserError as exc:  # the budget checks' refusal (forward_batch, decode_batch) is this case's result
        row.error = str(exc)
    finally:
        row.peak_memory_bytes = max(row.build_peak_bytes, row.rollout_peak_bytes, row.train_peak_bytes)
        trainer = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_bench(s: BenchSettings, log: Callable[[str], None] = lambda _: None) -> list[BenchRow]:
    """Every case of every model of ``s``, one model alive at a time."""
    from ..policies.random_pipeline import bench_models

    s.check()
    known = bench_models()
    for m in s.models:
        if m not in known:
            raise UserError(f"bench cannot build model {m!r}; choose from {', '.join(known)}")
    return [run_case(s, m, t, mem, log) for m in s.models for t in s.trainings for mem in s.memories]


# ---------------------------------------------------------------------- output

TABLE_COLUMNS = (
    "model",
    "training",
    "memory options",
    "device",
    "count",
    "images per step",
    "seconds per step",
    "images per device per second",
    "peak memory (GB)",
    "rollout images/s",
    "train s/image",
)


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def bench_table(rows: Sequence[BenchRow]) -> str:
    """The rows as the Markdown table users compare (one line per case)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    for r in rows:
        d = r.derived()
        scale = "" if r.width_scale == 1 else f" (width / {r.width_scale})"
        cells = [
            f"`{r.model}`{scale}",
            r.training,
            r.memory_options,
            r.device_name if r.device == "cuda" else f"CPU ({r.device_name})",
            str(r.count),
            str(r.images_per_step),
            _num(d["seconds_per_step"]),
            _num(d["images_per_device_per_s"], 3),
            _num(d["peak_memory_gb"]) + ("" if r.error is None else " (did not fit)"),
            _num(d["rollout_images_per_s"], 3),
            _num(d["train_s_per_image"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(rows: Sequence[BenchRow], settings: BenchSettings, out_dir: str | Path) -> tuple[Path, Path]:
    """``bench.json`` (settings, and each row with its derived numbers) and ``bench.md`` (the table)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the bench output directory {str(out)!r}: {exc.strerror}") from None
    data = {
        "settings": asdict(settings),
        "torch": torch.__version__,
        "rows": [{**asdict(r), **r.derived()} for r in rows],
    }
    js, md = out / "bench.json", out / "bench.md"
    js.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md.write_text(bench_table(rows) + "\n")
    return js, md
