"""Evaluation figures against a direct computation, with and without flip TTA."""

import torch
import torch.nn.functional as F

from core.data import DeviceLoader, Split
from core.engine import evaluate, format_test_line
from tests.conftest import synthetic_images


def test_evaluate_matches_a_direct_computation_with_and_without_tta():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
    images, labels = synthetic_images(30, seed=0)
    loader = DeviceLoader(Split(images, labels), torch.device("cpu"), 8, [0.5] * 3, [0.25] * 3, train=False)
    x = torch.cat([b for b, _ in loader])
    y = torch.from_numpy(labels)
    with torch.no_grad():
        for tta, logits in ((False, model(x)), (True, (model(x) + model(x.flip(3))) / 2)):
            result = evaluate(model, loader, torch.device("cpu"), None, keep_predictions=True, tta=tta)
            assert abs(result["loss"] - F.cross_entropy(logits, y).item()) < 1e-5
            assert result["correct"] == int((logits.argmax(1) == y).sum())
            assert torch.equal(result["predictions"], logits.argmax(1))
    assert format_test_line({"loss": 0.33371, "correct": 9048, "total": 10000, "acc": 90.48}) == \
        "Test set: Average loss: 0.3337, Accuracy: 9048/10000 (90.48%)"
