"""Everything a run writes for people: metrics.jsonl, TensorBoard, wandb, PNG curves and sample grids.

For a video policy the sample grid shows each sample's first, middle and last frames side by side,
and the samples' MP4s are written beside it; TensorBoard gets the grid and the videos as an animated
GIF (see :meth:`RunLogger.sample_grid`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig, config_to_dict
from ..errors import UserError
from ..images import labelled_grid
from ..videos import check_fps, frame_strip, gif_bytes, write_mp4

__all__ = ["RunLogger", "grid_title", "plot_reward_curves", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a last line cut short by a crash is left out)."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    records = []
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if k == len(lines) - 1:
                break
            raise UserError(f"metrics file {str(p)!r} has an unreadable line {k + 1}") from None
    return records


def _is_reward(name: str, reward_names: Sequence[str] | None) -> bool:
    if reward_names is not None:
        return name in reward_names
    from ..rewards.base import _REGISTRY

    return name in _REGISTRY or "@" in name or ":" in name


def _legend_label(name: str) -> str:
    """``name`` as a legend shows it: matplotlib leaves out labels that begin with ``_`` (its mark for
    "no legend entry"), which a reward named by import path (``__main__:ink``) does; quoted, it shows."""
    return f"'{name}'" if name.startswith("_") else name


def plot_reward_curves(
    records: Sequence[dict[str, Any]], path: str | Path, title: str = "", reward_names: Sequence[str] | None = None
) -> None:
    """Training reward (mean of the rollouts) and held-out eval rewards against epochs, as PNG.

    ``reward_names``: the components that are rewards (default: the registered reward names);
    each reward is drawn on an axis of its own, the other ``reward/`` fields together on one more.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if any(k.startswith("eval_") and k.endswith("_reward") for k in r)]
    all_keys = sorted({k for r in train for k in r if k.startswith("reward/")})
    # A reward's extra fields (the raw ink of ink_style, a remote reward's unscored flag) are
    # measurements, not rewards: they get a panel of their own instead of sharing the rewards' axis.
    comp_keys = [k for k in all_keys if _is_reward(k.removeprefix("reward/"), reward_names)]
    extra_keys = [k for k in all_keys if k not in comp_keys]
    # Each reward component on an axis of its own: components live on different scales (a log-prob near
    # 0 beside a score in standard deviations), and a shared axis drew the smaller one as a flat line.
    panels = [([k], f"{_legend_label(k.removeprefix('reward/'))} (train rollouts)") for k in comp_keys]
    if extra_keys:
        panels.append((extra_keys, "other measurements"))
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 4.5 * len(panels), 4), squeeze=False)
    # A line needs two points: short runs get markers, or a one-epoch curve draws nothing.
    style = {"marker": "o", "ms": 4} if len(train) <= 20 else {}
    ax = axes[0, 0]
    if train:
        ax.plot(
            [r["epoch"] for r in train], [r["reward_mean"] for r in train], label="train (rollouts)", lw=1.2, **style
        )
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval_") and k.endswith("_reward")})
    for k in eval_keys:
        pts = [(r["epoch"], r[k]) for r in evals if k in r]
        ax.plot(*zip(*pts, strict=True), marker="o", label=k.removeprefix("eval_").removesuffix("_reward") + " (eval)")
    ax.set_ylabel("weighted reward")
    ax.set_title(title or "reward")
    for axk, (keys, name) in zip(axes[0, 1:], panels, strict=True):
        for k in keys:
            axk.plot(
                [r["epoch"] for r in train],
                [r.get(k, math.nan) for r in train],
                label=_legend_label(k.removeprefix("reward/")),
                **style,
            )
        axk.set_title(name)
    epochs = [r["epoch"] for r in [*train, *evals] if isinstance(r.get("epoch"), int | float)]
    for axk in axes[0]:
        axk.set_xlabel("epoch")
        axk.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole: no tick at 0.25
        if epochs and max(epochs) - min(epochs) < 2:
            # matplotlib pads a single point by a few percent, a range with no whole number but the point
            axk.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        axk.grid(alpha=0.3)
        if axk.lines:
            axk.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_title(epoch: int, protocol: str, sampler: str, eta: float, steps: int, ema: bool) -> str:
    """The heading of an evaluation's sample grid: the epoch, the sampler with its eta and steps, the weights."""
    from ..sde.samplers import SAMPLER_TABLE

    entry = SAMPLER_TABLE.get(sampler)
    how = f"{sampler} (deterministic)" if entry is not None and not entry.stochastic else f"{sampler} at eta {eta:g}"
    weights = "EMA weights" if ema else "trained weights"
    return f"epoch {epoch}: {how}, {steps} steps (protocol {protocol}, {weights})"


