"""Choosing the device and the mixed-precision mode, and the autocast context for a step."""

import contextlib
import ctypes
import functools
import sys

import torch

from .errors import UserError


def pick_device(name="auto"):
    """'auto' takes CUDA, then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    if name not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device {name}: unknown device; choose auto, cuda, mps or cpu")
    return torch.device(name)


# glibc's mallopt() parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory(device):
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves every buffer above 32 MiB with a fresh mmap and unmaps it on free.
    A ResNet batch of 512 holds several 64 MiB activations, so every step would fault in and
    zero hundreds of MiB of new pages. Keeping them trains faster with the same numbers out, at
    the price of a larger resident size (docs/performance.md measures both). GPU memory is
    untouched: this does nothing off Linux or off the CPU. Returns whether the setting took.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def autotune_convolutions(device):
    """On CUDA, let cuDNN time its convolution algorithms on the first batch of each shape and
    keep the fastest, as airbench and Page's code do. A run here feeds a few fixed shapes (the
    training batch, the evaluation batch, the last partial one), so the search is paid once per
    shape. The choice may differ between runs, so CUDA runs are not bit-reproducible; nor are
    they without it, since some cuDNN backward kernels are nondeterministic. Returns whether it
    was turned on.
    """
    if device.type != "cuda":
        return False
    torch.backends.cudnn.benchmark = True
    return True


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16():
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls beat fp32 by a wide margin."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_has_native_bf16(device):
    """True on Ampere and later (compute capability 8.0+) and on ROCm GPUs.

    Not ``torch.cuda.is_bf16_supported()``: by default that also counts emulation, so it answers
    True on a T4 (7.5), which has no bf16 hardware. The T4 wants fp16 with loss scaling instead.
    """
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def pick_amp(mode, device):
    """Resolve --amp to None (fp32), torch.bfloat16 or torch.float16 for ``device``.

    'auto' takes bf16 where the hardware runs it fast and it needs no loss scaling (Ampere+
    GPUs, AMX CPUs), fp16 with a GradScaler on older GPUs such as the T4, and fp32 elsewhere.
    """
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        if device.type == "cpu":
            raise UserError("--amp fp16 is for GPUs; on the CPU use --amp bf16 or off")
        return torch.float16
    if mode != "auto":
        raise UserError(f"--amp {mode}: unknown mode; choose auto, bf16, fp16 or off")
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device, amp_dtype):
    """Autocast for ``amp_dtype``, or a no-op context when training in fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def make_scaler(device, amp_dtype):
    """A GradScaler only for fp16, whose narrow exponent range needs loss scaling."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
