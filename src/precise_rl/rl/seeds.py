"""Every random stream of a run, by name: one function per stream, each documenting its key.

A run draws all its randomness from generators seeded by hashing ``(run seed, ...)`` with
:func:`mix`, so that a sample, a prompt draw or an update plan depends on what it is (the epoch,
the row, the pass) and not on the process or the chunk that computes it, and a resumed run repeats
an uninterrupted one. Two streams must never hash the same key: the keys below differ in their
number of parts or in a constant tag, which :func:`stream_keys` lists for the test that checks it.

The keys of the streams that existed before this module (rollout noise, the shuffled prompt passes,
the update plan, the per-epoch global RNG, evaluation noise, the initial RNG) are kept exactly, so
that earlier runs and their checkpoints give the same numbers. One overlap among them is kept for
that reason and is harmless: evaluation row ``i``'s noise ``(seed, 7, i)`` and the shuffled pass
``k``'s permutation ``(seed, k, 5)`` share the key ``(seed, 7, 5)``; the one seeds a Gaussian draw,
the other a permutation of the prompts, and no statistic relates the two. Streams added since
(``random`` prompt order, the algorithms' training noise) carry a tag of their own.
"""

from __future__ import annotations

__all__ = [
    "mix",
    "init_seed",
    "epoch_torch_seed",
    "rollout_seed",
    "prompt_pass_seed",
    "prompt_draw_seed",
    "plan_seed",
    "eval_seed",
    "train_noise_seed",
    "fast_window_seed",
    "stream_keys",
]

_FNV_OFFSET = 1469598103934665603
_FNV_PRIME = 1099511628211

# Tags of the streams added with this module: 4-part keys whose second part is the tag (no key of the
# older streams has 4 parts with such a value there: their second part is an epoch or a row index).
TAG_PROMPT_DRAW = 0x5EED_0001
TAG_TRAIN_NOISE = 0x5EED_0002
TAG_FAST_WINDOW = 0x5EED_0003


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a-like; stable across runs, processes and platforms)."""
    h = _FNV_OFFSET
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * _FNV_PRIME) % (1 << 63)
    return h


def init_seed(seed: int) -> int:
    """torch's global RNG when a trainer is built (weight initialisation, e.g. LoRA's): ``(seed, 0xC0FFEE)``."""
    return mix(seed, 0xC0FFEE)


def epoch_torch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's global RNG at the start of an epoch on process ``rank`` (LoRA dropout): ``(seed, epoch, 4, rank)``."""
    return mix(seed, epoch, 4, rank)


def rollout_seed(seed: int, epoch: int, row: int) -> int:
    """Training row ``row``'s initial latent and step noise in epoch ``epoch``: ``(seed, epoch, 2, row)``."""
    return mix(seed, epoch, 2, row)


def prompt_pass_seed(seed: int, k: int) -> int:
    """The permutation of the prompt set for pass ``k`` (``prompts.order: shuffled``): ``(seed, k, 5)``."""
    return mix(seed, k, 5)


def prompt_draw_seed(seed: int, epoch: int) -> int:
    """Epoch ``epoch``'s draw with replacement (``prompts.order: random``): ``(seed, TAG_PROMPT_DRAW, epoch, 0)``."""
    return mix(seed, TAG_PROMPT_DRAW, epoch, 0)


def plan_seed(seed: int, epoch: int, inner: int) -> int:
    """The member order of the update plan of pass ``inner`` of epoch ``epoch``: ``(seed, epoch, 3, inner)``."""
    return mix(seed, epoch, 3, inner)


def eval_seed(seed: int, row: int) -> int:
    """Evaluation row ``row``'s noise (the same at every evaluation: fixed noise): ``(seed, 7, row)``."""
    return mix(seed, 7, row)


#: the ``item`` of :func:`train_noise_seed` for a row's draws that are not per item (e.g. its times)
ROW_ITEM = 0xFFFF


def train_noise_seed(seed: int, epoch: int, inner: int, row: int, item: int = ROW_ITEM) -> int:
    """An algorithm's training noise for global unit ``row``, item ``item``, in pass ``inner`` of epoch ``epoch``.

    For the algorithms that train on freshly noised samples (times and noise drawn per row, e.g.
    DiffusionNFT, AWM, DPO): ``(seed, TAG_TRAIN_NOISE, epoch, inner, row, item)``; ``item`` is the
    row's trained time (its noise), or :data:`ROW_ITEM` for what is drawn once per row (its times).
    Per row, not per process or micro-batch: a row gets the same noise on any number of processes
    and after a resume.
    """
    return mix(seed, TAG_TRAIN_NOISE, epoch, inner, row, item)


def fast_window_seed(seed: int, epoch: int) -> int:
    """Flow-GRPO-Fast's window start in epoch ``epoch`` (all processes): ``(seed, TAG_FAST_WINDOW, epoch, 0)``."""
    return mix(seed, TAG_FAST_WINDOW, epoch, 0)


def stream_keys(seed: int, epochs: int, rows: int) -> dict[str, list[tuple[int, ...]]]:
    """Each stream's keys over ``epochs`` epochs and ``rows`` rows (for the test that no two streams share one)."""
    r, e = range(rows), range(epochs)
    return {
        "init": [(seed, 0xC0FFEE)],
        "epoch_torch": [(seed, i, 4, k) for i in e for k in range(4)],
        "rollout": [(seed, i, 2, j) for i in e for j in r],
        "prompt_pass": [(seed, k, 5) for k in e],
        "prompt_draw": [(seed, TAG_PROMPT_DRAW, i, 0) for i in e],
        "plan": [(seed, i, 3, k) for i in e for k in range(4)],
        "eval": [(seed, 7, j) for j in r],
        "train_noise": [
            (seed, TAG_TRAIN_NOISE, i, k, j, m) for i in e for k in range(2) for j in r for m in (0, ROW_ITEM)
        ],
        "fast_window": [(seed, TAG_FAST_WINDOW, i, 0) for i in e],
    }
