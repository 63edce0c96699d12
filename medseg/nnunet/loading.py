"""``-m`` values → an :class:`~medseg.nnunet.predict.NnunetPredictor` when they name one nnU-Net v2 model folder;
None for medseg checkpoints (the batch core then loads those as before).

>>> predictor = nnunet_predictor(["Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres"], options)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from medseg.config.segment import SegmentOptions
from medseg.io import InputError
from medseg.nnunet.folder import is_model_folder, read_model_folder
from medseg.nnunet.predict import NnunetPredictor


def nnunet_predictor(
    models: str | os.PathLike | Sequence[str | os.PathLike],
    options: SegmentOptions,
    *,
    uncertainty: bool = False,
    attention: bool = False,
) -> NnunetPredictor | None:
    """The predictor of an nnU-Net model folder given as the only ``-m`` value (``options.folds``,
    ``options.checkpoint_name`` choose its checkpoints), else None.

    Raises:
        InputError: an nnU-Net folder beside other models, ``--folds``/``--checkpoint`` without one,
            ``--attention`` with one (nnU-Net's networks have no attention gates), or an unusable folder.
    """
    items = [models] if isinstance(models, str | os.PathLike) else list(models)
    folders = [Path(m) for m in items if is_model_folder(m)]
    if not folders:
        if options.folds or options.checkpoint_name:
            raise InputError("--folds and --checkpoint apply to nnU-Net v2 model folders (plans.json) only")
        return None
    if len(items) > 1:
        raise InputError(f"{folders[0]}: an nnU-Net model folder runs alone; choose its folds with --folds")
    if attention:
        raise InputError(f"{folders[0]}: --attention needs medseg's attention networks, not an nnU-Net model")
    folder = read_model_folder(folders[0], options.folds, options.checkpoint_name)
    return NnunetPredictor(folder, options, uncertainty=uncertainty)
