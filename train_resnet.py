"""Train the custom ResNet on CIFAR-10: 24 epochs, batch 512, one-cycle peaking at epoch 5.

    python train_resnet.py                       # official CIFAR-10, downloaded to ./data
    python train_resnet.py --data cifar10.tar.gz # a local copy
"""

import sys

from core.cli import build_train_parser, run_cli
from core.recipes import RECIPES
from core.trainer import run_training


def main(argv=None):
    recipe = RECIPES["resnet"]
    return run_cli(lambda args: run_training(recipe, args), argv, build_train_parser(recipe))


if __name__ == "__main__":
    sys.exit(main())
