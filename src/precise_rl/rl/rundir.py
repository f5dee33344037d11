"""Run directories that are never clobbered and never written by two processes at once.

Two guarantees, for every command that writes a run directory (``train``, ``train --resume``,
``eval``; ``compare`` for each of its runs):

* **One writer.** :func:`lock_run_dir` takes an exclusive ``flock`` on ``DIR/.precise-rl.lock``
  for as long as the command runs. The kernel drops the lock when the process exits in any way
  (an error, Ctrl-C, SIGTERM, kill -9), so a lock left by a dead process is never in the way; the
  file keeps the holder's pid and command only to name it in the message. A lock taken on a file
  that was removed meanwhile (a failed start removes the directory it made) is dropped and taken
  again on the file now in place, so two processes never hold locks on two different files.
* **No clobbering.** :func:`check_fresh_run_dir` refuses a directory that already holds a run
  (a checkpoint, a summary, or the metrics of a trained epoch) unless the command continues that
  very run (``--resume``) or the user asked to overwrite it; :func:`clear_run_dir` then removes the
  old run's files first, so that the new run never mixes its records with the old ones and never
  prunes the old run's checkpoints as if they were its own.
* **Only its own files.** A fresh start first writes ``DIR/.precise-rl-run.json``, the list of the
  names it is about to create. A later start deletes only those names; a directory holding anything
  else (a user's ``photo.png``, a ``samples/`` folder no start of this tool made, the experiment
  file itself) is refused by :func:`check_foreign_files` unless the user passes ``--overwrite``,
  and even then only the names a run writes are replaced. The experiment file being read is never
  among what is removed (:func:`check_keeps`).

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
    "MARKER_NAME",
    "RUN_OUTPUTS",
    "RunDirBusy",
    "lock_run_dir",
    "holds_run",
    "check_fresh_run_dir",
    "check_foreign_files",
    "check_keeps",
    "foreign_files",
    "check_output_path",
    "clear_run_dir",
    "prepare_run_dir",
    "is_main_launch_process",
    "resume_hint",
    "discard_unresumable",
]

LOCK_NAME = ".precise-rl.lock"
#: written first by a fresh start: the names in the directory that this tool created (and may delete)
MARKER_NAME = ".precise-rl-run.json"

#: what a run writes; a directory holds a run when it has a checkpoint, a summary or a trained epoch's metrics
RUN_OUTPUTS = (
    "metrics.jsonl",
    "summary.json",
    "config.yaml",
    "checkpoints",
    "tensorboard",
    "samples",
    "reward_curve.png",
    "eval.json",
    "wandb",
    # written aside and renamed into place: left only by a run killed in between
    "config.yaml.tmp",
    "metrics.jsonl.tmp",
)
_SHOWN_OUTPUTS = [n for n in RUN_OUTPUTS if not n.endswith(".tmp")]
#: the outputs a run makes as directories: a file of that name is the user's, never removed
_RUN_DIRS = ("checkpoints", "tensorboard", "samples", "wandb")


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
    for _ in range(10):
        f = _open_lock(path, directory, if_writable)
        if f is None:
            yield directory
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(
                    f"run directory {str(directory)!r} is in use by {_holder(path)}; wait for it to end "
                    "or choose another --output"
                ) from None
            # A file system without locks (some network mounts): say so rather than run unguarded.
            raise UserError(
                f"cannot lock run directory {str(directory)!r} ({exc.strerror or exc}); put runs on a local file system"
            ) from None
        # The holder before us may have removed the file (a failed start cleans its directory up):
        # a lock on a file no longer at ``path`` excludes nobody, so take the one that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except OSError:
            same = False
        if same:
            break
        f.close()
        _make_dir(directory)
    else:
        raise UserError(f"cannot lock run directory {str(directory)!r}: its lock file keeps being replaced")
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}))
        f.flush()
        yield directory
    finally:
        f.close()  # closing the descriptor releases the flock


def _open_lock(path: Path, directory: Path, if_writable: bool) -> IO[str] | None:
    try:
        return open(path, "a+")  # noqa: SIM115 - held open for the whole block
    except OSError as exc:
        if if_writable and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise UserError(f"cannot write to output directory {str(directory)!r}: {exc.strerror or exc}") from None


def holds_run(directory: str | Path) -> list[str]:
    """What in ``directory`` makes it a run worth keeping (empty when it holds none).

    A checkpoint (something to resume), a summary (a finished run) or the metrics of a trained
    epoch. What a start that never trained leaves (its config, the metrics of the evaluation
    before training, empty folders) is no run: nothing would be lost by starting again.
    """
    from .checkpoint import list_checkpoints
    from .logging import read_metrics

    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    if list_checkpoints(directory / "checkpoints"):
        found.append("checkpoints")
    if (directory / "summary.json").is_file():
        found.append("summary.json")
    try:
        trained = any(int(r.get("epoch", 0)) > 0 for r in read_metrics(directory / "metrics.jsonl"))
    except (UserError, TypeError, ValueError):
        trained = True  # an unreadable metrics file is kept for the user to look at
    if trained:
        found.append("metrics.jsonl")
    return found


def check_fresh_run_dir(directory: str | Path, flag: str = "--overwrite", resume_hint: bool = True) -> None:
    """Refuse ``directory`` when it holds a run: one sentence naming what is there and what to pass."""
    found = holds_run(directory)
    if found:
        from .checkpoint import list_checkpoints

        can_resume = resume_hint and bool(list_checkpoints(Path(directory) / "checkpoints"))
        how = f"continue it with --resume {directory} or " if can_resume else ""
        raise UserError(
            f"output directory {str(directory)!r} already holds a run ({', '.join(found)}); "
            f"{how}pass {flag} to replace it, or choose another --output"
        )


def check_output_path(text: str | Path | None, flag: str = "--output") -> None:
    """Refuse an empty output path: ``Path("")`` is the current directory, which nobody means by it."""
    if text is not None and not str(text).strip():
        raise UserError(f"{flag} is empty; give a directory path (e.g. {flag} runs/my-run)")


def _own_names(directory: Path) -> set[str]:
    """The names an earlier start of this tool created in ``directory`` (from its marker; none without one)."""
    try:
        data = json.loads((directory / MARKER_NAME).read_text())
        names = data["created"]
        return {n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def foreign_files(directory: str | Path) -> list[str]:
    """What in ``directory`` no start of this tool created there (``name/`` for a folder), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    own = _own_names(directory) | {LOCK_NAME, MARKER_NAME}
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read output directory {str(directory)!r}: {exc.strerror or exc}") from None
    return [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in entries if p.name not in own]


