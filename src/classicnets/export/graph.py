"""From a PyTorch model to a straight-line list of layers: ``torch.fx`` tracing plus op converters.

``trace_layers(model, make_inputs)`` traces ``model`` with ``torch.fx`` (BN, recurrent and other
layers with a converter stay whole, as leaf modules) and converts each graph node with the
converter registered for its module type, function or method (``converters.py``). The tracer
evaluates every node on real tensors as it goes (a "shadow" eager run), so Python control flow on
shapes and flags takes the eager model's branch. It traces twice, at batch sizes 2 and 3 (and,
for sequence models, once more with a longer sequence): the axes whose sizes differ are the
dynamic ones, so a reshape is written with ``-1`` there and works for any batch size. Values
that are not tensors (``x.shape[0]``, ``None``) stay Python values; nodes that read only
parameters are folded to constants.

Adding a layer type is one converter::

    @register_module(nn.Softmax)
    def _softmax_module(cx, node, module, x):
        return cx.emit(node, "softmax", [x], {"axis": cx.axis(x, module.dim)})

Converters receive the converted arguments: ``Value`` for tensors computed at run time,
``Const`` for parameters and buffers, ``Static`` for anything else (ints, tuples, None).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

# The converters register themselves on import (their own module: one place to read and extend
# the op coverage); they and this module share the values and the registry of ``ir``.
from classicnets.export import converters as _converters  # noqa: F401
from classicnets.export.ir import (
    FUNCTIONS,
    METHODS,
    Const,
    ExportGraph,
    Static,
    Value,
    module_converter,
    register_function,
    register_method,
    register_module,
    varying_axes,
)
from classicnets.export.numpy_bundle import ExportError
from classicnets.nn.batchnorm import is_batchnorm

__all__ = [
    "Const",
    "ExportGraph",
    "Static",
    "Value",
    "register_function",
    "register_method",
    "register_module",
    "trace_layers",
]

BATCH_A, BATCH_B = 2, 3  # two batch sizes: the axes whose size differs are the batch axes


class _ShadowProxy(torch.fx.Proxy):
    """A proxy that also knows its value in an eager run, so ``len(x)`` works while tracing."""

    def __len__(self) -> int:
        return len(self.tracer.concrete[self.node])


class _Tracer(torch.fx.Tracer):
    """``torch.fx`` tracing with a shadow eager run of the same inputs.

    Modules we convert whole stay leaf nodes (BN's input checks and ``nn.LSTM``'s internals
    cannot be traced, and a subclass's forward may compute sizes in Python). Every node is also
    evaluated on concrete tensors as it is created, so Python control flow on shapes and flags
    (``if y.ndim != 1``, ``len(z)``, ``x if flag else y``) takes the branch the eager model
    takes; values such a branch bakes into the graph are only ever read through the recorded
    shapes of two traces at different batch sizes (see ``trace_layers``).
    """

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__()
        self.values = values  # forward's parameter name -> concrete argument
        self.concrete: dict[torch.fx.Node, Any] = {}
        self._evaluating = False

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_batchnorm(m) or module_converter(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ShadowProxy(node, self)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return bool(self.concrete[obj.node])

    def iter(self, obj: torch.fx.Proxy):
        return iter([obj[i] for i in range(len(self.concrete[obj.node]))])

    def keys(self, obj: torch.fx.Proxy):
        return self.concrete[obj.node].keys()

    # While a node is evaluated eagerly, fx's patched Module.__call__ / __getattr__ must behave
    # as the originals: no new nodes, real parameters.
    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        self._evaluating = True
        try:
            self.concrete[proxy.node] = self._evaluate(proxy.node)
        finally:
            self._evaluating = False
        return proxy

    def _value(self, node: torch.fx.Node) -> Any:
        if node not in self.concrete and node.op == "get_attr":  # a tensor constant fx made
            self.concrete[node] = self._attribute(node.target)
        return self.concrete[node]

    def _attribute(self, target: str) -> Any:
        value = self.root
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def _evaluate(self, node: torch.fx.Node) -> Any:
        args = torch.fx.node.map_arg(node.args, self._value)
        kwargs = torch.fx.node.map_arg(node.kwargs, self._value)
        with torch.no_grad():
            if node.op == "placeholder":
                name = node.target.lstrip("*")
                if name not in self.values:  # fx names a pinned argument "noise_1"
                    name = name.rpartition("_")[0]
                return self.values[name]
            if node.op == "get_attr":
                return self._attribute(node.target)
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
        return None


def _trace(model: nn.Module, inputs: tuple) -> tuple[torch.fx.Graph, dict]:
    """Trace ``model`` on ``inputs``; forward's other parameters are pinned to their defaults."""
    params = list(inspect.signature(model.forward).parameters.values())
    values = {p.name: v for p, v in zip(params, inputs)}
    pinned = {}
    for p in params[len(inputs) :]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise ExportError(f"{type(model).__name__}.forward needs argument {p.name!r}")
        pinned[p.name] = values[p.name] = p.default
    tracer = _Tracer(values)
    try:
        graph = tracer.trace(model, concrete_args=pinned or None)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
    return graph, tracer.concrete


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _contains(value, kind: type) -> bool:
    if isinstance(value, kind):
        return True
    if isinstance(value, (tuple, list)):
        return any(_contains(v, kind) for v in value)
    if isinstance(value, dict):
        return any(_contains(v, kind) for v in value.values())
    return False


# --------------------------------------------------------------------------- the converter context


class Context:
    """What converters use: emitting layers, naming tensors, the shapes of every trace."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.layers: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}
        self._tensor_keys: dict[tuple, str] = {}
        self._names: set[str] = set()
        self._constants: dict[str, Value] = {}
        self.results: list[dict[torch.fx.Node, Any]] = []  # one per trace, keyed by trace 0

    def result(self, node: torch.fx.Node) -> Any:
        """The node's value in the first trace."""
        return self.results[0][node]

    def shapes(self, node: torch.fx.Node) -> tuple[tuple[int, ...], ...]:
        """The shape of a tensor node in every trace."""
        return tuple(tuple(r[node].shape) for r in self.results)

    # -- naming ------------------------------------------------------------------------------

    def unique_name(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}#{k}"
        self._names.add(name)
        return name

    def layer_name(self, node: torch.fx.Node) -> str:
        return node.target if node.op == "call_module" else node.name

    def tensor_key(self, layer: str, role: str, tensor: torch.Tensor) -> str:
        """Store ``tensor`` once: a tensor shared by two layers (tied weights) gets one key."""
        t = tensor.detach()
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if identity in self._tensor_keys:
            return self._tensor_keys[identity]
        key = f"{layer}.{role}"
        array = t.cpu().numpy()
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        self.tensors[key] = np.ascontiguousarray(array)
        self._tensor_keys[identity] = key
        return key

    # -- emitting ----------------------------------------------------------------------------

    def emit(
        self,
        node: torch.fx.Node,
        op: str,
        inputs: Sequence[Value],
        attrs: dict[str, Any] | None = None,
        tensors: dict[str, torch.Tensor | None] | None = None,
        name: str | None = None,
    ):
        """Append one layer; return its output(s) shaped like the node's result."""
        name = self.unique_name(name or self.layer_name(node))
        for value in inputs:
            if not isinstance(value, Value):
                raise ExportError(f"{name} ({op}): expected a tensor input, got {value!r}")
        keys = {
            role: self.tensor_key(name, role, t) for role, t in (tensors or {}).items()
            if t is not None
        }  # fmt: skip
        flats = [_flatten(r[node]) for r in self.results]
        count = len(flats[0])
        names = [name] if count == 1 else [f"{name}:{i}" for i in range(count)]
        self.layers.append(
            {
                "name": name,
                "op": op,
                "inputs": [v.name for v in inputs],
                "outputs": names,
                "attrs": _jsonable(attrs or {}),
                "tensors": keys,
            }
        )
        values = iter(
            Value(n, tuple(tuple(f[i].shape) for f in flats), flats[0][i].dtype)
            for i, n in enumerate(names)
        )
        return _unflatten(self.result(node), values)

    def value(self, node: torch.fx.Node, arg) -> Value:
        """``arg`` as a run-time value: constants become a ``constant`` layer."""
        if isinstance(arg, Value):
            return arg
        if isinstance(arg, Const):
            key = self.tensor_key(f"const_{node.name}", "value", arg.tensor)
            if key not in self._constants:
                name = self.unique_name(key)
                t = arg.tensor
                self.layers.append(
                    {
                        "name": name,
                        "op": "constant",
                        "inputs": [],
                        "outputs": [name],
                        "attrs": {"shape": list(t.shape)},
                        "tensors": {"value": key},
                    }
                )
                shapes = (tuple(t.shape),) * len(self.results)  # the same in every trace
                self._constants[key] = Value(name, shapes, t.dtype)
            return self._constants[key]
        raise ExportError(f"{node.name}: expected a tensor, got {arg!r}")

    def axis(self, value: Value, axis: int) -> int:
        """``axis`` as a non-negative index into ``value``'s dimensions."""
        return axis % value.ndim if value.ndim else 0

    def static(self, arg, what: str) -> Any:
        """A Python argument that must not depend on the batch size."""
        if isinstance(arg, Static):
            if arg.varies:
                raise ExportError(f"{what} depends on the input size ({arg.values})")
            return arg.a
        if isinstance(arg, (Value, Const)):
            raise ExportError(f"{what} must be a Python value, got a tensor")
        return arg


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _flatten(item)]
    return []


