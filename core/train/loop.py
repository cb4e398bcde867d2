"""A whole training run, top to bottom: the flags checked, a resume's checkpoint read, the run
built (``core.train.setup``) in a folder it holds, then the epoch loop (step and evaluation in
``core.train.engine``) with its checkpoints, metrics and figures. Also ``--runs``, and the
dispatch to ``--eval-only``."""

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..device import deterministic_algorithms, make_scaler
from ..errors import UserError
from ..report import plots
from ..report.error_report import write_error_report
from ..runs.checkpoint import load_checkpoint, save_checkpoint
from ..runs.folder import check_run_folder, claimed_run_folder, default_out, resume_command, run_folder
from ..runs.outputs import atomic_write_text, write_history_csv, write_json
from ..runs.resume import merge_resume_flags, refuse_changed_flags, restore, rng_state
from .compiled import compile_model
from .config import refuse_contradictions
from .distributed import (
    World,
    average_buffers,
    only_rank_0_prints,
    process_group,
    refuse_under_torchrun,
    warn_of_another_world,
    wrap,
)
from .engine import NonFiniteLoss, evaluate, format_test_line, recalibrate_bn, train_epoch
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


def run_training(recipe, config, command_line, world=World()):
    """A run of ``recipe`` as its ``RunConfig`` says, as process ``world`` of a torchrun job (or
    the only one). ``command_line``: the ``CommandLine`` that started this process; a resumed run
    keeps the one that started it in metrics.json and lists the resumes after it."""
    config.check()
    refuse_under_torchrun(config, world)
    if config.outputs.eval_only:
        return evaluate_checkpoint(recipe, config)
    if config.training.runs > 1:
        return run_many(recipe, config, command_line)
    ckpt = None
    if config.outputs.resume:
        path = config.outputs.resume
        ckpt = load_checkpoint(path, recipe.name, purpose="resume")
        refuse_changed_flags(command_line, config.flags(), ckpt["args"], path)
        config = recipe.config(merge_resume_flags(config.flags(), ckpt["args"], command_line.resumable))
        config.check()
        refuse_under_torchrun(config, world)
        if world.is_main:
            warn_of_another_world(ckpt, world, config.training.batch_size, path)
    refuse_contradictions(config.training, command_line.given)
    out = run_folder(recipe, config.outputs)
    if world.is_main:
        check_run_folder(out, config.outputs, ckpt, recipe.script)
    else:  # one writer: the other processes neither print, nor draw progress, nor hold the folder
        config = config.replace(no_progress=True)
    device = world.device(config.runtime.device)
    with only_rank_0_prints(world), deterministic_algorithms(config.runtime.deterministic), \
            process_group(world, device):
        run = BuiltRun(recipe, config, world)
        with claimed_run_folder(out, config.outputs, ckpt) if world.is_main else contextlib.nullcontext():
            return train(recipe, config, command_line.text, run, out, ckpt, world)


@dataclasses.dataclass
class Progress:
    """What a run has done so far, which its checkpoints keep beside the weights so that a resume
    goes on counting. Seconds are summed over the processes of a resumed run (each has its own
    warm-up); best_* is the epoch of the highest validation accuracy where the run holds a
    validation split, else of the highest test accuracy."""

    epoch: int = 0
    history: list = dataclasses.field(default_factory=list)  # one row per epoch (HISTORY_FIELDS)
    best_test_acc: float = 0.0
    best_val_acc: float | None = None
    best_epoch: int | None = None
    train_seconds: float = 0.0
    train_images: int = 0
    warmup_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    commands: list = dataclasses.field(default_factory=list)  # the command lines that started and resumed it

    @classmethod
    def from_checkpoint(cls, ckpt):
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)})

    def improves_on_best(self, val, test):
        """Whether this epoch's evaluation beats the best so far (by validation where there is one)."""
        return test["acc"] > self.best_test_acc if val is None else val["acc"] > self.best_val_acc


def checkpoint_state(recipe, run, config, schedule, scaler, bounds, progress, world):
    """Everything a resume needs, as tensors and plain values. Every process of a torchrun job
    draws the same random numbers (the same seed, the same whole batches), so rank 0's generator
    states are every process's."""
    return {"model_name": recipe.name, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
            "ema": run.ema.state_dict() if run.ema else None,
            "lookahead": run.lookahead.state_dict() if run.lookahead else None,
            "rng": rng_state(run.order_gen, run.aug_gen),
            "args": config.flags(), "lr_bounds": bounds.as_dict(), "mean": run.mean, "std": run.std,
            "classes": list(run.ds.classes), "world_size": world.size, **dataclasses.asdict(progress)}


