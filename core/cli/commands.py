"""What each entry point does with its parsed flags: the train scripts run a training,
lr_range_test.py sweeps the LR for a recipe or draws the schedule examples, and predict.py
classifies image files."""

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from ..device import deterministic_algorithms, pick_device
from ..errors import UserError
from ..report import plots
from ..report.gradcam import default_cam_layer, grad_cam
from ..runs.folder import check_new_or_empty, check_range_test_folder, claimed_folder, new_folder
from ..runs.outputs import check_folder, make_folder
from ..runs.resume import CommandLine
from ..train.distributed import World
from ..train.inference import image_files, load_trained, predict, prepare, read_image, top_k
from ..train.loop import run_training
from ..train.lr_bounds import find_bounds
from ..train.optim import SGD_MOMENTUM, SGD_NESTEROV
from ..train.recipes import RECIPES
from ..train.schedule import Cyclic, one_cycle_for_recipe, trace
from ..train.setup import BuiltRun
from .parsers import build_predict_parser, build_range_test_parser, build_train_parser, run_cli
from .tool_config import PredictConfig, RangeTestConfig


def train_main(recipe_name, argv=None):
    """The whole of a train_*.py script: its recipe's flags, then a run; under torchrun, this
    process's part of it."""
    recipe = RECIPES[recipe_name]
    world = World.from_env()
    typed = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([*world.launcher(), recipe.script, *typed])
    parser = build_train_parser(recipe)

    def run(values, given):
        return run_training(recipe, recipe.config(values), CommandLine(command, given, parser.resumable()), world)

    return run_cli(run, typed, parser, quiet=not world.is_main)


def range_test_main(argv=None):
    """The whole of lr_range_test.py."""
    return run_cli(lambda values, given: run_range_test(RangeTestConfig.from_flags(values)), argv,
                   build_range_test_parser())


def run_range_test(config):
    options, sweep_config = config.options, config.sweep
    out = Path(options.out) if options.out else new_folder(Path("runs"), f"lr-find-{options.model}")
    if options.plot_schedules:
        check_new_or_empty(out, options.overwrite, "--plot-schedules")
        with claimed_folder(out):
            for path in draw_schedule_examples(out, "ResNet", RECIPES["resnet"].defaults):
                print(f"wrote {path}")
        return 0
    if sweep_config.start_lr >= sweep_config.end_lr:
        raise UserError(f"--start-lr {sweep_config.start_lr} must be below --end-lr {sweep_config.end_lr}")
    recipe = RECIPES[options.model]
    script_defaults = build_train_parser(recipe).defaults()
    train_config = recipe.config(recipe_flags(script_defaults, config.flags()))
    check_range_test_folder(out, options.overwrite)
    with deterministic_algorithms(config.runtime.deterministic):
        return sweep(recipe, config, train_config, script_defaults, out)


def sweep(recipe, config, train_config, script_defaults, out):
    """The range test itself, and what it prints: the curve's readings and the command to train with
    (``train_config``: the train script's config the sweep builds its run from; ``script_defaults``:
    the train script's own flag values, which that command need not spell out)."""
    run = BuiltRun(recipe, train_config)
    print(run.summary)
    sweep_config, data, training = config.sweep, config.data, train_config.training
    val_loader = run.val_loader  # --val-split's images, where the run holds them
    if val_loader is None and sweep_config.val:
        val_loader = run.test_loader
    with claimed_folder(out):
        record = find_bounds(run.model, run.optimizer, run.loss_fn, run.train_loader, run.device, run.amp_dtype, out,
                             start_lr=sweep_config.start_lr, end_lr=sweep_config.end_lr,
                             num_iter=sweep_config.num_iter, mode=sweep_config.mode, model_name=recipe.name,
                             optimizer_name=training.optimizer, method=sweep_config.method, val_loader=val_loader,
                             settings=config.flags(), progress=config.runtime.progress,
                             advice="widen --start-lr/--end-lr or raise --num-iter")
    steps = len(record["lrs"])
    stop = f", stopped at step {record['diverged_at']} as the loss diverged" if record["diverged_at"] is not None else ""
    print(f"\nRange test: {steps} steps from {record['lrs'][0]:.3g} to {record['lrs'][-1]:.3g}{stop}")
    for name, lr in record["suggestions"].items():
        print(f"  {name:>12}: {lr:.4g}")
    print(f"Suggested one-cycle bounds: lr_max {record['lr_max']:.4g} ({record['method']}), "
          f"lr_min {record['lr_min']:.4g} ({record['lr_min_method']})")
    # Every flag that changed the reading, so the run trains as the sweep did, with the bounds
    # given as numbers or as the saved JSON.
    run_flags = ["--optimizer", training.optimizer, "--batch-size", str(training.batch_size),
                 "--weight-decay", f"{run.weight_decay:g}"]
    if training.bias_lr_scale != script_defaults["bias_lr_scale"]:
        run_flags += ["--bias-lr-scale", f"{training.bias_lr_scale:g}"]
    if training.decay_exempt != script_defaults["decay_exempt"]:
        run_flags += ["--decay-exempt", training.decay_exempt]
    if data.data:
        run_flags += ["--data", data.data]
    if data.train_subset:
        run_flags += ["--train-subset", str(data.train_subset)]
    if data.val_split:
        run_flags += ["--val-split", str(data.val_split)]
    bounds = ["--lr-max", f"{record['lr_max']:.4g}", "--lr-min", f"{record['lr_min']:.4g}"]
    print("Train with:\n  " + shlex.join(["python", recipe.script, *bounds, *run_flags]))
    print(f"(or: {shlex.join(['python', recipe.script, '--lr-from', str(out / 'lr_finder.json'), *run_flags])})")
    print(f"Wrote {out / 'lr_finder.json'} and {out / 'lr_finder.png'}")
    return 0


