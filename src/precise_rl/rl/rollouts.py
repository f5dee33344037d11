"""Rollouts: the epoch's prompt draw, seeded per-sample sampling and the batch of one epoch's samples.

Randomness comes from generators seeded by ``(seed, epoch, sample)``, so a sample does not depend
on the process or the chunk that computes it, and a resumed run repeats exactly what an
uninterrupted one does. Group ``g`` of an epoch is rolled out whole on process
``g % num_processes``. Each chunk of ``rollout_batch_size`` samples is decoded and submitted to the
rewards as soon as it is rolled out, so that remote rewards score it while the next chunk is
rolled out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from accelerate import Accelerator
from torch import nn

from ..algorithm_table import ALGORITHM_TABLE
from ..config import ExperimentConfig
from ..policies import Policy, index_cond
from ..rewards.base import RewardSet, concat_components
from ..sde import Kernel, rollout, sde_window, sliding_window
from . import seeds

__all__ = [
    "RolloutBatch",
    "RolloutInputs",
    "collect",
    "epoch_prompt_indices",
    "kernel_for_epoch",
    "sample",
    "stored_rows",
    "wait_scores",
]


def epoch_prompt_indices(n_prompts: int, per_epoch: int, epoch: int, seed: int, order: str = "shuffled") -> list[int]:
    """The indices of the training prompts that epoch ``epoch`` draws (a function of its arguments alone).

    ``shuffled``: epoch ``e`` takes items ``e * per_epoch ... (e + 1) * per_epoch - 1`` of the endless
    sequence of passes over the prompt set, each pass a fresh permutation seeded by ``(seed, pass)``:
    no prompt repeats before every prompt was drawn, and a resumed run draws what an uninterrupted one
    does. ``random``: ``per_epoch`` independent uniform draws (with replacement).
    """
    if order == "random":
        gen = torch.Generator().manual_seed(seeds.prompt_draw_seed(seed, epoch))
        return torch.randint(n_prompts, (per_epoch,), generator=gen).tolist()
    lo, hi = epoch * per_epoch, (epoch + 1) * per_epoch
    out: list[int] = []
    for k in range(lo // n_prompts, (hi - 1) // n_prompts + 1):
        gen = torch.Generator().manual_seed(seeds.prompt_pass_seed(seed, k))
        perm = torch.randperm(n_prompts, generator=gen).tolist()
        start, stop = max(lo - k * n_prompts, 0), min(hi - k * n_prompts, n_prompts)
        out += perm[start:stop]
    return out


def kernel_for_epoch(base: Kernel, window: Any, epoch: int) -> Kernel:
    """``base`` with this epoch's SDE window (``sampler.window``) applied."""
    n = base.num_steps
    if window.size == 0:
        return base
    if window.slide_every:
        mask = sliding_window(n, window.size, epoch, window.slide_every, window.stride)
    else:
        mask = sde_window(n, window.size, window.start)
    return base.with_window(mask)


@dataclass
class RolloutBatch:
    """One epoch's samples on this process (``B`` rows).

    ``latents`` holds every step's latent when the algorithm trains on trajectories, the final
    latent alone (``(B, 1, ...)``) when it trains on final samples (``keeps: final`` in the algorithm
    table); ``means`` is then None.
    """

    prompts: list[str]
    metadata: list[dict]
    group_ids: torch.Tensor  # (B,) global group index
    row_ids: torch.Tensor  # (B,) global sample index: group * group_size + member
    cond: Any
    latents: torch.Tensor  # (B, N + 1, ...), or (B, 1, ...): the final latents only
    means: torch.Tensor | None  # (B, N, ...)
    log_probs: torch.Tensor  # (B, N), or (B, 0) with the final latents only
    kernel: Kernel
    images: torch.Tensor
    #: the reward scoring of each rollout chunk, in order, submitted as soon as the chunk was decoded
    #: (``RewardSet.submit``); empty: :meth:`Trainer.score` scores ``images`` itself
    pending: list[Any] = field(default_factory=list)


