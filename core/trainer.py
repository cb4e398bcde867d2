"""A whole training run: data, model, optimizer and schedule from the flags; the epoch loop;
checkpoints, metrics and figures in the output folder; resume and evaluate-only."""

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
from .device import make_scaler, pick_amp, pick_device
from .engine import NonFiniteLoss, evaluate, test_line, train_epoch
from .errors import UserError
from .models import build_model
from .outputs import atomic_write_text, write_history_csv, write_json
from .schedule import one_cycle_for_recipe
from .summary import summary_table

# Flags that say where and how to run, not what to train: on --resume they come from the
# command line; everything else comes from the checkpoint, so the run continues unchanged.
RUN_PLACE_FLAGS = {"data", "cache_dir", "out", "device", "no_progress", "resume", "eval_only", "compile"}
MISCLASSIFIED_SHOWN = 20


def validate(args):
    if args.max_at_epoch <= 0 or args.max_at_epoch >= args.epochs:
        raise UserError(f"--max-at-epoch {args.max_at_epoch} must lie strictly between 0 and --epochs {args.epochs}")
    if args.lr_min >= args.lr_max:
        raise UserError(f"--lr-min {args.lr_min} must be below --lr-max {args.lr_max}")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only needs --resume PATH to the checkpoint to evaluate")


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


def make_optimizer(name, model, lr, weight_decay):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def rng_state(order_gen, aug_gen):
    state = {"torch": torch.get_rng_state(), "order": order_gen.get_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, order_gen, aug_gen):
    torch.set_rng_state(state["torch"])
    order_gen.set_state(state["order"])
    aug_gen.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_data(args, need_train):
    cache = None if args.cache_dir == "none" else (args.cache_dir or DEFAULT_CACHE)
    return load_dataset(args.data or "./data", need_train=need_train, download=args.data is None, cache_dir=cache)


def evaluate_only(recipe, args):
    ckpt = load_checkpoint(args.resume, recipe.name)
    device = pick_device(args.device)
    amp_dtype = pick_amp(args.amp, device)
    ds = load_data(args, need_train=False)
    if len(ds.classes) != len(ckpt["classes"]):
        raise UserError(f"the checkpoint has {len(ckpt['classes'])} classes but {args.data} has {len(ds.classes)}")
    model = build_model(recipe.name).to(device)
    model.load_state_dict(ckpt["model"])
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    test = take(ds.test, args.test_subset)
    loader = DeviceLoader(test, device, args.eval_batch_size, ckpt["mean"], ckpt["std"], train=False,
                          channels_last=args.channels_last)
    result = evaluate(model, loader, device, amp_dtype)
    print(test_line(result))
    out = Path(args.out) if args.out else Path(args.resume).parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", {"checkpoint": str(args.resume), "data": args.data, "test_acc": result["acc"],
                                   "test_loss": result["loss"], "correct": result["correct"], "total": result["total"]})
    return 0


