"""Model constructors, by the names the CLIs use."""

from .resnet import CustomResNet

MODELS = {"resnet": CustomResNet}


def build_model(name, **kwargs):
    return MODELS[name](**kwargs)
