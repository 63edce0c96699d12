"""Tests for DANet's position/channel attention and the dual-attention blocks (Fu et al., CVPR 2019)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medseg.nets.blocks.danet import (
    ChannelAttention3D,
    DualAttention3D,
    DualAttentionHead3D,
    PositionAttention3D,
    position_attention_chunked,
    position_attention_reference,
)

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_all_grads(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------ PAM
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 1000, None])
def test_pam_chunked_equals_plain_formula(chunk_size: int | None) -> None:
    torch.manual_seed(0)
    n = 37  # 8 and 5 do not divide it
    q, k, v = torch.randn(2, 3, n), torch.randn(2, 3, n), torch.randn(2, 5, n)
    # plain N×N formula, written out independently of the module
    energy = torch.einsum("bci,bcj->bij", q, k)
    attention = torch.exp(energy - energy.amax(-1, keepdim=True))
    attention = attention / attention.sum(-1, keepdim=True)
    expected = torch.einsum("bcj,bij->bci", v, attention)
    assert torch.allclose(position_attention_reference(q, k, v), expected, atol=1e-5)
    assert torch.allclose(position_attention_chunked(q, k, v, chunk_size), expected, atol=1e-5)


def test_pam_chunked_gradients_equal_plain_formula() -> None:
    torch.manual_seed(1)
    tensors = [torch.randn(2, 3, 29, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    tensors.append(torch.randn(2, 4, 29, dtype=torch.float64, requires_grad=True))
    weight = torch.randn(2, 4, 29, dtype=torch.float64)
    (position_attention_reference(*tensors) * weight).sum().backward()
    expected = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    (position_attention_chunked(*tensors, chunk_size=6) * weight).sum().backward()
    for t, e in zip(tensors, expected, strict=True):
        assert torch.allclose(t.grad, e, atol=1e-10)
    small = [t.detach()[:, :, :11].clone().requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda a, b, c: position_attention_chunked(a, b, c, 4), small)


@pytest.mark.parametrize("chunk_size", [7, 50, None])
def test_pam_module_matches_paper_formula(chunk_size: int | None) -> None:
    torch.manual_seed(2)
    pam = PositionAttention3D(16, chunk_size=chunk_size)
    assert pam.query.out_channels == pam.key.out_channels == 2 and pam.value.out_channels == 16
    with torch.no_grad():
        pam.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 7, 3)
    flat = x.flatten(2)
    q = torch.einsum("oc,bcn->bon", pam.query.weight.flatten(1), flat) + pam.query.bias[:, None]
    k = torch.einsum("oc,bcn->bon", pam.key.weight.flatten(1), flat) + pam.key.bias[:, None]
    v = torch.einsum("oc,bcn->bon", pam.value.weight.flatten(1), flat) + pam.value.bias[:, None]
    expected = 0.7 * position_attention_reference(q, k, v).view_as(x) + x
    assert torch.allclose(pam(x), expected, atol=1e-5)


def test_pam_and_cam_start_as_identity() -> None:
    x = torch.randn(1, 9, 5, 7, 3)
    pam, cam = PositionAttention3D(9), ChannelAttention3D(9)
    assert pam.query.out_channels == 1  # C/8 floored, at least 1
    assert pam.gamma.item() == 0 and cam.beta.item() == 0
    assert torch.equal(pam(x), x) and torch.equal(cam(x), x)


_MEMORY_SCRIPT = """
import resource, sys, torch
from medseg.nets.blocks.danet import PositionAttention3D
torch.manual_seed(0)
torch.set_num_threads(1)  # one thread: robust to CPU shared with other jobs; memory does not depend on it
train = sys.argv[1] == "train"
pam = PositionAttention3D(64, chunk_size=7)
with torch.no_grad():
    pam.gamma.fill_(1.0)
x = torch.randn(1, 64, 24, 24, 24, requires_grad=train)
with torch.set_grad_enabled(train):  # warm-up on a tiny input through the chunked path
    y = pam(torch.randn(1, 64, 3, 4, 2, requires_grad=train))
    if train:
        y.sum().backward()
pam.chunk_size = None
scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.set_grad_enabled(train):
    y = pam(x)
    if train:
        y.sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert y.shape == x.shape and bool(torch.isfinite(y).all())
