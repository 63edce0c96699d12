"""Training pieces: class-prior head initialisation, poly schedule, loss over auxiliary outputs, plan."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.config import ModelConfig, load_config
from medseg.engine.trainer import build_optimizer, init_class_prior
from medseg.losses import SegmentationLoss
from medseg.nets.registry import build_network


@pytest.mark.parametrize(
    "variant", [{}, {"head": "reverse_attention"}, {"scales": [1.0, 0.5]}], ids=["plain", "reverse", "scales"]
)
def test_class_prior_starts_every_head_at_the_class_frequencies(variant):
    fractions = [0.9, 0.09, 0.01]
    net = build_network(ModelConfig(filters=(4, 8, 16, 32), **variant), 1, 3).eval()
    assert init_class_prior(net, fractions, 3)
    backbone = net.scale_attention.backbone if "scales" in variant else net
    for head in backbone.ds_heads:
        assert torch.allclose(head.bias, torch.log(torch.tensor(fractions)))
    with torch.no_grad():  # zero the final features: the output is the bias alone → softmax = prior order
        for p in net.parameters():
            if p.ndim > 1:
                p.zero_()
        probs = torch.softmax(net(torch.randn(1, 1, 32, 32, 32)), 1)[0, :, 0, 0, 0]
    assert probs.argmax() == 0 and probs.argmin() == 2
    assert not init_class_prior(net, [], 3)


def test_poly_schedule_reaches_zero():
    cfg = load_config(None, ["optim.lr=0.01", "optim.poly_power=0.9"])
    opt, sched = build_optimizer(cfg, torch.nn.Linear(2, 2), total_iters=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[5] == pytest.approx(0.01 * (1 - 5 / 10) ** 0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_loss_counts_every_output_with_its_weight():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    main = torch.randn(2, 3, 8, 8, 8)
    coarse = torch.randn(2, 3, 4, 4, 4)
    aux = torch.randn(2, 3, 8, 8, 8)
    presence = torch.randn(2, 3)
    loss = SegmentationLoss(3, deep_supervision_weights=[1.0, 0.5], aux_weight=0.4, se_weight=0.2)
    only_main = loss({"logits": [main], "aux": {}}, target)
    with_ds = loss({"logits": [main, coarse], "aux": {}}, target)
    full = loss({"logits": [main, coarse], "aux": {"x": aux, "se_presence": presence}}, target)
    small = torch.nn.functional.interpolate(target.float(), size=(4, 4, 4), mode="nearest-exact")
    assert float(with_ds - only_main) == pytest.approx(0.5 * float(loss.dice_ce(coarse, small)), rel=1e-5)
    present = torch.stack([(target[b] == k).any() for b in range(2) for k in range(3)]).float().view(2, 3)
    expected = 0.4 * float(loss.dice_ce(aux, target.float())) + 0.2 * float(
        torch.nn.functional.binary_cross_entropy_with_logits(presence, present)
    )
    assert float(full - with_ds) == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(float(full))


def test_training_reads_volumes_through_medseg_io_and_names_a_broken_file(tiny_dataset, tmp_path):
    """One volume reader: a truncated label in a training set fails with medseg's one-line reason."""
    import shutil

    from medseg.engine import train
    from medseg.io import InputError
    from tests.conftest import TINY_TRAIN

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    broken = sorted((data / "labelsTr").glob("*.nii.gz"))[0]
    broken.write_bytes(broken.read_bytes()[:100])
    cfg = load_config(None, [*TINY_TRAIN, f"data.root={data}", f"train.output={tmp_path / 'run'}"])
    with pytest.raises(InputError, match=rf"{broken.name}: (truncated|not a readable)"):
        train(cfg, log=lambda *_: None)
