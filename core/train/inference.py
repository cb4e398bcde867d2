"""A trained checkpoint pointed at image files: the model rebuilt as it trained, images read and
prepared as the dataset's are, and the top-k classes with their probabilities."""

from pathlib import Path

import numpy as np
import torch

from ..data.augment import channel_tensor, tta_views
from ..data.loader import normalize
from ..data.sources import IMAGE_SUFFIXES, rgb_image
from ..errors import UserError
from ..runs.checkpoint import load_checkpoint
from .recipes import RECIPES
from .setup import make_model

SIZE = 32


def load_trained(path, device="cpu", model_name=None, live=False, flag="--resume"):
    """(model, trained) from a checkpoint: the model rebuilt from its flags (whitening basis, logit
    scale and every model flag as trained) with the weights the run evaluated (the average, where
    it kept one, unless ``live``), in eval mode on ``device``; ``trained`` holds ``classes`` (in label
    order), ``mean`` and ``std`` (the normalization it trained with), ``recipe`` (its name),
    ``config`` (its ``RunConfig``) and ``weights`` ('ema' or 'model'). ``model_name`` refuses a checkpoint of another model;
    ``flag`` names the flag that gave ``path``."""
    ckpt = load_checkpoint(path, model_name, purpose="evaluate", flag=flag)
    recipe = RECIPES.get(ckpt["model_name"])
    if recipe is None:
        raise UserError(f"{path} holds a '{ckpt['model_name']}' model, which this version does not know")
    device = torch.device(device)
    classes = [str(c) for c in ckpt["classes"]]
    config = recipe.config(ckpt["args"])
    model = make_model(recipe, config.model, classes, device)
    weights = "ema" if ckpt.get("ema") is not None and not live else "model"
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as exc:
        raise UserError(f"{path} does not fit the '{recipe.name}' model of this version "
                        f"({str(exc).splitlines()[0]})") from None
    return model.eval(), {"classes": classes, "mean": list(ckpt["mean"]), "std": list(ckpt["std"]),
                          "recipe": recipe.name, "config": config, "weights": weights}


def image_files(paths):
    """The image files that ``paths`` (files or folders, searched recursively) name, in order."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise UserError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path} does not exist: pass image files or folders of them")
    return found


def read_image(path):
    """An image file as (3, 32, 32) uint8: converted to RGB, and resized with antialiasing when it
    is not 32x32, so a CIFAR-sized file is used exactly as the dataset's loader decodes it."""
    from PIL import Image  # lazy: training never needs it for the official batches

    try:
        with Image.open(path) as im:
            im = rgb_image(im)
            if im.size != (SIZE, SIZE):
                im = im.resize((SIZE, SIZE), Image.Resampling.BICUBIC, reducing_gap=None)
            return np.asarray(im).transpose(2, 0, 1).copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read {path} as an image ({exc.__class__.__name__}: {exc})") from None


def prepare(images, trained, device):
    """uint8 images (N, 3, 32, 32) normalized as the model trained."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return normalize(x, channel_tensor(trained["mean"], device), channel_tensor(trained["std"], device))


@torch.no_grad()
def predict(model, x, tta=False):
    """Class probabilities (N, C) in fp32; ``tta`` averages the logits of each image and its
    mirror image, as a run's evaluation with --tta does."""
    views = tta_views(x, flip=tta)
    return (sum(model(view).float() for view in views) / len(views)).softmax(1)


def top_k(probs, classes, k):
    """Per image, the ``k`` most probable classes as [{'class', 'prob'}], most probable first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"class": classes[i], "prob": float(p)} for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(values.tolist(), indices.tolist())]