def check_foreign_files(directory: str | Path, flag: str = "--overwrite") -> None:
    """Refuse ``directory`` when it holds anything an earlier start of this tool did not write there."""
    found = foreign_files(directory)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise UserError(
            f"output directory {str(directory)!r} holds files precise-rl did not write ({shown}); choose a new or "
            f"empty --output, or pass {flag} to replace what a run writes there ({', '.join(_SHOWN_OUTPUTS)}) and "
            "keep the rest"
        )


def _removed_names(directory: Path, overwrite: bool) -> list[str]:
    """The names a fresh start removes: its earlier starts' own, or with ``overwrite`` every name a run writes."""
    own = _own_names(directory)
    return [n for n in RUN_OUTPUTS if n in own or overwrite]


def check_keeps(directory: str | Path, keep: list[Path], overwrite: bool) -> None:
    """Refuse to start when a file the command reads (the experiment file) would be removed or overwritten."""
    directory = Path(directory)
    doomed = [directory / n for n in _removed_names(directory, overwrite)]
    # the new run writes config.yaml whatever was there before
    doomed.append(directory / "config.yaml")
    for path in keep:
        try:
            target = path.resolve()
        except OSError:
            continue
        for d in doomed:
            try:
                d_real = d.resolve()
            except OSError:
                continue
            if target == d_real or d_real in target.parents:
                raise UserError(
                    f"the experiment file {str(path)!r} is inside the output directory where the run writes "
                    f"{d.name!r} and would be overwritten; choose another --output"
                )


