"""Hard synthetic abdominal CT phantoms: a pancreas found by where it lies, not by its contrast.

Oktay et al. 2018 ("Attention U-Net: Learning Where to Look for the Pancreas", MIDL) argue that attention
gates help where the target is small, varies in shape and position, and barely differs in intensity from the
tissue around it, so that a network must learn *where* to look. The ``standard`` phantom
(:mod:`medseg.data.phantoms`) wraps its pancreas in a fat pad at −80 HU, which gives it a contrast of about
100 HU to its neighbourhood. This ``hard`` kind keeps the standard body and organs (for one seed the very
same: :func:`~medseg.data.phantoms.draw_anatomy` draws them from the same random stream, with the same
affine) and the label table :data:`~medseg.data.phantoms.LABELS`, and changes what surrounds the pancreas:

==================  ===============  =======================================================================
structure           HU               notes
==================  ===============  =======================================================================
pancreas            90–100           per case; thicker head with a caudal (uncinate-like) lobe   (label 6)
duodenum            pancreas −8…+5   C-loop round the head (bulb above, descending part lateral, horizontal
                                     part below, on towards the aorta), 0–2 mm from it; collapsed (isodense
                                     wall) or, in 35 %, with a fluid lumen of 10–40 HU
bowel loops         pancreas −12…+5  12–18 curved jejunum-like tubes (radius 6–10 mm) touching the pancreas
                                     from the neck to the tail, 0–2 mm away, in front, above-front, below
                                     or below-behind; fluid lumen of 10–40 HU in 30 %
stranded fat        −80 + 50…110     a 2–4 mm rim round the pancreas: fat with inflammatory stranding, patchy
                                     (±20 HU), in place of the standard 5 mm pad at −80 HU
stomach lumen       5–20             water as neutral oral contrast (pancreas protocol), never gas
everything else     as standard      body, lungs, spine, ribs, aorta, liver, spleen, kidneys, stomach wall
==================  ===============  =======================================================================

The pancreas also varies more than in the standard kind: head position ±10 mm (x), ±8 mm (y), −25…+10 mm
(z); tail ±15 mm and 0–35 mm above the head; anterior bow 12–40 mm plus second and third harmonics in y and z;
radius 5–9.5 mm with a head 1.2–1.7× and a tail 0.45–0.85× as thick, and a lobulated outline. Over seeds
0–9 at the default grid its centroid spreads by 15 mm (standard: 11 mm) and its volume by a coefficient of
variation of 0.48 (standard: 0.12).

After texture and bias (as standard) the image is blurred with a Gaussian of ``blur_voxels`` (1 voxel) to
model partial volume (the labels stay those of the sharp geometry), then low-dose noise is added: σ = 30 HU by
default (noise grows as 1/√dose, so a quarter of a routine dose doubles the routine 12–15 HU), slightly
correlated in-plane like a reconstruction kernel (Gaussian, 0.5 voxel, rescaled to keep σ per voxel:
neighbours in a slice correlate by about 0.26, neighbouring slices not at all).

Measured on seeds 0–4 at the default grid (128×128×48): the pancreas differs from its 3-voxel neighbourhood
(other labels excluded) by 23–37 HU here against 97–123 HU in the standard kind, so its contrast-to-noise
ratio is 0.76–1.22 here against 7.9–10 (noise measured in the eroded liver: 30 and 12 HU).
``tests/data/test_phantoms_hard.py`` holds bounds on these at a smaller grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medseg.data.phantoms import (
    DEFAULT_FOV_MM,
    DEFAULT_SHAPE,
    LABELS,
    Anatomy,
    Phantom,
    _bbox_points,
    _ellipsoid,
    _rotation,
    _tube,
    draw_anatomy,
    texture_and_bias,
)

#: Default noise σ in HU of the hard kind (low-dose CT) and its partial-volume blur σ in voxels.
HARD_NOISE_HU = 30.0
BLUR_VOXELS = 1.0
#: In-plane correlation of the noise (σ of a Gaussian, voxels), as a reconstruction kernel gives.
NOISE_CORRELATION_VOXELS = 0.5

#: Labels the pancreas does not overwrite (as in the standard kind).
_KEEP_OUT = [LABELS["aorta"], LABELS["kidney_left"], LABELS["kidney_right"]]


def generate_hard_phantom(
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM,
    orientation: str | None = None,
    noise_hu: float | None = None,
    blur_voxels: float = BLUR_VOXELS,
) -> Phantom:
    """Generate one hard phantom case, deterministic for a given ``seed`` and arguments.

    The arguments are those of :func:`medseg.data.phantoms.generate_phantom` (which calls this for
    ``kind="hard"``); ``noise_hu=None`` means :data:`HARD_NOISE_HU`. ``blur_voxels`` is the σ of the
    partial-volume blur, applied before the noise.

    Example::

        ph = generate_hard_phantom(0, (64, 64, 24))  # or generate_phantom(0, (64, 64, 24), kind="hard")
        ph.image  # int16 HU; ph.label: uint8, labels 0–6 as in the standard kind
    """
    rng = np.random.default_rng(seed)
    anatomy = draw_anatomy(rng, shape, fov_mm, orientation)
    _draw_pancreas_region(anatomy, rng)
    hu = texture_and_bias(anatomy, rng)
    if blur_voxels > 0:
        hu = ndimage.gaussian_filter(hu, blur_voxels)
    sigma = HARD_NOISE_HU if noise_hu is None else noise_hu
    return anatomy.phantom(hu + low_dose_noise(rng, anatomy.shape, sigma))


def low_dose_noise(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    sigma_hu: float,
    correlation_voxels: float = NOISE_CORRELATION_VOXELS,
) -> np.ndarray:
    """Gaussian noise of standard deviation ``sigma_hu`` per voxel, smoothed in-plane (axes i, j) by a
    Gaussian of ``correlation_voxels`` and rescaled by the filter's exact gain, so that σ stays ``sigma_hu``.
    """
    noise = rng.normal(0, 1, size=shape).astype(np.float32)
    if correlation_voxels > 0:
        sig = (correlation_voxels, correlation_voxels, 0.0)
        noise = ndimage.gaussian_filter(noise, sig)
        impulse = np.zeros((17, 17, 1), dtype=np.float64)
        impulse[8, 8, 0] = 1.0
        gain = float(np.sqrt((ndimage.gaussian_filter(impulse, sig) ** 2).sum()))
        noise /= gain
    return sigma_hu * noise


def _smooth_field(rng: np.random.Generator, pts: np.ndarray, wavelength_mm: float = 20.0) -> np.ndarray:
    """A smooth random field at world points (σ ≈ 0.7, 20 mm waves): twice the mean of four plane waves."""
    k = rng.normal(size=(4, 3))
    k *= 2 * np.pi / wavelength_mm / np.linalg.norm(k, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, size=4)
    return np.sin(pts @ k.T + phase).mean(axis=1) * 2


def _paint_tube(
    a: Anatomy,
    rng: np.random.Generator,
    path: np.ndarray,
    radius: float,
    wall_hu: float,
    fluid_probability: float,
) -> None:
    """An unlabelled bowel-like tube: painted where nothing is labelled and the tissue is soft (not bone,
    lung or gas), inside the body; a fluid lumen (10–40 HU) with probability ``fluid_probability``."""
    idx = _bbox_points(a.world, path.min(0) - radius - 1, path.max(0) + radius + 1)
    soft = (a.lab[idx] == 0) & (a.hu[idx] > -500) & (a.hu[idx] < 300) & (a.inner[idx] < 0.9)
    m = _tube(a.world[idx], path, radius) & soft
    a.hu[idx[m]] = wall_hu
    if rng.random() < fluid_probability:
        lumen = _tube(a.world[idx], path, radius - rng.uniform(2.5, 3.5)) & m
        a.hu[idx[lumen]] = rng.uniform(10, 40)


def _pancreas_shape(a: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Centre line (M×3), radius per node and the head lobe (centre, radii, rotation) of the pancreas."""
    s, sp = a.size, a.spine
    t = np.linspace(0, 1, 120)
    head = np.array([sp[0] + 40 * s + rng.uniform(-10, 10), a.aorta_y + 30 + rng.uniform(-8, 8), 0.0])
    head[2] = rng.uniform(-25, 10)
    tail = np.array([-70 * s + rng.uniform(-15, 15), sp[1] + 25 + rng.uniform(-8, 10), 0.0])
    tail[2] = head[2] + rng.uniform(0, 35)
    path = head[None] + t[:, None] * (tail - head)[None]
    y_harm = rng.uniform(-8, 8) * np.sin(2 * np.pi * t) + rng.uniform(-4, 4) * np.sin(3 * np.pi * t)
    path[:, 1] += rng.uniform(12, 40) * np.sin(np.pi * t) + y_harm
    path[:, 2] += rng.uniform(-10, 10) * np.sin(np.pi * t) + rng.uniform(-6, 6) * np.sin(2 * np.pi * t)
    head_f, tail_f = rng.uniform(1.2, 1.7), rng.uniform(0.45, 0.85)
    profile = head_f + (tail_f - head_f) * t ** rng.uniform(0.6, 1.4)
    lobes = 1 + rng.uniform(0.04, 0.14) * np.sin(
        2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 2 * np.pi)
    )
    radius = np.maximum(rng.uniform(5.0, 9.5) * s * profile * lobes, 3.0)
    rh = float(radius[0])
    lobe = (
        head + [0.0, 0.0, -0.6 * rh],
        rh * np.array([1.0, 0.85, rng.uniform(1.3, 1.8)]),
        _rotation(rng, 10),
    )
    return path, radius, lobe


