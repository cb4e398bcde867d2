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
from ..device import autotune_convolutions, keep_freed_memory, pick_amp, pick_device
from ..errors import UserError
from ..models import MODELS
from ..models.whitening import fit_whitening
from ..report.summary import summary_table
from ..runs.outputs import check_folder
from .ema import WeightEMA
from .optim import fused_on, make_optimizer


def load_data(args, need_train, data=None):
    """The dataset --data names (``data`` in its place, when given), through the --cache-dir cache;
    without either, the official download in ./data."""
    data = data or args.data
    cache = None if args.cache_dir == "none" else (args.cache_dir or DEFAULT_CACHE)
    if args.cache_dir not in (None, "none"):
        check_folder(args.cache_dir, "--cache-dir")
    return load_dataset(data or "./data", need_train=need_train, download=data is None, cache_dir=cache,
                        progress=not args.no_progress)


def pick_runtime(args):
    """The device and autocast dtype the flags ask for, with the allocator and cuDNN set up for it."""
    device = pick_device(args.device)
    keep_freed_memory(device)
    autotune_convolutions(device)
    return device, pick_amp(args.amp, device)


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


def check_model_fits(recipe, flags, num_classes, device):
    """Refuse in one line, before anything is allocated, a model that its flags make too large to
    build or to train on ``device``: it is built on the meta device (shapes, no memory), and its
    fp32 weights, their gradients and momentum are held against the device's whole memory, a
    lower bound of what training needs, so nothing that fits is refused."""
    sizes = ", ".join(f"--{dest.replace('_', '-')} {value}" for dest, value in recipe.model_kwargs(flags).items()
                      if isinstance(value, int) and not isinstance(value, bool))
    try:
        with torch.device("meta"):
            model = MODELS[recipe.name](num_classes=num_classes, **recipe.model_kwargs(flags))
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


def make_model(recipe, flags, classes, device):
    """The recipe's model for ``flags`` (a dict: the parsed flags, or a checkpoint's) with one
    output per class, on ``device``."""
    return MODELS[recipe.name](num_classes=len(classes), **recipe.model_kwargs(flags)).to(device)


def plain_batches(args, split, device, mean, std, batch_size=None):
    """``split`` in order and un-augmented, laid out as the model is: what evaluation and
    --recalibrate-bn read, in batches of ``batch_size`` (default --eval-batch-size)."""
    return DeviceLoader(split, device, batch_size or args.eval_batch_size, mean, std, train=False,
                        channels_last=args.channels_last)


def bn_images(args, train, num_classes, device, mean, std, batch_size):
    """The un-augmented training images that --recalibrate-bn re-estimates BN statistics on, in
    batches of ``batch_size``: the training batch size, which the batch statistics depend on."""
    return plain_batches(args, balanced_split(train, args.recalibrate_bn, num_classes), device, mean, std, batch_size)


class BuiltRun:
    """Everything a training run or a range test builds from the flags, in one place. The order
    of the steps is part of the result: the model's initialization draws from the seeded torch
    generator, so building it earlier or later would train other weights."""

    def __init__(self, recipe, args):
        self.device, self.amp_dtype = pick_runtime(args)
        torch.manual_seed(args.seed)
        self.order_gen = torch.Generator().manual_seed(args.seed)
        self.aug_gen = torch.Generator(self.device).manual_seed(args.seed + 1)
        start = time.perf_counter()
        self.ds = load_data(args, need_train=True)
        self.data_load_s = time.perf_counter() - start
        self.train, self.val = run_images(self.ds.train, args.train_subset, args.val_split, len(self.ds.classes))
        self.test = balanced_split(self.ds.test, args.test_subset, len(self.ds.classes))
        if len(self.train.labels) < args.batch_size:
            raise UserError(f"--batch-size {args.batch_size} exceeds the {len(self.train.labels)} training images: "
                            f"lower it or enlarge --train-subset")
        self.mean, self.std = channel_stats(self.train.images)
        check_model_fits(recipe, vars(args), len(self.ds.classes), self.device)
        self.model = make_model(recipe, vars(args), self.ds.classes, self.device)
        check_batch_fits(self.model, self.device, args.batch_size)
        first_flips = None
        if args.flip == "alternating":  # drawn from the seed alone, so a resumed run draws them again
            first_flips = torch.rand(len(self.train.labels), generator=torch.Generator().manual_seed(args.seed)) < 0.5
        self.train_loader = DeviceLoader(self.train, self.device, args.batch_size, self.mean, self.std, train=True,
                                         augment=functools.partial(recipe.augment, **recipe.augment_kwargs(vars(args))),
                                         order_generator=self.order_gen,
                                         aug_generator=self.aug_gen, channels_last=args.channels_last,
                                         first_flips=first_flips)
        fit_whitening(self.model, self.train_loader)
        self.summary, self.params = summary_table(self.model)
        self.model_table = recipe.model_table(self.model) if recipe.model_table else None
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # After the layout change, which makes new tensors: the average follows these ones.
        self.ema = WeightEMA(self.model, args.ema_decay) if args.ema_decay else None
        self.test_loader = plain_batches(args, self.test, self.device, self.mean, self.std)
        self.val_loader = None
        if self.val is not None:
            self.val_loader = plain_batches(args, self.val, self.device, self.mean, self.std)
        # The LR here is a placeholder: the schedule (or the range test) sets it every step.
        self.weight_decay = recipe.weight_decay_for(vars(args))
        self.optimizer = make_optimizer(args.optimizer, self.model, 0.0, self.weight_decay,
                                        args.bias_lr_scale, args.decay_exempt, fused=fused_on(self.device))
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
