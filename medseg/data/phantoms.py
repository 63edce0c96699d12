"""Synthetic abdominal CT phantoms with labels, deterministic per seed.

Anatomy is drawn in patient world coordinates (millimetres, RAS+: +x towards the patient's right, +y
anterior, +z superior, origin near the body centre) and sampled at the voxel centres of a grid whose affine
is non-identity (small oblique rotation, offset origin) and stored either RAS- or LPS-oriented. So the same
anatomy appears with different voxel layouts, which exercises orientation and spacing handling everywhere.

Intensities are Hounsfield units of a portal-venous abdominal CT:

==================  ==============  ===============================================================
structure           HU              notes
==================  ==============  ===============================================================
air                 −1000           outside the body
subcutaneous fat    −100 ± 10       ring under the skin
soft tissue         35 ± 10         muscle, bowel, everything not modelled
lungs               −850 ± 30       two domes at the top of the field of view (unlabelled)
bone                500 ± 100       vertebral body, spinous process and rib arcs (unlabelled)
aorta               230 ± 40        contrast-filled tube left-anterior of the spine      (label 5)
liver               115 ± 10        large lobulated ellipsoid on the right              (label 1)
spleen              125 ± 10        left posterior                                      (label 2)
kidneys             165 ± 15        both sides of the spine                        (labels 3, 4)
stomach             wall 45, lumen 10 or gas −800 (unlabelled)
retroperit. fat     −80             pad around the pancreas
pancreas            95 ± 10         thin curved tube aorta → spleen, low contrast       (label 6)
==================  ==============  ===============================================================

Then Gaussian noise (σ ≈ 12 HU) and a smooth intensity bias (±15 HU) are added. Shape, position and size of
every structure vary per case. The pancreas-like structure is the small, hard target of Oktay et al. 2018.

This is the ``standard`` kind. The ``hard`` kind (:mod:`medseg.data.phantoms_hard`, ``medseg phantoms
--kind hard``) draws the same body and organs for a seed, then a pancreas nearly isodense to a duodenal
C-loop and bowel loops around it, in stranded fat, with partial-volume blur and low-dose noise (σ ≈ 30 HU).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "kidney_right": 3,
    "kidney_left": 4,
    "aorta": 5,
    "pancreas": 6,
}

#: Default field of view in mm (x, y, z) and grid; spacing = fov / shape → 2.8 × 2.8 × 5.0 mm.
DEFAULT_FOV_MM = (360.0, 360.0, 240.0)
DEFAULT_SHAPE = (128, 128, 48)

#: The phantom kinds (``medseg phantoms --kind``): name → what it is. Both use the label table :data:`LABELS`.
PHANTOM_KINDS: dict[str, str] = {
    "standard": "clear organ contrast, the pancreas in a fat pad, noise σ ≈ 12 HU",
    "hard": "pancreas nearly isodense to duodenum and bowel, fat stranding, partial-volume blur, "
    "low-dose noise σ ≈ 30 HU (medseg.data.phantoms_hard)",
}


def check_kind(kind: str) -> str:
    """Return ``kind`` if it names a phantom kind (:data:`PHANTOM_KINDS`), else raise ``ValueError`` with the
    valid names and the closest one."""
    if kind in PHANTOM_KINDS:
        return kind
    close = difflib.get_close_matches(str(kind), list(PHANTOM_KINDS), n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ValueError(f"unknown phantom kind {kind!r}: valid are {', '.join(sorted(PHANTOM_KINDS))}{hint}")


@dataclass(frozen=True)
class Phantom:
    """One generated case: HU image (int16), label map (uint8) and the voxel → world (RAS) affine."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    orientation: str


