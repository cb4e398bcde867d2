"""What the range-test figure shows: its y-range keeps the raw loss's dip and drops the diverging tail."""

import numpy as np

from core.report import plots


def test_range_test_frame_holds_the_raw_dip_but_not_the_diverging_tail(tmp_path, monkeypatch):
    lrs = np.geomspace(1e-4, 10, 50)
    smoothed = np.concatenate([np.linspace(2.3, 1.5, 40), np.linspace(1.6, 40.0, 10)])
    raw = smoothed + np.where(np.arange(50) == 38, -0.6, 0.0)  # one raw step far below the smoothed curve
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    bounds = {"lr_max": 0.1, "lr_min": 1e-4, "method": "min_div_2"}
    plots.plot_range_test(lrs, smoothed, raw, {"min_div_2": 0.1}, bounds, None, "exp", tmp_path / "f.png")
    low, high = figures[0].axes[0].get_ylim()
    plots._pyplot().close(figures[0])
    assert low < raw.min() < smoothed.min()
    assert high < 10, "the diverging tail would squash the curve"


def test_the_time_to_accuracy_figure_draws_each_recipe_at_its_time_and_accuracy(tmp_path, monkeypatch):
    drawn = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.append(fig), real(fig, path)))
    points = [{"label": "slow", "minutes": 55.0, "acc": 91.9, "std": 0.1},
              {"label": "fast", "minutes": 6.5, "acc": 90.7},
              {"label": "small", "minutes": 7.0, "acc": 56.4, "std": 1.2}]
    plots.plot_time_to_accuracy(points, tmp_path / "t.png", "title", zoom_above=88)
    full, zoom = drawn[0].axes
    assert full.get_xscale() == zoom.get_xscale() == "log"
    markers = [[bar.lines[0].get_xydata().tolist() for bar in ax.containers] for ax in (full, zoom)]
    assert markers == [[[[55.0, 91.9]], [[6.5, 90.7]], [[7.0, 56.4]]], [[[55.0, 91.9]], [[6.5, 90.7]]]]
    assert [t.get_text() for t in full.get_legend().get_texts()] == ["slow", "fast", "small"]
    assert (tmp_path / "t.png").stat().st_size > 0
