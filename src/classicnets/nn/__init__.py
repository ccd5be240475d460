"""Layers of classicnets: batch normalization done right, and the building blocks around it."""

from classicnets.nn import functional
from classicnets.nn.batchnorm import (
    BatchNorm,
    BNFreeze,
    SyncBatchNorm,
    convert_sync_batchnorm,
    fold_bn,
    freeze_bn,
    is_batchnorm,
    iter_bn_buffers,
    recalibrate_bn,
)
from classicnets.nn.layers import ConvTranspose2dExact, Dense, Upsample

__all__ = [
    "BNFreeze",
    "BatchNorm",
    "ConvTranspose2dExact",
    "Dense",
    "SyncBatchNorm",
    "Upsample",
    "convert_sync_batchnorm",
    "fold_bn",
    "freeze_bn",
    "functional",
    "is_batchnorm",
    "iter_bn_buffers",
    "recalibrate_bn",
]
