"""Preview pictures of a segmented scan: three planes with label outlines, and attention heat maps.

* :func:`write_preview` — one PNG: axial, coronal and sagittal slices through the centre of the segmented
  structures (the centroid of all labelled voxels), CT abdomen window (W 400 / L 40 → -160…240 HU), coloured
  label outlines (the colours of :mod:`medseg.export.codes`, as in the DICOM SEG and 3D Slicer) and a legend.
* :func:`write_thumbnail` — the axial panel alone, small, for the batch review page.
* :func:`write_attention_overlay` — the same three planes with a heat map (e.g. an attention coefficient map
  α of :func:`medseg.inference.attention.attention_maps`) blended over the CT.

Geometry and conventions (what the panels of :func:`preview_panels` hold, and what the tests check):

* The volume is first put on RAS axes (:func:`to_ras`: nibabel's ``io_orientation`` / ``apply_orientation``,
  as ``nib.as_closest_canonical``): array axis 0 runs to the patient's right, 1 anterior, 2 superior, whatever
  the storage order (LPS, RAS, any permutation); only the three slices are read from the scan. **Oblique scans are shown on their closest canonical
  axes** (no resampling: the slices are planes of the voxel grid, tilted by the obliquity), and the picture
  says so.
* **Radiological convention**: axial and coronal panels show the patient's right on the image's left
  (patient left on image right); axial has anterior up, coronal and sagittal superior up; sagittal has
  anterior on the left. The picture states it (:data:`RADIOLOGICAL_NOTE`) and letters mark every edge.
* **Physical aspect ratio**: each panel is drawn with its extent in millimetres (``Panel.extent``) and equal
  axis scaling, so a 1×1×5 mm voxel is five times taller than wide in the coronal and sagittal panels.
* Outlines are the labels' inner borders in the displayed plane (``mask & ~binary_erosion(mask)``, SciPy),
  never filled areas; they are thickened for small output sizes so that they survive downsampling.

Rendering uses matplotlib's Agg backend (no display); PNGs are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.export.codes import lookup
from medseg.io import voxel_spacing
from medseg.report.plots import pyplot, save_png
from medseg.report.qa import obliquity_degrees

#: CT abdomen soft-tissue window (width 400, level 40) in HU.
ABDOMEN_WINDOW = (-160.0, 240.0)
#: Written on every picture.
RADIOLOGICAL_NOTE = "R | L: radiological, patient left on image right"
#: Obliquity (degrees) above which the picture says the scan is shown on its closest canonical axes.
OBLIQUE_NOTE_DEG = 1.0
PLANES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class PreviewDisplay:
    """How the three planes are shown: the display window, the voxel they pass through, size and resolution.

    Attributes:
        window: display window in HU (default abdomen W400/L40).
        centre: RAS-ordered voxel the planes pass through (default: the centroid of the labelled voxels; see
            :func:`preview_panels`).
        height_in, dpi: panel height in inches and resolution (4 in × 100 dpi → 400-pixel panels).
    """

    window: Sequence[float] = ABDOMEN_WINDOW
    centre: Sequence[int] | None = None
    height_in: float = 4.0
    dpi: int = 100


@dataclass(frozen=True)
class HeatMap:
    """How a heat map is blended over the CT: its colour map, the opacity at value 1 (``opacity · value``
    elsewhere) and the label of its colour bar."""

    cmap: str = "inferno"
    opacity: float = 0.7
    label: str = "attention coefficient α"


@dataclass(frozen=True)
class Panel:
    """One plane as drawn: arrays in display order (row 0 at the top, column 0 on the left).

    Attributes:
        plane: ``axial`` | ``coronal`` | ``sagittal``.
        image: the scan's values, ``(rows, cols)``.
        labels: the label map on the same pixels, or None.
        overlay: a heat map on the same pixels (e.g. α), or None.
        pixel_mm: ``(height, width)`` of one pixel in mm.
        slice_index: the slice's index along the plane's normal in the RAS-ordered volume.
        edges: the patient direction at the ``(left, right, top, bottom)`` edge of the panel.
    """

    plane: str
    image: np.ndarray
    labels: np.ndarray | None
    overlay: np.ndarray | None
    pixel_mm: tuple[float, float]
    slice_index: int
    edges: tuple[str, str, str, str]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """matplotlib ``extent`` in mm ``(left, right, bottom, top)`` for ``origin="upper"``."""
        rows, cols = self.image.shape
        return (0.0, cols * self.pixel_mm[1], rows * self.pixel_mm[0], 0.0)

    @property
    def aspect(self) -> float:
        """Pixel height / pixel width (what ``imshow(aspect=...)`` would need without an extent)."""
        return self.pixel_mm[0] / self.pixel_mm[1]


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` re-ordered (axis permutation and flips, views where possible) onto the closest RAS axes,
    and its affine — what ``nib.as_closest_canonical`` does to an image."""
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(array, ornt)
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])


