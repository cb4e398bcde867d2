"""Classify image files with a trained checkpoint: the top-k classes and their probabilities.

    python predict.py --checkpoint runs/resnet-.../best.pt cat.jpg photos/
    python predict.py --checkpoint best.pt --topk 10 --json --tta img.png
    python predict.py --checkpoint best.pt --gradcam cams/ photos/   # and where the evidence is
"""

import sys

from core.cli.commands import predict_main


def main(argv=None):
    return predict_main(argv)


if __name__ == "__main__":
    sys.exit(main())
