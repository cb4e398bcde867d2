"""Training throughput of our engine against the assignments' pipeline, same model, same device.

The seeds' pipeline: torchvision ImageFolder + DataLoader with per-sample transforms (crop with
reflect padding, flip, a fixed 8x8 erase as cutout), in fp32. Ours: uint8 images on the device,
per-batch tensor augmentation, AMP and channels_last as ``--amp auto`` picks, and on the CPU
glibc told to keep freed memory (``keep_freed_memory``). Both time the same optimizer steps
after a warm-up, data loading included, and print a table with the ratio.

    python benchmarks/throughput.py --data PATH/cifar10-jpeg --device cpu
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli.parsers import ArgumentParser, run_cli  # noqa: E402
from core.data.loader import DeviceLoader, channel_stats  # noqa: E402
from core.device import autotune_convolutions, keep_freed_memory, make_scaler, pick_amp, pick_device  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.flags import positive_int  # noqa: E402
from core.models import MODELS  # noqa: E402
from core.train.config import DataConfig, RuntimeConfig  # noqa: E402
from core.train.engine import synchronize, train_step  # noqa: E402
from core.train.recipes import RECIPES  # noqa: E402
from core.train.setup import load_data  # noqa: E402


def timed_steps(model, batches, device, amp_dtype, warmup, steps, sgd_impl="default", sync_each_step=False):
    """Images per second over ``steps`` optimizer steps after ``warmup`` untimed ones.
    ``sgd_impl``: torch's default, 'foreach' or 'fused'; ``sync_each_step`` reads the loss on the
    host after every step, as a per-step ``.item()`` would."""
    impl = {"default": {}, "foreach": dict(foreach=True), "fused": dict(fused=True)}[sgd_impl]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, **impl)
    scaler = make_scaler(device, amp_dtype)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    images, start = 0, None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, _ = train_step(model, optimizer, loss_fn, x, y, device, amp_dtype, scaler)
        if sync_each_step:
            loss.item()
        if i >= warmup:
            images += len(y)
        if i + 1 == warmup + steps:
            break
    synchronize(device)
    return images / (time.perf_counter() - start)


def cycle(loader):
    while True:
        yield from loader


def seed_pipeline(args, name, device, mean, std):
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
        transforms.RandomErasing(p=1.0, scale=(64 / 1024, 64 / 1024), ratio=(1.0, 1.0), value=0),
    ])
    dataset = datasets.ImageFolder(str(Path(args.data) / "train"), tf)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    model = MODELS[name]().to(device)
    return timed_steps(model, cycle(loader), device, None, args.warmup, args.steps)


def our_pipeline(args, name, device, train, mean, std, amp="auto", channels_last=True, compile_model=False,
                 **step_options):
    amp_dtype = pick_amp(amp, device)
    loader = DeviceLoader(train, device, args.batch_size, mean, std, train=True, augment=RECIPES[name].augment,
                          order_generator=torch.Generator().manual_seed(0),
                          aug_generator=torch.Generator(device).manual_seed(1), channels_last=channels_last)
    model = MODELS[name]().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    return timed_steps(model, cycle(loader), device, amp_dtype, args.warmup, args.steps, **step_options), amp_dtype


# Our pipeline with one optimization taken away (or added) at a time, for --ablate.
VARIANTS = {
    "ours": dict(),
    "ours, no channels_last": dict(channels_last=False),
    "ours, fp32": dict(amp="off"),
    "ours, fp32, no channels_last": dict(amp="off", channels_last=False),
    "ours + torch.compile": dict(compile_model=True),
    "ours, foreach SGD": dict(sgd_impl="foreach"),
    "ours, fused SGD": dict(sgd_impl="fused"),
    "ours, host sync every step": dict(sync_each_step=True),
}


def build_parser():
    p = ArgumentParser(prog="benchmarks/throughput.py", description=__doc__.splitlines()[0])
    p.add_flag("options", ["--data"], default=None, required=True,
               help="an image-folder root with train/<class>/ (the seeds' ImageFolder needs one)")
    p.add_flag("options", ["--models"], nargs="+", default=["resnet"], choices=sorted(RECIPES),
               help="models to measure")
    p.add_flag("options", ["--device"], default="auto", choices=["auto", "cuda", "mps", "cpu"],
               help="where both pipelines train; auto takes CUDA, then MPS, then the CPU")
    p.add_flag("options", ["--ablate"], action="store_true", default=False,
               help="also measure ours without channels_last, in fp32, with torch.compile, with foreach or "
                    "fused SGD, with a host sync every step and with glibc's default malloc, and the seed "
                    "pipeline with freed memory kept")
    p.add_flag("options", ["--batch-size"], type=positive_int, default=512,
               help="training batch size of both pipelines")
    p.add_flag("options", ["--steps"], type=positive_int, default=20, help="timed optimizer steps per pipeline")
    p.add_flag("options", ["--warmup"], type=positive_int, default=3, help="untimed steps first")
    p.add_flag("options", ["--workers"], type=int, default=2, help="DataLoader workers for the seed pipeline")
    p.add_part(DataConfig, only=("cache_dir",))
    p.add_part(RuntimeConfig, only=("no_progress",))
    return p


def main(argv=None):
    return run_cli(lambda values, given: benchmark(argparse.Namespace(**values)), argv, build_parser())


def benchmark(args):
    if not (Path(args.data) / "train").is_dir():
        raise UserError(f"{args.data} has no train/ folder: the seed pipeline needs an unpacked image folder")
    device = pick_device(args.device)
    autotune_convolutions(device)  # for both pipelines alike
    ds = load_data(DataConfig(data=args.data, cache_dir=args.cache_dir), need_train=True, progress=not args.no_progress)
    mean, std = channel_stats(ds.train.images)
    rows, seed = [], {}
    # First everything that runs on glibc's default malloc, as the seeds did: keep_freed_memory
    # cannot be undone within a process, so it comes second.
    for name in args.models:
        torch.manual_seed(0)
        seed[name] = seed_pipeline(args, name, device, mean, std)
        print(f"{name}: seed pipeline {seed[name]:.1f} images/s", flush=True)
        if args.ablate:
            ours, amp_dtype = our_pipeline(args, name, device, ds.train, mean, std)
            rows.append((name, "ours, default malloc", seed[name], ours, amp_dtype))
            print(f"{name}: ours, default malloc {ours:.1f} images/s", flush=True)
    memory_kept = keep_freed_memory(device)
    if memory_kept and args.ablate:
        for name in args.models:
            torch.manual_seed(0)
            kept = seed_pipeline(args, name, device, mean, std)
            rows.append((name, "seed pipeline, freed memory kept", seed[name], kept, None))
            print(f"{name}: seed pipeline, freed memory kept {kept:.1f} images/s", flush=True)
    for name in args.models:
        for variant in list(VARIANTS) if args.ablate else ["ours"]:
            ours, amp_dtype = our_pipeline(args, name, device, ds.train, mean, std, **VARIANTS[variant])
            rows.append((name, variant, seed[name], ours, amp_dtype))
            print(f"{name}: {variant} {ours:.1f} images/s", flush=True)
    print(f"\ndevice: {device}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up")
    print("| model | pipeline | AMP | images/s | seed pipeline (fp32, DataLoader) images/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, variant, seed_rate, ours, amp_dtype in sorted(rows, key=lambda row: args.models.index(row[0])):
        amp = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
        print(f"| {name} | {variant} | {amp} | {ours:.1f} | {seed_rate:.1f} | {ours / seed_rate:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