@dataclass
class Anatomy:
    """The abdomen drawn up to the pancreas, filled in place by the pancreas drawers (one per kind).

    ``world`` holds the RAS mm coordinates of every voxel centre (flat, C order of ``shape``); ``hu`` and
    ``lab`` the flat HU and label values; ``inner`` the normalised radius of the body's inner ellipse (< 1:
    inside the subcutaneous fat). ``size`` is the patient scale, ``spine`` the vertebral body centre,
    ``aorta_y`` the aorta's anterior-posterior position: the landmarks the pancreas is placed by.
    ``stomach_lumen`` holds the flat indices of the stomach's lumen (fluid or gas).
    """

    world: np.ndarray
    hu: np.ndarray
    lab: np.ndarray
    inner: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray
    orientation: str
    size: float
    spine: np.ndarray
    aorta_y: float
    stomach_lumen: np.ndarray

    def phantom(self, hu: np.ndarray) -> Phantom:
        """The finished case: ``hu`` (the final float image) rounded to int16, and the label volume."""
        image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
        return Phantom(image, self.lab.reshape(self.shape), self.affine, self.orientation)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Random rotation with angles up to ``max_deg`` degrees about each axis."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def phantom_affine(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    orientation: str,
    rng: np.random.Generator,
    max_oblique_deg: float = 4.0,
) -> np.ndarray:
    """Voxel → RAS world affine for a grid centred on the origin, stored ``RAS`` or ``LPS`` oriented.

    The matrix is rounded to float32 so that it survives the NIfTI header (srow is float32) bit-exactly.
    """
    if orientation not in ("RAS", "LPS"):
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")
    flip = np.diag([1.0, 1.0, 1.0]) if orientation == "RAS" else np.diag([-1.0, -1.0, 1.0])
    direction = _rotation(rng, max_oblique_deg) @ flip
    linear = direction * np.asarray(spacing, dtype=float)[None, :]
    centre = (np.asarray(shape, dtype=float) - 1) / 2
    origin = -linear @ centre + rng.uniform(-10, 10, size=3)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine.astype(np.float32).astype(np.float64)


def _ellipsoid(
    pts: np.ndarray, centre, radii, rot: np.ndarray, rng: np.random.Generator, wobble: float = 0.08
) -> np.ndarray:
    """Inside-test for a lobulated ellipsoid: normalised radius < 1 + wobble·(smooth angular bumps)."""
    local = (pts - np.asarray(centre)) @ rot
    scaled = local / np.asarray(radii)
    r = np.sqrt((scaled**2).sum(axis=-1))
    unit = scaled / np.maximum(r[..., None], 1e-6)
    k = rng.normal(size=(3, 3))
    phase = rng.uniform(0, 2 * np.pi, size=3)
    bumps = sum(np.sin(unit @ k[i] * 2.0 + phase[i]) for i in range(3)) / 3
    return r < 1.0 + wobble * bumps


