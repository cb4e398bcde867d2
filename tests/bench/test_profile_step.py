"""benchmarks/profile_step.py --top: the costliest ops of a real (tiny) training step, ranked by
self time, so that a parent op does not count its children again and the shares fit within the
step's wall time."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import profile_step  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dilated", "ultimus"])
def test_top_ops_rank_a_steps_own_time(batches_dir, cache, capsys, model):
    argv = ["--model", model, "--steps", "2", "--top", "6", "--json", "--data", str(batches_dir),
            "--cache-dir", str(cache), "--device", "cpu", "--batch-size", "16"]
    assert profile_step.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    top = result["top_ops"]
    assert len(top) == 6
    times = [op["ms_per_step"] for op in top]
    assert times == sorted(times, reverse=True) and times[-1] > 0
    # self times fit within the step's wall time; totals would count a backward node, the conv
    # under it and its kernel each in full, well past the whole step
    assert 0 < sum(op["share"] for op in top) <= 1
    assert all(op["share"] == pytest.approx(op["ms_per_step"] / result["wall_ms_per_step"]) for op in top)
    # a conv net's step is spent in its convolutions (forward or backward) among others
    assert any("convolution" in op["op"] for op in top)


def test_without_top_the_profile_lists_no_ops(batches_dir, cache, capsys):
    argv = ["--model", "ultimus", "--steps", "1", "--json", "--data", str(batches_dir), "--cache-dir", str(cache),
            "--device", "cpu", "--batch-size", "16"]
    assert profile_step.main(argv) == 0
    assert "top_ops" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
