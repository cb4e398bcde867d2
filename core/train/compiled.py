"""torch.compile for a run: one graph for training and one for evaluation, nothing more.

A run calls its model on two shapes only (the training batch, which drops its last ragged one,
and the evaluation batch, to which ``engine.evaluate`` pads its last one), always channels-last,
so a graph per mode (train and eval) covers it. Compiling with ``dynamic=False`` keeps it so: by
default a second batch size would make torch recompile with symbolic shapes.
"""

import torch

COMPILE_MODES = {
    "default": "Inductor's kernels",
    "reduce-overhead": "also CUDA graphs, which cut the per-step launch overhead on GPUs",
    "max-autotune": "also autotuned matmul and conv kernels (minutes to compile)",
}


def compile_model(model, mode):
    """``model`` compiled in --compile's ``mode`` (a key of COMPILE_MODES)."""
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
