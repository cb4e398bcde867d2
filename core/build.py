"""What a run is built from its flags: the device, the data, the model, the loaders, the
optimizer. A training run, a range test and ``--eval-only`` all build through here, so each
sees the same model and the same batches for the same flags."""

import functools
import os
import platform
import time

import numpy as np
import torch
from torch import nn

from .data import DEFAULT_CACHE, Split, load_dataset
from .device import autotune_convolutions, keep_freed_memory, pick_amp, pick_device
from .ema import WeightEMA
from .errors import UserError
from .loader import DeviceLoader, balanced_subset, channel_stats
from .models import build_model
from .models.whitening import fit_whitening
from .outputs import check_folder
from .summary import summary_table


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


def take(split, n, num_classes):
    """The fixed class-balanced first ``n`` images of ``split`` (all of them for None)."""
    idx = balanced_subset(split.labels, n, num_classes)
    return Split(split.images[idx], split.labels[idx])


def hold_out(split, n, num_classes):
    """``split`` as (training, validation): the fixed class-balanced first ``n`` images of it are
    the validation set (None for 0), the rest trains. The choice depends on ``n`` and the data
    alone, so every seed and every recipe is compared on the same held-out images."""
    if not n:
        return split, None
    if n >= len(split.labels):
        raise UserError(f"--val-split {n} leaves no training images out of {len(split.labels)}: lower it or "
                        f"enlarge --train-subset")
    held = np.zeros(len(split.labels), dtype=bool)
    held[balanced_subset(split.labels, n, num_classes)] = True
    return Split(split.images[~held], split.labels[~held]), Split(split.images[held], split.labels[held])


def run_images(train, train_subset, val_split, num_classes):
    """(training, validation) images of a run: its --train-subset of ``train``, less the
    --val-split held out of those. Training and --eval-only both take them here, so a
    checkpoint's flags find its run's images again."""
    return hold_out(take(train, train_subset, num_classes), val_split, num_classes)


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


