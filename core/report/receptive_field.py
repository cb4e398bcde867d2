"""Receptive-field table of a CNN, computed from the model itself, layer by layer.

For each Conv2d, MaxPool2d, AvgPool2d and global AdaptiveAvgPool2d, in the order the forward
runs them, the standard recurrence with the effective kernel k_eff = d * (k - 1) + 1:

    rout = rin + (k_eff - 1) * jin        jout = jin * stride

where j is the jump (input pixels between neighbouring outputs) and r the receptive field.
Global average pooling counts as a kernel the size of its input with stride 1, as the
assignment's table does.

(r, j) belongs to tensors, not to layer order, so branches are handled: one dummy forward runs
under a torch-function mode that tags every tensor an op returns with (r, j) merged from its
tagged inputs, and forward hooks on the layers above apply the recurrence to their outputs.
An op joining tensors (torch.cat, a residual add) takes the largest r of its inputs, which
must share one j; ops such as BN, ReLU, dropout or flatten pass (r, j) through.
"""

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

COLUMNS = ("layer", "nin", "in_ch", "out_ch", "padding", "kernel", "stride", "dilation", "nout",
           "jin", "jout", "rin", "rout")
RF_LAYERS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _Tags(TorchFunctionMode):
    """Tags each tensor an op returns with the (r, j) of its tagged inputs.

    Tags are keyed by id(); the tensors are kept alive alongside so that no id is reused.
    """

    def __init__(self):
        super().__init__()
        self.tags = {}

    def get(self, t):
        return self.tags.get(id(t), (None, None))[1]

    def set(self, t, rj):
        self.tags[id(t)] = (t, rj)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = [rj for t in _tensors((args, kwargs)) if (rj := self.get(t)) is not None]
        if known:
            if len({j for _, j in known}) > 1:
                name = getattr(func, "__name__", func)
                raise ValueError(f"{name} joins tensors of different jumps: {known}")
            rj = (max(r for r, _ in known), known[0][1])
            for t in _tensors(out):
                self.set(t, rj)
        return out


def _geometry(module, nin, nout):
    """(padding, kernel, stride, dilation) of an RF layer, as single ints."""
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if nout != 1:
            raise ValueError("only global AdaptiveAvgPool2d (output size 1) is supported")
        return 0, nin, 1, 1
    geometry = module.padding, module.kernel_size, module.stride, getattr(module, "dilation", 1)
    return tuple(_first(v) for v in geometry)


def receptive_field_table(model, input_size=32):
    """One row dict per RF layer, keyed by COLUMNS, in forward order.

    The model runs once, in eval mode and without gradients, on a zero (1, 3, size, size) image.
    """
    tags, rows = _Tags(), []
    names = {m: name for name, m in model.named_modules() if isinstance(m, RF_LAYERS)}

    def hook(module, inputs, output):
        x = inputs[0]
        if tags.get(x) is None:
            raise ValueError(f"{names[module]}: its input does not trace back to the image")
        rin, jin = tags.get(x)
        nin, nout = x.shape[-2], output.shape[-2]
        padding, kernel, stride, dilation = _geometry(module, nin, nout)
        rout, jout = rin + dilation * (kernel - 1) * jin, jin * stride
        tags.set(output, (rout, jout))
        rows.append(dict(layer=names[module], nin=nin, in_ch=x.shape[1], out_ch=output.shape[1],
                         padding=padding, kernel=kernel, stride=stride, dilation=dilation,
                         nout=nout, jin=jin, jout=jout, rin=rin, rout=rout))

    handles = [m.register_forward_hook(hook) for m in names]
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad(), tags:
            x = torch.zeros(1, 3, input_size, input_size, device=device)
            tags.set(x, (1, 1))
            model(x)
    finally:
        for m, training in modes:
            m.training = training
        for h in handles:
            h.remove()
    return rows


def format_rf_table(rows):
    """A Markdown table of the rows, then a line 'Receptive field: N' with the last rout."""
    cells = [list(COLUMNS)] + [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines + ["", f"Receptive field: {rows[-1]['rout']}"])
