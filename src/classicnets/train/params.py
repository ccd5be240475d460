"""Parameter selection by name: optimizer groups, no-decay splits, freezing.

Parameters are selected with fnmatch-style globs over the names of ``model.named_parameters()``
(``generator.*``, ``*.bn*``, ``blocks.0.*``). A pattern may also name a module: ``generator``
selects every parameter under ``generator.``, and a glob over module paths (``blocks.?``) selects
every parameter under each module it matches. Matching is case-sensitive (``fnmatchcase``).

A pattern that selects nothing is an error, never a silent no-op: a typo in a freeze list or an
optimizer group would otherwise train (or freeze) the wrong parameters without a word.

Typical uses::

    # two optimizers over one model (a GAN): each sees only its own sub-network
    opt_g = torch.optim.Adam([p for _, p in select_parameters(model, "generator")], lr=2e-4)
    opt_d = torch.optim.Adam([p for _, p in select_parameters(model, "discriminator")], lr=2e-4)

    # weight decay on weights only, a smaller learning rate for the pretrained trunk
    groups = param_groups(model, [{"params": "trunk", "lr": 1e-3}], weight_decay=5e-4, lr=1e-2)
    optimizer = torch.optim.SGD(groups, momentum=0.9)
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from classicnets.nn import is_batchnorm

__all__ = [
    "ParameterSelectionError",
    "freeze",
    "no_decay_names",
    "param_groups",
    "select_parameters",
    "unfreeze",
]

Patterns = str | Iterable[str]

# Normalization layers whose 1-d parameters (scale and offset) get no weight decay. BN layers
# (classicnets and torch.nn) are found by ``is_batchnorm``; these are the others torch provides.
_OTHER_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_SHOWN_MODULES = 10  # how many module paths an error message lists


class ParameterSelectionError(ValueError):
    """A pattern selected no parameter, a selection was empty, or two groups overlap."""


def _as_patterns(patterns: Patterns) -> list[str]:
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"parameter patterns must be strings, got {p!r}")
    return out


def _module_prefixes(name: str) -> list[str]:
    """``"a.b.weight"`` -> ``["a", "a.b"]``: the paths of the modules that own the parameter."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _matches(name: str, pattern: str) -> bool:
    if fnmatchcase(name, pattern):
        return True
    return any(fnmatchcase(prefix, pattern) for prefix in _module_prefixes(name))


def _available(names: list[str]) -> str:
    """The first few owning module paths (or root-level parameter names), for error messages."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.rpartition(".")[0] or name, None)
    modules = list(seen)
    shown = ", ".join(modules[:_SHOWN_MODULES])
    more = f", ... ({len(modules) - _SHOWN_MODULES} more)" if len(modules) > _SHOWN_MODULES else ""
    return shown + more


def _check_all_match(pattern_list: list[str], names: list[str], role: str) -> None:
    for pattern in pattern_list:
        if not any(_matches(n, pattern) for n in names):
            raise ParameterSelectionError(
                f"{role} pattern {pattern!r} matches no parameter; "
                f"modules with parameters: {_available(names) or '(none)'}"
            )


def select_parameters(
    model: nn.Module, patterns: Patterns, exclude: Patterns = ()
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``model`` selected by ``patterns`` minus ``exclude``.

    A parameter is selected when any pattern matches its full name or the path of a module that
    owns it (so ``"generator"`` selects ``generator.0.weight``), and no exclude pattern does.

    >>> model = nn.ModuleDict({"enc": nn.Linear(2, 2), "dec": nn.Linear(2, 2)})
    >>> [n for n, _ in select_parameters(model, "*.weight")]
    ['enc.weight', 'dec.weight']
    >>> [n for n, _ in select_parameters(model, "enc")]
    ['enc.weight', 'enc.bias']
    >>> [n for n, _ in select_parameters(model, "*", exclude="*.bias")]
    ['enc.weight', 'dec.weight']

    Args:
        model: the module whose ``named_parameters()`` are searched (shared parameters appear
            once, under their first name, as there).
        patterns: one fnmatch glob or a list of them.
        exclude: globs (same rules) of parameters to leave out of the selection.

    Returns:
        The selected pairs in ``named_parameters()`` order, each once.

    Raises:
        ParameterSelectionError: if a pattern or an exclude pattern matches no parameter of the
            model (the message names it and lists available module paths), or if nothing is left
            after exclusion.
    """
    include = _as_patterns(patterns)
    leave_out = _as_patterns(exclude)
    if not include:
        raise ParameterSelectionError("no parameter patterns given")
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    _check_all_match(include, names, "parameter")
    _check_all_match(leave_out, names, "exclude")
    selected = [
        (n, p)
        for n, p in named
        if any(_matches(n, pat) for pat in include)
        and not any(_matches(n, pat) for pat in leave_out)
    ]
    if not selected:
        raise ParameterSelectionError(
            f"patterns {include} minus exclude {leave_out} select no parameter"
        )
    return selected


