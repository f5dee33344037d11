"""Path arguments of the command line: an empty path is refused, never read as the current directory."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["path_arg"]


def path_arg(text: str) -> Path:
    """argparse ``type`` for a path: ``Path("")`` would be ``.``, so an empty (or blank) value is an error."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return Path(text)
