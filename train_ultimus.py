"""Train the Ultimus attention net (25,786 parameters) with Adam and a one-cycle policy.

    python train_ultimus.py              # the exact architecture of the assignment
    python train_ultimus.py --residual   # variant: a skip connection around each block
    python train_ultimus.py --preset residual   # the variant with its own recipe (docs/results.md)
"""

import sys

from core.cli.commands import train_main


def main(argv=None):
    return train_main("ultimus", argv)


if __name__ == "__main__":
    sys.exit(main())
