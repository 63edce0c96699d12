"""What the benchmark scripts share: a command timed in a child process (torch-free, so a script's parent
process stays small while its children are measured)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def timed_child(cmd: Sequence[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Run ``cmd`` with its output in ``log``; return (wall seconds, the child's own peak RSS in GB, its output).

    The wall time is what a user of the command waits, start-up and exit included. The peak is the child's
    ``ru_maxrss`` from ``os.wait4`` — that process alone, not the largest of every child so far (what
    ``getrusage(RUSAGE_CHILDREN)`` gives).

    Raises:
        SystemExit: the command failed; the message holds its exit code and output.
    """
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(list(cmd), env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    output = Path(log).read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code}):\n{output}")
    return wall, usage.ru_maxrss / 2**20, output  # ru_maxrss is in KiB on Linux
