"""The flags of the commands other than training: lr_range_test.py's sweep and options, and
predict.py's, each a field of a frozen dataclass as ``core.train.config`` defines them."""

import dataclasses
from typing import ClassVar

from ..flags import learning_rate, non_negative_float, positive_int, top_k_count
from ..train.config import (
    SCRIPT_DEFAULT,
    DataConfig,
    RuntimeConfig,
    bias_lr_scale_flag,
    decay_exempt_flag,
    dests,
    device_flag,
    flag,
    num_iter_flag,
)
from ..train.lr_finder import METHODS
from ..train.optim import OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """lr_range_test.py's sweep. The flags it shares with the train scripts default to None,
    which leaves the train script's value."""

    TITLE: ClassVar[str] = "range test"
    batch_size: int | None = flag(None, type=positive_int, help="default: the train script's")
    optimizer: str | None = flag(None, choices=list(OPTIMIZERS), help="default: the train script's")
    weight_decay: float | None = flag(None, type=non_negative_float, help="default: the train script's")
    bias_lr_scale: float | None = bias_lr_scale_flag(None, SCRIPT_DEFAULT)
    decay_exempt: str | None = decay_exempt_flag(None, SCRIPT_DEFAULT)
    start_lr: float = flag(1e-5, type=learning_rate, help="the LR of the sweep's first step")
    end_lr: float = flag(10.0, type=learning_rate, help="the LR of its last step")
    num_iter: int = num_iter_flag()
    mode: str = flag("exp", choices=["exp", "linear"], help="LR spacing")
    method: str | None = flag(None, choices=METHODS,
                              help="how lr_max is read off the curve (default: min_div_2 for SGD, conservative for "
                                   "Adam; see docs/lr_finder.md)")
    val: bool = flag(False, action="store_true",
                     help="record the test split's loss after each step instead; with --val-split the held-out "
                          "split's loss is recorded, --val or not")


@dataclasses.dataclass(frozen=True)
class RangeTestOptions:
    """lr_range_test.py's own options: which model, where to write, and the schedule drawing."""

    TITLE: ClassVar[str] = "options"
    model: str = flag("resnet", help="which train script's model")  # choices: the recipes, given by the parser
    out: str | None = flag(None, metavar="DIR", help="output folder (default: runs/lr-find-<model>-<timestamp>)")
    overwrite: bool = flag(False, action="store_true",
                           help="write into an --out that holds a run or another range test, replacing its "
                                "lr_finder.json and .png (with --plot-schedules: into a folder that is not empty)")
    plot_schedules: bool = flag(False, action="store_true",
                                help="only draw the triangular cyclic LR and the ResNet recipe's one-cycle LR and "
                                     "momentum")


@dataclasses.dataclass(frozen=True)
class RangeTestConfig:
    """lr_range_test.py's whole configuration, by concern."""

    options: RangeTestOptions
    data: DataConfig
    sweep: SweepConfig
    runtime: RuntimeConfig

    @classmethod
    def from_flags(cls, values):
        return cls(**{f.name: f.type(**{d: values[d] for d in dests(f.type)}) for f in dataclasses.fields(cls)})

    def flags(self):
        """Every flag as {dest: value}, the plain values lr_finder.json records."""
        return {k: v for f in dataclasses.fields(self) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """predict.py's flags."""

    TITLE: ClassVar[str] = "options"
    images: tuple = flag(None, positional=True, nargs="+", metavar="IMAGE_OR_FOLDER",
                         help="image files, or folders searched recursively for them; any size and mode: converted "
                              "to RGB and, unless 32x32, resized to 32x32 with antialiasing (bicubic)")
    checkpoint: str = flag(None, required=True, metavar="PATH", help="a last.pt or best.pt a training run wrote")
    topk: int = flag(3, type=top_k_count, metavar="K", help="how many classes to list per image (1-10)")
    json: bool = flag(False, action="store_true", help="print a JSON list of {{path, topk: [{{class, prob}}]}} instead")
    tta: bool = flag(False, action="store_true", help="average the logits of each image and its mirror image")
    gradcam: str | None = flag(None, metavar="DIR",
                               help="also write each image with the Grad-CAM of its top class to DIR")
    overwrite: bool = flag(False, action="store_true", help="replace Grad-CAM images already in --gradcam DIR")
    device: str = device_flag("run", resumable=False)
    batch_size: int = flag(256, type=positive_int, help="images per forward pass")

    @classmethod
    def from_flags(cls, values):
        return cls(**{**values, "images": tuple(values["images"])})