def _unflatten(template, values):
    if isinstance(template, torch.Tensor):
        return next(values)
    if isinstance(template, (tuple, list)):
        return tuple(_unflatten(item, values) for item in template)
    return Static((template,))


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


# --------------------------------------------------------------------------- tracing


def _convert_node(cx: Context, node: torch.fx.Node, env: dict) -> Any:
    args = torch.fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
    results = tuple(r[node] for r in cx.results)
    first = results[0]
    if node.op == "get_attr":
        return Const(first) if isinstance(first, torch.Tensor) else Static(results)
    if not _has_tensor(first):
        return Static(results)  # shape arithmetic, None, assertions, ...
    if not _contains((args, kwargs), Value):
        # Reads only parameters and constants: fold to a constant (the same in every trace).
        if isinstance(first, torch.Tensor) and all(
            isinstance(r, torch.Tensor) and r.shape == first.shape and torch.equal(r, first)
            for r in results[1:]
        ):
            return Const(first.detach())
    if node.op == "call_module":
        module = cx.root.get_submodule(node.target)
        fn = module_converter(module)
        if fn is None:
            raise ExportError(
                f"no converter for module {node.target!r} ({type(module).__name__}); register "
                f"one with classicnets.export.graph.register_module"
            )
        return fn(cx, node, module, *args, **kwargs)
    if node.op == "call_function":
        if _is_tuple_class(node.target):  # a NamedTuple of outputs
            return tuple(args)
        fn = FUNCTIONS.get(node.target)
        if fn is None:
            name = getattr(node.target, "__name__", repr(node.target))
            raise ExportError(
                f"no converter for function {name!r} (node {node.name}); register one with "
                f"classicnets.export.graph.register_function"
            )
        return fn(cx, node, *args, **kwargs)
    if node.op == "call_method":
        fn = METHODS.get(node.target)
        if fn is None:
            raise ExportError(
                f"no converter for tensor method {node.target!r} (node {node.name}); register "
                f"one with classicnets.export.graph.register_method"
            )
        return fn(cx, node, *args, **kwargs)
    raise ExportError(f"unexpected graph node {node.op} {node.name}")


