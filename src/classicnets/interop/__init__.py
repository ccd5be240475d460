"""Models from other frameworks, brought over with their batch normalization intact."""

from classicnets.interop.keras import KerasImportError, KerasModel, load_keras, read_keras

__all__ = ["KerasImportError", "KerasModel", "load_keras", "read_keras"]
