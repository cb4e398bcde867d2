"""The optimizer a run trains with, and how it splits the parameters into groups of one LR
multiple and one weight decay each."""

import torch
from torch import nn

from ..models.whitening import whitening_biases
from .muon import AIRBENCH_MOMENTUM, AIRBENCH_STEPS, Muon

# --decay-exempt's choices: which parameters train without weight decay. Biases and norm
# weights (every 1-D parameter) shift and scale activations rather than match patterns, and
# timm's recipes leave them undecayed; a depthwise filter has only nine weights, and MobileNet's
# authors advise little or no decay on them.
DECAY_EXEMPT = ("none", "bias-norm", "bias-norm-depthwise")


def decay_exempt_params(model, exempt):
    """The parameters --decay-exempt ``exempt`` leaves out of weight decay."""
    if exempt not in DECAY_EXEMPT:
        raise ValueError(f"exempt must be one of {DECAY_EXEMPT}, not {exempt!r}")
    if exempt == "none":
        return []
    params = [p for p in model.parameters() if p.ndim <= 1]
    if exempt == "bias-norm-depthwise":
        params += [m.weight for m in model.modules()
                   if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    return params


def param_groups(model, weight_decay, bias_lr_scale=1.0, decay_exempt="none", train_steps=None):
    """The trainable parameters in groups of one LR multiple and one weight decay each, in the
    order their first parameter comes in the model: all in one group by default.

    A bias (BN shifts, the FC bias) is not followed by a normalization, so unlike a conv weight
    its LR sets how fast it moves in units of the activations. Page's bag of tricks trains them
    at 64x the LR (``bias_lr_scale``) with weight decay divided by 64, which keeps their decay per
    step unchanged. A frozen whitening layer's bias feeds a conv instead, and trains at the LR
    itself, as in airbench. ``decay_exempt`` (DECAY_EXEMPT) trains some parameters with no decay at all.
    Each group's ``lr_scale`` is the multiple of the schedule's LR that it trains at.
    ``train_steps`` ({parameter: N}) trains a parameter for its first N steps only: its group's
    ``train_steps`` tells the schedule to hold its LR at 0 from then on (airbench freezes its
    whitening layer's bias so).
    """
    exempt = {id(p) for p in decay_exempt_params(model, decay_exempt)}
    steps = {id(p): n for p, n in (train_steps or {}).items()}
    unscaled = {id(p) for p in whitening_biases(model)}
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr_scale = bias_lr_scale if name.endswith("bias") and id(p) not in unscaled else 1.0
            decay = 0.0 if id(p) in exempt else weight_decay / lr_scale
            groups.setdefault((lr_scale, decay, steps.get(id(p))), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr_scale": lr_scale,
             **({"train_steps": until} if until is not None else {})}
            for (lr_scale, decay, until), params in groups.items()]


# SGD's default momentum (--momentum), as every assignment and Page's ResNet-9 train with it
# (one-cycle's --cycle-momentum moves it in step with the LR instead).
SGD_MOMENTUM = 0.9
SGD_NESTEROV = True
# --optimizer's choices: Adam adds the weight decay to the gradient (L2), AdamW to the step
# (decoupled, so it does not pass through Adam's per-parameter scaling).
OPTIMIZERS = {"sgd": f"SGD with {'Nesterov ' if SGD_NESTEROV else ''}momentum (--momentum)",
              "muon": "Muon (airbench's) for the conv filters, SGD as above for the rest",
              "adam": "Adam (weight decay as L2)",
              "adamw": "AdamW (decoupled weight decay)"}


def make_optimizer(name, model, lr, weight_decay, bias_lr_scale=1.0, decay_exempt="none", fused=False,
                   momentum=SGD_MOMENTUM, train_steps=None, muon_lr_scale=1.0):
    """``fused``: one kernel for the whole update, which also reads fp16's overflow flag on the
    device, so a GradScaler step needs no host sync (``fused_on``); not for Muon, which has none.
    ``momentum``: SGD's. ``muon_lr_scale``: the LR multiple of Muon's filters (``muon_groups``)."""
    groups = param_groups(model, weight_decay, bias_lr_scale, decay_exempt, train_steps)
    extra = {"fused": True} if fused else {}
    if name == "muon":
        return Muon(muon_groups(groups, muon_lr_scale), lr=lr, momentum=momentum, orthogonalize=False)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=SGD_NESTEROV, **extra)
    return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr, **extra)


def muon_groups(groups, lr_scale):
    """``groups`` (``param_groups``) with their conv filters moved to Muon groups of their own, as
    airbench trains them: at ``lr_scale`` times the schedule's LR, momentum 0.6, three
    Newton-Schulz steps, each filter bank kept at a fixed norm and so not decayed. The rest stay
    with Nesterov SGD."""
    split = []
    for group in groups:
        filters = [p for p in group["params"] if p.ndim == 4]
        rest = [p for p in group["params"] if p.ndim != 4]
        if rest:
            split.append({**group, "params": rest})
        if filters:
            split.append({**group, "params": filters, "orthogonalize": True, "lr_scale": group["lr_scale"] * lr_scale,
                          "momentum": AIRBENCH_MOMENTUM, "steps": AIRBENCH_STEPS, "normalize": True,
                          "weight_decay": 0.0})
    return split


def fused_on(device):
    """Whether a run on ``device`` takes the fused optimizers: on CUDA, where they are fastest
    and where fp16's GradScaler would otherwise read ``found_inf`` on the host every step. Not on
    the CPU, where the defaults' figures were measured with the per-tensor (foreach) updates, nor
    on MPS, whose fused kernels arrived in later torch releases than this toolkit supports."""
    return device.type == "cuda"