def run_training(recipe, args):
    if args.eval_only:
        validate(args)
        return evaluate_only(recipe, args)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, recipe.name)
        args = merge_resume_args(args, ckpt["args"])
        args.out = args.out if args.out is not None else str(Path(args.resume).parent)
    validate(args)
    device = pick_device(args.device)
    amp_dtype = pick_amp(args.amp, device)
    torch.manual_seed(args.seed)
    order_gen = torch.Generator().manual_seed(args.seed)
    aug_gen = torch.Generator(device).manual_seed(args.seed + 1)

    ds = load_data(args, need_train=True)
    train, test = take(ds.train, args.train_subset), take(ds.test, args.test_subset)
    if len(train.labels) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} exceeds the {len(train.labels)} training images: "
                        f"lower it or enlarge --train-subset")
    mean, std = channel_stats(train.images)
    out = Path(args.out or f"runs/{recipe.name}-{datetime.now():%Y%m%d-%H%M%S}")
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)

    model = build_model(recipe.name).to(device)
    table, n_params = summary_table(model)
    print(table)
    atomic_write_text(out / "summary.txt", table + "\n")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader = DeviceLoader(train, device, args.batch_size, mean, std, train=True, augment=recipe.augment,
                                order_generator=order_gen, aug_generator=aug_gen, channels_last=args.channels_last)
    test_loader = DeviceLoader(test, device, args.eval_batch_size, mean, std, train=False,
                               channels_last=args.channels_last)
    optimizer = make_optimizer(args.optimizer, model, args.lr_max, args.weight_decay)
    schedule = one_cycle_for_recipe(optimizer, args.lr_max, args.lr_min, args.epochs, len(train_loader),
                                    args.max_at_epoch)
    scaler = make_scaler(device, amp_dtype)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    state = {"epoch": 0, "history": [], "best_test_acc": 0.0, "train_seconds": 0.0, "train_images": 0}

    def checkpoint():
        return {"model_name": recipe.name, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng_state(order_gen, aug_gen), "args": plain_args(args), "mean": mean, "std": std,
                "classes": list(ds.classes), **state}

    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], order_gen, aug_gen)
        state.update({k: ckpt[k] for k in state})
        print(f"Resuming {args.resume} after epoch {state['epoch']} of {args.epochs}")
    else:
        save_checkpoint(out / "last.pt", checkpoint())

    step_model = torch.compile(model) if args.compile else model
    info = {"model": recipe.name, "params": n_params, "device": describe_device(device),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "lr_max": args.lr_max, "lr_min": args.lr_min, "epochs": args.epochs, "batch_size": args.batch_size,
            "train_images": len(train.labels), "test_images": len(test.labels), "seed": args.seed,
            "command": " ".join([recipe.script, *sys.argv[1:]])}
    print(f"Training on {info['device']} with amp={info['amp']}, {info['train_images']} train / "
          f"{info['test_images']} test images, output in {out}")
    try:
        for epoch in range(state["epoch"] + 1, args.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            print(f"EPOCH: {epoch} (LR: {lr})")
            epoch_start = time.perf_counter()
            tr = train_epoch(step_model, train_loader, optimizer, schedule, loss_fn, device, amp_dtype, scaler,
                             progress=not args.no_progress, desc=f"epoch {epoch}/{args.epochs}")
            ev = evaluate(step_model, test_loader, device, amp_dtype)
            print(test_line(ev))
            if args.no_progress or not sys.stderr.isatty():
                print(f"  train: loss {tr['loss']:.4f}, accuracy {tr['acc']:.2f}%, {tr['seconds']:.1f}s")
            state["train_seconds"] += tr["seconds"] - tr["first_step_s"]
            state["train_images"] += tr["images"] - (args.batch_size if epoch == state["epoch"] + 1 else 0)
            state["history"].append({"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                                     "test_loss": ev["loss"], "test_acc": ev["acc"],
                                     "epoch_time_s": time.perf_counter() - epoch_start})
            state["epoch"] = epoch
            is_best = ev["acc"] > state["best_test_acc"]
            state["best_test_acc"] = max(state["best_test_acc"], ev["acc"])
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
    finish(out, state, schedule, len(train_loader), optimizer, step_model, test_loader, test, ds.classes,
           device, amp_dtype)
    print(f"Best test accuracy {state['best_test_acc']:.2f}%, final {state['history'][-1]['test_acc']:.2f}%; "
          f"outputs in {out}")
    return 0


def write_metrics(out, info, state):
    history = state["history"]
    per_s = state["train_images"] / state["train_seconds"] if state["train_seconds"] > 0 else None
    write_json(out / "metrics.json", {**info, "best_test_acc": state["best_test_acc"],
                                      "final_test_acc": history[-1]["test_acc"] if history else None,
                                      "train_images_per_s": per_s, "history": history})
    write_history_csv(out / "metrics.csv", history)


def finish(out, state, schedule, steps_per_epoch, optimizer, model, test_loader, test, classes, device, amp_dtype):
    """Figures users look at: curves, the schedule actually used, and what the model gets wrong."""
    plots.plot_curves(state["history"], out / "curves.png")
    values = [schedule.values_at(s) for s in range(schedule.total_steps)]
    label = "beta1" if "betas" in optimizer.defaults else "momentum"
    plots.plot_lr_schedule([v[0][0] for v in values], [v[1][0] for v in values], steps_per_epoch,
                           out / "lr_schedule.png", momentum_label=label)
    preds = evaluate(model, test_loader, device, amp_dtype, keep_predictions=True)["predictions"].numpy()
    wrong = np.flatnonzero(preds != test.labels)
    wrong = wrong[np.linspace(0, len(wrong) - 1, min(len(wrong), MISCLASSIFIED_SHOWN)).astype(int)]  # spread over classes
    plots.plot_misclassified(test.images[wrong], test.labels[wrong], preds[wrong], classes, out / "misclassified.png")
