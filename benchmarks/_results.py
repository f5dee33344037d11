"""Where a benchmark puts its published table: ``benchmarks/results/NAME.md``.

``docs/benchmarks.md`` includes these files, so the page shows what the script measured, under a line
naming the command, the machine and the date, and a rerun replaces it: no table on the page is copied
from a terminal by hand. A smoke run (``--quick``) writes nothing, so it cannot replace a full run's
table. Not a benchmark itself (``./dev.sh bench`` skips names that start with ``_``).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_LOAD_AT_START = os.getloadavg()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> str:
    """The machine in words: the device, the CPU and its core count, torch, and the load around the run."""
    device = torch.device(device)
    parts = []
    if device.type == "cuda":
        parts.append(f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    parts.append(f"{_cpu()}, {os.cpu_count()} cores")
    parts.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    end = os.getloadavg()
    parts.append(f"load average {_LOAD_AT_START[0]:.1f} at the start, {end[0]:.1f} at the end")
    return "; ".join(parts)


def write(name: str, body: str, device: torch.device | str = "cpu") -> Path:
    """Write ``body`` (Markdown) as benchmark ``name``'s table, under the line that says how it was made."""
    script = Path(sys.argv[0]).resolve()
    script_name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script.name
    command = shlex.join(["python", str(script_name), *sys.argv[1:]])
    today = datetime.date.today().isoformat()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(f"Measured by `{command}` on {today} ({machine(device)}):\n\n{body.rstrip()}\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path