def _is_bias_name(name: str) -> bool:
    # ``bias`` (Linear, Conv, norms) and torch RNNs' ``bias_ih_l0`` / ``bias_hh_l0_reverse``.
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.startswith("bias_")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that conventionally get no weight decay.

    These are every parameter of a batch-norm layer (``classicnets.nn.is_batchnorm``), every 1-d
    parameter of another normalization layer (LayerNorm, GroupNorm, InstanceNorm, RMSNorm), and
    every bias (a name whose last component is ``bias``, or ``bias_*`` as in torch's RNNs).

    Why: decaying a BN scale toward zero does not regularize the function the way decaying a
    weight does, because the following normalization undoes the scale of what precedes it; it
    only changes the effective learning rate (van Laarhoven 2017, "L2 Regularization versus Batch
    and Weight Normalization"). Biases and offsets have too few entries to overfit. The rule is
    "no bias decay" of He et al. 2019 ("Bag of Tricks for Image Classification with CNNs",
    Sec. 3.1) and timm's ``param_groups_weight_decay``.

    Args:
        model: the module to inspect.
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if is_batchnorm(module):
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        elif isinstance(module, _OTHER_NORMS):
            names.update(
                prefix + n for n, p in module.named_parameters(recurse=False) if p.ndim == 1
            )
    names.update(n for n, _ in model.named_parameters() if _is_bias_name(n))
    return names


def param_groups(
    model: nn.Module,
    groups: list[dict[str, Any]] | None = None,
    weight_decay: float = 0.0,
    lr: float | None = None,
    decay_norm_and_bias: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups from name patterns, with norm parameters and biases undecayed.

    The rule:

    1. Each spec in ``groups`` selects parameters by its ``params`` patterns (and optional
       ``exclude`` patterns), as ``select_parameters`` does. Its other keys (``lr``,
       ``weight_decay``, ``momentum``, ``betas``, ...) become the group's options; ``lr`` and
       ``weight_decay`` default to the arguments of this function (``lr=None`` leaves the
       optimizer's own default). A parameter selected by two specs is an error.
    2. Parameters selected by no spec form the group ``"default"`` with the function's ``lr`` and
       ``weight_decay``.
    3. Unless ``decay_norm_and_bias``, each group with a nonzero weight decay is split: the
       parameters in ``no_decay_names(model)`` (BN parameters, other norms' 1-d parameters,
       biases) move to a sibling group named ``"<name>/no_decay"`` with ``weight_decay=0.0`` and
       otherwise the same options. Groups with zero weight decay are not split.
    4. Empty groups are dropped. Groups come in spec order, each followed by its ``no_decay``
       sibling, then the default groups; parameters keep ``named_parameters()`` order.

    Every returned group has a ``name`` key: the spec's ``name`` (default ``"group<i>"``),
    ``"default"``, or one of those plus ``"/no_decay"``. Torch optimizers keep extra keys in
    their ``param_groups`` and ``state_dict``, so names survive a checkpoint.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in param_groups(model,
    ...                                                                         weight_decay=0.1)]
    [('default', 1, 0.1), ('default/no_decay', 3, 0.0)]

    Args:
        model: the module whose parameters are grouped (frozen ones included, so that a later
            ``unfreeze`` trains them without rebuilding the optimizer).
        groups: specs, each a dict with ``params`` (a pattern or list of patterns) and optional
            ``name``, ``exclude`` and optimizer options. None: one default group.
        weight_decay: the weight decay of the default group and of specs that set none.
        lr: the learning rate of the default group and of specs that set none; None leaves the
            optimizer's ``lr`` argument in charge.
        decay_norm_and_bias: apply weight decay to norm parameters and biases too (no split).

    Returns:
        A list of dicts to pass to a ``torch.optim`` optimizer.

    Raises:
        ParameterSelectionError: a spec's pattern matches nothing, a spec selects nothing, or two
            specs select the same parameter (named in the message).
        ValueError: a spec without ``params``, or two groups with the same name.
    """
    no_decay = set() if decay_norm_and_bias else no_decay_names(model)
    owner: dict[str, str] = {}
    raw: list[tuple[str, list[tuple[str, nn.Parameter]], dict[str, Any]]] = []
    for index, spec in enumerate(groups or []):
        if "params" not in spec:
            raise ValueError(f"parameter group spec {index} has no 'params' patterns: {spec}")
        options = {k: v for k, v in spec.items() if k not in ("params", "exclude", "name")}
        name = str(spec.get("name", f"group{index}"))
        selected = select_parameters(model, spec["params"], spec.get("exclude", ()))
        for param_name, _ in selected:
            if param_name in owner:
                raise ParameterSelectionError(
                    f"parameter {param_name!r} is selected by two groups, "
                    f"{owner[param_name]!r} and {name!r}"
                )
            owner[param_name] = name
        raw.append((name, selected, options))
    rest = [(n, p) for n, p in model.named_parameters() if n not in owner]
    raw.append(("default", rest, {}))

    result: list[dict[str, Any]] = []
    for name, selected, options in raw:
        options = dict(options)
        options.setdefault("weight_decay", weight_decay)
        if lr is not None:
            options.setdefault("lr", lr)
        split = options["weight_decay"] != 0
        decayed = [p for n, p in selected if not (split and n in no_decay)]
        undecayed = [p for n, p in selected if split and n in no_decay]
        if decayed:
            result.append({"name": name, "params": decayed, **options})
        if undecayed:
            result.append({"name": f"{name}/no_decay", "params": undecayed, **options})
            result[-1]["weight_decay"] = 0.0
    names = [g["name"] for g in result]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"parameter groups share the names {duplicated}; give each spec a name")
    return result


def _set_requires_grad(model: nn.Module, patterns: Patterns, flag: bool) -> list[str]:
    selected = select_parameters(model, patterns)
    for _, p in selected:
        p.requires_grad_(flag)
    return [n for n, _ in selected]


def freeze(model: nn.Module, patterns: Patterns) -> list[str]:
    """Stop gradients to the parameters selected by ``patterns`` (``requires_grad=False``).

    Only ``requires_grad`` changes: BN layers still update running statistics in training mode
    (``classicnets.nn.freeze_bn`` stops that too).

    Args:
        model: the module.
        patterns: globs or module names, as in ``select_parameters``.

    Returns:
        The names of the frozen parameters.

    Raises:
        ParameterSelectionError: as ``select_parameters``.
    """
    return _set_requires_grad(model, patterns, False)


def unfreeze(model: nn.Module, patterns: Patterns) -> list[str]:
    """``freeze`` undone: gradients flow again to the parameters selected by ``patterns``, as
    in ``select_parameters``; returns their names."""
    return _set_requires_grad(model, patterns, True)
