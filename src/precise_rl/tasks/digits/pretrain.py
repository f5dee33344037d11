"""Regenerate the shipped weights of the ``digits`` task: the flow model and both classifiers.

Everything is seeded and runs with a fixed thread count, so two runs on the same machine write
byte-identical files. The JSON report records the architecture, the data splits, the training
settings and the metrics (no timings, so that it is reproducible too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from .data import STYLES, images_to_latents, ink, ink_statistics, latents_to_images, load_digit_data, split_indices
from .models import ConvClassifier, DigitsFlowNet, FlowNetConfig, MLPClassifier, save_module

__all__ = [
    "PretrainSettings",
    "pretrain_digits",
    "train_flow",
    "train_classifier",
    "evaluate_flow",
    "FLOW_FILE",
    "REWARD_CLASSIFIER_FILE",
    "EVAL_CLASSIFIER_FILE",
    "REPORT_FILE",
]

FLOW_FILE = "digits_flow.safetensors"
REWARD_CLASSIFIER_FILE = "digits_reward_classifier.safetensors"
EVAL_CLASSIFIER_FILE = "digits_eval_classifier.safetensors"
REPORT_FILE = "digits.json"


@dataclass(frozen=True)
class PretrainSettings:
    """Training hyper-parameters of the three networks (the defaults made the shipped files)."""

    flow_steps: int = 2000
    flow_batch: int = 256
    flow_lr: float = 2e-3
    flow_weight_decay: float = 1e-4
    flow_warmup: int = 200
    ema_decay: float = 0.999
    classifier_steps: int = 1500
    classifier_batch: int = 128
    classifier_lr: float = 2e-3
    #: augmentation: Gaussian pixel noise with a std drawn per image from U(0, max): the
    #: classifiers must judge generated samples, which are never exactly clean
    classifier_noise: float = 0.15
    test_fraction: float = 0.2
    eval_steps: int = 10
    eval_samples_per_prompt: int = 100


@contextmanager
def _fixed_threads(threads: int) -> Iterator[None]:
    # float sums are split across threads: a fixed count keeps the bytes reproducible
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_flow(
    net: DigitsFlowNet,
    latents: torch.Tensor,
    cond: torch.Tensor,
    settings: PretrainSettings,
    generator: torch.Generator,
    tick: Callable[[], None] = lambda: None,
) -> tuple[DigitsFlowNet, float]:
    """Rectified-flow training (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``); returns the EMA net, last loss."""
    ema = DigitsFlowNet(net.config)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.flow_lr, weight_decay=settings.flow_weight_decay)
    n = latents.shape[0]
    running = float("nan")
    steps = settings.flow_steps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, settings.flow_lr, min(settings.flow_warmup, steps // 4 + 1))
        idx = torch.randint(n, (settings.flow_batch,), generator=generator)
        x0, c = latents[idx], cond[idx]
        t = torch.rand(settings.flow_batch, generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        tb = t[:, None, None, None]
        xt = (1.0 - tb) * x0 + tb * eps
        loss = F.mse_loss(net(xt, t, c), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # the EMA warms up (decay grows from 0) so that short runs still give a trained model
        decay = min(settings.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1.0 - decay)
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        tick()
    return ema.eval(), running


def train_classifier(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: PretrainSettings,
    generator: torch.Generator,
    tick: Callable[[], None] = lambda: None,
) -> nn.Module:
    """Cross-entropy training on images in [0, 1] with random pixel-noise augmentation."""
    opt = torch.optim.AdamW(net.parameters(), lr=settings.classifier_lr, weight_decay=1e-4)
    n = images.shape[0]
    steps = settings.classifier_steps
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, settings.classifier_lr, min(100, steps // 4 + 1))
        idx = torch.randint(n, (settings.classifier_batch,), generator=generator)
        x = images[idx]
        noise_std = settings.classifier_noise * torch.rand((x.shape[0], 1, 1, 1), generator=generator)
        x = (x + noise_std * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick()
    return net.eval()


@torch.no_grad()
def _accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((net(images).argmax(dim=1) == labels).float().mean())


@torch.no_grad()
def evaluate_flow(
    flow: DigitsFlowNet,
    eval_classifier: nn.Module,
    reward_classifier: nn.Module,
    num_steps: int,
    samples_per_prompt: int,
    seed: int,
) -> dict[str, Any]:
    """Sample every (digit, style) with the ODE at ``num_steps`` uniform steps and score recognition and ink."""
    from ...sde import rollout, uniform_sigmas

    digits = torch.arange(10).repeat_interleave(len(STYLES) * samples_per_prompt)
    styles = torch.arange(len(STYLES)).repeat_interleave(samples_per_prompt).repeat(10)
    cond = torch.stack([digits, styles], dim=1)
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn((cond.shape[0], 1, 8, 8), generator=g)
    traj = rollout(lambda x, t, c: flow(x, t, c), x1, uniform_sigmas(num_steps), sampler="ode", cond=cond)
    images = latents_to_images(traj.sample)
    recognised = (eval_classifier(images).argmax(dim=1) == digits).float()
    reward_recognised = (reward_classifier(images).argmax(dim=1) == digits).float()
    sample_ink = ink(images)
    return {
        "sampler": "ode",
        "num_steps": num_steps,
        "num_samples": int(cond.shape[0]),
        "eval_classifier_recognition": float(recognised.mean()),
        "reward_classifier_recognition": float(reward_recognised.mean()),
        "recognition_by_digit": [float(recognised[digits == d].mean()) for d in range(10)],
        "mean_ink_by_style": {name: float(sample_ink[styles == i].mean()) for i, name in enumerate(STYLES)},
    }


def pretrain_digits(
    output_dir: str | Path,
    seed: int = 0,
    steps: int | None = None,
    classifier_steps: int | None = None,
    threads: int = 1,
    progress: bool = True,
    settings: PretrainSettings | None = None,
) -> dict[str, Any]:
    """Train the flow model and both classifiers from scratch, write them to ``output_dir``, return the report.

    ``steps`` / ``classifier_steps`` override the optimiser steps of the flow model / each
    classifier. The files: ``digits_flow.safetensors``, ``digits_reward_classifier.safetensors``,
    ``digits_eval_classifier.safetensors`` and the report ``digits.json``.
    """
    from tqdm.auto import tqdm

    settings = settings or PretrainSettings()
    overrides: dict[str, Any] = {}
    if steps is not None:
        overrides["flow_steps"] = steps
    if classifier_steps is not None:
        overrides["classifier_steps"] = classifier_steps
    if overrides:
        settings = PretrainSettings(**{**asdict(settings), **overrides})
    for name in ("flow_steps", "classifier_steps"):
        if getattr(settings, name) < 1:
            raise UserError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(settings, name)}")
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    data = load_digit_data()
    # copies: the cached arrays are read-only
    images = torch.tensor(data.images)
    digits = torch.tensor(data.digits)
    cond = torch.stack([digits, torch.tensor(data.styles)], dim=1)
    # the flow model and the reward classifier share one split; the evaluation classifier is
    # trained on another split with another architecture, so it judges independently
    train_idx, test_idx = split_indices(data.digits, seed, settings.test_fraction)
    eval_seed = seed + 1000
    eval_train_idx, eval_test_idx = split_indices(data.digits, eval_seed, settings.test_fraction)
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    etr, ete = torch.from_numpy(eval_train_idx), torch.from_numpy(eval_test_idx)

    total = settings.flow_steps + 2 * settings.classifier_steps
    # the seeds below would otherwise overwrite the caller's global RNG: fork it and restore it after
    with (
        torch.random.fork_rng(devices=[]),
        _fixed_threads(threads),
        tqdm(total=total, desc="pretrain digits", disable=not progress) as bar,
    ):
        tick = lambda: bar.update(1)  # noqa: E731
        torch.manual_seed(seed)
        flow = DigitsFlowNet(FlowNetConfig())
        bar.set_postfix_str("flow model")
        ema, flow_loss = train_flow(
            flow, images_to_latents(images[tr]), cond[tr], settings, torch.Generator().manual_seed(seed), tick
        )

        torch.manual_seed(seed + 1)
        bar.set_postfix_str("reward classifier")
        reward_clf = train_classifier(
            MLPClassifier(), images[tr], digits[tr], settings, torch.Generator().manual_seed(seed + 1), tick
        )
        torch.manual_seed(seed + 2)
        bar.set_postfix_str("evaluation classifier")
        eval_clf = train_classifier(
            ConvClassifier(), images[etr], digits[etr], settings, torch.Generator().manual_seed(seed + 2), tick
        )
        bar.set_postfix_str("evaluating")
        metrics = evaluate_flow(
            ema, eval_clf, reward_clf, settings.eval_steps, settings.eval_samples_per_prompt, seed + 3
        )
        with torch.no_grad():
            x0 = images_to_latents(images[te])
            t = torch.rand(len(te), generator=torch.Generator().manual_seed(seed + 4))
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 5))
            tb = t[:, None, None, None]
            test_loss = float(F.mse_loss(ema((1 - tb) * x0 + tb * eps, t, cond[te]), eps - x0))

    flow_config = asdict(ema.config)
    save_module(ema, out / FLOW_FILE, "digits_flow", flow_config)
    save_module(reward_clf, out / REWARD_CLASSIFIER_FILE, "digits_classifier", reward_clf.config())
    save_module(eval_clf, out / EVAL_CLASSIFIER_FILE, "digits_classifier", eval_clf.config())
    ink_means, ink_stds = ink_statistics()
    report: dict[str, Any] = {
        "format": "precise_rl.digits/1",
        "seed": seed,
        "threads": threads,
        "torch_version": torch.__version__.split("+")[0],
        "settings": asdict(settings),
        "data": {
            "source": "sklearn.datasets.load_digits",
            "num_images": len(data),
            "pixel_scale": "images = pixels / 16 in [0, 1]; latents = 2 * images - 1",
            "style_labels": "ink (mean intensity) terciles within each digit class: thin < plain < bold",
            "ink_mean_by_digit": list(ink_means),
            "ink_std_by_digit": list(ink_stds),
            "split_seed": seed,
            "test_indices": test_idx.tolist(),
            "eval_classifier_split_seed": eval_seed,
            "eval_classifier_test_indices": eval_test_idx.tolist(),
        },
        "flow": {
            "file": FLOW_FILE,
            "config": flow_config,
            "parameters": sum(p.numel() for p in ema.parameters()),
            "train_images": len(train_idx),
            "final_train_loss": flow_loss,
            "test_loss": test_loss,
        },
        "reward_classifier": {
            "file": REWARD_CLASSIFIER_FILE,
            "config": reward_clf.config(),
            "train_images": len(train_idx),
            "test_accuracy": _accuracy(reward_clf, images[te], digits[te]),
        },
        "eval_classifier": {
            "file": EVAL_CLASSIFIER_FILE,
            "config": eval_clf.config(),
            "train_images": len(eval_train_idx),
            "test_accuracy": _accuracy(eval_clf, images[ete], digits[ete]),
        },
        "metrics": metrics,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report
