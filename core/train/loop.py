"""A whole training run: the epoch loop over a built run (``core.build``), and what it writes to
the output folder: checkpoints, metrics and figures. Also ``--runs``, and the dispatch to
``--eval-only``."""

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..device import deterministic_algorithms, make_scaler
from ..errors import UserError
from ..flags import peak_epoch, plain_flags, refuse_contradictions, validate
from ..report import plots
from ..report.error_report import write_error_report
from ..runs.checkpoint import load_checkpoint, save_checkpoint
from ..runs.folder import (
    check_run_folder,
    claimed_run_folder,
    default_out,
    resume_command,
    run_folder,
)
from ..runs.outputs import atomic_write_text, write_history_csv, write_json
from ..runs.resume import merge_resume_flags, refuse_changed_flags, restore, rng_state
from .compiled import compile_model
from .engine import (
    NonFiniteLoss,
    evaluate,
    format_test_line,
    recalibrate_bn,
    train_epoch,
)
from .eval_only import evaluate_checkpoint
from .lr_bounds import checkpoint_bounds, resolve_lr_bounds
from .schedule import one_cycle_for_recipe, trace
from .setup import BuiltRun, bn_images, describe_device


def print_summary(run, recipe, out):
    print(run.summary)
    atomic_write_text(out / "summary.txt", run.summary + "\n")
    if run.model_table:
        print(run.model_table)
        atomic_write_text(out / f"{recipe.model_table_name}.txt", run.model_table + "\n")


def run_training(recipe, args, command, given=frozenset()):
    """``command``: the command line that started this process, kept in metrics.json so a run can be
    repeated; a resumed run keeps the one that started it and lists the resumes after it.
    ``given``: the flags typed on that command line, which a resume must not contradict."""
    validate(args)
    if args.eval_only:
        return evaluate_checkpoint(recipe, args)
    if args.runs > 1:
        return run_many(recipe, args, command, given)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, recipe.name, purpose="resume")
        refuse_changed_flags(given, args, ckpt["args"], args.resume)
        args = merge_resume_flags(args, ckpt["args"])
        validate(args)
    refuse_contradictions(args, given)
    out = run_folder(recipe, args)
    check_run_folder(out, args, ckpt, recipe.script)
    with deterministic_algorithms(args.deterministic):
        run = BuiltRun(recipe, args)
        with claimed_run_folder(out, args, ckpt):
            return train(recipe, args, command, run, out, ckpt)


