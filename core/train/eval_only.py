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


def run_splits(args, ds, flags, num_classes, data):
    """(training, validation) images of the run that wrote the checkpoint, which --recalibrate-bn
    and --eval-split val read: its own --train-subset and --val-split taken out of ``ds`` as
    training took them, so that recalibration reads the images training would have read, never
    the held-out ones."""
    if ds.train is None:
        flag = "--eval-split val" if args.eval_split == "val" else "--recalibrate-bn"
        raise UserError(f"{flag} needs training images and {data} holds only a test split: "
                        f"drop the flag or point --data at the whole dataset")
    try:
        train, val = run_images(ds.train, flags.get("train_subset"), flags.get("val_split"), num_classes)
    except UserError as exc:
        raise UserError(f"{args.resume}'s --train-subset and --val-split do not fit these training images "
                        f"({exc})") from None
    if args.eval_split == "val" and val is None:
        raise UserError(f"{args.resume} was trained without --val-split, so no images were held out: "
                        f"score the test split (drop --eval-split val)")
    return train, val


def evaluate_checkpoint(recipe, args):
    """The model is rebuilt from the checkpoint's own flags, and normalized with the training
    statistics it saved, so a test split alone is enough (except for --recalibrate-bn and
    --eval-split val). Without --data the checkpoint's own data is read, as a resume would."""
    out = eval_folder(args)
    check_new_or_empty(out, args.overwrite, "--eval-only")
    device, amp_dtype = pick_runtime(args)
    model, trained = load_trained(args.resume, device, recipe.name, live=args.live_weights)
    data = args.data or trained["flags"].get("data")
    ds = load_data(args, need_train=False, data=data)
    classes, mean, std = trained["classes"], trained["mean"], trained["std"]
    if list(ds.classes) != classes:
        raise UserError(f"the checkpoint's {len(classes)} classes ({', '.join(classes)}) are not those of "
                        f"{data or './data'} ({', '.join(ds.classes)}): evaluate it on data with its classes")
    train = val = None
    if args.recalibrate_bn or args.eval_split == "val":
        train, val = run_splits(args, ds, trained["flags"], len(classes), data)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.recalibrate_bn:
        bn_loader = bn_images(args, train, len(classes), device, mean, std, trained["flags"]["batch_size"])
        recalibrate_bn(model, bn_loader, device, amp_dtype)
    scored = val if args.eval_split == "val" else balanced_split(ds.test, args.test_subset, len(classes))
    loader = plain_batches(args, scored, device, mean, std)
    result = evaluate(model, loader, device, amp_dtype, keep_predictions=True, tta=args.tta, tta_shift=args.tta_shift,
                      progress=not args.no_progress)
    split = args.eval_split
    named = "validation" if split == "val" else "test"  # as the log lines and the per-class table say it
    print(format_test_line(result, named.capitalize()))
    with claimed_folder(out):
        report = write_error_report(out, model, scored, result["predictions"].numpy(), classes, mean, std,
                                    tta=args.tta, tta_shift=args.tta_shift, split=named)
        write_json(out / "eval.json", {"checkpoint": str(args.resume), "data": data, "split": split,
                                       f"{split}_acc": result["acc"], f"{split}_loss": result["loss"],
                                       "correct": result["correct"], "total": result["total"],
                                       "tta": args.tta, "tta_shift": args.tta_shift, "weights": trained["weights"],
                                       "recalibrate_bn": args.recalibrate_bn, **report})
    print(f"Wrote eval.json and its figures to {out}")
    return 0
