"""Regenerate the shipped weights of the ``signs`` task: rectified-flow pretraining on procedural renders.

The data are ``renders_per_word`` renders of each of the 4000 pretraining words (:mod:`.words`,
:mod:`.render`), drawn once from the seed. Training is seeded and runs on a fixed thread count, so two
runs on one machine write byte-identical weights; the learning rate is constant after its warm-up, so
a run of ``N`` steps is the first ``N`` steps of any longer run: the pretraining length (1000 steps)
was chosen on one run scored every 250 steps, for a held-out reward that leaves RL room (the task's
page in the documentation gives the numbers). The report records the settings and the held-out OCR reward of the
result under the ODE sampler, the headroom RL starts from.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UserError
from ..digits.models import save_module
from ..digits.pretrain import _fixed_threads
from .models import SignsFlowNet, SignsNetConfig
from .render import render_signs
from .words import encode_words, eval_words, pretrain_words, rl_words

__all__ = [
    "SignsPretrainSettings",
    "pretrain_signs",
    "train_signs_flow",
    "sample_signs",
    "evaluate_ocr",
    "FLOW_FILE",
    "REPORT_FILE",
    "images_to_latents",
    "latents_to_images",
]

FLOW_FILE = "signs_flow.safetensors"
REPORT_FILE = "signs.json"
#: the time-grid shift the task samples with (the policy's default, as SD3.5's scheduler)
EVAL_TIME_SHIFT = 3.0


@dataclass(frozen=True)
class SignsPretrainSettings:
    """Training hyper-parameters (the defaults made the shipped file)."""

    steps: int = 1000
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.995
    renders_per_word: int = 5
    #: the first this many pretraining words make the data (all 4000 by default; fewer for quick checks)
    num_words: int = 4000
    eval_steps: int = 10
    eval_samples_per_word: int = 4


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` pixels (or floats in [0, 1]) to latents in [-1, 1] (the latents are pixels)."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images * 2.0 - 1.0


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1], clipped: a sample may overshoot the data range slightly."""
    return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def train_signs_flow(
    net: SignsFlowNet,
    images: torch.Tensor,
    chars: torch.Tensor,
    settings: SignsPretrainSettings,
    generator: torch.Generator,
    tick: Callable[[int, SignsFlowNet, float], None] = lambda step, ema, loss: None,
) -> tuple[SignsFlowNet, float]:
    """Rectified flow (``x_t = (1 - t) x0 + t eps``, target ``eps - x0``) on ``uint8`` images; the EMA net, last loss.

    ``tick(step, ema, running_loss)`` is called after every step (progress, intermediate evaluations).
    """
    ema = SignsFlowNet(net.config)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    n = images.shape[0]
    running = float("nan")
    for step in range(settings.steps):
        # constant after the warm-up: a shorter run is the start of a longer one
        for group in opt.param_groups:
            group["lr"] = settings.lr * min(1.0, (step + 1) / settings.warmup)
        idx = torch.randint(n, (settings.batch,), generator=generator)
        x0, c = images_to_latents(images[idx]), chars[idx]
        t = torch.rand(settings.batch, generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        tb = t[:, None, None, None]
        loss = F.mse_loss(net((1.0 - tb) * x0 + tb * eps, t, c), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(settings.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1.0 - decay)
        running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
        tick(step + 1, ema, running)
    return ema.eval(), running


@torch.no_grad()
def sample_signs(
    net: SignsFlowNet, words: list[str] | tuple[str, ...], num_steps: int, seed: int, batch: int = 64
) -> torch.Tensor:
    """ODE samples (images in [0, 1]) of ``words`` on the task's shifted grid, from seeded noise."""
    from ...sde import rollout, shifted_sigmas

    g = torch.Generator().manual_seed(seed)
    cfg = net.config
    noise = torch.randn((len(words), 3, cfg.height, cfg.width_px), generator=g)
    chars = encode_words(words)
    out = []
    sigmas = shifted_sigmas(num_steps, EVAL_TIME_SHIFT)
    for start in range(0, len(words), batch):
        sl = slice(start, start + batch)
        traj = rollout(lambda x, t, c: net(x, t, c), noise[sl], sigmas, sampler="ode", cond=chars[sl])
        out.append(latents_to_images(traj.sample))
    return torch.cat(out)


def evaluate_ocr(
    net: SignsFlowNet, words: list[str] | tuple[str, ...], num_steps: int, samples_per_word: int, seed: int
) -> dict[str, Any]:
    """Mean ``ocr`` reward (recognition alone) and exact reads of ODE samples of ``words``."""
    from ...rewards import build_reward
    from ...rewards.ocr import normalise
    from .words import prompt_for

    reward = build_reward("ocr", detect=False)
    expanded = [w for w in words for _ in range(samples_per_word)]
    images = sample_signs(net, expanded, num_steps, seed)
    prompts = [prompt_for(w) for w in expanded]
    scores = reward(images, prompts, [{} for _ in prompts])["ocr"]
    reads = reward.read(images)
    exact = sum(normalise(r) == normalise(w) for r, w in zip(reads, expanded, strict=True))
    return {"ocr": float(scores.mean()), "exact": exact / len(expanded), "num_samples": len(expanded)}


def build_data(settings: SignsPretrainSettings, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining renders ``(N, 3, 32, 128)`` ``uint8`` and their letter tokens."""
    words = [w for w in pretrain_words()[: settings.num_words] for _ in range(settings.renders_per_word)]
    images = render_signs(words, random.Random(seed))
    return torch.from_numpy(images), encode_words(words)


def pretrain_signs(
    output_dir: str | Path,
    seed: int = 0,
    steps: int | None = None,
    threads: int = 1,
    progress: bool = True,
    settings: SignsPretrainSettings | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train the signs flow model from scratch, write ``signs_flow.safetensors`` and ``signs.json``, return the report.

    ``evaluate`` scores the held-out words with the ``ocr`` reward (needs the ``ocr`` extra).
    """
    from tqdm.auto import tqdm

    settings = settings or SignsPretrainSettings()
    if steps is not None:
        settings = SignsPretrainSettings(**{**asdict(settings), "steps": steps})
    if settings.steps < 1:
        raise UserError(f"steps must be at least 1, got {settings.steps}")
    if not 1 <= settings.num_words <= len(pretrain_words()):
        raise UserError(f"num_words must be between 1 and {len(pretrain_words())}, got {settings.num_words}")
    if threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    with (
        torch.random.fork_rng(devices=[]),
        _fixed_threads(threads),
        tqdm(total=settings.steps, desc="pretrain signs", disable=not progress) as bar,
    ):
        images, chars = build_data(settings, seed)
        torch.manual_seed(seed)
        net = SignsFlowNet(SignsNetConfig())

        def tick(step: int, ema: SignsFlowNet, loss: float) -> None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix_str(f"loss {loss:.4f}")

        ema, loss = train_signs_flow(net, images, chars, settings, torch.Generator().manual_seed(seed), tick)
        metrics: dict[str, Any] = {"sampler": "ode", "num_steps": settings.eval_steps, "time_shift": EVAL_TIME_SHIFT}
        if evaluate:
            held = evaluate_ocr(ema, eval_words(), settings.eval_steps, settings.eval_samples_per_word, seed + 1)
            train = evaluate_ocr(ema, rl_words(), settings.eval_steps, settings.eval_samples_per_word, seed + 2)
            metrics.update(held_out_ocr=held["ocr"], held_out_exact=held["exact"], held_out_samples=held["num_samples"])
            metrics.update(rl_words_ocr=train["ocr"], rl_words_exact=train["exact"])

    config = asdict(ema.config)
    save_module(ema, out / FLOW_FILE, "signs_flow", config)
    report: dict[str, Any] = {
        "format": "precise_rl.signs/1",
        "command": f"precise-rl pretrain signs --seed {seed} --steps {settings.steps} --threads {threads}",
        "seed": seed,
        "threads": threads,
        "torch_version": torch.__version__.split("+")[0],
        "settings": asdict(settings),
        "data": {
            "words": "3-5 capital letters: 4000 pretraining words, 48 held-out evaluation words (tasks/signs/words.py)",
            "renders": int(images.shape[0]),
            "image": "3 x 32 x 128 uint8, DejaVu fonts (precise_rl.tasks.signs.render)",
            "pixel_scale": "latents = pixels / 127.5 - 1",
        },
        "flow": {
            "file": FLOW_FILE,
            "config": config,
            "parameters": ema.num_parameters(),
            "final_train_loss": loss,
        },
        "metrics": metrics,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report
