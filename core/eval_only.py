"""``--eval-only``: score a checkpoint on a test split, anywhere, and write eval.json with the
confusion matrix, and the error figures (confusion.png, misclassified.png, gradcam.png)."""

from pathlib import Path

import torch

from .build import bn_images, load_data, pick_runtime, plain_batches, take
from .engine import evaluate, format_test_line, recalibrate_bn
from .errors import UserError
from .inference import load_trained
from .outputs import check_folder, make_folder, write_json
from .report import write_error_report


def evaluate_checkpoint(recipe, args):
    """The model is rebuilt from the checkpoint's own flags, and normalized with the training
    statistics it saved, so a test split alone is enough (except for --recalibrate-bn). Without
    --data the checkpoint's own data is read, as a resume would."""
    out = Path(args.out) if args.out else Path(args.resume).parent
    device, amp_dtype = pick_runtime(args)
    model, info = load_trained(args.resume, device, recipe.name)  # what the run itself evaluated
    check_folder(out)
    data = args.data or info["flags"].get("data")
    ds = load_data(args, need_train=False, data=data)
    if args.recalibrate_bn and ds.train is None:
        raise UserError(f"--recalibrate-bn needs training images and {data} holds only a test split: "
                        f"drop the flag or point --data at the whole dataset")
    classes, mean, std = info["classes"], info["mean"], info["std"]
    if list(ds.classes) != classes:
        raise UserError(f"the checkpoint's {len(classes)} classes ({', '.join(classes)}) are not those of "
                        f"{data or './data'} ({', '.join(ds.classes)}): evaluate it on data with its classes")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.recalibrate_bn:
        bn_loader = bn_images(args, ds.train, len(classes), device, mean, std, info["flags"]["batch_size"])
        recalibrate_bn(model, bn_loader, device, amp_dtype)
    test = take(ds.test, args.test_subset, len(classes))
    loader = plain_batches(args, test, device, mean, std)
    result = evaluate(model, loader, device, amp_dtype, keep_predictions=True, tta=args.tta, tta_shift=args.tta_shift)
    print(format_test_line(result))
    make_folder(out)
    report = write_error_report(out, model, test, result["predictions"].numpy(), classes, mean, std,
                                tta=args.tta, tta_shift=args.tta_shift)
    write_json(out / "eval.json", {"checkpoint": str(args.resume), "data": data, "test_acc": result["acc"],
                                   "test_loss": result["loss"], "correct": result["correct"], "total": result["total"],
                                   "tta": args.tta, "tta_shift": args.tta_shift, "weights": info["weights"],
                                   "recalibrate_bn": args.recalibrate_bn, **report})
    return 0
