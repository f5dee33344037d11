"""Run directories that are never clobbered and never written by two processes at once.

Two guarantees, for every command that writes a run directory (``train``, ``train --resume``,
``eval``; ``compare`` for each of its runs):

* **One writer.** :func:`lock_run_dir` takes an exclusive ``flock`` on ``DIR/.precise-rl.lock``
  for as long as the command runs. The kernel drops the lock when the process exits in any way
  (an error, Ctrl-C, SIGTERM, kill -9), so a lock left by a dead process is never in the way; the
  file keeps the holder's pid and command only to name it in the message. The file itself is
  never deleted: removing it while another process waits on it would let two processes hold
  locks on two different files.
* **No clobbering.** :func:`check_fresh_run_dir` refuses a directory that already holds a run
  (metrics, summary, config or checkpoints) unless the command continues that very run
  (``--resume``) or the user asked to overwrite it; :func:`clear_run_dir` then removes the old
  run's files first, so that the new run never mixes its records with the old ones and never
  prunes the old run's checkpoints as if they were its own.

Only the main process of a launch takes the lock (:func:`is_main_launch_process`): the others
share the directory with it by design and write nothing there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import UserError

__all__ = [
    "LOCK_NAME",
    "RUN_MARKERS",
    "RunDirBusy",
    "lock_run_dir",
    "holds_run",
    "check_fresh_run_dir",
    "clear_run_dir",
    "prepare_run_dir",
    "is_main_launch_process",
]

LOCK_NAME = ".precise-rl.lock"

#: files and folders whose presence means a directory holds a run (what a run writes)
RUN_MARKERS = ("metrics.jsonl", "summary.json", "config.yaml", "checkpoints")

#: what :func:`clear_run_dir` removes: everything a run writes, nothing else
RUN_OUTPUTS = (*RUN_MARKERS, "tensorboard", "samples", "reward_curve.png", "eval.json", "wandb")


class RunDirBusy(UserError):
    """Another live process holds the run directory's lock."""


def is_main_launch_process() -> bool:
    """True unless this process is a non-main rank of a distributed launch (torchrun / accelerate)."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value) == 0
    return True


def _holder(path: Path) -> str:
    """Who holds the lock, as written in the lock file (best effort: it may be mid-write)."""
    try:
        info = json.loads(path.read_text())
        return f"process {int(info['pid'])} ({info.get('command', 'precise-rl')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _make_dir(directory: Path) -> None:
    blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"cannot write to output directory {str(directory)!r}: {str(blocker)!r} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to output directory {str(directory)!r}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def lock_run_dir(directory: str | Path, command: str = "precise-rl", if_writable: bool = False) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (made if missing) for the ``with`` block.

    Raises :class:`RunDirBusy` at once, naming the holder, when a live process holds it (no
    waiting: two runs of one directory are a mistake to report, not to queue). With
    ``if_writable`` a directory this process may not write (a read-only share that ``eval`` only
    reads) is used without a lock, since nothing will be written there.
    """
    import fcntl

    directory = Path(directory)
    _make_dir(directory)
    path = directory / LOCK_NAME
    try:
        f: IO[str] = open(path, "a+")  # noqa: SIM115 - held open for the whole block
    except OSError as exc:
        if if_writable and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            yield directory
            return
        raise UserError(f"cannot write to output directory {str(directory)!r}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(
                    f"run directory {str(directory)!r} is in use by {_holder(path)}; wait for it to end "
                    "or choose another --output"
                ) from None
            # A file system without locks (some network mounts): say so rather than run unguarded.
            raise UserError(
                f"cannot lock run directory {str(directory)!r} ({exc.strerror or exc}); put runs on a local file system"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}))
        f.flush()
        yield directory
    finally:
        f.close()  # closing the descriptor releases the flock


def holds_run(directory: str | Path) -> list[str]:
    """The run files found in ``directory`` (empty when it holds no run)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for name in RUN_MARKERS:
        p = directory / name
        if name == "checkpoints":
            if p.is_dir() and any(c.name.startswith("epoch_") for c in p.iterdir()):
                found.append(name)
        elif p.exists():
            found.append(name)
    return found


def check_fresh_run_dir(directory: str | Path, flag: str = "--overwrite", resume_hint: bool = True) -> None:
    """Refuse ``directory`` when it holds a run: one sentence naming what is there and what to pass."""
    found = holds_run(directory)
    if found:
        how = f"continue it with --resume {directory} or " if resume_hint else ""
        raise UserError(
            f"output directory {str(directory)!r} already holds a run ({', '.join(found)}); "
            f"{how}pass {flag} to replace it, or choose another --output"
        )


def clear_run_dir(directory: str | Path) -> None:
    """Remove what a run wrote in ``directory`` (and nothing else), for an explicit overwrite."""
    directory = Path(directory)
    for name in RUN_OUTPUTS:
        p = directory / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        except OSError as exc:
            raise UserError(f"cannot remove the old run's {str(p)!r}: {exc.strerror or exc}") from None


def prepare_run_dir(directory: str | Path, *, resuming: bool, overwrite: bool, flag: str = "--overwrite") -> None:
    """Under the lock: refuse, clear or keep ``directory`` for a new run or a resumed one."""
    if resuming:
        return
    if overwrite:
        clear_run_dir(directory)
    else:
        check_fresh_run_dir(directory, flag)


def command_line() -> str:
    """This process's command, short enough to name in a message."""
    text = " ".join(["precise-rl", *sys.argv[1:]]) if sys.argv else "precise-rl"
    return text if len(text) <= 120 else text[:117] + "..."