class RunLogger:
    """Writes one run directory. Only the main process writes; others get a disabled logger."""

    def __init__(self, out: Path, cfg: ExperimentConfig, enabled: bool = True, resume_epoch: int | None = None) -> None:
        self.out = Path(out)
        self.cfg = cfg
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.metrics_path = self.out / "metrics.jsonl"
        if not enabled:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "samples").mkdir(exist_ok=True)
            # Written aside and renamed into place: a run killed here never leaves a half-written config.yaml,
            # which a resume reads for the user's edits.
            tmp = self.out / "config.yaml.tmp"
            tmp.write_text(_yaml_dump(config_to_dict(cfg)))
            os.replace(tmp, self.out / "config.yaml")
        except OSError as exc:
            raise UserError(f"cannot write to output directory {str(self.out)!r}: {exc.strerror or exc}") from None
        if resume_epoch is not None:
            # Resume repeats the epochs after the checkpoint: drop what was logged beyond it.
            # Written aside and renamed into place: a crash here leaves the old file whole.
            kept = [r for r in read_metrics(self.metrics_path) if r.get("epoch", 0) <= resume_epoch]
            tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            try:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, self.metrics_path)
            except OSError as exc:
                raise UserError(f"cannot write metrics to {str(self.metrics_path)!r}: {exc.strerror or exc}") from None
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self.records = read_metrics(self.metrics_path)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_epoch)
        if cfg.logging.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("logging.wandb is true but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.logging.wandb_project, config=config_to_dict(cfg), dir=str(self.out))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write metrics to {str(self.metrics_path)!r}: {exc.strerror or exc}") from None
        step = int(record.get("epoch", 0))
        if self.tb is not None:
            for k, v in record.items():
                if k != "epoch" and isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def sample_grid(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        epoch: int,
        sampler: str,
        n_prompts: int,
        per_prompt: int,
        fps: int | None = None,
        title: str | None = None,
    ) -> Path | None:
        """PNG of the first ``n_prompts`` eval prompts, ``per_prompt`` samples each (a row per prompt).

        ``title`` heads the grid (what :func:`grid_title` says: the epoch, sampler, eta and steps), so that
        a grid copied out of its run directory still says what it shows.

        Videos ``(B, F, C, H, W)`` (``fps`` required) show as first / middle / last frame strips, and
        each is written as ``epoch_NNNN_<sampler>/prompt<r>_sample<k>.mp4`` beside the PNG.
        """
        if not self.enabled or n_prompts == 0:
            return None
        from PIL import Image

        rows = min(n_prompts, len(prompts) // max(1, per_prompt))
        if rows == 0:
            return None
        imgs = images[: rows * per_prompt]
        scale = max(1, 64 // imgs.shape[-1])
        stem = f"epoch_{epoch:04d}_{sampler}"
        videos = None
        if imgs.ndim == 5:
            videos, imgs = imgs, torch.stack([frame_strip(v) for v in imgs])
            self._write_videos(videos, stem, per_prompt, check_fps(fps, "the fps of a video sample grid"), scale)
        cols = [f"sample {k + 1}" for k in range(per_prompt)]
        grid = labelled_grid(imgs, [prompts[k * per_prompt] for k in range(rows)], per_prompt, scale, cols, title)
        path = self.out / "samples" / f"{stem}.png"
        Image.fromarray(grid).save(path)
        if self.tb is not None:
            self.tb.add_image(f"samples/{sampler}", grid, epoch, dataformats="HWC")
            if videos is not None:
                self._tb_video(f"samples_video/{sampler}", videos, per_prompt, fps, scale, epoch)
        return path

    def _write_videos(self, videos: torch.Tensor, stem: str, per_prompt: int, fps: int, scale: int) -> None:
        folder = self.out / "samples" / stem
        try:
            folder.mkdir(exist_ok=True)
            for k, video in enumerate(videos):
                r, c = divmod(k, per_prompt)
                write_mp4(video, folder / f"prompt{r}_sample{c + 1}.mp4", fps, scale=scale)
        except OSError as exc:
            raise UserError(f"cannot write sample videos to {str(folder)!r}: {exc.strerror or exc}") from None

    def _tb_video(self, tag: str, videos: torch.Tensor, cols: int, fps: int, scale: int, step: int) -> None:
        """The videos tiled (a row per prompt) as one animated GIF in an image summary.

        That is what ``SummaryWriter.add_video`` writes, but torch makes its GIF with
        ``moviepy.editor``, which moviepy 2 no longer has (add_video then prints a line and writes
        nothing); Pillow makes the same GIF here, and TensorBoard's image tab plays it.
        """
        from torch.utils.tensorboard.summary import Summary

        data, h, w = gif_bytes(videos, fps, cols=cols, scale=scale)
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=data)
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def finish(self, first_eval: dict[str, float] | None) -> dict[str, Any]:
        """Write the reward-curve PNG and ``summary.json``; return the summary."""
        if not self.enabled:
            return {}
        records = self.records
        curve = self.out / "reward_curve.png"
        names = list(self.cfg.reward.weights) or None  # {}: the task's default rewards, all registered
        plot_reward_curves(records, curve, title=f"{self.cfg.model.name} / {self.cfg.sampler.name}", reward_names=names)
        train = [r for r in records if "reward_mean" in r]
        evals = [r for r in records if "eval_ode_reward" in r or "eval_own_reward" in r]
        key = "eval_ode_reward" if any("eval_ode_reward" in r for r in evals) else "eval_own_reward"
        summary: dict[str, Any] = {
            "sampler": self.cfg.sampler.name,
            "seed": self.cfg.seed,
            "epochs": train[-1]["epoch"] if train else 0,
            "elapsed_s": records[-1].get("elapsed_s") if records else 0.0,
            "train_elapsed_s": records[-1].get("train_elapsed_s") if records else 0.0,
            "train_reward_first": train[0]["reward_mean"] if train else None,
            "train_reward_last": train[-1]["reward_mean"] if train else None,
            "eval_key": key,
            "reward_before": (first_eval or {}).get(key),
            "reward_after": evals[-1].get(key) if evals else None,
            # both evaluation protocols: own = the training sampler's own rollouts, ode = deterministic
            "protocols": {
                p: {"before": (first_eval or {}).get(f"eval_{p}_reward"), "after": evals[-1].get(f"eval_{p}_reward")}
                for p in ("ode", "own")
                if evals and f"eval_{p}_reward" in evals[-1]
            },
            "final_eval": {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")},
            "reward_curve": str(curve),
            "samples_dir": str(self.out / "samples"),
            "checkpoints_dir": str(self.out / "checkpoints"),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return summary


def _yaml_dump(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
