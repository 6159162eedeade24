"""A benchmark's child command (``synthmill run``), its output passed on to stderr line by line as it comes.

Captured and shown only at the end, a child's output is lost with it when the benchmark is stopped part-way
(a time limit on the whole command stops it): streamed, the log shows how far it got and what it said.
It goes to stderr, so the recorded results (stdout) stay as they were.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import time


def run_streamed(cmd: list[str], what: str, tail_lines: int = 60, **popen: object) -> tuple[float, str]:
    """Run ``cmd`` (``popen``: cwd, env, ...), copying each output line to stderr prefixed with ``what``;
    return (wall seconds, its last ``tail_lines`` lines). Raises RuntimeError with that tail if it fails."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          bufsize=1, **popen) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            sys.stderr.write(f"[{what}] {line}")
        code = proc.wait()
    seconds = time.perf_counter() - t0
    text = "".join(tail)
    if code != 0:
        raise RuntimeError(f"{what} exited with {code}: {' '.join(cmd)}\n{text}")
    return seconds, text


def rerun_under_cpu_malloc(module: str, argv: list[str]) -> int | None:
    """On a CPU, run the benchmark ``module`` again in a child process whose environment adds the malloc
    settings of synthmill's CPU actors and training workers (``synthmill.cluster.connect.CPU_MALLOC_ENV``;
    values already set here win, as for them; glibc reads them only at process start), so that a plain loop
    run in this process gets the allocator synthmill's side gets. Its output streams through this process's
    stdout (``python -m benchmarks`` records it); returns the child's exit code. None when this process
    already has them, or on a GPU, where synthmill's actors and workers do not get them."""
    import os

    from synthmill.cluster.connect import CPU_MALLOC_ENV

    if all(k in os.environ for k in CPU_MALLOC_ENV):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    from pathlib import Path

    env = {**CPU_MALLOC_ENV, **os.environ}
    print("CPU: rerun under synthmill's CPU actor malloc settings: "
          + " ".join(f"{k}={env[k]}" for k in CPU_MALLOC_ENV), flush=True)
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=Path(__file__).resolve().parent.parent,
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
    return proc.wait()