def _input_value(name: str, values: tuple):
    first = values[0]
    if isinstance(first, torch.Tensor):
        return Value(name, tuple(tuple(v.shape) for v in values), first.dtype)
    if isinstance(first, (tuple, list)):
        parts = zip(*values)
        return tuple(_input_value(f"{name}.{i}", part) for i, part in enumerate(parts))
    return Static(values)


def _structure(value):
    if isinstance(value, Value):
        return value.name
    if isinstance(value, (tuple, list)):
        return [_structure(v) for v in value]
    raise ExportError(f"model output {value!r} is not a tensor")


_DTYPE_NAMES = {torch.float32: "float32", torch.int64: "int64", torch.float64: "float64"}


def trace_layers(
    model: nn.Module, make_inputs: Callable[..., tuple], sequence: bool = False
) -> ExportGraph:
    """Convert ``model`` (in eval mode) into an ``ExportGraph``.

    Args:
        model: the model; it is traced with ``torch.fx`` and must be in eval mode.
        make_inputs: ``make_inputs(batch_size, extra_length=0) -> tuple`` of ``forward``'s
            positional arguments (tensors, or tuples of tensors such as an LSTM's ``(h, c)``);
            ``extra_length`` lengthens sequence inputs.
        sequence: also trace with a longer sequence, so that the sequence axis is dynamic too.

    Raises:
        ExportError: the model is in training mode, cannot be traced, or uses a module, function
            or method without a converter (the message names it).
    """
    training = [n or "<model>" for n, m in model.named_modules() if m.training]
    if training:
        raise ExportError(
            f"export needs model.eval() (in training mode: {', '.join(training[:3])})"
        )
    input_sets = [make_inputs(BATCH_A), make_inputs(BATCH_B)]
    if sequence:
        input_sets.append(make_inputs(BATCH_A, extra_length=1))
    traces = [_trace(model, inputs) for inputs in input_sets]
    graph = traces[0][0]
    nodes = list(graph.nodes)
    for other, _ in traces[1:]:
        others = list(other.nodes)
        if len(others) != len(nodes) or any(
            (a.op, a.target) != (b.op, b.target) for a, b in zip(nodes, others)
        ):
            raise ExportError(
                f"{type(model).__name__}: the traced graph changes with the input size (Python "
                f"control flow on the batch size); it cannot be exported as one graph"
            )
    cx = Context(model)
    cx.results = [
        {a: _result_of(b, results, model) for a, b in zip(nodes, other.nodes)}
        for other, results in traces
    ]

    env: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    input_specs, input_structure = [], []
    num_inputs = len(input_sets[0])
    for i, node in enumerate(placeholders[:num_inputs]):
        value = _input_value(node.name, tuple(inputs[i] for inputs in input_sets))
        env[node] = value
        input_structure.append(_structure(value))
        for v in _flatten_values(value):
            varying = varying_axes(v.shapes)
            shape = [None if k in varying else n for k, n in enumerate(v.shape_a)]
            dtype = _DTYPE_NAMES.get(v.dtype, str(v.dtype).removeprefix("torch."))
            input_specs.append({"name": v.name, "shape": shape, "dtype": dtype})
            cx._names.add(v.name)
    for node in placeholders[num_inputs:]:  # arguments pinned to their defaults
        env[node] = Static(tuple(r[node] for r in cx.results))

    outputs = None
    for node in nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = _structure(torch.fx.node.map_arg(node.args[0], lambda n: env[n]))
            break
        env[node] = _convert_node(cx, node, env)
    return ExportGraph(input_specs, input_structure, outputs, cx.layers, cx.tensors)


def _result_of(node: torch.fx.Node, results: dict, model: nn.Module) -> Any:
    """The value of a node that fx created without a proxy (so without a shadow value)."""
    if node not in results:
        if node.op == "get_attr":  # a tensor constant fx attached to the traced module
            value = model
            for part in node.target.split("."):
                value = getattr(value, part, None)
            results[node] = value
        elif node.op == "call_function" and _is_tuple_class(node.target):
            # fx builds a NamedTuple output (VAEOutput) with a node of its own
            args = torch.fx.node.map_arg(node.args, lambda n: _result_of(n, results, model))
            results[node] = node.target(*args)
        else:
            results[node] = None
    return results[node]


def _is_tuple_class(target) -> bool:
    return isinstance(target, type) and issubclass(target, tuple)


def _flatten_values(value) -> list[Value]:
    if isinstance(value, Value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flatten_values(item)]
    return []
