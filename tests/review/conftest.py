"""Fixtures of the review tests: a synthetic ``medseg segment`` output folder and a running review server.

The folder holds two cases with the same anatomy in patient space, stored in opposite voxel orders: ``ras``
(affine diag(+3, +3, 4)) and ``lps`` (diag(−3, −3, 4)), each a CT (outside the folder, as a batch's inputs
are) and a mask + sidecar inside it. The liver is a block on the patient's right and anterior
(x = +30 mm, y = +20 mm in RAS), the spleen on the patient's left and posterior: a left-right or an
anterior-posterior flip puts something else where the liver must be.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

LABELS = {"background": 0, "liver": 1, "spleen": 2}
SHAPE = (64, 64, 24)
SPACING = (3.0, 3.0, 4.0)
#: Organ boxes in RAS mm (x = patient's right positive, y = anterior positive), half sizes 15 × 15 × 20 mm.
ORGANS_RAS = {"liver": (30.0, 20.0, 0.0), "spleen": (-36.0, -24.0, 0.0)}
HALF = (15.0, 15.0, 20.0)


def ras_affine(order: str) -> np.ndarray:
    """The affine of a 64×64×24 grid centred on the origin, stored ``ras`` or ``lps``."""
    sign = 1.0 if order == "ras" else -1.0
    affine = np.diag([sign * SPACING[0], sign * SPACING[1], SPACING[2], 1.0])
    centre = (np.array(SHAPE) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def voxel_centres_ras(affine: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1).reshape(-1, 3)
    return (grid @ affine[:3, :3].T + affine[:3, 3]).reshape(*SHAPE, 3)


def write_case(out: Path, scans: Path, case: str, order: str) -> None:
    affine = ras_affine(order)
    xyz = voxel_centres_ras(affine)
    body = (xyz[..., 0] ** 2 / 90**2 + xyz[..., 1] ** 2 / 80**2) <= 1
    ct = np.where(body, 40, -1000).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    for name, centre in ORGANS_RAS.items():
        inside = np.all(np.abs(xyz - np.array(centre)) <= np.array(HALF), axis=-1)
        labels[inside] = LABELS[name]
        ct[inside] = 60 if name == "liver" else 50
    scan = scans / f"{case}.nii.gz"
    for image, path, dtype in ((ct, scan, np.int16), (labels, out / f"{case}.nii.gz", np.uint8)):
        img = nib.Nifti1Image(image.astype(dtype), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(path))
    side = {"case": case, "labels": LABELS, "kind": "nifti", "source": str(scan),
            "source_file": {"path": str(scan)}, "warnings": []}  # fmt: skip
    (out / f"{case}.json").write_text(json.dumps(side))
    alpha = np.clip((xyz[..., 0] + 96) / 192, 0, 1).astype(np.float32)
    nib.save(nib.Nifti1Image(alpha, affine), str(out / f"{case}_alpha_level2.nii.gz"))


def make_outdir(root: Path) -> Path:
    out, scans = root / "out", root / "scans"
    out.mkdir(parents=True)
    scans.mkdir()
    for order in ("ras", "lps"):
        write_case(out, scans, order, order)
    return out


@pytest.fixture
def outdir(tmp_path) -> Path:
    return make_outdir(tmp_path)


class Running:
    """A review server serving in a thread of this process (stopped with ``shutdown``)."""

    def __init__(self, folder: Path, read_only: bool = False) -> None:
        from medseg.review import make_server

        self.server = make_server(folder, "127.0.0.1", 0, read_only=read_only)
        self.app = self.server.app
        self.url = self.server.url.rstrip("/")
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def server(outdir):
    running = Running(outdir)
    yield running
    running.stop()
