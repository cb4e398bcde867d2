"""The race: airbench94 and train_fast.py, alternately, on the same decoded images, device and threads.

Each run is a fresh process, timed by the wall clock from its start to its exit: data onto the
device, training, and the final evaluation with test-time augmentation (airbench94's own, mirror
plus one-pixel translation). Both read the uint8 arrays this toolkit decodes from --data, so
both see the same pixels. The rounds alternate (airbench94, then ours, per seed), so a machine
that slows down mid-race slows both.

airbench (Keller Jordan, PyPI ``airbench==0.1.8``) is an optional benchmark dependency:

    pip install airbench==0.1.8
    python benchmarks/race_airbench.py --data PATH --device cpu --seeds 0 1 2 -- --epochs 8

Arguments after ``--`` go to train_fast.py. On CUDA airbench94 runs as published. On a CPU it
needs what a CPU needs, and nothing else changes: its weights stay fp32 (published: fp16) with
the forward pass under bf16 autocast where the CPU has fast bf16 (logits and loss in fp32), its
tensors on the CPU, its images held in fp32 (fp16 arithmetic is emulated on CPUs), and a wall
clock in place of CUDA events. It evaluates once, at the end (its per-epoch evaluation is a log
line outside its own timer); so does ours here (``--eval-every`` at the epoch count).
"""

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli.parsers import ArgumentParser, run_cli  # noqa: E402
from core.device import cpu_has_fast_bf16  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.flags import seed_value  # noqa: E402
from core.train.config import DataConfig  # noqa: E402
from core.train.setup import load_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install airbench==0.1.8"


def require_airbench():
    try:
        import airbench  # noqa: F401
    except ImportError:
        raise UserError(f"the race needs airbench, a benchmark-only dependency: {INSTALL}") from None


def write_airbench_data(ds, folder):
    """The decoded splits as airbench's CifarLoader reads them: train.pt and test.pt, each
    {'images': uint8 (N, H, W, C), 'labels', 'classes'}."""
    for name, split in (("train", ds.train), ("test", ds.test)):
        images = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 2, 3, 1)))
        torch.save({"images": images, "labels": torch.from_numpy(split.labels).long(),
                    "classes": list(ds.classes)}, Path(folder) / f"{name}.pt")


class WallClockEvent:
    """torch.cuda.Event's timing interface, on the wall clock, for airbench's timer on a CPU."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return 1000 * (end.t - self.t)


@contextlib.contextmanager
def on_the_cpu(utils, data_folder):
    """airbench94 patched for the CPU (module docstring), for the duration: its loader on the CPU
    in fp32, its CUDA timer on the wall clock, and its net's .half().cuda() left out (the weights
    stay fp32 on the CPU; ``autocast_net`` gives the bf16 forward pass)."""
    published_loader = utils.CifarLoader

    class CpuLoader(published_loader):
        def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None,
                     altflip=False, gpu=0):
            super().__init__(str(data_folder), train, batch_size, aug, drop_last, shuffle, altflip, gpu="cpu")
            self.images = self.images.float()

    patches = [(utils, "CifarLoader", CpuLoader), (torch.cuda, "Event", WallClockEvent),
               (torch.cuda, "synchronize", lambda *a, **k: None),
               (nn.Module, "half", lambda self: self), (nn.Module, "cuda", lambda self, *a, **k: self)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def autocast_net(net, amp_dtype):
    """``net`` (an nn.Sequential) with its forward pass under CPU autocast, logits in fp32."""

    class AutocastNet(type(net)):
        def forward(self, x):
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                return super().forward(x).float()

    net.__class__ = AutocastNet
    return net


def run_airbench(args):
    """One airbench94 run in this process: its accuracy with TTA and its own timer's seconds."""
    from airbench import lib_airbench94, utils

    torch.manual_seed(args.seed)
    if args.device == "cuda":
        loader = utils.CifarLoader(args.airbench_data, train=True, batch_size=1024, aug=lib_airbench94.hyp["aug"],
                                   altflip=True)
        model = lib_airbench94.train94(loader, run=args.seed, verbose=False)
        test = utils.CifarLoader(args.airbench_data, train=False, batch_size=2000)
        acc = utils.evaluate(model, test, tta_level=lib_airbench94.hyp["net"]["tta_level"])
        torch.cuda.synchronize()
        return {"test_acc": 100 * acc}
    amp_dtype = torch.bfloat16 if cpu_has_fast_bf16() else None
    with on_the_cpu(utils, args.airbench_data):
        loader = utils.CifarLoader("cifar10", train=True, batch_size=1024, aug=lib_airbench94.hyp["aug"],
                                   altflip=True)
        model = lib_airbench94.train94(loader, make_net=lambda: autocast_net(lib_airbench94.make_net94(), amp_dtype),
                                       run=args.seed, verbose=False)
        test = utils.CifarLoader("cifar10", train=False, batch_size=2000)
        acc = utils.evaluate(model, test, tta_level=lib_airbench94.hyp["net"]["tta_level"])
    return {"test_acc": 100 * acc, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"}


def timed(command):
    """Run ``command``; its exit status and wall-clock seconds from start to exit."""
    start = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT).returncode
    return code, time.perf_counter() - start


