"""What differs between the scripts: the model, its augmentation, and its default hyperparameters.

Everything else (data, engine, outputs, CLI flags) is shared, so a script is a recipe name.
"""

from dataclasses import dataclass, field

from . import augment


@dataclass(frozen=True)
class Recipe:
    name: str  # model registry key, run-folder prefix, script suffix
    augment: object  # recipe(x, generator, mean, std) on a normalized batch
    description: str
    defaults: dict = field(default_factory=dict)

    @property
    def script(self):
        return f"train_{self.name}.py"


RECIPES = {
    "resnet": Recipe(
        "resnet", augment.resnet_recipe,
        "Train the custom ResNet (Page's ResNet-9 layout) on CIFAR-10 with a one-cycle policy.",
        dict(epochs=24, batch_size=512, lr_max=0.4, lr_min=0.004, max_at_epoch=5, optimizer="sgd",
             weight_decay=5e-4, label_smoothing=0.2),
    ),
}
