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
from classicnets.nn.conv_shapes import ConvTranspose2dExact
from classicnets.nn.dense import Dense
from classicnets.nn.upsample import Upsample

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
