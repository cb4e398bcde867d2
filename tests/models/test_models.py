"""The custom ResNet as the seeds specify it, and the torchsummary-style table."""

import torch
from torch import nn

from core.models import MODELS
from core.models.norm import GhostBatchNorm2d
from core.models.resnet import CustomResNet, ResBlock
from core.report.summary import summary_table

SEED_PARAMS = 6_573_130  # the assignments' torchsummary total for the custom ResNet


def test_resnet_has_the_seed_parameter_count_and_bias_free_convs():
    model = MODELS["resnet"]()
    assert sum(p.numel() for p in model.parameters()) == SEED_PARAMS
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8 and all(c.bias is None for c in convs)
    assert [c.out_channels for c in convs] == [64, 128, 128, 128, 256, 512, 512, 512]
    assert sum(isinstance(m, ResBlock) for m in model.modules()) == 2


def test_resnet_shapes_through_each_layer():
    model = CustomResNet().eval()
    x = torch.randn(3, 3, 32, 32)
    shapes = []
    for layer in (model.prep, model.layer1, model.layer2, model.layer3, model.pool):
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 1, 1)]
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_downsampling_order_is_conv_pool_bn_relu():
    layer = CustomResNet().layer2
    assert [type(m).__name__ for m in layer] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]


def test_resblock_adds_its_input():
    block = ResBlock(8).eval()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(block(x), x + block.res(x))


def test_logits_are_scaled_and_not_softmaxed():
    model = CustomResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.flatten(model.pool(model.layer3(model.layer2(model.layer1(model.prep(x))))))
        torch.testing.assert_close(model(x), model.fc(features) * 0.125)
        assert not torch.allclose(model(x).exp().sum(1), torch.ones(2))


def test_summary_table_rows_totals_and_untouched_bn_statistics():
    model = CustomResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table, total = summary_table(model)
    assert total == sum(p.numel() for p in model.parameters()) and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lines = table.splitlines()
    assert any(line.split()[:3] == ["Conv2d-1", "[-1,", "64,"] and line.endswith("1,728") for line in lines)
    assert any(line.strip().startswith("ResBlock-") for line in lines)
    assert not any("Sequential" in line for line in lines)
    assert f"Total params: {SEED_PARAMS:,}" in table and "Params size (MB): 25.07" in table


def test_frozen_bn_scale_keeps_the_parameters_but_stops_training_them():
    plain, frozen = CustomResNet(), CustomResNet(freeze_bn_scale=True)
    assert sum(p.numel() for p in frozen.parameters()) == sum(p.numel() for p in plain.parameters())
    norms = [m for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 8
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(m.weight.requires_grad for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(m.weight.grad is None and m.bias.grad is not None for m in norms)
    assert set(frozen.state_dict()) == set(plain.state_dict()), "checkpoints stay interchangeable"


def test_frozen_bn_scale_applies_to_ghost_batch_norm_too():
    model = CustomResNet(ghost_batch=2, freeze_bn_scale=True)
    norms = [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]
    assert len(norms) == 8 and not any(m.weight.requires_grad for m in norms)


def test_celu_alpha_swaps_every_relu_and_nothing_else():
    plain, celu = CustomResNet(), CustomResNet(celu_alpha=0.3)
    assert [type(m) for m in plain.modules()].count(nn.ReLU) == 8
    swapped = [m for m in celu.modules() if isinstance(m, nn.CELU)]
    assert len(swapped) == 8 and all(m.alpha == 0.3 for m in swapped)
    assert not any(isinstance(m, nn.ReLU) for m in celu.modules())
    celu.load_state_dict(plain.state_dict())  # same parameters, so checkpoints load either way
    x = torch.randn(4, 3, 32, 32)
    out = celu(x)
    out.sum().backward()  # the in-place CELU must still backpropagate
    assert not torch.allclose(out, plain(x)), "negative pre-activations now pass through"
    with torch.no_grad():
        nearly_relu = CustomResNet(celu_alpha=1e-6)
        nearly_relu.load_state_dict(plain.state_dict())
        torch.testing.assert_close(nearly_relu(x), plain(x), rtol=1e-4, atol=1e-5)


def test_logit_scale_multiplies_the_logits_and_adds_no_parameters():
    default, sixteenth = CustomResNet().eval(), CustomResNet(logit_scale=1 / 16).eval()
    assert default.logit_scale == 0.125
    sixteenth.load_state_dict(default.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sixteenth(x), default(x) / 2)