def _thin(source, ornt: np.ndarray, shape: tuple[int, ...], ras_axis: int, index: int) -> np.ndarray:
    """The one-voxel-thick slab at ``index`` along RAS axis ``ras_axis``, RAS-ordered (the plane's axis has size
    1). Read by slicing ``source`` (an array or a nibabel array proxy: only the slab is read from disk)."""
    axis = int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])
    stored = index if ornt[axis, 1] > 0 else shape[axis] - 1 - index
    slicer: list = [slice(None)] * 3
    slicer[axis] = slice(stored, stored + 1)
    if len(source.shape) == 4:  # (X, Y, Z, 1)
        slicer.append(0)
    return nib.orientations.apply_orientation(np.asanyarray(source[tuple(slicer)]), ornt)


def _checked(array: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray | None:
    if array is None:
        return None
    array = np.asanyarray(array.dataobj if isinstance(array, nib.spatialimages.SpatialImage) else array)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if tuple(array.shape) != shape:
        raise ValueError(f"{what} shape {tuple(array.shape)} differs from the image's {shape}")
    return array


def centre_of(mask: np.ndarray) -> tuple[int, int, int] | None:
    """Rounded centroid (voxel indices) of a boolean volume, from its three axis projections; None if empty."""
    total = int(np.count_nonzero(mask))
    if not total:
        return None
    centre = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = np.count_nonzero(mask, axis=other)
        centre.append(round(float(np.dot(profile, np.arange(profile.size))) / total))
    return tuple(centre)  # type: ignore[return-value]


def preview_panels(
    image: nib.spatialimages.SpatialImage,
    labels: np.ndarray | None = None,
    *,
    overlay: np.ndarray | None = None,
    centre: Sequence[int] | None = None,
) -> dict[str, Panel]:
    """The three panels (module docstring) before drawing: ``{"axial": Panel, "coronal": …, "sagittal": …}``.

    Args:
        image: the scan, any orientation.
        labels: label map on the scan's grid (array order as stored), or None.
        overlay: a heat map on the scan's grid, or None.
        centre: the voxel the three planes pass through, as indices of the **RAS-ordered** volume; default
            the centroid of all labelled voxels, else of the overlay's upper half (``≥ ½ max``), else the
            volume's centre.
    """
    shape = tuple(int(n) for n in image.shape[:3])
    if len(image.shape) not in (3, 4) or (len(image.shape) == 4 and image.shape[3] != 1):
        raise ValueError(f"expected a 3D image, got shape {tuple(image.shape)}")
    labels = _checked(labels, shape, "label map")
    overlay = _checked(overlay, shape, "overlay")
    affine = np.asarray(image.affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    ras_shape = tuple(shape[int(np.flatnonzero(ornt[:, 0] == r)[0])] for r in range(3))
    sx, sy, sz = (float(v) for v in voxel_spacing(ras_affine))
    if centre is None:
        found = None if labels is None else centre_of(to_ras(labels, affine)[0] > 0)
        if found is None and overlay is not None and np.nanmax(overlay) > 0:
            found = centre_of(to_ras(overlay, affine)[0] >= 0.5 * np.nanmax(overlay))
        centre = found or tuple(n // 2 for n in ras_shape)
    i, j, k = (int(np.clip(c, 0, n - 1)) for c, n in zip(centre, ras_shape, strict=True))

    def cut(source, plane: str) -> np.ndarray | None:
        if source is None:
            return None
        if plane == "axial":  # rows: anterior → posterior; columns: patient right → left
            return np.ascontiguousarray(_thin(source, ornt, shape, 2, k)[::-1, ::-1, 0].T)
        if plane == "coronal":  # rows: superior → inferior; columns: patient right → left
            return np.ascontiguousarray(_thin(source, ornt, shape, 1, j)[::-1, 0, ::-1].T)
        # sagittal: rows superior → inferior; columns anterior → posterior
        return np.ascontiguousarray(_thin(source, ornt, shape, 0, i)[0, ::-1, ::-1].T)

    geometry = {
        "axial": ((sy, sx), k, ("R", "L", "A", "P")),
        "coronal": ((sz, sx), j, ("R", "L", "S", "I")),
        "sagittal": ((sz, sy), i, ("A", "P", "S", "I")),
    }
    return {
        plane: Panel(
            plane, cut(image.dataobj, plane), cut(labels, plane), cut(overlay, plane), px, index, edges
        )
        for plane, (px, index, edges) in geometry.items()
    }


def outline(labels: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Label values on each label's inner border in a 2D slice (``mask & ~erosion(mask)``, 4-connected,
    ``thickness`` pixels wide), 0 elsewhere."""
    out = np.zeros(labels.shape, dtype=labels.dtype)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        inner = ndimage.binary_erosion(mask, iterations=max(1, int(thickness)), border_value=0)
        out[mask & ~inner] = value
    return out


def _colours(label_names: Mapping[str, int]) -> dict[int, tuple[str, tuple[float, float, float]]]:
    """label value → (name, RGB 0–1) from :func:`medseg.export.codes.lookup`."""
    return {int(v): (str(n), lookup(str(n), int(v)).rgb_float) for n, v in label_names.items() if int(v) > 0}


def _draw(
    ax, panel: Panel, window: Sequence[float], colours: Mapping, thickness: int, heat: HeatMap | None
) -> None:
    ax.imshow(panel.image, cmap="gray", vmin=window[0], vmax=window[1], extent=panel.extent,
              interpolation="nearest", origin="upper")  # fmt: skip
    if heat is not None and panel.overlay is not None:
        values = np.nan_to_num(np.asarray(panel.overlay, dtype=np.float32))
        ax.imshow(values, cmap=heat.cmap, vmin=0.0, vmax=1.0, alpha=np.clip(values, 0, 1) * float(heat.opacity),
                  extent=panel.extent, interpolation="nearest", origin="upper")  # fmt: skip
    if panel.labels is not None:
        border = outline(panel.labels, thickness)
        rgba = np.zeros((*border.shape, 4), dtype=np.float32)
        for value, (_, rgb) in colours.items():
            hit = border == value
            rgba[hit, :3] = rgb
            rgba[hit, 3] = 1.0
        ax.imshow(rgba, extent=panel.extent, interpolation="nearest", origin="upper")
    ax.set_xlim(panel.extent[0], panel.extent[1])
    ax.set_ylim(panel.extent[2], panel.extent[3])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold"}
    left, right, top, bottom = panel.edges
    ax.text(0.01, 0.5, left, transform=ax.transAxes, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, transform=ax.transAxes, ha="right", va="center", **style)
    ax.text(0.5, 0.99, top, transform=ax.transAxes, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, transform=ax.transAxes, ha="center", va="bottom", **style)


def _thickness(panel: Panel, pixels: float) -> int:
    """Outline width in voxels so that a border stays about one output pixel wide or more."""
    return max(1, round(max(panel.image.shape) / max(pixels, 1.0)))


def _figure(
    panels: dict[str, Panel],
    colours,
    title: str,
    notes: list[str],
    heat: HeatMap | None,
    display: PreviewDisplay,
):
    height_in, dpi = display.height_in, display.dpi
    plt = pyplot()
    ratios = [(p.extent[1] - p.extent[0]) / (p.extent[2] - p.extent[3]) for p in panels.values()]
    bar_in, bar_labels_in = (0.25, 0.8) if heat is not None else (0.0, 0.0)
    present = [(v, n, rgb) for v, (n, rgb) in sorted(colours.items())]
    legend_rows = int(np.ceil(len(present) / 6)) if present else 0
    top_in, bottom_in = 0.55, 0.3 + 0.22 * legend_rows
    width_in = height_in * sum(ratios) + 0.1 * len(ratios) + bar_in + bar_labels_in + 0.2
    fig = plt.figure(figsize=(width_in, height_in + top_in + bottom_in), dpi=dpi)
    grid = fig.add_gridspec(
        1, len(ratios) + (1 if heat else 0), width_ratios=[*ratios, *([bar_in / height_in] if heat else [])],
        left=0.1 / width_in, right=1 - (0.1 + bar_labels_in) / width_in, top=1 - top_in / (height_in + top_in + bottom_in),
        bottom=bottom_in / (height_in + top_in + bottom_in), wspace=0.04,
    )  # fmt: skip
    axes = []
    for n, panel in enumerate(panels.values()):
        ax = fig.add_subplot(grid[0, n])
        _draw(ax, panel, display.window, colours, _thickness(panel, height_in * dpi), heat)
        ax.set_title(f"{panel.plane} {panel.slice_index}", fontsize=8, pad=2)
        axes.append(ax)
    if heat is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(Normalize(0, 1), heat.cmap), cax=fig.add_subplot(grid[0, -1]))
        bar.set_label(heat.label, fontsize=8)
    lines = [line for line in (title, "  ·  ".join([RADIOLOGICAL_NOTE, *notes])) if line]
    fig.suptitle("\n".join(lines), fontsize=9, y=1 - 0.05 / (height_in + top_in + bottom_in), va="top")
    if present:
        from matplotlib.patches import Patch

        handles = [
            Patch(facecolor="none", edgecolor=rgb, linewidth=2, label=name) for _, name, rgb in present
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    return fig, axes


def _notes(image: nib.spatialimages.SpatialImage, labels, label_names) -> list[str]:
    notes = []
    angle = obliquity_degrees(image.affine)
    if angle > OBLIQUE_NOTE_DEG:
        notes.append(f"oblique scan ({angle:.1f}°) shown on its closest canonical axes")
    if labels is not None and label_names:
        found = set(np.unique(np.asarray(labels)).tolist())
        absent = [n for n, v in label_names.items() if int(v) > 0 and int(v) not in found]
        if absent:
            notes.append("not found: " + ", ".join(absent))
    return notes


def preview_figure(
    image: nib.spatialimages.SpatialImage,
    labels: np.ndarray | None,
    label_names: Mapping[str, int],
    *,
    title: str = "",
    display: PreviewDisplay = PreviewDisplay(),
):
    """The preview as a matplotlib figure and its three axes (for :func:`write_preview`, notebooks, tests)."""
    panels = preview_panels(image, labels, centre=display.centre)
    colours = _colours(label_names)
    if labels is not None:
        present = set(np.unique(np.asarray(labels)).tolist())
        colours = {v: c for v, c in colours.items() if v in present}
    notes = _notes(image, labels, label_names)
    return _figure(panels, colours, title, notes, None, display)


def write_preview(
    image: nib.spatialimages.SpatialImage,
    labels: np.ndarray,
    label_names: Mapping[str, int],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    display: PreviewDisplay = PreviewDisplay(),
) -> Path:
    """Write the three-plane preview PNG (module docstring) atomically; returns ``path``.

    Args:
        image: the scan (HU), any orientation; oblique scans are shown on their closest canonical axes.
        labels: the label map on the scan's grid (same array order as the image).
        label_names: ``{name: value}``; colours and legend from :func:`medseg.export.codes.lookup`.
        path: the PNG to write.
        title: first line of the caption (default: the image's file name, if any).
        display: window, centre, panel height and resolution (:class:`PreviewDisplay`).
    """
    if title is None:
        title = Path(image.get_filename()).name if image.get_filename() else ""
    fig, _ = preview_figure(image, labels, label_names, title=title, display=display)
    path = Path(path)
    save_png(fig, path, display.dpi)
    pyplot().close(fig)
    return path


def write_thumbnail(
    image: nib.spatialimages.SpatialImage,
    labels: np.ndarray | None,
    label_names: Mapping[str, int],
    path: str | os.PathLike,
    *,
    window: Sequence[float] = ABDOMEN_WINDOW,
    size_px: int = 200,
    centre: Sequence[int] | None = None,
) -> Path:
    """Write the axial panel alone, about ``size_px`` pixels on its longer side, with outlines and the
    R / L letters (no caption): the review page's thumbnail."""
    plt = pyplot()
    panel = preview_panels(image, labels, centre=centre)["axial"]
    width_mm, height_mm = panel.extent[1], panel.extent[2]
    scale = size_px / max(width_mm, height_mm)
    dpi = 100
    fig = plt.figure(figsize=(width_mm * scale / dpi, height_mm * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    colours = _colours(label_names)
    _draw(ax, panel, window, colours, _thickness(panel, size_px), None)
    path = Path(path)
    save_png(fig, path, dpi)
    plt.close(fig)
    return path


def write_attention_overlay(
    image: nib.spatialimages.SpatialImage,
    alpha: np.ndarray | nib.spatialimages.SpatialImage,
    path: str | os.PathLike,
    *,
    labels: np.ndarray | None = None,
    label_names: Mapping[str, int] | None = None,
    title: str = "",
    heat: HeatMap = HeatMap(),
    display: PreviewDisplay = PreviewDisplay(),
) -> Path:
    """Write a heat map (values in [0, 1], e.g. an ``alpha_level<l>`` map) over the CT, three planes.

    Same planes and conventions as :func:`write_preview` (and the same centre when ``labels`` are given, so
    the two pictures correspond; else the centroid of the map's upper half). The heat map's opacity grows with
    its value (``heat.opacity · α``, :class:`HeatMap`): where the gate suppresses (α ≈ 0) the CT shows
    through. With ``labels`` the structures are outlined too; ``display`` as for :func:`write_preview`.
    """
    panels = preview_panels(image, labels, overlay=alpha, centre=display.centre)
    colours = _colours(label_names or {})
    notes = _notes(image, None, None)
    fig, _ = _figure(panels, colours, title, notes, heat, display)
    path = Path(path)
    save_png(fig, path, display.dpi)
    pyplot().close(fig)
    return path
