"""Benchmark: medseg's default back end (``auto``: OpenVINO on the CPU) vs ``--backend torch`` vs the MONAI recipe,
on a 512×512×300 CT whose body fills the field of view, alternating, in one run.

    python -m benchmarks.openvino_speed [--runs 1] [--threads 2] [--isa native|avx2|both] [--keep DIR] [--json F]

**The CT** (:func:`body_filling_ct`): ``../shared/data/real_ct/ct_lps_1p5mm.nii.gz`` resampled with SimpleITK
(linear) to 0.8×0.8×1.5 mm, then **mirror-tiled** to 512×512×300 voxels (``numpy.pad(mode="symmetric")``,
centred: the anatomy is reflected at each edge of the scan, repeatedly, so tissue — not air — fills the field of
view at its true scale), int16, LPS, the resampled scan's affine origin kept. The body crop then keeps almost
the whole grid: the window count at the default patch 96×96×64 and overlap 0.5 is printed (≥ 150 asked).

**Contestants**, each a child process with ``OMP_NUM_THREADS = --threads``, run in turn ``--runs`` times (each
round: medseg default, medseg torch, MONAI recipe), with the load average (``os.getloadavg``) recorded before
each run:

* ``medseg auto`` / ``medseg torch``: the batch core of ``medseg segment``
  (:func:`medseg.batch.run.segment_inputs`, what the command calls after parsing its options; run from a child
  ``python -m benchmarks.openvino_speed --segment ...`` so that ``--backend`` can be chosen before
  ``pipelines/segment.py`` has the option) with the checkpoint of the default Attention U-Net (16..256, 7
  classes, random weights, :func:`benchmarks.speed.random_checkpoint`), defaults otherwise (``--precision
  auto``). The OpenVINO graph is converted and cached by a first, untimed run (its time is printed): the
  timed runs read it from the cache, as every run after a checkpoint's first does;
* the MONAI recipe (:mod:`benchmarks.monai_recipe`, float32), as in ``benchmarks.bench_vs_monai``;
* with ``--int8``, ``medseg int8``: ``--precision int8`` on a graph quantized by :func:`store_int8` (calibrated on
  the benchmark CT; its agreement is not checked here — random weights — but on trained models by
  ``medseg quantize`` and ``tests/inference/test_quantize.py``).

**CPU kinds**: ``--isa native`` runs on this CPU as it is; ``--isa avx2`` sets ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``ATEN_CPU_CAPABILITY=avx2`` for every child, an **emulation** of an AVX2-only CPU: PyTorch's oneDNN and ATen
kernels stop at AVX2 and ``precision=auto`` resolves to fp32 (:func:`medseg.device.cpu_has_native_bf16`);
OpenVINO's CPU plugin caps its oneDNN convolutions at AVX2 too (``brgconv_avx2_f32`` in the compiled graph), but
its own JIT kernels (pooling, element-wise) still use AVX-512, and a bf16 graph does not compile under the cap —
so the OpenVINO figure under emulation is optimistic. Cache, memory bandwidth and clock stay this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_vs_monai import PATCH, REAL_CT, windows
from benchmarks.speed import random_checkpoint, timed_child

SHAPE = (512, 512, 300)
SPACING = (0.8, 0.8, 1.5)
CLASSES = 7
#: Environment of the AVX2-only emulation (module docstring).
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def body_filling_ct(source: Path, out: Path, shape=SHAPE, spacing=SPACING) -> Path:
    """``source`` resampled to ``spacing`` mm and mirror-tiled to ``shape`` voxels (module docstring)."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    size = [round(n * s / t) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)]
    image = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection(), -1024,
        sitk.sitkInt16,
    )  # fmt: skip
    tmp = out.with_name("resampled.nii.gz")
    sitk.WriteImage(image, str(tmp))
    resampled = nib.load(tmp)
    data = np.asarray(resampled.dataobj, dtype=np.int16)
    pads = []
    for n, t in zip(data.shape, shape, strict=True):
        lo = max(t - n, 0) // 2
        pads.append((lo, max(t - n, 0) - lo))
    while any(lo or hi for lo, hi in pads):  # np.pad's symmetric mode reflects at most one copy per call
        step = [(min(lo, n), min(hi, n)) for (lo, hi), n in zip(pads, data.shape, strict=True)]
        data = np.pad(data, step, mode="symmetric")
        pads = [(lo - a, hi - b) for (lo, hi), (a, b) in zip(pads, step, strict=True)]
    data = data[tuple(slice((n - t) // 2, (n - t) // 2 + t) for n, t in zip(data.shape, shape, strict=True))]
    first = [(max(t - n, 0) // 2) for n, t in zip(resampled.shape, shape, strict=True)]
    affine = resampled.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.asarray(
        first, dtype=float
    )  # the source's voxels stay where they were
    nib.save(nib.Nifti1Image(data, affine), out)
    tmp.unlink()
    return out


def _segment_child(args: argparse.Namespace) -> None:
    """The ``--segment`` child: :func:`segment_inputs` with the chosen back end, the sidecar's info printed."""
    from medseg.batch.run import segment_inputs
    from medseg.config.segment import SegmentOptions

    options = SegmentOptions(device="cpu", backend=args.backend, precision=args.precision, profile=True)
    segment_inputs(args.ct, args.out, [args.checkpoint], options, log=print)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    family, number = fields.get("CPU family", "?").strip(), fields.get("Model", "?").strip()
    return f"{model} (family {family} model {number})"


def _addressed(graph: Any):
    """``((type, ordinal among the operations of that type in execution order), op)`` for each operation: a
    name-free address that holds across widths and window sizes of one architecture — :func:`store_int8`
    carries a trained model's float choices onto the benchmark's network by it."""
    seen: dict[str, int] = {}
    for op in graph.get_ordered_ops():
        kind = op.get_type_name()
        seen[kind] = seen.get(kind, -1) + 1
        yield (kind, seen[kind]), op


def quantized_positions(graph: Any) -> set[tuple[str, int]]:
    """The addresses (:func:`_addressed`) of ``graph``'s operations with a FakeQuantize on an input."""
    return {
        where
        for where, op in _addressed(graph)
        if any(
            op.input_value(i).get_node().get_type_name() == "FakeQuantize" for i in range(op.get_input_size())
        )
    }


def names_at(graph: Any, positions: set[tuple[str, int]]) -> list[str]:
    """The friendly names of ``graph``'s operations at ``positions`` (:func:`_addressed`)."""
    return [op.get_friendly_name() for where, op in _addressed(graph) if where in positions]


def reverted_positions(trained: Path) -> set[tuple[str, int]]:
    """The positions NNCF's accuracy control returned to float in ``trained``'s stored int8 graph (``medseg
    quantize``): quantized in a plain quantization of its network, not in the stored graph."""
    import tempfile as tf

    import numpy as np

    from medseg.inference import Predictor
    from medseg.inference.openvino_backend import build_graph
    from medseg.inference.quantize import int8_key, quantize_graph, stored_int8

    exact = Predictor(trained, device="cpu", precision="fp32")
    key = int8_key(exact.checkpoint_sha256[0], exact.roi_size, exact.sw_batch_size, exact.plan.in_channels)
    found = stored_int8(trained, key)
    if found is None or not (found[1].get("control") or {}):
        raise SystemExit(
            f"{trained}: no int8 graph made under accuracy control (run `medseg quantize` on it)"
        )
    with tf.TemporaryDirectory() as scratch:
        graph = build_graph(exact.model, key, Path(scratch))
    rng = np.random.default_rng(0)
    shape = (key.batch, key.in_channels, *key.window)
    plain = quantize_graph(graph, [rng.normal(size=shape).astype(np.float32) for _ in range(2)])
    # operations whose own quantizer was removed (norms, gates, upsampling), and the convolutions that no longer
    # read int8 (their quantizer may sit before a pooling or a concatenation, which must not be the one ignored)
    moved = quantized_positions(plain) - quantized_positions(found[0])
    moved = {(kind, i) for kind, i in moved if kind not in ("MaxPool", "Concat", "ShapeOf", "Convolution")}
    return moved | (int8_convolutions(plain) - int8_convolutions(found[0]))


def int8_convolutions(graph: Any) -> set[tuple[str, int]]:
    """The addresses of ``graph``'s convolutions that read int8 (:func:`medseg.inference.quantize.runs_int8`)."""
    from medseg.inference.quantize import runs_int8

    return {where for where, op in _addressed(graph) if where[0] == "Convolution" and runs_int8(op)}


def store_int8(ckpt: Path, ct: Path, windows_n: int = 16, like: Path | None = None) -> None:
    """An int8 graph of ``ckpt`` in its OpenVINO cache, calibrated on ``windows_n`` window batches of ``ct``
    (:mod:`medseg.inference.quantize`'s steps 1 and 3, not its agreement check: the benchmark's network has
    random weights, so only its speed means something; ``--precision int8`` runs it, ``auto`` would not).
    ``like``: a trained checkpoint of the same architecture quantized under accuracy control — the operations
    at the positions it returned to float (:func:`reverted_positions`) stay float here too."""
    import tempfile as tf

    from medseg.inference import Predictor
    from medseg.inference.openvino_backend import build_graph, cache_root, store_entry
    from medseg.inference.quantize import (
        calibration_windows,
        float_parts_here,
        int8_key,
        quantize_graph,
        stored_int8,
    )

    exact = Predictor(ckpt, device="cpu", precision="fp32")
    key = int8_key(exact.checkpoint_sha256[0], exact.roi_size, exact.sw_batch_size, exact.plan.in_channels)
    if stored_int8(ckpt, key) is not None:
        return
    positions = reverted_positions(like) if like is not None else set()
    cut = calibration_windows([exact.prepare(ct).image.as_tensor()], key.window, key.batch, windows_n)
    with tf.TemporaryDirectory() as scratch:
        graph = build_graph(exact.model, key, Path(scratch))
    record = {
        "calibration": {"cases": [str(ct)], "windows": windows_n * key.batch},
        "float_like": None if like is None else {"checkpoint": str(like), "positions": sorted(positions)},
        "float_parts": float_parts_here(),  # as a graph checked on this CPU would run (quantize.int8_hint)
        "agreement": None,
    }
    quantized = quantize_graph(graph, cut, float_ops=names_at(graph, positions))
    print(f"int8 graph: {len(positions)} positions left in float", flush=True)
    store_entry(quantized, cache_root(ckpt), key, record)


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_kind(isa: str, work: Path, ct: Path, ckpt: Path, args: argparse.Namespace) -> dict:
    """One CPU kind (native or AVX2 emulation): warm-up conversion, then ``--runs`` alternating rounds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    if isa == "avx2":
        env.update(AVX2_ENV)
    me = [sys.executable, "-m", "benchmarks.openvino_speed", "--segment", "--checkpoint", str(ckpt)]
    seg = [*me, "--ct", str(ct)]
    t0 = time.perf_counter()
    warm = work / f"warm_{isa}"
    shutil.rmtree(warm, ignore_errors=True)
    wall, _, _ = timed_child([*seg, "--out", str(warm), "--backend", "auto"], env, work / f"warm_{isa}.log")
    side = json.loads(next(warm.glob("*.json")).read_text())
    result = {
        "isa": isa,
        "first_run_with_conversion_s": round(wall, 1),
        "auto": {"backend": side["backend"], "precision": side["precision"]},
        "runs": {"medseg auto": [], "medseg torch": [], "monai fp32": []},
    }
    if args.int8:
        result["runs"] = {"medseg int8": [], **result["runs"]}
    for who in args.skip:
        result["runs"].pop(f"medseg {who}", None)
    print(
        f"[{isa}] first run (converts and caches the graph): {wall:.1f} s; auto = {side['backend']} "
        f"{side['precision']}; model grid {side['inference']['model_grid']}",
        flush=True,
    )
    for run in range(args.runs):
        for who in result["runs"]:
            out = work / f"{isa}_{who.replace(' ', '_')}_{run}"
            shutil.rmtree(out, ignore_errors=True)
            if who == "medseg int8":
                cmd = [*seg, "--out", str(out), "--backend", "openvino", "--precision", "int8"]
            elif who.startswith("medseg"):
                cmd = [*seg, "--out", str(out), "--backend", who.split()[1]]
            else:
                cmd = [sys.executable, "-m", "benchmarks.monai_recipe", str(ct), str(out)]
                cmd += ["--classes", str(CLASSES), "--threads", str(args.threads), "--precision", "fp32"]
            load = _load()
            wall, peak, output = timed_child(cmd, env, work / f"{out.name}.log")
            entry = {"wall_s": round(wall, 1), "peak_rss_gb": round(peak, 2), "load_before": load}
            if who.startswith("medseg"):
                side = json.loads(next(out.glob("*.json")).read_text())
                entry.update(
                    backend=side["backend"], precision=side["precision"], stages=side["inference"]["seconds"]
                )
                entry["windows"] = windows(side["inference"]["model_grid"], PATCH)
            else:
                line = next(s for s in output.splitlines() if s.startswith("RECIPE "))
                entry["stages"] = {k: v for k, v in json.loads(line[7:]).items() if k != "model_grid"}
            entry["load_after"] = _load()
            result["runs"][who].append(entry)
            print(f"[{isa}] run {run + 1} {who:<13} {json.dumps(entry)}", flush=True)
    medians = {who: statistics.median(e["wall_s"] for e in runs) for who, runs in result["runs"].items()}
    result["median_wall_s"] = medians
    for who in ("auto", "torch", "int8"):
        if f"medseg {who}" in medians:
            result[f"{who}_vs_monai"] = round(medians["monai fp32"] / medians[f"medseg {who}"], 2)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    ratios = ", ".join(f"medseg {k[:-9]} {v}×" for k, v in result.items() if k.endswith("_vs_monai"))
    print(f"[{isa}] medians: {json.dumps(medians)}; against the MONAI recipe: {ratios}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="alternating rounds per CPU kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=["native", "avx2", "both"], default="both")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep the files")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument("--int8", action="store_true", help="also medseg --precision int8 (store_int8)")
    parser.add_argument(
        "--int8-like",
        type=Path,
        default=None,
        help="a trained checkpoint quantized by `medseg quantize` (accuracy control): keep its float choices",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["auto", "torch"], help="leave out these")
    parser.add_argument("--segment", action="store_true", help=argparse.SUPPRESS)  # the medseg child
    parser.add_argument("--ct", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.segment:
        _segment_child(args)
        return
    if not REAL_CT.is_file():
        raise SystemExit(f"{REAL_CT}: not found (the real CT lives beside the project, see ../shared/data)")
    import torch

    from medseg.device import cpu_has_native_bf16

    work = args.keep or Path(tempfile.mkdtemp(prefix="medseg_openvino_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ct = work / "ct_body_512x512x300.nii.gz"
        if not ct.is_file():
            body_filling_ct(REAL_CT, ct)
        ckpt = work / "bench.pt"
        if not ckpt.is_file():
            random_checkpoint(ckpt, CLASSES)
        if args.int8:
            store_int8(ckpt, ct, like=args.int8_like)
        import openvino as ov

        header = {
            "date": time.strftime("%Y-%m-%d"),
            "cpu": _cpu_model(),
            "native_bf16": cpu_has_native_bf16(),
            "threads": args.threads,
            "torch": torch.__version__,
            "openvino": ov.get_version(),
            "ct": f"{REAL_CT.name} resampled to 0.8×0.8×1.5 mm, mirror-tiled to 512×512×300 (int16, LPS)",
        }
        print(json.dumps(header), flush=True)
        kinds = ["native", "avx2"] if args.isa == "both" else [args.isa]
        results = {**header, "kinds": [run_kind(k, work, ct, ckpt, args) for k in kinds]}
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