def _duodenum_path(rng: np.random.Generator, lobe: tuple, radius: float) -> np.ndarray:
    """A C-loop in the coronal plane around the head lobe, open towards the body (−x): bulb above,
    descending part lateral, horizontal part below and on towards the aorta; tilted up to 15°."""
    centre, radii, _ = lobe
    gap = rng.uniform(0, 2)
    rx, rz = radii[0] + radius + gap, radii[2] + radius + gap
    theta = np.deg2rad(np.linspace(rng.uniform(80, 110), -rng.uniform(100, 130), 100))
    c_loop = np.stack([rx * np.cos(theta), rng.uniform(-4, 4) + 0 * theta, rz * np.sin(theta)], -1)
    run = np.linspace(0, 1, 40)[1:, None] * np.array([-rng.uniform(20, 45), 0.0, rng.uniform(-5, 5)])
    local = np.concatenate([c_loop, c_loop[-1] + run])
    return centre + local @ _rotation(rng, 15).T


def _bowel_loop_path(rng: np.random.Generator, touch: np.ndarray) -> np.ndarray:
    """A jejunum-like arc (radius of curvature 15–30 mm, 90–200°) in a random plane through ``touch``."""
    bend = rng.uniform(15, 30)
    rot = _rotation(rng, 90)
    alpha = np.linspace(-0.5, 0.5, 60) * np.deg2rad(rng.uniform(90, 200))
    circle = np.stack([np.cos(alpha) - 1, np.sin(alpha), 0 * alpha], -1) * bend
    return touch + circle @ rot.T