def clear_run_dir(directory: str | Path, names: tuple[str, ...] | list[str] = RUN_OUTPUTS) -> None:
    """Remove what a run wrote in ``directory`` (and nothing else), before a new run starts there.

    Only ``names`` (by default every name a run writes) are touched, and of those a run makes as
    folders only folders: a user's file that happens to be called ``checkpoints`` stays (the trainer
    then names it).
    """
    directory = Path(directory)
    for name in names:
        p = directory / name
        try:
            if p.is_symlink():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            elif p.exists() and name not in _RUN_DIRS:
                p.unlink()
        except OSError as exc:
            raise UserError(f"cannot remove the old run's {str(p)!r}: {exc.strerror or exc}") from None


def _write_marker(directory: Path) -> None:
    """Record, before anything else is written, the names this start will create (those not there now)."""
    _make_dir(directory)
    created = [n for n in RUN_OUTPUTS if not os.path.lexists(directory / n)]
    tmp = directory / (MARKER_NAME + ".tmp")
    try:
        tmp.write_text(json.dumps({"tool": "precise-rl", "created": created}))
        os.replace(tmp, directory / MARKER_NAME)
    except OSError as exc:
        raise UserError(f"cannot write to output directory {str(directory)!r}: {exc.strerror or exc}") from None


def prepare_run_dir(
    directory: str | Path,
    *,
    resuming: bool,
    overwrite: bool,
    flag: str = "--overwrite",
    keep: list[Path] | None = None,
) -> None:
    """Under the lock: keep ``directory`` for a resumed run; else refuse a run in it or clear it for a new one.

    A fresh start refuses a directory holding a run, or anything no earlier start of this tool wrote,
    unless ``overwrite``; it removes only the names its earlier starts recorded (with ``overwrite``:
    the names a run writes), never a file in ``keep`` (the experiment file), and records what it
    will create before it writes anything. The leftovers of an earlier start that trained nothing
    are cleared too, so that a new run never mixes its logs with them.
    """
    if resuming:
        return
    directory = Path(directory)
    check_keeps(directory, list(keep or []), overwrite)
    if not overwrite:
        check_fresh_run_dir(directory, flag)
        check_foreign_files(directory, flag)
    clear_run_dir(directory, _removed_names(directory, overwrite))
    _write_marker(directory)


def command_line() -> str:
    """This process's command, short enough to name in a message."""
    text = " ".join(["precise-rl", *sys.argv[1:]]) if sys.argv else "precise-rl"
    return text if len(text) <= 120 else text[:117] + "..."


def resume_hint(out: Path) -> str:
    """Where training can go on from: the newest checkpoint and the command, or that there is none."""
    from .checkpoint import list_checkpoints

    ckpts = list_checkpoints(Path(out) / "checkpoints")
    if not ckpts:
        return "no checkpoint was written yet"
    return f"the last checkpoint is {str(ckpts[-1])!r}; continue with: precise-rl train --resume {out}"


def discard_unresumable(out: Path, existed: bool) -> None:
    """After a failed start in a directory this command made: remove it when it holds no run.

    A start that stopped before it trained anything left only its config and empty folders; the
    directory would otherwise stay behind half-made. A directory that was there before is left as
    it is (its leftovers are cleared by the next start), and so is any run with something to keep.
    """
    if existed:
        return
    try:
        if not holds_run(out):
            shutil.rmtree(out, ignore_errors=True)
    except (OSError, UserError):
        pass  # best effort: the error being raised matters more
