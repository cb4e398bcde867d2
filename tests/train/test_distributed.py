"""Data-parallel training's single-process definition, piece by piece: each process's share of a
batch, the BatchNorm statistics joined over the processes, and what torchrun refuses."""

import functools

import pytest
import torch
from conftest import synthetic_images

from core.cli.parsers import parse_run_config
from core.data.dataset import Split
from core.data.loader import DeviceLoader, channel_stats
from core.errors import UserError
from core.models.norm import GhostBatchNorm2d
from core.runs.folder import resume_command
from core.train.distributed import World, refuse_under_torchrun
from core.train.recipes import RECIPES


def loader(recipe, share, first_flips=None, batch_size=40):
    images, labels = synthetic_images(120, seed=3)
    split = Split(images, labels)
    mean, std = channel_stats(images)
    return DeviceLoader(split, torch.device("cpu"), batch_size, mean, std, train=True,
                        augment=functools.partial(RECIPES[recipe].augment), share=share,
                        order_generator=torch.Generator().manual_seed(0),
                        aug_generator=torch.Generator().manual_seed(1), first_flips=first_flips)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("world_size", [2, 4])
def test_the_shares_of_every_process_make_up_the_one_process_batch_augmentation_included(recipe, world_size):
    flips = torch.rand(120, generator=torch.Generator().manual_seed(5)) < 0.5
    for first_flips in (None, flips):
        whole = list(loader(recipe, (0, 1), first_flips))
        shares = [list(loader(recipe, (rank, world_size), first_flips)) for rank in range(world_size)]
        assert len(whole) == 3 and all(len(s) == 3 for s in shares)
        for step, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([s[step][0] for s in shares]), x)
            assert torch.equal(torch.cat([s[step][1] for s in shares]), y)
            assert all(len(s[step][1]) == 40 // world_size for s in shares)


def test_a_batch_that_does_not_split_evenly_is_refused_by_the_loader():
    with pytest.raises(ValueError, match="cannot be split into 3 equal shares"):
        loader("ultimus", (0, 3))


def test_batch_norm_over_each_share_is_ghost_batch_norm_over_the_whole_batch():
    """The per-process BatchNorm that DDP trains with, and the running statistics averaged over
    the processes (as ``average_buffers`` does), against one GhostBatchNorm2d over the batch."""
    x = torch.randn(16, 3, 4, 4) * 2 + 1
    shares = [torch.nn.BatchNorm2d(3) for _ in range(2)]
    ghost = GhostBatchNorm2d(3, ghost_batch=8)
    for bn in (*shares, ghost):
        torch.nn.init.uniform_(bn.weight)
        bn.weight.data.copy_(shares[0].weight.data)
    out = torch.cat([bn(part) for bn, part in zip(shares, x.split(8))])
    torch.testing.assert_close(out, ghost(x))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close((getattr(shares[0], name) + getattr(shares[1], name)) / 2, getattr(ghost, name))


def config(*argv, recipe="ultimus"):
    return parse_run_config(RECIPES[recipe], list(argv))


@pytest.mark.parametrize("argv, world, message", [
    (["--batch-size", "50"], World(0, 3), "--batch-size 50 is the batch of the whole job and cannot be split into 3"),
    (["--sync-bn"], World(), "--sync-bn joins the BatchNorm statistics of torchrun's processes"),
    (["--eval-only", "--resume", "x.pt"], World(1, 2), "under torchrun, --eval-only scores a checkpoint in one"),
    (["--runs", "2"], World(0, 2), "under torchrun, --runs repeats whole runs"),
    (["--lr-max", "find"], World(0, 2), "under torchrun, --lr-max find sweeps in one process: run lr_range_test.py"),
])
def test_what_torchrun_cannot_do_is_refused_in_one_line(argv, world, message):
    with pytest.raises(UserError, match="^" + message) as error:
        refuse_under_torchrun(config(*argv), world)
    assert "\n" not in str(error.value)


def test_sync_bn_and_ghost_batch_norm_are_refused_together():
    with pytest.raises(UserError, match="drop one"):
        refuse_under_torchrun(config("--sync-bn", "--ghost-batch", "32", recipe="resnet"), World(0, 2))


def test_the_world_comes_from_torchrun_s_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert World.from_env() == World() and World().is_main and not World().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert World.from_env() == World(3, 4, 1) and not World.from_env().is_main


def test_the_resume_command_of_a_torchrun_job_relaunches_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command("train_resnet.py", "runs/a/last.pt", World().launcher()) == \
        "python train_resnet.py --resume runs/a/last.pt"
    assert resume_command("train_resnet.py", "runs/a/last.pt", World(1, 2, 1).launcher()) == \
        "torchrun --standalone --nproc-per-node=2 train_resnet.py --resume runs/a/last.pt"
    assert World(3, 8, 1).launcher() == ["torchrun", "--nnodes=4", "--nproc-per-node=2"]
