"""The GRPO trainer: rollouts with a stochastic sampler, rewards, group advantages, PPO updates.

One epoch: draw ``groups_per_epoch`` prompts and roll each out ``group_size`` times with the
training sampler; score the images; turn the z-scored, weighted rewards into per-group
advantages; then train on every (sample, step) pair of the stochastic steps kept by
``timestep_fraction``, recomputing each step's log-prob from the stored trajectory with the
current parameters. Randomness comes from generators seeded by ``(seed, epoch, process)``, so a
resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config import ExperimentConfig, config_from_dict, config_to_dict
from ..errors import UserError
from ..policies import Policy, index_cond
from ..policies.registry import TaskSpec, build_task, read_prompt_file
from ..rewards.base import RewardSet, combine_rewards, weighted_raw
from ..sde import Kernel, StepOutput, kernel, rollout, sde_window, shifted_sigmas, sliding_window, step, uniform_sigmas
from .checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from .ema import EMA
from .logging import RunLogger
from .lora import adapters_disabled, apply_lora, save_adapter
from .losses import group_advantages, guard_loss, kl_penalty, ppo_clip_loss

__all__ = ["GRPOTrainer", "RolloutBatch", "train_step_indices"]


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def train_step_indices(kern: Kernel, timestep_fraction: float) -> list[int]:
    """The steps trained per trajectory: stochastic ones among the first ``floor(f * N)``."""
    n_train = max(1, math.floor(timestep_fraction * kern.num_steps)) if timestep_fraction < 1 else kern.num_steps
    return [j for j in range(n_train) if bool(kern.stochastic[j])]


@dataclass
class RolloutBatch:
    """One epoch's samples on this process (``B`` rows)."""

    prompts: list[str]
    metadata: list[dict]
    group_ids: torch.Tensor  # (B,) global group index
    cond: Any
    latents: torch.Tensor  # (B, N + 1, ...)
    means: torch.Tensor  # (B, N, ...)
    log_probs: torch.Tensor  # (B, N)
    kernel: Kernel
    images: torch.Tensor


