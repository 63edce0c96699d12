"""int8 inference on the CPU: a checkpoint's network post-training quantized with NNCF, run by OpenVINO.

``medseg quantize CKPT -d DATASET`` (:func:`quantize_checkpoint`):

1. **Calibration** — the network converted to OpenVINO as for the fp32 back end
   (:func:`medseg.inference.openvino_backend.build_graph`), then ``nncf.quantize`` (NNCF's post-training
   quantization: per-channel symmetric int8 weights, int8 activations (asymmetric ranges: NNCF's ``MIXED`` preset,
   each from the smallest and largest value the calibration windows produce), fast bias correction, the first and the
   output convolutions left in float (:func:`float_convolutions`), and only the inputs of the arithmetic quantized —
   convolutions and matrix products (:func:`float_types`: no quantizer before instance norms, gates, upsampling or
   sums, which int8 does not speed up); Jacob et al., CVPR 2018, "Quantization and training of neural networks for
   efficient integer-arithmetic-only inference") on windows cut from training cases: each case preprocessed exactly
   as inference preprocesses it (:meth:`medseg.inference.Predictor.prepare`), windows of the inference window size at
   seeded random positions (:func:`calibration_windows`), ``batch`` per item as the sliding window sends them.
   **Accuracy control** (the default, ``nncf.quantize_with_accuracy_control``): on windows of *other* training cases,
   the lowest per-label Dice of the graph's labels against exact fp32 (PyTorch) labels (:class:`WindowAgreement`) may
   fall at most :data:`MAX_DROP` below the float graph's; where int8 falls further, NNCF ranks the quantized
   operations by how much each costs and returns the worst to float, one group at a time, until it holds — a mixed
   int8/float graph instead of a refusal.
2. **The agreement check** — the quantized graph against the exact reference (PyTorch fp32) on held-out cases
   (``medseg quantize`` takes the run's validation cases and the dataset's test images: a model agrees with
   itself best on what it was trained on, so training cases make an optimistic check): per label the Dice of
   the two label maps, the whole pipeline (preprocess, sliding window, restore, postprocessing) as ``medseg
   segment`` runs it. The bound is the one every fast path is held to: Dice ≥ :data:`AGREEMENT` for every label.
3. **Storage** — the graph in the checkpoint's OpenVINO cache (:func:`medseg.inference.openvino_backend
   .cache_root`, keyed by the checkpoint's SHA-256, window, batch, channels, ``int8`` and the OpenVINO
   version), its manifest recording the calibration cases, the check's numbers and the precision of the float
   parts the check ran with (``float_parts``: ``bf16`` on a CPU with native bf16, where OpenVINO's CPU plugin
   runs them in bf16 by default and NNCF's accuracy control already did; ``f32`` elsewhere).

What NNCF leaves in float runs in bf16 only where the CPU has it and the check ran that way (:func:`int8_hint`):
on the demo network the one float convolution, the instance norms and the upsampling then take 0.138 instead of
0.187 s per forward of 2 windows (``docs/speed.md``, section ``medseg.inference.quantize``).

At inference ``--precision int8`` uses the stored graph (and says how to make it when there is none);
``--precision auto`` uses it **only where its check held**, else falls back to bf16 / fp32
(:func:`int8_ready`). Measured speed and agreement: ``docs/speed.md``, section ``int8``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.inference.backends import INT8
from medseg.inference.openvino_backend import (
    GraphKey,
    cache_root,
    openvino_version,
    stored_entry,
)
from medseg.io import InputError

#: The agreement bound: Dice of the int8 label map against exact fp32, per label, on held-out cases.
AGREEMENT = 0.99

#: Accuracy control's allowance: how far the window-level agreement (lowest per-label Dice against exact fp32 on
#: the control windows) may fall below the float graph's. Stricter than the bound's 0.01 because the control
#: windows are training cases, where a model agrees with itself more easily than on the held-out check.
MAX_DROP = 0.004


class WindowAgreement:
    """NNCF's ``validation_fn`` for accuracy control: the lowest per-label Dice of a compiled graph's labels
    against ``reference`` (exact fp32 labels, one array per window batch), pooled over the items it is given.

    Items are ``(index, window batch)`` pairs so that any subset NNCF validates is compared with its own
    references; also returns each item's voxel agreement, by which NNCF ranks the items.
    """

    def __init__(self, reference: Sequence[np.ndarray], labels: Sequence[int]):
        self.reference = list(reference)
        self.labels = [int(v) for v in labels]

    def __call__(self, compiled: Any, items: Any) -> tuple[float, list[float]]:
        pairs = [(int(i), np.asarray(compiled(window)[0]).argmax(1)) for i, window in items]
        if not pairs:
            return 1.0, []
        got = np.concatenate([labels.ravel() for _, labels in pairs])
        want = np.concatenate([self.reference[i].ravel() for i, _ in pairs])
        scores = [d for v in self.labels if (d := _dice(got == v, want == v)) is not None]
        per_item = [float(np.mean(labels == self.reference[i])) for i, labels in pairs]
        return (min(scores) if scores else 1.0), per_item


def reference_labels(model: torch.nn.Module, windows: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Exact fp32 (PyTorch eager) labels of each window batch: the reference accuracy control holds int8 to."""
    out = []
    with torch.inference_mode():
        for window in windows:
            logits = model(torch.from_numpy(window).float())
            logits = logits[0] if isinstance(logits, (list, tuple)) else logits
            out.append(logits.argmax(1).to(torch.uint8).numpy())
    return out


