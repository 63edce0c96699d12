"""The console entry point's quick exit (:func:`pipelines.cli.main`): exit codes, flushed output and exit
handlers survive skipping the interpreter teardown; a live thread gets the normal exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROGRAM = """
import atexit, sys, threading, time
import pipelines.cli as cli
atexit.register(lambda: print("exit handler ran", flush=True))
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
cli.main(sys.argv[2:])
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_success_keeps_every_line_of_output_and_runs_exit_handlers():
    out = _run("plain", "segment", "--help")
    assert out.returncode == 0, out.stderr
    assert "--precision" in out.stdout and out.stdout.rstrip().endswith("exit handler ran")


def test_a_failing_command_keeps_its_exit_code_and_error_line(tmp_path):
    out = _run("plain", "segment", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o"),
               "-m", str(tmp_path / "none.pt"))  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("error:")], out.stderr
    assert "Traceback" not in out.stderr and "exit handler ran" in out.stdout


def test_a_live_thread_gets_the_normal_exit_that_joins_it():
    out = _run("thread", "segment", "--help")
    assert out.returncode == 0, out.stderr
    assert "thread finished" in out.stdout and "exit handler ran" in out.stdout