def _tube(pts: np.ndarray, path: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Inside-test for a tube of (per-node) radius around a polyline ``path`` (M×3), nodes dense enough."""
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(path).query(pts, k=1)
    r = np.broadcast_to(np.asarray(radius, dtype=float), (len(path),))
    return dist < r[idx]


def _bbox_points(world: np.ndarray, lo, hi) -> np.ndarray:
    """Indices of points inside the axis-aligned world box [lo, hi] (restricts the costly tests)."""
    m = np.all((world >= np.asarray(lo)) & (world <= np.asarray(hi)), axis=1)
    return np.flatnonzero(m)


def generate_phantom(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM,
    orientation: str | None = None,
    noise_hu: float | None = None,
    kind: str = "standard",
) -> Phantom:
    """Generate one phantom case, deterministic for a given ``seed`` and arguments.

    Args:
        seed: random seed; the same seed gives bit-identical image, label and affine.
        shape: voxel grid (i, j, k); the k axis is the craniocaudal one.
        fov_mm: field of view in mm, jittered ±4 % per case; spacing = fov / shape (anisotropic by default).
        orientation: ``"RAS"`` or ``"LPS"`` storage; ``None`` picks one from the seed (both occur).
        noise_hu: standard deviation of the additive noise in HU; ``None``: the kind's (12 standard, 30 hard).
        kind: ``"standard"`` or ``"hard"`` (:data:`PHANTOM_KINDS`); for one seed both share body, organs and
            affine, and differ around the pancreas, in blur and in noise.
    """
    if check_kind(kind) == "hard":
        from medseg.data.phantoms_hard import generate_hard_phantom

        return generate_hard_phantom(seed, shape, fov_mm, orientation, noise_hu)
    rng = np.random.default_rng(seed)
    anatomy = draw_anatomy(rng, shape, fov_mm, orientation)
    _draw_pancreas(anatomy, rng)
    hu = texture_and_bias(anatomy, rng)
    hu = hu + rng.normal(0, 12.0 if noise_hu is None else noise_hu, size=shape)
    return anatomy.phantom(hu)


def draw_anatomy(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    fov_mm: tuple[float, float, float],
    orientation: str | None,
) -> Anatomy:
    """Draw the grid and everything but the pancreas: body, lungs, spine and ribs, aorta, liver, spleen,
    kidneys, stomach (the table of the module docstring). Every kind starts here, so that one seed gives the
    same body and organs in every kind."""
    if orientation is None:
        orientation = "RAS" if rng.random() < 0.5 else "LPS"
    fov = np.asarray(fov_mm, dtype=float) * rng.uniform(0.96, 1.04)
    spacing = tuple(float(f / s) for f, s in zip(fov, shape, strict=True))
    affine = phantom_affine(shape, spacing, orientation, rng)

    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    world = (ijk.reshape(-1, 3) @ affine[:3, :3].T.astype(np.float32)) + affine[:3, 3].astype(np.float32)
    x, y, z = world[:, 0], world[:, 1], world[:, 2]
    n = world.shape[0]
    hu = np.full(n, -1000.0, dtype=np.float32)
    lab = np.zeros(n, dtype=np.uint8)
    s = rng.uniform(0.88, 1.12)  # patient size

    def j(scale: float = 8.0, size: int = 3) -> np.ndarray:
        return rng.uniform(-scale, scale, size=size)

    # Body: ellipse in the axial plane with subcutaneous fat; soft tissue inside.
    bx, by = 150 * s * rng.uniform(0.92, 1.08), 110 * s * rng.uniform(0.92, 1.08)
    rb = (x / bx) ** 2 + ((y - 5) / by) ** 2
    fat_t = rng.uniform(12, 24)
    inner = (x / (bx - fat_t)) ** 2 + ((y - 5) / (by - fat_t)) ** 2
    body = rb < 1
    hu[body] = -100 + rng.normal(0, 3)
    hu[inner < 1] = 35 + rng.normal(0, 4)

    # Lungs: two domes at the top of the field of view.
    dome_z = 55 * s + rng.uniform(-10, 10)
    for side in (-1, 1):
        c = np.array([side * 75 * s, -10, dome_z + 90])
        idx = _bbox_points(world, c - [70, 80, 120], c + [70, 80, 120])
        m = _ellipsoid(world[idx], c, np.array([55, 70, 110]) * s, np.eye(3), rng, 0.04)
        m &= inner[idx] < 0.95
        hu[idx[m]] = -850 + rng.normal(0, 10)

    # Spine (vertebral body with canal, spinous process) and rib arcs.
    sp = np.array([0.0, -by + fat_t + 45, 0.0]) + j(4)
    vb = ((x - sp[0]) ** 2 + (y - sp[1]) ** 2) < (17 * s) ** 2
    canal = ((x - sp[0]) ** 2 + (y - sp[1] + 24 * s) ** 2) < (7 * s) ** 2
    spinous = (np.abs(x - sp[0]) < 5) & (y < sp[1] - 24 * s) & (y > sp[1] - 55 * s)
    bone = (vb | spinous) & ~canal
    hu[bone] = 500 + rng.normal(0, 60)
    hu[canal] = 20
    rib_ring = (rb > 0.72) & (rb < 0.82) & (y > sp[1] - 30)
    rib_period = rng.uniform(22, 28)
    ribs = rib_ring & (np.mod(z + rng.uniform(0, rib_period), rib_period) < 8) & (z > -40)
    hu[ribs] = 450 + rng.normal(0, 60)

    # Aorta: contrast-filled tube left-anterior of the vertebral body, slight curve.
    az = np.linspace(-150, 150, 120)
    ax0 = sp[0] - 18 * s + rng.uniform(-4, 4)
    ay0 = sp[1] + 30 * s + rng.uniform(-4, 4)
    apath = np.stack([ax0 + 4 * np.sin(az / 90 + rng.uniform(0, 6)), ay0 + 0 * az, az], -1)
    idx = _bbox_points(world, [ax0 - 25, ay0 - 25, -160], [ax0 + 25, ay0 + 25, 160])
    arad = rng.uniform(9, 13) * s
    m = _tube(world[idx], apath, arad)
    hu[idx[m]] = rng.uniform(190, 270)
    lab[idx[m]] = LABELS["aorta"]

    # Liver (patient's right, +x), spleen (left posterior), kidneys.
    organs = [
        ("liver", [70 * s, 5, 45], [80, 70, 65], 115, 0.10),
        ("spleen", [-85 * s, -35, 45], [32, 22, 45], 125, 0.08),
        ("kidney_right", [62 * s, sp[1] + 10, -25], [26, 20, 48], 165, 0.05),
        ("kidney_left", [-62 * s, sp[1] + 10, -15], [26, 20, 48], 165, 0.05),
    ]
    for name, c, r, mu_hu, wob in organs:
        c = np.asarray(c, dtype=float) + j(10 if name == "liver" else 7)
        r = np.asarray(r, dtype=float) * s * rng.uniform(0.85, 1.15, size=3)
        rot = _rotation(rng, 15)
        idx = _bbox_points(world, c - r.max() * 1.3, c + r.max() * 1.3)
        m = _ellipsoid(world[idx], c, r, rot, rng, wob) & (inner[idx] < 0.97)
        m &= ~np.isin(lab[idx], [LABELS["aorta"]]) & (hu[idx] < 300)
        hu[idx[m]] = mu_hu + rng.normal(0, 8)
        lab[idx[m]] = LABELS[name]
        if name.startswith("kidney"):  # renal sinus: darker centre, still labelled kidney
            sinus = _ellipsoid(world[idx], c, r * 0.35, rot, rng, 0.0) & m
            hu[idx[sinus]] = 40

    # Stomach (left anterior), unlabelled: wall, fluid or gas lumen.
    c = np.array([-45 * s, 55, 40]) + j(10)
    r = np.array([50, 32, 40]) * s * rng.uniform(0.85, 1.15, size=3)
    idx = _bbox_points(world, c - r.max() * 1.2, c + r.max() * 1.2)
    m = _ellipsoid(world[idx], c, r, _rotation(rng, 20), rng, 0.08) & (lab[idx] == 0) & (inner[idx] < 0.95)
    hu[idx[m]] = 45
    lumen = _ellipsoid(world[idx], c, r - 5, np.eye(3), rng, 0.0) & m
    hu[idx[lumen]] = -800 if rng.random() < 0.4 else 10
    return Anatomy(world, hu, lab, inner, tuple(shape), affine, orientation, s, sp, ay0, idx[lumen])


def _draw_pancreas(a: Anatomy, rng: np.random.Generator) -> None:
    """The standard pancreas, drawn into ``a``."""
    world, hu, lab, s, sp, ay0 = a.world, a.hu, a.lab, a.size, a.spine, a.aorta_y

    def j(scale: float = 8.0, size: int = 3) -> np.ndarray:
        return rng.uniform(-scale, scale, size=size)

    # Pancreas: a thin curved tube from the head (right of the aorta) over the aorta to the splenic hilum,
    # wrapped in a retroperitoneal fat pad; low contrast against soft tissue.
    t = np.linspace(0, 1, 80)
    head = np.array([sp[0] + 40 * s, ay0 + 30, rng.uniform(-15, 5)]) + j(5)
    tail = np.array([-70 * s, sp[1] + 25, head[2] + rng.uniform(10, 25)]) + j(5)
    bend = rng.uniform(18, 30)
    ppath = head[None] + t[:, None] * (tail - head)[None]
    ppath[:, 1] += bend * np.sin(np.pi * t) + 3 * np.sin(3 * np.pi * t + rng.uniform(0, 6))
    ppath[:, 2] += 6 * np.sin(2 * np.pi * t + rng.uniform(0, 6))
    prad = rng.uniform(6.5, 9.5) * s * (1.25 - 0.45 * t)  # thick head, thin tail
    lo, hi = ppath.min(0) - 25, ppath.max(0) + 25
    idx = _bbox_points(world, lo, hi)
    keep = ~np.isin(lab[idx], [LABELS["aorta"], LABELS["kidney_left"], LABELS["kidney_right"]])
    pad = _tube(world[idx], ppath, prad + 5) & keep & (lab[idx] == 0) & (hu[idx] < 300)
    hu[idx[pad]] = -80
    m = _tube(world[idx], ppath, prad) & keep
    hu[idx[m]] = 95 + rng.normal(0, 6)
    lab[idx[m]] = LABELS["pancreas"]


def texture_and_bias(a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """``a.hu`` as a volume plus a faint tissue texture (smoothed noise) and a smooth bias field (±15 HU)
    inside the body (air stays air-like); noise is the caller's."""
    shape = a.shape
    hu = a.hu.reshape(shape)
    tex = ndimage.gaussian_filter(rng.normal(0, 1, size=shape).astype(np.float32), 1.5)
    bias = ndimage.zoom(rng.normal(0, 1, size=(3, 3, 3)).astype(np.float32), np.asarray(shape) / 3, order=3)
    bias = bias[: shape[0], : shape[1], : shape[2]]
    inside = hu > -950
    return hu + inside * (15 * tex + 15 * bias / max(float(np.abs(bias).max()), 1e-6))


def write_msd_dataset(
    root: str | os.PathLike,
    num_train: int,
    num_test: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM,
    seed: int = 0,
    with_test_labels: bool = True,
    kind: str = "standard",
) -> Path:
    """Write a phantom dataset in the Medical Segmentation Decathlon layout and return ``dataset.json``.

    Layout: ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` (+ ``labelsTs/`` for evaluation, as in nnU-Net raw
    data when ``with_test_labels``), and ``dataset.json`` with label names. Case ``i`` uses seed
    ``seed * 100_000 + i``, so datasets with different ``seed`` never share a case. ``kind`` is the phantom
    kind (:data:`PHANTOM_KINDS`), checked before anything is written.
    """
    from medseg.io import atomic_write_text, save_volume

    check_kind(kind)
    root = Path(root)
    training, test = [], []
    for i in range(num_train + num_test):
        ph = generate_phantom(seed * 100_000 + i, shape=shape, fov_mm=fov_mm, kind=kind)
        split = "Tr" if i < num_train else "Ts"
        name = f"phantom_{i:03d}.nii.gz"
        save_volume(ph.image, ph.affine, root / f"images{split}" / name, np.int16)
        if split == "Tr" or with_test_labels:
            save_volume(ph.label, ph.affine, root / f"labels{split}" / name, np.uint8)
        if split == "Tr":
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "medseg-phantoms",
        "description": f"Synthetic abdominal CT phantoms{_kind_note(kind)} generated by medseg.data.phantoms",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): k for k, v in LABELS.items()},
        "numTraining": num_train,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    path = root / "dataset.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path


