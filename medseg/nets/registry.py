"""The one registry of networks and pluggable blocks: names in YAML → modules.

Explicit tables (no registration by import side effects, no lookup by import path). An unknown name raises
:class:`RegistryError` listing the valid names and suggesting the closest one, in the manner of MONAI's
``look_up_option``. The config (:mod:`medseg.config`) takes its allowed values from these tables, so a name
is valid in a YAML file exactly when it is here.

This module imports no torch: the factories import their block when called, so a config can be checked
(``medseg train bad.yaml`` fails in a fraction of a second) before anything heavy is loaded.

Every network is built by :func:`build_network` from a :class:`medseg.config.ModelConfig`::

    model:
      name: attention_unet        # attention_unet (grid attention gates) | unet (no gates)
      filters: [16, 32, 64, 128, 256]
      norm: instance              # instance | batch | group
      bottleneck: none            # none | pam | cam | dual | ema | psa | fpa | encoding
      decoder_fusion: concat      # concat | gau
      head: plain                 # plain | reverse_attention
      scales: [1.0]               # e.g. [1.0, 0.75, 0.5]: attention to scale
      scale_fusion: attention     # attention | average | max
      deep_supervision: true
      options: {}                 # keyword arguments per block name, e.g. {pam: {chunk_size: 4096}}

The network name is the only switch for the attention gates: ``unet`` never has them, ``attention_unet``
always has them (there is no separate ``skip_gate`` key that could contradict the name).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


class RegistryError(ValueError):
    """Unknown name in the registry."""


def suggest(name: object, valid: list[str] | tuple[str, ...]) -> str:
    """`` Did you mean 'x'?`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.4)
    return f" Did you mean {close[0]!r}?" if close else ""


def look_up(table: dict, name: str, kind: str):
    """``table[name]`` or an error listing the valid names and the closest match."""
    if name in table:
        return table[name]
    valid = sorted(table)
    raise RegistryError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}.{suggest(name, valid)}")


# Networks: factory(in_channels, num_classes, **kwargs) -> nn.Module.
def _unet(in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    """3D U-Net (Çiçek et al. 2016) with the Attention U-Net's encoder/decoder and no gates: the baseline."""
    from medseg.nets.unet import UNet3D

    return UNet3D(in_channels, num_classes, **kw)


def _attention_unet(in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    """3D Attention U-Net (Oktay et al. 2018): grid attention gates on skip levels 2..L-1."""
    from medseg.nets.unet import AttentionUNet3D

    return AttentionUNet3D(in_channels, num_classes, **kw)


NETWORKS: dict[str, Callable[..., nn.Module]] = {"unet": _unet, "attention_unet": _attention_unet}

#: Normalisation layers every block can use (:func:`medseg.nets.blocks.common.get_norm`).
NORMS = ("instance", "batch", "group")
#: How attention to scale fuses the scales (:class:`medseg.nets.blocks.scale_attention.ScaleAttention3D`).
SCALE_FUSIONS = ("attention", "average", "max")


# Bottleneck blocks: factory(channels, num_classes, norm, **options) -> module returning x or (x, aux).
def _pam(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.danet import PositionAttention3D

    return PositionAttention3D(c, **o)


def _cam(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.danet import ChannelAttention3D

    return ChannelAttention3D(c, **o)


def _dual(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.danet import DualAttention3D

    return DualAttention3D(c, c, k, norm=norm, **o)


def _ema(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.ema import EMAUnit3D

    return EMAUnit3D(c, norm=norm, **o)


def _psa(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.psa import PointwiseSpatialAttention3D

    return PointwiseSpatialAttention3D(c, norm=norm, **o)


def _fpa(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.pan import FeaturePyramidAttention3D

    return FeaturePyramidAttention3D(c, norm=norm, **o)


def _encoding(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.encnet import ContextEncoding3D

    return ContextEncoding3D(c, k, norm=norm, **o)


BOTTLENECKS: dict[str, Callable[..., nn.Module] | None] = {
    "none": None,
    "pam": _pam,
    "cam": _cam,
    "dual": _dual,
    "ema": _ema,
    "psa": _psa,
    "fpa": _fpa,
    "encoding": _encoding,
}


# Decoder fusions: factory(high_channels, low_channels, out_channels, norm, **options).
def _concat(h: int, lo: int, out: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.fusion import ConcatFusion

    return ConcatFusion(h, lo, out, norm, **o)


def _gau(h: int, lo: int, out: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.fusion import GAUFusion

    return GAUFusion(h, lo, out, norm, **o)


FUSIONS: dict[str, Callable[..., nn.Module]] = {"concat": _concat, "gau": _gau}


# Heads: factory(in_channels, num_classes, norm, **options) or None for a 1×1×1 convolution.
def _reverse(c: int, k: int, norm: str, **o: Any) -> nn.Module:
    from medseg.nets.blocks.reverse_attention import ReverseAttentionHead3D

    return ReverseAttentionHead3D(c, k, norm=norm, **o)


HEADS: dict[str, Callable[..., nn.Module] | None] = {"plain": None, "reverse_attention": _reverse}

#: Block names that may carry keyword arguments under ``model.options``.
OPTION_BLOCKS = tuple(sorted({*BOTTLENECKS, *FUSIONS, *HEADS} - {"none", "plain"}))


def _options(model_cfg: Any, name: str) -> dict:
    return dict((model_cfg.options or {}).get(name) or {})


def build_network(
    model_cfg: Any, in_channels: int, num_classes: int, pool_kernels: list | None = None
) -> nn.Module:
    """Build any registered network variant from a :class:`medseg.config.ModelConfig`.

    ``pool_kernels`` (from the plan, see :mod:`medseg.planning.planner`): per pooling step the kernel per axis;
    ``None`` gives the 2×2×2 poolings every network had before plans chose them.

    Example:
        >>> from medseg.config import ModelConfig
        >>> net = build_network(ModelConfig(name="unet", bottleneck="pam"), 1, 3)  # doctest: +SKIP
    """
    from medseg.nets.multiscale import MultiScaleNet
    from medseg.nets.unet import UNetBlocks

    make_network = look_up(NETWORKS, model_cfg.name, "network")
    bottleneck = look_up(BOTTLENECKS, model_cfg.bottleneck, "bottleneck")
    fusion = look_up(FUSIONS, model_cfg.decoder_fusion, "decoder_fusion")
    head = look_up(HEADS, model_cfg.head, "head")
    look_up(dict.fromkeys(SCALE_FUSIONS), model_cfg.scale_fusion, "scale_fusion")
    scales = [float(s) for s in model_cfg.scales]
    blocks = UNetBlocks(
        bottleneck=partial(bottleneck, **_options(model_cfg, model_cfg.bottleneck)) if bottleneck else None,
        fusion=partial(fusion, **_options(model_cfg, model_cfg.decoder_fusion)),
        head=partial(head, **_options(model_cfg, model_cfg.head)) if head else None,
    )
    net = make_network(
        in_channels,
        num_classes,
        filters=model_cfg.filters,
        norm=model_cfg.norm,
        deep_supervision=bool(model_cfg.deep_supervision) and len(scales) == 1,
        pool_kernels=pool_kernels,
        blocks=blocks,
    )
    if len(scales) > 1 or scales[0] != 1.0:
        return MultiScaleNet(net, scales, model_cfg.scale_fusion)
    return net
