"""Benchmark: ``medseg node serve`` under load — 20 phantom CT series sent over 4 concurrent associations while
the node works; series per hour, the node's peak RSS, and 20/20 SEGs delivered exactly once.

    python -m benchmarks.node_load [--series 20] [--associations 4] [--shape 128 128 48] [--workers 1]
                                   [--model best.pt] [--keep DIR]

Set-up (not timed): ``--series`` phantom CTs (:mod:`medseg.data.phantoms`, ``--shape`` voxels, each another
seed) written as DICOM series (:func:`medseg.testing.dicom_series.write_ct_series`); a tiny model trained for
a few seconds on phantoms (the test suite's ``segmenting_run`` recipe) unless ``--model`` is given; a
pynetdicom Storage SCP in this process standing for the PACS (it counts every SOP Instance UID it receives).

Timed: the node is started (``medseg node serve --stable-seconds 2 --workers N --send dimse://PACS@…``, a
child process); once it listens, ``--associations`` threads C-STORE the series, each its share, one
association per series, all at once. The clock runs from the first C-STORE to the moment the last job is
``done`` in the node's database (every SEG acknowledged by the PACS), so it includes receiving, the stable
wait of each series, segmentation (model loaded per job by the batch core) and sending. Printed: wall time,
series per hour, the node's peak RSS (VmHWM of its process), the CPU model. Checked: 20 jobs ``done``, the
PACS holds exactly the node's SEG SOP Instance UIDs, each received once. It is a script, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_CMD = [sys.executable, "-m", "pipelines.cli", "node"]
TINY_TRAIN = [
    "model.filters=[4, 8, 16, 32, 64]", "augment.patch_size=[32, 32, 16]", "augment.samples_per_volume=1",
    "train.epochs=1", "train.iters_per_epoch=12", "optim.lr=0.02", "train.batch_size=1", "train.val_every=1",
    "train.progress=false", "infer.overlap=0.25", "data.val_fraction=0.5",
]  # fmt: skip


def _model(work: Path) -> Path:
    """The tests' ``segmenting_run`` recipe: a tiny Attention U-Net that segments phantoms (~30 s)."""
    from medseg.config import load_config
    from medseg.data.phantoms import write_msd_dataset
    from medseg.engine import train

    data, run = work / "train_phantoms", work / "model"
    if not (run / "best.pt").is_file():
        write_msd_dataset(data, num_train=4, num_test=0, shape=(48, 48, 24), seed=7)
        cfg = load_config(None, [*TINY_TRAIN, f"data.root={data}", f"train.output={run}"])
        train(cfg, log=lambda *_: None)
    return run / "best.pt"


def _series(work: Path, count: int, shape: tuple[int, int, int]) -> list[list[Path]]:
    import nibabel as nib
    import numpy as np

    from medseg.data.phantoms import write_msd_dataset
    from medseg.testing.dicom_series import write_ct_series

    data = work / "load_phantoms"
    if not (data / "dataset.json").is_file():
        write_msd_dataset(data, num_train=0, num_test=count, shape=shape, seed=100)
    series = []
    for i, image in enumerate(sorted((data / "imagesTs").glob("*.nii.gz"))[:count]):
        img = nib.load(image)
        volume = np.asarray(img.dataobj).round().astype(np.int16)
        written = write_ct_series(volume, img.affine, work / "dicom" / f"s{i:02d}", patient_id=f"LOAD{i:02d}")
        series.append(written.files)
    return series


class _Pacs:
    """A Storage SCP that counts the SOP Instance UIDs it receives."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import RTStructureSetStorage, SegmentationStorage

        self.arrivals: Counter[str] = Counter()
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SegmentationStorage)
        ae.add_supported_context(RTStructureSetStorage)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)]
        )
        self.url = f"dimse://PACS@127.0.0.1:{self.server.server_address[1]}"

    def _on(self, event) -> int:
        with self._lock:
            self.arrivals[event.dataset.SOPInstanceUID] += 1
        return 0


def _send(port: int, series: list[list[Path]], statuses: list[int]) -> None:
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    for files in series:
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSEG")
        statuses += [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
        assoc.release()


def _states(db: Path) -> Counter:
    con = sqlite3.connect(db, timeout=30)
    try:
        return Counter(r[0] for r in con.execute("SELECT state FROM jobs"))
    finally:
        con.close()


def _listening_port(log: Path, proc: subprocess.Popen) -> int:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"node exited with {proc.returncode}")
        if log.is_file():
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if event["event"] == "listening":
                    return int(event["port"])
        time.sleep(0.1)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?"
    )


def run(args: argparse.Namespace, work: Path) -> dict:
    model = Path(args.model) if args.model else _model(work)
    series = _series(work, args.series, tuple(args.shape))
    pacs = _Pacs()
    node_dir = work / "node"
    shutil.rmtree(node_dir, ignore_errors=True)
    cmd = [*NODE_CMD, "serve", "-m", str(model), "--workdir", str(node_dir), "--port", "0", "--stable-seconds", "2",
           "--workers", str(args.workers), "--send", pacs.url]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port = _listening_port(node_dir / "logs" / "node.jsonl", proc)
        statuses: list[int] = []
        shares = [series[i :: args.associations] for i in range(args.associations)]
        threads = [threading.Thread(target=_send, args=(port, share, statuses)) for share in shares]
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        while _states(node_dir / "node.sqlite").get("done", 0) < args.series:
            states = _states(node_dir / "node.sqlite")
            if states.get("failed") or states.get("refused") or states.get("send-failed"):
                raise SystemExit(f"a job did not succeed: {dict(states)}")
            time.sleep(0.2)
        wall = time.monotonic() - t0
        peak = _peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
        pacs.server.shutdown()
    segs = set()
    for path in (node_dir / "outputs").glob("*_seg.dcm"):
        from pydicom import dcmread

        segs.add(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    once = set(pacs.arrivals) == segs and len(segs) == args.series and set(pacs.arrivals.values()) == {1}
    return {
        "series": args.series,
        "associations": args.associations,
        "workers": args.workers,
        "shape": list(args.shape),
        "slices_sent": len(statuses),
        "all_stores_success": set(statuses) == {0},
        "wall_s": round(wall, 1),
        "series_per_hour": round(args.series / wall * 3600),
        "node_peak_rss_mib": round(peak),
        "delivered_exactly_once": f"{len(segs)}/{args.series}" if once else f"NO: {dict(pacs.arrivals)}",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 48))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", help="checkpoint to serve (default: train the tiny phantom model)")
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medseg-node-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if not result["all_stores_success"] or not str(result["delivered_exactly_once"]).startswith(
        str(args.series)
    ):
        sys.exit(1)


if __name__ == "__main__":
    main()