def _kind_note(kind: str) -> str:
    """`` (hard kind)`` for a dataset description; nothing for the standard kind (descriptions unchanged)."""
    return "" if kind == "standard" else f" ({kind} kind)"


#: HU added by contrast in the portal-venous phase, per label: subtracted for the native (unenhanced) phase
#: of a 2-channel phantom (native liver ≈ 55, spleen ≈ 50, kidneys ≈ 35, aorta ≈ 40, pancreas ≈ 40 HU).
CONTRAST_HU = {
    "liver": 60,
    "spleen": 75,
    "kidney_right": 130,
    "kidney_left": 130,
    "aorta": 190,
    "pancreas": 55,
}


def native_phase(ph: Phantom, seed: int, noise_hu: float = 12.0) -> np.ndarray:
    """A second CT channel of the same anatomy: the unenhanced (native) phase, int16 HU.

    The portal-venous phantom minus each organ's contrast enhancement (:data:`CONTRAST_HU`), with fresh noise,
    so that the two channels differ where the labels are (what a network may learn from both phases).
    """
    rng = np.random.default_rng(seed)
    enhancement = np.zeros(max(LABELS.values()) + 1, dtype=np.float32)
    for name, hu in CONTRAST_HU.items():
        enhancement[LABELS[name]] = hu
    native = (
        ph.image.astype(np.float32) - enhancement[ph.label] + rng.normal(0, noise_hu, size=ph.image.shape)
    )
    return np.clip(np.round(native), -1024, 3071).astype(np.int16)


