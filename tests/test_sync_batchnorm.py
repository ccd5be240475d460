"""Synchronized batch normalization: two gloo processes vs one process with the whole batch.

The reference is a single process running the unconverted model (classicnets ``BatchNorm``, or
``torch.nn.BatchNorm2d`` itself) on the global batch. The synchronized layer sums per-process
partial sums, a different summation order than the single-process kernel (whose order depends on
the CPU's vector width), so results agree only up to the rounding of those sums. A float32 sum of
n terms is within gamma_n * sum|terms| of the exact sum (gamma_n = n u / (1 - n u), u = 2^-24,
Higham, "Accuracy and Stability of Numerical Algorithms", Sec. 4.2); two orders differ by at most
twice that. ``_tolerance`` applies this bound, with the number of terms each statistic sums over.

Gradients. Each process r computes ``loss_r = sum(w_r * y_r)`` on its slice and calls backward.
The all-reduce in the layer is differentiable, so the gradient that reaches ``x_r`` is
``d(sum_r loss_r) / d x_r``: exactly the single-process gradient of ``sum(w * y)`` restricted to
that slice. Parameters are used locally, so their per-process gradients add up (over processes)
to the single-process gradient, which is what DDP's gradient all-reduce relies on.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from classicnets.nn import BatchNorm, SyncBatchNorm, convert_sync_batchnorm

WORLD_SIZE = 2
STEPS = 3
U32 = 2.0**-24  # float32 unit roundoff


def _model_nchw() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), BatchNorm(4, axis=1), nn.ReLU())


def _model_nhwc() -> nn.Module:
    # Linear acts on the last (channel) axis of [N, H, W, C]; a cumulative running average.
    return nn.Sequential(nn.Linear(3, 4), BatchNorm(4, axis=-1, momentum=None))


def _model_mlp_keras() -> nn.Module:
    # One row per process: only the global batch has more than one value per feature.
    return nn.Sequential(nn.Linear(3, 4), BatchNorm.tensorflow(4, unbiased_running_var=False))


def _model_torch_bn2d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3))


# name -> (model factory, global input shape, rows of the global batch per process)
SCENARIOS = {
    "nchw": (_model_nchw, (8, 3, 4, 4), (4, 4)),
    "nhwc-uneven": (_model_nhwc, (8, 3, 5, 3), (3, 5)),
    "mlp-one-row-each": (_model_mlp_keras, (2, 3), (1, 1)),
    "torch-bn2d": (_model_torch_bn2d, (6, 3, 4, 4), (3, 3)),
}


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _tolerance(n: int, magnitude: float) -> dict[str, float]:
    """``assert_close`` tolerances for a value computed through sums of ``n`` float32 terms whose
    absolute values add up to at most ``magnitude``, by two different summation orders.

    The factor 4 covers the two orders (2) and the two stacked reductions of batch
    normalization, the mean and then the variance around it (2); it adds no slack for one CPU.
    """
    return {"rtol": 0.0, "atol": 4 * _gamma(n) * magnitude}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = SCENARIOS[name][0]()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (BatchNorm, nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def _data(name: str, step: int) -> torch.Tensor:
    """The global batch of a step; the same in every process."""
    shape = SCENARIOS[name][1]
    g = torch.Generator().manual_seed(100 + step)
    return 0.7 * step + (1.0 + 0.5 * step) * torch.randn(shape, generator=g)


def _loss_weights(step: int, out_shape) -> torch.Tensor:
    """Fixed random weights w of the loss sum(w * y) over the global output."""
    return torch.randn(out_shape, generator=torch.Generator().manual_seed(200 + step))


def _bn_of(model: nn.Module) -> nn.Module:
    return model[1]


def _run(model: nn.Module, name: str, rows: slice) -> dict[str, list[torch.Tensor]]:
    """STEPS training steps on ``rows`` of each global batch, then one eval step."""
    result = {"y": [], "x_grad": [], "w_grad": [], "b_grad": []}
    model.train()
    for step in range(STEPS):
        x_global = _data(name, step)
        x = x_global[rows].clone().requires_grad_()
        y = model(x)
        w_global = _loss_weights(step, (x_global.shape[0], *y.shape[1:]))
        model.zero_grad()
        (w_global[rows] * y).sum().backward()
        bn = _bn_of(model)
        result["y"].append(y.detach())
        result["x_grad"].append(x.grad)
        result["w_grad"].append(bn.weight.grad.clone())
        result["b_grad"].append(bn.bias.grad.clone())
    bn = _bn_of(model)
    result["buffers"] = [b.clone() for b in (bn.running_mean, bn.running_var)]
    result["num_batches_tracked"] = int(bn.num_batches_tracked)
    model.eval()
    x_eval = _data(name, STEPS)
    with torch.no_grad():
        result["eval"] = model(x_eval[rows])
    return result


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, (_, _, split) in SCENARIOS.items():
            model = convert_sync_batchnorm(_build(name))
            assert isinstance(_bn_of(model), SyncBatchNorm)
            start = sum(split[:rank])
            results[name] = _run(model, name, slice(start, start + split[rank]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown, as the CLI does under torchrun: gloo's threads
    # can abort a process there ("terminate called without an active exception"), and the
    # spawn would report it failed although its results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _reference_with_scales(name: str):
    """The one-process run, and per step the scales its float32 sums work at.

    For the BN input x of a step (per channel c, over the n values of the global batch):
    sigma_c its standard deviation, kappa = 1 + max_c mean|x_c| / sigma_c the condition of the
    statistics (the mean is off by gamma_n * mean|x|, that is gamma_n * kappa in units of
    sigma; the variance, a sum of squared deviations, by gamma_n * kappa^2 relative), and
    xhat_max the largest normalized value.
    """
    model = _build(name)
    captured = []
    handle = _bn_of(model).register_forward_pre_hook(
        lambda _m, inputs: captured.append(inputs[0].detach().double())
    )
    try:
        reference = _run(model, name, slice(None))
    finally:
        handle.remove()
    bn = _bn_of(model)
    channel_axis = -1 if isinstance(bn, BatchNorm) and bn.axis == -1 else 1
    scales = []
    for x in captured[:STEPS]:
        per_channel = x.movedim(channel_axis, -1).reshape(-1, x.shape[channel_axis])  # (n, C)
        sigma = per_channel.std(dim=0, unbiased=False)
        kappa = 1 + float((per_channel.abs().mean(dim=0) / sigma).max())
        xhat_max = float(((per_channel - per_channel.mean(dim=0)) / sigma).abs().max())
        scales.append((per_channel.shape[0], kappa, float(sigma.min()), xhat_max))
    return reference, scales


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one_process_with_whole_batch(distributed_results, name):
    reference, scales = _reference_with_scales(name)
    weight = float(_build(name)[1].weight.abs().max())
    per_rank = [r[name] for r in distributed_results]
    for step in range(STEPS):
        n, kappa, sigma_min, xhat_max = scales[step]
        x_global = _data(name, step)
        dy = _loss_weights(step, reference["y"][step].shape)  # the output gradient
        # Outputs and input gradients: the ranks' slices, concatenated, are the global ones.
        # y = weight * xhat + bias inherits the statistics' relative error kappa^2 gamma_n.
        tol_y = _tolerance(n, kappa**2 * float(reference["y"][step].abs().max()))
        # dx = weight / sigma * (dy - mean(dy) - xhat * mean(dy * xhat)), each term bounded.
        dx_scale = weight / sigma_min * float(dy.abs().max()) * (1 + xhat_max) ** 2
        tol_dx = _tolerance(n, kappa**2 * dx_scale)
        for key, tol in (("y", tol_y), ("x_grad", tol_dx)):
            got = torch.cat([r[key][step] for r in per_rank])
            torch.testing.assert_close(got, reference[key][step], **tol, msg=f"{key} step {step}")
        # Parameter gradients: the sum over ranks (what DDP all-reduces) is the global one.
        # d weight_c = sum_i dy_i xhat_i over n terms: sum|terms| <= ||dy|| sqrt(n) by
        # Cauchy-Schwarz, since sum_i xhat_i^2 <= n; d bias_c = sum_i dy_i.
        assert x_global.shape[0] == reference["y"][step].shape[0]
        dy_norm = float(dy.norm())
        tol_w = _tolerance(n, kappa**2 * dy_norm * n**0.5)
        tol_b = _tolerance(n, float(dy.abs().sum()))
        for key, tol in (("w_grad", tol_w), ("b_grad", tol_b)):
            got = sum(r[key][step] for r in per_rank)
            torch.testing.assert_close(got, reference[key][step], **tol, msg=f"{key} step {step}")
    n, kappa = scales[-1][0], max(s[1] for s in scales)
    for r in per_rank:  # every process keeps the same running statistics as one process
        for got, want in zip(r["buffers"], reference["buffers"], strict=True):
            # An average over STEPS updates of statistics each of relative error kappa^2 gamma_n.
            tol = _tolerance(n, STEPS * kappa**2 * float(want.abs().max()))
            torch.testing.assert_close(got, want, **tol)
        assert r["num_batches_tracked"] == reference["num_batches_tracked"] == STEPS
    # Evaluation uses the running statistics, whose tolerance is the one just checked.
    tol_eval = _tolerance(n, STEPS * kappa**2 * float(reference["eval"].abs().max()))
    torch.testing.assert_close(
        torch.cat([r["eval"] for r in per_rank]), reference["eval"], **tol_eval
    )


# --------------------------------------------------------------------------- single process


def test_convert_preserves_configuration_and_buffers():
    bn = BatchNorm(5, axis=-1, eps=1e-3, momentum=0.02, unbiased_running_var=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn(torch.randn(4, 3, 5))
    bn.eval()
    model = nn.Sequential(nn.Linear(5, 5), bn)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    converted = convert_sync_batchnorm(model)
    assert converted is model
    sync = model[1]
    assert type(sync) is SyncBatchNorm
    assert (sync.axis, sync.eps, sync.momentum) == (-1, 1e-3, 0.02)
    assert sync.unbiased_running_var is False
    assert sync.affine and sync.track_running_stats
    assert not sync.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(sync(x), bn(x), rtol=0, atol=0)


def test_convert_torch_batchnorm2d():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, eps=1e-4, momentum=None)
    bn(torch.randn(4, 3, 2, 2))
    sync = convert_sync_batchnorm(bn)  # a BN at the top level gives a new object
    assert type(sync) is SyncBatchNorm
    assert (sync.axis, sync.eps, sync.momentum) == (1, 1e-4, None)
    assert sync.unbiased_running_var
    assert sync.training
    for k, v in bn.state_dict().items():
        assert torch.equal(sync.state_dict()[k], v), k
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(sync(x), bn(x), rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sync, name), getattr(bn, name)), name


def test_convert_leaves_other_layers_and_keeps_dtype():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), BatchNorm(3)).double()
    convert_sync_batchnorm(model)
    assert isinstance(model[0], nn.Conv2d)
    assert all(type(m) is SyncBatchNorm for m in model[1:])
    assert model[1].weight.dtype == torch.float64 and model[2].running_var.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [({"axis": 1}, (6, 4, 3, 3)), ({"axis": -1, "unbiased_running_var": False}, (6, 3, 4))],
    ids=["axis1", "axis-1-biased"],
)
def test_sync_without_process_group_is_batchnorm(kwargs, shape):
    assert not dist.is_initialized()
    plain = BatchNorm(4, **kwargs)
    sync = SyncBatchNorm(4, **kwargs)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.normal_()
    sync.load_state_dict(plain.state_dict())
    for step in range(3):
        x = step + torch.randn(shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), sync(xb)
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
    for k, v in plain.state_dict().items():
        assert torch.equal(sync.state_dict()[k], v), k
    plain.eval()
    sync.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    # One value per feature: the same error as BatchNorm, naming the layer.
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4"):
        sync.train()(torch.randn(1, 4))
