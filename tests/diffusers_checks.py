"""Checks shared by the tests of the diffusers adapters (text-to-image and editing, first and newer models).

Each helper runs one procedure the adapter tests repeat and asserts what every caller asserts: a GRPO epoch
with LoRA changes only the LoRA weights and leaves the frozen components alone; ``precise-rl sample``'s PNGs
are the trained policy's images; the ODE rollout and diffusers' own pipeline on the same seed and steps;
the trainer's recompute of stored transitions; a CLI error is one line. What a caller compares, and to what
tolerance, stays in the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from precise_rl.cli import sample as sample_cli
from precise_rl.config import config_from_dict
from precise_rl.rl.trainer import GRPOTrainer
from precise_rl.sde import rollout

# ---------------------------------------------------------------------------------------- tiny pipelines


def pipeline_fixtures(name: str, save, kinds: list[str], adapter, options):
    """The module-scoped fixtures ``pipeline_dirs``, each tiny pipeline of ``kinds`` saved by ``save(kind,
    directory)`` under one temporary folder ``name``, and ``policies``, each loaded back by
    ``adapter(kind).from_pretrained`` with ``options(kind)``; a test module binds both to those names."""

    @pytest.fixture(scope="module")
    def pipeline_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        root = tmp_path_factory.mktemp(name)
        return {kind: save(kind, root / kind) for kind in kinds}

    @pytest.fixture(scope="module")
    def policies(pipeline_dirs: dict[str, Path]) -> dict:
        return {kind: adapter(kind).from_pretrained(str(path), **options(kind)) for kind, path in pipeline_dirs.items()}

    return pipeline_dirs, policies


def option_flags(opts: dict, size: bool = True) -> list[str]:
    """``precise-rl sample``'s flags for model options: ``--height`` and ``--width`` (with ``size``), ``--option``
    for the rest."""
    flags = ["--height", str(opts["height"]), "--width", str(opts["width"])] if size else []
    return flags + [f"--option={k}={v}" for k, v in opts.items() if k not in ("height", "width")]


# ---------------------------------------------------------------------------------------- parity


def ode_and_pipeline_images(
    policy, prompts: list, seed: int, steps: int, **call_kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our batched Euler (ODE) rollout decoded, and diffusers' own pipeline called on the same prompts, seed and
    steps with ``call_kwargs`` (``output_type="pt"``)."""
    x1 = policy.sample_noise(len(prompts), generator=torch.Generator().manual_seed(seed))
    traj = rollout(policy.velocity, x1, policy.time_grid(steps), "ode", cond=policy.encode_prompts(prompts))
    ours = policy.decode(traj.sample)
    theirs = policy.pipe(
        prompt=prompts,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **call_kwargs,
    ).images
    return ours, theirs


def check_batched_velocity_is_row_by_row(policy, prompts: list) -> torch.Tensor:
    """One forward of all ``prompts`` (random ``x`` and ``t``) gives each row's own velocity, to 1e-5; returns the
    batched velocity."""
    x = torch.randn(len(prompts), *policy.latent_shape)
    t = torch.rand(len(prompts))
    batched = policy.velocity(x, t, policy.encode_prompts(prompts))
    for i, p in enumerate(prompts):
        row = policy.velocity(x[i : i + 1], t[i : i + 1], policy.encode_prompts([p]))
        torch.testing.assert_close(batched[i : i + 1], row, rtol=0, atol=1e-5)
    return batched


def encode_with_spy(policy, *batches: list[str]) -> tuple[list[list[str]], list]:
    """``policy.encode_prompts`` of each batch in turn, with the pipeline's ``encode_prompt`` spied on; returns
    the prompt lists the pipeline encoded, and each batch's conditioning."""
    seen: list[list[str]] = []
    original = policy.pipe.encode_prompt

    def spy(prompt, **kw):
        seen.append(list(prompt))
        return original(prompt=prompt, **kw)

    policy.pipe.encode_prompt = spy
    try:
        conds = [policy.encode_prompts(batch) for batch in batches]
    finally:
        del policy.pipe.encode_prompt
    return seen, conds


# ---------------------------------------------------------------------------------------- consistency


def perturb_lora_b(trainer: GRPOTrainer, std: float = 0.05) -> None:
    """LoRA B starts at zero: draw it, so that the adapter has a non-trivial effect."""
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)


def recompute_ratio(trainer: GRPOTrainer, batch, steps: list[int]):
    """The trainer's recompute of every (sample, step) pair of ``batch`` at ``steps`` in one batch, in train
    mode without gradients; returns ``(out, ratio, rows, idx)`` with ``ratio = exp(log p_new - log p_rollout)``."""
    rows = torch.arange(len(batch.prompts)).repeat_interleave(len(steps))
    idx = torch.tensor(steps).repeat(len(batch.prompts))
    trainer.model.train()
    with torch.no_grad():
        out = trainer.recompute(batch, rows, idx)
    ratio = torch.exp(out.log_prob - batch.log_probs[rows, idx])
    return out, ratio, rows, idx


# ---------------------------------------------------------------------------------------- training


#: the one GRPO epoch of the training tests: 2 groups of 4 in one batch of 4, a large learning rate
LORA_EPOCH = {"epochs": 1, "group_size": 4, "batch_size": 4, "lr": 1e-2, "clip_range": 0.2}


