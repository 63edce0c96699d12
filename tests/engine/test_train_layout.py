"""``train.layout``: training channels-last with instance norms as ``GroupNorm(C, C)`` gives the gradients of the
standard layout (up to float rounding) and the same checkpoint keys; ``auto`` does not pick it (it measured
slower end to end)."""

from __future__ import annotations

import torch

from medseg.config import load_config
from medseg.device import Precision
from medseg.engine.step import training_layout
from medseg.inference.fast import instance_norms_as_group_norms
from medseg.losses import build_loss
from medseg.nets.registry import build_network
from tests.conftest import TINY_TRAIN


def _gradients(dtype: torch.dtype) -> tuple[dict, dict]:
    cfg = load_config(None, ["model.filters=[4, 8, 16, 32]"])
    torch.manual_seed(0)
    standard = build_network(cfg.model, 1, 4).to(dtype).train()
    fast = instance_norms_as_group_norms(standard).train().to(memory_format=torch.channels_last_3d)
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in fast.modules())
    x, y = torch.randn(2, 1, 32, 32, 16, dtype=dtype), torch.randint(0, 4, (2, 1, 32, 32, 16))
    loss_fn = build_loss(cfg, 4)
    loss_fn(standard(x), y).backward()
    loss_fn(fast(x.contiguous(memory_format=torch.channels_last_3d)), y).backward()
    return (
        {n: p.grad for n, p in standard.named_parameters()},
        {n: p.grad for n, p in fast.named_parameters()},
    )


def _worst(a: dict, b: dict) -> float:
    """Largest gradient difference relative to that parameter's gradient scale; a gradient that is zero in exact
    arithmetic (a convolution bias right before an instance norm, which removes it) is measured against a
    thousandth of the largest gradient instead of its own rounding noise."""
    assert list(a) == list(b)  # same parameter names: the checkpoint keys do not change
    floor = 1e-3 * max(float(g.abs().max()) for g in a.values())
    return max(float((a[n] - b[n]).abs().max()) / max(float(a[n].abs().max()), floor) for n in a)


def test_group_norm_channels_last_gives_the_same_gradients():
    # the same function: in float64 every gradient agrees to ~1e-12 of its scale
    assert _worst(*_gradients(torch.float64)) < 1e-9
    # in float32 they differ by rounding only (summation order of the norms and convolutions)
    assert _worst(*_gradients(torch.float32)) < 1e-2


def test_auto_layout_rule(monkeypatch):
    cpu, fp32, bf16 = torch.device("cpu"), Precision("fp32", None), Precision("bf16", torch.bfloat16)
    assert training_layout("channels_last", cpu, bf16) and not training_layout("standard", cpu, fp32)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a CPU without native bf16 (medseg.device)
    # measured slower end to end there (docs/speed.md): auto keeps the standard layout
    assert not training_layout("auto", cpu, fp32) and not training_layout("auto", cpu, bf16)


def test_a_channels_last_run_writes_a_standard_checkpoint(tmp_path, tiny_dataset):
    from medseg.engine import train
    from medseg.io.checkpoint import load_checkpoint

    settings = [*TINY_TRAIN, f"data.root={tiny_dataset}", "train.precision=fp32", "train.epochs=1"]
    cfg = load_config(None, [*settings, f"train.output={tmp_path / 'cl'}", "train.layout=channels_last"])
    lines = []
    run = train(cfg, log=lines.append)
    assert any("channels-last" in str(line) for line in lines)
    ckpt = load_checkpoint(run / "best.pt")
    net = build_network(cfg.model, 1, len(ckpt["labels"]))
    net.load_state_dict(ckpt["model"])  # strict: the GroupNorm copy has the instance norms' keys
