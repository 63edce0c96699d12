"""Benchmark: the levers tried on the network forward, side by side in one process (what won, what did not).

    python -m benchmarks.bench_levers [--threads 2] [--repeats 5] [--batch 2] [--compile] [--script]

The default Attention U-Net (16..256, 7 classes, random weights) on a batch of ``--batch`` windows of 96×96×64,
each variant run ``--repeats`` times in turn (so all see the same load); printed per variant: the fastest wall
time, the fastest process CPU time (``time.process_time``: on a shared machine it moves less with other
people's work than the wall time), GFLOP/s from the wall time (FLOPs counted by ``torch.utils.flop_counter``),
its share of the GEMM peak measured in the same run, and the largest logit difference from float32 and the
share of voxels whose argmax differs (random weights: logits of different classes are close, so this is a harsh
view of precision; the bound that decides the default is ``python -m benchmarks.bench_precision``).

Variants: ``fp32`` (the network's own float32 path, ``--precision fp32``); ``fp32 channels-last + group norm``;
``bf16 autocast`` (NCDHW); ``bf16 autocast channels-last`` (instance norm kept); ``bf16 autocast channels-last
+ group norm`` (``prepare_network``'s layout, head in bf16); **``default``** (:func:`medseg.inference.fast.
prepare_network`: the previous with the head in float32 — what ``medseg segment`` runs); ``pure bf16`` (weights
in bf16, no autocast); ``inference_mode``; window batches 1 and 4 (per-window time); ``--compile``:
``torch.compile`` (inductor, freezing) of the default, its compile time printed; ``--script``: TorchScript
trace + freeze of the pure bf16 network (oneDNN graph fusion refuses this network). It is a script, not a
timed test.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def _build(classes: int = 7):
    from medseg.config import load_config
    from medseg.nets.registry import build_network

    torch.manual_seed(0)
    return build_network(load_config(None, []).model, 1, classes).eval()


def _variants(base, batch: int, args) -> dict:
    """name → (callable, batch): each callable runs one forward of its batch of windows."""
    from medseg.inference.fast import (
        Float32Head,
        PoolInInputPrecision,
        WindowNetwork,
        instance_norms_as_group_norms,
        prepare_network,
    )

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    cl = torch.channels_last_3d

    def autocast_net(model, channels_last):
        return WindowNetwork(model.to(memory_format=cl) if channels_last else model, bf16, channels_last)

    no_head = instance_norms_as_group_norms(base)
    pure = copy.deepcopy(no_head).to(memory_format=cl).bfloat16()

    def run_pure(x):
        with torch.no_grad():
            return pure(x.to(bf16).contiguous(memory_format=cl)).float()

    default = prepare_network(base, cpu, bf16)
    float32_pools = prepare_network(base, cpu, bf16)  # the default before the pools ran in bf16
    for parent in list(float32_pools.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PoolInInputPrecision):
                setattr(parent, name, child.pool)

    def run_inference_mode(x):
        with torch.inference_mode():
            return default(x)

    variants = {
        "fp32": (prepare_network(base, cpu, None), batch),
        "fp32 channels-last + group norm": (
            WindowNetwork(instance_norms_as_group_norms(base).to(memory_format=cl), None, True),
            batch,
        ),
        "bf16 autocast": (autocast_net(copy.deepcopy(base), False), batch),
        "bf16 autocast channels-last": (autocast_net(copy.deepcopy(base), True), batch),
        "bf16 autocast channels-last + group norm": (autocast_net(no_head, True), batch),
        "+ head in fp32 (max pools in fp32: autocast's)": (float32_pools, batch),
        "default (+ max pools in bf16)": (default, batch),
        "pure bf16 weights": (run_pure, batch),
        "default, inference_mode": (run_inference_mode, batch),
        "default, window batch 1": (default, 1),
        "default, window batch 4": (default, 4),
    }
    assert isinstance(default.model.head, Float32Head)
    if args.compile:
        import torch._inductor.config as inductor

        inductor.freezing = True
        compiled = torch.compile(prepare_network(base, cpu, bf16))
        t0 = time.perf_counter()
        compiled(torch.zeros((batch, 1, *args.patch)))
        print(
            f"torch.compile of the default: first call (compile) {time.perf_counter() - t0:.1f} s", flush=True
        )
        variants["default, torch.compile"] = (compiled, batch)
    if args.script:
        t0 = time.perf_counter()
        with torch.no_grad():
            example = torch.zeros((batch, 1, *args.patch), dtype=bf16).contiguous(memory_format=cl)
            scripted = torch.jit.freeze(torch.jit.trace(copy.deepcopy(pure), example))
            scripted(example)

        def run_scripted(x):
            with torch.no_grad():
                return scripted(x.to(bf16).contiguous(memory_format=cl)).float()

        print(f"TorchScript trace + freeze: {time.perf_counter() - t0:.1f} s", flush=True)
        variants["pure bf16, TorchScript frozen"] = (run_scripted, batch)
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    parser.add_argument("--script", action="store_true", help="also TorchScript trace + freeze")
    args = parser.parse_args(argv)
    args.patch = (96, 96, 64)
    torch.set_num_threads(args.threads)

    from benchmarks.speed import forward_gflop, gemm_peak_gflops

    base = _build()
    gflop = forward_gflop(base, args.patch)
    peaks = {"fp32": gemm_peak_gflops(torch.float32), "bf16": gemm_peak_gflops(torch.bfloat16)}
    print(
        f"Attention U-Net 16..256, 7 classes: {gflop:.1f} GFLOP per 96×96×64 window; GEMM peak "
        f"({args.threads} threads): fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s",
        flush=True,
    )
    variants = _variants(base, args.batch, args)
    inputs = {
        b: torch.randn((b, 1, *args.patch), generator=torch.Generator().manual_seed(1)) for b in (1, 2, 4)
    }
    inputs.setdefault(args.batch, torch.randn((args.batch, 1, *args.patch)))
    with torch.no_grad():
        reference = {b: base(x) for b, x in inputs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    errors = {}
    for name, (run, b) in variants.items():  # warm-up and agreement
        out = run(inputs[b]).float()
        errors[name] = (
            float((out - reference[b]).abs().max()),
            float((out.argmax(1) != reference[b].argmax(1)).float().mean()),
        )
    for _ in range(args.repeats):
        for name, (run, b) in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run(inputs[b])
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    print(
        f"{'variant':<42}{'wall s/window':>14}{'CPU s/window':>14}{'GFLOP/s':>9}{'% peak':>8}{'max |Δ|':>9}{'argmax Δ':>10}"
    )
    for name, (_, b) in variants.items():
        wall = min(t for t, _ in times[name]) / b
        cpu = min(c for _, c in times[name]) / b
        rate = gflop / wall
        peak = peaks["fp32" if name.startswith("fp32") else "bf16"]
        diff, flips = errors[name]
        print(
            f"{name:<42}{wall:>14.3f}{cpu:>14.3f}{rate:>9.0f}{100 * rate / peak:>7.0f}%{diff:>9.3f}{100 * flips:>9.2f}%"
        )


if __name__ == "__main__":
    main()