def _activation_elements(model, batch_size):
    """The elements every module's output holds for one training batch, traced on the meta
    device; 0 for a model whose forward pass the meta device cannot trace."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor) and not list(module.children()):
            total += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        model.train()(torch.empty(batch_size, 3, 32, 32, device="meta"))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return 0
    finally:
        for hook in hooks:
            hook.remove()
    return total


def check_model_fits(recipe, flags, num_classes, device, batch_size):
    """Refuse in one line, before anything is allocated, a model that its flags make too large to
    build or to train on ``device``. It is built on the meta device (shapes, no memory), and what
    training must hold at the least (fp32 weights, their gradients and momentum, and one batch's
    activations) is held against the device's whole memory: a lower bound, so nothing that fits
    is refused."""
    sizes = ", ".join(f"--{dest.replace('_', '-')} {value}" for dest, value in recipe.model_kwargs(flags).items()
                      if isinstance(value, int) and not isinstance(value, bool))
    try:
        with torch.device("meta"):
            model = build_model(recipe.name, num_classes=num_classes, **recipe.model_kwargs(flags))
    except (RuntimeError, OverflowError, TypeError, ValueError, MemoryError) as exc:
        raise UserError(f"the {recipe.name} model cannot be built with {sizes} ({exc.__class__.__name__}): "
                        f"lower them") from None
    params = sum(p.numel() for p in model.parameters())
    need = 4 * (3 * params + _activation_elements(model, batch_size))
    total = device_memory(device)
    if total is not None and need > total:
        raise UserError(f"the {recipe.name} model with {sizes} and --batch-size {batch_size} needs at least "
                        f"{need / 2**30:,.1f} GiB ({params:,} parameters, their gradients and momentum, one batch's "
                        f"activations), more than the {total / 2**30:,.1f} GiB of {device.type}: lower them")


def make_model(recipe, flags, classes, device):
    """The recipe's model for ``flags`` (a dict: the parsed flags, or a checkpoint's) with one
    output per class, on ``device``."""
    return build_model(recipe.name, num_classes=len(classes), **recipe.model_kwargs(flags)).to(device)


# --decay-exempt's choices: which parameters train without weight decay. Biases and norm
# weights (every 1-D parameter) shift and scale activations rather than match patterns, and
# timm's recipes leave them undecayed; a depthwise filter has only nine weights, and MobileNet's
# authors advise little or no decay on them.
DECAY_EXEMPT = ("none", "bias-norm", "bias-norm-depthwise")


def decay_exempt_params(model, exempt):
    """The parameters --decay-exempt ``exempt`` leaves out of weight decay."""
    if exempt not in DECAY_EXEMPT:
        raise ValueError(f"exempt must be one of {DECAY_EXEMPT}, not {exempt!r}")
    if exempt == "none":
        return []
    params = [p for p in model.parameters() if p.ndim <= 1]
    if exempt == "bias-norm-depthwise":
        params += [m.weight for m in model.modules()
                   if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    return params


def param_groups(model, weight_decay, bias_lr_scale=1.0, decay_exempt="none"):
    """The trainable parameters in groups of one LR multiple and one weight decay each, in the
    order their first parameter comes in the model: all in one group by default.

    A bias (BN shifts, the FC bias) is not followed by a normalization, so unlike a conv weight
    its LR sets how fast it moves in units of the activations. Page's bag of tricks trains them
    at 64x the LR (``bias_lr_scale``) with weight decay divided by 64, which keeps their decay per
    step unchanged. ``decay_exempt`` (DECAY_EXEMPT) trains some parameters with no decay at all.
    Each group's ``lr_scale`` is the multiple of the schedule's LR that it trains at.
    """
    exempt = {id(p) for p in decay_exempt_params(model, decay_exempt)}
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr_scale = bias_lr_scale if name.endswith("bias") else 1.0
            decay = 0.0 if id(p) in exempt else weight_decay / lr_scale
            groups.setdefault((lr_scale, decay), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr_scale": lr_scale}
            for (lr_scale, decay), params in groups.items()]


# --optimizer's choices: Adam adds the weight decay to the gradient (L2), AdamW to the step
# (decoupled, so it does not pass through Adam's per-parameter scaling).
OPTIMIZERS = {"sgd": "SGD with Nesterov momentum 0.9", "adam": "Adam (weight decay as L2)",
              "adamw": "AdamW (decoupled weight decay)"}


def make_optimizer(name, model, lr, weight_decay, bias_lr_scale=1.0, decay_exempt="none", fused=False):
    """``fused``: one kernel for the whole update, which also reads fp16's overflow flag on the
    device, so a GradScaler step needs no host sync (``fused_on``)."""
    groups = param_groups(model, weight_decay, bias_lr_scale, decay_exempt)
    extra = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, **extra)
    return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr, **extra)


def fused_on(device):
    """Whether a run on ``device`` takes the fused optimizers: on CUDA, where they are fastest
    and where fp16's GradScaler would otherwise read ``found_inf`` on the host every step. Not on
    the CPU, where the defaults' figures were measured with the per-tensor (foreach) updates, nor
    on MPS, whose fused kernels arrived in later torch releases than this toolkit supports."""
    return device.type == "cuda"


def plain_batches(args, split, device, mean, std, batch_size=None):
    """``split`` in order and un-augmented, laid out as the model is: what evaluation and
    --recalibrate-bn read, in batches of ``batch_size`` (default --eval-batch-size)."""
    return DeviceLoader(split, device, batch_size or args.eval_batch_size, mean, std, train=False,
                        channels_last=args.channels_last)


def bn_images(args, train, num_classes, device, mean, std, batch_size):
    """The un-augmented training images that --recalibrate-bn re-estimates BN statistics on, in
    batches of ``batch_size``: the training batch size, which the batch statistics depend on."""
    return plain_batches(args, take(train, args.recalibrate_bn, num_classes), device, mean, std, batch_size)


class Setup:
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
        self.test = take(self.ds.test, args.test_subset, len(self.ds.classes))
        if len(self.train.labels) < args.batch_size:
            raise UserError(f"--batch-size {args.batch_size} exceeds the {len(self.train.labels)} training images: "
                            f"lower it or enlarge --train-subset")
        self.mean, self.std = channel_stats(self.train.images)
        check_model_fits(recipe, vars(args), len(self.ds.classes), self.device, args.batch_size)
        self.model = make_model(recipe, vars(args), self.ds.classes, self.device)
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
        self.report = recipe.report(self.model) if recipe.report else None
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
