"""Device and AMP selection, including the CUDA branches, which run here with torch.cuda mocked."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import device as dev
from core.errors import UserError


@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((7, 0), torch.float16)])
def test_auto_amp_on_cuda_takes_bf16_only_where_it_is_native(monkeypatch, capability, expected):
    """A100/H100 get bf16; a T4 (7.5) or V100 (7.0) gets fp16, although torch's own
    is_bf16_supported() answers True there (it counts emulation), as it does on a real T4."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a mocked GPU")  # bf16's warning names it
    monkeypatch.setattr(torch.version, "hip", None)
    assert dev.pick_amp("auto", torch.device("cuda")) is expected
    assert dev.pick_amp("fp16", torch.device("cuda")) is torch.float16
    assert dev.pick_amp("bf16", torch.device("cuda")) is torch.bfloat16  # asked for: granted, even emulated


def test_cudnn_autotuning_is_turned_on_for_cuda_runs_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # and restored afterwards
    assert not dev.autotune_convolutions(torch.device("cpu")) and not torch.backends.cudnn.benchmark
    assert not dev.autotune_convolutions(torch.device("mps")) and not torch.backends.cudnn.benchmark
    assert dev.autotune_convolutions(torch.device("cuda")) and torch.backends.cudnn.benchmark


def test_a_run_on_a_t4_trains_in_fp16_with_cudnn_autotuning(monkeypatch):
    """What a run's setup picks on Colab's T4, with torch.cuda answering as a real one does."""
    from argparse import Namespace

    from core.train.setup import pick_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    device, amp_dtype = pick_runtime(Namespace(device="auto", amp="auto"))
    assert (device.type, amp_dtype, torch.backends.cudnn.benchmark) == ("cuda", torch.float16, True)


def test_auto_amp_on_cpu_follows_the_bf16_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: True)
    assert dev.pick_amp("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: False)
    assert dev.pick_amp("auto", cpu) is None
    assert dev.pick_amp("off", cpu) is None and dev.pick_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match="fp16 is for GPUs"):
        dev.pick_amp("fp16", cpu)


def test_only_fp16_gets_an_active_grad_scaler():
    assert not dev.make_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()
    assert not dev.make_scaler(torch.device("cpu"), None).is_enabled()


def test_auto_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dev.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dev.pick_device("auto").type == "cpu"


def test_asking_for_a_missing_gpu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        dev.pick_device("cuda")


def test_autocast_is_a_no_op_in_fp32():
    with dev.autocast(torch.device("cpu"), None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with dev.autocast(torch.device("cpu"), torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


# A step that allocates and frees two 64 MiB buffers, as a training step does its activations
# (one buffer alone is a poor model: its exact-size hole is a few bytes short of the next aligned
# request, while neighbours freed together coalesce). Prints the page faults of three steps taken
# after ten warm-up steps, by when the heap has settled (as a training run's does, in about ten).
_FAULTS_PER_STEP = """
import resource, sys, torch
from core.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(torch.device("cpu"))
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    a = torch.ones(64 << 20, dtype=torch.uint8)
    b = torch.ones(64 << 20, dtype=torch.uint8)
    del a, b
for _ in range(10):
    step()
before = faults()
for _ in range(3):
    step()
print(faults() - before)
"""


def _faults(setting):
    done = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP, setting], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what is tuned")
def test_keep_freed_memory_reuses_big_buffers_instead_of_faulting_in_new_pages():
    pages = 3 * 2 * (64 << 20) // 4096
    default, kept = _faults("default"), _faults("keep")
    assert default > pages // 2  # glibc maps fresh pages for each big buffer...
    assert kept < pages // 100  # ...and with the setting reuses the freed ones


def test_keep_freed_memory_leaves_gpu_runs_alone():
    assert not dev.keep_freed_memory(torch.device("cuda"))
    assert not dev.keep_freed_memory(torch.device("mps"))
