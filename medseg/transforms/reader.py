"""MONAI's NIfTI reader on top of medseg's one volume reader, so training data fails like any other input.

``LoadVolumed`` (``LoadImage`` with :class:`VolumeReader`) reads each file (or, for a multi-channel case, each
channel file, stacked as channels by MONAI) with :func:`medseg.io.load_volume` — missing, empty,
truncated, corrupt, non-3D, NaN-holding volumes and degenerate affines raise
:class:`medseg.io.InputError` naming the file — and then hands the checked image to MONAI's
``NibabelReader`` for the metadata (affine, spacing, channel handling) exactly as before. The voxel array is
read from disk once: ``load_volume`` keeps it in memory and MONAI reads it from there.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import LoadImage, MapTransform
from monai.utils import ensure_tuple

from medseg.io import load_volume


class VolumeReader(NibabelReader):
    """``NibabelReader`` whose ``read`` goes through :func:`medseg.io.load_volume`."""

    def read(self, data: Sequence[str] | str, **kwargs):
        filenames = ensure_tuple(data)
        self.filenames = filenames
        images = [correct_nifti_header_if_necessary(load_volume(name)) for name in filenames]
        return images if len(filenames) > 1 else images[0]


class LoadVolumed(MapTransform):
    """``LoadImaged`` with :class:`VolumeReader` and no fallback to MONAI's other readers.

    ``LoadImaged(reader=...)`` tries every registered reader when the designated one fails (a truncated NIfTI
    then ends in PydicomReader's error); passing the reader at call time, as here, makes the medseg error the
    one that is raised.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        self._loader = LoadImage(image_only=True)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            # a reader per call: NibabelReader keeps the file names of its last read, and CacheDataset fills
            # its cache from several threads (a shared reader would stack another case's channel count)
            d[key] = self._loader(d[key], reader=VolumeReader())
        return d