def evaluate_splits(run, eval_model, bn_loader, evaluation, runtime, keep_predictions):
    """The test split's figures, and the validation split's (None without one); with
    --recalibrate-bn the BatchNorm statistics are re-estimated first, on the plain module (a
    compiled one would recompile for the switch to train mode)."""
    if bn_loader is not None:
        recalibrate_bn(run.ema.module if run.ema else run.model, bn_loader, run.device, run.amp_dtype)
    pad_to = evaluation.eval_batch_size if runtime.compile else None  # one evaluation shape for a compiled model
    common = dict(tta=evaluation.tta, tta_shift=evaluation.tta_shift, pad_to=pad_to, progress=runtime.progress)
    val = None
    if run.val_loader is not None:
        val = evaluate(eval_model, run.val_loader, run.device, run.amp_dtype, **common)
    test = evaluate(eval_model, run.test_loader, run.device, run.amp_dtype, keep_predictions=keep_predictions,
                    **common)
    return test, val


def run_facts(recipe, run, config, bounds, world):
    """What metrics.json says of the run beside its progress: the flags, the LR bounds, the
    weight decay trained with (a resume restores it with the optimizer's state), the device."""
    amp = str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32"
    return {"model": recipe.name, "flags": config.flags(), "lr_max": bounds.lr_max, "lr_min": bounds.lr_min,
            "lr_source": bounds.source, "peak_epoch": config.training.peak_epoch,
            "weight_decay": run.optimizer.param_groups[0]["weight_decay"], "params": run.params,
            "device": describe_device(run.device), "processes": world.size, "amp": amp,
            "train_images": len(run.train.labels),
            "val_images": len(run.val.labels) if run.val is not None else 0, "test_images": len(run.test.labels),
            "best_by": "val_acc" if run.val is not None else "test_acc", "data_load_s": run.data_load_s}


