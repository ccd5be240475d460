"""Model families, one per file, registered by name (see ``registry``)."""

from classicnets.models.mlp import MLP
from classicnets.models.registry import create_model, list_models, model_entry, register_model

__all__ = ["MLP", "create_model", "list_models", "model_entry", "register_model"]
