"""The GRPO trainer: rollouts with a stochastic sampler, rewards, group advantages, PPO updates.

One epoch: draw ``groups_per_epoch`` prompts and roll each out ``group_size`` times with the
training sampler; score the images; turn the z-scored, weighted rewards into per-group
advantages; then train on every (sample, step) pair of the stochastic steps kept by
``timestep_fraction``, recomputing each step's log-prob from the stored trajectory with the
current parameters. Randomness comes from generators seeded by ``(seed, epoch, sample)``, so a
resumed run repeats exactly what an uninterrupted one does.

Data parallelism (accelerate: DDP, FSDP, several machines). The config describes the global
algorithm and the processes only share the work, so a run gives the same numbers (up to float
rounding) on any number of processes:

* ``groups_per_epoch`` and ``batch_size`` are global. Group ``g`` of an epoch is rolled out
  whole on process ``g % num_processes`` (each group stays on one process), with noise drawn
  from a generator of its own per sample, so a sample does not depend on where it is computed.
* Each chunk of ``rollout_batch_size`` samples is decoded and submitted to the rewards as soon as
  it is rolled out, so that remote rewards score it while the next chunk is rolled out. The
  scores of all chunks are joined, and rewards are gathered from every process *before*
  advantages are computed, in global sample order: the z-scored combination of several rewards
  and ``adv_std: batch`` need statistics of the whole epoch, not of one chunk's or one process's
  share, and a group never has to be split for them.
* Updates follow one global schedule that every process derives alone: samples are visited slot
  by slot (member ``j`` of every trained group, in a fresh random member order per group), cut
  into micro-batches of ``batch_size`` samples and ``grad_accum`` micro-batches per optimizer
  step. Each process computes the (sample, step) pairs of its own samples; its loss is scaled by
  ``num_processes / pairs in the update`` so that the averaged gradient of DDP/FSDP is the mean
  over the whole update. Every process runs the same number of forward/backward passes per
  update (idle ones have weight 0), which FSDP's collectives need.
* Statistics are summed over all processes before they are logged; only the main process writes
  logs and checkpoints; every process resumes from the checkpoint the main process names.

Faults. An update whose loss or gradient is NaN or infinite on any process is skipped on all of
them and counted (``skipped_updates``). An image to which any weighted reward gave NaN or inf
(a remote reward that got no answer, or a broken score) is left out of the advantages and the
update, and counted (``unscored_samples``, ``unscored/<reward>``; a reward not marked ``may_fail``
is named in a warning, once; a reward of weight 0 is only counted in ``unscored/<reward>``); an
epoch in which no image got a finite reward has no update and
counts like a skipped one. After ``train.max_nonfinite`` such updates in a row the run stops,
naming the last checkpoint, which no skipped update touched. A reward that fails on one process
(a server that stays down or refuses the token, a reward that returns the wrong shape or raises any
exception, in training or in an evaluation after training began) stops every process with the same sentence after a
checkpoint of the completed epochs. Errors that one process
alone sees (an unwritable directory, a checkpoint another machine cannot read) are raised on all,
so that none waits in a collective.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config import ExperimentConfig, config_from_dict, config_to_dict
from ..errors import UserError
from ..policies import Policy, index_cond
from ..policies.registry import TaskSpec, build_task, read_prompt_file
from ..rewards.base import RewardSet, combine_rewards, concat_components, weighted_raw
from ..rewards.failures import RewardUnavailable
from ..sde import Kernel, StepOutput, kernel, rollout, sde_window, shifted_sigmas, sliding_window, step, uniform_sigmas
from .checkpoint import (
    MANIFEST,
    CheckpointError,
    check_writable,
    latest_checkpoint,
    list_checkpoints,
    older_checkpoint_hint,
    prune_checkpoints,
    read_checkpoint,
    remove_leftovers,
    write_checkpoint,
)
from .ema import EMA
from .logging import RunLogger
from .lora import adapters_disabled, apply_lora, save_adapter
from .losses import group_advantages, guard_loss, kl_penalty, ppo_clip_loss

__all__ = ["GRPOTrainer", "RolloutBatch", "epoch_prompt_indices", "train_step_indices"]


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter or EMA shadow, gathering FSDP shards (a collective then)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``like``: sharded as ``like`` is when it is an FSDP DTensor, else on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(like.device_mesh.device_type), like.device_mesh, like.placements)
    return whole.to(like.device)


def epoch_prompt_indices(n_prompts: int, per_epoch: int, epoch: int, seed: int, order: str = "shuffled") -> list[int]:
    """The indices of the training prompts that epoch ``epoch`` draws (a function of its arguments alone).

    ``shuffled``: epoch ``e`` takes items ``e * per_epoch ... (e + 1) * per_epoch - 1`` of the endless
    sequence of passes over the prompt set, each pass a fresh permutation seeded by ``(seed, pass)``:
    no prompt repeats before every prompt was drawn, and a resumed run draws what an uninterrupted one
    does. ``random``: ``per_epoch`` independent uniform draws (with replacement).
    """
    if order == "random":
        gen = torch.Generator().manual_seed(_seed_for(seed, epoch, 1))
        return torch.randint(n_prompts, (per_epoch,), generator=gen).tolist()
    lo, hi = epoch * per_epoch, (epoch + 1) * per_epoch
    out: list[int] = []
    for k in range(lo // n_prompts, (hi - 1) // n_prompts + 1):
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(_seed_for(seed, k, 5))).tolist()
        start, stop = max(lo - k * n_prompts, 0), min(hi - k * n_prompts, n_prompts)
        out += perm[start:stop]
    return out


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
    row_ids: torch.Tensor  # (B,) global sample index: group * group_size + member
    cond: Any
    latents: torch.Tensor  # (B, N + 1, ...)
    means: torch.Tensor  # (B, N, ...)
    log_probs: torch.Tensor  # (B, N)
    kernel: Kernel
    images: torch.Tensor
    #: the reward scoring of each rollout chunk, in order, submitted as soon as the chunk was decoded
    #: (``RewardSet.submit``); empty: :meth:`GRPOTrainer.score` scores ``images`` itself
    pending: list[Any] = field(default_factory=list)


class _RewardError(UserError):
    """A reward that erred (a score of the wrong shape, an exception): what :meth:`GRPOTrainer._score_agreed` raises."""


class _FailedSubmit:
    """A chunk whose reward scoring failed as it was submitted: ``result()`` raises that failure.

    The failure is raised where scores are read (in :meth:`GRPOTrainer._score_agreed`), so that every
    process hears of it at the same point instead of one process stopping in the middle of its rollouts.
    """

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def done(self) -> bool:
        return True

    def result(self) -> NoReturn:
        raise self.exc


def _score_sets(
    sets: Sequence[RewardSet], images: torch.Tensor, prompts: list[str], metadata: list[dict]
) -> dict[str, torch.Tensor]:
    """Every component of every reward set on one batch."""
    return {k: v for rewards in sets for k, v in rewards.score(images, prompts, metadata).items()}


class _StatSums:
    """Sums, counts and maxima of per-pair statistics on the device; reduced over processes at the end."""

    MEAN_KEYS = ("loss", "policy_loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref")
    MAX_KEYS = ("ratio_max_dev",)

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2 * len(self.MEAN_KEYS), dtype=torch.float64, device=device)
        self.maxima = torch.full((len(self.MAX_KEYS),), -math.inf, dtype=torch.float64, device=device)

    def add(self, key: str, values: torch.Tensor) -> None:
        i = self.MEAN_KEYS.index(key)
        self.sums[i] += values.detach().double().sum()
        self.sums[len(self.MEAN_KEYS) + i] += values.numel()

    def maximum(self, key: str, values: torch.Tensor) -> None:
        i = self.MAX_KEYS.index(key)
        self.maxima[i] = torch.maximum(self.maxima[i], values.detach().double().max())

    def means(self, accelerator: Accelerator | None = None) -> dict[str, float]:
        """Means over every pair of every process (``accelerator`` given: a collective)."""
        sums, maxima = self.sums, self.maxima
        if accelerator is not None:
            sums = accelerator.reduce(sums.clone(), "sum")
            maxima = accelerator.gather(maxima[None]).amax(dim=0)
        n = len(self.MEAN_KEYS)
        out = {k: float(sums[i] / sums[n + i]) for i, k in enumerate(self.MEAN_KEYS) if sums[n + i] > 0}
        out.update({k: float(maxima[i]) for i, k in enumerate(self.MAX_KEYS) if math.isfinite(maxima[i])})
        return out


def _launched_processes() -> int:
    """The number of processes a launcher started (``WORLD_SIZE``; 1 when unset); UserError when it is no integer."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    try:
        return int(raw)
    except ValueError:
        raise UserError(
            f"the environment variable WORLD_SIZE must be the number of processes (an integer), got {raw!r}"
        ) from None


