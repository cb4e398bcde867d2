"""What differs between the scripts: the model, its flags, its augmentation pipeline, its defaults.

Everything else (data, engine, outputs, CLI flags) is shared, so a script is a recipe name.
"""

import functools
import inspect
from dataclasses import dataclass, field

from ..data.augment import coarse_dropout, cutout, hflip, random_crop, shift_scale_rotate, to_gray
from ..flags import below_one, non_negative_float, non_negative_int, positive_float, positive_int, probability
from ..models import MODELS
from ..models.dilated import ACTIVATIONS, C4_SIZES, FULL_CONV_COUNTS, SKIPS
from ..models.ultimus import INITS
from ..report.receptive_field import format_rf_table, receptive_field_table
from .config import RunConfig

# Each pipeline is called as pipeline(x, generator, mean, std, flip) on a batch normalized with
# the dataset's per-channel pixel-space (0..1) mean and std, which ops such as gray and the mean
# fill need. ``flip=False`` leaves out its random flip, for a loader that flips on its own
# schedule (``augment.alternating_flip``). A mirror image commutes with the other ops in
# distribution (their offsets and positions are uniform and their borders symmetric), so
# flipping first is the same.


def resnet_augment(x, generator=None, mean=None, std=None, flip=True, cutout_size=8):
    """The superconvergence assignment's transform: RandomCrop 32 (pad 4), FlipLR, Cutout 8x8.

    Cutout's fill of 0 on the normalized batch is the dataset mean colour. ``cutout_size`` 0
    leaves cutout out (Page's bag of tricks and airbench94 train without it)."""
    x = random_crop(x, padding=4, mode="reflect", generator=generator)
    if flip:
        x = hflip(x, p=0.5, generator=generator)
    return cutout(x, size=cutout_size, p=1.0, fill=0, generator=generator) if cutout_size else x


def flip_crop_augment(x, generator=None, mean=None, std=None, flip=True, crop_padding=0):
    """A horizontal flip, after a random crop with reflect padding ``crop_padding`` where it is
    above 0: light augmentation for small nets (Ultimus, which underfits, trains best on flips
    alone; it cropped with padding 4 before)."""
    x = random_crop(x, padding=crop_padding, mode="reflect", generator=generator)  # 0: unchanged, nothing drawn
    return hflip(x, p=0.5, generator=generator) if flip else x


def dilated_augment(x, generator=None, mean=None, std=None, flip=True, rotate_limit=15.0, shift_limit=0.0625,
                    ssr_p=0.3, dropout_p=0.3, gray_p=0.1):
    """The dilated-net assignment's albumentations set: HorizontalFlip, ShiftScaleRotate,
    CoarseDropout of one 16x16 hole in the mean colour, ToGray, each with probability ``*_p``.

    Rotations default to within 15 degrees rather than albumentations' 45, whose full strength
    held the small net's train accuracy below its test accuracy (docs/lab/results.md)."""
    stats = dict(mean=mean, std=std)
    if flip:
        x = hflip(x, p=0.5, generator=generator)
    x = shift_scale_rotate(x, shift_limit=shift_limit, rotate_limit=rotate_limit, p=ssr_p, generator=generator,
                           **stats)
    x = coarse_dropout(x, max_holes=1, max_height=16, max_width=16, min_holes=1, min_height=16,
                       min_width=16, fill="mean", p=dropout_p, generator=generator, **stats)
    return to_gray(x, p=gray_p, generator=generator, **stats)


def receptive_field_report(model):
    return format_rf_table(receptive_field_table(model))


# The crop's padding as a flag of a recipe whose pipeline is flip_crop_augment.
CROP_PADDING = ("--crop-padding", dict(type=int, choices=range(9), metavar="PIXELS",
                                       help="reflect padding of the random crop (0-8; 0: no crop, flips only)"))

# airbench94's weight decay of 0.0153 per 1,024 images under Nesterov momentum 0.85 shrinks each
# weight by 0.0153 / (1 + 1 / 0.15) per step at the peak LR, 1.5 here: as a multiple of the LR.
AIRBENCH_DECAY = 0.0153 / (1 + 1 / 0.15) / 1.5

TRICKS = dict(whiten=True, ghost_batch=32, freeze_bn_scale=True, bias_lr_scale=64.0, celu_alpha=0.3)


