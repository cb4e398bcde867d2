"""A whole training run: data, model, optimizer and schedule from the flags; the epoch loop;
checkpoints, metrics and figures in the output folder; resume and evaluate-only."""

import functools
import json
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import plots
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DEFAULT_CACHE, DeviceLoader, Split, balanced_subset, channel_stats, load_dataset
from .device import autotune_convolutions, keep_freed_memory, make_scaler, pick_amp, pick_device
from .ema import WeightEMA
from .engine import NonFiniteLoss, evaluate, format_test_line, recalibrate_bn, train_epoch
from .errors import UserError
from .models import build_model
from .models.whitening import fit_whitening
from .outputs import atomic_write_text, write_history_csv, write_json
from .range_test import find_bounds, load_bounds
from .schedule import one_cycle_for_recipe, trace
from .summary import summary_table

# Flags that say where and how to run, not what to train: on --resume they come from the
# command line; everything else comes from the checkpoint, so the run continues unchanged.
RUN_PLACE_FLAGS = {"data", "cache_dir", "out", "device", "no_progress", "resume", "eval_only", "compile", "runs"}
MISCLASSIFIED_SHOWN = 20


def default_out(recipe):
    return Path(f"runs/{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}")


def validate(args):
    if args.max_at_epoch is None:
        args.max_at_epoch = min(5.0, args.epochs * 5 / 24)
    if args.max_at_epoch >= args.epochs:
        raise UserError(f"--max-at-epoch {args.max_at_epoch} must lie strictly between 0 and --epochs {args.epochs}")
    if args.lr_max != "find" and args.lr_min >= args.lr_max:
        raise UserError(f"--lr-min {args.lr_min} must be below --lr-max {args.lr_max}")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only needs --resume PATH to the checkpoint to evaluate")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay {args.ema_decay} must lie in [0, 1): 0 turns the average off, 0.99 averages "
                        f"over about 100 steps")
    if args.runs > 1 and args.resume:
        raise UserError("--runs repeats whole runs; resume each run's last.pt on its own instead")


def plain_args(args):
    """The flags as plain values, fit for a weights_only checkpoint and metrics.json."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}


def merge_resume_args(args, saved):
    merged = dict(saved)
    merged.update({k: v for k, v in vars(args).items() if k in RUN_PLACE_FLAGS and v is not None})
    for k, v in vars(args).items():
        merged.setdefault(k, v)
    return type(args)(**merged)


def describe_device(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return device.type


def take(split, n):
    idx = balanced_subset(split.labels, n, int(split.labels.max()) + 1)
    return Split(split.images[idx], split.labels[idx])


def param_groups(model, weight_decay, bias_lr_scale=1.0):
    """The trainable parameters, with the biases in a group of their own when ``bias_lr_scale`` != 1.

    A bias (BN shifts, the FC bias) is not followed by a normalization, so unlike a conv weight
    its LR sets how fast it moves in units of the activations. Page's bag of tricks trains them
    at 64x the LR with weight decay divided by 64, which keeps their decay per step unchanged.
    Each group's ``lr_scale`` is the multiple of the schedule's LR that it trains at.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if bias_lr_scale == 1:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay, "lr_scale": 1.0}]
    return [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": weight_decay / bias_lr_scale,
             "lr_scale": bias_lr_scale}]


def make_optimizer(name, model, lr, weight_decay, bias_lr_scale=1.0):
    groups = param_groups(model, weight_decay, bias_lr_scale)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(groups, lr=lr)


