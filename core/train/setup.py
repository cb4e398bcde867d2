"""What a run is built from its flags: the device, the data, the model, the loaders, the
optimizer. A training run, a range test and ``--eval-only`` all build through here, so each
sees the same model and the same batches for the same flags."""

import functools
import os
import platform
import time

import torch
from torch import nn

from ..data.dataset import DEFAULT_CACHE, load_dataset
from ..data.loader import DeviceLoader, channel_stats
from ..data.subsets import balanced_split, run_images
from ..device import autotune_convolutions, keep_freed_memory, pick_amp
from ..errors import UserError
from ..models import MODELS
from ..models.whitening import fit_whitening, whitening_biases
from ..report.summary import summary_table
from ..runs.outputs import check_folder
from .distributed import World, sync_batch_norm
from .ema import WeightEMA
from .lookahead import LOOKAHEAD_EVERY, Lookahead
from .optim import fused_on, make_optimizer


def load_data(data_config, need_train, progress, data=None):
    """The dataset --data names (``data`` in its place, when given), through the --cache-dir cache;
    without either, the official download in ./data."""
    data = data or data_config.data
    cache_dir = data_config.cache_dir
    if cache_dir not in (None, "none"):
        check_folder(cache_dir, "--cache-dir")
    return load_dataset(data or "./data", need_train=need_train, download=data is None,
                        cache_dir=None if cache_dir == "none" else (cache_dir or DEFAULT_CACHE), progress=progress)


def pick_runtime(runtime, world=World()):
    """The device and autocast dtype the ``RuntimeConfig`` asks for (this process's own GPU under
    torchrun), with the allocator and cuDNN set up for it."""
    device = world.device(runtime.device)
    keep_freed_memory(device)
    autotune_convolutions(device)
    return device, pick_amp(runtime.amp, device)


