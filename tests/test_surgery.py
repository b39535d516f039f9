"""Shrinking Conv/BN/Linear, folding BatchNorm and writing folded solutions back, replaying plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chanprune.errors import ChanpruneError
from chanprune.surgery import Plan, PlanOp, bn_affine, folded_weight, keep_inputs, keep_outputs, replay, write_folded

from conftest import make_tiny, outputs, random_images


def conv_bn(affine=True, track=True, bias=False, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 5, (3, 2), padding=1, bias=bias)
    bn = nn.BatchNorm2d(5, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if track:
            bn.running_mean.copy_(torch.randn(5))
            bn.running_var.copy_(torch.rand(5) + 0.5)
        if affine:
            bn.weight.copy_(torch.rand(5) + 0.5)
            bn.bias.copy_(torch.randn(5))
    return conv.eval(), bn.eval()


def apply(conv, bn, x):
    with torch.no_grad():
        y = conv(x)
        return bn(y) if bn is not None else y


def folded_apply(w, b, conv, x):
    return nn.functional.conv2d(x.double(), w.reshape(conv.weight.shape), b, conv.stride, conv.padding)


@pytest.mark.parametrize("affine, bias, with_bn", [(True, False, True), (True, True, True), (False, False, True),
                                                   (True, True, False), (True, False, False)])
def test_folded_weight_is_the_affine_map_and_write_folded_round_trips(affine, bias, with_bn):
    conv, bn = conv_bn(affine=affine, bias=bias)
    bn = bn if with_bn else None
    x = torch.randn(3, 4, 6, 5)
    w, b = folded_weight(conv, bn)
    assert w.dtype == torch.float64 and w.shape == (5, 4 * 3 * 2)
    torch.testing.assert_close(folded_apply(w, b, conv, x).float(), apply(conv, bn, x), rtol=1e-5, atol=1e-5)
    # write a different folded solution: the layer (+ BN) computes exactly it afterwards
    torch.manual_seed(1)
    w_new, b_new = torch.randn_like(w), torch.randn_like(b)
    stats = (bn.running_mean.clone(), bn.running_var.clone()) if bn is not None else None
    added = write_folded(conv, bn, w_new, b_new)
    assert added == (not bias and not (with_bn and affine))
    assert (conv.bias is not None) == (bias or added)
    torch.testing.assert_close(apply(conv, bn, x), folded_apply(w_new, b_new, conv, x).float(), rtol=1e-4, atol=1e-4)
    if stats is not None:  # running statistics are kept for fine-tuning / BN re-estimation
        assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])


def test_bn_affine_identity_without_bn():
    scale, shift = bn_affine(None, 3)
    assert scale.tolist() == [1.0, 1.0, 1.0] and shift.tolist() == [0.0, 0.0, 0.0]


def test_keep_outputs_and_inputs_slice_parameters():
    conv, bn = conv_bn(bias=True)
    conv.weight.requires_grad_(False)
    keep = torch.tensor([0, 3, 4])
    c2 = keep_outputs(conv, keep)
    assert c2.out_channels == 3 and c2.in_channels == 4
    assert torch.equal(c2.weight, conv.weight[keep]) and torch.equal(c2.bias, conv.bias[keep])
    assert c2.weight.requires_grad is False and c2.kernel_size == (3, 2) and c2.padding == (1, 1)
    b2 = keep_outputs(bn, keep)
    assert b2.num_features == 3
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(b2, name), getattr(bn, name)[keep]), name
    assert b2.eps == bn.eps and not b2.training
    c3 = keep_inputs(conv, torch.tensor([1, 2]))
    assert c3.in_channels == 2 and torch.equal(c3.weight, conv.weight[:, [1, 2]]) and torch.equal(c3.bias, conv.bias)
    lin = nn.Linear(12, 3)
    l2 = keep_inputs(lin, torch.tensor([0, 2]), channel_size=4)  # channels own 4 features each
    assert l2.in_features == 8
    assert torch.equal(l2.weight, lin.weight[:, [0, 1, 2, 3, 8, 9, 10, 11]])
    l3 = keep_outputs(lin, torch.tensor([2]))
    assert l3.out_features == 1 and torch.equal(l3.weight, lin.weight[2:3])
    with pytest.raises(ChanpruneError):
        keep_outputs(nn.ReLU(), keep)
    with pytest.raises(ChanpruneError):
        keep_inputs(nn.BatchNorm2d(3), keep)
    # the originals are untouched
    assert conv.out_channels == 5 and lin.in_features == 12


def test_plan_replays_on_a_fresh_model():
    model = make_tiny(0)
    plan = Plan()
    keep = torch.tensor([0, 2, 3, 7, 9])
    plan.keep_outputs(model, "conv2", keep)
    plan.keep_outputs(model, "bn2", keep)
    plan.keep_inputs(model, "conv3", keep)
    plan.keep_inputs(model, "fc1", torch.tensor([1, 5]), channel_size=4)
    plan.keep_outputs(model, "conv3", torch.tensor([1, 5]))
    with_bias = write_folded(model.conv3, None, *folded_weight(model.conv3, None))
    assert with_bias
    plan.add_bias("conv3")
    fresh = replay(make_tiny(1), plan.ops)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    x = random_images(4)
    assert torch.equal(outputs(fresh, x), outputs(model, x))
    with pytest.raises(ChanpruneError, match="lacks"):
        replay(make_tiny(0), [PlanOp("keep_outputs", "conv9", (0,))])
    with pytest.raises(ChanpruneError, match="unknown pruning operation"):
        replay(make_tiny(0), [PlanOp("explode", "conv1")])
    with pytest.raises(ChanpruneError, match="fewer"):
        replay(make_tiny(0), [PlanOp("keep_inputs", "fc1", (4,), channel_size=16)])
