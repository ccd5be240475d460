"""Metrics: classification (accuracy, confusion matrix, per-class precision/recall/F1, plots).

NumPy only at import time: neither torch nor matplotlib is imported by ``import
classicnets.metrics`` (the plot functions import matplotlib when called). The package's names are
those of ``metrics.classification``.
"""

from classicnets.metrics.classification import *  # noqa: F403
from classicnets.metrics.classification import __all__  # noqa: F401