def describe_device(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def device_memory(device):
    """The whole memory of ``device`` in bytes, or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps":
        return torch.mps.recommended_max_memory() if hasattr(torch.mps, "recommended_max_memory") else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def _gib(n_bytes):
    return f"{n_bytes / 2**30:,.1f} GiB"


def check_model_fits(recipe, model_kwargs, num_classes, device):
    """Refuse in one line, before anything is allocated, a model that its flags make too large to
    build or to train on ``device``: it is built on the meta device (shapes, no memory), and its
    fp32 weights, their gradients and momentum are held against the device's whole memory, a
    lower bound of what training needs, so nothing that fits is refused."""
    sizes = ", ".join(f"--{dest.replace('_', '-')} {value}" for dest, value in model_kwargs.items()
                      if isinstance(value, int) and not isinstance(value, bool))
    try:
        with torch.device("meta"):
            model = MODELS[recipe.name](num_classes=num_classes, **model_kwargs)
    except (RuntimeError, OverflowError, TypeError, ValueError, MemoryError) as exc:
        raise UserError(f"the {recipe.name} model cannot be built with {sizes} ({exc.__class__.__name__}): "
                        f"lower them") from None
    params = sum(p.numel() for p in model.parameters())
    total = device_memory(device)
    if total is not None and 12 * params > total:
        raise UserError(f"the {recipe.name} model with {sizes} needs at least {_gib(12 * params)} ({params:,} "
                        f"parameters, their gradients and momentum), more than the {_gib(total)} of "
                        f"{device.type}: lower them")


@torch.no_grad()
def check_batch_fits(model, device, batch_size):
    """Refuse in one line a --batch-size whose activations alone, with the weights, their
    gradients and momentum, exceed the device's whole memory: every module's output for one
    image, measured on the model in eval mode (which changes nothing in it), times the batch."""
    total = device_memory(device)
    if total is None:
        return
    per_image = 0

    def count(module, inputs, output):
        nonlocal per_image
        if isinstance(output, torch.Tensor) and not list(module.children()):
            per_image += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    training = model.training
    try:
        model.eval()(torch.zeros(1, 3, 32, 32, device=device))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    need = 4 * (3 * sum(p.numel() for p in model.parameters()) + per_image * batch_size)
    if need > total:
        raise UserError(f"--batch-size {batch_size} needs at least {_gib(need)} for the weights and one batch's "
                        f"activations, more than the {_gib(total)} of {device.type}: lower --batch-size")


def make_model(recipe, model_kwargs, classes, device):
    """The recipe's model for ``model_kwargs`` (a config's ``model``) with one output per class,
    on ``device``."""
    return MODELS[recipe.name](num_classes=len(classes), **model_kwargs).to(device)


def plain_batches(split, device, mean, std, batch_size, channels_last):
    """``split`` in order and un-augmented, laid out as the model is: what evaluation and
    --recalibrate-bn read."""
    return DeviceLoader(split, device, batch_size, mean, std, train=False, channels_last=channels_last)


def bn_images(images, train, num_classes, device, mean, std, batch_size, channels_last):
    """The first ``images`` un-augmented training images (class-balanced) that --recalibrate-bn
    re-estimates BN statistics on, in batches of ``batch_size``: the training batch size, which
    the batch statistics depend on."""
    return plain_batches(balanced_split(train, images, num_classes), device, mean, std, batch_size, channels_last)


class BuiltRun:
    """Everything a training run or a range test builds from its ``RunConfig``, in one place. The
    order of the steps is part of the result: the model's initialization draws from the seeded
    torch generator, so building it earlier or later would train other weights."""

    def __init__(self, recipe, config, world=World()):
        data, training, runtime = config.data, config.training, config.runtime
        self.device, self.amp_dtype = pick_runtime(runtime, world)
        if training.sync_bn and self.device.type != "cuda":
            raise UserError(f"--sync-bn needs CUDA (torch's SyncBatchNorm has no {self.device.type} kernels): drop "
                            f"it, and each process normalizes over its own share")
        torch.manual_seed(runtime.seed)
        self.order_gen = torch.Generator().manual_seed(runtime.seed)
        self.aug_gen = torch.Generator(self.device).manual_seed(runtime.seed + 1)
        start = time.perf_counter()
        self.ds = load_data(data, need_train=True, progress=runtime.progress)
        self.data_load_s = time.perf_counter() - start
        self.train, self.val = run_images(self.ds.train, data.train_subset, data.val_split, len(self.ds.classes))
        self.test = balanced_split(self.ds.test, data.test_subset, len(self.ds.classes))
        if len(self.train.labels) < training.batch_size:
            raise UserError(f"--batch-size {training.batch_size} exceeds the {len(self.train.labels)} training "
                            f"images: lower it or enlarge --train-subset")
        self.mean, self.std = channel_stats(self.train.images)
        check_model_fits(recipe, config.model, len(self.ds.classes), self.device)
        self.model = make_model(recipe, config.model, self.ds.classes, self.device)
        if training.sync_bn:
            self.model = sync_batch_norm(self.model)
        check_batch_fits(self.model, self.device, training.batch_size)
        first_flips = None
        if training.flip == "alternating":  # drawn from the seed alone, so a resumed run draws them again
            flip_gen = torch.Generator().manual_seed(runtime.seed)
            first_flips = torch.rand(len(self.train.labels), generator=flip_gen) < 0.5
        self.train_loader = DeviceLoader(self.train, self.device, training.batch_size, self.mean, self.std, train=True,
                                         augment=functools.partial(recipe.augment, **config.augment),
                                         order_generator=self.order_gen, aug_generator=self.aug_gen,
                                         channels_last=runtime.channels_last, first_flips=first_flips,
                                         share=(world.rank, world.size))
        fit_whitening(self.model, self.train_loader)
        self.summary, self.params = summary_table(self.model)
        self.model_table = recipe.model_table(self.model) if recipe.model_table else None
        if runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # After the layout change, which makes new tensors: the average follows these ones.
        self.ema = WeightEMA(self.model, training.ema_decay) if training.ema_decay else None
        total_steps = training.epochs * len(self.train_loader)
        if training.lookahead and total_steps < LOOKAHEAD_EVERY:
            raise UserError(f"--lookahead ends the run on weights it pulls every {LOOKAHEAD_EVERY} steps, and this run "
                            f"has {total_steps}: it would end untrained. Add --no-lookahead, or train longer")
        self.lookahead = Lookahead(self.model, total_steps, LOOKAHEAD_EVERY) if training.lookahead else None
        self.averages = [average for average in (self.lookahead, self.ema) if average is not None]
        eval_batches = functools.partial(plain_batches, device=self.device, mean=self.mean, std=self.std,
                                         batch_size=config.evaluation.eval_batch_size,
                                         channels_last=runtime.channels_last)
        self.test_loader = eval_batches(self.test)
        self.val_loader = eval_batches(self.val) if self.val is not None else None
        # The LR here is a placeholder: the schedule (or the range test) sets it every step.
        self.weight_decay = recipe.weight_decay_for(training)
        self.optimizer = make_optimizer(training.optimizer, self.model, 0.0, self.weight_decay,
                                        training.bias_lr_scale, training.decay_exempt, fused=fused_on(self.device),
                                        momentum=training.momentum, train_steps=self.frozen_later(training),
                                        muon_lr_scale=training.muon_lr_scale)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=training.label_smoothing)

    def frozen_later(self, training):
        """{parameter: the steps it trains for} for the parameters that stop training early."""
        if not training.whiten_bias_epochs:
            return {}
        biases = whitening_biases(self.model)
        if not biases:
            raise UserError("--whiten-bias-epochs freezes a frozen whitening layer's bias, and this model has none: "
                            "drop it")
        return dict.fromkeys(biases, training.whiten_bias_epochs * len(self.train_loader))
