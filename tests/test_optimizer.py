"""The optimizer's parameter groups: what --bias-lr-scale and frozen BN scales change."""

import pytest
import torch

from core.models.resnet import CustomResNet
from core.build import make_optimizer, param_groups


def ids(params):
    return {id(p) for p in params}


def test_default_is_one_group_of_every_parameter():
    model = CustomResNet()
    (group,) = param_groups(model, 5e-4)
    assert ids(group["params"]) == ids(model.parameters())
    assert group["weight_decay"] == 5e-4 and group["lr_scale"] == 1.0


def test_bias_lr_scale_splits_off_the_biases_with_weight_decay_divided():
    model = CustomResNet()
    weights, biases = param_groups(model, 5e-4, bias_lr_scale=64.0)
    named = dict(model.named_parameters())
    assert ids(biases["params"]) == ids(p for n, p in named.items() if n.endswith(".bias"))
    assert ids(weights["params"]) == ids(p for n, p in named.items() if not n.endswith(".bias"))
    assert len(biases["params"]) == 9  # eight BN shifts and the FC bias
    assert biases["lr_scale"] == 64.0 and biases["weight_decay"] == pytest.approx(5e-4 / 64)
    assert weights["lr_scale"] == 1.0 and weights["weight_decay"] == 5e-4


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_frozen_bn_scales_are_left_out_of_the_optimizer(name):
    model = CustomResNet(freeze_bn_scale=True)
    opt = make_optimizer(name, model, 0.1, 5e-4, bias_lr_scale=4.0)
    optimized = set().union(*(ids(g["params"]) for g in opt.param_groups))
    assert optimized == ids(p for p in model.parameters() if p.requires_grad)
    frozen = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not optimized & ids(frozen)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 5e-4 / 4]
