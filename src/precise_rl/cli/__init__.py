"""The ``precise-rl`` command line: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import NoReturn

from ..errors import UserError

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fidelity": (
        "precise_rl.cli.fidelity",
        "exact and Monte Carlo fidelity report of every sampler (tables, JSON, PNG plots)",
    ),
    "train": (
        "precise_rl.cli.train",
        "RL post-training with any algorithm and sampler (default: GRPO on the built-in digits task, offline)",
    ),
    "eval": ("precise_rl.cli.eval", "score a trained run on held-out prompts with chosen samplers and steps"),
    "compare": (
        "precise_rl.cli.compare",
        "train one recipe with every sampler (and --algorithms) over seeds; reward against wall-clock and model "
        "evaluations",
    ),
    "study": (
        "precise_rl.cli.study",
        "sampler study over step counts and time grids: where precise reaches the target faster, with fidelity",
    ),
    "models": (
        "precise_rl.cli.models",
        "list the models (built-in and diffusers adapters) with pipeline, guidance and time grid; --memory: what "
        "the memory options take off the device for the real checkpoints",
    ),
    "bench": (
        "precise_rl.cli.bench",
        "rollout images/s, training s/image and peak memory of a real architecture (random weights, no download)",
    ),
    "sample": ("precise_rl.cli.sample", "generate images with any sampler (diffusers pipeline or built-in model)"),
    "serve-reward": (
        "precise_rl.cli.serve_reward",
        "serve a registered reward over HTTP for 'remote' rewards (needs the 'serve' extra)",
    ),
    "probe-judge": (
        "precise_rl.cli.probe_judge",
        "check a vision-language judge server (health, model list, one scored image) before training with vlm_judge",
    ),
    "pretrain": (
        "precise_rl.cli.pretrain",
        "regenerate a built-in task's shipped weights (digits: model and classifiers; signs: its text-to-image model)",
    ),
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that subcommand's module is imported (the others get a stub).

    Importing every subcommand would import torch, diffusers and transformers (seconds) before
    ``--help`` or a config error could be answered; each module imports them only when it runs.
    """
    parser = _Parser(
        prog="precise-rl",
        description="RL post-training of flow-matching image generators with SDE-consistent stochastic samplers.",
        epilog=_tables_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"precise-rl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)  # listed in --help; never parses (another command was given)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def _tables_text() -> str:
    """The algorithms and samplers, from their tables (which load without torch)."""
    from ..algorithm_table import ALGORITHM_TABLE
    from ..sde.samplers import SAMPLER_TABLE

    lines = ["algorithms (algorithm.name=...):"]
    for a in ALGORITHM_TABLE.values():
        takes = "stochastic samplers" if a.samplers == "stochastic" else "any sampler"
        lines.append(f"  {a.name:<14} {a.summary} [{takes}; default {a.default_sampler}]")
    lines.append("samplers (sampler.name=...):")
    for s in SAMPLER_TABLE.values():
        lines.append(f"  {s.name:<14} {s.summary}")
    return "\n".join(lines)


def _command_of(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` (the first word that is no flag), or "" when there is none."""
    return next((a for a in argv if not a.startswith("-")), "")


#: seconds a launched process waits to leave its process group before it exits without leaving
LEAVE_TIMEOUT_S = 60.0


def _leave_process_group() -> bool:
    """Under a distributed launch, leave the process group before exiting (done, or on an agreed error).

    Exiting with it still open may abort the process (SIGABRT from the communication threads:
    "terminate called without an active exception") instead of ending with its exit code. Leaving
    can itself hang (seen once with gloo on a loaded machine: both processes in
    ``destroy_process_group`` after an agreed error): after ``LEAVE_TIMEOUT_S`` the process gives up
    and exits at once with the code already decided. Returns whether there was a group to leave.
    """
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return False
    except Exception:
        return False
    left = threading.Event()

    def leave() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # leaving is best effort: the error message is already out
            pass
        finally:
            left.set()

    threading.Thread(target=leave, name="leave-process-group", daemon=True).start()
    if not left.wait(LEAVE_TIMEOUT_S):
        print(
            f"precise-rl: leaving the process group did not finish within {LEAVE_TIMEOUT_S:.0f} s; exiting without it",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code[0])  # the interpreter's teardown would wait on the same group
    return True


#: the exit code main() returns, for an exit that cannot wait for the interpreter's teardown
_exit_code = [0]
#: the exit code when the reader of standard output went away: a shell's for a command ended by SIGPIPE
PIPE_CLOSED_EXIT = 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: this process's arguments); returns the exit code."""
    try:
        try:
            return _main(argv)
        finally:  # also after --help's SystemExit: a closed pipe is met here, not in the interpreter's teardown
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        # The reader left (``precise-rl models --json | head -c 600``): stop quietly, as other command-line
        # tools do. What is still buffered for the closed pipe goes nowhere, or the interpreter's last
        # flush would raise again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _exit_code[0] = PIPE_CLOSED_EXIT
        return PIPE_CLOSED_EXIT


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Overrides may follow flags (``train CONFIG --output DIR key=value``): argparse leaves them over.
        if isinstance(getattr(args, "items", None), list) and not any(e.startswith("-") for e in extra):
            args.items.extend(extra)
        else:  # one line naming the subcommand, exit code 2
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    with _naming_sigterm(args):
        return _run_command(args)


@contextlib.contextmanager
def _naming_sigterm(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs in one process: SIGTERM first names where a run can go on from, then ends it as before.

    The process still dies by SIGTERM with nothing cleaned up (a run killed so resumes bit-identically),
    but the user learns the last checkpoint and the command that continues it, as after Ctrl-C. Under
    a distributed launch the launcher owns SIGTERM (it stops the other processes with it) and nothing is
    changed; nor where the signal is not this process's default (an embedding program set its own).
    """
    import signal

    one_process = os.environ.get("WORLD_SIZE", "").strip() in ("", "1")  # read here: rl.dist imports torch
    if (
        not one_process
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def name_and_die(signum: int, frame: object) -> None:
        where = ""
        run_dir = getattr(args, "_run_dir", None)
        if run_dir is not None:
            try:
                from ..rl.rundir import resume_hint

                where = f"; {resume_hint(run_dir)}"
            except Exception:  # the signal must end the process whatever the hint's trouble
                pass
        try:
            print(f"precise-rl {args.command}: terminated (SIGTERM){where}", file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, name_and_die)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_command(args: argparse.Namespace) -> int:
    try:
        code = _exit_code[0] = int(args._run(args) or 0)
        _leave_process_group()  # a launched process that exits with its group open may abort in teardown
        return code
    except UserError as exc:
        print(f"precise-rl {args.command}: error: {exc}", file=sys.stderr)
        _exit_code[0] = 2
        if _leave_process_group():
            # A launched process stopping on an error ends here: in the interpreter's teardown the communication
            # threads of a peer that already left can abort it ("terminate called without an active exception",
            # SIGABRT) or hang it, seen in the two-process fault tests; the error is out and the files closed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        where = ""
        run_dir = getattr(args, "_run_dir", None)  # set by train once it knows its directory
        if run_dir is not None:
            from ..rl.rundir import resume_hint

            where = f"; {resume_hint(run_dir)}"
        print(f"precise-rl {args.command}: interrupted{where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
