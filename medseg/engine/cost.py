"""What a network costs to run: parameters, FLOPs, CPU time and peak memory of one forward pass.

Measured in a fresh Python process so that the peak-RSS figure is not polluted by earlier work:

* parameters; GFLOPs of one forward pass on a ``1×1×size³`` patch (``torch.utils.flop_counter``,
  multiply-add = 2 FLOPs, convolutions and matmuls only);
* CPU milliseconds per forward (median of ``repeats`` after one untimed pass, eval mode, no grad);
* peak memory: growth of the process's peak RSS (``VmHWM`` of ``/proc/self/status``, reset after the warm-up;
  ``ru_maxrss`` is not used: Linux carries it over from the parent across ``exec``, so a large parent hid the
  growth) during those passes, after a warm-up forward on a 64³ input (weights, imports and the allocator's first
  arena are in the baseline).
"""

from __future__ import annotations

import json
import subprocess
import sys

from medseg.config import ModelConfig, config_to_dict

_PROBE = r"""
import json, statistics, sys, time, torch
from medseg.config import ModelConfig
from medseg.nets.registry import build_network
torch.set_num_threads(int(sys.argv[3]))
model = ModelConfig(**json.loads(sys.argv[1])); size = int(sys.argv[2]); repeats = int(sys.argv[4])
net = build_network(model, 1, int(sys.argv[5])).eval()
x = torch.randn(1, 1, size, size, size)
def status(key):  # kB, this process's own memory map (not inherited across exec, unlike ru_maxrss)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))
with torch.no_grad():
    net(torch.randn(1, 1, 64, 64, 64))
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the high-water mark to the current RSS
    except OSError:
        pass
    before = max(status("VmRSS"), status("VmHWM"))
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter(); net(x); times.append(time.perf_counter() - t)
    after = status("VmHWM")
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        net(x)
print(json.dumps({"gflops": fc.get_total_flops() / 1e9, "ms": 1000 * statistics.median(times[1:]),
                  "peak_mb": (after - before) / 1024, "params": sum(p.numel() for p in net.parameters())}))
"""


def measure_cost(
    model: ModelConfig, num_classes: int, size: int = 96, repeats: int = 3, threads: int = 2
) -> dict:
    """``{"params", "gflops", "ms", "peak_mb"}`` of one ``size``³ forward, measured in a fresh process."""
    args = [
        sys.executable,
        "-c",
        _PROBE,
        json.dumps(config_to_dict(model)),
        str(size),
        str(threads),
        str(repeats),
        str(num_classes),
    ]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def training_activation_bytes(
    model: ModelConfig,
    patch: tuple[int, int, int],
    num_classes: int,
    in_channels: int = 1,
    pool_kernels: list | None = None,
    batch: int = 1,
) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training step (forward + Dice+CE
    loss), counted exactly with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once; the weights
    the convolutions save are included). What :mod:`medseg.planning.planner`'s memory estimate was fitted to."""
    import torch

    from medseg.config import load_config
    from medseg.losses import build_loss
    from medseg.nets.registry import build_network

    net = build_network(model, in_channels, num_classes, pool_kernels).train()
    loss_fn = build_loss(load_config(None, []), num_classes)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    image = torch.randn(batch, in_channels, *patch)
    target = torch.randint(0, num_classes, (batch, 1, *patch))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(net(image), target)
    return sum(storages.values())
