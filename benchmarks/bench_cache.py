"""Benchmark: epoch time and peak memory of training with ``data.cache`` memory / disk / none, each in a child.

    python -m benchmarks.bench_cache [--cases 40] [--iters 40] [--workers 0 2] [--threads 1] [--keep DIR]

Writes ``--cases`` training phantoms at the demo size (96×96×40 voxels, as ``medseg demo``; seed 2026) and
trains the demo recipe (``configs/demo.yaml``: Attention U-Net 8..128, patch 64×64×32, batch 1) for one epoch
of ``--iters`` iterations on the CPU, without a validation split, once per row, each in a fresh child process
with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = ``--threads`` (default 1: on 2 cores the DataLoader workers
need the other core, and OpenMP threads spin-waiting on each other make 2-thread timings erratic when other
work shares the CPU; see ``docs/speed.md``, section ``benchmarks.bench_cache``). The default, 40 iterations
of batch 1 over 40 cases, draws every case exactly once: a cold disk epoch preprocesses and writes each case
once.

Rows, for each ``--workers`` value (``data.num_workers``):

* ``memory`` — ``CacheDataset``: every case preprocessed into RAM before the epoch (in *setup*);
* ``disk (cold)`` — empty cache folder: each case preprocessed and written when first drawn (in *epoch*);
* ``disk (warm)`` — a new process on the folder the cold run filled: each case read back;
* ``none`` — every draw loads and preprocesses its case.

Columns: *setup* — from calling ``medseg.engine.train`` to its datasets being ready (the dataset fingerprint,
which reads every case in every mode, plus the memory cache); *epoch* — the epoch's training time as
``metrics.csv`` records it; *main RSS* — the child's peak resident memory (``ru_maxrss`` of
``getrusage(RUSAGE_SELF)`` in the child; what the parent reads with ``getrusage(RUSAGE_CHILDREN)``, as
``benchmarks/bench_segment.py`` does, when it is the largest process); *worker RSS* — the largest DataLoader
worker's peak (``RUSAGE_CHILDREN`` in the child); *tree PSS* — the peak of the summed proportional set size of
the child and its workers, sampled every 0.2 s from ``/proc/<pid>/smaps_rollup`` (shared pages counted
once: the memory the run really takes); *loss* — the epoch's mean loss: equal in every mode for one
``--workers`` value (same seed, same batches). It is a script, not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEMO_SHAPE = (96, 96, 40)  # the demo's phantoms (pipelines/demo.py)
ROWS = (("memory", "memory", False), ("disk (cold)", "disk", True), ("disk (warm)", "disk", False))
ROWS += (("none", "none", False),)


def _child(spec: dict) -> None:
    """Train one epoch as ``spec`` says; print one ``RESULT {json}`` line."""
    import torch

    from medseg.config import load_config, recipe_path
    from medseg.engine import train

    torch.set_num_threads(spec["threads"])
    cfg = load_config(recipe_path("demo"), spec["overrides"])
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def log(message: str) -> None:
        if message.startswith("data cache:"):
            marks["setup_s"] = time.perf_counter() - t0

    run = train(cfg, log=log)
    row = list(csv.DictReader((run / "metrics.csv").open()))[-1]
    result = {
        "setup_s": marks["setup_s"],
        "epoch_s": float(row["seconds"]),
        "loss": row["train_loss"],
        "main_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "worker_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from the parent ids in ``/proc/*/stat``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreePss:
    """Samples the summed PSS of a process and its descendants every ``interval`` s; ``peak_kib`` is the max."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _descendants(self.pid)))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def run_child(overrides: list[str], threads: int) -> dict:
    """One training epoch in a fresh child process; its ``RESULT`` plus the sampled tree PSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    spec = json.dumps({"overrides": overrides, "threads": threads})
    cmd = [sys.executable, "-m", "benchmarks.bench_cache", "--child", spec]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreePss(proc.pid)
    out, err = proc.communicate()
    tree_kib = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"child failed (exit {proc.returncode}):\n{out}\n{err}")
    result = json.loads(next(s for s in out.splitlines() if s.startswith("RESULT "))[7:])
    return {**result, "tree_pss_kib": tree_kib}


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="training phantoms (demo size)")
    parser.add_argument("--iters", type=int, default=40, help="iterations of the measured epoch (batch 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep the files")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(json.loads(args.child))
        return

    from medseg.data.phantoms import write_msd_dataset

    work = args.keep or Path(tempfile.mkdtemp(prefix="medseg_bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data, cache = work / "data", work / "cache"
        if not (data / "dataset.json").is_file():
            write_msd_dataset(data, args.cases, 0, shape=DEMO_SHAPE, seed=2026)
        size = sum(p.stat().st_size for p in data.rglob("*.nii.gz"))
        print(
            f"{args.cases} phantoms {'×'.join(map(str, DEMO_SHAPE))} ({size / 2**20:.0f} MiB .nii.gz); demo recipe, "
            f"1 epoch × {args.iters} iterations, batch 1, cpu, {args.threads} threads",
            flush=True,
        )
        header = f"{'data.cache':<13}{'workers':>8}{'setup s':>9}{'epoch s':>9}{'main RSS MiB':>14}"
        header += f"{'worker RSS MiB':>16}{'tree PSS MiB':>14}{'cache MiB':>11}{'loss':>9}"
        print(header, flush=True)
        for workers in args.workers:
            for label, mode, cold in ROWS:
                if cold:
                    shutil.rmtree(cache, ignore_errors=True)
                overrides = [
                    f"data.root={data}",
                    f"train.output={work / 'runs' / f'{mode}-{workers}'}",
                    f"data.cache={mode}",
                    f"data.cache_dir={cache}",
                    f"data.num_workers={workers}",
                    "data.val_fraction=0.0",
                    "train.epochs=1",
                    f"train.iters_per_epoch={args.iters}",
                    "train.device=cpu",
                    "train.progress=false",
                ]
                r = run_child(overrides, args.threads)
                on_disk = sum(p.stat().st_size for p in cache.rglob("*.pt")) if mode == "disk" else 0
                line = (
                    f"{label:<13}{workers:>8}{r['setup_s']:>9.1f}{r['epoch_s']:>9.1f}{_mib(r['main_rss_kib']):>14}"
                    f"{_mib(r['worker_rss_kib']) if workers else '-':>16}{_mib(r['tree_pss_kib']):>14}"
                    f"{on_disk / 2**20 if on_disk else 0:>11.0f}{float(r['loss']):>9.4f}"
                )
                print(line, flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
