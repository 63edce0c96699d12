"""Benchmark: the memory layout of a training step's forward + backward — instance norm as it is, as
``GroupNorm(C, C)`` (:func:`medseg.inference.fast.instance_norms_as_group_norms`, the same function), and that
in channels-last — alternating, in one process.

    python -m benchmarks.train_layout [--threads 2] [--rounds 3] [--demo]

The default network (Attention U-Net 16..256, deep supervision), batch 2 of 96×96×64, cross-entropy on the
full-resolution output, float32, no optimizer step: the part of a training step that the layout changes.
``--demo``: the demo's network (``configs/demo.yaml``: 8..128) and batch (one 64×64×32 patch) instead. Run it
with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` to emulate an AVX2-only CPU (where training runs in
fp32). Times only: whether the GroupNorm form gives the same gradients within rounding is not checked here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo", action="store_true", help="the demo's network and patch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medseg.config import load_config, recipe_path
    from medseg.inference.fast import instance_norms_as_group_norms
    from medseg.nets.registry import build_network

    torch.manual_seed(0)
    cfg = load_config(recipe_path("demo"), []) if args.demo else load_config(None, [])
    base = build_network(cfg.model, 1, 7).train()
    variants = {
        "instance norm": (base, False),
        "GroupNorm(C, C)": (instance_norms_as_group_norms(base).train(), False),
        "GroupNorm(C, C), channels-last": (
            instance_norms_as_group_norms(base).train().to(memory_format=torch.channels_last_3d),
            True,
        ),
    }
    shape = (1, 64, 64, 32) if args.demo else (2, 96, 96, 64)
    x, y = torch.randn(shape[0], 1, *shape[1:]), torch.randint(0, 7, shape)

    def step(model: torch.nn.Module, channels_last: bool) -> None:
        out = model(x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x)
        out = out["logits"] if isinstance(out, dict) else out
        out = out[0] if isinstance(out, list | tuple) else out
        torch.nn.functional.cross_entropy(out, y).backward()
        model.zero_grad(set_to_none=True)

    for model, channels_last in variants.values():
        step(model, channels_last)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, channels_last) in variants.items():
            start = time.perf_counter()
            step(model, channels_last)
            times[name].append(time.perf_counter() - start)
    first = statistics.median(times["instance norm"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:32s} {median:6.2f} s  ({first / median:.2f}×)  {[round(v, 2) for v in values]}")


if __name__ == "__main__":
    main()