def write_nnunet_dataset(
    root: str | os.PathLike,
    num_train: int,
    num_test: int = 0,
    shape: tuple[int, int, int] | list[tuple[int, int, int]] = DEFAULT_SHAPE,
    fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM,
    seed: int = 0,
    channels: int = 1,
    kind: str = "standard",
) -> Path:
    """Write a phantom dataset in the nnU-Net v2 raw layout and return ``dataset.json``.

    Layout (nnU-Net v2 ``dataset_format.md``): ``imagesTr/phantom_000_0000.nii.gz`` (channel 0, the
    portal-venous phantom; with ``channels=2`` also ``_0001``, its native phase, :func:`native_phase`),
    ``labelsTr/phantom_000.nii.gz``, ``imagesTs/`` (+ ``labelsTs/``) for ``num_test`` cases, and a
    ``dataset.json`` with ``channel_names``, ``labels`` (name → index), ``numTraining`` and ``file_ending``.
    ``shape`` may be a list of grids, used in turn per case (datasets of varying size and spacing). Case ``i``
    uses the seed of :func:`write_msd_dataset`, so both layouts of one ``seed`` and ``kind`` hold the same
    phantoms.
    """
    from medseg.io import atomic_write_text, save_volume

    check_kind(kind)
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    root = Path(root)
    shapes = [tuple(shape)] if isinstance(shape[0], int) else [tuple(s) for s in shape]
    for i in range(num_train + num_test):
        case_seed = seed * 100_000 + i
        ph = generate_phantom(case_seed, shape=shapes[i % len(shapes)], fov_mm=fov_mm, kind=kind)
        split = "Tr" if i < num_train else "Ts"
        name = f"phantom_{i:03d}"
        volumes = [ph.image] + ([native_phase(ph, case_seed + 7_919)] if channels == 2 else [])
        for c, volume in enumerate(volumes):
            save_volume(volume, ph.affine, root / f"images{split}" / f"{name}_{c:04d}.nii.gz", np.int16)
        save_volume(ph.label, ph.affine, root / f"labels{split}" / f"{name}.nii.gz", np.uint8)
    meta = {
        "name": "medseg-phantoms",
        "description": f"Synthetic abdominal CT phantoms{_kind_note(kind)} generated by medseg.data.phantoms "
        "(nnU-Net v2 layout)",
        "channel_names": {str(c): "CT" for c in range(channels)},
        "labels": dict(LABELS),
        "numTraining": num_train,
        "file_ending": ".nii.gz",
    }
    path = root / "dataset.json"
    atomic_write_text(path, json.dumps(meta, indent=2))
    return path
