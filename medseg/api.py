"""medseg from Python: segment a scan in memory, load a model once, build a network by name, score a mask.

>>> import medseg
>>> model = medseg.load_model("runs/demo")               # doctest: +SKIP   (as `segment -m`: file, run, folds)
>>> mask = medseg.segment("ct.nii.gz", model)            # doctest: +SKIP   (Nifti1Image, the scan's geometry)
>>> mask = medseg.segment(volume, model, affine=affine)  # doctest: +SKIP   (numpy array / tensor + voxel→mm)
>>> medseg.evaluate(mask, "labels/ct.nii.gz")[1]["dice"]  # doctest: +SKIP   (the metrics of `medseg evaluate`)
>>> net = medseg.create_network("attention_unet", 1, 7, bottleneck="pam")

Every function here is a thin door to the library: :func:`segment` runs the one inference path
(:class:`medseg.inference.Predictor`, what ``medseg segment`` runs: same preprocessing, sliding window,
precision, restore and postprocessing, so the masks are equal voxel for voxel); :func:`load_model` resolves
checkpoints as ``segment -m`` does (:func:`medseg.batch.inputs.resolve_checkpoints`);
:func:`create_network` builds from the registry (:mod:`medseg.nets.registry`); :func:`evaluate` is
:func:`medseg.metrics.evaluate_pair` with the geometry check of ``medseg evaluate``.

torch, MONAI and nibabel are imported inside the functions, so ``import medseg`` stays instant.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (import medseg stays ~1 ms)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    import nibabel as nib
    import numpy as np
    from torch import nn

    from medseg.inference.predictor import Predictor

#: What :func:`segment` accepts as ``image`` (named in its TypeError).
IMAGE_TYPES = (
    "a NIfTI file path, a nibabel Nifti1Image, a 3D numpy array or torch tensor with affine=, or a list of "
    "channel files (a multi-channel model)"
)
#: What :func:`segment` and :func:`load_model` accept as ``model``.
MODEL_TYPES = (
    "a checkpoint file, a run or cross-validation folder, a list of checkpoints, or a model from "
    "medseg.load_model"
)


def load_model(
    model: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    device: str = "auto",
    precision: str = "auto",
    tta: bool = False,
    postprocess: str | Mapping[Any, Any] = "auto",
    backend: str = "auto",
    folds: Sequence[int | str] | None = None,
) -> Predictor:
    """Load checkpoints once, for many :func:`segment` calls — whatever ``medseg segment -m`` accepts: a
    ``best.pt``, a run folder (its ``best.pt``), a cross-validation folder (every ``fold_K/best.pt``, averaged),
    a list of checkpoints (an ensemble), or an nnU-Net v2 model folder (``plans.json``, ``dataset.json``,
    ``fold_*/checkpoint_final.pth``; :mod:`medseg.nnunet`, its ``folds`` chosen by ``folds``, default all).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        precision: ``auto`` (bf16 where the CPU or GPU computes it natively, else fp32 / fp16) | ``fp32`` |
            ``bf16`` | ``fp16`` (CUDA).
        tta: test-time mirroring.
        postprocess: ``auto`` (the rules recorded in the checkpoint), ``none``, or ``{label: rule}``.
        backend: ``auto`` (OpenVINO on the CPU when installed, except ``precision="fp32"``: PyTorch's exact
            path) | ``torch`` | ``openvino`` (:func:`medseg.inference.backends.resolve_backend`).
            :func:`segment` takes no ``backend`` of its own: pass it a model loaded with one.

    Returns:
        A :class:`medseg.inference.Predictor` (``.label_names``: name → label value; ``.plan``).

    Example:
        >>> model = medseg.load_model("runs/cv", device="cpu")          # doctest: +SKIP
        >>> masks = [medseg.segment(path, model) for path in paths]    # doctest: +SKIP

    Raises:
        TypeError: ``model`` is not one of :data:`MODEL_TYPES`.
        ValueError: a missing or unusable checkpoint (:class:`medseg.io.InputError`, naming the file), an
            unknown device, precision, backend or postprocess mode.
    """
    from medseg.batch.inputs import resolve_checkpoints
    from medseg.config.segment import SegmentOptions
    from medseg.inference.predictor import Predictor
    from medseg.nnunet.loading import nnunet_predictor

    paths = _checkpoint_paths(model)
    options = SegmentOptions(
        device=device,
        precision=precision,
        tta=tta,
        backend=backend,
        postprocess=postprocess,
        folds=tuple(str(f) for f in folds or ()) or None,
    )
    found = nnunet_predictor(paths, options)
    if found is not None:
        return found  # type: ignore[return-value]  # the same interface as Predictor
    return Predictor(
        resolve_checkpoints(paths),
        SegmentOptions(backend=backend),
        device=device,
        precision=precision,
        tta=tta,
        postprocess=postprocess,
    )


def segment(
    image: Any,
    model: Any,
    *,
    affine: Any = None,
    device: str = "auto",
    precision: str = "auto",
    tta: bool = False,
    postprocess: str | Mapping[Any, Any] = "auto",
    return_probabilities: bool = False,
) -> nib.Nifti1Image | tuple[nib.Nifti1Image, np.ndarray]:
    """Segment one scan in memory; the mask is what ``medseg segment`` writes for it, voxel for voxel.

    Args:
        image: a NIfTI path, a ``nibabel.Nifti1Image``, or a 3D numpy array / torch tensor of HU values with
            ``affine``; for a multi-channel model the list of its channel files.
        model: a checkpoint path, a run or cross-validation folder, a list of checkpoints, or a model from
            :func:`load_model` (reuse it: loading costs more than a small scan).
        affine: for an array only: the 4×4 voxel → mm matrix of the array's axes, RAS (+x left → right,
            +y posterior → anterior, +z inferior → superior) as in NIfTI — ``nibabel`` gives it as
            ``img.affine``; an LPS matrix (DICOM, ITK) must have its first two rows negated first.
        device, precision, tta, postprocess: as :func:`load_model`; with a loaded model, leave them at their
            defaults (the model's own settings are used) or repeat the model's.
        return_probabilities: also return the class probabilities on the scan's grid: float32
            ``(K, *shape)``, channel ``k`` the label value ``k`` (names: ``load_model(...).label_names``).

    Returns:
        A uint8 ``Nifti1Image`` of the label values with the input's exact shape and affine (a NIfTI input's
        header, qform and sform kept), or ``(mask, probabilities)``.

    Example:
        >>> img = nibabel.load("ct.nii.gz")                                           # doctest: +SKIP
        >>> mask = medseg.segment(img.get_fdata(), "runs/demo", affine=img.affine)   # doctest: +SKIP
        >>> mask, probs = medseg.segment(img, model, return_probabilities=True)      # doctest: +SKIP

    Raises:
        TypeError: ``image`` or ``model`` of a type not listed above (the message lists what is accepted).
        ValueError: an array without ``affine`` (or an affine that is not a finite, invertible 4×4 voxel → mm
            matrix), ``affine`` given with a file or image (they carry their own), settings that contradict a
            loaded model's, an unusable scan or checkpoint (:class:`medseg.io.InputError`, naming it).
    """
    import numpy as np

    from medseg.io.nifti import image_like

    source = _as_image(image, affine)
    predictor = _predictor(model, device, precision, tta, postprocess)
    result = predictor.predict(source, probabilities=return_probabilities)
    dtype = np.uint8 if int(result.labels.max(initial=0)) < 256 else np.uint16
    mask = image_like(result.labels, result.reference, dtype)
    return (mask, result.probabilities) if return_probabilities else mask


def create_network(name: str, in_channels: int, num_classes: int, **overrides: Any) -> nn.Module:
    """A registered network, untrained, in training mode: ``name`` from :func:`list_networks` and any field of
    :class:`medseg.config.ModelConfig` (the YAML ``model:`` section) as a keyword, plus ``pool_kernels``.

    Example:
        >>> net = medseg.create_network("attention_unet", 1, 3, filters=[8, 16, 32, 64])
        >>> net(torch.zeros(1, 1, 32, 32, 16))["logits"][0].shape
        torch.Size([1, 3, 32, 32, 16])

    Raises:
        RegistryError: an unknown network name (the registry's message: the valid names, the closest one).
        TypeError: an unknown keyword (the valid ones listed).
        ValueError: a bad value (``ConfigError`` naming the ``model.`` key and the allowed values) or
            channel counts that are not positive integers.
    """
    import dataclasses

    from medseg.config import ModelConfig
    from medseg.nets.registry import NETWORKS, build_network, look_up

    look_up(NETWORKS, name, "network")
    pool_kernels = overrides.pop("pool_kernels", None)
    fields = sorted(f.name for f in dataclasses.fields(ModelConfig) if f.name != "name")
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(
            f"create_network: unknown option(s) {', '.join(unknown)}; valid: {', '.join(fields)}, pool_kernels"
        )
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"create_network: {what} must be a positive integer, got {value!r}")
    return build_network(ModelConfig(name=name, **overrides), in_channels, num_classes, pool_kernels)


def list_networks() -> list[str]:
    """The network names :func:`create_network` (and ``model.name`` in a config) accepts."""
    from medseg.nets.registry import NETWORKS

    return sorted(NETWORKS)


def evaluate(
    pred: Any,
    ref: Any,
    spacing: Sequence[float] | None = None,
    *,
    labels: Sequence[int] | None = None,
    tolerance: float | Mapping[int, float] = 2.0,
    percentile: float = 95.0,
) -> dict[int, dict[str, float]]:
    """Every metric of every label for one prediction / reference pair — :func:`medseg.metrics.evaluate_pair`
    (Dice, IoU, precision, recall, HD95, ASSD, NSD at ``tolerance`` mm, volumes; empty-mask policy there).

    Args:
        pred, ref: label maps: numpy arrays / torch tensors of one shape (then ``spacing`` is required), or
            NIfTI images / paths (then the spacing is the reference's, unless given, and the prediction must
            lie on the reference's grid, as ``medseg evaluate`` requires).
        spacing: voxel size in mm along the array axes.
        labels: the labels to score (default: every non-zero label present in either).

    Returns:
        ``{label: {metric: value}}``.

    Example:
        >>> medseg.evaluate(mask, "labelsTs/case.nii.gz")[1]["dice"]             # doctest: +SKIP
        >>> medseg.evaluate(pred_array, ref_array, spacing=(0.8, 0.8, 1.5))      # doctest: +SKIP

    Raises:
        TypeError: an input that is none of those.
        ValueError: no spacing for arrays, different shapes or grids, not a label map.
    """
    from medseg.evaluation.folder import same_grid
    from medseg.io import voxel_spacing
    from medseg.metrics import check_label_map, evaluate_pair

    pred_array, pred_affine = _label_array(pred, "pred")
    ref_array, ref_affine = _label_array(ref, "ref")
    if pred_array.shape != ref_array.shape:
        raise ValueError(f"evaluate: pred shape {pred_array.shape} differs from ref shape {ref_array.shape}")
    if pred_affine is not None and ref_affine is not None:
        if not same_grid(pred_array.shape, pred_affine, ref_array.shape, ref_affine):
            raise ValueError("evaluate: pred and ref lie on different grids (their affines differ)")
    if spacing is None:
        affine = ref_affine if ref_affine is not None else pred_affine
        if affine is None:
            raise ValueError("evaluate: spacing= (voxel size in mm) is needed for arrays")
        spacing = voxel_spacing(affine)
    pred_array = check_label_map(pred_array, "pred")
    ref_array = check_label_map(ref_array, "ref")
    return evaluate_pair(pred_array, ref_array, spacing, labels, tolerance, percentile)


def _is_tensor(value: object) -> bool:
    torch = sys.modules.get("torch")  # a tensor exists only if torch was imported
    return torch is not None and isinstance(value, torch.Tensor)


def _is_path(value: object) -> bool:
    return isinstance(value, str | os.PathLike)


def _numpy(value: Any) -> np.ndarray:
    """A numpy array or a torch tensor (any device and float type) as a numpy array."""
    import numpy as np

    if _is_tensor(value):
        value = value.detach().cpu()
        return (
            value.float() if value.dtype == sys.modules["torch"].bfloat16 else value
        ).numpy()  # no numpy bf16
    return np.asarray(value)


def _checked_affine(affine: Any) -> np.ndarray:
    import numpy as np

    if affine is None:
        raise ValueError(
            "segment: an array needs affine= (its 4×4 voxel → mm matrix, RAS as in NIfTI: nibabel's "
            "img.affine); without it the scan's orientation and spacing are unknown"
        )
    try:
        matrix = np.asarray(_numpy(affine), dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"segment: affine must be a 4×4 matrix of numbers, got {type(affine).__name__}"
        ) from None
    if matrix.shape != (4, 4):
        raise ValueError(f"segment: affine must be a 4×4 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError("segment: affine must be finite with last row [0, 0, 0, 1]")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-8:
        raise ValueError("segment: affine is not invertible (a zero voxel size or collinear axes)")
    return matrix


def _as_image(image: Any, affine: Any) -> Any:
    """A path, an image or a channel list as they are, an array as a NIfTI image with ``affine``."""
    import nibabel as nib
    import numpy as np

    if _is_path(image) or isinstance(image, nib.spatialimages.SpatialImage):
        if affine is not None:
            raise ValueError("segment: affine= is for arrays; a file or an image carries its own affine")
        return image
    if isinstance(image, list | tuple) and image and all(_is_path(p) for p in image):
        return list(image)
    if not (isinstance(image, np.ndarray) or _is_tensor(image)):
        raise TypeError(f"segment: image must be {IMAGE_TYPES}; got {type(image).__name__}")
    array = _numpy(image)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"segment: expected a 3D array (X, Y, Z), got shape {tuple(array.shape)}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"segment: expected integer or floating-point voxels (HU), got {array.dtype}")
    return nib.Nifti1Image(array, _checked_affine(affine))


def _checkpoint_paths(model: Any) -> Any:
    if _is_path(model):
        return model
    if isinstance(model, list | tuple) and model and all(_is_path(p) for p in model):
        return list(model)
    hint = ""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        hint = (
            " (a bare network has no preprocessing plan: use medseg.inference.Predictor.from_network(network, "
            "plan, label_names))"
        )
    raise TypeError(f"model must be {MODEL_TYPES}; got {type(model).__name__}{hint}")


def _predictor(model: Any, device: str, precision: str, tta: bool, postprocess: Any) -> Predictor:
    """The loaded model as it is (settings checked against it), or a model loaded with the settings."""
    from medseg.device import resolve_device
    from medseg.inference.predictor import Predictor
    from medseg.nnunet.predict import NnunetPredictor

    if not isinstance(model, Predictor | NnunetPredictor):
        return load_model(model, device=device, precision=precision, tta=tta, postprocess=postprocess)
    differ = []
    if device != "auto" and resolve_device(device) != model.device:
        differ.append(f"device {device!r} (loaded on {model.device})")
    if precision not in ("auto", None, model.precision):
        differ.append(f"precision {precision!r} (loaded with {model.precision})")
    elif precision == "fp32" and model.backend != "torch":  # fp32 by name is PyTorch's exact path
        differ.append(f"precision 'fp32' (loaded on the {model.backend} back end)")
    if tta and not model.tta:
        differ.append("tta=True (loaded without)")
    if not (isinstance(postprocess, str) and postprocess == "auto"):
        differ.append(f"postprocess {postprocess!r}")
    if differ:
        raise ValueError(
            f"segment: the model is already loaded; {', '.join(differ)} must be given to medseg.load_model"
        )
    return model


def _label_array(value: Any, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(array, affine or None)`` of a label map given as an array, a tensor, an image or a path."""
    import nibabel as nib
    import numpy as np

    from medseg.io import load_volume

    if _is_path(value):
        value = load_volume(value)
    if isinstance(value, nib.spatialimages.SpatialImage):
        return np.asanyarray(value.dataobj), np.asarray(value.affine, dtype=np.float64)
    if isinstance(value, np.ndarray) or _is_tensor(value):
        return _numpy(value), None
    raise TypeError(
        f"evaluate: {what} must be a numpy array, a torch tensor, a nibabel image or a NIfTI path; "
        f"got {type(value).__name__}"
    )
