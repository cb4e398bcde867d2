"""The GPU paths themselves, on each accelerator present: `python -m pytest -m gpu` on a CUDA or
Apple machine. Everywhere else they skip; the CPU paths are the rest of the suite's."""

import numpy as np
import pytest
import torch
from torch import nn

import train_resnet
import train_ultimus
from core.data.augment import crop_at, random_crop, tta_views
from core.data.dataset import Split
from core.data.loader import DeviceLoader
from core.device import make_scaler, pick_amp
from core.models import MODELS
from core.runs.checkpoint import load_checkpoint
from core.train.ema import WeightEMA
from core.train.engine import evaluate, train_step
from core.train.inference import load_trained
from core.train.optim import make_optimizer
from tests.conftest import ctrl_c_in_second_epoch, epoch_figures, tiny_run


def _present(name):
    if name == "cuda":
        return torch.cuda.is_available()
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


DEVICES = [pytest.param(name, marks=[pytest.mark.gpu, pytest.mark.skipif(not _present(name), reason=f"no {name}")])
           for name in ("cuda", "mps")]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(cifar):
    return cifar(200, 110)


def tiny(data, out, device, *extra, epochs=3):
    return tiny_run(data, out, *extra, epochs=epochs, lr=(0.01, 0.001), device=device)


def split(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8), np.arange(n) % 10)


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_step_on_the_device_in_its_auto_precision_lowers_the_loss(device):
    device = torch.device(device)
    amp = pick_amp("auto", device)
    torch.manual_seed(0)
    model = MODELS["resnet"]().to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer("sgd", model, 0.05, 5e-4, fused=device.type == "cuda")
    loader = DeviceLoader(split(), device, 32, [0.5] * 3, [0.25] * 3, train=True, channels_last=True,
                          order_generator=torch.Generator().manual_seed(0))
    scaler, loss_fn = make_scaler(device, amp), nn.CrossEntropyLoss()
    x, y = next(iter(loader))
    first, _ = train_step(model, optimizer, loss_fn, x, y, device, amp, scaler)
    for _ in range(5):
        loss, logits = train_step(model, optimizer, loss_fn, x, y, device, amp, scaler)
    assert loss.device.type == device.type and torch.isfinite(loss) and loss.item() < first.item()


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_on_the_device_equals_the_cpus_for_the_same_offsets(device):
    x = torch.randn(32, 3, 32, 32)
    dy, dx = torch.randint(0, 9, (32,)), torch.randint(0, 9, (32,))
    for mode in ("reflect", "constant"):
        on_device = crop_at(x.to(device), dy.to(device), dx.to(device), 4, mode)
        assert on_device.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(on_device.cpu(), crop_at(x, dy, dx, 4, mode))
    drawn = random_crop(x.to(device), 4, generator=torch.Generator(device).manual_seed(0))
    assert drawn.device.type == device and drawn.shape == x.shape
    views = tta_views(x.to(device).contiguous(memory_format=torch.channels_last), flip=True, shift=2)
    assert len(views) == 6 and all(v.is_contiguous(memory_format=torch.channels_last) for v in views)
    torch.testing.assert_close(views[1].cpu(), x.flip(3))


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_on_the_device_matches_the_cpu_with_and_without_tta(device):
    torch.manual_seed(0)
    model = MODELS["ultimus"]().eval()
    data = split(70)
    for tta, shift in ((False, 0), (True, 2)):
        results = []
        for dev in (CPU, torch.device(device)):
            loader = DeviceLoader(data, dev, 32, [0.5] * 3, [0.25] * 3, train=False)
            results.append(evaluate(model.to(dev), loader, dev, None, keep_predictions=True, tta=tta, tta_shift=shift,
                                    pad_to=32))
        assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-4)
        assert (results[1]["predictions"] == results[0]["predictions"]).float().mean() > 0.95


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_written_on_the_device_evaluates_the_same_on_the_cpu(data, tmp_path, device):
    out = tmp_path / "run"
    assert train_ultimus.main(tiny(data, out, device, epochs=2)) == 0
    assert load_checkpoint(out / "last.pt", "ultimus", purpose="resume")["rng"]["aug_device"] == device
    x = torch.randn(8, 3, 32, 32)
    on_device, _ = load_trained(out / "last.pt", torch.device(device))
    on_cpu, _ = load_trained(out / "last.pt", CPU)
    with torch.no_grad():
        torch.testing.assert_close(on_device(x.to(device)).cpu(), on_cpu(x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_a_deterministic_resume_on_the_device_repeats_the_uninterrupted_run(data, tmp_path, monkeypatch, device):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ("--deterministic", "--tta-shift", "1")
    assert train_resnet.main(tiny(data, straight, device, *flags)) == 0
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_resnet.main(tiny(data, resumed, device, *flags)) == 130
    assert train_resnet.main(["--resume", str(resumed / "last.pt"), "--no-progress"]) == 0
    assert epoch_figures(straight) == epoch_figures(resumed)


@pytest.mark.parametrize("device", DEVICES)
def test_the_weight_average_on_the_device_follows_the_cpus(device):
    torch.manual_seed(0)
    model = MODELS["ultimus"]()
    twin = MODELS["ultimus"]()
    twin.load_state_dict(model.state_dict())
    twin.to(device)
    averages = WeightEMA(model, 0.9), WeightEMA(twin, 0.9)
    for step in range(3):
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                p.add_(0.01 * (step + 1))
                q.add_(0.01 * (step + 1))
        for avg in averages:
            avg.update()
    for a, b in zip(averages[0].module.state_dict().values(), averages[1].module.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, atol=1e-6, rtol=1e-5)