def draw_schedule_examples(out, name, recipe_defaults, train_images=50_000):
    """The superconvergence assignment's 'draw this curve': a triangular cyclic LR over several
    cycles, and the ``name`` recipe's one-cycle LR with its momentum, peaking at epoch 5, from
    ``recipe_defaults`` (epochs, batch size, LR bounds, momentum cycling) over ``train_images``.
    Returns the PNG paths."""
    paths = [out / "cyclic_lr.png", out / "one_cycle.png"]
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    cyclic = Cyclic(sgd, base_lr=1e-3, max_lr=1e-2, step_size_up=500, mode="triangular", cycle_momentum=False)
    lrs, _ = trace(cyclic, 4 * 1000 + 1)
    plots.plot_cyclic_lr(lrs, 1e-3, 1e-2, paths[0], "Triangular cyclic LR (step size 500, 4 cycles)")
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=SGD_MOMENTUM, nesterov=SGD_NESTEROV)
    d = recipe_defaults
    steps_per_epoch = train_images // d["batch_size"]
    one_cycle = one_cycle_for_recipe(sgd, lr_max=d["lr_max"], lr_min=d["lr_min"], epochs=d["epochs"],
                                     steps_per_epoch=steps_per_epoch, max_at_epoch=5,
                                     cycle_momentum=d["cycle_momentum"])
    lrs, moms = trace(one_cycle, one_cycle.total_steps)
    plots.plot_lr_schedule(lrs, moms, steps_per_epoch, paths[1],
                           title=f"{name} recipe: one-cycle {d['lr_min']:g} -> {d['lr_max']:g} (epoch 5) -> "
                                 f"{d['lr_min']:g} over {d['epochs']} epochs, no annihilation")
    return paths


def recipe_flags(script_defaults, range_test_flags):
    """The train script's flags (``script_defaults``), with every range-test flag that the train
    script also has laid over them where it was given (None leaves the train script's default)."""
    given = {key: value for key, value in range_test_flags.items() if key in script_defaults and value is not None}
    return {**script_defaults, **given}


def predict_main(argv=None):
    """The whole of predict.py."""
    return run_cli(lambda values, given: run_predict(PredictConfig.from_flags(values)), argv, build_predict_parser())


def gradcam_paths(folder, files, overwrite):
    """Where predict.py --gradcam draws each image; refused, unless --overwrite, where one of
    them is already there (an earlier prediction's)."""
    paths = [Path(folder) / f"{i:04d}-{path.stem}-gradcam.png" for i, path in enumerate(files)]
    there = [p.name for p in paths if p.exists()]
    if there and not overwrite:
        raise UserError(f"--gradcam {folder} already holds {there[0]}" + (f" and {len(there) - 1} more" if len(there) > 1
                        else "") + ": choose another folder, or pass --overwrite to replace them")
    return paths


def run_predict(config):
    files = image_files(config.images)
    if config.gradcam:
        check_folder(config.gradcam, "--gradcam")
        targets = gradcam_paths(config.gradcam, files, config.overwrite)
    device = pick_device(config.device)
    model, trained = load_trained(config.checkpoint, device, flag="--checkpoint")
    images = np.stack([read_image(path) for path in files])
    x = prepare(images, trained, device)
    probs = torch.cat([predict(model, x[i:i + config.batch_size], tta=config.tta)
                       for i in range(0, len(x), config.batch_size)])
    results = [{"path": str(path), "topk": top} for path, top in zip(files, top_k(probs, trained["classes"], config.topk))]
    if config.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(f"{result['path']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in result["topk"]))
    if config.gradcam:
        make_folder(config.gradcam)
        top = probs.argmax(1)
        layer, step = default_cam_layer(model), config.batch_size
        cams = torch.cat([grad_cam(model, x[i:i + step], layer, top[i:i + step]) for i in range(0, len(x), step)])
        for i, (path, target) in enumerate(zip(files, targets)):
            plots.plot_image_cam(images[i], cams[i].cpu().numpy(), f"{path.name}: {trained['classes'][top[i]]} "
                                 f"({probs[i, top[i]]:.2f})", target)
        print(f"Wrote {len(files)} Grad-CAM images to {config.gradcam}")
    return 0
