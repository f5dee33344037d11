"""Generate images with any sampler: ``precise-rl sample --model ID_OR_PATH --prompt "..." [--sampler precise]``.

``--model`` is a diffusers pipeline directory or hub id of any model ``precise-rl models`` lists (the
adapter is read from its model_index.json) or a built-in model name such as ``digits``.
An editing model (FLUX.1 Kontext, Qwen-Image-Edit) takes each prompt with a source image: ``--image PATH`` for the
``--prompt`` values, or a JSON-lines ``--prompt-file``.
``--model RUN_DIR`` (a run directory of ``precise-rl train``, or one of its checkpoints) draws from
the run's newest EMA weights (its LoRA adapter, or its fully fine-tuned weights), with the run's own
model settings. ``--lora`` loads a LoRA adapter saved by training (an adapter directory, a checkpoint
or a run directory) onto ``--model``. Image ``i`` of a prompt uses seed ``SEED + i`` for its initial noise and its
sampler noise, whatever the batch size; with ``--grid`` every sampler starts from the same noise
and a PNG grid (a row per sampler, a column per seed) is written beside the images.
A video model writes each sample as an H.264 MP4 at the model's frame rate, with a PNG strip of its
first, middle and last frames beside it; its grid shows those strips.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import MAX_BATCH, MAX_STEPS, check_at_most
from ..errors import UserError
from ..sde.samplers import DEFAULT_ETA, SAMPLERS  # the table alone: --help and argument errors import no torch
from .paths import path_arg

if TYPE_CHECKING:
    import torch

__all__ = ["add_arguments", "run", "generate", "resolve_lora_dir", "build_policy"]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        required=True,
        help="pipeline directory, hub id, built-in model name (digits, signs), or a training run directory",
    )
    m.add_argument("--adapter", default=None, help="force the adapter: a model.name of precise-rl models")
    m.add_argument("--revision", default=None, help="hub revision (commit hash) to load")
    m.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU")
    m.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    m.add_argument("--lora", type=path_arg, default=None, help="LoRA adapter, checkpoint or run directory")
    m.add_argument("--height", type=int, default=None, help="image height in pixels (diffusers models)")
    m.add_argument("--width", type=int, default=None, help="image width in pixels (diffusers models)")
    m.add_argument("--guidance-scale", type=float, default=None, help="CFG / guidance weight (model default)")
    m.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="other model option (repeatable)")
    s = p.add_argument_group("sampling")
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    s.add_argument(
        "--prompt-file",
        type=path_arg,
        default=None,
        help="text file, one prompt per line (.jsonl: prompts with images)",
    )
    s.add_argument("--image", type=path_arg, default=None, help="source image of every --prompt (editing models)")
    # Each of these defaults to the run's own setting for --model RUN_DIR (a run is sampled as it trained),
    # else to the value named in its help: None here means "not given".
    s.add_argument(
        "--sampler", default=None, choices=list(SAMPLERS), help="default: the run's sampler (RUN_DIR), else precise"
    )
    s.add_argument(
        "--eta",
        type=float,
        default=None,
        help="noise level (default: the run's eta when sampling with the run's sampler, else the sampler's reference "
        "value)",
    )
    s.add_argument(
        "--schedule",
        default=None,
        choices=["logsnr", "constant"],
        help="precise's schedule (default: the run's, else logsnr)",
    )
    s.add_argument("--steps", type=int, default=None, help="default: the run's sampler.num_steps, else 20")
    s.add_argument(
        "--sigmas",
        default=None,
        choices=["model", "uniform", "shifted"],
        help="time grid, model = its own (default: the run's sampler.grid, else model)",
    )
    s.add_argument("--shift", type=float, default=None, help="shift of --sigmas shifted (default: the run's, else 3)")
    s.add_argument("--num-images", type=int, default=4, help="images per prompt (seeds SEED .. SEED+n-1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8, help="images per batched rollout")
    s.add_argument("--grid", action="store_true", help="also sample with --grid-samplers and write a PNG grid")
    s.add_argument(
        "--grid-samplers",
        type=_csv,
        default=list(SAMPLERS),
        help="comma-separated samplers of the grid (each at its reference eta; --sampler keeps --eta)",
    )
    p.add_argument("--output", "-o", type=path_arg, default=Path("samples"), help="output directory")


def _parse_option(item: str) -> tuple[str, Any]:
    import yaml

    if "=" not in item:
        raise UserError(f"--option {item!r} must look like key=value (e.g. max_sequence_length=256)")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_lora_dir(path: Path) -> Path:
    """An adapter directory from an adapter, checkpoint or run directory."""
    from ..policies.lora import ADAPTER_CONFIG
    from ..rl.checkpoint import latest_checkpoint

    if not path.exists():
        raise UserError(f"--lora {str(path)!r} does not exist")
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if (path / "adapter" / ADAPTER_CONFIG).is_file():
        return path / "adapter"
    ckpt = latest_checkpoint(path)
    if (ckpt / "adapter" / ADAPTER_CONFIG).is_file():
        return ckpt / "adapter"
    raise UserError(
        f"--lora {str(path)!r} holds no LoRA adapter (adapter_config.json): a run trained without LoRA is "
        f"sampled with --model {path}"
    )


def is_run_dir(path: str) -> bool:
    """Whether ``--model`` names a training run (or one of its checkpoints) rather than a model."""
    from ..rl.checkpoint import MANIFEST, list_checkpoints

    p = Path(path)
    return p.is_dir() and (bool(list_checkpoints(p / "checkpoints")) or (p / MANIFEST).is_file())


def is_run_without_checkpoint(path: str) -> bool:
    """Whether ``--model`` names a training run's directory that holds no checkpoint (not a model either)."""
    from ..rl.rundir import MARKER_NAME

    p = Path(path)
    if not p.is_dir() or is_run_dir(path) or (p / "model_index.json").is_file():
        return False
    marked = (p / MARKER_NAME).is_file()
    return marked or (
        (p / "config.yaml").is_file() and ((p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file())
    )


#: what ``precise-rl sample`` draws with when neither the flags nor a run say otherwise
SAMPLING_DEFAULTS = {
    "sampler": "precise",
    "eta": None,
    "schedule": "logsnr",
    "steps": 20,
    "sigmas": "model",
    "shift": 3.0,
}


def sampling_settings(args: argparse.Namespace, run_sampler: Any | None) -> dict[str, Any]:
    """The sampler, eta, schedule, steps and time grid to draw with: the flags given, then the run's, then defaults.

    ``run_sampler``: the ``sampler:`` section of the run sampled (``--model RUN_DIR``), or None. The run's
    eta goes with the run's sampler only: ``--sampler`` naming another one draws at that one's reference eta.
    """
    out = dict(SAMPLING_DEFAULTS)
    if run_sampler is not None:
        out.update(
            sampler=run_sampler.name,
            eta=run_sampler.eta,
            schedule=run_sampler.schedule,
            steps=run_sampler.num_steps,
            sigmas=run_sampler.grid,
            shift=run_sampler.shift,
        )
        if args.sampler is not None and args.sampler != run_sampler.name:
            out["eta"] = None
    given = {k: getattr(args, k) for k in out if getattr(args, k) is not None}
    out.update(given)
    out["from_run"] = sorted(k for k in SAMPLING_DEFAULTS if run_sampler is not None and k not in given)
    return out


def policy_from_run(args: argparse.Namespace, device: torch.device) -> tuple[Any, str, Path, Any]:
    """The policy of a run's newest checkpoint with the weights its evaluations used.

    Returns (policy, adapter, checkpoint, the run's config).

    The model is rebuilt from the run's own config (name, path, revision, options) and made
    trainable as the run made it (LoRA adapters or every weight, float32), then the EMA weights
    (the trained ones without EMA) are loaded by parameter name: a run is sampled as it was evaluated.
    """
    from ..rl import setup, state
    from ..rl.checkpoint import latest_checkpoint
    from ..rl.run_config import resolve_config
    from ..tasks.registry import build_task

    for flag in ("adapter", "revision", "lora"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} does not apply to --model RUN_DIR: the run's checkpoint decides the model")
    ckpt = latest_checkpoint(args.model)
    cfg = resolve_config([], ckpt)
    if args.dtype is not None:
        cfg.model.dtype = args.dtype
    policy = build_task(cfg.model, device).policy
    trainable = setup.trainable_module(policy, cfg)
    state.load_evaluated_weights(ckpt, trainable.names, trainable.params, cfg.train.ema.enabled)
    trainable.module.requires_grad_(False)
    return policy, cfg.model.name, ckpt, cfg


def build_policy(args: argparse.Namespace, device: torch.device) -> tuple[Any, str]:
    """The policy named by ``--model`` / ``--adapter`` with the model options; returns (policy, adapter name)."""
    from ..config import ModelConfig
    from ..policies.diffusers_base import detect_adapter
    from ..tasks.registry import build_task, model_names

    model = args.model
    names = model_names()
    if args.adapter is not None and args.adapter not in names:
        raise UserError(f"--adapter {args.adapter!r} is unknown; choose one of {names}")
    if args.adapter is None and model in names and not Path(model).exists():
        name, path = model, None
    else:
        name = args.adapter or detect_adapter(model, args.revision)
        path = None if model == name else model
    options = dict(_parse_option(o) for o in args.option)
    for flag, key in (("height", "height"), ("width", "width"), ("guidance_scale", "guidance_scale")):
        value = getattr(args, flag)
        if value is not None:
            options[key] = value
    built_in = {"digits": "8x8 images", "signs": "32x128 signs"}
    if name in built_in and options:
        raise UserError(f"the {name} model takes no model options (got {sorted(options)}); it draws {built_in[name]}")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" and name not in built_in else "float32")
    cfg = ModelConfig(name=name, path=path, revision=args.revision, dtype=dtype, options=options)
    return build_task(cfg, device).policy, name


def _slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return (s[:limit] or "prompt").rstrip("_")


def prompt_folders(prompts: list[str]) -> list[str]:
    """One distinct folder name per prompt, readable and stable.

    The slug alone is not one-to-one (punctuation, spacing and case are dropped, long prompts are
    cut at 60 characters), so a prompt whose slug another prompt of the command already took gets
    ``-2``, ``-3``... in the order given: no image overwrites another one's file.
    """
    taken: set[str] = set()
    names = []
    for prompt in prompts:
        base = _slug(prompt)
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}-{k}"
        taken.add(name)
        names.append(name)
    return names