def _draw_pancreas_region(a: Anatomy, rng: np.random.Generator) -> None:
    """Stranded fat rim, duodenal C-loop, bowel loops and the pancreas (label 6), drawn into ``a`` in that
    order (the pancreas last, so that its label follows its own sharp geometry)."""
    path, radius, lobe = _pancreas_shape(a, rng)
    pancreas_hu = rng.uniform(90, 100)
    world, hu, lab = a.world, a.hu, a.lab
    hu[a.stomach_lumen] = rng.uniform(5, 20)  # pancreas protocol: water as neutral oral contrast, no gas
    reach = float(radius.max()) * 2.5
    idx = _bbox_points(
        world, np.minimum(path.min(0), lobe[0]) - reach, np.maximum(path.max(0), lobe[0]) + reach
    )
    pts = world[idx]
    keep = ~np.isin(lab[idx], _KEEP_OUT)
    lobe_seed = int(rng.integers(2**31))

    def pancreas(extra_mm: float) -> np.ndarray:  # the same lobulation for the rim and the organ
        centre, radii, rot = lobe
        head = _ellipsoid(pts, centre, radii + extra_mm, rot, np.random.default_rng(lobe_seed), 0.06)
        return (_tube(pts, path, radius + extra_mm) | head) & keep

    # Fat with stranding: a thin rim, grey rather than black, patchy.
    rim = pancreas(rng.uniform(2, 4)) & (lab[idx] == 0) & (hu[idx] > -500) & (hu[idx] < 300)
    stranding = rng.uniform(50, 110)
    hu[idx[rim]] = -80 + stranding + 20 * _smooth_field(rng, pts[rim])

    # Duodenum around the head, bowel loops against body and tail: nearly the pancreas's HU.
    duo_radius = rng.uniform(7, 11) * a.size
    duodenum = _duodenum_path(rng, lobe, duo_radius)
    _paint_tube(a, rng, duodenum, duo_radius, pancreas_hu + rng.uniform(-8, 5), fluid_probability=0.35)
    for _ in range(int(rng.integers(12, 19))):
        k = int(rng.integers(int(0.15 * len(path)), len(path)))
        phi = np.deg2rad(rng.uniform(-150, 60))  # 0° anterior, −90° inferior, −150° below-behind
        direction = np.array([rng.uniform(-0.3, 0.3), np.cos(phi), np.sin(phi)])
        direction /= np.linalg.norm(direction)
        loop_radius = rng.uniform(6, 10) * a.size
        touch = path[k] + direction * (radius[k] + loop_radius + rng.uniform(0, 2))
        wall = pancreas_hu + rng.uniform(-12, 5)
        _paint_tube(a, rng, _bowel_loop_path(rng, touch), loop_radius, wall, fluid_probability=0.3)

    # The pancreas itself, from the sharp geometry.
    m = pancreas(0.0)
    hu[idx[m]] = pancreas_hu
    lab[idx[m]] = LABELS["pancreas"]
