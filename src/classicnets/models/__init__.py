"""Model families, one per file, registered by name (see ``registry``).

Importing the package imports every family, which registers its presets: the registry itself
imports none of them (no file of the package imports one that imports it back).
"""

from classicnets.models import autoencoder, gan, vae  # noqa: F401 (their presets)
from classicnets.models.mlp import MLP
from classicnets.models.registry import (
    create_model,
    list_models,
    model_entry,
    register_model,
    register_presets,
)
from classicnets.models.resnet import BasicBlock, Bottleneck, ResNet
from classicnets.models.rnnlm import RNNLanguageModel

__all__ = [
    "MLP",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "RNNLanguageModel",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
    "register_presets",
]
