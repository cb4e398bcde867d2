"""Everything a first run on a new GPU must learn, in one command that keeps going.

Each step runs as its own process, with its log and exit status kept under --out, so a step
that fails (or runs out of the time budget) is recorded and the next one still runs. At the end:
one table, and gpu_check.json with every figure.

    python benchmarks/gpu_check.py --data cifar10-jpeg.tar.gz --out gpu_check
    python benchmarks/gpu_check.py --data cifar10-jpeg.tar.gz --out X --device cpu --tiny   # CI's rehearsal

Steps: the header (GPU, capability, torch, CUDA, cuDNN); a 2-epoch subset smoke run of each
script and recipe; --eval-only with shift TTA; a 50-step range test; the full 24-epoch ResNet
recipe, timed, with its MFU; the same under each --compile mode; an interrupted-and-resumed run
against an uninterrupted one, with and without --deterministic; kernels and host syncs per step;
the throughput benchmark against the seed pipeline. Downloads nothing; needs only the packages
of requirements.txt.
"""

import json
import platform
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.cli.parsers import ArgumentParser  # noqa: E402
from core.data.sources import safe_members  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.runs.outputs import make_folder, write_json  # noqa: E402

FLOP_PER_TRAINING_IMAGE = 2.3e9  # the ResNet's forward and backward pass on one 32x32 image
# Dense bf16 (fp16 where the chip has no bf16) tensor-core peaks from the vendors' datasheets,
# TFLOP/s: leads for the MFU column, which --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70,
               "A10": 125, "T4": 65, "V100": 125, "RTX 4090": 165, "RTX 3090": 71}


