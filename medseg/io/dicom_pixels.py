"""The Image Pixel module of a DICOM CT file, checked from its header alone, before any voxel is read.

:func:`read_image_header` parses a file's header (pydicom, ``stop_before_pixels``) and then only the 8 or
12 bytes that begin its pixel data element — tag, VR, value length — never the value itself, so it costs
what the header read costs. :func:`check_pixel_module` turns that header into ``None`` or one line naming the
attribute with what was expected and what was found; :func:`check_series` runs it over the images of one
series (naming the first file that fails) and caps the voxels a series may declare
(:data:`MAX_SERIES_VOXELS`), so a lying header never becomes an allocation.

Rules (DICOM PS3.3 C.7.6.3 Image Pixel module and C.8.2.1 CT Image module):

* PhotometricInterpretation MONOCHROME2 or MONOCHROME1, SamplesPerPixel 1: anything else (RGB, palette,
  YBR) is not a CT image.
* BitsAllocated 8, 16 or 32 (1 is a bitmap, not a CT image); 1 ≤ BitsStored ≤ BitsAllocated;
  HighBit = BitsStored − 1; PixelRepresentation 0 (unsigned) or 1 (signed).
* Rows and Columns from 1 to :data:`MAX_IMAGE_SIDE`.
* Uncompressed pixel data (native transfer syntaxes, deflated included) must hold exactly
  Rows × Columns × BitsAllocated/8 × SamplesPerPixel × frames bytes (one more when that is odd: DICOM pads
  values to even length); the bytes found are the element's length or, if the file ends sooner, what is
  left of it. Encapsulated (compressed) pixel data must hold at least 1/:data:`ENCAPSULATED_MAX_RATIO` of
  the declared bytes.
* RescaleSlope finite and non-zero, RescaleIntercept finite (absent: 1 and 0): HU = slope × stored value +
  intercept is meaningless otherwise.

**MONOCHROME1.** For CT the display polarity does not touch HU: HU = slope × stored + intercept either
way. SimpleITK 2.5 (GDCM) however inverts MONOCHROME1 stored values while decoding (unsigned 16-bit:
``2^BitsStored − 1 − v``; signed: ``−1 − v``), before the rescale: wrong HU, silently; and it cannot read
signed 12-bit MONOCHROME1 at all. So :func:`monochrome2_copies` hands it temporary copies of those files
labelled MONOCHROME2 — same stored values, same rescale — and the volume comes out in the HU the files
define (tested against the source voxels; the copies cost one read and write of those files).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

#: Largest Rows or Columns accepted: CT matrices are 512–2048; 8192 leaves room for micro-CT.
MAX_IMAGE_SIDE = 8192
#: Largest number of voxels one series may declare (sum of Rows × Columns × frames over its images):
#: 2^30 = 1024³, 2 GiB as int16, 4 GiB as float32; a 512 × 512 × 1000 CT is a quarter of it.
MAX_SERIES_VOXELS = 2**30
#: Compressed pixel data must hold at least 1/this of the declared bytes. JPEG-LS and JPEG 2000 shrink a
#: blank 2048² slice about 25 000-fold (RLE at most 64-fold), so only a header that lies far more is refused.
ENCAPSULATED_MAX_RATIO = 2**16
PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
#: Explicit VRs whose element header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass(frozen=True)
class PixelExtent:
    """A file's pixel data element as found after its header: ``tag`` (one of :data:`PIXEL_TAGS`),
    ``length`` (the value length in the element header; ``None`` for undefined length, i.e. encapsulated
    fragments) and ``available`` (bytes from the start of the value to the end of the, possibly inflated,
    data set)."""

    tag: int
    length: int | None
    available: int

    @property
    def present(self) -> int:
        """Bytes of the value actually in the file (a truncated file holds fewer than its length says)."""
        return self.available if self.length is None else min(self.length, self.available)


def _extent(stream, ds: Dataset) -> PixelExtent | None:
    """The pixel data element at ``stream``'s position (where ``stop_before_pixels`` left it), or None."""
    implicit, little = ds.original_encoding
    start = stream.tell()
    head = stream.read(12)
    end = stream.seek(0, os.SEEK_END)
    order = "<" if little in (True, None) else ">"
    if len(head) < 8:
        return None
    group, element = struct.unpack(order + "HH", head[:4])
    if (tag := group << 16 | element) not in PIXEL_TAGS:
        return None
    if implicit:
        offset, (length,) = 8, struct.unpack(order + "L", head[4:8])
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            return None
        offset, (length,) = 12, struct.unpack(order + "L", head[8:12])
    else:
        offset, (length,) = 8, struct.unpack(order + "H", head[6:8])
    return PixelExtent(tag, None if length == 0xFFFFFFFF else length, max(end - start - offset, 0))


