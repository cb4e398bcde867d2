"""benchmarks/race_airbench.py's own parts: the refusal without airbench, the data it hands
airbench, and the CPU adaptation's clock and autocast (the race itself needs airbench and a
whole dataset, so it is a benchmark, not a test)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from core.data.dataset import load_dataset
from tests.conftest import one_error_line

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import race_airbench as race  # noqa: E402


def test_without_airbench_the_race_stops_in_one_line_saying_how_to_install_it(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "airbench", None)  # import airbench now raises ImportError
    assert race.main(["--data", str(data), "--out", str(tmp_path / "race"), "--cache-dir", "none"]) == 1
    assert "pip install airbench==0.1.8" in one_error_line(capsys)
    assert not (tmp_path / "race").exists()


def test_airbench_reads_the_same_pixels_and_labels_the_toolkit_decoded(data, tmp_path):
    ds = load_dataset(data, cache_dir=None, progress=False)
    race.write_airbench_data(ds, tmp_path)
    for name, split in (("train", ds.train), ("test", ds.test)):
        saved = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert saved["images"].dtype == torch.uint8 and saved["classes"] == list(ds.classes)
        # airbench's loader turns (N, H, W, C) into (N, C, H, W) with permute(0, 3, 1, 2)
        assert np.array_equal(saved["images"].permute(0, 3, 1, 2).numpy(), split.images)
        assert np.array_equal(saved["labels"].numpy(), split.labels)


def test_the_wall_clock_event_times_as_cuda_events_do_in_milliseconds(monkeypatch):
    ticks = iter([10.0, 10.25])
    monkeypatch.setattr(race, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    start, end = race.WallClockEvent(enable_timing=True), race.WallClockEvent(enable_timing=True)
    start.record()
    end.record()
    assert start.elapsed_time(end) == pytest.approx(250.0)


def test_the_autocast_net_keeps_airbenchs_indexing_and_names_and_returns_fp32_logits():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    names = [name for name, _ in net.named_parameters()]
    wrapped = race.autocast_net(net, torch.bfloat16)
    assert wrapped[0] is net[0] and [name for name, _ in wrapped.named_parameters()] == names
    captured = []
    wrapped[0].register_forward_hook(lambda module, inputs, output: captured.append(output.dtype))
    logits = wrapped(torch.randn(2, 3, 8, 8))
    assert logits.dtype == torch.float32 and captured == [torch.bfloat16]
