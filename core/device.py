"""Choosing the device and the mixed-precision mode, and the autocast context for a step."""

import contextlib
import ctypes
import functools
import os
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


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    """Inside the block, with ``enabled``: cuDNN picks deterministic kernels without timing them,
    and torch refuses any op that has no deterministic implementation, so a CUDA run repeats
    bit for bit and an interrupted one resumes exactly. cuBLAS needs a fixed workspace for that;
    its setting is read when the first cuBLAS handle is made, so this must come before any CUDA
    work. The previous settings come back after the block (they are the process's, not the run's)."""
    if not enabled:
        yield
        return
    was_enabled = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn
    was_cudnn = (cudnn.deterministic, cudnn.benchmark)
    had_workspace = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled)
        cudnn.deterministic, cudnn.benchmark = was_cudnn
        if not had_workspace:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def autotune_convolutions(device):
    """On CUDA, let cuDNN time its convolution algorithms on the first batch of each shape and
    keep the fastest, as airbench and Page's code do. A run here feeds a few fixed shapes (the
    training batch, the evaluation batch, the last partial one), so the search is paid once per
    shape. The choice may differ between runs, so CUDA runs are not bit-reproducible; nor are
    they without it, since some cuDNN backward kernels are nondeterministic (--deterministic
    turns both off: ``deterministic_algorithms``). Returns whether it was turned on: never
    under ``deterministic_algorithms``.
    """
    if device.type != "cuda" or torch.are_deterministic_algorithms_enabled():  # --deterministic
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


# The first torch releases whose MPS backend runs each mode: autocast to bf16 came in 2.6, to
# fp16 in 2.5, and the GradScaler that fp16 training needs in 2.8. An older torch would turn
# autocast off with a warning and train in fp32 while the run said otherwise.
MPS_AMP_SINCE = {"bf16": (2, 6), "fp16": (2, 8)}


def torch_release(version=None):
    """(major, minor) of ``version`` (default: the installed torch), ignoring local tags."""
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_amp_support(mode, device, version=None):
    """Refuse, in one line, a mode the installed torch cannot run on ``device``; warn where the
    GPU would run it without hardware support. ``version`` stands in for torch's, for tests."""
    if device.type == "mps" and torch_release(version) < MPS_AMP_SINCE[mode]:
        need = ".".join(map(str, MPS_AMP_SINCE[mode]))
        raise UserError(f"--amp {mode} on MPS needs torch {need} or newer (this is {version or torch.__version__}): "
                        f"upgrade torch, or use --amp off")
    if mode == "bf16" and device.type == "cuda" and not cuda_has_native_bf16(device):
        name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        print(f"warning: --amp bf16 on {name} (compute capability {major}.{minor}, below 8.0): this GPU has no "
              f"native bf16, so it will be slow or fail; --amp fp16 (or auto) is what it runs fast", file=sys.stderr)


def pick_amp(mode, device):
    """Resolve --amp to None (fp32), torch.bfloat16 or torch.float16 for ``device``.

    'auto' takes bf16 where the hardware runs it fast and it needs no loss scaling (Ampere+
    GPUs, AMX CPUs), fp16 with a GradScaler on older GPUs such as the T4, and fp32 elsewhere.
    """
    if mode == "off":
        return None
    if mode == "bf16":
        check_amp_support(mode, device)
        return torch.bfloat16
    if mode == "fp16":
        if device.type == "cpu":
            raise UserError("--amp fp16 is for GPUs; on the CPU use --amp bf16 or off")
        check_amp_support(mode, device)
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