def read_image_header(path: Path) -> tuple[Dataset, PixelExtent | None] | str | None:
    """The header of an image file (``stop_before_pixels``) and its pixel data element's extent (``None``
    when the data set ends without one); ``None`` for a non-DICOM or non-image file; a one-line cause
    (``<file name>: ...``) when a file with the DICOM preamble cannot be parsed."""
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            # A deflated data set is inflated into ds.buffer; any other is parsed straight from fh.
            extent = _extent(ds.buffer if ds.buffer is not None else fh, ds)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types on broken files
        try:
            with open(path, "rb") as fh:
                dicm = fh.read(132)[128:] == b"DICM"
        except OSError:
            dicm = True
        return f"{path.name}: {' '.join(str(exc).split())[:120]}" if dicm else None
    if "Rows" in ds and "Columns" in ds:
        return ds, extent
    # pydicom parses a truncated header without complaint: an image SOP class without Rows is broken.
    image = "Image Storage" in getattr(ds.get("SOPClassUID"), "name", "")
    return f"{path.name}: header ends before Rows/Columns (truncated?)" if image else None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(ds: Dataset, keyword: str, default: float) -> tuple[float | None, str]:
    """(the value as a float, or None when it is not one number; the value as written)."""
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom, set to raise on invalid values, raises on a DS it cannot convert
        value = getattr(ds.get_item(keyword), "value", "?")
        value = value.decode("latin-1") if isinstance(value, bytes) else value
        return None, " ".join(str(value).split())[:40]
    if value is None or value == "":
        return default, "absent"
    try:
        return float(value), str(value)
    except (TypeError, ValueError):
        return None, " ".join(str(value).split())[:40]


def _photometric(ds: Dataset) -> str:
    return " ".join(str(ds.get("PhotometricInterpretation") or "").split()).upper()


def _format(ds: Dataset) -> str | None:
    """The first problem of the pixel format attributes (everything the byte count needs), or None."""
    if (pi := _photometric(ds)) not in ("MONOCHROME2", "MONOCHROME1"):
        found = pi or "missing"
        return f"PhotometricInterpretation {found}: expected MONOCHROME2 or MONOCHROME1 (not a CT image)"
    samples = _int(ds, "SamplesPerPixel")
    if samples != 1:
        return f"SamplesPerPixel {samples if samples is not None else 'missing'}: expected 1 (not a CT image)"
    allocated = _int(ds, "BitsAllocated")
    if allocated not in (8, 16, 32):
        why = " (a bitmap, not a CT image)" if allocated == 1 else ""
        found = allocated if allocated is not None else "missing"
        return f"BitsAllocated {found}: expected 8, 16 or 32{why}"
    stored = _int(ds, "BitsStored")
    if stored is None or not 1 <= stored <= allocated:
        found = stored if stored is not None else "missing"
        return f"BitsStored {found}: expected 1 to {allocated} (at most BitsAllocated {allocated})"
    high = _int(ds, "HighBit")
    if high != stored - 1:
        found = high if high is not None else "missing"
        return f"HighBit {found}: expected {stored - 1} (BitsStored {stored} − 1)"
    representation = _int(ds, "PixelRepresentation")
    if representation not in (0, 1):
        found = representation if representation is not None else "missing"
        return f"PixelRepresentation {found}: expected 0 (unsigned) or 1 (signed)"
    for keyword in ("Rows", "Columns"):
        if (n := _int(ds, keyword)) is None or n < 1:
            return f"{keyword} {n if n is not None else 'missing'}: expected 1 to {MAX_IMAGE_SIDE}"
    return None


