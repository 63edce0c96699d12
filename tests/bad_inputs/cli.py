"""Running the real ``medseg`` CLI in a subprocess and checking its failure contract.

Every bad-input test goes through :func:`run_cli` (a fresh ``python -m pipelines.cli`` process, as a user
runs it: Click's "Aborted.", tracebacks and exit codes are real) and :func:`assert_one_error`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]


def run_cli(
    *args: object, cwd: Path | None = None, timeout: float = 300, launcher: tuple[object, ...] = ()
) -> Result:
    """``medseg ARGS...`` in a new process (one thread, no colour), returning exit code and output.

    ``launcher``: what runs ``-m pipelines.cli ARGS`` instead of the plain interpreter, e.g.
    ``(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")`` or a wrapper script
    ``(sys.executable, "-c", CODE, extra)`` that measures the child.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [*map(str, launcher or (sys.executable,)), "-m", "pipelines.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_error(result: Result, *names: object, cause: str | None = None) -> str:
    """Non-zero exit, exactly one ``error:`` line, naming every one of ``names`` (and ``cause`` if given),
    no traceback and no Click "Aborted."; returns the line."""
    assert result.code != 0, result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output, result.output
    lines = result.error_lines()
    assert len(lines) == 1, f"expected one error line, got {lines}\n{result.output}"
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in {lines[0]!r}"
    if cause is not None:
        assert cause.lower() in lines[0].lower(), f"{cause!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_temp_files(folder: Path) -> None:
    """No temporary file of an interrupted or failed write is left anywhere under ``folder``."""
    stale = [p for p in Path(folder).rglob("*") if p.name.startswith(".tmp-")]
    assert not stale, f"stale temporary files: {stale}"
