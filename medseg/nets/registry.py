"""The one registry of networks and pluggable blocks: names in YAML → modules.

Explicit tables (no registration by import side effects, no lookup by import path). An unknown name raises
:class:`RegistryError` listing the valid names and suggesting the closest one, in the manner of MONAI's
``look_up_option``. Every network is built by :func:`build_network` from the config's ``model`` section::

    model:
      name: attention_unet        # attention_unet | unet
      filters: [16, 32, 64, 128, 256]
      skip_gate: grid             # grid | none
      bottleneck: none            # none | pam | cam | dual | ema | psa | fpa | encoding
      decoder_fusion: concat      # concat | gau
      head: plain                 # plain | reverse_attention
      scales: [1.0]               # e.g. [1.0, 0.75, 0.5]: attention to scale
      scale_fusion: attention     # attention | average | max
      deep_supervision: true
      options: {}                 # keyword arguments per block name, e.g. {pam: {chunk_size: 4096}}
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial

from torch import nn

from medseg.nets.blocks.danet import ChannelAttention3D, DualAttention3D, PositionAttention3D
from medseg.nets.blocks.ema import EMAUnit3D
from medseg.nets.blocks.encnet import ContextEncoding3D
from medseg.nets.blocks.pan import FeaturePyramidAttention3D, GlobalAttentionUpsample3D
from medseg.nets.blocks.psa import PointwiseSpatialAttention3D
from medseg.nets.blocks.reverse_attention import ReverseAttentionHead3D
from medseg.nets.blocks.scale_attention import ScaleAttention3D
from medseg.nets.unet import AttentionUNet3D, ConcatFusion, UNet3D


class RegistryError(ValueError):
    """Unknown name in the registry."""


def look_up(table: dict, name: str, kind: str):
    """``table[name]`` or an error listing the valid names and the closest match."""
    if name in table:
        return table[name]
    valid = sorted(table)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RegistryError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}.{hint}")


# Bottleneck blocks: factory(channels, num_classes, norm, **options) -> module returning x or (x, aux).
BOTTLENECKS: dict[str, Callable[..., nn.Module] | None] = {
    "none": None,
    "pam": lambda c, k, norm, **o: PositionAttention3D(c, **o),
    "cam": lambda c, k, norm, **o: ChannelAttention3D(c, **o),
    "dual": lambda c, k, norm, **o: DualAttention3D(c, c, k, norm=norm, **o),
    "ema": lambda c, k, norm, **o: EMAUnit3D(c, norm=norm, **o),
    "psa": lambda c, k, norm, **o: PointwiseSpatialAttention3D(c, norm=norm, **o),
    "fpa": lambda c, k, norm, **o: FeaturePyramidAttention3D(c, norm=norm, **o),
    "encoding": lambda c, k, norm, **o: ContextEncoding3D(c, k, norm=norm, **o),
}

# Decoder fusions: factory(high_channels, low_channels, out_channels, norm, **options).
FUSIONS: dict[str, Callable[..., nn.Module]] = {
    "concat": lambda h, lo, out, norm, **o: ConcatFusion(h, lo, out, norm),
    "gau": lambda h, lo, out, norm, **o: _GAUFusion(h, lo, out, norm, **o),
}

# Heads: factory(in_channels, num_classes, norm, **options) or None for a 1×1×1 convolution.
HEADS: dict[str, Callable[..., nn.Module] | None] = {
    "plain": None,
    "reverse_attention": lambda c, k, norm, **o: ReverseAttentionHead3D(c, k, norm=norm, **o),
}

NETWORKS: dict[str, type[UNet3D]] = {"unet": UNet3D, "attention_unet": AttentionUNet3D}

SKIP_GATES = ("grid", "none")
SCALE_FUSIONS = ("attention", "average", "max")


class _GAUFusion(nn.Module):
    """PAN's global attention upsample followed by the level's two 3×3×3 convolutions."""

    def __init__(self, high: int, low: int, out: int, norm: str, **options) -> None:
        super().__init__()
        from medseg.nets.unet import DoubleConv

        self.gau = GlobalAttentionUpsample3D(high, low, out, norm=norm, **options)
        self.conv = DoubleConv(out, out, norm)

    def forward(self, high, low):
        return self.conv(self.gau(high, low))


class MultiScaleNet(nn.Module):
    """Attention to Scale around a U-Net, with the U-Net's output contract (see :mod:`medseg.nets.unet`)."""

    def __init__(self, backbone: UNet3D, scales: list[float], fusion: str) -> None:
        super().__init__()
        self.num_classes = backbone.num_classes
        self.scale_attention = ScaleAttention3D(
            backbone, backbone.filters[0], backbone.num_classes, scales=tuple(scales), fusion=fusion
        )

    def init_class_prior(self, log_prior):
        """See :meth:`medseg.nets.unet.UNet3D.init_class_prior`."""
        self.scale_attention.backbone.init_class_prior(log_prior)

    def forward(self, x, return_attention: bool = False):
        if not self.training:
            if return_attention:
                fused, weights = self.scale_attention.forward_with_weights(x)
                return fused, [] if weights is None else [weights]
            return self.scale_attention(x)
        fused, aux = self.scale_attention(x)
        return {"logits": [fused], "aux": aux}


def _options(model_cfg: dict, name: str) -> dict:
    return dict((model_cfg.get("options") or {}).get(name) or {})


def build_network(model_cfg: dict, in_channels: int, num_classes: int) -> nn.Module:
    """Build any registered network variant from the config's ``model`` section."""
    name = model_cfg.get("name", "attention_unet")
    net_cls = look_up(NETWORKS, name, "network")
    skip_gate = model_cfg.get("skip_gate", "grid" if name == "attention_unet" else "none")
    look_up(dict.fromkeys(SKIP_GATES), skip_gate, "skip_gate")
    bottleneck_name = model_cfg.get("bottleneck", "none")
    bottleneck = look_up(BOTTLENECKS, bottleneck_name, "bottleneck")
    fusion_name = model_cfg.get("decoder_fusion", "concat")
    fusion = look_up(FUSIONS, fusion_name, "decoder_fusion")
    head_name = model_cfg.get("head", "plain")
    head = look_up(HEADS, head_name, "head")
    scales = [float(s) for s in model_cfg.get("scales", [1.0])]
    scale_fusion = model_cfg.get("scale_fusion", "attention")
    look_up(dict.fromkeys(SCALE_FUSIONS), scale_fusion, "scale_fusion")
    net = net_cls(
        in_channels,
        num_classes,
        filters=model_cfg.get("filters", (16, 32, 64, 128, 256)),
        norm=model_cfg.get("norm", "instance"),
        skip_gate=skip_gate,
        deep_supervision=bool(model_cfg.get("deep_supervision", True)) and len(scales) == 1,
        bottleneck=partial(bottleneck, **_options(model_cfg, bottleneck_name)) if bottleneck else None,
        fusion=partial(fusion, **_options(model_cfg, fusion_name)),
        head=partial(head, **_options(model_cfg, head_name)) if head else None,
    )
    if len(scales) > 1 or scales[0] != 1.0:
        return MultiScaleNet(net, scales, scale_fusion)
    return net