def int8_key(sha256: str, window: Sequence[int], batch: int, in_channels: int) -> GraphKey:
    """The cache key of a checkpoint's int8 graph (the OpenVINO version installed now)."""
    return GraphKey(
        sha256, tuple(int(n) for n in window), int(batch), int(in_channels), INT8, openvino_version()
    )


def stored_int8(checkpoint: str | os.PathLike, key: GraphKey) -> tuple[Any, dict] | None:
    """The stored int8 graph of ``checkpoint`` for ``key`` and its manifest, or None."""
    return stored_entry(cache_root(checkpoint), key)


def float_parts_here() -> str:
    """The precision the parts of an int8 graph NNCF left in float run in on this CPU when its check allows:
    ``bf16`` where it computes bfloat16 natively (:func:`medseg.device.cpu_has_native_bf16`), else ``f32``."""
    from medseg.device import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "f32"


def int8_hint(manifest: dict[str, Any]) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for a stored int8 graph: the float parts in ``bf16`` only where the
    CPU computes bf16 natively **and** the graph's agreement check ran with bf16 float parts (the manifest's
    ``float_parts``, written before the check); ``f32`` otherwise — a graph checked with bf16 parts then runs
    with more exact float parts than checked, one checked with f32 parts never with less exact ones."""
    checked = manifest.get("float_parts") or "f32"
    return "bf16" if checked == "bf16" and float_parts_here() == "bf16" else "f32"


def load_int8(checkpoint: str | os.PathLike, key: GraphKey) -> tuple[Any, str]:
    """The stored int8 graph and the precision hint of its float parts (:func:`int8_hint`), or an
    :class:`InputError` that says how to make one."""
    found = stored_int8(checkpoint, key)
    if found is None:
        window = "x".join(map(str, key.window))
        raise InputError(
            f"{checkpoint}: no int8 graph for window {window}, batch {key.batch} and this OpenVINO; make one "
            f"with `medseg quantize {checkpoint} -d DATASET` (or use --precision auto/bf16/fp32)"
        )
    return found[0], int8_hint(found[1])


def int8_ready(checkpoint: str | os.PathLike, key: GraphKey) -> bool:
    """Whether ``checkpoint`` has a stored int8 graph for ``key`` whose agreement check held."""
    found = stored_int8(checkpoint, key)
    return found is not None and bool((found[1].get("agreement") or {}).get("holds"))


def calibration_windows(
    images: Sequence[torch.Tensor], window: Sequence[int], batch: int, count: int, seed: int = 0
) -> list[np.ndarray]:
    """``count`` float32 arrays ``(batch, C, *window)`` cut from the preprocessed ``images`` ``(C, X, Y, Z)``.

    Window ``i`` comes from image ``i mod len(images)`` at a uniformly random position (``seed``); an image
    smaller than the window along an axis is zero-padded at its end, as the sliding window pads.
    """
    rng = np.random.default_rng(seed)
    window = [int(n) for n in window]
    cut = []
    for i in range(count * batch):
        image = images[i % len(images)].detach().cpu().float().numpy()
        pads = [(0, max(0, w - n)) for n, w in zip(image.shape[1:], window, strict=True)]
        if any(hi for _, hi in pads):
            image = np.pad(image, [(0, 0), *pads])
        start = [int(rng.integers(0, n - w + 1)) for n, w in zip(image.shape[1:], window, strict=True)]
        box = tuple(slice(s, s + w) for s, w in zip(start, window, strict=True))
        cut.append(np.ascontiguousarray(image[(slice(None), *box)]))
    return [np.stack(cut[i : i + batch]) for i in range(0, len(cut), batch)]


def quantize_graph(
    graph: Any,
    windows: Sequence[np.ndarray],
    control: tuple[Sequence[np.ndarray], WindowAgreement] | None = None,
    max_drop: float = MAX_DROP,
    float_ops: Sequence[str] = (),
) -> Any:
    """``nncf.quantize`` of an OpenVINO graph on the calibration ``windows``, or with ``control`` = (control
    windows, their :class:`WindowAgreement`) ``nncf.quantize_with_accuracy_control`` (module docstring, step 1);
    ``float_ops``: names of further operations to leave in float."""
    try:
        import nncf
    except ImportError as exc:
        raise InputError(f"int8 quantization needs NNCF: pip install 'medseg[openvino]' ({exc})") from None
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    # activation ranges: the extremes seen in calibration (MINMAX), not NNCF's default mean of per-batch
    # extremes, which clips the strongest responses (docs/speed.md, section medseg.inference.quantize)
    advanced = AdvancedQuantizationParameters(
        activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
    )
    common = {
        "subset_size": len(windows),
        "fast_bias_correction": True,
        "preset": nncf.QuantizationPreset.MIXED,
        "ignored_scope": nncf.IgnoredScope(
            names=[*float_convolutions(graph), *float_ops], types=float_types(graph), validate=False
        ),
    }
    calibration = nncf.Dataset(list(windows))
    if control is None:
        return nncf.quantize(graph, calibration, advanced_parameters=advanced, **common)
    items, metric = control
    return nncf.quantize_with_accuracy_control(
        graph,
        calibration,
        nncf.Dataset(list(enumerate(items)), lambda item: item[1]),
        validation_fn=metric,
        advanced_quantization_parameters=advanced,
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        **common,
    )


#: Operations int8 passes through unchanged: a convolution behind them reads the FakeQuantize before them.
_INT8_TRANSPARENT = {"MaxPool", "Concat", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}


def runs_int8(op: Any) -> bool:
    """Whether ``op``'s data input is quantized: a FakeQuantize directly before it, or before the
    :data:`_INT8_TRANSPARENT` operations between them (every input of a Concat)."""

    def quantized(node: Any, depth: int) -> bool:
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind not in _INT8_TRANSPARENT or depth > 8:
            return False
        inputs = range(node.get_input_size()) if kind == "Concat" else range(1)
        return all(quantized(node.input_value(i).get_node(), depth + 1) for i in inputs)

    return quantized(op.input_value(0).get_node(), 0)


def quantized_share(graph: Any) -> tuple[int, int]:
    """``(int8, all)`` convolutions of ``graph`` (:func:`runs_int8`)."""
    convolutions = [op for op in graph.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return sum(runs_int8(op) for op in convolutions), len(convolutions)


#: The operations whose inputs int8 pays for: nearly all of a segmentation network's arithmetic.
ARITHMETIC = {
    "Convolution",
    "GroupConvolution",
    "ConvolutionBackpropData",
    "GroupConvolutionBackpropData",
    "MatMul",
}


def float_types(graph: Any) -> list[str]:
    """The operation types of ``graph`` whose inputs stay float: all but :data:`ARITHMETIC`.

    NNCF's default also quantizes the inputs of normalisations (a FakeQuantize between a convolution and its
    instance norm), of elementwise products and sums, of interpolation and pooling. Those cost agreement and buy
    no time: on the demo model the lowest per-label Dice of int8 window labels against exact fp32 went from
    0.9898 (NNCF's default placement) to 0.9955 (convolution inputs only), with the same 30 of 32 convolutions
    in int8 and the same forward time (``docs/speed.md``, section ``medseg.inference.quantize``).
    """
    kinds = {op.get_type_name() for op in graph.get_ordered_ops()}
    return sorted(kinds - ARITHMETIC - {"Parameter", "Result", "Constant"})


def float_convolutions(graph: Any) -> list[str]:
    """The convolutions left in float: those reading the network's input and those writing its output (the
    output head) — the usual exceptions of post-training quantization, where int8 rounding costs the most."""
    first = {
        consumer.get_node().get_friendly_name()
        for parameter in graph.get_parameters()
        for consumer in parameter.output(0).get_target_inputs()
    }
    convolutions = [op for op in graph.get_ordered_ops() if op.get_type_name() == "Convolution"]
    last = set()
    for result in graph.get_results():
        node = result.input_value(0).get_node()
        while node.get_type_name() != "Convolution" and node.get_input_size() > 0:
            node = node.input_value(0).get_node()  # through the bias Add / Reshape to the head's Convolution
        if node.get_type_name() == "Convolution":
            last.add(node.get_friendly_name())
    return [op.get_friendly_name() for op in convolutions if op.get_friendly_name() in first | last]


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def quantize_checkpoint(
    checkpoint: str | os.PathLike,
    calibration: Sequence[str | os.PathLike],
    check: Sequence[str | os.PathLike],
    windows: int = 32,
    seed: int = 0,
    log: Callable[[str], None] = print,
    control: Sequence[str | os.PathLike] = (),
    max_drop: float = MAX_DROP,
) -> dict[str, Any]:
    """Quantize ``checkpoint``'s network on windows of the ``calibration`` scans — under accuracy control on
    windows of the ``control`` scans where any are given — check it against exact fp32 on the ``check``
    scans, store it (module docstring). Returns the record written to the cache manifest: ``calibration``
    (cases, windows, seed), ``control`` (cases, windows, max_drop, or None), ``convolutions`` (int8 and all)
    and ``agreement`` (per case and label the Dice, the minimum, and ``holds``).

    Raises:
        InputError: no calibration or check scans, a scan that cannot be read, NNCF or OpenVINO missing.
    """
    import tempfile

    from medseg.inference.openvino_backend import build_graph, store_entry, update_manifest
    from medseg.inference.predictor import Predictor

    if not calibration or not check:
        raise InputError(f"{checkpoint}: quantization needs calibration and check scans (got none)")
    exact = Predictor(checkpoint, device="cpu", precision="fp32")
    key = int8_key(exact.checkpoint_sha256[0], exact.roi_size, exact.sw_batch_size, exact.plan.in_channels)
    images = [exact.prepare(path).image.as_tensor() for path in calibration]
    cut = calibration_windows(images, key.window, key.batch, windows, seed)
    del images
    log(f"calibrating on {len(cut) * key.batch} windows from {len(calibration)} case(s)")
    checked = None
    if control:
        images = [exact.prepare(path).image.as_tensor() for path in control]
        items = calibration_windows(images, key.window, key.batch, windows, seed + 1)
        del images
        labels = [v for v in exact.label_names.values() if v > 0]
        checked = (items, WindowAgreement(reference_labels(exact.model, items), labels))
        log(f"accuracy control on {len(items) * key.batch} windows from {len(control)} other case(s)")
    with tempfile.TemporaryDirectory(prefix="medseg-quantize-") as scratch:
        graph = build_graph(exact.model, key, Path(scratch))
    quantized = quantize_graph(graph, cut, checked, max_drop)
    int8_convolutions, all_convolutions = quantized_share(quantized)
    parts = float_parts_here()  # what the check below runs (int8_hint)
    log(f"{int8_convolutions} of {all_convolutions} convolutions in int8; the rest in {parts}")
    root = cache_root(checkpoint)
    record: dict[str, Any] = {
        "calibration": {
            "cases": [str(p) for p in calibration],
            "windows": len(cut) * key.batch,
            "seed": seed,
        },
        "control": None
        if checked is None
        else {
            "cases": [str(p) for p in control],
            "windows": len(checked[0]) * key.batch,
            "max_drop": max_drop,
        },
        "convolutions": {"int8": int8_convolutions, "all": all_convolutions},
        "float_parts": parts,
        "agreement": None,  # not checked yet: `auto` does not take it
    }
    store_entry(quantized, root, key, record)
    fast = Predictor(checkpoint, device="cpu", precision=INT8)
    per_case: dict[str, dict[str, float | None]] = {}
    for path in check:
        reference, labels = exact.predict(path).labels, fast.predict(path).labels
        per_case[str(path)] = {
            name: _dice(reference == value, labels == value)
            for name, value in exact.label_names.items()
            if value > 0
        }
        log(f"{path}: " + ", ".join(f"{n} {d:.4f}" for n, d in per_case[str(path)].items() if d is not None))
    scores = [d for case in per_case.values() for d in case.values() if d is not None]
    lowest = min(scores) if scores else None
    agreement = {
        "bound": AGREEMENT,
        "min_dice": lowest,
        "holds": lowest is not None and lowest >= AGREEMENT,
        "cases": per_case,
    }
    update_manifest(root, key, {"agreement": agreement})
    return {**record, "agreement": agreement}


def held_out_cases(checkpoint: Path, dataset: Path, cases: dict[str, str]) -> dict[str, str]:
    """Case name → image of the run's validation cases (``validation.json`` beside the checkpoint) and the
    dataset's test images (``imagesTs/``): cases the network was never trained on."""
    import json

    from medseg.io import case_name

    found: dict[str, str] = {}
    record = Path(checkpoint).parent / "validation.json"
    if record.is_file():
        try:
            names = json.loads(record.read_text()).get("cases") or []
        except (OSError, ValueError, AttributeError):
            names = []
        found.update({n: cases[n] for n in names if isinstance(n, str) and n in cases})
    for image in sorted((Path(dataset) / "imagesTs").glob("*.nii.gz")):
        found.setdefault(case_name(image), str(image))
    return found