print((after - before) / scale)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs the resource module")
@pytest.mark.parametrize("phase", ["inference", "train"])
def test_pam_peak_memory_on_24_cubed_grid(phase: str) -> None:
    """The unchunked map alone would be 764 MB (1.5 GB measured); the chunked PAM must stay ≤ 512 MB."""
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, phase],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": ""},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    peak_mb = float(result.stdout.strip().splitlines()[-1])
    assert peak_mb <= 512, f"PAM {phase} peak RSS growth {peak_mb:.0f} MB > 512 MB"


# ------------------------------------------------------------------------------------------------ CAM
def test_cam_matches_explicit_formula() -> None:
    torch.manual_seed(3)
    cam = ChannelAttention3D(6)
    with torch.no_grad():
        cam.beta.fill_(0.3)
    x = torch.randn(2, 6, 5, 7, 3, dtype=torch.float64) * 0.2
    flat = x.flatten(2)
    energy = torch.einsum("bcn,bdn->bcd", flat, flat)
    expected = torch.empty_like(flat)
    for b in range(2):
        for c in range(6):
            row = energy[b, c].max() - energy[b, c]  # the authors' max(energy) − energy
            weights = [torch.exp(row[d] - row.max()) for d in range(6)]
            total = sum(weights)
            expected[b, c] = sum(weights[d] / total * flat[b, d] for d in range(6))
    expected = 0.3 * expected.view_as(x) + x
    assert torch.allclose(cam.double()(x), expected, atol=1e-10)


# -------------------------------------------------------------------------------------- dual blocks
def test_dual_attention_training_returns_aux_logits() -> None:
    torch.manual_seed(4)
    block = DualAttention3D(16, 24, num_classes=3).train()
    assert block.inter_channels == 4
    feats, aux = block(torch.randn(2, 16, 5, 7, 3))
    assert feats.shape == (2, 24, 5, 7, 3)
    assert set(aux) == {"danet_pam", "danet_cam"}
    assert all(t.shape == (2, 3, 5, 7, 3) for t in aux.values())
    feats, aux = block.eval()(torch.randn(2, 16, 5, 7, 3))
    assert feats.shape == (2, 24, 5, 7, 3) and aux == {}


def test_dual_attention_head_returns_class_logits() -> None:
    torch.manual_seed(5)
    head = DualAttentionHead3D(8, num_classes=4, norm="group").train()
    assert head.inter_channels == 2
    logits, aux = head(torch.randn(1, 8, 5, 7, 3))
    assert logits.shape == (1, 4, 5, 7, 3) and set(aux) == {"danet_pam", "danet_cam"}
    logits, aux = head.eval()(torch.randn(1, 8, 5, 7, 3))
    assert logits.shape == (1, 4, 5, 7, 3) and aux == {}
    assert DualAttentionHead3D(3, num_classes=2).inter_channels == 1  # min 1


def test_head_and_bottleneck_share_the_trunk() -> None:
    torch.manual_seed(6)
    block, head = DualAttention3D(8, 8, num_classes=2), DualAttentionHead3D(8, num_classes=2)
    shared = {k: v for k, v in block.state_dict().items() if not k.startswith("fuse.")}
    head.load_state_dict({**head.state_dict(), **shared})
    x = torch.randn(1, 8, 5, 7, 3)
    _, aux_block = block.train()(x)
    _, aux_head = head.train()(x)
    for key in aux_block:
        assert torch.allclose(aux_block[key], aux_head[key], atol=1e-6)


@pytest.mark.parametrize("cls", [DualAttention3D, DualAttentionHead3D])
def test_gradients_reach_every_parameter(cls: type[nn.Module]) -> None:
    torch.manual_seed(7)
    block = cls(8, 6, 3) if cls is DualAttention3D else cls(8, 3)
    with torch.no_grad():
        block.pam.gamma.fill_(0.5)
        block.cam.beta.fill_(0.5)
    block.pam.chunk_size = 16  # also exercise the chunked backward
    out, aux = block.train()(torch.randn(2, 8, 5, 7, 3))
    loss = (out * torch.randn_like(out)).sum() + sum((t * torch.randn_like(t)).sum() for t in aux.values())
    loss.backward()
    _assert_all_grads(block)
