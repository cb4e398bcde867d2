"""Kernels and host syncs per training step of a recipe's defaults, by torch.profiler.

A step that syncs the host (a ``.item()``, a GradScaler reading its overflow flag) drains the
GPU's queue, and the kernels per step bound how fast a small model can go on a fast GPU, where
each launch costs a few microseconds. ``--top N`` adds the N ops (kernels, on CUDA) that take
the most of a step's time: what to make faster, and whether a net is bound by its convs or by
the memory traffic of its BN and activations. Prints one JSON line (``--json``) or a short report.

    python benchmarks/profile_step.py --data PATH --device cuda [--steps 10] [--top 8] [train flags...]
"""

import itertools
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli.parsers import ArgumentParser, build_train_parser  # noqa: E402
from core.device import make_scaler  # noqa: E402
from core.flags import non_negative_int, positive_int  # noqa: E402
from core.train.engine import synchronize, train_step  # noqa: E402
from core.train.recipes import RECIPES  # noqa: E402
from core.train.schedule import one_cycle_for_recipe  # noqa: E402
from core.train.setup import BuiltRun  # noqa: E402

# CUDA runtime calls that block the host until the device catches up (a device-to-host copy
# for .item() shows as cudaMemcpyAsync followed by cudaStreamSynchronize).
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def profile_steps(run, steps, warmup=3, top=0):
    """Kernels, host syncs, CPU-side ops and wall time per step over ``steps`` profiled steps of
    ``run`` (a ``BuiltRun``), and with ``top`` the ``top`` ops of most self time (``top_ops``)."""
    # a cycle as long as the profiled steps (one "epoch" a step): the schedule's cost is the step's
    schedule = one_cycle_for_recipe(run.optimizer, 0.1, 0.001, warmup + steps + 1, 1, 1)
    scaler = make_scaler(run.device, run.amp_dtype)
    batches = (batch for _ in itertools.count() for batch in run.train_loader)  # as many epochs as it takes

    def step():
        x, y = next(batches)
        train_step(run.model, run.optimizer, run.loss_fn, x, y, run.device, run.amp_dtype, scaler)
        schedule.step()

    for _ in range(warmup):
        step()
    synchronize(run.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(run.device)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(1 for e in events if e.name in SYNC_CALLS)
    ops = sum(1 for e in events if e.name.startswith("aten::"))
    # the one synchronize after the last step is the profiler's own, not the step's
    syncs = max(syncs - (1 if run.device.type == "cuda" else 0), 0)
    result = {"steps": steps, "kernels_per_step": kernels / steps, "host_syncs_per_step": syncs / steps,
              "aten_ops_per_step": ops / steps, "wall_ms_per_step": wall_ms}
    return {**result, "top_ops": top_ops(prof, run.device, steps, wall_ms, top)} if top else result


def top_ops(prof, device, steps, wall_ms, n):
    """The ``n`` ops of most self time, each as its ms per step and share of the step's wall time:
    device time on CUDA (where the kernels are the ops that take it), CPU time elsewhere. Self
    time, not total, so that a parent (a backward node, a conv calling its kernel) does not count
    its children's time again: the shares then add up to at most the whole step."""
    def self_ms(event):
        return (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1e3 / steps

    ranked = sorted(prof.key_averages(), key=self_ms, reverse=True)[:n]
    return [{"op": e.key, "ms_per_step": self_ms(e), "share": self_ms(e) / wall_ms} for e in ranked if self_ms(e) > 0]


def build_parser():
    """This script's own flags; the rest of the command line is the train script'run."""
    p = ArgumentParser(prog="profile_step.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(RECIPES), default="resnet")
    p.add_argument("--steps", type=positive_int, default=10, help="profiled steps, after 3 unprofiled ones")
    p.add_argument("--top", type=non_negative_int, default=0, metavar="N",
                   help="also list the N ops (kernels, on CUDA) of most self time per step")
    p.add_argument("--json", action="store_true", help="one JSON line instead of a report")
    return p


def main(argv=None):
    own, train_argv = build_parser().parse_known_args(argv)
    recipe = RECIPES[own.model]
    values, _ = build_train_parser(recipe).parse_with_given(train_argv)  # the rest: the train script's flags
    result = {"model": own.model, **profile_steps(BuiltRun(recipe, recipe.config(values)), own.steps, top=own.top)}
    if own.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        if key != "top_ops":
            print(f"{key}: {value}")
    for op in result.get("top_ops", []):
        print(f"  {op['share']:6.1%} {op['ms_per_step']:9.2f} ms/step  {op['op']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
