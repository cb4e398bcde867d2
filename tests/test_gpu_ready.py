"""What a first CUDA or MPS run would hit, caught on the CPU: host syncs in an fp16 step, the
compile count, the mixed-precision checks per device, determinism, and one serialization per
checkpoint save."""

import functools
import os

import numpy as np
import pytest
import torch
from torch import nn

import train_ultimus
from core.data.dataset import Split
from core.data.loader import DeviceLoader
from core.device import autotune_convolutions, check_amp_support, deterministic_algorithms, pick_amp, torch_release
from core.errors import UserError
from core.runs import checkpoint
from core.train import loop
from core.train.engine import train_epoch
from core.train.optim import fused_on, make_optimizer
from core.train.schedule import one_cycle_for_recipe
from tests.conftest import ctrl_c_in_second_epoch, epoch_figures, metrics, tiny_run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(cifar):
    return cifar(200, 110)


tiny = functools.partial(tiny_run, lr=(0.01, 0.001))


def host_reads_in_an_fp16_epoch(fused, steps, monkeypatch):
    """How often the host reads a tensor (``item``, ``bool``) in an fp16 epoch of ``steps`` steps
    with loss scaling, the mode --amp auto takes on a T4 or V100."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    optimizer = make_optimizer("adam", model, 0.0, 0.0, fused=fused)
    images = np.random.default_rng(0).integers(0, 255, (16 * steps, 3, 32, 32), dtype=np.uint8)
    loader = DeviceLoader(Split(images, np.arange(16 * steps) % 10), CPU, 16, [0.5] * 3, [0.25] * 3, train=True,
                          order_generator=torch.Generator().manual_seed(0))
    schedule = one_cycle_for_recipe(optimizer, 1e-2, 1e-3, 2, len(loader), 1)
    reads = []
    item, as_bool = torch.Tensor.item, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (reads.append(1), item(self))[1])
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: (reads.append(1), as_bool(self))[1])
    train_epoch(model, loader, optimizer, schedule, nn.CrossEntropyLoss(), CPU, torch.float16,
                torch.amp.GradScaler("cpu"), progress=False, log_every=10 ** 9)
    monkeypatch.undo()
    return len(reads)


@pytest.mark.slow
def test_an_fp16_step_with_the_fused_optimizer_never_syncs_the_host(monkeypatch):
    """The fused optimizers take the GradScaler's overflow flag on the device; the per-tensor ones
    make GradScaler.step read it on the host every step (the CUDA path uses the fused ones)."""
    assert host_reads_in_an_fp16_epoch(True, 3, monkeypatch) == host_reads_in_an_fp16_epoch(True, 7, monkeypatch)
    assert host_reads_in_an_fp16_epoch(False, 7, monkeypatch) > host_reads_in_an_fp16_epoch(False, 3, monkeypatch)


def test_cuda_runs_take_the_fused_optimizers_and_cpu_runs_keep_theirs():
    assert fused_on(torch.device("cuda")) and not fused_on(CPU) and not fused_on(torch.device("mps"))
    assert make_optimizer("sgd", nn.Linear(2, 2), 0.1, 0.0, fused=True).defaults["fused"] is True


@pytest.mark.parametrize("mode, old, new", [("fp16", "2.7.1", "2.8.0"), ("bf16", "2.5.1+cpu", "2.6.0")])
def test_mixed_precision_on_mps_names_the_torch_it_needs(mode, old, new):
    mps = torch.device("mps")
    with pytest.raises(UserError, match=f"--amp {mode} on MPS needs torch {new[:3]} or newer"):
        check_amp_support(mode, mps, version=old)
    check_amp_support(mode, mps, version=new)
    check_amp_support(mode, CPU, version=old)  # the CPU's autocast is older than any supported torch
    assert torch_release("2.10.0a0+git123") == (2, 10)


def test_bf16_on_a_gpu_without_native_bf16_warns_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_amp("bf16", torch.device("cuda")) == torch.bfloat16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Tesla T4" in err[0] and "7.5" in err[0] and "--amp fp16" in err[0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    pick_amp("bf16", torch.device("cuda"))
    assert not capsys.readouterr().err


def test_deterministic_mode_holds_inside_the_block_only(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.backends.cudnn.benchmark
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not autotune_convolutions(torch.device("cuda")) and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.slow
def test_a_deterministic_run_is_kept_deterministic_on_resume(data, tmp_path, monkeypatch):
    seen = []
    real = loop.train

    def probe(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train", probe)
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_ultimus.main(tiny(data, tmp_path / "run", "--deterministic")) == 130
    assert train_ultimus.main(["--resume", str(tmp_path / "run" / "last.pt"), "--no-progress"]) == 0
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def counting_compile(monkeypatch):
    """torch.compile with a backend that runs the traced graph as it is and counts each one it is
    handed: every compilation, including every recompilation."""
    graphs = []
    real = torch.compile

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def compile_counted(model, mode=None, dynamic=None):
        return real(model, backend=backend, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile_counted)
    torch._dynamo.reset()
    return graphs


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--ema-decay", "0.9")])
def test_compile_builds_one_graph_for_training_and_one_for_evaluation(data, tmp_path, monkeypatch, extra):
    """110 test images in batches of 100 leave a ragged last one, and shift TTA adds crops: each
    would have made a graph of its own."""
    graphs = counting_compile(monkeypatch)
    out = tmp_path / "run"
    assert train_ultimus.main(tiny(data, out, "--compile", "--eval-batch-size", "100", "--tta", "--tta-shift", "2",
                                   *extra)) == 0
    assert len(graphs) == 2
    plain = tmp_path / "plain"
    assert train_ultimus.main(tiny(data, plain, "--eval-batch-size", "100", "--tta", "--tta-shift", "2", *extra)) == 0
    a, b = metrics(out), metrics(plain)
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]
    torch._dynamo.reset()


@pytest.mark.slow
def test_each_save_serializes_once_and_best_pt_shares_last_pts_file(data, tmp_path, monkeypatch):
    saves = []
    real = torch.save
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: (saves.append(1), real(obj, f))[1])
    out = tmp_path / "run"
    assert train_ultimus.main(tiny(data, out, epochs=3)) == 0
    assert len(saves) == 1 + 3  # the start, and once an epoch
    best_epoch = max(metrics(out)["history"], key=lambda h: h["test_acc"])["epoch"]
    last, best = out / "last.pt", out / "best.pt"
    if best_epoch == 3:
        assert os.path.samefile(last, best)
    assert checkpoint.load_checkpoint(best, "ultimus")["epoch"] == best_epoch


@pytest.mark.slow
def test_save_every_writes_last_pt_less_often_and_resumes_from_the_last_written(data, tmp_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_ultimus.main(tiny(data, straight, epochs=3)) == 0
    with ctrl_c_in_second_epoch(monkeypatch):
        assert train_ultimus.main(tiny(data, resumed, "--save-every", "2", epochs=3)) == 130
    assert "holds the state after epoch 0" in capsys.readouterr().err  # epoch 1 was not written
    assert checkpoint.load_checkpoint(resumed / "last.pt", "ultimus")["epoch"] == 0
    assert train_ultimus.main(["--resume", str(resumed / "last.pt"), "--no-progress"]) == 0
    assert epoch_figures(straight) == epoch_figures(resumed)