def _frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _bytes(ds: Dataset, extent: PixelExtent | None) -> str | None:
    """Declared pixel bytes against the bytes in the file (format attributes already checked)."""
    rows, columns, bits, frames = ds.Rows, ds.Columns, ds.BitsAllocated, _frames(ds)
    declared = rows * columns * frames * bits // 8
    how = f"Rows {rows} × Columns {columns} × BitsAllocated {bits}/8" + (
        f" × {frames} frames" if frames > 1 else ""
    )
    if extent is None:
        return f"no PixelData element: expected {declared} bytes of pixel data ({how})"
    if extent.tag != 0x7FE00010:
        return f"{PIXEL_TAGS[extent.tag]} instead of PixelData: float pixels are not a CT image"
    found = extent.present
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if extent.length is None or (syntax is not None and syntax.is_encapsulated):
        if declared > ENCAPSULATED_MAX_RATIO * found:
            return (
                f"PixelData declares {declared} bytes ({how}) but holds {found} bytes of compressed data, "
                f"less than 1/{ENCAPSULATED_MAX_RATIO} of it; header wrong?"
            )
    elif found != declared and not (declared % 2 and found == declared + 1):
        return f"PixelData holds {found} bytes, expected {declared} ({how}); file truncated or header wrong"
    return None


def check_pixel_module(ds: Dataset, extent: PixelExtent | None) -> str | None:
    """Why one image's pixel module cannot give a correct CT slice (one line naming the attribute, what
    was expected and what was found), or None. ``extent`` comes from :func:`read_image_header`."""
    cause = _format(ds) or _bytes(ds, extent)
    if cause:
        return cause
    if max(ds.Rows, ds.Columns) > MAX_IMAGE_SIDE:
        return f"Rows {ds.Rows} × Columns {ds.Columns}: expected at most {MAX_IMAGE_SIDE} each"
    for keyword, default, zero_ok in (("RescaleSlope", 1.0, False), ("RescaleIntercept", 0.0, True)):
        value, written = _number(ds, keyword, default)
        if value is None or not math.isfinite(value) or (value == 0 and not zero_ok):
            expected = "a finite number" if zero_ok else "a finite non-zero number"
            return f"{keyword} {written}: expected {expected} (HU = slope × stored value + intercept)"
    return None


def check_series(
    images: Sequence[tuple[Path, Dataset, PixelExtent | None]], max_voxels: int | None = None
) -> str | None:
    """``<file name>: <cause>`` for the first image (by path) that :func:`check_pixel_module` refuses,
    then whether the series declares more than ``max_voxels`` (default :data:`MAX_SERIES_VOXELS`) voxels;
    None when every check passes."""
    max_voxels = MAX_SERIES_VOXELS if max_voxels is None else max_voxels
    causes = ((path, check_pixel_module(ds, extent)) for path, ds, extent in images)
    refused = sorted(((str(path), path.name, cause) for path, cause in causes if cause))
    if refused:
        more = f" (and {len(refused) - 1} more file(s) refused)" if len(refused) > 1 else ""
        return f"{refused[0][1]}: {refused[0][2]}{more}"
    voxels = sum(ds.Rows * ds.Columns * _frames(ds) for _, ds, _ in images)
    if voxels > max_voxels:
        sizes = sorted({f"{ds.Rows} × {ds.Columns}" for _, ds, _ in images})
        return (
            f"{len(images)} images of {', '.join(sizes[:3])} declare {voxels} voxels in all, more than "
            f"medseg reads in one series ({max_voxels}); header wrong?"
        )
    return None


def is_monochrome1(ds: Dataset) -> bool:
    return _photometric(ds) == "MONOCHROME1"


@contextlib.contextmanager
def monochrome2_copies(files: Sequence[Path], monochrome1: Sequence[Path]) -> Iterator[list[Path]]:
    """``files`` with each of ``monochrome1`` replaced by a temporary copy labelled MONOCHROME2 (same
    stored values and rescale: the HU SimpleITK returns are then the files' own); removed on exit.

    Raises:
        OSError: a copy cannot be written.
    """
    if not monochrome1:
        yield list(files)
        return
    relabel = set(monochrome1)
    with tempfile.TemporaryDirectory(prefix="medseg-monochrome1-") as tmp:
        out = []
        for k, path in enumerate(files):
            if path in relabel:
                ds = pydicom.dcmread(path)
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.save_as(path := Path(tmp) / f"{k:05d}.dcm")
            out.append(path)
        yield out
