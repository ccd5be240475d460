"""The MLP classifier's training step written out: forward, backward and SGD, no autograd.

A batch-60 step of bn-mlp's 784-100-100-100-10 network spends less time in its matrix products
than in dispatching the small operations around them and in running autograd's engine and the
optimizer's Python. ``MLPStep`` calls the same ATen kernels that autograd and
``torch.optim.SGD`` call, on the same operands in the same layouts and in the same order, so its
loss, logits, gradients, weights and BN buffers equal theirs bit for bit
(``tests/test_mlp_step.py`` holds it to that), in about two thirds of the time on one CPU
thread (``docs/benchmarks.md``).

What it covers, and ``MLPStep.of`` returns None for anything else (the step then goes through
autograd as before): a ``classicnets.models.MLP`` on the CPU in training mode; hidden blocks of
``nn.Linear``, optionally ``classicnets.nn.BatchNorm`` (affine, tracking running statistics with
the unbiased variance, PyTorch's default), and a sigmoid, tanh, ReLU or identity; a float32
cross-entropy on class labels; plain SGD (no momentum, weight decay, Nesterov or ``maximize``)
over exactly the model's parameters, all trainable; no clipping, gradient scaling,
``torch.compile``, ``torchrun`` or module hooks.

The backward pass of each operation is autograd's formula for it, as ``torch`` computes it:
``mm(h, W.t())`` gives ``W.grad = mm(g.t(), h)`` and ``h.grad = mm(g, W)`` (autograd's
``mm_mat1_backward`` / ``mm_mat2_backward`` for a transposed, column-major ``W.t()``), the bias
gets ``g.sum(0)``, and BN, the activations, log-softmax and NLL their own ``*_backward`` kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from classicnets.models.mlp import MLP
from classicnets.nn.batchnorm import BatchNorm

__all__ = ["MLPStep"]

aten = torch.ops.aten

# activation module type -> (forward, backward(grad, output)): backward from the output alone
_ACTIVATIONS = {
    nn.Sigmoid: (torch.sigmoid, aten.sigmoid_backward),
    nn.Tanh: (torch.tanh, aten.tanh_backward),
    nn.ReLU: (torch.relu, lambda grad, out: aten.threshold_backward(grad, out, 0)),
    nn.Identity: (None, None),
}
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")  # fmt: skip
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_SGD_DEFAULTS = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False,
                 "maximize": False}  # fmt: skip


class MLPStep:
    """One SGD step of cross-entropy on an ``MLP``; ``step(x, y) -> (loss, logits)``.

    Build it with ``MLPStep.of(model, optimizer)``; call ``applies()`` before each step (the
    model back in training mode, no hook added since). The learning rate is read from the
    optimizer's groups at every step, so schedules apply as they do to ``optimizer.step()``.
    """

    def __init__(self, model: MLP, optimizer: torch.optim.SGD) -> None:
        self.model = model
        self.optimizer = optimizer
        self.blocks = []  # (linear, bn or None, forward, backward) per hidden block
        for block in model.blocks:
            norm = getattr(block, "norm", None)
            forward, backward = _ACTIVATIONS[type(block.act)]
            self.blocks.append((block.linear, norm, forward, backward))
        # Every hook registry that could hold a hook the written-out step would skip; torch adds
        # and removes hooks in these dicts in place, so they are looked up once.
        from torch.nn.modules import module as registry  # where torch keeps global hooks

        self._hooks = [getattr(registry, name) for name in _GLOBAL_HOOKS if hasattr(registry, name)]
        self._hooks += [getattr(m, name) for m in model.modules() for name in _MODULE_HOOKS]
        self._one = torch.ones(())  # d loss / d loss, as autograd seeds the backward pass

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer) -> MLPStep | None:
        """The written-out step for ``model`` and ``optimizer``, or None where it does not
        cover them (the module docstring lists what it covers)."""
        if type(model) is not MLP or type(optimizer) is not torch.optim.SGD:
            return None
        params = list(model.parameters())
        grouped = [p for group in optimizer.param_groups for p in group["params"]]
        if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
            return None
        if not all(p.requires_grad and p.device.type == "cpu" and p.dtype == torch.float32
                   for p in params):  # fmt: skip
            return None
        for group in optimizer.param_groups:
            if any(group.get(key, default) != default for key, default in _SGD_DEFAULTS.items()):
                return None
            if group.get("fused") or group.get("differentiable"):
                return None
        for block in model.blocks:
            if set(dict(block.named_children())) - {"linear", "norm", "act"}:
                return None
            if type(block.act) not in _ACTIVATIONS or type(block.linear) is not nn.Linear:
                return None
            norm = getattr(block, "norm", None)
            if norm is not None and not (
                type(norm) is BatchNorm and norm.affine and norm.track_running_stats
                and norm.unbiased_running_var and norm.axis in (1, -1)
            ):  # fmt: skip
                return None
        if type(model.head) is not nn.Linear:
            return None
        step = cls(model, optimizer)
        return step if step.applies() else None

    def applies(self) -> bool:
        """Whether this step equals autograd's now: training mode and no hooks that the
        written-out step would not run."""
        return self.model.training and not any(self._hooks)

    @torch.no_grad()
    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One step on inputs ``x`` ([N, ...], flattened as ``MLP.forward`` does) and labels
        ``y``: the mean cross-entropy (0-d) and the logits, both detached."""
        h = x.reshape(x.shape[0], -1)
        saved = []
        for linear, norm, forward, _ in self.blocks:
            if norm is None:
                z = torch.addmm(linear.bias, h, linear.weight.t())
                a = z
                stats = None
            else:
                z = torch.mm(h, linear.weight.t())
                a, mean, invstd = torch.native_batch_norm(
                    z, norm.weight, norm.bias, norm.running_mean, norm.running_var, True,
                    norm.count_batch(), norm.eps,
                )  # fmt: skip
                stats = (mean, invstd)
            out = a if forward is None else forward(a)
            saved.append((h, z, stats, out))
            h = out
        head = self.model.head
        logits = (torch.addmm(head.bias, h, head.weight.t()) if head.bias is not None
                  else torch.mm(h, head.weight.t()))  # fmt: skip
        log_p = aten._log_softmax(logits, 1, False)
        loss, total_weight = aten.nll_loss_forward(log_p, y, None, 1, -100)  # mean reduction

        # backward, last operation first
        grads: dict[Tensor, Tensor] = {}
        g = aten.nll_loss_backward(self._one, log_p, y, None, 1, -100, total_weight)
        g = aten._log_softmax_backward_data(g, log_p, 1, torch.float32)
        g = self._linear_backward(head, h, g, grads, True)
        for i in range(len(self.blocks) - 1, -1, -1):
            linear, norm, _, backward = self.blocks[i]
            h_in, z, stats, out = saved[i]
            if backward is not None:
                g = backward(g, out)
            if norm is not None:
                g, grads[norm.weight], grads[norm.bias] = aten.native_batch_norm_backward(
                    g, z, norm.weight, norm.running_mean, norm.running_var, *stats, True,
                    norm.eps, [True, True, True],
                )  # fmt: skip
            g = self._linear_backward(linear, h_in, g, grads, i > 0)

        # SGD (torch.optim.SGD's foreach update without momentum), the gradients left in .grad
        for group in self.optimizer.param_groups:
            params = group["params"]
            torch._foreach_add_(params, [grads[p] for p in params], alpha=-group["lr"])
        for param, grad in grads.items():
            param.grad = grad
        return loss, logits

    @staticmethod
    def _linear_backward(linear: nn.Linear, h: Tensor, g: Tensor, grads: dict, needs_input):
        grads[linear.weight] = torch.mm(g.t(), h)
        if linear.bias is not None:
            grads[linear.bias] = g.sum(0)
        return torch.mm(g, linear.weight) if needs_input else None
