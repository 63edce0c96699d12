"""nnU-Net v2 model folders run through medseg: read and check a folder (``folder``), load its fold checkpoints
without executing pickled code (``weights``), build its network with nnU-Net's own network package
(``network``), and reproduce nnU-Net's inference behind medseg's predictor interface (``predict``,
``resample``). ``docs/nnunet.md`` is the user's guide."""

from medseg.nnunet.folder import ModelFolder, is_model_folder, read_model_folder
from medseg.nnunet.predict import NnunetPredictor

__all__ = ["ModelFolder", "NnunetPredictor", "is_model_folder", "read_model_folder"]
