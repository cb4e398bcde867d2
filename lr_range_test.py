"""Leslie Smith's LR range test on any of the toolkit's models: which one-cycle bounds to use.

    python lr_range_test.py --model resnet --data cifar10.tar.gz
    python lr_range_test.py --plot-schedules --out DIR    # draw the cyclic and one-cycle curves

Writes lr_finder.json and lr_finder.png to --out, prints the suggestions and the train command
that uses them. The model and data pipeline are the train script's own.
"""

import sys

from core.cli.commands import range_test_main


def main(argv=None):
    return range_test_main(argv)


if __name__ == "__main__":
    sys.exit(main())