def lora_trainer(model: dict, out: Path, sampler: str = "precise", prompts: dict | None = None, **train) -> GRPOTrainer:
    """GRPO with LoRA of rank 2 and no EMA on ``sampler`` (3 steps), JPEG incompressibility as the reward, a
    checkpoint each epoch; 2 groups of 2 unless ``train`` (more of the ``train`` section) says otherwise."""
    cfg: dict = {
        "seed": int(torch.randint(0, 1000, ())),
        "model": model,
        "sampler": {"name": sampler, "num_steps": 3},
        "reward": {"weights": {"jpeg_incompressibility": 1.0}},
        "train": {
            "groups_per_epoch": 2,
            "group_size": 2,
            "lora": {"enabled": True, "rank": 2, "alpha": 2},
            "ema": {"enabled": False},
            **train,
        },
        "eval": {"every": 0},
        "checkpoint": {"every": 1},
        "logging": {"tensorboard": False, "progress": False},
    }
    if prompts is not None:
        cfg["prompts"] = prompts
    return GRPOTrainer(config_from_dict(cfg), out)


def bf16_kl_trainer(model: dict, out: Path, prompts: dict | None = None) -> GRPOTrainer:
    """One epoch (2 groups of 2, 3 steps) of bf16 training under bf16 autocast with a KL term and LoRA of rank 2."""
    cfg: dict = {
        "model": {**model, "dtype": "bfloat16"},
        "sampler": {"num_steps": 3},
        "reward": {"weights": {"jpeg_compressibility": 1.0}},
        "train": {
            "epochs": 1,
            "groups_per_epoch": 2,
            "group_size": 2,
            "mixed_precision": "bf16",
            "kl_beta": 0.01,
            "lora": {"enabled": True, "rank": 2, "alpha": 2},
        },
        "eval": {"every": 0},
        "logging": {"tensorboard": False, "progress": False},
    }
    if prompts is not None:
        cfg["prompts"] = prompts
    return GRPOTrainer(config_from_dict(cfg), out)


def _state(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_and_check_only_lora_trains(trainer: GRPOTrainer, frozen: tuple[str, ...], optional: bool = True) -> None:
    """``trainer.run()``; then some parameter changed, every changed one is a LoRA weight (a LoRA B among them),
    and each ``frozen`` component of the pipeline holds the state it had (``optional``: a component the
    pipeline lacks counts as empty; otherwise each must be there)."""
    pipe = trainer.policy.pipe

    def component(name: str) -> torch.nn.Module | None:
        return getattr(pipe, name, None) if optional else getattr(pipe, name)

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    frozen_before = {name: _state(component(name)) for name in frozen}
    trainer.run()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "the update changed no parameter"
    assert all(".lora_A." in n or ".lora_B." in n for n in changed), [n for n in changed if "lora" not in n][:3]
    assert any(".lora_B." in n for n in changed)
    for name in frozen:
        now = _state(component(name))
        assert now.keys() == frozen_before[name].keys(), name
        assert all(torch.equal(now[k], frozen_before[name][k]) for k in now), name


def _read_png(path: Path, height: int, width: int) -> torch.Tensor:
    """A PNG ``precise-rl sample`` wrote (small images enlarged a whole number of times) as ``(3, H, W)``."""
    png = np.asarray(Image.open(path)).astype(np.float32) / 255.0
    assert png.shape[0] % height == 0 and png.shape[1] % width == 0, (png.shape, height, width)
    return torch.from_numpy(png[:: png.shape[0] // height, :: png.shape[1] // width]).permute(2, 0, 1)


def check_samples_are_the_policys(trainer: GRPOTrainer, prompt, directory: Path, seeds=(5, 6), steps: int = 3):
    """What ``precise-rl sample`` wrote to ``directory`` (Precise, ``steps`` steps, ``seeds``) is the trained
    policy's output in memory for ``prompt``: an image's PNG to the PNG's rounding; for a video, the lossless
    strip of its first, middle and last frames to the PNG's rounding, and every frame of its MP4 within
    H.264's rounding (6 levels on average) and nearest to its own frame."""
    from precise_rl.videos import frame_strip, read_mp4

    trainer.model.eval()
    grid = trainer.policy.time_grid(steps)
    expected = sample_cli.generate(trainer.policy, prompt, "precise", grid, None, list(seeds))
    for k, seed in enumerate(seeds):
        if expected.ndim == 4:
            want = expected[k]
            written = _read_png(directory / f"precise_seed{seed}.png", *want.shape[1:])
        else:
            want = frame_strip(expected[k])
            written = _read_png(directory / f"precise_seed{seed}_frames.png", *want.shape[1:])
            video, h, w = expected[k], expected.shape[-2], expected.shape[-1]
            back, _ = read_mp4(directory / f"precise_seed{seed}.mp4")
            back = back[:, :, :: back.shape[-2] // h, :: back.shape[-1] // w]  # written enlarged, like the PNGs
            assert back.shape == video.shape
            # random weights decode to pixel-scale noise, the hardest content for H.264: 4.1-4.4 levels
            # on average at the default quality where the smooth videos of tests/test_videos.py keep 4
            assert (back - video).abs().mean() * 255 <= 6.0
            dist = ((back[:, None] - video[None]) ** 2).flatten(2).mean(-1)
            assert dist.argmin(dim=1).tolist() == list(range(video.shape[0]))
        assert written.shape == want.shape
        assert (written - want).abs().max() <= 1.0 / 255 + 1e-6


# ---------------------------------------------------------------------------------------- errors


def one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The captured stderr ends in ``precise-rl COMMAND: error: ...``, the one line that says error (no
    traceback); returns that line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"precise-rl {command}: error: "), err[-3:]
    assert sum("error" in line for line in err) == 1, err  # one line, no traceback
    return err[-1]
