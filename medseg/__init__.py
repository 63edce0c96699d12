"""medseg: 3D attention segmentation networks for CT.

The Python API (:mod:`medseg.api`; torch is imported when a function is called, not here)::

    import medseg
    mask = medseg.segment("ct.nii.gz", "runs/demo")    # a Nifti1Image in the scan's exact geometry

The library never imports :mod:`pipelines` (the CLI and end-to-end workflows).
"""

from __future__ import annotations

from medseg.api import create_network, evaluate, list_networks, load_model, segment

__version__ = "0.2.0"
__all__ = ["__version__", "create_network", "evaluate", "list_networks", "load_model", "segment"]