@dataclass(frozen=True)
class CaseCounts:
    """How many cases each step of :func:`quantize_dataset` takes (``medseg quantize``'s defaults)."""

    calibration: int = 4
    check: int = 4
    control: int = 6


def quantize_dataset(
    checkpoint: str | os.PathLike,
    dataset: str | os.PathLike,
    counts: CaseCounts = CaseCounts(),
    windows: int = 32,
    seed: int = 0,
    max_drop: float = MAX_DROP,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`quantize_checkpoint` with the cases chosen from ``dataset`` (``medseg quantize`` and the end of
    ``medseg train``): the check on held-out cases (:func:`held_out_cases`, up to ``counts.check``; training
    cases only when there are none — said in the log, an optimistic check), calibration on
    ``counts.calibration`` of the other training cases (shuffled with ``seed``), accuracy control on the next
    ``counts.control`` (0: plain quantization). Returns the stored record.

    Raises:
        InputError: counts out of range, too few cases, or :func:`quantize_checkpoint`'s errors.
    """
    import random

    from medseg.data.datasets import training_cases

    calibration, check, control = counts.calibration, counts.check, counts.control
    if calibration < 1 or check < 1 or windows < 1 or control < 0:
        raise InputError("calibration, check and windows must be at least 1, control at least 0")
    if not 0.0 < max_drop < 1.0:
        raise InputError(f"max_drop must lie between 0 and 1 (got {max_drop})")
    cases = {c["case"]: c["image"] for c in training_cases(dataset)}
    held_out = held_out_cases(Path(checkpoint), Path(dataset), cases)
    names = sorted(set(cases) - set(held_out))
    random.Random(seed).shuffle(names)
    if not held_out:
        log("no validation or test cases found: checking on training cases (optimistic)")
        held_out = {n: cases[n] for n in names[calibration:]}
    if len(names) < calibration or not held_out:
        raise InputError(
            f"{dataset}: {len(cases)} labelled case(s); {calibration} calibration case(s) and a check need more"
        )
    return quantize_checkpoint(
        checkpoint,
        [cases[n] for n in names[:calibration]],
        [held_out[n] for n in sorted(held_out)][:check],
        windows=windows,
        seed=seed,
        log=log,
        control=[cases[n] for n in names[calibration : calibration + control] if n not in held_out],
        max_drop=max_drop,
    )