def _accelerator(mixed_precision: str) -> Accelerator:
    """An ``Accelerator`` with this precision; a single-process state left by an earlier trainer is replaced.

    accelerate keeps one state per process and refuses a second ``Accelerator`` with another mixed precision;
    in a plain (not launched) process that state holds nothing but the precision, so it is reset. Under a
    distributed launch the launcher's state is kept and accelerate's own error stands. As the state is shared,
    an ``Accelerator`` made earlier in the process reports the new precision afterwards (``mixed_precision``).
    """
    from accelerate.state import AcceleratorState, DistributedType

    state = AcceleratorState._shared_state
    if (
        state
        and state.get("distributed_type") == DistributedType.NO
        and state.get("_mixed_precision") != mixed_precision
    ):
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision)


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
        launched = _launched_processes()  # before accelerate, which would fail on it with a traceback
        self.accelerator = accelerator or _accelerator(cfg.train.mixed_precision)
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.rank = acc.process_index
        self.world = acc.num_processes
        if launched > 1 and self.world == 1:
            # Each process would train alone and all would write the same run directory.
            raise UserError(
                f"this process was launched as one of {launched} but accelerate set up a single process "
                f"(distributed type {acc.distributed_type.value}); without GPUs launch with "
                "configs/accelerate/ddp.yaml and ACCELERATE_USE_CPU=true"
            )
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
        options = dict(cfg.reward.options)
        stray = sorted(set(options) - set(weights) - set(cfg.reward.eval_only))
        if stray:
            raise UserError(
                f"options given for rewards {stray} that are neither trained on (reward.weights: {sorted(weights)}) "
                f"nor evaluated (reward.eval_only: {cfg.reward.eval_only})"
            )
        self.rewards = RewardSet(weights, device=acc.device, **{k: v for k, v in options.items() if k in weights})
        # Held-out rewards: the task's own and the config's, scored at evaluation only (weight 1 each, only logged).
        eval_only = {k: 1.0 for k in [*self.task.eval_rewards, *cfg.reward.eval_only] if k not in weights}
        eval_opts = {k: v for k, v in options.items() if k in eval_only}
        self.eval_rewards = RewardSet(eval_only, device=acc.device, **eval_opts) if eval_only else None

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
        self._warned_unscored: set[str] = set()  # rewards already named in a NaN/inf warning
        error = None
        try:
            self.logger = RunLogger(
                self.out, cfg, enabled=self.is_main and not read_only, resume_epoch=self.epoch if resume else None
            )
            if self.is_main and not read_only:
                check_writable(self.out / "checkpoints")
                remove_leftovers(self.out / "checkpoints")  # of a run killed while it wrote or pruned
        except UserError as exc:
            error = str(exc)
        self._agree(error)

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
        # Trainable weights, their gradients and the optimizer state in float32 whatever model.dtype is
        # (the frozen weights stay in it): in bf16, AdamW updates of ~lr = 8e-5 round away on weights
        # of size ~0.1, whose bf16 spacing is ~5e-4. The reference keeps them in float32 too.
        with torch.no_grad():
            for p in self.params:
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        if getattr(self.policy, "model_dtype", torch.float32) != torch.float32 and all(
            p.dtype == torch.float32 for p in module.parameters()
        ):
            self.policy.model_dtype = torch.float32  # every weight is trained: the whole model now runs in float32
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        self.model, self.optimizer = acc.prepare(module, self.optimizer)
        self.policy.transformer = self.model
        # FSDP replaces the parameters while it shards them: take them again from the prepared model.
        named = [(n, p) for n, p in acc.unwrap_model(self.model).named_parameters() if p.requires_grad]
        if [n for n, _ in named] == self.param_names:
            self.params = [p for _, p in named]
        self.ema = EMA(self.params, t.ema.decay, t.ema.every, t.ema.mode, t.grad_accum) if t.ema.enabled else None

    def _agree(self, error: str | None) -> None:
        """Raise ``error`` on every process when any process has one (a collective: all must call it).

        A failure on one process alone (an unwritable directory on the main process, a checkpoint
        another machine cannot read) would otherwise leave the others waiting in a collective.
        """
        if self.world > 1:
            from accelerate.utils import gather_object

            errors = [e for e in gather_object([error]) if e]
            error = errors[0] if errors else None
        if error:
            raise UserError(error)

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
        seeds: Sequence[int],
        store: bool = True,
        on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
    ) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Roll out ``prompts`` in chunks; returns (cond, latents, means, log_probs).

        Row ``i`` draws all its noise (initial latent, then every step) from a generator of its
        own seeded with ``seeds[i]``: a sample is the same whichever process or chunk computes it.
        ``on_chunk(rows, final_latents)`` is called after each chunk, before the next one is rolled out.
        """
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        cond = self.policy.encode_prompts(prompts)
        device = self.accelerator.device
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        x1 = torch.cat([self.policy.sample_noise(1, generator=g) for g in gens])
        chunk = self.cfg.train.rollout_batch_size
        lat, means, lps = [], [], []
        self.model.eval()
        for lo in range(0, len(prompts), chunk):
            sl = slice(lo, min(lo + chunk, len(prompts)))
            with self.accelerator.autocast():
                traj = rollout(
                    self.policy.velocity,
                    x1[sl],
                    None,
                    kern,
                    cond=index_cond(cond, sl),
                    generator=gens[sl],
                    store_means=store,
                )
            lat.append(traj.latents if store else traj.sample)
            if store:
                means.append(traj.means)
            lps.append(traj.log_probs)
            if on_chunk is not None:
                on_chunk(sl, traj.sample)
        return cond, torch.cat(lat), (torch.cat(means) if store else None), torch.cat(lps)

    def collect(self, epoch: int) -> RolloutBatch:
        """This process's groups of the epoch, rolled out with the epoch's kernel.

        Every process draws the same global list of ``groups_per_epoch`` prompts and rolls out
        the groups ``g`` with ``g % num_processes == process index``, each group whole. Each chunk
        of ``rollout_batch_size`` samples is decoded and submitted to the rewards as soon as it is
        rolled out (``batch.pending``): remote rewards score it while the next chunk is rolled out,
        local ones are computed right away. :meth:`score` waits for them.
        """
        cfg = self.cfg.train
        size = cfg.group_size
        chosen = epoch_prompt_indices(
            len(self.train_prompts), cfg.groups_per_epoch, epoch, self.cfg.seed, self.cfg.prompts.order
        )
        mine = list(range(self.rank, cfg.groups_per_epoch, self.world))
        prompts = [self.train_prompts[chosen[g]] for g in mine for _ in range(size)]
        group_ids = torch.tensor([g for g in mine for _ in range(size)])
        row_ids = torch.tensor([g * size + j for g in mine for j in range(size)])
        kern = self.kernel_for_epoch(epoch)
        seeds = [_seed_for(self.cfg.seed, epoch, 2, r) for r in row_ids.tolist()]
        metadata = self.task.metadata(prompts)
        images: list[torch.Tensor] = []
        pending: list[Any] = []

        def submit(rows: slice, final: torch.Tensor) -> None:
            with torch.no_grad():
                images.append(self.policy.decode(final))
            if pending and isinstance(pending[-1], _FailedSubmit):
                return  # the epoch cannot be scored: score() raises the first failure
            try:
                pending.append(self.rewards.submit(images[-1], prompts[rows], metadata[rows]))
            except Exception as exc:  # any failure of a reward stops the run after a checkpoint (see score)
                pending.append(_FailedSubmit(exc))

        cond, latents, means, log_probs = self._sample(prompts, kern, seeds, on_chunk=submit)
        return RolloutBatch(
            prompts, metadata, group_ids, row_ids, cond, latents, means, log_probs, kern, torch.cat(images), pending
        )

    def score(self, batch: RolloutBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Reward components and raw weighted reward of the whole epoch, and this process's advantages.

        Each process scores its own samples; the scores of all processes are gathered, put in
        global sample order and turned into advantages there, so the z-scores and group statistics
        are those of the epoch whatever the number of processes (and however many chunks the
        rollouts were scored in). A sample whose combined reward is NaN (a weighted reward gave it
        NaN or inf: a remote reward got no answer, or a reward failed on it) is left out of its
        group's statistics and gets a NaN advantage, which keeps it out of the update.
        """
        acc = self.accelerator
        if batch.pending:
            comps = self._score_agreed(lambda: concat_components([p.result() for p in batch.pending]))
        else:
            comps = self._score_agreed(lambda: self.rewards.score(batch.images, batch.prompts, batch.metadata))
        comps = self._same_fields(comps, len(batch.row_ids))
        rows = batch.row_ids.to(acc.device)
        if self.world > 1:
            comps = {k: acc.gather(v) for k, v in comps.items()}
            rows = acc.gather(rows)
        order = torch.argsort(rows)
        gathered = {k: v[order].cpu() for k, v in comps.items()}
        rows = rows[order].cpu()
        t = self.cfg.train
        if not torch.equal(rows, torch.arange(t.groups_per_epoch * t.group_size)):
            raise RuntimeError("the processes' samples do not cover the epoch exactly once")
        combined = combine_rewards(gathered, self.reward_weights)
        scored = torch.isfinite(combined)
        adv = torch.full_like(combined, math.nan)
        if bool(scored.any()):
            gids = rows // t.group_size
            adv[scored] = group_advantages(combined[scored], gids[scored], t.adv_std, t.adv_clip)
        raw = weighted_raw(gathered, self.reward_weights)
        return gathered, adv[batch.row_ids], raw

    def _score_agreed(self, scores: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``scores()`` (this process's reward components); a failure on any process is raised on all.

        A reward that stops (``RewardUnavailable``) or errs (``UserError``, e.g. a score of the wrong
        shape, or any other exception, which becomes a ``UserError``) on one process alone would
        otherwise leave the others waiting in the next collective; here every process raises the
        same exception with the same message.
        """
        comps: dict[str, torch.Tensor] = {}
        failure = None
        try:
            comps.update(scores())
        except (RewardUnavailable, UserError) as exc:
            failure = (isinstance(exc, RewardUnavailable), str(exc))
        except Exception as exc:  # not BaseException: an interrupt still stops at once
            lines = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            failure = (False, f"the rewards raised {detail}")
        if self.world > 1:
            from accelerate.utils import gather_object

            failures = [f for f in gather_object([failure]) if f]
            failure = failures[0] if failures else None
        if failure is not None:
            unavailable, message = failure
            raise (RewardUnavailable if unavailable else _RewardError)(message)
        return comps

    def _same_fields(self, comps: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """``comps`` (``n`` images) with the fields of every process, in one order, on the device (a collective).

        A process may lack a field that another has (an extra field of a remote reward whose server
        answered none of this process's requests): it is NaN here, so that every process gathers the
        same fields in the same order.
        """
        device = self.accelerator.device
        keys = list(comps)
        if self.world > 1:
            from accelerate.utils import gather_object

            keys = []
            for part in gather_object([list(comps)]):
                keys += [k for k in part if k not in keys]
        nan = torch.full((n,), math.nan, dtype=torch.float32, device=device)
        return {k: comps[k].detach().float().to(device) if k in comps else nan.clone() for k in keys}

    # ------------------------------------------------------------------ training

    def _velocity_rows(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.policy.velocity(x, t, cond)

    def update_plan(self, batch: RolloutBatch, adv: torch.Tensor, epoch: int, inner: int) -> list[list[torch.Tensor]]:
        """The epoch's optimizer updates for pass ``inner``: each a list of micro-batches of global sample ids.

        Only samples with a finite advantage in a group with some non-zero advantage are trained
        (a group of equal rewards carries no signal). The plan is the same on every process and for
        any number of processes: samples are visited slot by slot (member ``j`` of every trained
        group, in a fresh random member order per group and pass), ``batch_size`` per micro-batch,
        ``grad_accum`` micro-batches per update.
        """
        t = self.cfg.train
        n_groups, size = t.groups_per_epoch, t.group_size
        usable = self._usable_rows(batch, adv)
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, epoch, 3, inner))
        members = torch.argsort(torch.rand(n_groups, size, generator=gen), dim=1)
        order = (torch.arange(n_groups)[:, None] * size + members).t().flatten()
        order = order[usable[order]]
        micro = list(order.split(t.batch_size)) if len(order) else []
        return [micro[u : u + t.grad_accum] for u in range(0, len(micro), t.grad_accum)]

    def _usable_rows(self, batch: RolloutBatch, adv: torch.Tensor) -> torch.Tensor:
        """``(groups_per_epoch * group_size,)`` mask of the samples that are trained this epoch."""
        t = self.cfg.train
        adv = adv.detach().cpu()
        ok = torch.isfinite(adv)
        usable = torch.zeros(t.groups_per_epoch * t.group_size)
        for g in torch.unique(batch.group_ids).tolist():
            m = batch.group_ids == g
            if bool((ok[m] & (adv[m] != 0)).any()):
                usable[batch.row_ids[m & ok]] = 1.0
        if self.world > 1:
            usable = self.accelerator.reduce(usable.to(self.accelerator.device), "sum").cpu()
        return usable > 0

    def train_on(self, batch: RolloutBatch, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        """Inner epochs of PPO updates on one epoch's samples (``adv``: this process's rows); returns statistics.

        Follows :meth:`update_plan`. Each process computes the (sample, trained step) pairs of its
        own samples, ``train.forward_batch`` pairs per forward pass (0: all pairs of a micro-batch),
        with the loss scaled so that the gradient averaged over processes is the mean over the
        update's pairs. An update whose loss or gradient is NaN or infinite on any process is skipped.
        """
        cfg = self.cfg.train
        acc = self.accelerator
        device = acc.device
        kern = batch.kernel
        steps = train_step_indices(kern, cfg.timestep_fraction)
        if not steps:
            raise UserError("no stochastic step is trained: check sampler.window and train.timestep_fraction")
        n_groups, size = cfg.groups_per_epoch, cfg.group_size
        # Which process holds each global sample, and where in this process's batch.
        owner = (torch.arange(n_groups * size) // size) % self.world
        local_of = torch.full((n_groups * size,), -1, dtype=torch.long)
        local_of[batch.row_ids] = torch.arange(len(batch.row_ids))
        adv_dev = adv.to(device=device, dtype=torch.float32)
        zero_adv = torch.zeros_like(adv_dev)
        coeffs = kern.on_device(device)
        std_all = coeffs[2]
        guard_all = coeffs[1].abs()
        steps_t = torch.tensor(steps, device=device)
        sums = _StatSums(device)
        grad_norms: list[float] = []
        skipped = 0
        live_groups = 0
        self.model.train()
        for inner in range(cfg.inner_epochs):
            plan = self.update_plan(batch, adv, epoch, inner)
            if inner == 0:
                live_groups = len(torch.unique(torch.cat([m for u in plan for m in u]) // size)) if plan else 0
            for update in plan:
                total_pairs = sum(len(m) for m in update) * len(steps)
                scale = self.world / total_pairs
                # Forward passes per process (all derive the same counts alone) and this process's own.
                per_process = [
                    sum(self._n_passes(int((owner[m] == p).sum()), len(steps)) for m in update)
                    for p in range(self.world)
                ]
                mine = [c for m in update for c in self._forward_chunks(local_of[m[owner[m] == self.rank]], len(steps))]
                n_passes = max(1, max(per_process))
                finite = True
                for c in range(n_passes):
                    sync = c == n_passes - 1
                    ctx = acc.no_sync(self.model) if (self.world > 1 and not sync) else nullcontext()
                    with ctx:
                        if c < len(mine):
                            rows_c, steps_c = mine[c]
                            s_idx = rows_c.to(device)
                            t_idx = steps_t[steps_c.to(device)]
                            finite &= self._pairs_step(batch, adv_dev, s_idx, t_idx, std_all, guard_all, scale, sums)
                        else:  # an idle pass of weight 0 keeps this process in step with the others
                            one = torch.zeros(1, dtype=torch.long, device=device)
                            self._pairs_step(batch, zero_adv, one, steps_t[:1], std_all, guard_all, 0.0, None)
                gn = acc.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
                finite &= math.isfinite(gn)
                if self.world > 1:
                    flag = torch.tensor([1.0 if finite else 0.0], device=device)
                    finite = bool(acc.gather(flag).min() > 0)
                if not finite:
                    skipped += 1
                    self._skip_update()
                    continue
                self.nonfinite_streak = 0
                grad_norms.append(gn)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
                if self.ema is not None:
                    self.ema.step()
        out = sums.means(acc if self.world > 1 else None)
        out["zero_adv_groups"] = 1.0 - live_groups / n_groups
        if grad_norms:
            out["grad_norm"] = float(np.mean(grad_norms))
        out["skipped_updates"] = float(skipped)
        out["updates"] = float(len(grad_norms))  # optimizer steps taken this epoch
        out["optimizer_steps"] = float(self.global_step)  # since the start of the run (the paper's "iteration")
        return out

    def _n_passes(self, n_rows: int, n_steps: int) -> int:
        """Forward passes over the pairs of ``n_rows`` samples (the length of :meth:`_forward_chunks`)."""
        pairs = n_rows * n_steps
        return 0 if pairs == 0 else math.ceil(pairs / (self.cfg.train.forward_batch or pairs))

    def _forward_chunks(self, rows: torch.Tensor, n_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(rows, step positions)`` of each forward pass over the pairs of ``rows`` (one micro-batch)."""
        if len(rows) == 0:
            return []
        sample_all = rows.repeat_interleave(n_steps)
        step_all = torch.arange(n_steps).repeat(len(rows))
        chunk = self.cfg.train.forward_batch or len(sample_all)
        return [(sample_all[lo : lo + chunk], step_all[lo : lo + chunk]) for lo in range(0, len(sample_all), chunk)]

    def _skip_update(self) -> None:
        """Drop an update whose loss or gradient is NaN/inf; stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self._count_nonfinite()

    def _count_nonfinite(self) -> None:
        """One more update lost to a bad number (NaN/inf loss or gradient, or no finite reward at all).

        After ``train.max_nonfinite`` in a row (no good update between them) the run stops on every
        process with a message naming the last checkpoint, which no skipped update has touched.
        """
        self.nonfinite_streak += 1
        limit = self.cfg.train.max_nonfinite
        if self.nonfinite_streak >= limit:
            ckpts = list_checkpoints(self.out / "checkpoints")
            where = (
                f"the last good checkpoint is {str(ckpts[-1])!r} (continue with --resume {str(self.out)!r})"
                if ckpts
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"training stopped: {limit} updates in a row had a NaN or infinite loss or gradient, "
                f"or rewards that scored no image (train.max_nonfinite); {where}"
            )

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
        scale: float,
        sums: _StatSums | None,
    ) -> bool:
        """Forward and backward of the loss summed over the pairs ``(sample, step)``, times ``scale``.

        Returns whether the loss was finite; ``sums`` (None for an idle pass) collects statistics.
        """
        cfg = self.cfg.train
        old_lp = batch.log_probs[sample_idx, step_idx]
        a = adv[sample_idx]
        out = self.recompute(batch, sample_idx, step_idx)
        if cfg.guard:
            old_mean = batch.means[sample_idx, step_idx]
            res = guard_loss(
                out.log_prob, old_lp, a, cfg.clip_range, out.mean, old_mean, std_all[step_idx], guard_all[step_idx]
            )
        else:
            res = ppo_clip_loss(out.log_prob, old_lp, a, cfg.clip_range)
        loss_rows = res.loss
        kl = None
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
        loss = loss_rows.sum() * scale
        if not bool(torch.isfinite(loss)):
            # Still run backward (zeroed) so that every process joins the same collectives.
            self.accelerator.backward(loss_rows.nan_to_num(0.0, 0.0, 0.0).sum() * 0.0)
            return False
        self.accelerator.backward(loss)
        if sums is not None:
            with torch.no_grad():
                diff = (out.log_prob - old_lp).float()
                sums.add("loss", loss_rows)
                sums.add("policy_loss", res.loss)
                sums.add("clip_frac", res.clipped.float())
                sums.add("approx_kl", 0.5 * diff.square())
                sums.add("ratio_mean", res.ratio)
                sums.maximum("ratio_max_dev", (res.ratio - 1).abs())
                if kl is not None:
                    sums.add("kl_ref", kl)
        return True

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, epoch: int, write_grid: bool = True) -> dict[str, float]:
        """Score held-out prompts with the EMA weights, for each evaluation sampler (fixed noise).

        The eval samples are spread over processes in equal shares (the last share padded with
        repeats of the last sample, dropped after gathering); sample ``i`` draws its noise from a
        generator seeded by ``(seed, i)``, so the scores do not depend on the number of processes.
        """
        e = self.cfg.eval
        prompts_base = self.eval_prompts[: e.max_prompts]
        prompts_all = [p for p in prompts_base for _ in range(e.samples_per_prompt)]
        n_all = len(prompts_all)
        per = math.ceil(n_all / self.world)
        idx = [min(i, n_all - 1) for i in range(self.rank * per, (self.rank + 1) * per)]
        mine = [prompts_all[i] for i in idx]
        seeds = [_seed_for(self.cfg.seed, 7, i) for i in idx]
        n_grid = min(e.grid_prompts, len(prompts_base)) * e.samples_per_prompt
        out: dict[str, float] = {}
        ceiling = self.rewards.max_weighted_raw(prompts_all, self.task.metadata(prompts_all))
        if ceiling is not None:  # the best the weighted reward could be on these prompts: the curves' headroom
            out["eval_reward_ceiling"] = float(ceiling.mean())
        sigmas = self._sigmas(e.num_steps)
        grid = None
        with self._eval_context():
            for name in e.samplers:
                # "own": the training sampler at its training eta (the reference's in-domain measure)
                sampler = self.cfg.sampler.name if name == "own" else name
                eta = self.cfg.sampler.eta if sampler == self.cfg.sampler.name else None
                sched = self.cfg.sampler.schedule if sampler == "precise" else None
                kern = kernel(sampler, sigmas, eta, sched)
                key = name
                _, latents, _, _ = self._sample(mine, kern, seeds, store=False)
                with torch.no_grad():
                    images = self.policy.decode(latents)
                meta = self.task.metadata(mine)
                sets = [self.rewards] if self.eval_rewards is None else [self.rewards, self.eval_rewards]
                comps = self._score_agreed(functools.partial(_score_sets, sets, images, mine, meta))
                comps = self._same_fields(comps, len(mine))
                if self.world > 1:
                    comps = {k: self.accelerator.gather(v) for k, v in comps.items()}
                comps = {k: v[:n_all].cpu() for k, v in comps.items()}
                raw = weighted_raw({k: comps[k] for k in self.reward_weights}, self.reward_weights)
                out[f"eval_{key}_reward"] = float(raw.nanmean())
                for k, v in comps.items():
                    out[f"eval_{key}/{k}"] = float(v.nanmean())
                if write_grid and grid is None:
                    grid = (self._grid_images(images, n_grid, per), key)
        if grid is not None and self.is_main:
            images, key = grid
            shown = prompts_all[: len(images)]
            self.logger.sample_grid(images, shown, epoch, key, self.cfg.eval.grid_prompts, e.samples_per_prompt)
        return out

    def _grid_images(self, images: torch.Tensor, n_grid: int, per: int) -> torch.Tensor:
        """The first ``n_grid`` eval images of all processes, on the main process (a collective)."""
        if self.world == 1:
            return images[:n_grid].detach().cpu()
        from accelerate.utils import gather_object

        take = max(0, min(per, n_grid - self.rank * per))
        parts = gather_object([images[:take].detach().cpu()])
        return torch.cat(parts)[:n_grid]

    # ------------------------------------------------------------------ checkpoints

    @property
    def _sharded(self) -> bool:
        """Whether the trainable parameters are FSDP shards (DTensors)."""
        return any(_is_dtensor(p) for p in self.params)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Whole trainable weights by name (a collective when FSDP shards them: every process calls it)."""
        return {n: _whole(p) for n, p in zip(self.param_names, self.params, strict=True)}

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer state to save (whole, on the main process; a collective when sharded)."""
        if not self._sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        module = self.accelerator.unwrap_model(self.model)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, self.optimizer.optimizer, options=opts)

    def _load_optimizer_state(self, saved: dict[str, Any]) -> None:
        if not self._sharded:
            self.optimizer.load_state_dict(saved)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        module = self.accelerator.unwrap_model(self.model)
        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(module, self.optimizer.optimizer, optim_state_dict=saved, options=opts)

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the completed epochs and prune old ones; returns its path (on every process).

        Every process must call it (sharded weights are gathered first); only the main process
        writes. A write that fails (unwritable directory, full disk) raises the same one-sentence
        error on every process and leaves no half-written checkpoint behind.
        """
        tensors = {"trainable": self._trainable_state()}
        if self.ema is not None:
            tensors["ema"] = {n: _whole(s) for n, s in self.ema.state_tensors(self.param_names).items()}
        optimizer_state = self._optimizer_state()
        error, path = None, None
        if self.world > 1:
            # Data-parallel copies must stay identical; a checkpoint of one copy would hide a divergence.
            prints = torch.stack(
                [v.double().sum() for v in tensors["trainable"].values()]
                + [v.double().square().sum() for v in tensors["trainable"].values()]
            )
            seen = self.accelerator.gather(prints.to(self.accelerator.device)[None])
            if not bool((seen == seen[:1]).all()):
                error = f"the processes hold different weights after epoch {self.epoch}; no checkpoint was written"
                self._agree(error)
        if self.is_main:
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
                if self.cfg.train.lora.enabled and not self._sharded:
                    with self._eval_context():
                        save_adapter(self.accelerator.unwrap_model(self.model), directory / "adapter")

            root = self.out / "checkpoints"
            try:
                path = write_checkpoint(
                    root, self.epoch, tensors, state, objects={"optimizer": optimizer_state}, extra=write_adapter
                )
                prune_checkpoints(root, self.cfg.checkpoint.keep)
            except UserError as exc:
                error = str(exc)
        self._agree(error)
        return path if path is not None else self.out / "checkpoints" / f"epoch_{self.epoch:06d}"

    def _resume(self, resume: str | Path) -> None:
        """Load the checkpoint the main process names (newest under ``resume``) on every process."""
        error, ckpt = None, None
        if self.is_main:
            try:
                ckpt = str(latest_checkpoint(resume))
            except UserError as exc:
                error = str(exc)
        self._agree(error)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            ckpt = broadcast_object_list([ckpt])[0]
        error, digest = None, None
        try:
            digest = self._load_checkpoint(Path(ckpt))
        except UserError as exc:
            error = str(exc)
        self._agree(error)
        if self.world > 1:
            from accelerate.utils import gather_object

            if len(set(gather_object([digest]))) > 1:
                raise UserError(
                    f"the processes found different files in checkpoint {ckpt!r}: put the run directory on "
                    "storage that every machine shares"
                )

    def _load_checkpoint(self, ckpt: Path) -> str:
        """Verify and load ``ckpt`` into this process; returns the SHA-256 of its manifest."""
        try:
            tensors, objects, state = read_checkpoint(ckpt)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}{older_checkpoint_hint(ckpt)}") from None
        try:
            saved_cfg = config_from_dict(state["config"])
            names, epoch, step_count = state["param_names"], int(state["epoch"]), int(state["global_step"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"checkpoint {str(ckpt)!r} has a state.json without this version's fields") from None
        if saved_cfg.sampler != self.cfg.sampler or saved_cfg.model != self.cfg.model:
            raise UserError(f"checkpoint {str(ckpt)!r} was made with another model or sampler than this config")
        weights = tensors.get("trainable", {})
        if names != self.param_names or any(
            n not in weights or tuple(weights[n].shape) != tuple(p.shape)
            for n, p in zip(self.param_names, self.params, strict=True)
        ):
            raise UserError(f"checkpoint {str(ckpt)!r} does not hold this model's trainable parameters")
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params, strict=True):
                p.copy_(_shard_like(weights[n], p))
        if self.ema is not None:
            if "ema" not in tensors:
                raise UserError(f"checkpoint {str(ckpt)!r} has no EMA weights but train.ema.enabled is true")
            try:
                self.ema.load_state_tensors(self.param_names, tensors["ema"], state.get("ema_steps", 0))
            except KeyError:
                raise UserError(f"checkpoint {str(ckpt)!r} has EMA weights of another model") from None
            self.ema.shadow = [_shard_like(s, p) for s, p in zip(self.ema.shadow, self.params, strict=True)]
        try:
            self._load_optimizer_state(objects["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"checkpoint {str(ckpt)!r} has an optimizer state that does not fit: {reason}") from None
        self.epoch = epoch
        self.global_step = step_count
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.train_elapsed = float(state.get("train_elapsed_s", 0.0))
        self.first_eval = state.get("first_eval")
        self.resumed_from = ckpt
        return hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train until ``train.epochs``; write metrics, plots, checkpoints and ``summary.json``."""
        cfg = self.cfg
        total = cfg.train.epochs
        e_every = cfg.eval.every
        if self.epoch == 0 and e_every:
            t0 = time.perf_counter()
            try:
                ev = self.evaluate(0)
            except RewardUnavailable as exc:
                self._stop_for_reward(exc)
            self.first_eval = ev
            self.logger.log({"epoch": 0, "optimizer_steps": 0.0, "elapsed_s": 0.0, "train_elapsed_s": 0.0, **ev})
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
            # Global RNG (e.g. LoRA dropout) restarts each epoch: a resumed run repeats it exactly.
            torch.manual_seed(_seed_for(cfg.seed, epoch, 4, self.rank))
            batch = self.collect(epoch)
            t1 = time.perf_counter()
            try:
                comps, adv, raw = self.score(batch)
            except RewardUnavailable as exc:
                self._stop_for_reward(exc)
            except UserError as exc:  # e.g. a reward that returned the wrong shape: nothing is trained on it
                self._stop_for_reward(exc, "once the reward is fixed")
            t2 = time.perf_counter()
            unscored = self._unscored_counts(comps, epoch)
            if not bool(torch.isfinite(raw).any()):
                # No image could be scored (every reward NaN): no update is possible this epoch.
                self._count_nonfinite()
            stats = self.train_on(batch, adv, epoch)
            t3 = time.perf_counter()
            self.epoch += 1
            self.train_elapsed += t3 - t0
            scored = raw[torch.isfinite(raw)]
            record: dict[str, Any] = {
                "epoch": self.epoch,
                "reward_mean": float(scored.mean()) if len(scored) else math.nan,
                "reward_std": float(scored.std(unbiased=False)) if len(scored) else math.nan,
                **{f"reward/{k}": float(v.nanmean()) for k, v in comps.items()},
                "unscored_samples": len(raw) - len(scored),
                **unscored,
                **stats,
                "time_rollout_s": t1 - t0,
                "time_reward_s": t2 - t1,
                "time_train_s": t3 - t2,
            }
            last = self.epoch == total
            if e_every and (self.epoch % e_every == 0 or last):
                try:
                    record.update(self.evaluate(self.epoch))
                except (RewardUnavailable, _RewardError) as exc:  # _RewardError: e.g. a score of the wrong shape
                    self.logger.log({**record, "elapsed_s": self.elapsed, "train_elapsed_s": self.train_elapsed})
                    if isinstance(exc, RewardUnavailable):
                        self._stop_for_reward(exc)
                    self._stop_for_reward(exc, "once the reward is fixed")
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

    def _unscored_counts(self, comps: Mapping[str, torch.Tensor], epoch: int) -> dict[str, int]:
        """``unscored/<reward>``: the epoch's images (all processes) that each reward gave no finite score.

        Every reward is counted, a reward of weight 0 too; only the images of a reward of non-zero
        weight are left out of training (``unscored_samples``), a reward of weight 0 being only logged.
        The first time a reward not marked ``may_fail`` leaves images unscored, the main process
        prints a warning naming it (a remote reward's unscored images are its documented failure mode).
        """
        counts: dict[str, int] = {}
        for name, reward in self.rewards.rewards.items():
            bad = int(torch.isnan(comps[name]).sum())
            counts[f"unscored/{name}"] = bad
            if bad and not getattr(reward, "may_fail", False) and name not in self._warned_unscored:
                self._warned_unscored.add(name)
                if self.reward_weights[name] != 0:
                    what = "such images are left out of training and counted in the metrics (unscored_samples, "
                else:
                    what = "its weight is 0: it is only logged, leaves no image out of training and is counted in "
                    what += "the metrics ("
                if self.is_main:
                    tqdm.write(
                        f"warning: reward {name!r} returned NaN or inf for {bad} of the {len(comps[name])} images "
                        f"of epoch {epoch + 1}; {what}unscored/{name}); this warning is not repeated",
                        file=sys.stderr,
                    )
        return counts

    def finish(self) -> dict[str, Any]:
        summary = self.logger.finish(self.first_eval)
        return summary

    def _stop_for_reward(self, exc: Exception, until: str = "once the reward is back") -> NoReturn:
        """A reward that cannot go on (a server down, a wrong score): checkpoint the epochs done, stop in one sentence.

        Every process must call it (it is raised on all of them by :meth:`_score_agreed`). Requests
        still queued for the epoch's other chunks are cancelled.
        """
        for reward_set in (self.rewards, self.eval_rewards):
            for reward in reward_set.rewards.values() if reward_set is not None else ():
                if callable(getattr(reward, "close", None)):
                    reward.close()
        path = self.save_checkpoint()
        raise UserError(
            f"training stopped: {exc}; the checkpoint of epoch {self.epoch} is {path}; "
            f"continue with --resume {self.out} {until}"
        ) from None


def metrics_lines(path: str | Path) -> list[dict[str, Any]]:
    """Read a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def default_output_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{cfg.sampler.name}-{stamp}-{os.getpid()}"
