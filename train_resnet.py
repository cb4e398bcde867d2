"""Train the custom ResNet on CIFAR-10: 24 epochs, batch 512, one-cycle peaking at epoch 5.

    python train_resnet.py                        # official CIFAR-10, downloaded to ./data
    python train_resnet.py --data cifar10.tar.gz  # a local copy
    python train_resnet.py --lr-max find          # LR range test first, then train with its bounds
"""

import sys

from core.cli.commands import train_main


def main(argv=None):
    return train_main("resnet", argv)


if __name__ == "__main__":
    sys.exit(main())
