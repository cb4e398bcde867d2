"""Evaluation figures against a direct computation, with and without flip and shift TTA."""

import torch
import torch.nn.functional as F

from core.data.augment import tta_views
from core.data.dataset import Split
from core.data.loader import DeviceLoader
from core.models.norm import GhostBatchNorm2d
from core.train.engine import evaluate, format_test_line, recalibrate_bn
from tests.conftest import synthetic_images


def shifted(x, dy, dx):
    """x moved down by dy and right by dx pixels (negative: up/left), reflect-padded: the reference."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., p - dy:p - dy + h, p - dx:p - dx + w]


def test_evaluate_matches_a_direct_computation_without_tta_with_flip_and_with_shifts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
    images, labels = synthetic_images(30, seed=0)
    loader = DeviceLoader(Split(images, labels), torch.device("cpu"), 8, [0.5] * 3, [0.25] * 3, train=False)
    x = torch.cat([b for b, _ in loader])
    y = torch.from_numpy(labels)
    flipped = x.flip(3)
    six_views = [x, flipped] + [shifted(v, d, d) for v in (x, flipped) for d in (1, -1)]
    cases = ((False, 0, [x]), (True, 0, [x, flipped]), (True, 1, six_views))
    with torch.no_grad():
        for tta, shift, views in cases:
            logits = sum(model(v) for v in views) / len(views)
            result = evaluate(model, loader, torch.device("cpu"), None, keep_predictions=True, tta=tta, tta_shift=shift)
            assert abs(result["loss"] - F.cross_entropy(logits, y).item()) < 1e-5
            assert result["correct"] == int((logits.argmax(1) == y).sum())
            assert torch.equal(result["predictions"], logits.argmax(1))
    assert format_test_line({"loss": 0.33371, "correct": 9048, "total": 10000, "acc": 90.48}) == \
        "Test set: Average loss: 0.3337, Accuracy: 9048/10000 (90.48%)"


def test_shift_views_are_the_flip_views_moved_diagonally_both_ways():
    x = torch.rand(3, 3, 10, 10)
    flipped = x.flip(3)
    expected = [x, flipped, shifted(x, 2, 2), shifted(x, -2, -2), shifted(flipped, 2, 2), shifted(flipped, -2, -2)]
    views = tta_views(x, flip=True, shift=2)
    assert len(views) == len(expected) and all(torch.equal(v, e) for v, e in zip(views, expected))
    unflipped = tta_views(x, flip=False, shift=1)
    assert len(unflipped) == 3 and torch.equal(unflipped[1], shifted(x, 1, 1)) and torch.equal(unflipped[2],
                                                                                                shifted(x, -1, -1))
    assert len(tta_views(x)) == 1


class HalfPrecisionLogits(torch.nn.Module):
    """A linear net whose logits come out in bf16, as every net's do under bf16 autocast."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return (100 * self.linear(x.flatten(1))).to(torch.bfloat16)


def test_tta_averages_half_precision_logits_in_fp32():
    torch.manual_seed(1)
    images, labels = synthetic_images(40, seed=3)
    loader = DeviceLoader(Split(images, labels), torch.device("cpu"), 16, [0.5] * 3, [0.25] * 3, train=False)
    model = HalfPrecisionLogits()
    with torch.no_grad():
        x = torch.cat([b for b, _ in loader])
        logits = sum(model(v).float() for v in tta_views(x, flip=True, shift=2)) / 6
        result = evaluate(model, loader, torch.device("cpu"), None, tta=True, tta_shift=2)
    assert abs(result["loss"] - F.cross_entropy(logits, torch.from_numpy(labels)).item()) < 1e-5


class GradModeProbe(torch.nn.Module):
    """Records whether autograd was on in each forward: evaluation must never build a graph, or
    its memory grows with every TTA view (a six-view evaluation at batch 1024 ran out of 24 GiB)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)
        self.grad_modes = []

    def forward(self, x):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.linear(x.flatten(1))


def test_evaluate_builds_no_autograd_graph_in_any_view():
    images, labels = synthetic_images(20, seed=2)
    loader = DeviceLoader(Split(images, labels), torch.device("cpu"), 8, [0.5] * 3, [0.25] * 3, train=False)
    model = GradModeProbe()
    evaluate(model, loader, torch.device("cpu"), None, tta=True, tta_shift=1)
    assert len(model.grad_modes) == 3 * 6 and not any(model.grad_modes)


def test_recalibrate_bn_sets_running_statistics_to_the_per_batch_average_and_nothing_else():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                GhostBatchNorm2d(4, ghost_batch=4))
    model[1].running_mean.fill_(5.0)  # stale statistics, as augmented training leaves them
    images, labels = synthetic_images(24, seed=1)
    loader = DeviceLoader(Split(images, labels), torch.device("cpu"), 8, [0.5] * 3, [0.25] * 3, train=False)
    params = [p.clone() for p in model.parameters()]
    model.eval()
    recalibrate_bn(model, loader, torch.device("cpu"), None)

    # Reference: a cumulative average, equal weight per batch, of each batch's (for the ghost
    # layer: each 4-image slice's, averaged per batch) mean and unbiased variance.
    with torch.no_grad():
        batches = [model[0](x) for x, _ in loader]
        stats1 = [(h.mean((0, 2, 3)), h.var((0, 2, 3))) for h in batches]
        mean1 = torch.stack([m for m, _ in stats1]).mean(0)
        var1 = torch.stack([v for _, v in stats1]).mean(0)
        slices = [[c.mean((0, 2, 3)), c.var((0, 2, 3))]
                  for h in batches for c in F.relu(F.batch_norm(h, None, None, model[1].weight, model[1].bias,
                                                                True)).split(4)]
    assert torch.allclose(model[1].running_mean, mean1, atol=1e-5)
    assert torch.allclose(model[1].running_var, var1, atol=1e-5)
    assert torch.allclose(model[3].running_mean, torch.stack([m for m, _ in slices]).mean(0), atol=1e-5)
    assert torch.allclose(model[3].running_var, torch.stack([v for _, v in slices]).mean(0), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert not model.training and model[1].momentum == 0.1 and model[3].momentum == 0.1