def rng_state(order_gen, aug_gen):
    state = {"torch": torch.get_rng_state(), "order": order_gen.get_state(), "aug": aug_gen.get_state(),
             "aug_device": aug_gen.device.type}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, order_gen, aug_gen, path):
    """Put back every generator a run draws from. The augmentation generator lives on the training
    device, and each kind of device has its own generator, so its state cannot move to another
    kind: such a resume could not be exact, and is refused (evaluation is not)."""
    saved, here = state.get("aug_device"), aug_gen.device.type  # older checkpoints do not say
    fix = f"resume with --device {saved}" if saved else "resume it on the kind it trained on"
    refusal = (f"{path} was trained on {saved or 'another kind of device'} and this run is on {here}: an exact "
               f"resume needs the same kind of device, so {fix} (--eval-only runs anywhere)")
    if saved not in (None, here):
        raise UserError(refusal)
    try:
        aug_gen.set_state(state["aug"])
    except RuntimeError:  # a state of another kind of generator
        raise UserError(refusal) from None
    torch.set_rng_state(state["torch"])
    order_gen.set_state(state["order"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_data(args, need_train):
    cache = None if args.cache_dir == "none" else (args.cache_dir or DEFAULT_CACHE)
    return load_dataset(args.data or "./data", need_train=need_train, download=args.data is None, cache_dir=cache)


def pick_runtime(args):
    """The device and autocast dtype the flags ask for, with the allocator and cuDNN set up for it."""
    device = pick_device(args.device)
    keep_freed_memory(device)
    autotune_convolutions(device)
    return device, pick_amp(args.amp, device)


def plain_batches(args, split, device, mean, std, batch_size=None):
    """``split`` in order and un-augmented, laid out as the model is: what evaluation and
    --recalibrate-bn read, in batches of ``batch_size`` (default --eval-batch-size)."""
    return DeviceLoader(split, device, batch_size or args.eval_batch_size, mean, std, train=False,
                        channels_last=args.channels_last)


def bn_images(args, train, device, mean, std, batch_size):
    """The un-augmented training images that --recalibrate-bn re-estimates BN statistics on, in
    batches of ``batch_size``: the training batch size, which the batch statistics depend on."""
    return plain_batches(args, take(train, args.recalibrate_bn), device, mean, std, batch_size)


def evaluate_only(recipe, args):
    ckpt = load_checkpoint(args.resume, recipe.name)
    device, amp_dtype = pick_runtime(args)
    ds = load_data(args, need_train=False)
    if args.recalibrate_bn and ds.train is None:
        raise UserError(f"--recalibrate-bn needs training images and {args.data} holds only a test split: "
                        f"drop the flag or point --data at the whole dataset")
    if len(ds.classes) != len(ckpt["classes"]):
        raise UserError(f"the checkpoint has {len(ckpt['classes'])} classes but {args.data} has {len(ds.classes)}")
    model = build_model(recipe.name, **recipe.model_kwargs(ckpt["args"])).to(device)
    weights = "ema" if ckpt.get("ema") is not None else "model"  # what the run itself evaluated
    model.load_state_dict(ckpt[weights])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.recalibrate_bn:
        bn_loader = bn_images(args, ds.train, device, ckpt["mean"], ckpt["std"], ckpt["args"]["batch_size"])
        recalibrate_bn(model, bn_loader, device, amp_dtype)
    loader = plain_batches(args, take(ds.test, args.test_subset), device, ckpt["mean"], ckpt["std"])
    result = evaluate(model, loader, device, amp_dtype, tta=args.tta, tta_shift=args.tta_shift)
    print(format_test_line(result))
    out = Path(args.out) if args.out else Path(args.resume).parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", {"checkpoint": str(args.resume), "data": args.data, "test_acc": result["acc"],
                                   "test_loss": result["loss"], "correct": result["correct"], "total": result["total"],
                                   "tta": args.tta, "tta_shift": args.tta_shift, "weights": weights,
                                   "recalibrate_bn": args.recalibrate_bn})
    return 0


