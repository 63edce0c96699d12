"""One shared tester for every block and every network variant of the registry.

For each: output shape on odd sizes, every parameter receives a non-zero gradient, no NaN, eval is
deterministic. Zero-initialised residual scales (DANet's γ, β) are set non-zero first, otherwise the
branches behind them get an exactly-zero gradient at initialisation by design.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.config import ConfigError, ModelConfig
from medseg.losses import SegmentationLoss
from medseg.nets.blocks.danet import (
    ChannelAttention3D,
    DualAttention3D,
    DualAttentionHead3D,
    PositionAttention3D,
)
from medseg.nets.blocks.ema import EMAUnit3D
from medseg.nets.blocks.encnet import ContextEncoding3D
from medseg.nets.blocks.grid_attention import GridAttentionGate3D
from medseg.nets.blocks.pan import FeaturePyramidAttention3D, GlobalAttentionUpsample3D
from medseg.nets.blocks.psa import PointwiseSpatialAttention3D
from medseg.nets.blocks.reverse_attention import ReverseAttentionHead3D
from medseg.nets.registry import BOTTLENECKS, FUSIONS, HEADS, RegistryError, build_network, look_up

C, K = 8, 3
ODD = (5, 7, 3)

# name → (factory, inputs(shape) -> tuple of tensors, output channels)
BLOCKS = {
    "grid_gate": (
        lambda: GridAttentionGate3D(C, 2 * C),
        lambda s: (torch.randn(2, C, *s), torch.randn(2, 2 * C, *[(n + 1) // 2 for n in s])),
        C,
    ),
    "pam": (lambda: PositionAttention3D(C, chunk_size=16), lambda s: (torch.randn(2, C, *s),), C),
    "cam": (lambda: ChannelAttention3D(C), lambda s: (torch.randn(2, C, *s),), C),
    "dual": (lambda: DualAttention3D(C, C, K), lambda s: (torch.randn(2, C, *s),), C),
    "dual_head": (lambda: DualAttentionHead3D(C, K), lambda s: (torch.randn(2, C, *s),), K),
    "ema": (lambda: EMAUnit3D(C, num_bases=4), lambda s: (torch.randn(2, C, *s),), C),
    "psa_exact": (
        lambda: PointwiseSpatialAttention3D(C, mode="exact"),
        lambda s: (torch.randn(2, C, *s),),
        C,
    ),
    "psa_window": (
        lambda: PointwiseSpatialAttention3D(C, mode="window", radius=1),
        lambda s: (torch.randn(2, C, *s),),
        C,
    ),
    "fpa": (lambda: FeaturePyramidAttention3D(C), lambda s: (torch.randn(2, C, *s),), C),
    "gau": (
        lambda: GlobalAttentionUpsample3D(2 * C, C, C),
        lambda s: (torch.randn(2, 2 * C, *[(n + 1) // 2 for n in s]), torch.randn(2, C, *s)),
        C,
    ),
    "encoding": (lambda: ContextEncoding3D(C, K, num_codes=4), lambda s: (torch.randn(2, C, *s),), C),
    "reverse_attention": (lambda: ReverseAttentionHead3D(C, K), lambda s: (torch.randn(2, C, *s),), K),
}


def _perturb_zero_scales(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 1 and float(p) == 0.0 and name.split(".")[-1] in ("gamma", "beta"):
                p.fill_(0.5)


def _main(out):
    return out[0] if isinstance(out, tuple) else out


def _all_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [*out["logits"], *out.get("aux", {}).values()]
    main, aux = out
    return [main, *(aux.values() if isinstance(aux, dict) else [aux])]


def _check_gradients(module: nn.Module, outputs: list[torch.Tensor]) -> None:
    sum(o.float().square().mean() for o in outputs).backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_contract(name):
    torch.manual_seed(0)
    factory, inputs, out_channels = BLOCKS[name]
    block = factory().train()
    _perturb_zero_scales(block)
    args = inputs(ODD)
    out = block(*args)
    main = _main(out)
    assert main.shape == (2, out_channels, *ODD)
    assert torch.isfinite(main).all()
    _check_gradients(block, _all_outputs(out))
    block.eval()
    with torch.no_grad():
        a, b = _main(block(*args)), _main(block(*args))
    assert torch.equal(a, b)


TINY = [4, 8, 16, 32]
VARIANTS = (
    [{"name": "unet"}, {"name": "attention_unet"}]
    + [{"bottleneck": b} for b in BOTTLENECKS if b != "none"]
    + [{"decoder_fusion": f} for f in FUSIONS if f != "concat"]
    + [{"head": h} for h in HEADS if h != "plain"]
    + [
        {"scales": [1.0, 0.75, 0.5]},
        {"scales": [1.0, 0.5], "scale_fusion": "average"},
        {"scales": [1.0, 0.5], "scale_fusion": "max"},
    ]
    + [{"bottleneck": "dual", "decoder_fusion": "gau", "head": "reverse_attention"}]
)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_network_variant_contract(variant):
    torch.manual_seed(0)
    cfg = {"name": "attention_unet", "filters": TINY, **variant}
    net = build_network(ModelConfig(**cfg), 1, K).train()
    _perturb_zero_scales(net)
    x = torch.randn(2, 1, 33, 35, 32)
    out = net(x)
    assert isinstance(out, dict) and out["logits"][0].shape == (2, K, 33, 35, 32)
    loss = SegmentationLoss(K, deep_supervision_weights=[1.0, 0.5, 0.25])(
        out, torch.randint(0, K, (2, 1, 33, 35, 32))
    )
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"
    net.eval()
    with torch.no_grad():
        y1, y2 = net(x[:1]), net(x[:1])
    assert y1.shape == (1, K, 33, 35, 32) and torch.isfinite(y1).all() and torch.equal(y1, y2)


def test_unknown_names_list_valid_ones_and_suggest():
    with pytest.raises(ConfigError, match=r"valid values: .*pam.*Did you mean 'pam'"):
        ModelConfig(bottleneck="pamm")
    with pytest.raises(ConfigError, match="Did you mean 'attention_unet'"):
        ModelConfig(name="atention_unet")
    with pytest.raises(ConfigError, match="decoder_fusion"):
        ModelConfig(decoder_fusion="sum")
    with pytest.raises(RegistryError, match=r"valid names: .*pam.*Did you mean 'pam'"):
        look_up(BOTTLENECKS, "pamm", "bottleneck")
