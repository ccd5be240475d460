"""Batch normalization that cannot silently use the wrong statistics.

``BatchNorm`` is one module for every layout: it normalizes over every axis but ``axis`` (the
feature axis), so the same class serves an MLP (``[N, C]``), a 1-d CNN (``[N, C, L]``), a 2-d
CNN in PyTorch's layout (``[N, C, H, W]``) and in TensorFlow's (``[N, H, W, C]`` with
``axis=-1``). What it does is decided by ``module.training`` and nothing else:

- training (``model.train()``): the batch's mean and *biased* variance normalize the batch, and
  the running statistics are updated in the same call. There is no separate update op to forget.
- inference (``model.eval()``): the running statistics normalize, and no buffer changes, whatever
  the grad mode. There is no ``tf.cond`` whose "inference" branch still updates averages.

Conventions. PyTorch writes the running-average update with a *momentum*
``running = (1 - momentum) * running + momentum * batch`` (default 0.1, eps 1e-5); TensorFlow with
a *decay* ``moving = decay * moving + (1 - decay) * batch`` (default 0.99, eps 1e-3), so
``decay = 1 - momentum``. ``BatchNorm`` takes either (never both); ``BatchNorm.tensorflow(...)``
gives TensorFlow's defaults. The running variance is updated with the unbiased batch variance by
default (PyTorch, TensorFlow's fused kernel) or the biased one (``unbiased_running_var=False``,
Keras 3 and the ``tf.nn.moments`` + ``ExponentialMovingAverage`` pattern).

Beside it: ``recalibrate_bn`` (precise BN), ``freeze_bn``, ``fold_bn`` and synchronized BN for
DDP (``SyncBatchNorm``, ``convert_sync_batchnorm``). See ``docs/batchnorm.md``.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "BatchNorm",
    "BNFreeze",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "iter_bn_buffers",
    "fold_bn",
    "freeze_bn",
    "is_batchnorm",
    "recalibrate_bn",
]

_UNSET = object()  # distinguishes "momentum not given" from momentum=None (cumulative average)


class BatchNorm(nn.Module):
    """Batch normalization over every axis of the input except ``axis``.

    Args:
        num_features: size of the feature axis (C).
        axis: the feature axis: 1 for ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]``; -1 for
            ``[N, ..., C]`` (TensorFlow's NHWC).
        eps: added to the variance inside the square root.
        momentum: PyTorch convention, weight of the new batch in the running average
            (default 0.1). ``None`` gives a cumulative (equal-weight) average over all batches seen,
            as in PyTorch.
        decay: TensorFlow convention, ``decay = 1 - momentum`` (e.g. 0.99). Give ``momentum`` or
            ``decay``, not both.
        affine: learn a per-feature scale (``weight``, gamma) and offset (``bias``, beta).
        track_running_stats: keep running statistics. Without them the layer always normalizes
            with batch statistics, in training and inference alike (as in PyTorch).
        unbiased_running_var: update ``running_var`` with the unbiased batch variance
            (n / (n - 1) times the biased one: PyTorch, TensorFlow's fused kernel) or, when False,
            with the biased one (Keras 3, ``tf.nn.moments`` + ``ExponentialMovingAverage``).
            Normalization in training always uses the biased variance.

    The ``state_dict`` has the keys and values of ``torch.nn.BatchNorm1d/2d``: ``weight``,
    ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``; it loads both ways.

    >>> bn = BatchNorm(3)
    >>> y = bn(torch.randn(8, 3))          # training: batch statistics, running stats updated
    >>> int(bn.num_batches_tracked)
    1
    >>> _ = bn.eval()(torch.randn(2, 3))   # inference: running statistics, nothing updated
    >>> int(bn.num_batches_tracked)
    1
    """

    def __init__(
        self,
        num_features: int,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = _UNSET,  # type: ignore[assignment]
        decay: float | None = None,
        affine: bool = True,
        track_running_stats: bool = True,
        unbiased_running_var: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if isinstance(axis, bool) or not isinstance(axis, int) or axis == 0:
            raise ValueError(
                f"axis is the feature axis and must be a non-zero int (axis 0 is the batch), "
                f"got {axis!r}"
            )
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        if momentum is not _UNSET and decay is not None:
            raise ValueError(
                f"give momentum (PyTorch convention) or decay (TensorFlow convention), not both: "
                f"momentum={momentum!r}, decay={decay!r}; decay = 1 - momentum"
            )
        if decay is not None:
            if not 0.0 <= decay < 1.0:
                raise ValueError(f"decay must be in [0, 1), got {decay!r}")
            momentum = 1.0 - decay
        elif momentum is _UNSET:
            momentum = 0.1
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1] or None (cumulative), got {momentum!r}")

        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.axis = axis
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.unbiased_running_var = unbiased_running_var
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @classmethod
    def tensorflow(
        cls, num_features: int, axis: int = -1, unbiased_running_var: bool = True, **kwargs
    ) -> BatchNorm:
        """A ``BatchNorm`` with TensorFlow's defaults: decay 0.99, eps 1e-3, channels last.

        ``unbiased_running_var=True`` matches TensorFlow 1/2's fused kernel (the default path of
        ``tf.layers.batch_normalization``/``tf.keras.layers.BatchNormalization`` in TF 2);
        pass ``False`` for Keras 3 and the ``tf.nn.moments`` + ``ExponentialMovingAverage``
        pattern. Other keyword arguments pass through.
        """
        kwargs.setdefault("eps", 1e-3)
        if "momentum" not in kwargs:
            kwargs.setdefault("decay", 0.99)
        return cls(num_features, axis=axis, unbiased_running_var=unbiased_running_var, **kwargs)

    @property
    def decay(self) -> float | None:
        """TensorFlow's name for ``1 - momentum`` (None for a cumulative average)."""
        return None if self.momentum is None else 1.0 - self.momentum

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        momentum = "None (cumulative)" if self.momentum is None else f"{self.momentum:g}"
        return (
            f"{self.num_features}, axis={self.axis}, eps={self.eps:g}, momentum={momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"unbiased_running_var={self.unbiased_running_var}"
        )

    def _check_input(self, x: Tensor) -> int:
        """Validate ``x`` and return the feature axis as a non-negative index."""
        if x.ndim < 2:
            raise ValueError(
                f"{self._describe()} expects input with a batch axis and a feature axis "
                f"(at least 2 dimensions), got shape {tuple(x.shape)}"
            )
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(
                f"{self._describe()}: axis {self.axis} is out of range for input of shape "
                f"{tuple(x.shape)}"
            )
        axis = self.axis % x.ndim
        if axis == 0:
            raise ValueError(
                f"{self._describe()}: axis {self.axis} is the batch axis for input of shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"{self._describe()} expects {self.num_features} features on axis {self.axis}, "
                f"got input of shape {tuple(x.shape)}"
            )
        return axis

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features}, axis={self.axis})"

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def count_batch(self) -> float:
        """Count one training batch (``num_batches_tracked``) and return its weight in the
        running averages: ``momentum``, or for ``momentum=None`` the cumulative average's
        ``1 / batches``, as ``torch.nn.BatchNorm``."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def forward(self, x: Tensor) -> Tensor:
        # Per-call Python overhead matters for small layers (an MLP step at batch 60 calls three
        # of them), so the common case is checked inline and the full check only explains errors.
        ndim = x.dim()
        axis = self.axis + ndim if self.axis < 0 else self.axis
        if not (0 < axis < ndim and x.shape[axis] == self.num_features):
            axis = self._check_input(x)  # raises the precise error
        batch_stats = self.training or not self.track_running_stats
        if batch_stats and x.numel() < 2 * self.num_features:  # one value per feature or fewer
            raise ValueError(
                f"{self._describe()} in training mode needs more than one value per feature to "
                f"compute batch statistics, got input of shape {tuple(x.shape)}; use a batch "
                f"larger than 1 or call model.eval()"
            )
        # PyTorch's fused kernel wants the features on axis 1; moving them there is a view (for
        # NHWC this is exactly a channels_last NCHW tensor, which the kernel handles natively).
        x1 = x if axis == 1 else x.movedim(axis, 1)
        update = batch_stats and self.track_running_stats
        if update:
            # Inference never reaches here, so no buffer can change outside training.
            factor = self.count_batch()
        else:
            factor = 0.0
        if update and not self.unbiased_running_var:
            # Normalize with the fused kernel, update with the *biased* batch variance ourselves.
            y1 = torch.batch_norm(
                x1, self.weight, self.bias, None, None, True, 0.0, self.eps, _cudnn_enabled()
            )
            with torch.no_grad():
                dims = [d for d in range(x1.ndim) if d != 1]
                var, mean = torch.var_mean(x1.detach(), dim=dims, correction=0)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(var.to(self.running_var.dtype), factor)
        else:
            # torch.batch_norm is the op behind F.batch_norm, minus that wrapper's batch-size
            # check (done above) and its Python cost.
            y1 = torch.batch_norm(
                x1,
                self.weight,
                self.bias,
                self.running_mean if self.track_running_stats else None,
                self.running_var if self.track_running_stats else None,
                batch_stats,
                factor,
                self.eps,
                _cudnn_enabled(),
            )
        return y1 if axis == 1 else y1.movedim(1, axis)


def _cudnn_enabled() -> bool:
    return torch.backends.cudnn.enabled


def is_batchnorm(module: nn.Module) -> bool:
    """True for classicnets ``BatchNorm`` and every ``torch.nn`` batch-norm layer."""
    return isinstance(module, (BatchNorm, nn.modules.batchnorm._BatchNorm))


def _bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


# --------------------------------------------------------------------------- recalibration


def _first_input(batch):
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"recalibrate_bn expects batches of tensors or (input, target) tuples, got "
        f"{type(batch).__name__}"
    )


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Precise BN: replace every BN layer's running statistics by exact averages over ``batches``.

    After the call, ``running_mean`` is the plain mean of the per-batch means and ``running_var``
    the plain mean of the per-batch variances (unbiased or biased as each layer updates it), over
    all the batches given, instead of an exponential average dominated by the last few hundred
    training steps (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", Sec. 3). No parameter
    changes. Other modules run in inference mode (dropout off), so the statistics are those the
    layers see at inference; the model's train/eval flags are restored afterwards.

    Args:
        model: the model; called as ``model(x)``.
        batches: an iterable of input tensors or of ``(input, ...)`` tuples.
        max_batches: stop after this many batches.

    Returns:
        The number of batches used.

    Raises:
        ValueError: if the model has no BN layer with running statistics, ``batches`` is empty, or
            a BN layer saw no data.
    """
    layers = [(n, m) for n, m in _bn_layers(model) if m.track_running_stats]
    if not layers:
        raise ValueError("recalibrate_bn: the model has no batch-norm layer with running stats")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for _, m in layers}
    saved = {m: [b.clone() for b in _stat_buffers(m)] for _, m in layers}
    count = 0
    ok = False
    try:
        model.eval()
        for _, m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exactly the mean over batches
            m.training = True  # not m.train(): a layer under freeze_bn must be recalibrated too
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            model(_first_input(batch))
            count += 1
        if count == 0:
            raise ValueError("recalibrate_bn: batches is empty, no statistics were computed")
        missed = [n or "<model>" for n, m in layers if int(m.num_batches_tracked) == 0]
        if missed:
            raise ValueError(f"recalibrate_bn: these BN layers saw no data: {', '.join(missed)}")
        ok = True
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
        if not ok:  # a failed recalibration leaves the previous statistics, not half of new ones
            for m, buffers in saved.items():
                for live, old in zip(_stat_buffers(m), buffers):
                    live.copy_(old)
    return count


