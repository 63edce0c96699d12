"""The end of ``medseg train``: the best checkpoint's int8 graph for CPU inference (``train.quantize``).

:func:`medseg.inference.quantize.quantize_dataset` — what ``medseg quantize RUN -d DATASET`` does — run on the
run's ``best.pt`` with the defaults: checked against exact fp32 on the run's validation cases (and the dataset's
test images), calibrated and accuracy-controlled on other training cases. Where the check holds, ``medseg
segment`` with its defaults (``--precision auto``) runs the network in int8 on any CPU; where it does not, the
graph is stored but only ``--precision int8`` uses it. Either way the training run itself has succeeded: a
quantization that cannot be done (too few cases) is one line in the log, not an error.

``auto`` quantizes where the ``openvino`` extra (OpenVINO, NNCF) is installed; ``on`` requires it (checked
before training starts, :func:`require_quantizer`); ``off`` skips the step (the demo and the ablation, whose
time budgets do not include it). What it costs and gains: ``docs/speed.md``, section ``int8``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from medseg.config import Config, ConfigError


def quantizer_installed() -> bool:
    """Whether OpenVINO, its ONNX front end and NNCF are importable."""
    from medseg.inference.backends import openvino_available

    return openvino_available() and importlib.util.find_spec("nncf") is not None


def require_quantizer(cfg: Config) -> None:
    """Raise :class:`ConfigError` when ``train.quantize`` is ``on`` and the extra is missing (before training)."""
    if cfg.train.quantize == "on" and not quantizer_installed():
        raise ConfigError("train.quantize=on needs OpenVINO and NNCF: pip install 'medseg[openvino]'")


def case_counts(checkpoint: Path, dataset: str | Path):
    """``medseg quantize``'s case counts (:class:`~medseg.inference.quantize.CaseCounts`), fewer where the
    dataset has fewer training cases outside the check (calibration first; no accuracy control when none are
    left)."""
    from medseg.data.datasets import training_cases
    from medseg.inference.quantize import CaseCounts, held_out_cases

    cases = {c["case"]: c["image"] for c in training_cases(dataset)}
    others = len(set(cases) - set(held_out_cases(checkpoint, Path(dataset), cases)))
    default = CaseCounts()
    calibration = max(1, min(default.calibration, others))
    return CaseCounts(calibration, default.check, max(0, min(default.control, others - calibration)))


def quantize_run(cfg: Config, run: Path, log=print) -> dict | None:
    """Quantize ``run/best.pt`` per ``train.quantize`` (module docstring); the stored record, or None."""
    from medseg.inference.quantize import quantize_dataset
    from medseg.io import InputError

    best = Path(run) / "best.pt"
    if cfg.train.quantize == "off" or not best.is_file() or not quantizer_installed():
        return None
    log("int8 graph for CPU inference (train.quantize; `medseg quantize` does the same)")
    try:
        record = quantize_dataset(best, cfg.data.root, case_counts(best, cfg.data.root), log=log)
    except InputError as exc:
        log(f"int8 quantization skipped: {' '.join(str(exc).split())}")
        return None
    except Exception as exc:  # the trained run stands: an NNCF / OpenVINO failure is one line
        log(
            f"int8 quantization failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            "best.pt is unchanged"
        )
        return None
    agreement = record["agreement"]
    lowest = "n/a (no labels)" if agreement["min_dice"] is None else f"{agreement['min_dice']:.4f}"
    log(
        f"int8: {record['convolutions']['int8']} of {record['convolutions']['all']} convolutions, lowest Dice "
        f"against fp32 {lowest} on {len(agreement['cases'])} held-out case(s): "
        + ("holds, `medseg segment` uses it by default" if agreement["holds"] else "does not hold, not used")
    )
    return record
