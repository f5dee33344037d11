"""The trainer: set-up and the epoch loop, for any algorithm of the table (GRPO by default).

One epoch: sample (:mod:`.rollouts`) -> score, gathered from every process (:mod:`.dist`) ->
the algorithm's targets and update plan on global rows (:mod:`.algorithms`) -> the update engine
(:mod:`.update`) -> evaluate (:mod:`.evaluate`) -> checkpoint (:mod:`.state`). The config describes
the global algorithm and the processes only share the work, so a run gives the same numbers (up to
float rounding) on any number of processes; each module says how it keeps to that and what it does
with faults.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..algorithm_table import ALGORITHM_TABLE
from ..config import ExperimentConfig, with_run_defaults
from ..errors import UserError
from ..policies import Policy
from ..rewards.base import weighted_raw
from ..rewards.failures import RewardUnavailable
from ..sde import SAMPLER_TABLE, Kernel, StepOutput, kernel, time_grid
from ..tasks.registry import TaskSpec, build_task
from . import advantages, dist, rollouts, seeds, setup, sharding, state
from .algorithms.base import Algorithm, RunContext
from .algorithms.grpo import recompute, train_step_indices
from .checkpoint import check_writable, remove_leftovers
from .ema import EMA
from .evaluate import EvalInputs, eval_weights, evaluate
from .logging import RunLogger, grid_title
from .memory import budget_bytes, check_decode
from .rollouts import RolloutBatch, epoch_prompt_indices
from .threads import resolve_threads, using_threads
from .train_state import TrainState
from .update import Engine, count_nonfinite

__all__ = [
    "GRPOTrainer",
    "RolloutBatch",
    "Trainer",
    "default_output_dir",
    "epoch_prompt_indices",
    "train_step_indices",
]


def _state_field(name: str) -> property:
    """``trainer.<name>``: the field of ``trainer.state`` (read and written)."""
    return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v))


class Trainer:
    """The algorithm of ``config.algorithm`` on a policy adapter, driven by accelerate.

    ``run()`` trains and returns the summary. ``task`` (a :class:`TaskSpec`: policy, prompts,
    default rewards) replaces the model that ``config.model.name`` names, so a model of one's own
    trains without a registry entry. ``GRPOTrainer`` is the same class (its earlier name).
    """

    epoch = _state_field("epoch")
    global_step = _state_field("global_step")
    elapsed = _state_field("elapsed")
    train_elapsed = _state_field("train_elapsed")
    first_eval = _state_field("first_eval")
    forward_batch = _state_field("forward_batch")
    nonfinite_streak = _state_field("nonfinite_streak")
    skipped_updates = _state_field("skipped_updates")
    resumed_from = _state_field("resumed_from")

    def __init__(
        self,
        cfg: ExperimentConfig,
        output_dir: str | Path,
        *,
        task: TaskSpec | None = None,
        resume: str | Path | None = None,
        accelerator: Accelerator | None = None,
        read_only: bool = False,
    ) -> None:
        self.cfg = cfg
        self.out = Path(output_dir)
        launched = dist.launched_processes()  # before accelerate, which would fail on it with a traceback
        sharding.check_launch()
        self.accelerator = accelerator or dist.make_accelerator(cfg.train.mixed_precision)
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
        torch.manual_seed(seeds.init_seed(cfg.seed))
        self.state = TrainState()

        # ``task``: a policy, prompts and rewards of the caller's own; else the one ``model.name`` names
        self.task: TaskSpec = build_task(cfg.model, acc.device) if task is None else task
        self.policy: Policy = self.task.policy
        self.train_prompts = setup.read_prompts(
            self.policy, cfg.prompts.train, self.task.train_prompts, "prompts.train"
        )
        self.eval_prompts = setup.read_prompts(self.policy, cfg.prompts.eval, self.task.eval_prompts, "prompts.eval")
        if cfg.eval.height is not None:  # an evaluation resolution the model cannot take fails before any work
            with self.policy.at_resolution(cfg.eval.height, cfg.eval.width):
                pass
        if hasattr(self.policy, "precompute_prompts"):  # model.options cache_prompts / free_text_encoders
            self.policy.precompute_prompts(self.train_prompts + self.eval_prompts)
        self.run_rewards = setup.build_rewards(cfg, self.task, acc.device)
        # What runs is recorded (config.yaml, checkpoints): the defaults the config left open, filled in.
        threads = resolve_threads(cfg.train.threads, self.policy, acc.device)
        self.cfg = cfg = with_run_defaults(cfg, reward_weights=self.run_rewards.weights, threads=threads)
        self.reward_weights = self.run_rewards.weights
        self.rewards = self.run_rewards.train
        self.eval_rewards = self.run_rewards.held_out

        self._setup_model()
        # the rollouts' decode under the same budget as the training pass, before any rollout
        check_decode(self.policy, cfg.train.memory_budget_gb, acc.device, cfg.train.rollout_batch_size)
        self.sigmas = self._sigmas(cfg.sampler.num_steps)
        self.base_kernel = kernel(
            cfg.sampler.name,
            self.sigmas,
            cfg.sampler.eta,
            cfg.sampler.schedule if SAMPLER_TABLE[cfg.sampler.name].takes_schedule else None,
        )
        self.forward_batch = None if cfg.train.forward_batch == "auto" else cfg.train.forward_batch
        if self.forward_batch is None:
            budget_bytes(cfg.train.memory_budget_gb, self.accelerator.device)  # a CPU run without a budget stops here
        if resume is not None:
            state.resume(self, resume)
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
        dist.agree(error, self.world)

    # ------------------------------------------------------------------ set-up

    def _sigmas(self, num_steps: int) -> torch.Tensor:
        return time_grid(num_steps, self.cfg.sampler.grid, shift=self.cfg.sampler.shift, model=self.policy.time_grid)

    def _setup_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        trainable = setup.trainable_module(self.policy, cfg)
        module, self.param_names, self.params = trainable.module, trainable.names, trainable.params
        self.ref_module = trainable.reference
        t = cfg.train

        def adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
            return torch.optim.AdamW(
                params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
            )

        if t.fsdp and self.world > 1:
            # Sharded in place (the KL term's frozen copy too); fully_shard replaces the parameters by
            # their shards, so they are taken again and the optimizer is built on the shards. accelerate
            # prepares the optimizer alone: given the module, it would wrap it in DDP.
            modules = [module] if self.ref_module is None else [module, self.ref_module]
            sharding.shard(modules, acc.device, self.world, t.mixed_precision)
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            self.param_names, self.params = [n for n, _ in named], [p for _, p in named]
            self.model, self.optimizer = module, acc.prepare(adamw(self.params))
        else:
            self.model, self.optimizer = acc.prepare(module, adamw(self.params))
        self.policy.transformer = self.model
        self.ema = EMA(self.params, t.ema.decay, t.ema.every, t.ema.mode, t.grad_accum) if t.ema.enabled else None
        ctx = RunContext(
            cfg, self.policy, self.model, self.params, self.param_names, acc, self.ref_module, self.world, self.rank
        )
        self.algorithm: Algorithm = ALGORITHM_TABLE[cfg.algorithm.name].load()(cfg.algorithm.knobs, ctx)
        self.engine = Engine(
            t, acc, self.model, self.optimizer, self.params, self.ema, self.world, self.rank, self.out / "checkpoints"
        )

    # ------------------------------------------------------------------ the stages

    def kernel_for_epoch(self, epoch: int) -> Kernel:
        """The training kernel with this epoch's SDE window applied."""
        kern = rollouts.kernel_for_epoch(self.base_kernel, self.cfg.sampler.window, epoch)
        return self.algorithm.rollout_kernel(kern, epoch)

    def collect(self, epoch: int) -> RolloutBatch:
        """This process's groups of the epoch, rolled out and submitted to the rewards chunk by chunk."""
        return rollouts.collect(self.rollout_inputs(), epoch)

    def rollout_inputs(self) -> rollouts.RolloutInputs:
        """What the rollouts read of this run (made per call, so that a replaced reward or policy is seen)."""
        algo = self.algorithm
        return rollouts.RolloutInputs(
            self.cfg,
            self.policy,
            self.model,
            self.accelerator,
            self.train_prompts,
            self.task.metadata,
            self.rewards,
            self.rank,
            self.world,
            self.kernel_for_epoch,
            algo.rollout_weights,
            algo.initial_seeds,
        )

    def score(self, batch: RolloutBatch) -> tuple[dict[str, torch.Tensor], Any, torch.Tensor]:
        """Reward components, the algorithm's targets and raw weighted reward of every row of the epoch (a collective).

        Each process scores its own samples; the scores of all processes are gathered once, in
        global row order, and the targets (GRPO: advantages) are computed there: the z-scores and
        group statistics are those of the epoch whatever the number of processes and chunks. A
        failure of a reward on any process raises on all (``RewardUnavailable`` or a ``UserError``).
        """
        comps = dist.score_agreed(lambda: rollouts.wait_scores(self.rewards, batch), self.world)
        comps = dist.same_fields(comps, len(batch.row_ids), self.world, self.accelerator.device)
        comps = dist.gather_rows(self.accelerator, self.world, comps)
        rows = batch.row_ids.to(self.accelerator.device)
        if self.world > 1:
            rows = self.accelerator.gather(rows)
        t = self.cfg.train
        comps = advantages.global_order(comps, rows, t.groups_per_epoch * t.group_size)
        targets = self.algorithm.targets(comps, self.reward_weights, self.epoch)
        return comps, targets, weighted_raw(comps, self.reward_weights)

    def update_plan(self, batch: RolloutBatch, targets: Any, epoch: int, inner: int) -> list[list[torch.Tensor]]:
        """The epoch's optimizer updates for pass ``inner``: micro-batches of global unit ids (alike on every process).

        ``targets`` holds every unit of the epoch; ``batch`` is not needed, as the plan is global.
        """
        return self.algorithm.plan(targets, epoch, inner)

    def train_on(self, batch: RolloutBatch, targets: Any, epoch: int) -> dict[str, float]:
        """The epoch's updates of the algorithm on one epoch's samples (``targets``: every unit); returns statistics."""
        return self.engine.run(self.algorithm, batch, targets, epoch, self.state)

    def recompute(self, batch: RolloutBatch, sample_idx: torch.Tensor, step_idx: torch.Tensor) -> StepOutput:
        """Mean and log-prob of the stored transitions ``(sample, step)`` under the current parameters."""
        return recompute(self.algorithm.ctx, batch, sample_idx, step_idx)

    def eval_inputs(self) -> EvalInputs:
        """What :func:`.evaluate.evaluate` reads of this run, the EMA weights swapped in (made per call, not kept)."""
        cfg = self.cfg
        return EvalInputs(
            self.policy,
            self.model,
            self.run_rewards,
            self.eval_prompts,
            self.task.metadata,
            self.accelerator,
            cfg.sampler,
            self._sigmas,
            cfg.seed,
            cfg.train.rollout_batch_size,
            weights=functools.partial(eval_weights, self.ema),
        )

    def evaluate(self, epoch: int, write_grid: bool = True) -> dict[str, float]:
        """Score held-out prompts with the EMA weights, for each evaluation protocol; log the sample grid."""
        e = self.cfg.eval
        result = evaluate(self.eval_inputs(), e, with_grid=write_grid)
        if result.grid is not None and self.is_main:
            images, shown, key = result.grid
            fps = getattr(self.policy, "fps", None)  # a video policy's frame rate, for the MP4s
            p = result.protocols[key]
            title = grid_title(epoch, key, p.sampler, p.eta, e.num_steps, self.ema is not None)
            self.logger.sample_grid(images, shown, epoch, key, e.grid_prompts, e.samples_per_prompt, fps, title)
        return result.metrics()

    @property
    def _sharded(self) -> bool:
        """Whether the trainable parameters are FSDP shards (DTensors)."""
        return sharding.is_sharded(self.params)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Whole trainable weights by name (a collective when FSDP shards them)."""
        return state.trainable_state(self.param_names, self.params)

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the completed epochs (every process calls it; see :mod:`.state`)."""
        return state.save_checkpoint(self)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train until ``train.epochs``; write metrics, plots, checkpoints and ``summary.json``.

        Torch runs with ``train.threads`` threads meanwhile (the caller's count is given back after).
        """
        with using_threads(self.cfg.train.threads):
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        total, e_every, c_every = cfg.train.epochs, cfg.eval.every, cfg.checkpoint.every
        if self.epoch == 0 and e_every:
            t0 = time.perf_counter()
            self.first_eval = self._evaluate_or_stop(0, None)
            self.logger.log(
                {"epoch": 0, "optimizer_steps": 0.0, "elapsed_s": 0.0, "train_elapsed_s": 0.0, **self.first_eval}
            )
            self.elapsed += time.perf_counter() - t0
        show = self.is_main and cfg.logging.progress
        bar = tqdm(
            range(self.epoch, total),
            initial=self.epoch,
            total=total,
            desc=f"{cfg.algorithm.name.upper()} {cfg.sampler.name}",
            disable=not show,
            dynamic_ncols=True,
        )
        for _ in bar:
            t0 = time.perf_counter()
            epoch = self.epoch
            # Global RNG (e.g. LoRA dropout) restarts each epoch: a resumed run repeats it exactly.
            torch.manual_seed(seeds.epoch_torch_seed(cfg.seed, epoch, self.rank))
            batch = self.collect(epoch)
            t1 = time.perf_counter()
            comps, adv, raw = self._score_or_stop(batch)
            t2 = time.perf_counter()
            unscored = self._unscored_counts(comps, epoch)
            if not bool(torch.isfinite(raw).any()):
                # no image could be scored: no update is possible this epoch
                count_nonfinite(self.state, cfg.train.max_nonfinite, self.out / "checkpoints")
            stats = self.train_on(batch, adv, epoch)
            t3 = time.perf_counter()
            self.epoch += 1
            self.train_elapsed += t3 - t0
            times = {"time_rollout_s": t1 - t0, "time_reward_s": t2 - t1, "time_train_s": t3 - t2}
            # one velocity evaluation per sample and step of the rollouts (every process's)
            stats["model_evals_rollout"] = float(len(raw) * batch.kernel.num_steps)
            self.state.model_evals += stats["model_evals_rollout"] + stats["model_evals_train"]
            stats["model_evals"] = self.state.model_evals
            record = {"epoch": self.epoch, **_reward_record(comps, raw), **unscored, **stats, **times}
            last = self.epoch == total
            if e_every and (self.epoch % e_every == 0 or last):
                record.update(self._evaluate_or_stop(self.epoch, record))
            self.elapsed += time.perf_counter() - t0
            record["elapsed_s"] = self.elapsed
            record["train_elapsed_s"] = self.train_elapsed
            self.logger.log(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
            if last or (c_every and self.epoch % c_every == 0):
                self.save_checkpoint()
        bar.close()
        return self.finish()

    def _score_or_stop(self, batch: RolloutBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """:meth:`score`, or a checkpoint and a stop when a reward fails (nothing is trained on it)."""
        try:
            return self.score(batch)
        except RewardUnavailable as exc:
            self._stop_for_reward(exc)
        except UserError as exc:  # e.g. a reward that returned the wrong shape
            self._stop_for_reward(exc, "once the reward is fixed")

    def _evaluate_or_stop(self, epoch: int, record: dict[str, Any] | None) -> dict[str, float]:
        """:meth:`evaluate`, or a checkpoint and a stop when a reward fails.

        ``record``: the epoch's training record, logged before stopping (None before training,
        where only a reward that stops is caught).
        """
        caught = (RewardUnavailable,) if record is None else (RewardUnavailable, dist.RewardError)
        try:
            return self.evaluate(epoch)
        except caught as exc:
            if record is not None:
                self.logger.log({**record, "elapsed_s": self.elapsed, "train_elapsed_s": self.train_elapsed})
            if isinstance(exc, RewardUnavailable):
                self._stop_for_reward(exc)
            self._stop_for_reward(exc, "once the reward is fixed")

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
        """Close the logs and write ``summary.json``; returns the summary."""
        return self.logger.finish(self.first_eval)

    def _stop_for_reward(self, exc: Exception, until: str = "once the reward is back") -> NoReturn:
        """A reward that cannot go on (a server down, a wrong score): checkpoint the epochs done, stop in one sentence.

        Every process must call it (it is raised on all of them by :func:`.dist.score_agreed`). Requests
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


def _reward_record(comps: Mapping[str, torch.Tensor], raw: torch.Tensor) -> dict[str, Any]:
    """The epoch's reward statistics over the images some weighted reward scored (NaN when none)."""
    scored = raw[torch.isfinite(raw)]
    return {
        "reward_mean": float(scored.mean()) if len(scored) else math.nan,
        "reward_std": float(scored.std(unbiased=False)) if len(scored) else math.nan,
        **{f"reward/{k}": float(v.nanmean()) for k, v in comps.items()},
        "unscored_samples": len(raw) - len(scored),
    }


#: the trainer's earlier name, kept for code that builds it by that name
GRPOTrainer = Trainer


def default_output_dir(cfg: ExperimentConfig) -> Path:
    """``runs/<model>-<sampler>-<time>-<pid>``: a fresh run directory when ``--output`` is not given."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{cfg.sampler.name}-{stamp}-{os.getpid()}"
