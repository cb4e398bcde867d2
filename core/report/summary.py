"""A torchsummary-style model table, the layout users know from the assignments."""

import torch


def summary_table(model, input_size=(3, 32, 32)):
    """Run one dummy batch through ``model`` and tabulate every submodule's output and parameters.

    Rows come from forward hooks, so they follow execution order and a container (a ResBlock)
    appears after its children, and Sequential wrappers are skipped, as in torchsummary. Each row counts only the module's own
    parameters; the totals count each parameter once. The model runs in eval mode under
    no_grad, so BN statistics are untouched.
    """
    rows, hooks = [], []

    def hook(module, _inputs, output):
        name = type(module).__name__
        shape = [-1, *output.shape[1:]] if isinstance(output, torch.Tensor) else []
        params = sum(p.numel() for p in module.parameters(recurse=False))
        numel = output[0].numel() if isinstance(output, torch.Tensor) else 0
        rows.append((f"{name}-{len(rows) + 1}", shape, params, numel))

    for m in model.modules():
        if m is not model and not isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList)):
            hooks.append(m.register_forward_hook(hook))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mb = 4 / 1024 ** 2  # fp32 bytes, in MB
    input_mb = torch.Size(input_size).numel() * mb
    activations_mb = 2 * sum(r[3] for r in rows) * mb  # forward and backward
    params_mb = total * mb
    line = "-" * 64
    out = [line, f"{'Layer (type)':>25}  {'Output Shape':>25} {'Param #':>15}", "=" * 64]
    out += [f"{name:>25}  {str(shape):>25} {params:>15,}" for name, shape, params, _ in rows]
    out += ["=" * 64, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line,
            f"Input size (MB): {input_mb:.2f}", f"Forward/backward pass size (MB): {activations_mb:.2f}",
            f"Params size (MB): {params_mb:.2f}",
            f"Estimated Total Size (MB): {input_mb + activations_mb + params_mb:.2f}", line]
    return "\n".join(out), total