def _device(text: str | None) -> torch.device:
    """The ``--device`` flag as a torch device this build can use; one sentence otherwise."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text!r} is not a device; give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text!r}: this torch build or machine has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {text!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {text!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {text!r} is not supported; give cpu, cuda, cuda:N or mps")
    return device


def generate(
    policy: Any,
    prompt: str,
    sampler: str,
    sigmas: torch.Tensor,
    eta: float | None,
    seeds: list[int],
    batch_size: int = 8,
    schedule: str | None = None,
) -> torch.Tensor:
    """Images ``(len(seeds), C, H, W)`` (videos: ``(len(seeds), F, C, H, W)``) in [0, 1] for one prompt.

    Row ``i`` depends only on ``seeds[i]``.

    The rollouts are training's (:func:`precise_rl.rl.rollouts.sample`): the same seed gives the same image.
    """
    import functools

    import torch

    from ..rl.rollouts import sample
    from ..sde import SAMPLER_TABLE, kernel

    kern = kernel(sampler, sigmas, eta, schedule if SAMPLER_TABLE[sampler].takes_schedule else None)
    device = policy.device
    # A half-precision model runs under autocast, as the recipes train it (train.mixed_precision: bf16):
    # the float32 LoRA weights mix with it, and FLUX.2's timestep is not rounded.
    dtype = getattr(policy, "model_dtype", torch.float32)
    half = dtype in (torch.bfloat16, torch.float16)
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=half)
    images: list[torch.Tensor] = []

    def decode(rows: slice, final: torch.Tensor) -> None:
        images.append(policy.decode(final).float().cpu())

    prompts = [prompt] * len(seeds)
    with torch.no_grad():
        sample(policy, prompts, kern, seeds, chunk=batch_size, autocast=autocast, store=False, on_chunk=decode)
    return torch.cat(images)


def _check_flags(args: argparse.Namespace) -> None:
    """The checks the flags alone allow, before anything heavy is imported (a mistyped flag answers at once)."""
    if args.image is not None and not args.prompt:  # the more telling sentence first
        raise UserError("--image needs a --prompt: the edit to make")
    if not args.prompt and args.prompt_file is None:
        raise UserError("give at least one --prompt (or a --prompt-file)")
    for flag, limit, unit in (
        ("steps", MAX_STEPS, " steps"),
        ("num_images", MAX_BATCH, ""),
        ("batch_size", MAX_BATCH, ""),
    ):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
        if value is not None:
            check_at_most(f"--{flag.replace('_', '-')}", value, limit, unit)
    if args.eta is not None and args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    bad = [s for s in args.grid_samplers if s not in SAMPLERS]
    if bad:
        raise UserError(f"--grid-samplers has unknown sampler {bad[0]!r}; choose from {', '.join(SAMPLERS)}")
    top = 2**63 - args.num_images  # image i uses seed + i, which a torch generator takes up to 2**63 - 1
    if not 0 <= args.seed <= top:
        raise UserError(f"--seed must be in 0..{top} (image i uses seed + i), got {args.seed}")
    out = args.output
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {str(out)!r} is a file; give a directory for the images")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"--output {str(out)!r} cannot be made: {str(blocker)!r} is a file")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    import torch
    from PIL import Image

    from ..images import labelled_grid, save_png
    from ..policies.lora import load_adapter
    from ..rl.threads import resolve_threads, using_threads
    from ..sde import time_grid
    from ..tasks.registry import read_prompt_file
    from ..videos import frame_strip, policy_fps, save_strip, write_mp4

    prompts = list(args.prompt)
    if args.image is not None:  # an editing model's instructions, all on this image
        from ..policies.edit import EditPrompt, check_image_file

        check_image_file(args.image.resolve(), "--image")
        prompts = [EditPrompt(p, args.image.resolve(), "--image") for p in prompts]
    if args.prompt_file is not None:
        prompts += read_prompt_file(args.prompt_file, "--prompt-file")
    if not prompts:
        raise UserError("give at least one --prompt (or a --prompt-file)")
    out = args.output
    device = _device(args.device)
    run_ckpt, run_cfg = None, None
    if is_run_without_checkpoint(args.model):
        raise UserError(
            f"--model {args.model!r} is a training run with no checkpoint yet (its checkpoints/ holds none); sample "
            "it once training has written one (checkpoint.every), or give a model"
        )
    if is_run_dir(args.model):
        lora_dir = None
        policy, adapter, run_ckpt, run_cfg = policy_from_run(args, device)
    else:
        lora_dir = resolve_lora_dir(args.lora) if args.lora is not None else None
        policy, adapter = build_policy(args, device)
    how = sampling_settings(args, run_cfg.sampler if run_cfg is not None else None)
    sampler, steps = how["sampler"], how["steps"]
    policy.check_prompts(prompts)
    if lora_dir is not None:
        policy.transformer = load_adapter(policy.transformer, lora_dir)
    policy.transformer.eval()
    if how["sigmas"] == "shifted" and how["shift"] <= 0:
        raise UserError(f"--shift must be > 0, got {how['shift']}")
    sigmas = time_grid(steps, how["sigmas"], shift=how["shift"], model=policy.time_grid)
    # The thread count the run recorded, or what train.threads: auto picks for this model (one for the
    # built-in model on a CPU): sampling is the same small-tensor work as training.
    threads = resolve_threads(run_cfg.train.threads if run_cfg is not None else "auto", policy, device)

    samplers = [sampler]
    if args.grid:
        samplers += [s for s in args.grid_samplers if s != sampler]
    seeds = [args.seed + i for i in range(args.num_images)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to --output {str(out)!r}: {exc.strerror or exc}") from None
    record: dict[str, Any] = {
        "model": args.model,
        "adapter": adapter,
        "revision": args.revision,
        "lora": str(lora_dir) if lora_dir else None,
        "checkpoint": str(run_ckpt) if run_ckpt else None,
        "steps": steps,
        "grid": how["sigmas"],
        "sigmas": [float(x) for x in sigmas],
        "seeds": seeds,
        "samplers": {
            s: {"eta": how["eta"] if (s == sampler and how["eta"] is not None) else DEFAULT_ETA[s]} for s in samplers
        },
        "schedule": how["schedule"],
        "from_run": how["from_run"],
        "prompts": [],
    }
    from tqdm.auto import tqdm

    # A progress bar on a terminal only (disable=None): a long command should show it is working.
    bar = tqdm(total=len(prompts) * len(samplers), desc="sampling", unit="rollout", disable=None, leave=False)
    written = 0
    for prompt, name in zip(prompts, prompt_folders(prompts), strict=True):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rows, files = [], []
        for s in samplers:
            eta = how["eta"] if s == sampler else None
            try:
                with using_threads(threads):
                    imgs = generate(policy, prompt, s, sigmas, eta, seeds, args.batch_size, how["schedule"])
            except ValueError as exc:
                if isinstance(exc, UserError):
                    raise
                raise UserError(f"sampler {s!r}: {exc}") from None
            scale = max(1, 64 // min(imgs.shape[-2:]))
            if imgs.ndim == 5:  # videos: an MP4 each, and the strip of its first, middle and last frames
                fps = policy_fps(policy)
                record.update(fps=fps, frames=int(imgs.shape[1]))
                for seed, video in zip(seeds, imgs, strict=True):
                    mp4 = write_mp4(video, folder / f"{s}_seed{seed}.mp4", fps, scale=scale)
                    strip = save_strip(video, folder / f"{s}_seed{seed}_frames.png", scale)
                    files += [str(mp4), str(strip)]
                    written += 1
                imgs = torch.stack([frame_strip(v) for v in imgs])
            else:
                for seed, img in zip(seeds, imgs, strict=True):
                    path = folder / f"{s}_seed{seed}.png"
                    save_png(img, path, scale)
                    files.append(str(path))
                    written += 1
            rows.append(imgs)
            bar.update(1)
        entry: dict[str, Any] = {"prompt": prompt, "files": files}
        if getattr(prompt, "image", None) is not None:
            entry["image"] = str(prompt.image)
        if args.grid:
            grid_path = folder / "grid.png"
            scale = max(1, 64 // min(rows[0].shape[-2:]))
            seeds_row = [f"seed {seed}" for seed in seeds]
            grid = labelled_grid(torch.cat(rows), samplers, rows[0].shape[0], scale=scale, col_labels=seeds_row)
            Image.fromarray(grid).save(grid_path)
            entry["grid"] = str(grid_path)
        record["prompts"].append(entry)
    bar.close()
    (out / "samples.json").write_text(json.dumps(record, indent=1))
    grids = " and a sampler grid per prompt" if args.grid else ""
    what = "videos (MP4 and frame strip each)" if "fps" in record else "images"
    eta = record["samplers"][sampler]["eta"]
    whence = " (the run's)" if run_cfg is not None and {"sampler", "steps"} <= set(how["from_run"]) else ""
    print(
        f"wrote {written} {what}{grids} to {out}/ ({adapter}; {sampler} at eta {eta:g}, {steps} steps on the "
        f"{how['sigmas']} grid{whence})"
    )
    return 0