class Setup:
    """Everything a run or a range test builds from the flags, in one place."""

    def __init__(self, recipe, args):
        self.device, self.amp_dtype = pick_runtime(args)
        torch.manual_seed(args.seed)
        self.order_gen = torch.Generator().manual_seed(args.seed)
        self.aug_gen = torch.Generator(self.device).manual_seed(args.seed + 1)
        start = time.perf_counter()
        self.ds = load_data(args, need_train=True)
        self.data_load_s = time.perf_counter() - start
        self.train = take(self.ds.train, args.train_subset)
        self.test = take(self.ds.test, args.test_subset)
        if len(self.train.labels) < args.batch_size:
            raise UserError(f"--batch-size {args.batch_size} exceeds the {len(self.train.labels)} training images: "
                            f"lower it or enlarge --train-subset")
        self.mean, self.std = channel_stats(self.train.images)
        self.model = build_model(recipe.name, **recipe.model_kwargs(vars(args))).to(self.device)
        first_flips = None
        if args.flip == "alternating":  # drawn from the seed alone, so a resumed run draws them again
            first_flips = torch.rand(len(self.train.labels), generator=torch.Generator().manual_seed(args.seed)) < 0.5
        self.train_loader = DeviceLoader(self.train, self.device, args.batch_size, self.mean, self.std, train=True,
                                         augment=functools.partial(recipe.augment, **recipe.augment_kwargs(vars(args))),
                                         order_generator=self.order_gen,
                                         aug_generator=self.aug_gen, channels_last=args.channels_last,
                                         first_flips=first_flips)
        fit_whitening(self.model, self.train_loader)
        self.summary, self.params = summary_table(self.model)
        self.report = recipe.report(self.model) if recipe.report else None
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # After the layout change, which makes new tensors: the average follows these ones.
        self.ema = WeightEMA(self.model, args.ema_decay) if args.ema_decay else None
        self.test_loader = plain_batches(args, self.test, self.device, self.mean, self.std)
        # The LR here is a placeholder: the schedule (or the range test) sets it every step.
        self.optimizer = make_optimizer(args.optimizer, self.model, 0.0, args.weight_decay,
                                        args.bias_lr_scale)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def print_summary(self, recipe, out):
        print(self.summary)
        atomic_write_text(out / "summary.txt", self.summary + "\n")
        if self.report:
            print(self.report)
            atomic_write_text(out / f"{recipe.report_name}.txt", self.report + "\n")


def resolve_lr_bounds(args, s, out):
    """Fill in --lr-max/--lr-min from --lr-from or a fresh range test, and say where they came from."""
    if args.lr_from:
        args.lr_max, args.lr_min = load_bounds(args.lr_from)
        args.lr_source = f"lr_from:{args.lr_from}"
    elif args.lr_max == "find":
        record = find_bounds(s.model, s.optimizer, s.loss_fn, s.train_loader, s.device, s.amp_dtype, out,
                             optimizer_name=args.optimizer, settings=plain_args(args))
        args.lr_max, args.lr_min = record["lr_max"], record["lr_min"]
        args.lr_source = f"range test: lr_max by {record['method']}, lr_min {record['lr_min_method']}; see lr_finder.png"
    else:
        args.lr_source = getattr(args, "lr_source", None) or "flags"
    args.lr_from = None  # resolved: a resumed run must not look for the file again
    print(f"LR bounds: lr_max {args.lr_max:.4g}, lr_min {args.lr_min:.4g} (from {args.lr_source})")


