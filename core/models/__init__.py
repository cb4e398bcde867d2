"""Model constructors, by the names the CLIs use."""

from .resnet import CustomResNet
from .ultimus import UltimusNet

MODELS = {"resnet": CustomResNet, "ultimus": UltimusNet}


def build_model(name, **kwargs):
    return MODELS[name](**kwargs)