def header(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": device, "host": platform.node(), "cpu": platform.processor() or platform.machine()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), gpus=torch.cuda.device_count())
    return info


def peak_tflops(name, override):
    if override:
        return override
    return next((tf for key, tf in PEAK_TFLOPS.items() if key in (name or "")), None)


class Checker:
    """Runs the steps in order within a time budget, recording each one's figures."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out).resolve()
        budget = args.budget_s if args.budget_s is not None else float("inf") if args.tiny else 480
        self.deadline = time.monotonic() + budget
        self.steps = []
        self.data = str(Path(args.data).resolve())  # the steps run from the repository root
        self.common = ["--data", self.data, "--device", args.device, "--no-progress"]

    def run(self, name, argv, cap_s=600, interrupt_after_epoch=None):
        """Run ``argv`` (a script and its flags) as a step; with ``interrupt_after_epoch``, send it
        Ctrl-C once metrics.json shows that epoch, as a user would."""
        left = self.deadline - time.monotonic()
        step = {"step": name, "command": " ".join(["python", *map(str, argv)])}
        self.steps.append(step)
        if left < 5:
            step.update(rc=None, status="skipped: out of time budget")
            return step
        log = self.out / "logs" / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            rc = self._wait(proc, min(cap_s, left), interrupt_after_epoch, argv)
        step.update(rc=rc, wall_s=round(time.monotonic() - start, 2), log=str(log),
                    status="ok" if rc == 0 else "timed out" if rc is None else f"failed (rc {rc})")
        if interrupt_after_epoch is not None and rc == 130:
            step["status"] = "interrupted"
        print(f"[{step['status']:>12}] {name} ({step['wall_s']} s)", flush=True)
        return step

    def _wait(self, proc, limit_s, interrupt_after_epoch, argv):
        end = time.monotonic() + limit_s
        metrics = Path(argv[argv.index("--out") + 1]) / "metrics.json" if "--out" in argv else None
        while proc.poll() is None:
            if time.monotonic() > end:
                proc.kill()
                proc.wait()
                return None
            due = interrupt_after_epoch is not None and metrics is not None
            if due and _epochs_done(metrics) >= interrupt_after_epoch:
                proc.send_signal(signal.SIGINT)
                interrupt_after_epoch = None
            time.sleep(0.05)
        return proc.returncode


def _epochs_done(metrics_path):
    try:
        return len(json.loads(metrics_path.read_text())["history"])
    except (OSError, ValueError, KeyError):
        return 0


def run_metrics(folder):
    try:
        return json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def training_figures(m, wall_s, peak):
    """What one timed run shows: accuracy, images/s, each part of the time, MFU."""
    t = m["timing"]
    per_s = m["train_images_per_s"]
    parts = t["data_load_s"] + t["warmup_s"] + t["train_s"] + t["eval_s"] + t.get("checkpoint_s", 0.0)
    fig = {"final_test_acc": m["final_test_acc"], "epochs": len(m["history"]), "images_per_s": per_s,
           "train_s": t["train_s"], "warmup_s": t["warmup_s"], "eval_s": t["eval_s"],
           "checkpoint_s": t.get("checkpoint_s"), "data_load_s": t["data_load_s"],
           "startup_and_rest_s": wall_s - parts if wall_s else None,
           "epoch_s": t["train_s"] / max(len(m["history"]), 1), "amp": m["amp"]}
    if peak and per_s:
        fig["mfu"] = per_s * FLOP_PER_TRAINING_IMAGE / (peak * 1e12)
    return fig


def same_history(a, b):
    """Whether two runs' per-epoch figures agree exactly, and the largest test-loss gap."""
    if not a or not b or len(a["history"]) != len(b["history"]):
        return {"identical": False, "max_test_loss_diff": None}
    keys = [k for k in a["history"][0] if k != "epoch_time_s"]
    identical = all(x[k] == y[k] for x, y in zip(a["history"], b["history"]) for k in keys)
    gap = max(abs((x["test_loss"] or 0) - (y["test_loss"] or 0)) for x, y in zip(a["history"], b["history"]))
    return {"identical": identical, "max_test_loss_diff": gap}


def _image_root(folder):
    """``folder``, or the one folder in it, that holds ``train/`` (an archive may wrap its layout
    in a top folder); None if neither does."""
    return next((p for p in (folder, *folder.glob("*/")) if (p / "train").is_dir()), None)


def unpack(archive, target):
    """The image folder the seed pipeline's ImageFolder reads: ``archive`` itself if it is one,
    else its regular files unpacked once into ``target``, by the loader's own member check
    (``sources.safe_members``: nothing that climbs out, no links)."""
    if Path(archive).is_dir():
        return Path(archive)
    root = _image_root(target) if target.is_dir() else None
    if root is None:
        try:
            with tarfile.open(archive) as tar:
                for member in safe_members(tar, archive).values():
                    tar.extract(member, target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        except UserError as exc:
            raise SystemExit(f"error: {exc}") from None
        root = _image_root(target)
    return root or target


def sizes(tiny):
    """The subsets and epochs of each kind of step: real ones, or tiny ones for the rehearsal."""
    batch = ["--batch-size", "50"] if tiny else []
    return {"batch": batch,
            "smoke": ["--epochs", "2", "--train-subset", "600" if tiny else "5000",
                      "--test-subset", "200" if tiny else "1000", *batch],
            "full": ["--train-subset", "1000", "--test-subset", "300", "--epochs", "3", *batch] if tiny else [],
            "resume": ["--train-subset", "600" if tiny else "10000", "--test-subset", "200" if tiny else "2000",
                       "--epochs", "3" if tiny else "4", *batch]}


def smoke_steps(c, args, size):
    """Every script and recipe for 2 epochs on a subset, --eval-only with shift TTA, a range test."""
    out, common, figures = c.out, c.common, {}
    for name, script, extra in (("smoke_resnet", "train_resnet.py", []),
                                ("smoke_resnet_fp16", "train_resnet.py", ["--amp", "fp16"]),
                                ("smoke_resnet_best", "train_resnet.py", ["--preset", "best"]),
                                ("smoke_dilated", "train_dilated.py", []),
                                ("smoke_ultimus", "train_ultimus.py", []),
                                ("smoke_fast", "train_fast.py", [])):
        if "fp16" in extra and args.device == "cpu":
            extra = ["--amp", "bf16"]  # fp16 is for GPUs; the CPU rehearses the step with bf16
        step = c.run(name, [script, *common, *size["smoke"], *extra, "--out", out / name, "--overwrite"])
        if step.get("rc") == 0 and (m := run_metrics(out / name)):
            figures[name] = {"final_test_acc": m["final_test_acc"], "amp": m["amp"], "train_s": m["timing"]["train_s"]}
    evaluated = out / "smoke_resnet" / "eval.json"
    if c.run("eval_only_tta_shift", ["train_resnet.py", "--eval-only", "--resume", out / "smoke_resnet" / "last.pt",
                                     "--tta-shift", "2", *common, *(["--test-subset", "200"] if args.tiny else [])]
             ).get("rc") == 0 and evaluated.is_file():
        figures["eval_only_tta_shift"] = {"test_acc": json.loads(evaluated.read_text())["test_acc"]}
    found = out / "range_test" / "lr_finder.json"
    if c.run("range_test_50", ["lr_range_test.py", *common, "--num-iter", "50", "--out", out / "range_test",
                               *(["--train-subset", "1000", "--batch-size", "64"] if args.tiny else [])]
             ).get("rc") == 0 and found.is_file():
        found = json.loads(found.read_text())
        figures["range_test_50"] = {"lr_max": found["lr_max"], "lr_min": found["lr_min"], "steps": len(found["lrs"])}
    return figures


def timed_run(c, name, argv, peak):
    """A full training step, and its timing figures when it ran."""
    step = c.run(name, [*argv, "--out", c.out / name, "--overwrite"])
    m = run_metrics(c.out / name)
    return {name: training_figures(m, step["wall_s"], peak)} if m and step.get("rc") == 0 else {}


def timing_steps(c, args, size):
    """The full recipe timed, kernels and syncs per step, and the benchmark against the seeds'."""
    peak = peak_tflops(c.info.get("gpu"), args.peak_tflops)
    figures = timed_run(c, "full_resnet", ["train_resnet.py", *c.common, *size["full"]], peak)
    c.run("profile_step", ["benchmarks/profile_step.py", *c.common, *(["--train-subset", "1000"] if args.tiny else []),
                           *size["batch"], "--steps", "3" if args.tiny else "20", "--top", "8", "--json"])
    folder = unpack(c.data, c.out / "images")
    c.run("throughput_vs_seed", ["benchmarks/throughput.py", "--data", folder, "--device", args.device,
                                 *(["--steps", "3", "--batch-size", "64", "--workers", "0"] if args.tiny else
                                   ["--workers", "4"])])
    return figures


def torchrun_steps(c, args, size):
    """The full ResNet recipe under torchrun, one process per visible GPU (two CPU processes in the
    rehearsal), against full_resnet's one device: images/s, the speed-up and both accuracies."""
    processes = c.info.get("gpus", 1) if args.device == "cuda" else 2
    if processes < 2:
        return {}
    name = "full_resnet_torchrun"
    step = c.run(name, ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                        "train_resnet.py", *c.common, *size["full"], "--out", c.out / name, "--overwrite"])
    many, one = run_metrics(c.out / name), run_metrics(c.out / "full_resnet")
    if not many or step.get("rc") != 0:
        return {}
    figures = {"processes": processes, **training_figures(many, step["wall_s"], None)}
    if one and one.get("train_images_per_s") and many.get("train_images_per_s"):
        figures.update(speedup=many["train_images_per_s"] / one["train_images_per_s"],
                       one_device_test_acc=one["final_test_acc"])
    return {name: figures}


def race_steps(c, args, size):
    """train_fast.py's default run timed, and the race against airbench94 on this device (one seed;
    it stops in one line where airbench is not installed)."""
    peak = peak_tflops(c.info.get("gpu"), args.peak_tflops)
    figures = timed_run(c, "full_fast", ["train_fast.py", *c.common, *size["full"]], peak)
    if not args.tiny:
        c.run("race_airbench94", ["benchmarks/race_airbench.py", "--data", c.data, "--device", args.device,
                                  "--seeds", "0", "--out", c.out / "race", "--overwrite"])
        race = c.out / "race" / "race.json"
        if race.is_file():
            figures["race_airbench94"] = json.loads(race.read_text())["mean"]
    return figures


RESUME_MODES = {"default": [], "deterministic": ["--deterministic"]}


def resume_steps(c, args, size):
    """An interrupted-and-resumed run against an uninterrupted one, without and with --deterministic."""
    figures = {}
    for tag, det in RESUME_MODES.items():
        straight, cut = c.out / f"resume_{tag}_straight", c.out / f"resume_{tag}_cut"
        run = ["train_resnet.py", *c.common, *size["resume"], *det, "--overwrite"]
        c.run(f"resume_{tag}_straight", [*run, "--out", straight])
        cut_step = c.run(f"resume_{tag}_interrupted", [*run, "--out", cut], interrupt_after_epoch=1)
        if c.run(f"resume_{tag}_resumed", ["train_resnet.py", "--resume", cut / "last.pt", *c.common]).get("rc") == 0:
            figures[f"resume_{tag}_resumed"] = {"interrupted": cut_step["status"] == "interrupted",
                                                **same_history(run_metrics(straight), run_metrics(cut))}
    return figures


def compile_steps(c, args, size):
    """The full recipe under each --compile mode asked for."""
    peak, figures = peak_tflops(c.info.get("gpu"), args.peak_tflops), {}
    for mode in args.compile_modes:
        figures.update(timed_run(c, f"full_resnet_compile_{mode.replace('-', '_')}",
                                 ["train_resnet.py", *c.common, *size["full"], "--compile", mode], peak))
    return figures


# Most important first: a budget that runs out skips the last ones.
STEP_GROUPS = (smoke_steps, timing_steps, race_steps, resume_steps, torchrun_steps, compile_steps)


def plan(c, args):
    figures = {}
    for group in STEP_GROUPS:
        figures.update(group(c, args, sizes(args.tiny)))
    return figures


def step_figures(c):
    """Figures read off the logs: the profile's JSON line and the throughput table's rows."""
    figures = {}
    for step in c.steps:
        log = Path(step.get("log", ""))
        if step.get("rc") != 0 or not log.is_file():
            continue
        lines = log.read_text(errors="replace").splitlines()
        if step["step"] == "profile_step":
            found = [json.loads(line) for line in lines if line.startswith("{")]
            if found:
                figures["profile_step"] = found[-1]
        if step["step"] == "throughput_vs_seed":
            figures["throughput_vs_seed"] = [line for line in lines if line.startswith("|")]
    return figures


def figure_text(name, value):
    if name == "top_ops":  # the profile's costliest ops: the first three, by share of the step
        return "top ops " + ", ".join(f"{op['op']} {op['share']:.0%}" for op in value[:3])
    return f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"


def summary_table(c, figures):
    rows = ["| step | status | wall s | figures |", "|---|---|---|---|"]
    for step in c.steps:
        fig = figures.get(step["step"], "")
        if isinstance(fig, dict):
            fig = ", ".join(figure_text(k, v) for k, v in fig.items() if v is not None)
        elif isinstance(fig, list):  # the benchmark's own table rows, without their pipes
            fig = "; ".join(" ".join(cell.strip() for cell in row.strip("|").split("|")) for row in fig[2:])
        rows.append(f"| {step['step']} | {step['status']} | {step.get('wall_s', '')} | {fig} |")
    return "\n".join(rows)


def main(argv=None):
    p = ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the CIFAR-10 archive or folder (nothing is downloaded)")
    p.add_argument("--out", default="gpu_check", help="where every step's run folder, log and the JSON go")
    p.add_argument("--device", default="cuda", choices=["cuda", "mps", "cpu"])
    p.add_argument("--tiny", action="store_true", help="every step on tiny subsets: a rehearsal for CPUs and CI")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no step after this many seconds (default: 480, an H100's 8 minutes; none with --tiny)")
    p.add_argument("--compile-modes", nargs="*", default=["default", "reduce-overhead", "max-autotune"],
                   choices=["default", "reduce-overhead", "max-autotune"], help="the --compile modes to time")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for the MFU column (default: from its name, where known)")
    args = p.parse_args(argv)
    # A shell starts background jobs with Ctrl-C ignored, and children inherit that: the resume
    # steps' Ctrl-C would then never arrive. A handler of our own is reset to the default on exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    c = Checker(args)
    make_folder(c.out / "logs")
    c.info = header(args.device)
    print(json.dumps(c.info, indent=2), flush=True)
    start = time.monotonic()
    figures = plan(c, args)
    figures.update(step_figures(c))
    table = summary_table(c, figures)
    print("\n" + table)
    write_json(c.out / "gpu_check.json", {"header": c.info, "steps": c.steps, "figures": figures,
                                          "total_s": time.monotonic() - start, "tiny": args.tiny})
    (c.out / "summary.md").write_text(table + "\n")
    print(f"\n{c.out / 'gpu_check.json'}; {sum(s.get('rc') == 0 for s in c.steps)} of {len(c.steps)} steps ok")
    return 0 if all(s.get("rc") == 0 or s["status"] == "interrupted" for s in c.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
