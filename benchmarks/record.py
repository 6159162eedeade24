"""Recording a benchmark run in ``benchmarks/RESULTS.md``: what it printed, the command, the machine.

``python -m benchmarks NAME ...`` tees the benchmark's standard output; when it exits 0 (and was not a
``--smoke`` or ``--no-record`` run) the output goes into RESULTS.md's "Recorded runs" part as a section
keyed by benchmark, arguments and machine: a later run of the same command on the same machine
replaces its section, any other run adds one. The hand-written readings above that part stay as they are.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
PART = "## Recorded runs"
_INTRO = ("Written by `python -m benchmarks NAME ...` (not by hand): each section is one run's printed output, "
          "under the command and the machine it ran on. A rerun of the same command on the same machine "
          "replaces its section.")


def machine() -> str:
    """One line: accelerator (or CPU model), core count, memory, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = float("nan")
    parts = [f"{os.cpu_count()} x {cpu}", f"{mem_gib:.0f} GiB", f"Python {platform.python_version()}"]
    if "torch" in sys.modules:  # the benchmark imported it; do not import torch just to name the machine
        torch = sys.modules["torch"]
        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.insert(0, f"GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")
    return ", ".join(parts)


class Tee:
    """A text stream that writes to ``stream`` and keeps a copy."""

    def __init__(self, stream: TextIO):
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        return "".join(self.parts)


def section(name: str, argv: list[str], host: str, output: str, when: datetime) -> tuple[str, str]:
    """(key line, whole section) for one run."""
    command = " ".join(["python -m benchmarks", name, *argv])
    key = f"### `{command}` on {host}"
    body = "\n".join([key, "", f"Run {when.strftime('%Y-%m-%d %H:%M UTC')}.", "",
                      "```", output.rstrip("\n"), "```", ""])
    return key, body


def record(name: str, argv: list[str], output: str, path: Path = RESULTS) -> Path:
    """Put this run's section into ``path`` (replacing the same command's on the same machine)."""
    key, body = section(name, argv, machine(), output, datetime.now(timezone.utc))
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    if PART not in text:
        text = text.rstrip("\n") + f"\n\n{PART}\n\n{_INTRO}\n"
    head, _, runs = text.partition(PART + "\n")
    # sections start with '### ' at the beginning of a line; keep every other one
    chunks = re.split(r"(?m)^(?=### )", runs)
    kept = [c for c in chunks if not c.startswith(key + "\n")]
    runs = "".join(kept).rstrip("\n") + "\n\n" + body
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(head + PART + "\n" + runs, encoding="utf-8")
    os.replace(tmp, path)
    return path