def train(recipe, config, command, run, out, ckpt, world):
    """The run itself, in a folder it holds: LR bounds and schedule, then for each epoch train,
    evaluate, log and checkpoint, then the figures and the error report. Under torchrun every
    process trains and evaluates, and rank 0 alone writes."""
    training, evaluation, runtime, outputs = config.training, config.evaluation, config.runtime, config.outputs
    if world.is_main:
        print_summary(run, recipe, out)
    bounds = checkpoint_bounds(ckpt) if ckpt is not None else resolve_lr_bounds(training, run, out, recipe.name,
                                                                                  config.flags(), runtime.progress)
    print(f"LR bounds: lr_max {bounds.lr_max:.4g}, lr_min {bounds.lr_min:.4g} (from {bounds.source})")
    schedule = one_cycle_for_recipe(run.optimizer, bounds.lr_max, bounds.lr_min, training.epochs,
                                    len(run.train_loader), training.peak_epoch, cycle_momentum=training.cycle_momentum,
                                    lr_end=training.lr_end)
    scaler = make_scaler(run.device, run.amp_dtype)
    if ckpt is None:
        progress = Progress(best_val_acc=0.0 if run.val is not None else None)
    else:
        restore(ckpt, run, schedule, scaler, outputs.resume)
        progress = Progress.from_checkpoint(ckpt)
        print(f"Resuming {outputs.resume} after epoch {progress.epoch} of {training.epochs}")
    progress.commands.append(command)
    if ckpt is None and world.is_main:
        save_checkpoint(out / "last.pt", checkpoint_state(recipe, run, config, schedule, scaler, bounds, progress,
                                                          world))

    step_model = wrap(run.model, world, run.device)
    if runtime.compile:
        step_model = compile_model(step_model, runtime.compile)
    evaluated_module = run.ema.module if run.ema else run.model
    eval_model = step_model  # one compiled graph for both modes where the step trains the evaluated module alone
    if run.ema or world.distributed:  # else a module of its own, compiled (once, in eval mode) on its own
        eval_model = compile_model(evaluated_module, runtime.compile) if runtime.compile else evaluated_module
    bn_loader = None
    if evaluation.recalibrate_bn:
        bn_loader = bn_images(evaluation.recalibrate_bn, run.train, len(run.ds.classes), run.device, run.mean,
                              run.std, training.batch_size, runtime.channels_last)
    facts = run_facts(recipe, run, config, bounds, world)
    held = f"{facts['val_images']} validation / " if run.val is not None else ""
    print(f"Training on {facts['device']} with amp={facts['amp']}, {facts['train_images']} train / {held}"
          f"{facts['test_images']} test images, output in {out}")
    first_epoch = progress.epoch + 1  # of this process: its first step warms up (and compiles)
    saved_epoch = progress.epoch  # the epoch last.pt holds
    test = val = None
    try:
        for epoch in range(first_epoch, training.epochs + 1):
            lr = schedule.current_lr()
            print(f"EPOCH: {epoch} (LR: {lr})")
            epoch_start = time.perf_counter()
            run.train_loader.set_epoch(epoch)
            tr = train_epoch(step_model, run.train_loader, run.optimizer, schedule, run.loss_fn, run.device,
                             run.amp_dtype, scaler, progress=runtime.progress,
                             desc=f"epoch {epoch}/{training.epochs}", averages=run.averages, world=world)
            average_buffers([run.model] + ([run.ema.module] if run.ema else []), world)
            evaluated = epoch == training.epochs or (evaluation.eval_every and epoch % evaluation.eval_every == 0)
            if evaluated:
                eval_start = time.perf_counter()
                test, val = evaluate_splits(run, eval_model, bn_loader, evaluation, runtime,
                                            keep_predictions=epoch == training.epochs)
                progress.eval_seconds += time.perf_counter() - eval_start
                if val is not None:
                    print(format_test_line(val, "Validation"))
                if val is None or epoch == training.epochs:  # a search reads validation lines, not test ones
                    print(format_test_line(test))
            if not runtime.progress or not sys.stderr.isatty():
                print(f"  train: loss {tr['loss']:.4f}, accuracy {tr['acc']:.2f}%, {tr['seconds']:.1f}s")
            warmup = tr["first_step_s"] if epoch == first_epoch else 0.0
            progress.warmup_seconds += warmup
            progress.train_seconds += tr["seconds"] - warmup
            progress.train_images += tr["images"] - (training.batch_size if epoch == first_epoch else 0)
            progress.history.append({"epoch": epoch, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
                                     "val_loss": val["loss"] if evaluated and val is not None else None,
                                     "val_acc": val["acc"] if evaluated and val is not None else None,
                                     "test_loss": test["loss"] if evaluated else None,
                                     "test_acc": test["acc"] if evaluated else None,
                                     "epoch_time_s": time.perf_counter() - epoch_start})
            progress.epoch = epoch
            is_best = evaluated and progress.improves_on_best(val, test)
            if is_best:
                progress.best_test_acc, progress.best_epoch = test["acc"], epoch
                progress.best_val_acc = val["acc"] if val is not None else None
            # One serialization a save: best.pt is put in place first, so a kill between the two
            # leaves it no older than last.pt. With --save-every, a new best is still kept.
            save_start = time.perf_counter()
            save_last = epoch % outputs.save_every == 0 or epoch == training.epochs
            if (save_last or is_best) and world.is_main:
                state = checkpoint_state(recipe, run, config, schedule, scaler, bounds, progress, world)
                save_checkpoint(out / ("last.pt" if save_last else "best.pt"), state,
                                also=[out / "best.pt"] if save_last and is_best else [])
            if save_last:
                saved_epoch = epoch
            progress.checkpoint_seconds += time.perf_counter() - save_start
            if world.is_main:
                write_metrics(out, facts, progress)
    except NonFiniteLoss as exc:
        raise UserError(f"{exc}; stopped. The last good checkpoint is {out / 'last.pt'}: "
                        f"lower --lr-max (try lr_range_test.py) and train again") from None
    except KeyboardInterrupt:
        if world.is_main:
            again = resume_command(recipe.script, out / "last.pt", world.launcher())
            print(f"\nInterrupted. {out / 'last.pt'} holds the state after epoch {saved_epoch} (training since "
                  f"then is lost); resume with:\n  {again}", file=sys.stderr)
        return 130
    if test is None:  # resumed from a run that had already finished: nothing was evaluated yet
        test, _ = evaluate_splits(run, eval_model, bn_loader, evaluation, runtime, keep_predictions=True)
    if not world.is_main:
        return 0
    plot_training(out, progress, schedule, len(run.train_loader))
    report = write_error_report(out, run.ema.module if run.ema else run.model, run.test,
                                test["predictions"].numpy(), list(run.ds.classes), run.mean, run.std,
                                tta=evaluation.tta, tta_shift=evaluation.tta_shift)
    write_metrics(out, facts, progress, report)
    chosen = f" (epoch {progress.best_epoch}, validation {progress.best_val_acc:.2f}%)" if run.val is not None else ""
    print(f"Best test accuracy {progress.best_test_acc:.2f}%{chosen}, final {progress.history[-1]['test_acc']:.2f}% "
          f"after {seconds_spent(facts, progress):.1f} s of data loading, training, evaluation and checkpoints; "
          f"outputs in {out}")
    return 0


