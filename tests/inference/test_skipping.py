"""Constant windows reuse the network's answer (medseg.inference.skipping): the same logits as running every
window, fewer forward passes, and a count of what was skipped."""

from __future__ import annotations

import torch

from medseg.inference.skipping import MAX_ENTRIES, ConstantWindows
from medseg.inference.sliding import SlidingWindow, sliding_window_logits


class Counting(torch.nn.Module):
    """A small convolutional network with instance norm (constant input → a non-trivial answer) that counts
    the windows it runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True), torch.nn.ReLU(),
            torch.nn.Conv3d(4, 3, 3, padding=1),
        )  # fmt: skip
        with torch.no_grad():
            self.body[1].bias.normal_()
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.body(x)


def _scan() -> torch.Tensor:
    """Air (clipped: one value) around a box of tissue, as a normalised CT after the body crop."""
    image = torch.zeros((1, 1, 64, 56, 40))
    image[..., 20:44, 14:40, 8:30] = torch.rand((24, 26, 22), generator=torch.Generator().manual_seed(1))
    return image


def test_skipping_gives_the_logits_of_running_every_window():
    window = SlidingWindow((16, 16, 16), overlap=0.5, sw_batch_size=3)
    plain = Counting().eval()
    with torch.no_grad():
        every = sliding_window_logits(plain, _scan(), window)
    skipping = ConstantWindows(Counting().eval())
    with torch.no_grad():
        fewer = sliding_window_logits(skipping, _scan(), window)
    skipped = skipping.take_count()
    assert (fewer - every).abs().max() < 1e-6  # batch composition may change the kernels: round-off only
    assert skipped > 0 and skipping.network.windows + skipped == plain.windows
    assert skipping.take_count() == 0  # the count restarts
    with torch.no_grad():  # the next case: its air windows are all answered from memory
        sliding_window_logits(skipping, _scan(), window)
    assert skipping.take_count() == skipped + 1


def test_distinct_constants_are_kept_apart_and_memory_is_bounded():
    net = ConstantWindows(Counting().eval())
    values = torch.arange(MAX_ENTRIES + 2, dtype=torch.float32)
    windows = values[:, None, None, None, None].expand(-1, 1, 8, 8, 8).contiguous()
    with torch.no_grad():
        out = net(windows)
        again = net(windows)
        reference = Counting().eval()(windows)
    assert torch.allclose(out, reference, atol=1e-6) and torch.equal(again[:MAX_ENTRIES], out[:MAX_ENTRIES])
    assert len(net.memory) == MAX_ENTRIES and net.take_count() == MAX_ENTRIES
    assert not torch.allclose(out[0], out[1])  # different constants, different answers


def test_a_window_constant_in_one_channel_only_runs():
    net = ConstantWindows(lambda w: w[:, :1] * 3)
    windows = torch.zeros((2, 2, 4, 4, 4))
    windows[1, 1, 0, 0, 0] = 1.0  # the second window's second channel varies
    windows[0] = 5.0
    out = net(windows)
    assert net.take_count() == 0 and torch.equal(out, windows[:, :1] * 3)
