"""Draw the time-to-accuracy figure from the measured runs that docs/lab/time_to_accuracy.json
lists (each with its command, machine, seeds and source), for docs and the README.

    python benchmarks/plot_time_to_accuracy.py    # writes docs/images/time_to_accuracy.png
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.report.plots import plot_time_to_accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(source=ROOT / "docs" / "lab" / "time_to_accuracy.json", out=ROOT / "docs" / "images" / "time_to_accuracy.png"):
    figures = json.loads(Path(source).read_text())
    points = [{"label": f"{p['label']} (n = {p['n']})", "minutes": p["minutes"], "acc": p["acc"],
               "std": p.get("std")} for p in figures["points"]]
    plot_time_to_accuracy(points, out, figures["title"], zoom_above=figures.get("zoom_above"))
    print(f"{len(points)} recipes drawn to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
