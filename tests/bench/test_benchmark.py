"""benchmarks/throughput.py end to end on a tiny image folder: both pipelines train, and every
step-level variant runs (the figures themselves belong to the README, not to a test)."""

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import write_image_folder

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_prints_a_ratio_row_per_model(throughput, tmp_path, capsys):
    root = write_image_folder(tmp_path / "imgs", n_train=40, n_test=10)
    argv = ["--data", str(root), "--device", "cpu", "--models", "ultimus", "--batch-size", "8",
            "--steps", "2", "--warmup", "1", "--workers", "0", "--cache-dir", "none"]
    assert throughput.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ultimus |")]
    assert len(rows) == 1 and rows[0].split("|")[2].strip() == "ours"
    cells = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    ours, seed, ratio = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
    assert ratio == pytest.approx(ours / seed, abs=0.006), "the ratio is ours over the seed pipeline's, as printed"


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(sgd_impl="foreach"), dict(sgd_impl="fused"), dict(sync_each_step=True)])
def test_step_variants_train_the_model(throughput, options):
    import torch

    from core.models import MODELS

    torch.manual_seed(0)
    model = MODELS["ultimus"]()
    before = [p.detach().clone() for p in model.parameters()]
    batches = iter([(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))] * 3)
    rate = throughput.timed_steps(model, batches, torch.device("cpu"), None, warmup=1, steps=2, **options)
    assert rate > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_benchmark_refuses_a_source_without_a_train_folder(throughput, tmp_path, capsys):
    assert throughput.main(["--data", str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "no train/ folder" in err and len(err.strip().splitlines()) == 1


def test_ablation_measures_the_default_malloc_before_keeping_freed_memory(throughput, tmp_path, capsys, monkeypatch):
    root = write_image_folder(tmp_path / "imgs", n_train=40, n_test=10)
    no_compile = {k: v for k, v in throughput.VARIANTS.items() if not v.get("compile_model")}  # compiling is slow
    monkeypatch.setattr(throughput, "VARIANTS", no_compile)
    order = []
    monkeypatch.setattr(throughput, "keep_freed_memory", lambda device: order.append("keep") or True)
    real_seed_pipeline = throughput.seed_pipeline
    monkeypatch.setattr(throughput, "seed_pipeline", lambda *a: order.append("seed") or real_seed_pipeline(*a))
    argv = ["--data", str(root), "--device", "cpu", "--models", "ultimus", "--batch-size", "8", "--ablate",
            "--steps", "2", "--warmup", "1", "--workers", "0", "--cache-dir", "none"]
    assert throughput.main(argv) == 0
    rows = [line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ultimus |")]
    assert sorted(rows) == sorted([*no_compile, "ours, default malloc", "seed pipeline, freed memory kept"])
    assert order == ["seed", "keep", "seed"]  # the seeds' own figure comes from the default allocator
