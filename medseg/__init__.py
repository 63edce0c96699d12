"""medseg: 3D attention segmentation networks for CT.

The library never imports :mod:`pipelines` (the CLI and end-to-end workflows).
"""

from __future__ import annotations

__version__ = "0.2.0"
