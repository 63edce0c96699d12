"""Benchmark: this CPU's measured GEMM peak per precision, the yardstick of "network throughput ≥ 60 % of the
GEMM peak" (docs/speed.md).

    python -m benchmarks.gemm_peak [--threads 2] [--n 4096] [--repeats 5]

Square matrix products of size ``n`` through PyTorch (oneDNN / MKL) in float32 and bfloat16, and through
OpenVINO's CPU plugin in f32, bf16 (where the CPU has it) and int8 (a MatMul whose inputs NNCF quantized: the
same kernels the int8 network runs); ``2 n³`` FLOP (int8: operations) per product, the best of ``--repeats``
timed products after a warm-up. Prints GFLOP/s per precision, with the CPU model.

OpenVINO runs a MatMul in a JIT kernel of its own that ignores ``ONEDNN_MAX_CPU_ISA``, so under the AVX2
emulation of ``benchmarks.openvino_speed --isa avx2`` it still reports the AVX-512 peak. The same product as a
1×1×1 **convolution** (``n`` channels in and out over ``16³`` voxels: ``2 n² 16³`` FLOP) runs in oneDNN's
convolution kernels — the ones the network's convolutions use, which do follow the cap (``brgconv_avx2_*``) — and
is printed too: that is the peak to hold the network to under the emulation (run this script with the same
environment: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``).
"""

from __future__ import annotations

import argparse
import time

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
    n: int, hint: str, repeats: int, threads: int, int8: bool = False
) -> tuple[float, str]:
    """GFLOP/s of a 1×1×1 convolution with ``n`` channels in and out over 16³ voxels (module docstring), and the
    oneDNN kernel the compiled graph chose for it."""
    import openvino as ov
    import openvino.opset13 as ops

    side = 16
    x = ops.parameter([1, n, side, side, side], np.float32, name="x")
    w = ops.constant(np.random.default_rng(0).normal(size=(n, n, 1, 1, 1)).astype(np.float32) / n**0.5)
    conv = ops.convolution(x, w, [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1])
    graph = ov.Model([conv], [x], "conv1x1")
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
    return 2 * n * n * side**3 / seconds / 1e9, ",".join(sorted(kernels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.openvino_speed import _cpu_model
    from medseg.device import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    print(f"{_cpu_model()}; native bf16: {native}; {args.threads} threads; n = {args.n}")
    print(f"torch fp32      {torch_peak(args.n, torch.float32, args.repeats):8.1f} GFLOP/s")
    if native:  # emulated bf16 (no native instructions) is not a peak of anything
        print(f"torch bf16      {torch_peak(args.n, torch.bfloat16, args.repeats):8.1f} GFLOP/s")
    print(f"openvino f32    {openvino_peak(args.n, 'f32', args.repeats, args.threads):8.1f} GFLOP/s")
    if native:
        print(f"openvino bf16   {openvino_peak(args.n, 'bf16', args.repeats, args.threads):8.1f} GFLOP/s")
    print(f"openvino int8   {openvino_peak(args.n, 'f32', args.repeats, args.threads, int8=True):8.1f} GOP/s")
    channels = min(args.n, 1024)
    for name, hint, int8, unit in (("f32", "f32", False, "GFLOP/s"), ("int8", "f32", True, "GOP/s")):
        rate, kernel = openvino_conv_peak(channels, hint, args.repeats, args.threads, int8)
        print(f"openvino conv1x1 {name:5s}{rate:8.1f} {unit} ({channels} channels; {kernel})")


if __name__ == "__main__":
    main()
