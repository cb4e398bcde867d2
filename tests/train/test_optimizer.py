"""The optimizer's parameter groups: what --bias-lr-scale, --decay-exempt and frozen BN scales change."""

import pytest
import torch
from torch import nn

from core.cli.parsers import parse_run_config
from core.models.dilated import DilatedNet
from core.models.fast import FastNet
from core.models.resnet import CustomResNet
from core.train.optim import make_optimizer, param_groups
from core.train.recipes import RECIPES
from core.train.setup import BuiltRun
from tests.conftest import write_batches


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


def by_module_kind(model):
    """Every parameter sorted by the kind of module that holds it: an independent account of
    what --decay-exempt should exempt, from module types rather than tensor shapes."""
    kinds = {"weight": [], "norm_or_bias": [], "depthwise": []}
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, nn.BatchNorm2d):
            kinds["norm_or_bias"] += own.values()
        elif own:
            depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            kinds["depthwise" if depthwise else "weight"].append(own["weight"])
            kinds["norm_or_bias"] += [own["bias"]] if own.get("bias") is not None else []
    return kinds


@pytest.mark.slow
@pytest.mark.parametrize("exempt", ["bias-norm", "bias-norm-depthwise"])
def test_decay_exempt_leaves_biases_norms_and_depthwise_filters_undecayed(exempt):
    model = DilatedNet()
    kinds = by_module_kind(model)
    assert len(kinds["depthwise"]) == 9  # the nine separable convs after C1's three full ones
    groups = param_groups(model, 5e-4, decay_exempt=exempt)
    decayed = set().union(*(ids(g["params"]) for g in groups if g["weight_decay"] == 5e-4))
    undecayed = set().union(*(ids(g["params"]) for g in groups if g["weight_decay"] == 0))
    expected = kinds["norm_or_bias"] + (kinds["depthwise"] if exempt == "bias-norm-depthwise" else [])
    assert undecayed == ids(expected) and decayed | undecayed == ids(model.parameters())
    assert not decayed & undecayed and all(g["lr_scale"] == 1.0 for g in groups)


def test_decay_exempt_composes_with_bias_lr_scale():
    model = CustomResNet()
    groups = param_groups(model, 5e-4, bias_lr_scale=64.0, decay_exempt="bias-norm")
    named = dict(model.named_parameters())
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 5e-4), (1.0, 0.0), (64.0, 0.0)]
    assert ids(groups[2]["params"]) == ids(p for n, p in named.items() if n.endswith(".bias"))
    assert ids(groups[0]["params"]) == ids(p for p in model.parameters() if p.ndim > 1)


def test_an_exempt_parameter_is_not_shrunk_by_a_step_that_shrinks_the_others(tmp_path):
    """Through the command line: with zero gradients only the decay moves a weight."""
    data = write_batches(tmp_path / "cifar-10-batches-py", n_train=60, n_test=20)
    argv = ["--data", str(data), "--device", "cpu", "--cache-dir", "none", "--batch-size", "20",
            "--decay-exempt", "bias-norm-depthwise"]
    setup = BuiltRun(RECIPES["dilated"], parse_run_config(RECIPES["dilated"], argv))
    kinds = by_module_kind(setup.model)
    before = [p.detach().clone() for p in setup.model.parameters()]
    for group in setup.optimizer.param_groups:
        group["lr"] = 0.1
    for p in setup.model.parameters():
        p.grad = torch.zeros_like(p)
    setup.optimizer.step()
    moved = {id(p) for p, old in zip(setup.model.parameters(), before) if not torch.equal(p, old)}
    assert moved == ids(kinds["weight"])


def test_the_racing_nets_whitening_bias_trains_at_the_lr_itself_and_can_stop_early():
    """airbench scales the BatchNorm shifts' LR by 64, not its whitening layer's bias, which
    stops training after its first epochs (--whiten-bias-epochs)."""
    model = FastNet()
    groups = param_groups(model, 1e-3, bias_lr_scale=64.0, train_steps={model.whiten.bias: 144})
    by_id = {id(p): g for g in groups for p in g["params"]}
    whiten = by_id[id(model.whiten.bias)]
    assert (whiten["lr_scale"], whiten["weight_decay"], whiten["train_steps"]) == (1.0, 1e-3, 144)
    assert whiten["params"] == [model.whiten.bias]
    shifts = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {by_id[id(p)]["lr_scale"] for p in shifts} == {64.0} and "train_steps" not in by_id[id(shifts[0])]
    assert id(model.whiten.weight) not in by_id, "the whitening filters stay frozen"


def test_momentum_reaches_sgd():
    assert make_optimizer("sgd", nn.Linear(2, 2), 0.1, 0.0, momentum=0.85).defaults["momentum"] == 0.85
    config = parse_run_config(RECIPES["fast"], [])
    assert (config.training.momentum, parse_run_config(RECIPES["resnet"], []).training.momentum) == (0.85, 0.9)