def _stat_buffers(m: nn.Module) -> list[Tensor]:
    return [m.running_mean, m.running_var, m.num_batches_tracked]


# --------------------------------------------------------------------------- freezing


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # BN stays in inference behaviour; its children (none for BN) would follow the request.
    self.training = False
    for child in self.children():
        child.train(mode)
    return self


class BNFreeze:
    """Returned by ``freeze_bn``; ``unfreeze()`` (or leaving a ``with`` block) undoes it."""

    def __init__(self, layers: list[tuple[str, nn.Module]], requires_grad: dict) -> None:
        self.layers = layers
        self._requires_grad = requires_grad
        self.active = True

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.layers]

    def unfreeze(self) -> None:
        if not self.active:
            return
        for _, m in self.layers:
            if "train" in m.__dict__:
                del m.__dict__["train"]
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self.active = False

    def __enter__(self) -> BNFreeze:
        return self

    def __exit__(self, *exc) -> None:
        self.unfreeze()


def freeze_bn(model: nn.Module, freeze_affine: bool = False) -> BNFreeze:
    """Keep every BN layer of ``model`` in inference behaviour, even after ``model.train()``.

    Frozen layers normalize with their running statistics and never update them (the usual
    setting for fine-tuning with small batches). With ``freeze_affine=True`` their scale and
    offset also stop receiving gradients. The layers' ``train`` method is overridden on the
    instance; the returned handle restores it (``handle.unfreeze()`` or ``with freeze_bn(m):``).
    After unfreezing the layers stay in inference mode until the next ``model.train()``.

    Raises:
        ValueError: if the model has no BN layer.
    """
    layers = _bn_layers(model)
    if not layers:
        raise ValueError("freeze_bn: the model has no batch-norm layer")
    requires_grad = {}
    for _, m in layers:
        m.train = types.MethodType(_frozen_train, m)
        m.training = False
        if freeze_affine:
            for p in m.parameters(recurse=False):
                requires_grad[p] = p.requires_grad
                p.requires_grad_(False)
    return BNFreeze(layers, requires_grad)


