"""The batch application around the inference core: inputs (NIfTI, DICOM, archives), the cases through
the lanes, outputs and sidecars, the manifest, sharding, re-export, and the review page over an output folder."""