def race(args, fast_args):
    require_airbench()
    out = Path(args.out)
    if (out / "race.json").exists() and not args.overwrite:
        raise UserError(f"{out} already holds a race (race.json): choose another --out, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    ds = load_data(DataConfig(data=args.data, cache_dir=args.cache_dir), need_train=True, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        write_airbench_data(ds, folder)  # before the clocks start: both read decoded arrays
        for seed in args.seeds:
            result = out / f"airbench94-seed{seed}.json"
            code, wall = timed([sys.executable, __file__, "--airbench-run", "--airbench-data", folder,
                                "--data", args.data, "--device", args.device, "--seed", str(seed), "--out", str(result)])
            if code:
                raise UserError(f"the airbench94 run with seed {seed} failed (exit {code})")
            rows.append({"contender": "airbench94", "seed": seed, "wall_s": wall, **json.loads(result.read_text())})
            print(f"airbench94   seed {seed}: {rows[-1]['test_acc']:.2f}% in {wall:.1f} s", flush=True)
            run_out = out / f"fast-seed{seed}"
            code, wall = timed([sys.executable, "train_fast.py", "--data", args.data, "--device", args.device,
                                "--seed", str(seed), "--out", str(run_out), "--no-progress", "--overwrite",
                                *(["--cache-dir", args.cache_dir] if args.cache_dir else []), *fast_args])
            if code:
                raise UserError(f"the train_fast.py run with seed {seed} failed (exit {code})")
            metrics = json.loads((run_out / "metrics.json").read_text())
            rows.append({"contender": "train_fast.py", "seed": seed, "wall_s": wall,
                         "test_acc": metrics["final_test_acc"], "epochs": len(metrics["history"])})
            print(f"train_fast.py seed {seed}: {rows[-1]['test_acc']:.2f}% in {wall:.1f} s", flush=True)
    summary = {name: {key: float(np.mean([r[key] for r in rows if r["contender"] == name])) for key in
                      ("test_acc", "wall_s")} for name in ("airbench94", "train_fast.py")}
    ratio = summary["train_fast.py"]["wall_s"] / summary["airbench94"]["wall_s"]
    (out / "race.json").write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(),
                                               "fast_args": fast_args, "runs": rows, "mean": summary,
                                               "time_ratio": ratio}, indent=2) + "\n")
    print("\n| contender | runs | mean test accuracy | mean wall time per run |\n|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {len(args.seeds)} | {s['test_acc']:.2f}% | {s['wall_s']:.1f} s |")
    print(f"train_fast.py takes {ratio:.2f}x airbench94's wall time; {out / 'race.json'}")
    return 0


def build_parser():
    p = ArgumentParser(prog="benchmarks/race_airbench.py", description=__doc__.splitlines()[0])
    p.add_flag("options", ["--data"], default=None, required=True, help="the CIFAR-10 source both contenders train on")
    p.add_flag("options", ["--device"], default="cpu", choices=["cpu", "cuda"], help="where both run")
    p.add_flag("options", ["--seeds"], type=seed_value, nargs="+", default=[0, 1, 2],
               help="one round per seed: airbench94, then train_fast.py")
    p.add_flag("options", ["--out"], default="runs/race", help="folder for race.json and each run's outputs")
    p.add_flag("options", ["--overwrite"], action="store_true", default=False, help="replace an earlier race there")
    p.add_part(DataConfig, only=("cache_dir",))
    # What the parent hands one airbench94 process.
    p.add_flag("internal", ["--airbench-run"], action="store_true", default=False, help=argparse.SUPPRESS)
    p.add_flag("internal", ["--airbench-data"], default=None, help=argparse.SUPPRESS)
    p.add_flag("internal", ["--seed"], type=seed_value, default=0, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ours, fast_args = argv[:split], argv[split + 1:]

    def entry(values, given):
        args = argparse.Namespace(**values)
        if args.airbench_run:
            Path(args.out).write_text(json.dumps(run_airbench(args)) + "\n")
            return 0
        return race(args, fast_args)

    return run_cli(entry, ours, build_parser())


if __name__ == "__main__":
    sys.exit(main())
