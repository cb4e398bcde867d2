"""Model constructors, by the names the CLIs use."""

from .dilated import DilatedNet
from .fast import FastNet
from .resnet import CustomResNet
from .ultimus import UltimusNet

MODELS = {"resnet": CustomResNet, "dilated": DilatedNet, "ultimus": UltimusNet, "fast": FastNet}

