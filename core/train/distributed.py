"""Data-parallel training under torchrun: which process this is, the process group, and the few
collectives a run needs beyond DistributedDataParallel's own gradient average.

What a W-process run is, exactly: every process holds the whole dataset and draws the same batch
(one permutation per epoch, each image augmented from the run's seed alone), then trains on its
share, the r-th of W equal slices. DDP averages the gradients, so a step equals one process's
step on the whole batch with BatchNorm over W "ghost" slices: each process normalizes over its
own share. The BatchNorm running statistics, which each process updates from its own share, are
averaged at the end of every epoch; they are linear in the share statistics, so the average is
what one process with ghost BatchNorm would hold. ``--sync-bn`` normalizes over the whole batch
instead (CUDA only: torch's SyncBatchNorm has no CPU kernels).
"""

import contextlib
import dataclasses
import datetime
import inspect
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..device import pick_device
from ..errors import UserError

# How long a collective waits for a process that never joins it before the job fails. torchrun
# stops the job within seconds of a process dying; this bounds the case where one hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
# DDP's switch for its per-step broadcast of rank 0's buffers, renamed in torch 2.14
NO_BUFFER_SYNC = next(name for name in ("forward_sync_buffers", "broadcast_buffers")
                      if name in inspect.signature(DistributedDataParallel).parameters)


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in a torchrun job: ``rank`` of ``size`` processes, ``local_rank`` on
    its machine (the GPU it trains on). A plain ``python train_*.py`` is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls):
        """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def distributed(self):
        return self.size > 1

    @property
    def is_main(self):
        """Whether this process prints, draws progress and writes files: rank 0 alone."""
        return self.rank == 0

    def device(self, name):
        """The device --device ``name`` means for this process: under torchrun on CUDA, the GPU of
        its local rank."""
        device = pick_device(name)
        if self.distributed and device.type == "mps":
            raise UserError("torchrun: MPS is one device, so a Mac trains in one process; run "
                            "python train_<model>.py without torchrun")
        if device.type == "cuda" and self.distributed:
            if self.local_rank >= torch.cuda.device_count():
                raise UserError(f"torchrun started {self.local_rank + 1}+ processes on this machine but it has "
                                f"{torch.cuda.device_count()} GPUs: lower --nproc-per-node")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def launcher(self):
        """The command that starts a script as this job did (metrics.json keeps it): python, or
        torchrun with this job's machines and processes per machine."""
        if not self.distributed:
            return ["python"]
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", self.size))
        machines = self.size // per_machine
        return ["torchrun", *([f"--nnodes={machines}"] if machines > 1 else ["--standalone"]),
                f"--nproc-per-node={per_machine}"]

    def sum(self, tensor):
        """``tensor`` summed over every process (in place), for figures of the whole batch."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor


def refuse_under_torchrun(config, world):
    """What a torchrun job cannot do, refused in one line before anything starts."""
    training = config.training
    if training.sync_bn and not world.distributed:
        raise UserError("--sync-bn joins the BatchNorm statistics of torchrun's processes: launch with torchrun "
                        "--nproc-per-node 2 or more, or drop --sync-bn")
    if training.sync_bn and config.model.get("ghost_batch"):
        raise UserError("--sync-bn normalizes over the whole batch and --ghost-batch over slices of it: drop one")
    if not world.distributed:
        return
    if training.batch_size % world.size:
        raise UserError(f"--batch-size {training.batch_size} is the batch of the whole job and cannot be split into "
                        f"{world.size} equal shares, one per process: pick a multiple of {world.size}")
    for refused, message in (
            (config.outputs.eval_only, "--eval-only scores a checkpoint in one process: run it without torchrun"),
            (training.runs > 1, "--runs repeats whole runs: launch one torchrun job per --seed instead"),
            (training.lr_max == "find", "--lr-max find sweeps in one process: run lr_range_test.py first and pass "
                                        "its lr_finder.json with --lr-from")):
        if refused:
            raise UserError(f"under torchrun, {message}")


def warn_of_another_world(ckpt, world, batch_size, path):
    """One line when a run resumes under another number of processes than it trained with."""
    trained_on = ckpt.get("world_size", 1)  # a checkpoint from before torchrun support: one process
    if trained_on != world.size:
        print(f"warning: {path} trained on {trained_on} process(es) and continues on {world.size}: the data order "
              f"and augmentation stay, but BatchNorm's batch statistics now come from shares of "
              f"{batch_size // world.size} images instead of {batch_size // trained_on}, so it will not end as the "
              f"run that stopped would have", file=sys.stderr)


@contextlib.contextmanager
def only_rank_0_prints(world):
    """Inside, the standard output of every process but rank 0 is discarded."""
    if world.is_main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


@contextlib.contextmanager
def process_group(world, device):
    """The torchrun job's process group for the block: NCCL between GPUs, gloo on the CPU."""
    if not world.distributed:
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                            timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model, world, device):
    """``model`` for the training step: under DDP where there are several processes. The buffers
    are left to each process (``average_buffers`` joins them once an epoch), not broadcast from
    rank 0 at every step, which would train every process on rank 0's statistics."""
    if not world.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{NO_BUFFER_SYNC: False})


@torch.no_grad()
def average_buffers(modules, world):
    """Average the floating-point buffers (BatchNorm's running statistics) of ``modules`` over the
    processes, so that every process, and the checkpoint, holds those of the whole batch."""
    if not world.distributed:
        return
    buffers = [b for module in modules for b in module.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.reshape(-1).double() for b in buffers])
        dist.all_reduce(flat)
        flat /= world.size
        for b, avg in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(avg.view_as(b))


def sync_batch_norm(model):
    """Every BatchNorm of ``model`` normalizing over the whole batch across processes."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