# --------------------------------------------------------------------------- folding

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def _bn_feature_axis_ok(layer: nn.Module, bn: nn.Module) -> bool:
    axis = bn.axis if isinstance(bn, BatchNorm) else 1
    if isinstance(layer, nn.Linear):
        # Linear's features are its last axis; axis=1 is that axis for the usual [N, F] input.
        return axis in (1, -1) and bn.num_features == layer.out_features
    return axis == 1 and bn.num_features == layer.out_channels


def _producer_pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    """(layer, bn) module paths where bn's only input is layer's output and nothing else uses it."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):
        # Keep every BN (ours included, whose input checks cannot be traced) and every foldable
        # layer (subclasses too, e.g. ConvTranspose2dExact) as one leaf node.
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            foldable = is_batchnorm(m) or isinstance(m, _FOLDABLE)
            return foldable or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:
        return None
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not is_batchnorm(bn) or len(node.args) != 1:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if isinstance(model.get_submodule(src.target), _FOLDABLE):
            pairs.append((src.target, node.target))
    return pairs


def _producer_pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if isinstance(a, _FOLDABLE) and is_batchnorm(b):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` computing ``bn(layer(x))`` in inference (Ioffe & Szegedy 2015, Sec. 3.2:
    at inference BN is a fixed affine map y = s * z + t, which composes with the affine layer)."""
    compute = torch.float64
    s = torch.rsqrt(bn.running_var.to(compute) + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.to(compute)
    t = -bn.running_mean.to(compute) * s
    if bn.bias is not None:
        t = t + bn.bias.to(compute)
    w = layer.weight.to(compute)
    if isinstance(layer, nn.ConvTranspose2d):
        # weight layout [in, out / groups, kH, kW]; output channel = g * (out/groups) + j
        g = layer.groups
        w_view = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        new_w = (w_view * s.reshape(g, 1, w.shape[1], *([1] * (w.ndim - 2)))).reshape(w.shape)
    else:
        # Linear [out, in], Conv [out, in / groups, k...]: output features on dim 0
        new_w = w * s.reshape(-1, *([1] * (w.ndim - 1)))
    b = layer.bias.to(compute) if layer.bias is not None else torch.zeros_like(s)
    new_b = b * s + t
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(new_w.to(layer.weight.dtype))
    folded.bias = nn.Parameter(new_b.to(layer.weight.dtype))
    return folded


def fold_bn(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with each BN folded into the layer that feeds it.

    A BN layer is folded when its input is the output of a ``Linear``, ``Conv1d``, ``Conv2d`` or
    ``ConvTranspose2d`` that nothing else uses (found by ``torch.fx`` tracing, or from
    ``nn.Sequential`` order when the model cannot be traced). The folded layer's weight is scaled
    per output feature by ``gamma / sqrt(running_var + eps)`` and its bias becomes
    ``(bias - running_mean) * gamma / sqrt(running_var + eps) + beta``; the BN is replaced by
    ``nn.Identity``. Computed in float64, stored in the layer's dtype. BN layers that cannot be
    folded stay (in inference mode). The original model is untouched.

    A ``Linear`` followed by a BN with ``axis=1`` (or ``torch.nn.BatchNorm1d``) is folded on the
    assumption that the Linear's input is ``[N, F]``, the MLP case: the BN then normalizes the
    Linear's output features. For a ``[N, L, F]`` input such a BN normalizes ``L`` instead and
    must not be folded; the module structure cannot tell the two apart, so use ``axis=-1`` for
    BN over a Linear's features on sequences.

    Raises:
        ValueError: if ``model`` is in training mode (its BN layers would use batch statistics,
            which no folded weight can reproduce): call ``model.eval()`` first.
    """
    training = [n or "<model>" for n, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fold_bn needs a model in inference mode; call model.eval() first "
            f"(in training mode: {', '.join(training[:5])}{', ...' if len(training) > 5 else ''})"
        )
    pairs = _producer_pairs_fx(model)
    if pairs is None:
        pairs = _producer_pairs_sequential(model)
    folded_model = copy.deepcopy(model)
    for layer_path, bn_path in pairs:
        layer = folded_model.get_submodule(layer_path)
        bn = folded_model.get_submodule(bn_path)
        if not bn.track_running_stats or not _bn_feature_axis_ok(layer, bn):
            continue
        _set_submodule(folded_model, layer_path, _folded(layer, bn))
        _set_submodule(folded_model, bn_path, nn.Identity())
    return folded_model.eval()


# --------------------------------------------------------------------------- synchronized BN


def _dist_ready(process_group) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` whose training statistics are computed over the batch of every process.

    Under ``torch.distributed`` each process holds a part of the global batch; in training this
    layer all-reduces the per-feature sums (through autograd, so gradients are exact too) and
    normalizes with the global mean and biased variance, and updates the running statistics with
    the global variance (unbiased over the global count, or biased, as configured), so every
    process keeps identical buffers. Works with any backend (gloo on CPU, NCCL on CUDA) and any
    ``axis``. Without an initialized process group of more than one process, or in inference, it
    is exactly ``BatchNorm``.
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if not (self._uses_batch_stats() and _dist_ready(self.process_group)):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        axis = self._check_input(x)
        dims = [d for d in range(x.ndim) if d != axis]
        shape = [1] * x.ndim
        shape[axis] = self.num_features
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        local_count = torch.tensor([x.numel() // self.num_features], dtype=compute, device=x.device)
        count = all_reduce(local_count, group=self.process_group)
        if float(count) <= 1:
            raise ValueError(
                f"{self._describe()} in training mode needs more than one value per feature "
                f"across processes, got input of shape {tuple(x.shape)} on this process"
            )
        # Two passes (sum, then sum of squared deviations) for the same accuracy as one process.
        mean = all_reduce(xc.sum(dim=dims), group=self.process_group) / count
        centered = xc - mean.reshape(shape)
        var = all_reduce((centered * centered).sum(dim=dims), group=self.process_group) / count
        scale = torch.rsqrt(var + self.eps)
        y = centered * scale.reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                factor = self.count_batch()
                n = float(count)
                batch_var = var.detach() * (n / (n - 1)) if self.unbiased_running_var else var
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_(batch_var.detach().to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def _to_sync(bn: nn.Module, process_group) -> SyncBatchNorm:
    if isinstance(bn, BatchNorm):
        kwargs = dict(
            axis=bn.axis,
            unbiased_running_var=bn.unbiased_running_var,
        )
    else:  # torch.nn.BatchNorm*d: features on axis 1, unbiased running variance
        kwargs = dict(axis=1, unbiased_running_var=True)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    sync = SyncBatchNorm(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        process_group=process_group,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
        **kwargs,
    )
    sync.load_state_dict(bn.state_dict())
    sync.train(bn.training)
    return sync


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every BN layer (classicnets or ``torch.nn``) with ``SyncBatchNorm``, in place.

    Keeps each layer's axis, eps, momentum, affine and running-variance conventions and its
    parameters and buffers. Returns the model (a new object only if ``model`` itself is a BN).
    Unlike ``torch.nn.SyncBatchNorm``, the result also runs on CPU with the gloo backend.
    """
    if is_batchnorm(model) and not isinstance(model, SyncBatchNorm):
        return _to_sync(model, process_group)
    for name, child in list(model.named_children()):
        setattr(model, name, convert_sync_batchnorm(child, process_group))
    return model


def iter_bn_buffers(model: nn.Module) -> Iterator[Tensor]:
    """The running-statistics buffers of every BN layer, in a fixed order (for broadcasting)."""
    for _, m in _bn_layers(model):
        if m.track_running_stats:
            yield m.running_mean
            yield m.running_var
            yield m.num_batches_tracked
