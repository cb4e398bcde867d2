"""Train the racing net: airbench94's layout and recipe (frozen 2x2 patch whitening, three conv
groups, a triangular LR, Lookahead, alternating flips), written on the toolkit's machinery, for
the most test accuracy per minute of training.

    python train_fast.py                       # the race's setting
    python train_fast.py --epochs 20           # a longer run
"""

import sys

from core.cli.commands import train_main


def main(argv=None):
    return train_main("fast", argv)


if __name__ == "__main__":
    sys.exit(main())
