"""Train the C1C2C3C4O net: dilated and depthwise-separable convs, no max-pooling, under 200k
parameters, albumentations-style augmentation; prints its receptive-field table.

    python train_dilated.py                          # stride-2 downsampling
    python train_dilated.py --downsample dilated     # the bonus variant: dilations instead of strides
"""

import sys

from core.cli.commands import train_main


def main(argv=None):
    return train_main("dilated", argv)


if __name__ == "__main__":
    sys.exit(main())