def train(recipe, args, command, run, out, ckpt):
    """The run itself, in a folder it holds: LR bounds, schedule, the epoch loop, the figures."""
    print_summary(run, recipe, out)
    bounds = checkpoint_bounds(ckpt) if ckpt is not None else resolve_lr_bounds(args, run, out, recipe.name)
    print(f"LR bounds: lr_max {bounds.lr_max:.4g}, lr_min {bounds.lr_min:.4g} (from {bounds.source})")
    model, optimizer, device, amp_dtype = run.model, run.optimizer, run.device, run.amp_dtype
    schedule = one_cycle_for_recipe(optimizer, bounds.lr_max, bounds.lr_min, args.epochs, len(run.train_loader),
                                    peak_epoch(args), cycle_momentum=args.cycle_momentum)
    scaler = make_scaler(device, amp_dtype)
    # Seconds are summed over the processes of a resumed run; each process has its own warm-up.
    # best_*: the epoch with the highest validation accuracy where the run holds a validation
    # split, else the highest test accuracy (``best_by``).
    best_by = "val_acc" if run.val_loader is not None else "test_acc"
    state = {"epoch": 0, "history": [], "best_test_acc": 0.0, "best_val_acc": 0.0 if best_by == "val_acc" else None,
             "best_epoch": None, "train_seconds": 0.0, "train_images": 0, "warmup_seconds": 0.0, "eval_seconds": 0.0,
             "checkpoint_seconds": 0.0, "commands": []}

    def checkpoint():
        return {"model_name": recipe.name, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                "ema": run.ema.state_dict() if run.ema else None,
                "rng": rng_state(run.order_gen, run.aug_gen), "args": plain_flags(args), "lr_bounds": bounds.as_dict(),
                "mean": run.mean, "std": run.std, "classes": list(run.ds.classes), **state}

    if ckpt is not None:
        restore(ckpt, run, schedule, scaler, state, args.resume)
        print(f"Resuming {args.resume} after epoch {state['epoch']} of {args.epochs}")
    state["commands"].append(command)
    if ckpt is None:
        save_checkpoint(out / "last.pt", checkpoint())

    step_model = compile_model(model, args.compile) if args.compile else model
    eval_model = step_model
    if run.ema:  # a module of its own, compiled (once, in eval mode) on its own
        eval_model = compile_model(run.ema.module, args.compile) if args.compile else run.ema.module
    bn_loader = None
    if args.recalibrate_bn:
        bn_loader = bn_images(args, run.train, len(run.ds.classes), device, run.mean, run.std, args.batch_size)

    pad_to = args.eval_batch_size if args.compile else None  # one evaluation shape for the compiled model

    def evaluate_now(keep_predictions):
        """The test split's figures, and the validation split's (None without one)."""
        if bn_loader is not None:  # on the plain module: a compiled one would recompile for the switch
            recalibrate_bn(run.ema.module if run.ema else model, bn_loader, device, amp_dtype)
        val = None
        if run.val_loader is not None:
            val = evaluate(eval_model, run.val_loader, device, amp_dtype, tta=args.tta, tta_shift=args.tta_shift,
                           pad_to=pad_to, progress=not args.no_progress)
        return evaluate(eval_model, run.test_loader, device, amp_dtype, keep_predictions=keep_predictions,
                        tta=args.tta, tta_shift=args.tta_shift, pad_to=pad_to, progress=not args.no_progress), val

    # weight_decay: the one trained with (a resume restores it with the optimizer's state)
    facts = {"model": recipe.name, "flags": plain_flags(args), "lr_max": bounds.lr_max, "lr_min": bounds.lr_min,
            "lr_source": bounds.source, "peak_epoch": peak_epoch(args),
            "weight_decay": optimizer.param_groups[0]["weight_decay"], "params": run.params,
            "device": describe_device(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "train_images": len(run.train.labels), "val_images": len(run.val.labels) if run.val is not None else 0,
            "test_images": len(run.test.labels), "best_by": best_by, "data_load_s": run.data_load_s}
    held = f"{facts['val_images']} validation / " if run.val is not None else ""
    print(f"Training on {facts['device']} with amp={facts['amp']}, {facts['train_images']} train / {held}"
          f"{facts['test_images']} test images, output in {out}")
    first_epoch = state["epoch"] + 1  # of this process: its first step warms up (and compiles)
    saved_epoch = state["epoch"]  # the epoch last.pt holds
    ev = val = None
    try:
        for epoch in range(first_epoch, args.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            print(f"EPOCH: {epoch} (LR: {lr})")
            epoch_start = time.perf_counter()
            run.train_loader.set_epoch(epoch)
            tr = train_epoch(step_model, run.train_loader, optimizer, schedule, run.loss_fn, device, amp_dtype, scaler,
                             progress=not args.no_progress, desc=f"epoch {epoch}/{args.epochs}", ema=run.ema)
            evaluated = epoch % args.eval_every == 0 or epoch == args.epochs
            if evaluated:
                eval_start = time.perf_counter()
                ev, val = evaluate_now(keep_predictions=epoch == args.epochs)
                state["eval_seconds"] += time.perf_counter() - eval_start
                if val is not None:
                    print(format_test_line(val, "Validation"))
                if val is None or epoch == args.epochs:  # a search reads validation lines, not test ones
                    print(format_test_line(ev))
            if args.no_progress or not sys.stderr.isatty():
                print(f"  train: loss {tr['loss']:.4f}, accuracy {tr['acc']:.2f}%, {tr['seconds']:.1f}s")
            warmup = tr["first_step_s"] if epoch == first_epoch else 0.0
            state["warmup_seconds"] += warmup
            state["train_seconds"] += tr["seconds"] - warmup
            state["train_images"] += tr["images"] - (args.batch_size if epoch == first_epoch else 0)
            state["history"].append({"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                                     "val_loss": val["loss"] if evaluated and val is not None else None,
                                     "val_acc": val["acc"] if evaluated and val is not None else None,
                                     "test_loss": ev["loss"] if evaluated else None,
                                     "test_acc": ev["acc"] if evaluated else None,
                                     "epoch_time_s": time.perf_counter() - epoch_start})
            state["epoch"] = epoch
            is_best = evaluated and (val if val is not None else ev)["acc"] > state["best_" + best_by]
            if is_best:
                state.update(best_test_acc=ev["acc"], best_val_acc=val["acc"] if val is not None else None,
                             best_epoch=epoch)
            # One serialization a save: best.pt is put in place first, so a kill between the two
            # leaves it no older than last.pt. With --save-every, a new best is still kept.
            save_last = epoch % args.save_every == 0 or epoch == args.epochs
            save_start = time.perf_counter()
            if save_last:
                save_checkpoint(out / "last.pt", checkpoint(), also=[out / "best.pt"] if is_best else [])
                saved_epoch = epoch
            elif is_best:
                save_checkpoint(out / "best.pt", checkpoint())
            state["checkpoint_seconds"] += time.perf_counter() - save_start
            write_metrics(out, facts, state)
    except NonFiniteLoss as exc:
        raise UserError(f"{exc}; stopped. The last good checkpoint is {out / 'last.pt'}: "
                        f"lower --lr-max (try lr_range_test.py) and train again") from None
    except KeyboardInterrupt:
        print(f"\nInterrupted. {out / 'last.pt'} holds the state after epoch {saved_epoch} (training since "
              f"then is lost); resume with:\n  {resume_command(recipe.script, out / 'last.pt')}", file=sys.stderr)
        return 130
    if ev is None:  # resumed from a run that had already finished: nothing was evaluated yet
        ev, _ = evaluate_now(keep_predictions=True)
    plot_training(out, state, schedule, len(run.train_loader))
    report = write_error_report(out, run.ema.module if run.ema else model, run.test, ev["predictions"].numpy(),
                                list(run.ds.classes), run.mean, run.std, tta=args.tta, tta_shift=args.tta_shift)
    write_metrics(out, facts, state, report)
    chosen = f" (epoch {state['best_epoch']}, validation {state['best_val_acc']:.2f}%)" if run.val is not None else ""
    print(f"Best test accuracy {state['best_test_acc']:.2f}%{chosen}, final {state['history'][-1]['test_acc']:.2f}%; "
          f"outputs in {out}")
    return 0


def run_many(recipe, args, command, given):
    """--runs N: N independent runs with consecutive seeds, and the spread of their accuracy."""
    base = Path(args.out) if args.out else default_out(recipe)
    if (base / "runs.json").exists() and not args.overwrite:
        raise UserError(f"{base} already holds the summary of earlier runs (runs.json): choose another --out, or "
                        f"pass --overwrite to replace them")
    finals, bests, final_vals = [], [], []
    for i in range(args.runs):
        run_args = type(args)(**{**vars(args), "runs": 1, "seed": args.seed + i, "out": str(base / f"seed{args.seed + i}")})
        print(f"=== run {i + 1}/{args.runs}, seed {run_args.seed} ===")
        code = run_training(recipe, run_args, command, given)
        if code:
            return code
        with open(Path(run_args.out) / "metrics.json") as f:
            m = json.load(f)
        finals.append(m["final_test_acc"])
        bests.append(m["best_test_acc"])
        final_vals.append(m.get("final_val_acc"))
    summary = {"runs": args.runs, "seeds": list(range(args.seed, args.seed + args.runs)), "final_test_acc": finals,
               "best_test_acc": bests, **accuracy_spread(finals)}
    if args.val_split:
        summary["final_val_acc"] = final_vals
        summary["val"] = accuracy_spread(final_vals)
        print(f"Final validation accuracy over {args.runs} runs: {summary['val']['mean']:.2f} ± "
              f"{summary['val']['std']:.2f}%")
    write_json(base / "runs.json", summary)
    print(f"Final test accuracy over {args.runs} runs: {summary['mean']:.2f} ± {summary['std']:.2f}% "
          f"(min {summary['min']:.2f}, max {summary['max']:.2f}); {base / 'runs.json'}")
    return 0


def accuracy_spread(values):
    """Mean, sample std, min and max of the runs' accuracies."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def write_metrics(out, facts, state, report=None):
    """metrics.json and .csv; ``report`` (the final confusion matrix and per-class accuracy) joins
    them once the run has ended."""
    history = state["history"]
    per_s = state["train_images"] / state["train_seconds"] if state["train_seconds"] > 0 else None
    timing = {"data_load_s": facts["data_load_s"], "warmup_s": state["warmup_seconds"],
              "train_s": state["train_seconds"], "eval_s": state["eval_seconds"],
              "checkpoint_s": state["checkpoint_seconds"]}
    commands = state["commands"]
    write_json(out / "metrics.json", {**facts, "command": commands[0], "resumed_with": commands[1:],
                                      "best_epoch": state["best_epoch"], "best_val_acc": state["best_val_acc"],
                                      "best_test_acc": state["best_test_acc"],
                                      "final_val_acc": history[-1]["val_acc"] if history else None,
                                      "final_test_acc": history[-1]["test_acc"] if history else None,
                                      "train_images_per_s": per_s, "timing": timing, **(report or {}),
                                      "history": history})
    write_history_csv(out / "metrics.csv", history)


def plot_training(out, state, schedule, steps_per_epoch):
    """The curves, and the schedule the run actually used."""
    plots.plot_curves(state["history"], out / "curves.png")
    lrs, moms = trace(schedule, schedule.total_steps)
    label = "beta1" if schedule.use_beta1 else "momentum"
    plots.plot_lr_schedule(lrs, moms, steps_per_epoch, out / "lr_schedule.png", momentum_label=label)