def run_many(recipe, config, command_line):
    """--runs N: N independent runs with consecutive seeds, and the spread of their accuracy."""
    runs, seed = config.training.runs, config.runtime.seed
    base = Path(config.outputs.out) if config.outputs.out else default_out(recipe)
    if (base / "runs.json").exists() and not config.outputs.overwrite:
        raise UserError(f"{base} already holds the summary of earlier runs (runs.json): choose another --out, or "
                        f"pass --overwrite to replace them")
    finals, bests, final_vals = [], [], []
    for i in range(runs):
        one = config.replace(runs=1, seed=seed + i, out=str(base / f"seed{seed + i}"))
        print(f"=== run {i + 1}/{runs}, seed {one.runtime.seed} ===")
        code = run_training(recipe, one, command_line)
        if code:
            return code
        with open(Path(one.outputs.out) / "metrics.json") as f:
            m = json.load(f)
        finals.append(m["final_test_acc"])
        bests.append(m["best_test_acc"])
        final_vals.append(m.get("final_val_acc"))
    summary = {"runs": runs, "seeds": list(range(seed, seed + runs)), "final_test_acc": finals,
               "best_test_acc": bests, **accuracy_spread(finals)}
    if config.data.val_split:
        summary["final_val_acc"] = final_vals
        summary["val"] = accuracy_spread(final_vals)
        print(f"Final validation accuracy over {runs} runs: {summary['val']['mean']:.2f} ± "
              f"{summary['val']['std']:.2f}%")
    write_json(base / "runs.json", summary)
    print(f"Final test accuracy over {runs} runs: {summary['mean']:.2f} ± {summary['std']:.2f}% "
          f"(min {summary['min']:.2f}, max {summary['max']:.2f}); {base / 'runs.json'}")
    return 0


def accuracy_spread(values):
    """Mean, sample std, min and max of the runs' accuracies."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def write_metrics(out, facts, progress, report=None):
    """metrics.json and .csv; ``report`` (the final confusion matrix and per-class accuracy) joins
    them once the run has ended."""
    history = progress.history
    per_s = progress.train_images / progress.train_seconds if progress.train_seconds > 0 else None
    timing = {"data_load_s": facts["data_load_s"], "warmup_s": progress.warmup_seconds,
              "train_s": progress.train_seconds, "eval_s": progress.eval_seconds,
              "checkpoint_s": progress.checkpoint_seconds, "total_s": seconds_spent(facts, progress)}
    write_json(out / "metrics.json", {**facts, "command": progress.commands[0], "resumed_with": progress.commands[1:],
                                      "best_epoch": progress.best_epoch, "best_val_acc": progress.best_val_acc,
                                      "best_test_acc": progress.best_test_acc,
                                      "final_val_acc": history[-1]["val_acc"] if history else None,
                                      "final_test_acc": history[-1]["test_acc"] if history else None,
                                      "train_images_per_s": per_s, "timing": timing, **(report or {}),
                                      "history": history})
    write_history_csv(out / "metrics.csv", history)


def seconds_spent(facts, progress):
    """The run's time to its accuracy: this process's data loading, and the training, evaluation
    and checkpoint writing of every process that trained it (a resumed run's included)."""
    return (facts["data_load_s"] + progress.warmup_seconds + progress.train_seconds + progress.eval_seconds
            + progress.checkpoint_seconds)


def plot_training(out, progress, schedule, steps_per_epoch):
    """The curves, and the schedule the run actually used."""
    plots.plot_curves(progress.history, out / "curves.png")
    lrs, moms = trace(schedule, schedule.total_steps)
    label = "beta1" if schedule.use_beta1 else "momentum"
    plots.plot_lr_schedule(lrs, moms, steps_per_epoch, out / "lr_schedule.png", momentum_label=label)
