"""The CUDA path, checked where no GPU is: no host sync inside a training step (a dispatch mode
that sees every op a real CPU step runs, backward included), and no tensor on the wrong device
(a step traced on fake CUDA tensors). What these cannot check: docs/performance.md."""

import contextlib
import functools
from unittest import mock

import pytest
import torch
from conftest import synthetic_images, tiny_run
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from core.cli.parsers import parse_run_config
from core.data.dataset import Split
from core.data.loader import DeviceLoader, channel_stats
from core.device import autocast, make_scaler
from core.models.whitening import fit_whitening
from core.train import engine
from core.train.ema import WeightEMA
from core.train.optim import make_optimizer
from core.train.recipes import RECIPES
from core.train.schedule import one_cycle_for_recipe
from core.train.setup import BuiltRun, make_model

aten = torch.ops.aten
# The ops that make the host wait for the device: a value read back (.item(), a Python bool of a
# tensor), or an output whose size depends on the data.
HOST_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.equal.default}

# Every recipe and preset, and the options that change the step: EMA, ghost BN, alternating
# flips, label smoothing, whitening, Adam.
SETTINGS = [("resnet", []), ("resnet", ["--preset", "tricks"]), ("resnet", ["--preset", "best"]),
            ("dilated", []), ("dilated", ["--label-smoothing", "0.2", "--ema-decay", "0.9"]),
            ("ultimus", []), ("ultimus", ["--preset", "residual", "--flip", "alternating"])]


class HostSyncs(TorchDispatchMode):
    """Records every host sync among the ops dispatched inside it, except reads of ``optimizer``'s
    step counts: torch keeps those on the CPU for its unfused optimizers, so reading one syncs
    nothing on a GPU either (and a CUDA run takes the fused ones, whose counts never leave it)."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer, self.seen = optimizer, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        step_counts = {id(state["step"]) for state in self.optimizer.state.values() if "step" in state}
        if func in HOST_SYNCS and not (args and id(args[0]) in step_counts):
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


def host_syncs_of_an_epoch(model, argv, data, steps):
    """The host syncs of one training epoch of ``steps`` steps of the real loop."""
    recipe = RECIPES[model]
    config = parse_run_config(recipe, tiny_run(data, "unused", "--batch-size", "16", "--train-subset", str(16 * steps),
                                               *argv))
    run = BuiltRun(recipe, config)
    schedule = one_cycle_for_recipe(run.optimizer, 0.01, 0.001, 2, steps, 1.0)
    run.train_loader.set_epoch(1)
    with HostSyncs(run.optimizer) as guard:
        engine.train_epoch(run.model, run.train_loader, run.optimizer, schedule, run.loss_fn, run.device, run.amp_dtype,
                           make_scaler(run.device, run.amp_dtype), progress=False, averages=run.averages)
    return len(guard.seen)


@pytest.mark.slow
@pytest.mark.parametrize("model, argv", SETTINGS)
def test_no_host_sync_inside_a_training_step(model, argv, data):
    """The loop reads the loss on the host only where it logs (every 10 steps and the last): so
    an epoch of 5 steps syncs as often as one of 2, and any sync inside the step would add one a
    step."""
    assert host_syncs_of_an_epoch(model, argv, data, 2) == host_syncs_of_an_epoch(model, argv, data, 5) > 0


def test_the_host_sync_guard_catches_an_item_in_the_step(data, monkeypatch):
    real_step = engine.train_step

    def step_that_reads_the_loss(*args):
        loss, logits = real_step(*args)
        loss.item()
        return loss, logits

    monkeypatch.setattr(engine, "train_step", step_that_reads_the_loss)
    assert host_syncs_of_an_epoch("ultimus", [], data, 5) == host_syncs_of_an_epoch("ultimus", [], data, 2) + 3


@contextlib.contextmanager
def cuda_autocast_allowed():
    """torch.autocast turns itself off for CUDA where torch sees no GPU, and asks the GPU whether
    it has bf16: inside, torch takes one to be there."""
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True):
        yield


def fake_cuda_step(model_name, argv, inject=None):
    """The recipe's model, an augmented batch, the forward pass and loss under bf16 autocast, an
    optimizer step, an EMA update and an evaluation with TTA, all on fake CUDA tensors, as far as
    FakeTensorMode goes: backward needs a real device (the gradients are set by hand instead), a
    module's tensors cannot be moved there (they are made there and assigned), it holds no CUDA
    generator (the CPU's stand in, so a generator on the wrong device goes unseen), and fused
    optimizers have no fake kernels. ``inject`` changes the batch, to show a fault is caught."""
    recipe = RECIPES[model_name]
    config = parse_run_config(recipe, argv)
    images, labels = synthetic_images(64, seed=0)
    mean, std = channel_stats(images)
    device, amp_dtype = torch.device("cuda"), torch.bfloat16
    model = make_model(recipe, config.model, [str(c) for c in range(10)], torch.device("cpu"))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = {k: mode.from_tensor(v).to(device) for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                               for k, v in state.items()}, assign=True)
        first_flips = None
        if config.training.flip == "alternating":
            first_flips = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.5
        loader = DeviceLoader(Split(images, labels), device, 32, mean, std, train=True,
                              augment=functools.partial(recipe.augment, **config.augment),
                              order_generator=torch.Generator().manual_seed(0),
                              aug_generator=torch.Generator().manual_seed(1), channels_last=True,
                              first_flips=first_flips)
        fit_whitening(model, loader)
        ema = WeightEMA(model, 0.99)
        t = config.training
        optimizer = make_optimizer(t.optimizer, model, 0.0, 5e-4, t.bias_lr_scale, t.decay_exempt)
        schedule = one_cycle_for_recipe(optimizer, 0.4, 0.004, 2, 2, 1.0, cycle_momentum=t.cycle_momentum)
        loader.set_epoch(1)
        x, y = next(iter(loader))
        if inject:
            x = inject(x)
        with cuda_autocast_allowed(), autocast(device, amp_dtype):
            logits = model(x)
            loss = torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)(logits, y)
        assert (x.device.type, logits.device.type, logits.dtype, loss.dtype) == \
            ("cuda", "cuda", torch.bfloat16, torch.float32)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        schedule.step()
        ema.update()
        test = DeviceLoader(Split(images, labels), device, 32, mean, std, train=False, channels_last=True)
        # Evaluation runs to its one host read, the accuracy at the end, which a fake tensor cannot give.
        with cuda_autocast_allowed(), pytest.raises(DataDependentOutputException):
            engine.evaluate(ema.module, test, device, amp_dtype, tta=True, tta_shift=2)


# deepcopy (the EMA's copy of the model) asks a fake tensor for its data pointer, which torch warns of
FAKE_COPY_WARNING = "ignore:Accessing the data pointer of FakeTensor"


@pytest.mark.slow
@pytest.mark.filterwarnings(FAKE_COPY_WARNING)
@pytest.mark.parametrize("model, argv", SETTINGS)
def test_every_recipe_runs_on_fake_cuda_tensors_with_autocast(model, argv):
    fake_cuda_step(model, argv)


@pytest.mark.filterwarnings(FAKE_COPY_WARNING)
def test_the_fake_cuda_check_catches_a_cpu_tensor():
    with pytest.raises(FakeTensorDeviceMismatchError):
        fake_cuda_step("ultimus", [], inject=lambda x: x + torch.zeros(x.shape[1:]))