@dataclass(frozen=True)
class Recipe:
    name: str  # model registry key, run-folder prefix, script suffix
    augment: object  # pipeline(x, generator, mean, std, flip) on a normalized batch (see above)
    description: str
    defaults: dict = field(default_factory=dict)
    # (flag, argparse keywords): each flag's dest is a keyword of the model's constructor, whose
    # default is the flag's (flag_groups), so the script and the Python API cannot drift apart.
    model_flags: tuple = ()
    # (flag, argparse keywords): each flag's dest is a keyword of ``augment``, likewise.
    augment_flags: tuple = ()
    # name -> {dest: value}: a measured set of flag values that --preset NAME applies at once
    presets: dict = field(default_factory=dict)
    # model -> a table printed after the model summary and saved as <model_table_name>.txt (the dilated
    # net's receptive field)
    model_table: object = None
    model_table_name: str = ""
    # --optimizer -> the weight decay it trains with unless --weight-decay is given: SGD's decay,
    # Adam's L2 (divided by each weight's gradient scale) and AdamW's decoupled decay (multiplied by
    # the LR) act at scales orders of magnitude apart, so one number cannot serve all three.
    weight_decay: dict = field(default_factory=dict)

    @property
    def script(self):
        return f"train_{self.name}.py"

    def weight_decay_for(self, training):
        """--weight-decay where the ``TrainingConfig`` gives it, else the default for its --optimizer."""
        given = training.weight_decay
        return self.weight_decay[training.optimizer] if given is None else given

    def flag_groups(self):
        """(title, [(flag, argparse keywords)]) for the augmentation's and the model's own flags,
        each defaulting to the keyword default of the function it feeds."""
        for title, flags, target in (("augmentation", self.augment_flags, self.augment),
                                     ("model", self.model_flags, MODELS[self.name])):
            defaults = {name: param.default for name, param in inspect.signature(target).parameters.items()}
            yield title, [(flag, dict(kwargs, default=defaults[_dest(flag)])) for flag, kwargs in flags]

    def config(self, values):
        """The ``RunConfig`` of ``values`` ({dest: value}: the parsed flags, or a checkpoint's)."""
        return RunConfig.from_flags(values, augment_dests=[_dest(f) for f, _ in self.augment_flags],
                                    model_dests=[_dest(f) for f, _ in self.model_flags])


def _dest(flag):
    return flag.lstrip("-").replace("-", "_")


