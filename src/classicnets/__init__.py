"""classicnets: the classic deep-learning models on PyTorch, done right.

The top level imports nothing heavy: ``import classicnets`` does not import torch, so that
tools which only need NumPy (the exported-model runtime, ``classicnets predict``) work where
torch is not installed. Import the submodules you need::

    from classicnets.nn import BatchNorm
    from classicnets.nn import functional as CF
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
