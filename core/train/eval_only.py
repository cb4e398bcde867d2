"""``--eval-only``: score a checkpoint on a test split (or its run's validation split), anywhere,
and write eval.json with the confusion matrix, and the error figures (confusion.png,
misclassified.png, gradcam.png), into a folder of their own: never over the run's own."""

import torch

from ..data.subsets import balanced_split, run_images
from ..errors import UserError
from ..report.error_report import write_error_report
from ..runs.folder import check_new_or_empty, claimed_folder, eval_folder
from ..runs.outputs import write_json
from .engine import evaluate, format_test_line, recalibrate_bn
from .inference import load_trained
from .setup import bn_images, load_data, pick_runtime, plain_batches


def run_splits(config, ds, trained, num_classes, data):
    """(training, validation) images of the run that wrote the checkpoint, which --recalibrate-bn
    and --eval-split val read: its own --train-subset and --val-split (``trained``: its
    ``RunConfig``) taken out of ``ds`` as training took them, so that recalibration reads the
    images training would have read, never the held-out ones."""
    path = config.outputs.resume
    if ds.train is None:
        flag = "--eval-split val" if config.evaluation.eval_split == "val" else "--recalibrate-bn"
        raise UserError(f"{flag} needs training images and {data} holds only a test split: "
                        f"drop the flag or point --data at the whole dataset")
    try:
        train, val = run_images(ds.train, trained.data.train_subset, trained.data.val_split, num_classes)
    except UserError as exc:
        raise UserError(f"{path}'s --train-subset and --val-split do not fit these training images "
                        f"({exc})") from None
    if config.evaluation.eval_split == "val" and val is None:
        raise UserError(f"{path} was trained without --val-split, so no images were held out: "
                        f"score the test split (drop --eval-split val)")
    return train, val


def evaluate_checkpoint(recipe, config):
    """The model is rebuilt from the checkpoint's own flags, and normalized with the training
    statistics it saved, so a test split alone is enough (except for --recalibrate-bn and
    --eval-split val). Without --data the checkpoint's own data is read, as a resume would."""
    evaluation, runtime, path = config.evaluation, config.runtime, config.outputs.resume
    out = eval_folder(config.outputs)
    check_new_or_empty(out, config.outputs.overwrite, "--eval-only")
    device, amp_dtype = pick_runtime(runtime)
    model, trained = load_trained(path, device, recipe.name, live=evaluation.live_weights)
    data = config.data.data or trained["config"].data.data
    ds = load_data(config.data, need_train=False, progress=runtime.progress, data=data)
    classes, mean, std = trained["classes"], trained["mean"], trained["std"]
    if list(ds.classes) != classes:
        raise UserError(f"the checkpoint's {len(classes)} classes ({', '.join(classes)}) are not those of "
                        f"{data or './data'} ({', '.join(ds.classes)}): evaluate it on data with its classes")
    train = val = None
    if evaluation.recalibrate_bn or evaluation.eval_split == "val":
        train, val = run_splits(config, ds, trained["config"], len(classes), data)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if evaluation.recalibrate_bn:
        bn_loader = bn_images(evaluation.recalibrate_bn, train, len(classes), device, mean, std,
                              trained["config"].training.batch_size, runtime.channels_last)
        recalibrate_bn(model, bn_loader, device, amp_dtype)
    split = evaluation.eval_split
    scored = val if split == "val" else balanced_split(ds.test, config.data.test_subset, len(classes))
    loader = plain_batches(scored, device, mean, std, evaluation.eval_batch_size, runtime.channels_last)
    result = evaluate(model, loader, device, amp_dtype, keep_predictions=True, tta=evaluation.tta,
                      tta_shift=evaluation.tta_shift, progress=runtime.progress)
    named = "validation" if split == "val" else "test"  # as the log lines and the per-class table say it
    print(format_test_line(result, named.capitalize()))
    with claimed_folder(out):
        report = write_error_report(out, model, scored, result["predictions"].numpy(), classes, mean, std,
                                    tta=evaluation.tta, tta_shift=evaluation.tta_shift, split=named)
        write_json(out / "eval.json", {"checkpoint": str(path), "data": data, "split": split,
                                       f"{split}_acc": result["acc"], f"{split}_loss": result["loss"],
                                       "correct": result["correct"], "total": result["total"],
                                       "tta": evaluation.tta, "tta_shift": evaluation.tta_shift,
                                       "weights": trained["weights"], "recalibrate_bn": evaluation.recalibrate_bn,
                                       **report})
    print(f"Wrote eval.json and its figures to {out}")
    return 0