def run_training(recipe, args, command):
    """``command``: the command line that started this process, kept in metrics.json so a run can be
    repeated; a resumed run keeps the one that started it and lists the resumes after it."""
    validate(args)
    if args.eval_only:
        return evaluate_only(recipe, args)
    if args.runs > 1:
        return run_many(recipe, args, command)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, recipe.name)
        args = merge_resume_args(args, ckpt["args"])
        args.out = args.out if args.out is not None else str(Path(args.resume).parent)
        validate(args)
    s = Setup(recipe, args)
    out = Path(args.out) if args.out else default_out(recipe)
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    s.print_summary(recipe, out)
    resolve_lr_bounds(args, s, out)
    model, optimizer, device, amp_dtype = s.model, s.optimizer, s.device, s.amp_dtype
    schedule = one_cycle_for_recipe(optimizer, args.lr_max, args.lr_min, args.epochs, len(s.train_loader),
                                    args.max_at_epoch, cycle_momentum=args.cycle_momentum)
    scaler = make_scaler(device, amp_dtype)
    # Seconds are summed over the processes of a resumed run; each process has its own warm-up.
    state = {"epoch": 0, "history": [], "best_test_acc": 0.0, "train_seconds": 0.0, "train_images": 0,
             "warmup_seconds": 0.0, "eval_seconds": 0.0, "commands": []}

    def checkpoint():
        return {"model_name": recipe.name, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                "ema": s.ema.state_dict() if s.ema else None,
                "rng": rng_state(s.order_gen, s.aug_gen), "args": plain_args(args), "mean": s.mean, "std": s.std,
                "classes": list(s.ds.classes), **state}

    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        if ckpt["scaler"]:  # empty when the run trained without fp16: a new loss scale then starts here
            scaler.load_state_dict(ckpt["scaler"])
        if s.ema:
            s.ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"], s.order_gen, s.aug_gen, args.resume)
        state.update({k: ckpt[k] for k in state if k in ckpt})
        print(f"Resuming {args.resume} after epoch {state['epoch']} of {args.epochs}")
    state["commands"].append(command)
    if ckpt is None:
        save_checkpoint(out / "last.pt", checkpoint())

    step_model = torch.compile(model) if args.compile else model
    eval_model = s.ema.module if s.ema else step_model
    bn_loader = bn_images(args, s.train, device, s.mean, s.std, args.batch_size) if args.recalibrate_bn else None

    def evaluate_now(keep_predictions):
        if bn_loader is not None:  # on the plain module: a compiled one would recompile for the switch
            recalibrate_bn(s.ema.module if s.ema else model, bn_loader, device, amp_dtype)
        return evaluate(eval_model, s.test_loader, device, amp_dtype, keep_predictions=keep_predictions,
                        tta=args.tta, tta_shift=args.tta_shift)

    info = {"model": recipe.name, **recipe.model_kwargs(vars(args)), **recipe.augment_kwargs(vars(args)),
            "params": s.params,
            "device": describe_device(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "lr_max": args.lr_max, "lr_min": args.lr_min, "lr_source": args.lr_source, "epochs": args.epochs,
            "batch_size": args.batch_size, "optimizer": args.optimizer, "ema_decay": args.ema_decay,
            "recalibrate_bn": args.recalibrate_bn, "tta": args.tta, "tta_shift": args.tta_shift,
            "eval_every": args.eval_every, "flip": args.flip, "train_images": len(s.train.labels),
            "test_images": len(s.test.labels), "seed": args.seed, "data_load_s": s.data_load_s}
    print(f"Training on {info['device']} with amp={info['amp']}, {info['train_images']} train / "
          f"{info['test_images']} test images, output in {out}")
    first_epoch = state["epoch"] + 1  # of this process: its first step warms up (and compiles)
    ev = None
    try:
        for epoch in range(first_epoch, args.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            print(f"EPOCH: {epoch} (LR: {lr})")
            epoch_start = time.perf_counter()
            s.train_loader.set_epoch(epoch)
            tr = train_epoch(step_model, s.train_loader, optimizer, schedule, s.loss_fn, device, amp_dtype, scaler,
                             progress=not args.no_progress, desc=f"epoch {epoch}/{args.epochs}", ema=s.ema)
            evaluated = epoch % args.eval_every == 0 or epoch == args.epochs
            if evaluated:
                eval_start = time.perf_counter()
                ev = evaluate_now(keep_predictions=epoch == args.epochs)
                state["eval_seconds"] += time.perf_counter() - eval_start
                print(format_test_line(ev))
            if args.no_progress or not sys.stderr.isatty():
                print(f"  train: loss {tr['loss']:.4f}, accuracy {tr['acc']:.2f}%, {tr['seconds']:.1f}s")
            warmup = tr["first_step_s"] if epoch == first_epoch else 0.0
            state["warmup_seconds"] += warmup
            state["train_seconds"] += tr["seconds"] - warmup
            state["train_images"] += tr["images"] - (args.batch_size if epoch == first_epoch else 0)
            state["history"].append({"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                                     "test_loss": ev["loss"] if evaluated else None,
                                     "test_acc": ev["acc"] if evaluated else None,
                                     "epoch_time_s": time.perf_counter() - epoch_start})
            state["epoch"] = epoch
            is_best = evaluated and ev["acc"] > state["best_test_acc"]
            if is_best:
                state["best_test_acc"] = ev["acc"]
            save_checkpoint(out / "last.pt", checkpoint())
            if is_best:
                save_checkpoint(out / "best.pt", checkpoint())
            write_metrics(out, info, state)
    except NonFiniteLoss as exc:
        raise UserError(f"{exc}; stopped. The last good checkpoint is {out / 'last.pt'}: "
                        f"lower --lr-max (try lr_range_test.py) and train again") from None
    except KeyboardInterrupt:
        print(f"\nInterrupted. {out / 'last.pt'} holds the state after epoch {state['epoch']}; resume with:\n"
              f"  python {recipe.script} --resume {out / 'last.pt'}", file=sys.stderr)
        return 130
    if ev is None:  # resumed from a run that had already finished: nothing was evaluated yet
        ev = evaluate_now(keep_predictions=True)
    finish(out, state, schedule, len(s.train_loader), ev["predictions"].numpy(), s.test, s.ds.classes)
    print(f"Best test accuracy {state['best_test_acc']:.2f}%, final {state['history'][-1]['test_acc']:.2f}%; "
          f"outputs in {out}")
    return 0


def run_many(recipe, args, command):
    """--runs N: N independent runs with consecutive seeds, and the spread of their accuracy."""
    base = Path(args.out) if args.out else default_out(recipe)
    finals, bests = [], []
    for i in range(args.runs):
        run_args = type(args)(**{**vars(args), "runs": 1, "seed": args.seed + i, "out": str(base / f"seed{args.seed + i}")})
        print(f"=== run {i + 1}/{args.runs}, seed {run_args.seed} ===")
        code = run_training(recipe, run_args, command)
        if code:
            return code
        with open(Path(run_args.out) / "metrics.json") as f:
            m = json.load(f)
        finals.append(m["final_test_acc"])
        bests.append(m["best_test_acc"])
    a = np.asarray(finals)
    summary = {"runs": args.runs, "seeds": list(range(args.seed, args.seed + args.runs)), "final_test_acc": finals,
               "best_test_acc": bests, "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
               "min": float(a.min()), "max": float(a.max())}
    write_json(base / "runs.json", summary)
    print(f"Final test accuracy over {args.runs} runs: {summary['mean']:.2f} ± {summary['std']:.2f}% "
          f"(min {summary['min']:.2f}, max {summary['max']:.2f}); {base / 'runs.json'}")
    return 0


def write_metrics(out, info, state):
    history = state["history"]
    per_s = state["train_images"] / state["train_seconds"] if state["train_seconds"] > 0 else None
    timing = {"data_load_s": info["data_load_s"], "warmup_s": state["warmup_seconds"],
              "train_s": state["train_seconds"], "eval_s": state["eval_seconds"]}
    commands = state["commands"]
    write_json(out / "metrics.json", {**info, "command": commands[0], "resumed_with": commands[1:],
                                      "best_test_acc": state["best_test_acc"],
                                      "final_test_acc": history[-1]["test_acc"] if history else None,
                                      "train_images_per_s": per_s, "timing": timing, "history": history})
    write_history_csv(out / "metrics.csv", history)


def finish(out, state, schedule, steps_per_epoch, preds, test, classes):
    """Figures users look at: curves, the schedule actually used, and what the final model gets wrong
    (``preds``: its test predictions, kept from the last epoch's evaluation)."""
    plots.plot_curves(state["history"], out / "curves.png")
    lrs, moms = trace(schedule, schedule.total_steps)
    label = "beta1" if schedule.use_beta1 else "momentum"
    plots.plot_lr_schedule(lrs, moms, steps_per_epoch, out / "lr_schedule.png", momentum_label=label)
    wrong = np.flatnonzero(preds != test.labels)
    wrong = wrong[np.linspace(0, len(wrong) - 1, min(len(wrong), MISCLASSIFIED_SHOWN)).astype(int)]  # spread over classes
    plots.plot_misclassified(test.images[wrong], test.labels[wrong], preds[wrong], classes, out / "misclassified.png")