class _FailedSubmit:
    """A chunk whose reward scoring failed as it was submitted: ``result()`` raises that failure.

    The failure is raised where scores are read (in :func:`.dist.score_agreed`), so that every
    process hears of it at the same point instead of one process stopping in the middle of its rollouts.
    """

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def done(self) -> bool:
        return True

    def result(self) -> NoReturn:
        raise self.exc


def sample(
    policy: Policy,
    prompts: list[str],
    kern: Kernel,
    seeds: Sequence[int],
    *,
    chunk: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    store: bool = True,
    on_chunk: Callable[[slice, torch.Tensor], None] | None = None,
    init_seeds: Sequence[int] | None = None,
    store_dtype: torch.dtype = torch.float32,
    store_device: torch.device | str | None = None,
) -> tuple[Any, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Roll out ``prompts`` in chunks of ``chunk``; returns (cond, latents, means, log_probs).

    Row ``i`` draws all its noise (initial latent, then every step) from a generator of its
    own seeded with ``seeds[i]``: a sample is the same whichever process or chunk computes it.
    ``autocast()`` is entered around each chunk's model calls (the run's mixed precision).
    ``on_chunk(rows, final_latents)`` is called after each chunk, before the next one is rolled out.
    ``store=False`` keeps the final latents alone (``(B, ...)``) and no means.
    ``init_seeds``: the initial latents' seeds when they differ from the steps' (rows that share a
    start, e.g. Flow-GRPO-Fast's branches of one trajectory); None = each row's own ``seeds[i]``.
    ``store_dtype``, ``store_device``: in what and where the trajectories are kept (:func:`precise_rl.sde.rollout`).
    Used by training, evaluation and ``precise-rl sample``.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    cond = policy.encode_prompts(prompts)
    gens = [torch.Generator(device=policy.device).manual_seed(int(s)) for s in seeds]
    if init_seeds is None:
        x1 = torch.cat([policy.sample_noise(1, generator=g) for g in gens])
    else:
        starts = [torch.Generator(device=policy.device).manual_seed(int(s)) for s in init_seeds]
        x1 = torch.cat([policy.sample_noise(1, generator=g) for g in starts])
    lat, means, lps = [], [], []
    for lo in range(0, len(prompts), chunk):
        sl = slice(lo, min(lo + chunk, len(prompts)))
        with autocast():
            traj = rollout(
                policy.velocity,
                x1[sl],
                None,
                kern,
                cond=index_cond(cond, sl),
                generator=gens[sl],
                store_means=store,
                store_latents=store,
                store_dtype=store_dtype if store else torch.float32,
                store_device=store_device if store else None,
            )
        lat.append(traj.latents if store else traj.sample)
        if store:
            means.append(traj.means)
        lps.append(traj.log_probs)
        if on_chunk is not None:
            on_chunk(sl, traj.sample)
    return cond, torch.cat(lat), (torch.cat(means) if store else None), torch.cat(lps)


@dataclass
class RolloutInputs:
    """What :func:`collect` reads of a run (the trainer builds it; the algorithm's hooks are passed as callables)."""

    cfg: ExperimentConfig
    policy: Policy
    model: nn.Module
    accelerator: Accelerator
    prompts: list[str]  #: the training prompts
    metadata: Callable[[list[str]], list[dict]]  #: the task's metadata of prompts (rewards read it)
    rewards: RewardSet  #: the rewards trained on
    rank: int
    world: int
    kernel_for_epoch: Callable[[int], Kernel]  #: the kernel an epoch rolls out with (SDE window, Fast window)
    rollout_weights: Callable[[], AbstractContextManager]  #: the weights rollouts are drawn with
    initial_seeds: Callable[[list[int], int], list[int] | None]  #: seeds of shared initial latents, or None


def collect(inputs: RolloutInputs, epoch: int) -> RolloutBatch:
    """This process's groups of the epoch, rolled out with the epoch's kernel.

    Every process draws the same global list of ``groups_per_epoch`` prompts and rolls out
    the groups ``g`` with ``g % num_processes == process index``, each group whole. Each chunk
    is decoded and submitted to the rewards as soon as it is rolled out (``batch.pending``):
    remote rewards score it while the next chunk is rolled out, local ones are computed right away.
    """
    cfg = inputs.cfg.train
    size = cfg.group_size
    n_prompts = len(inputs.prompts)
    chosen = epoch_prompt_indices(n_prompts, cfg.groups_per_epoch, epoch, inputs.cfg.seed, inputs.cfg.prompts.order)
    mine = list(range(inputs.rank, cfg.groups_per_epoch, inputs.world))
    prompts = [inputs.prompts[chosen[g]] for g in mine for _ in range(size)]
    group_ids = torch.tensor([g for g in mine for _ in range(size)])
    row_ids = torch.tensor([g * size + j for g in mine for j in range(size)])
    kern = inputs.kernel_for_epoch(epoch)
    row_seeds = [seeds.rollout_seed(inputs.cfg.seed, epoch, r) for r in row_ids.tolist()]
    metadata = inputs.metadata(prompts)
    images: list[torch.Tensor] = []
    pending: list[Any] = []

    def submit(rows: slice, final: torch.Tensor) -> None:
        with torch.no_grad():
            images.append(inputs.policy.decode(final))
        if pending and isinstance(pending[-1], _FailedSubmit):
            return  # the epoch cannot be scored: score() raises the first failure
        try:
            # a pairwise reward compares the samples of a group: it is told each row's group
            grouped = {"groups": group_ids[rows].tolist()} if getattr(inputs.rewards, "wants_groups", False) else {}
            pending.append(inputs.rewards.submit(images[-1], prompts[rows], metadata[rows], **grouped))
        except Exception as exc:  # any failure of a reward stops the run after a checkpoint (see score)
            pending.append(_FailedSubmit(exc))

    keeps = ALGORITHM_TABLE[inputs.cfg.algorithm.name].keeps
    # train.latents_dtype / train.latents_on_cpu: the trajectories (not a final-sample algorithm's last latents)
    store_dtype = torch.bfloat16 if cfg.latents_dtype == "bfloat16" else torch.float32
    store_device = "cpu" if cfg.latents_on_cpu else None
    inputs.model.eval()
    with inputs.rollout_weights():  # e.g. DiffusionNFT's old policy
        cond, latents, means, log_probs = sample(
            inputs.policy,
            prompts,
            kern,
            row_seeds,
            chunk=cfg.rollout_batch_size,
            autocast=inputs.accelerator.autocast,
            store=keeps == "trajectory",
            on_chunk=submit,
            init_seeds=inputs.initial_seeds(row_seeds, size),
            store_dtype=store_dtype,
            store_device=store_device,
        )
    if keeps != "trajectory":
        latents = latents[:, None]  # (B, 1, ...): the final latents as the last (only) step
        log_probs = log_probs[:, :0].clone()  # (B, 0): no step is trained, so no log-prob is kept
    return RolloutBatch(
        prompts, metadata, group_ids, row_ids, cond, latents, means, log_probs, kern, torch.cat(images), pending
    )


def stored_rows(stored: torch.Tensor, device: torch.device, *index: torch.Tensor) -> torch.Tensor:
    """``stored[index]`` in float32 on ``device``: rows of latents or means kept elsewhere (``train.latents_on_cpu``)
    or in a lower precision (``train.latents_dtype``) brought to the device, one training forward's rows at a time."""
    rows = stored[tuple(i.to(stored.device) for i in index)]
    return rows.to(device=device, dtype=torch.float32, non_blocking=rows.is_pinned())


def wait_scores(rewards: RewardSet, batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """This process's reward components of ``batch``: the submitted chunks joined, or ``batch.images`` scored."""
    if batch.pending:
        return concat_components([p.result() for p in batch.pending])
    return rewards.score(batch.images, batch.prompts, batch.metadata)
