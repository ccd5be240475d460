"""Model families, one per file, registered by name (see ``registry``)."""

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
