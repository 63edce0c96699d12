"""Benchmark: this CPU's measured GEMM peak per precision, the yardstick of "network throughput ≥ 60 % of the
GEMM peak" (docs/speed.md).

    python -m benchmarks.gemm_peak [--threads 2] [--n 4096] [--repeats 5] [--graph CACHE_ENTRY ...]

Square matrix products of size ``n`` through PyTorch (oneDNN / MKL) in float32 and bfloat16, and through
OpenVINO's CPU plugin in f32, bf16 (where the CPU has it) and int8 (a MatMul whose inputs NNCF quantized: the
same kernels the int8 network runs); ``2 n³`` FLOP (int8: operations) per product, the best of ``--repeats``
timed products after a warm-up. Prints GFLOP/s per precision, with the CPU model.

OpenVINO runs a MatMul in a JIT kernel of its own that ignores ``ONEDNN_MAX_CPU_ISA``, so under the AVX2
emulation of ``benchmarks.openvino_speed --isa avx2`` it still reports the AVX-512 peak. The same product as a
1×1×1 **convolution** (``n`` channels in and out over ``16³`` voxels: ``2 n² 16³`` FLOP) runs in oneDNN's
convolution kernels — the ones the network's convolutions use, which do follow the cap (``brgconv_avx2_*``) — and
is printed too, and a 3×3×3 convolution of 128 channels over 24³ voxels (the network's own kind of product): the
peak to hold the network to in a precision is the fastest product measured in it — under the emulation run this
script with the same environment (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2``). ``--graph`` holds medseg networks (entries of a checkpoint's ``.openvino-cache``)
to that peak in the same run: one forward of a window batch, its convolutions' operations per second.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch


def _best(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_peak(n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best(lambda: a @ b, repeats) / 1e9


def openvino_peak(n: int, hint: str, repeats: int, threads: int, int8: bool = False) -> float:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([n, n], np.float32, name="x")
    w = ops.constant(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32))
    graph = ov.Model([ops.matmul(x, w, False, False)], [x], "gemm")
    data = np.random.default_rng(1).normal(size=(n, n)).astype(np.float32)
    if int8:
        import nncf

        graph = nncf.quantize(graph, nncf.Dataset([data]), subset_size=1)
    compiled = ov.Core().compile_model(
        graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    )
    request = compiled.create_infer_request()
    return 2 * n**3 / _best(lambda: request.infer({0: data}), repeats) / 1e9


def openvino_conv_peak(
    n: int, hint: str, repeats: int, threads: int, int8: bool = False, kernel: int = 1, side: int = 16
) -> tuple[float, str]:
    """GFLOP/s of a ``kernel``³ convolution (zero-padded to keep the size) with ``n`` channels in and out over
    ``side``³ voxels (module docstring), and the oneDNN kernel the compiled graph chose for it."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, n, side, side, side], np.float32, name="x")
    fan_in = n * kernel**3
    w = ops.constant(
        np.random.default_rng(0).normal(size=(n, n, *[kernel] * 3)).astype(np.float32) / fan_in**0.5
    )
    pad = [kernel // 2] * 3
    conv = ops.convolution(x, w, [1, 1, 1], pad, pad, [1, 1, 1])
    graph = ov.Model([conv], [x], "conv")
    data = np.random.default_rng(1).normal(size=(1, n, side, side, side)).astype(np.float32)
    if int8:
        import nncf

        graph = nncf.quantize(graph, nncf.Dataset([data]), subset_size=1)
    compiled = ov.Core().compile_model(
        graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    )
    kernels = {
        op.get_rt_info()["primitiveType"].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    }
    request = compiled.create_infer_request()
    seconds = _best(lambda: request.infer({0: data}), repeats)
    return 2 * n * n * kernel**3 * side**3 / seconds / 1e9, ",".join(sorted(kernels))


def graph_gop(graph) -> float:
    """Giga-operations of one forward of an OpenVINO graph: ``2 × outputs × (inputs per output)`` of every
    convolution and matrix product (a quantized graph's FakeQuantize and the norms, gates and upsampling not
    counted: what the GEMM peak measures is multiply-adds)."""
    total = 0
    for op in graph.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Convolution", "MatMul"):
            out = np.prod(list(op.get_output_shape(0)), dtype=np.int64)
            weight = list(op.input(1).get_source_output().get_shape())
            total += 2 * int(out) * int(np.prod(weight[1:] if kind == "Convolution" else weight[:1]))
    return total / 1e9


def network_rate(entry: Path, repeats: int, threads: int) -> tuple[float, float, str]:
    """The forward of a cached graph (an OpenVINO cache entry of ``medseg``: ``model.xml`` + ``manifest.json``) in
    the precision it runs in under ``medseg segment`` (an int8 graph's float parts per
    :func:`medseg.inference.quantize.int8_hint`): its giga-operations per second, the best seconds per forward
    of one window batch, and the precision."""
    import json

    import openvino as ov

    from medseg.inference.openvino_backend import HINTS
    from medseg.inference.quantize import int8_hint

    manifest = json.loads((entry / "manifest.json").read_text())
    precision = manifest["key"]["precision"]
    hint = int8_hint(manifest) if precision == "int8" else HINTS[precision]
    graph = ov.Core().read_model(entry / "model.xml")
    compiled = ov.Core().compile_model(
        graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    )
    shape = [int(d.get_length()) for d in compiled.input(0).get_partial_shape()]
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    request = compiled.create_infer_request()
    seconds = _best(lambda: request.infer({0: data}), repeats)
    name = precision if precision != "int8" else f"int8 (float parts {hint})"
    return graph_gop(graph) / seconds, seconds, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--graph",
        type=Path,
        nargs="*",
        default=[],
        help="cache entries of medseg networks to hold to the peak",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.openvino_speed import _cpu_model
    from medseg.device import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    print(f"{_cpu_model()}; native bf16: {native}; {args.threads} threads; n = {args.n}")
    # the peak per precision: the fastest product measured in it — but not OpenVINO's f32 MatMul under an ISA
    # cap, whose JIT kernel ignores the cap (module docstring)
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "") != ""
    peaks = {"f32": torch_peak(args.n, torch.float32, args.repeats)}
    print(f"torch fp32      {peaks['f32']:8.1f} GFLOP/s")
    if native:  # emulated bf16 (no native instructions) is not a peak of anything
        peaks["bf16"] = torch_peak(args.n, torch.bfloat16, args.repeats)
        print(f"torch bf16      {peaks['bf16']:8.1f} GFLOP/s")
    rate = openvino_peak(args.n, "f32", args.repeats, args.threads)
    print(f"openvino f32    {rate:8.1f} GFLOP/s" + (" (ignores the ISA cap: not counted)" if capped else ""))
    if not capped:
        peaks["f32"] = max(peaks["f32"], rate)
    if native:
        rate = openvino_peak(args.n, "bf16", args.repeats, args.threads)
        print(f"openvino bf16   {rate:8.1f} GFLOP/s")
        peaks["bf16"] = max(peaks["bf16"], rate)
    peaks["int8"] = openvino_peak(args.n, "f32", args.repeats, args.threads, int8=True)
    print(f"openvino int8   {peaks['int8']:8.1f} GOP/s")
    channels = min(args.n, 1024)
    kinds = [("f32", "f32", False, "GFLOP/s"), ("int8", "f32", True, "GOP/s")]
    if native:
        kinds.insert(1, ("bf16", "bf16", False, "GFLOP/s"))
    for name, hint, int8, unit in kinds:
        rate, kernel = openvino_conv_peak(channels, hint, args.repeats, args.threads, int8)
        print(f"openvino conv1x1 {name:5s}{rate:8.1f} {unit} ({channels} channels, 16³; {kernel})")
        peaks[name] = max(peaks.get(name, 0.0), rate)
        # the network's own kind of product: 3×3×3, as wide as its middle levels
        rate, kernel = openvino_conv_peak(128, hint, args.repeats, args.threads, int8, kernel=3, side=24)
        print(f"openvino conv3x3 {name:5s}{rate:8.1f} {unit} (128 channels, 24³; {kernel})")
        peaks[name] = max(peaks.get(name, 0.0), rate)
    for entry in args.graph:
        rate, seconds, name = network_rate(entry, args.repeats, args.threads)
        peak = peaks[name.split()[0].replace("fp32", "f32")]
        print(
            f"network {entry.name}: {name}, {seconds:.3f} s per forward, {rate:.1f} G(FL)OP/s = "
            f"{100 * rate / peak:.0f} % of the fastest product measured in its precision ({peak:.1f})"
        )


if __name__ == "__main__":
    main()