class GRPOTrainer:
    """GRPO on a policy adapter, driven by accelerate. ``run()`` trains and returns the summary."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        output_dir: str | Path,
        resume: str | Path | None = None,
        accelerator: Accelerator | None = None,
        read_only: bool = False,
    ) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision)
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.rank = acc.process_index
        self.world = acc.num_processes
        if cfg.train.groups_per_epoch % self.world:
            raise UserError(
                f"train.groups_per_epoch ({cfg.train.groups_per_epoch}) must be divisible by the number of "
                f"processes ({self.world}) so that every group stays on one process"
            )
        torch.manual_seed(_seed_for(cfg.seed, 0xC0FFEE))

        self.task: TaskSpec = build_task(cfg.model, acc.device)
        self.policy: Policy = self.task.policy
        self.train_prompts = self._prompts(cfg.prompts.train, self.task.train_prompts, "prompts.train")
        self.eval_prompts = self._prompts(cfg.prompts.eval, self.task.eval_prompts, "prompts.eval")
        weights = dict(cfg.reward.weights) or dict(self.task.default_rewards)
        self.reward_weights = weights
        self.rewards = RewardSet(weights, device=acc.device, **cfg.reward.options)
        eval_only = {k: v for k, v in self.task.eval_rewards.items() if k not in weights}
        self.eval_rewards = RewardSet(eval_only, device=acc.device) if eval_only else None

        self._setup_model()
        self.sigmas = self._sigmas(cfg.sampler.num_steps)
        self.base_kernel = kernel(
            cfg.sampler.name,
            self.sigmas,
            cfg.sampler.eta,
            cfg.sampler.schedule if cfg.sampler.name == "precise" else None,
        )
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.elapsed = 0.0
        self.train_elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self.first_eval: dict[str, float] | None = None
        if resume is not None:
            self._resume(resume)
        self.nonfinite_streak = 0
        self.skipped_updates = 0
        self.logger = RunLogger(
            self.out, cfg, enabled=self.is_main and not read_only, resume_epoch=self.epoch if resume else None
        )

    # ------------------------------------------------------------------ set-up

    def _prompts(self, source: str, builtin: Sequence[str], key: str) -> list[str]:
        prompts = list(builtin) if source == "builtin" else read_prompt_file(source, key)
        if not prompts:
            raise UserError(f"config key '{key}' gives no prompts")
        self.policy.check_prompts(prompts)  # a bad prompt fails before any work
        return prompts

    def _sigmas(self, num_steps: int) -> torch.Tensor:
        grid = self.cfg.sampler.grid
        if grid == "uniform":
            return uniform_sigmas(num_steps)
        if grid == "shifted":
            return shifted_sigmas(num_steps, self.cfg.sampler.shift)
        return self.policy.time_grid(num_steps)

    def _setup_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        module = self.policy.transformer
        lcfg = cfg.train.lora
        if lcfg.enabled:
            module = apply_lora(
                module, self.policy.lora_target_modules(), lcfg.rank, lcfg.alpha, lcfg.init, lcfg.dropout
            )
            self.policy.transformer = module
            self.ref_module = None  # the reference policy is the model with adapters off
        else:
            if not cfg.train.full_finetune:
                raise UserError("nothing to train: set train.lora.enabled=true or train.full_finetune=true")
            for p in module.parameters():
                p.requires_grad_(True)
            self.ref_module = None
            if cfg.train.kl_beta > 0:
                import copy

                self.ref_module = copy.deepcopy(module).requires_grad_(False).eval()
        self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise UserError("the model has no trainable parameters")
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        self.model, self.optimizer = acc.prepare(module, self.optimizer)
        self.policy.transformer = self.model
        self.ema = EMA(self.params, t.ema.decay, t.ema.every) if t.ema.enabled else None

    def _eval_context(self):
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    # ------------------------------------------------------------------ rollouts

    def kernel_for_epoch(self, epoch: int) -> Kernel:
        """The training kernel with this epoch's SDE window applied."""
        w = self.cfg.sampler.window
        n = self.base_kernel.num_steps
        if w.size == 0:
            return self.base_kernel
        if w.slide_every:
            mask = sliding_window(n, w.size, epoch, w.slide_every, w.stride)
        else:
            mask = sde_window(n, w.size, w.start)
        return self.base_kernel.with_window(mask)

    def _sample(
        self,
        prompts: list[str],
        kern: Kernel,
        seed: int,
        store: bool = True,
    ) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Roll out ``prompts`` in chunks; returns (cond, latents, means, log_probs)."""
        cond = self.policy.encode_prompts(prompts)
        gen = torch.Generator(device=self.accelerator.device).manual_seed(seed)
        x1 = self.policy.sample_noise(len(prompts), generator=gen)
        chunk = self.cfg.train.rollout_batch_size
        lat, means, lps = [], [], []
        self.model.eval()
        with self.accelerator.autocast():
            for lo in range(0, len(prompts), chunk):
                sl = slice(lo, lo + chunk)
                traj = rollout(
                    self.policy.velocity,
                    x1[sl],
                    None,
                    kern,
                    cond=index_cond(cond, sl),
                    generator=gen,
                    store_means=store,
                )
                lat.append(traj.latents if store else traj.sample)
                if store:
                    means.append(traj.means)
                lps.append(traj.log_probs)
        return cond, torch.cat(lat), (torch.cat(means) if store else None), torch.cat(lps)

    def collect(self, epoch: int) -> RolloutBatch:
        """This process's groups of the epoch, rolled out with the epoch's kernel."""
        cfg = self.cfg.train
        local_groups = cfg.groups_per_epoch // self.world
        # Every process draws the same global prompt list and takes its own groups.
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, epoch, 1))
        chosen = torch.randint(len(self.train_prompts), (cfg.groups_per_epoch,), generator=gen).tolist()
        mine = list(range(self.rank * local_groups, (self.rank + 1) * local_groups))
        prompts = [self.train_prompts[chosen[g]] for g in mine for _ in range(cfg.group_size)]
        group_ids = torch.tensor([g for g in mine for _ in range(cfg.group_size)])
        kern = self.kernel_for_epoch(epoch)
        cond, latents, means, log_probs = self._sample(prompts, kern, _seed_for(self.cfg.seed, epoch, 2, self.rank))
        with torch.no_grad():
            images = self.policy.decode(latents[:, -1])
        metadata = self.task.metadata(prompts)
        return RolloutBatch(prompts, metadata, group_ids, cond, latents, means, log_probs, kern, images)

    def score(self, batch: RolloutBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Reward components, advantages (local rows) and the global raw weighted reward."""
        comps = self.rewards.score(batch.images, batch.prompts, batch.metadata)
        comps = {k: v.detach().float().to(self.accelerator.device) for k, v in comps.items()}
        # z-scores and advantages need the whole epoch's batch: gather across processes.
        gathered = {k: self.accelerator.gather(v) for k, v in comps.items()}
        gids = self.accelerator.gather(batch.group_ids.to(self.accelerator.device))
        combined = combine_rewards(gathered, self.reward_weights)
        t = self.cfg.train
        adv = group_advantages(combined.cpu(), gids.cpu(), t.adv_std, t.adv_clip)
        n = len(batch.prompts)
        local_adv = adv[self.rank * n : (self.rank + 1) * n]
        raw = weighted_raw(gathered, self.reward_weights)
        return gathered, local_adv, raw

    # ------------------------------------------------------------------ training

    def _velocity_rows(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.policy.velocity(x, t, cond)

    def train_on(self, batch: RolloutBatch, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        """Inner epochs of PPO updates on one epoch's samples; returns mean statistics."""
        cfg = self.cfg.train
        acc = self.accelerator
        kern = batch.kernel
        steps = train_step_indices(kern, cfg.timestep_fraction)
        stats: dict[str, list[float]] = defaultdict(list)
        if not steps:
            raise UserError("no stochastic step is trained: check sampler.window and train.timestep_fraction")
        # Groups whose advantages are all zero carry no signal: leave them out of the update.
        groups = torch.unique(batch.group_ids)
        live = [g for g in groups.tolist() if bool((adv[batch.group_ids == g] != 0).any())]
        stats["zero_adv_groups"].append(1.0 - len(live) / max(1, len(groups)))
        rows_all = torch.nonzero(torch.isin(batch.group_ids, torch.tensor(live, dtype=batch.group_ids.dtype))).flatten()
        device = acc.device
        coeffs = kern.on_device(device)
        std_all = coeffs[2]
        guard_all = coeffs[1].abs()
        steps_t = torch.tensor(steps, device=device)
        self.model.train()
        for inner in range(cfg.inner_epochs):
            gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, epoch, 3, self.rank, inner))
            order = rows_all[torch.randperm(len(rows_all), generator=gen)] if len(rows_all) else rows_all
            micro = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            # In multi-process runs every process must take the same number of optimizer steps.
            n_micro = torch.tensor([len(micro)], device=device)
            n_micro = int(acc.gather(n_micro).max()) if self.world > 1 else len(micro)
            for u0 in range(0, n_micro, cfg.grad_accum):
                group = micro[u0 : u0 + cfg.grad_accum]
                total_rows = sum(len(m) for m in group) * len(steps)
                finite = True
                for k, mb in enumerate(group):
                    last = k == len(group) - 1
                    ctx = acc.no_sync(self.model) if (self.world > 1 and not last) else nullcontext()
                    with ctx:
                        finite &= self._micro_step(batch, adv, mb, steps_t, std_all, guard_all, total_rows, stats)
                if not group:  # a process with fewer micro-batches still joins the collective step
                    dummy = sum(p.sum() * 0.0 for p in self.params)
                    acc.backward(dummy)
                gn = acc.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                finite &= bool(torch.isfinite(gn))
                if self.world > 1:
                    flag = torch.tensor([1.0 if finite else 0.0], device=device)
                    finite = bool(acc.gather(flag).min() > 0)
                if not finite:
                    self._skip_update(stats)
                    continue
                self.nonfinite_streak = 0
                stats["grad_norm"].append(float(gn))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                if self.ema is not None:
                    self.ema.step()
        skipped = stats.pop("skipped_updates", [])
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        out["skipped_updates"] = float(len(skipped))
        out["updates"] = float(self.global_step)
        return out

    def _skip_update(self, stats: dict[str, list[float]]) -> None:
        """Drop an update whose loss or gradient is NaN/inf; stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        self.skipped_updates += 1
        stats["skipped_updates"].append(1.0)
        limit = self.cfg.train.max_nonfinite
        if self.nonfinite_streak >= limit:
            ckpts = sorted((self.out / "checkpoints").glob("epoch_*"))
            where = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            raise UserError(
                f"training stopped: {limit} updates in a row had a NaN or infinite loss or gradient "
                f"(train.max_nonfinite); {where}"
            )

    def _micro_step(
        self,
        batch: RolloutBatch,
        adv: torch.Tensor,
        rows: torch.Tensor,
        steps_t: torch.Tensor,
        std_all: torch.Tensor,
        guard_all: torch.Tensor,
        total_rows: int,
        stats: dict[str, list[float]],
    ) -> bool:
        """Forward and backward on every (sample, trained step) pair of ``rows``.

        The pairs go through the model together (``train.forward_batch`` rows at a time), each
        with its own step index: one batched call instead of a loop over timesteps.
        """
        cfg = self.cfg.train
        device = self.accelerator.device
        t_count = len(steps_t)
        sample_all = rows.to(device).repeat_interleave(t_count)
        step_all = steps_t.repeat(len(rows))
        chunk = cfg.forward_batch or len(sample_all)
        finite = True
        for lo in range(0, len(sample_all), chunk):
            sample_idx = sample_all[lo : lo + chunk]
            step_idx = step_all[lo : lo + chunk]
            finite &= self._pairs_step(batch, adv, sample_idx, step_idx, std_all, guard_all, total_rows, stats)
        return finite

    def recompute(self, batch: RolloutBatch, sample_idx: torch.Tensor, step_idx: torch.Tensor) -> StepOutput:
        """Mean and log-prob of the stored transitions ``(sample, step)`` under the current parameters."""
        x_t = batch.latents[sample_idx, step_idx]
        x_s = batch.latents[sample_idx, step_idx + 1]
        sig = batch.kernel.sigmas.to(device=x_t.device, dtype=torch.float32)
        v = self._velocity_rows(x_t, sig[step_idx], index_cond(batch.cond, sample_idx))
        return step(batch.kernel, step_idx, x_t, v, x_s=x_s, validate=False)

    def _pairs_step(
        self,
        batch: RolloutBatch,
        adv: torch.Tensor,
        sample_idx: torch.Tensor,
        step_idx: torch.Tensor,
        std_all: torch.Tensor,
        guard_all: torch.Tensor,
        total_rows: int,
        stats: dict[str, list[float]],
    ) -> bool:
        cfg = self.cfg.train
        device = self.accelerator.device
        old_lp = batch.log_probs[sample_idx, step_idx]
        a = adv.to(device)[sample_idx]
        out = self.recompute(batch, sample_idx, step_idx)
        if cfg.guard:
            old_mean = batch.means[sample_idx, step_idx]
            res = guard_loss(
                out.log_prob, old_lp, a, cfg.clip_range, out.mean, old_mean, std_all[step_idx], guard_all[step_idx]
            )
        else:
            res = ppo_clip_loss(out.log_prob, old_lp, a, cfg.clip_range)
        loss_rows = res.loss
        if cfg.kl_beta > 0:
            with torch.no_grad():
                if self.ref_module is None:
                    with adapters_disabled(self.model):
                        ref = self.recompute(batch, sample_idx, step_idx)
                else:
                    live = self.policy.transformer
                    self.policy.transformer = self.ref_module
                    try:
                        ref = self.recompute(batch, sample_idx, step_idx)
                    finally:
                        self.policy.transformer = live
            kl = kl_penalty(out.mean, ref.mean)
            loss_rows = loss_rows + cfg.kl_beta * kl
            stats["kl_ref"].append(float(kl.detach().mean()))
        loss = loss_rows.sum() / total_rows
        if not bool(torch.isfinite(loss)):
            # Still run backward (zeroed) so that every process joins the same collectives.
            self.accelerator.backward(loss_rows.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0)
            return False
        self.accelerator.backward(loss)
        with torch.no_grad():
            diff = (out.log_prob - old_lp).float()
            stats["loss"].append(float(loss_rows.mean()))
            stats["policy_loss"].append(float(res.loss.mean()))
            stats["clip_frac"].append(float(res.clipped.float().mean()))
            stats["approx_kl"].append(float(0.5 * diff.square().mean()))
            stats["ratio_mean"].append(float(res.ratio.mean()))
            stats["ratio_max_dev"].append(float((res.ratio - 1).abs().max()))
        return True

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, epoch: int, write_grid: bool = True) -> dict[str, float]:
        """Score held-out prompts with the EMA weights, for each evaluation sampler (fixed noise)."""
        e = self.cfg.eval
        prompts_base = self.eval_prompts[: e.max_prompts]
        # Spread prompts over processes: every process scores its share, results are gathered.
        prompts_all = [p for p in prompts_base for _ in range(e.samples_per_prompt)]
        per = math.ceil(len(prompts_all) / self.world)
        mine = prompts_all[self.rank * per : (self.rank + 1) * per]
        out: dict[str, float] = {}
        sigmas = self._sigmas(e.num_steps)
        images_for_grid = None
        with self._eval_context():
            for name in e.samplers:
                sampler = self.cfg.sampler.name if name == "train" else name
                eta = self.cfg.sampler.eta if name == "train" else None
                sched = self.cfg.sampler.schedule if sampler == "precise" else None
                kern = kernel(sampler, sigmas, eta if sampler == self.cfg.sampler.name else None, sched)
                key = "train" if name == "train" else name
                if not mine:
                    continue
                _, latents, _, _ = self._sample(mine, kern, _seed_for(self.cfg.seed, 7, self.rank), store=False)
                with torch.no_grad():
                    images = self.policy.decode(latents)
                meta = self.task.metadata(mine)
                comps = self.rewards.score(images, mine, meta)
                if self.eval_rewards is not None:
                    comps.update(self.eval_rewards.score(images, mine, meta))
                comps = {
                    k: self.accelerator.gather(v.float().to(self.accelerator.device)).cpu() for k, v in comps.items()
                }
                raw = weighted_raw({k: comps[k] for k in self.reward_weights}, self.reward_weights)
                out[f"eval_{key}_reward"] = float(raw.mean())
                for k, v in comps.items():
                    out[f"eval_{key}/{k}"] = float(v.mean())
                if images_for_grid is None:
                    images_for_grid = (images, mine, key)
        if write_grid and images_for_grid is not None and self.is_main:
            images, prompts, key = images_for_grid
            self.logger.sample_grid(images, prompts, epoch, key, self.cfg.eval.grid_prompts, e.samples_per_prompt)
        return out

    # ------------------------------------------------------------------ checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self.param_names, self.params, strict=True)}

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint of the completed epochs (main process only) and prune old ones."""
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return None
        tensors = {"trainable": self._trainable_state(), "rng": {"torch": torch.get_rng_state()}}
        if self.ema is not None:
            tensors["ema"] = self.ema.state_tensors(self.param_names)
        state = {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "ema_steps": self.ema.num_steps if self.ema is not None else 0,
            "elapsed_s": self.elapsed,
            "train_elapsed_s": self.train_elapsed,
            "first_eval": self.first_eval,
            "config": config_to_dict(self.cfg),
            "param_names": self.param_names,
            "lora": self.cfg.train.lora.enabled,
        }

        def write_adapter(directory: Path) -> None:
            if self.cfg.train.lora.enabled:
                with self._eval_context():
                    save_adapter(self.accelerator.unwrap_model(self.model), directory / "adapter")

        root = self.out / "checkpoints"
        path = write_checkpoint(
            root,
            self.epoch,
            tensors,
            state,
            objects={"optimizer": self.optimizer.state_dict()},
            extra=write_adapter,
        )
        prune_checkpoints(root, self.cfg.checkpoint.keep)
        self.accelerator.wait_for_everyone()
        return path

    def _resume(self, resume: str | Path) -> None:
        ckpt = latest_checkpoint(resume)
        tensors, objects, state = read_checkpoint(ckpt)
        saved_cfg = config_from_dict(state["config"])
        if saved_cfg.sampler != self.cfg.sampler or saved_cfg.model != self.cfg.model:
            raise UserError(f"checkpoint {str(ckpt)!r} was made with another model or sampler than this config")
        if state["param_names"] != self.param_names:
            raise UserError(f"checkpoint {str(ckpt)!r} does not hold this model's trainable parameters")
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params, strict=True):
                p.copy_(tensors["trainable"][n])
        if self.ema is not None:
            if "ema" not in tensors:
                raise UserError(f"checkpoint {str(ckpt)!r} has no EMA weights but train.ema.enabled is true")
            self.ema.load_state_tensors(self.param_names, tensors["ema"], state["ema_steps"])
        try:
            self.optimizer.load_state_dict(objects["optimizer"])
        except (KeyError, ValueError) as exc:
            raise UserError(f"checkpoint {str(ckpt)!r} has an optimizer state that does not fit: {exc}") from None
        torch.set_rng_state(tensors["rng"]["torch"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.elapsed = float(state["elapsed_s"])
        self.train_elapsed = float(state["train_elapsed_s"])
        self.first_eval = state.get("first_eval")
        self.resumed_from = ckpt

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train until ``train.epochs``; write metrics, plots, checkpoints and ``summary.json``."""
        cfg = self.cfg
        total = cfg.train.epochs
        e_every = cfg.eval.every
        if self.epoch == 0 and e_every:
            t0 = time.perf_counter()
            ev = self.evaluate(0)
            self.first_eval = ev
            self.logger.log({"epoch": 0, "elapsed_s": 0.0, "train_elapsed_s": 0.0, **ev})
            self.elapsed += time.perf_counter() - t0
        bar = tqdm(
            range(self.epoch, total),
            initial=self.epoch,
            total=total,
            desc=f"GRPO {cfg.sampler.name}",
            disable=not (self.is_main and cfg.logging.progress),
            dynamic_ncols=True,
        )
        for _ in bar:
            t0 = time.perf_counter()
            epoch = self.epoch
            batch = self.collect(epoch)
            t1 = time.perf_counter()
            comps, adv, raw = self.score(batch)
            t2 = time.perf_counter()
            stats = self.train_on(batch, adv, epoch)
            t3 = time.perf_counter()
            self.epoch += 1
            self.train_elapsed += t3 - t0
            record: dict[str, Any] = {
                "epoch": self.epoch,
                "reward_mean": float(raw.mean()),
                "reward_std": float(raw.std(unbiased=False)),
                **{f"reward/{k}": float(v.mean()) for k, v in comps.items()},
                **stats,
                "time_rollout_s": t1 - t0,
                "time_reward_s": t2 - t1,
                "time_train_s": t3 - t2,
            }
            last = self.epoch == total
            if e_every and (self.epoch % e_every == 0 or last):
                record.update(self.evaluate(self.epoch))
            self.elapsed += time.perf_counter() - t0
            record["elapsed_s"] = self.elapsed
            record["train_elapsed_s"] = self.train_elapsed
            self.logger.log(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
            every = cfg.checkpoint.every
            if last or (every and self.epoch % every == 0):
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        summary = self.logger.finish(self.first_eval)
        return summary


def metrics_lines(path: str | Path) -> list[dict[str, Any]]:
    """Read a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def default_output_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{cfg.sampler.name}-{stamp}-{os.getpid()}"