RECIPES = {
    "resnet": Recipe(
        "resnet", resnet_augment,
        "Train the custom ResNet (Page's ResNet-9 layout) on CIFAR-10 with a one-cycle policy.",
        dict(epochs=24, batch_size=512, lr_max=0.4, lr_min=0.0004, optimizer="sgd", cycle_momentum=False,
             label_smoothing=0.2, tta=True),
        model_flags=(
            ("--ghost-batch", dict(type=non_negative_int, metavar="N",
                                   help="BN statistics over slices of N images while training (0: the whole batch)")),
            ("--whiten", dict(action="store_true",
                              help="the prep conv learns in a whitened basis of 3x3 patches, fitted to the training "
                                   "images (same conv and parameter count, preconditioned)")),
            ("--freeze-bn-scale", dict(action="store_true",
                                       help="keep every BN scale at 1 instead of training it (Page's bag of tricks)")),
            ("--celu-alpha", dict(type=non_negative_float, metavar="ALPHA",
                                  help="variant: CELU(ALPHA) instead of every ReLU (Page's bag of tricks: 0.3); "
                                       "0 keeps the spec's ReLU")),
            ("--logit-scale", dict(type=positive_float, metavar="S",
                                   help="multiply the logits by S (Page: 0.125 for the plain net, 1/16 = 0.0625 in "
                                        "his bag of tricks, whose BN scales stay frozen at 1)")),
        ),
        augment_flags=(
            ("--cutout-size", dict(type=int, choices=range(33), metavar="PIXELS",
                                   help="side of the square that cutout blanks in every training image (0-32; "
                                        "0: no cutout)")),
        ),
        # tricks: five items of Page's bag of tricks that paid off together; best: those plus the
        # remaining items of his code and airbench's, the highest mean measured here (docs/lab/results.md).
        presets={"tricks": TRICKS,
                 "best": dict(**TRICKS, ema_decay=0.99, flip="alternating", logit_scale=0.0625, tta_shift=2)},
        # Adam, AdamW: the validation search of issue 37 (docs/lab/lr_finder_runs.md)
        weight_decay={"sgd": 5e-4, "muon": 5e-4, "adam": 0.0, "adamw": 0.05},
    ),
    "dilated": Recipe(
        "dilated", dilated_augment,
        "Train the C1C2C3C4O net (dilated and depthwise-separable convs, no max-pooling, <200k params).",
        # C3-C4 at 8x8, milder augmentation, C2 separable and wider, no decay on the BN, bias and
        # depthwise weights: the validation searches' choices (docs/lab/results.md#the-dilated-net)
        dict(epochs=50, batch_size=256, lr_max=0.2, lr_min=0.0002, optimizer="sgd", cycle_momentum=False,
             label_smoothing=0.1, tta=True, decay_exempt="bias-norm-depthwise"),
        model_flags=(
            ("--downsample", dict(choices=["strided", "dilated"],
                                  help="downsample with stride-2 convs, or keep 32x32 and grow dilations")),
            ("--width", dict(type=positive_int, help="channel width of the first block")),
            ("--c4-size", dict(type=int, choices=C4_SIZES, metavar="PIXELS",
                               help="side of C4's feature maps: 4 (C1-C3 stride), 8 (C1 and C2 do) or 16 (C1 alone); "
                                    "the dilated variant dilates to match")),
            ("--skips", dict(type=int, choices=SKIPS, metavar="N",
                             help="identity skips per block: 1 (around its second conv) or 2 (also around its third, "
                                  "where that conv keeps the size); the same parameters")),
            ("--activation", dict(choices=sorted(ACTIVATIONS),
                                  help="the nonlinearity after every BN")),
            ("--se-reduction", dict(type=non_negative_int, metavar="R",
                                    help="end each block with squeeze-and-excitation, its bottleneck R times "
                                         "narrower than the block (0: off; 16 with --width 32 --full-convs 5 stays under 200k "
                                         "parameters, at the default width it does not)")),
            ("--full-convs", dict(type=int, choices=FULL_CONV_COUNTS, metavar="N",
                                  help="how many of the twelve convs, from the input on, are full 3x3 convs; the "
                                       "rest are depthwise-separable, which frees parameters for --width (0-11; 0, a "
                                       "separable first conv, has diverged under bf16 at the default LR: "
                                       "use --amp off or a lower --lr-max)")),
        ),
        augment_flags=(
            ("--rotate-limit", dict(type=non_negative_float, metavar="DEGREES",
                                    help="shift-scale-rotate turns by up to this many degrees (albumentations: 45)")),
            ("--shift-limit", dict(type=below_one, metavar="FRACTION",
                                   help="shift-scale-rotate moves by up to this fraction of the side on each axis "
                                        "(albumentations: 0.0625, 2 pixels)")),
            ("--ssr-p", dict(type=probability, metavar="P",
                             help="probability of shift-scale-rotate per image")),
            ("--dropout-p", dict(type=probability, metavar="P",
                                 help="probability of the 16x16 coarse dropout hole per image")),
            ("--gray-p", dict(type=probability, metavar="P",
                              help="probability of turning an image gray")),
        ),
        model_table=receptive_field_report, model_table_name="receptive_field",
        weight_decay=dict.fromkeys(("sgd", "muon", "adam", "adamw"), 5e-4),  # only SGD's searched
    ),
    "ultimus": Recipe(
        "ultimus", flip_crop_augment,
        "Train the Ultimus attention net (3 convs, GAP, 4 attention blocks) on CIFAR-10.",
        # chosen on validation data (docs/lab/results.md#ultimus-the-exact-architecture): a peak LR
        # above the range test's conservative 0.003, and flips without crops for a net that underfits
        dict(epochs=24, batch_size=512, lr_max=0.01, lr_min=0.001, optimizer="adam", cycle_momentum=True,
             label_smoothing=0.0, tta=False),
        model_flags=(
            ("--residual", dict(action="store_true",
                                help="variant: a skip connection around each Ultimus block (default: exact architecture)")),
            ("--init", dict(choices=INITS,
                            help="how the conv and linear weights are drawn: PyTorch's default, or He, Glorot or "
                                 "orthogonal with the gain of what follows (ReLU after the convs), zero biases")),
        ),
        augment_flags=(CROP_PADDING,),
        # residual: the --residual variant's own recipe, chosen on validation data
        # (docs/lab/results.md#ultimus-with---residual); the exact net's own search chose a peak of
        # 0.01 and collapsed at 0.03, so the defaults stay its recipe
        presets={"residual": dict(residual=True, init="kaiming", lr_max=0.02, lr_min=0.002)},
        weight_decay=dict.fromkeys(("sgd", "muon", "adam", "adamw"), 0.0),  # an underfitting net: none
    ),
    "fast": Recipe(
        "fast", functools.partial(flip_crop_augment, crop_padding=2),
        "Train the racing net (airbench94's layout: frozen patch whitening, three conv groups) on CIFAR-10 for the "
        "most accuracy per minute.",
        # airbench94's hyper-parameters, for a loss averaged over the batch rather than summed: its
        # peak LR of 11.5 per 1,024 images with Nesterov momentum 0.85 is 1.5, and its triangle
        # runs from 0.2 to 0.07 of that. Muon trains the filters, as in airbench94_muon; it and the
        # epochs were chosen on validation data (docs/lab/results.md#the-racing-net-train_fastpy).
        # It evaluates after the last epoch alone.
        dict(epochs=9, batch_size=1024, lr_max=1.5, lr_min=0.3, lr_end=0.105, optimizer="muon", momentum=0.85,
             cycle_momentum=False, bias_lr_scale=64.0, whiten_bias_epochs=3, label_smoothing=0.2, lookahead=True,
             flip="alternating", tta=True, tta_shift=1, eval_every=0),
        model_flags=(
            ("--logit-scale", dict(type=positive_float, metavar="S", help="multiply the logits by S")),
        ),
        augment_flags=(CROP_PADDING,),
        weight_decay={"sgd": AIRBENCH_DECAY, "muon": AIRBENCH_DECAY, "adam": 0.0, "adamw": 0.05},
    ),
}
