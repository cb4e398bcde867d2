"""Grad-CAM (Selvaraju et al. 2017): where in an image a class's evidence lies, as a layer sees it.

For a layer with output A (N, K, h, w) and the logit y_c of class c, the weight of channel k is
the spatial mean of dy_c/dA_k, and the map is ReLU(sum_k weight_k * A_k): the channels that
raise y_c, weighted by how much. For a net that ends in global average pooling and a linear
layer, this is CAM (Zhou et al. 2016), the class's linear weights times the feature maps, up
to a constant. The map is upsampled to the image and scaled to [0, 1] per image.
"""

import torch
import torch.nn.functional as F

from ..models.dilated import DilatedNet
from ..models.fast import FastNet
from ..models.resnet import CustomResNet
from ..models.ultimus import UltimusNet


def default_cam_layer(model):
    """The last layer whose output is still a spatial map, which Grad-CAM reads by default:

    * the ResNet: ``layer3``, its residual block's sum, a 4x4 map of 512 channels;
    * the dilated net: ``blocks``, the last block's output before the GAP (``--c4-size`` pixels
      strided, 32x32 with ``--downsample dilated``);
    * Ultimus: ``conv3``, 48 channels at 26x26 before the GAP (its ReLU is functional, so the
      map is read before it; the ReLU on the final map keeps only positive evidence anyway);
    * the racing net: ``groups``, its last conv group's 256 channels at 3x3 before the max-pool.
    """
    if isinstance(model, CustomResNet):
        return model.layer3
    if isinstance(model, DilatedNet):
        return model.blocks
    if isinstance(model, UltimusNet):
        return model.conv3
    if isinstance(model, FastNet):
        return model.groups
    raise ValueError(f"no default Grad-CAM layer for {type(model).__name__}: pass one")


def grad_cam(model, images, layer, classes=None):
    """(N, H, W) maps in [0, 1] at the images' resolution: Grad-CAM of ``layer`` for ``classes``
    (a LongTensor, one class per image; default: the predicted class).

    The model runs in eval mode (BatchNorm reads its running statistics and updates nothing), in
    fp32 without autocast, and comes back in the mode it had. Gradients are taken with respect
    to the layer's output alone, so no parameter's ``.grad`` is touched; the hook is removed.
    A map that is constant (no positive evidence anywhere) comes back as zeros.
    """
    captured = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.__setitem__("A", output))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            # An input that needs a gradient makes A need one even where the weights do not (an EMA copy).
            logits = model(images.float().detach().requires_grad_(True))
            activations = captured["A"]
            if classes is None:
                classes = logits.argmax(1)
            score = logits.gather(1, classes.to(logits.device).view(-1, 1)).sum()
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
        model.train(was_training)
    weights = gradients.mean((2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin((1, 2), keepdim=True)
    span = cam.amax((1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
