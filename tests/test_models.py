"""Every registered model passes the same checks (STYLE.md: shape, finiteness, gradients,
deterministic eval, state_dict round trip)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from classicnets.models import MLP, create_model, list_models
from classicnets.nn import BatchNorm

ENTRIES = list_models()


def _input(entry, seed=0):
    g = torch.Generator().manual_seed(seed)
    if entry.input_dtype == "long":
        return torch.randint(0, 10, entry.example_input_shape, generator=g)
    return torch.rand(entry.example_input_shape, generator=g)


def _first(out):
    # Recurrent models return (output, hidden state): check the output.
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_registered_model_contract(entry):
    torch.manual_seed(0)
    model = create_model(entry.name, **entry.test_kwargs)
    x = _input(entry)
    model.train()
    out = _first(model(x))
    assert out.shape[0] == x.shape[0]
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"parameters without gradient: {missing}"
    model.eval()
    with torch.no_grad():
        assert torch.equal(_first(model(x)), _first(model(x)))
        reference = _first(model(x))
    clone = create_model(entry.name, **entry.test_kwargs)
    blob = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    clone.load_state_dict(st_load(blob))
    clone.eval()
    with torch.no_grad():
        assert torch.equal(_first(clone(x)), reference)


def test_mlp_structure_and_bias_with_norm():
    plain = MLP(hidden_sizes=(100, 100, 100))
    with_bn = MLP(hidden_sizes=(100, 100, 100), norm="batchnorm")
    assert len(plain.blocks) == 3 and plain.blocks[0].linear.bias is not None
    assert with_bn.blocks[0].linear.bias is None  # BN's beta replaces it
    assert isinstance(with_bn.blocks[2].norm, BatchNorm)
    n_plain = sum(p.numel() for p in plain.parameters())
    assert n_plain == 784 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10


def test_mlp_errors_and_gaussian_init():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP(activation="swish")
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        MLP(norm="layer")
    torch.manual_seed(0)
    m = MLP(hidden_sizes=(400,), init_std=0.1)
    w = m.blocks[0].linear.weight
    # 313,600 N(0, 0.01) draws: the sample std is within 1% of 0.1 with overwhelming probability
    assert abs(w.std().item() - 0.1) < 1e-3 and m.head.bias.abs().sum() == 0


def test_presets_build_their_class_with_overridable_defaults():
    from classicnets.models import model_entry, register_presets

    def has_bn(model) -> bool:
        return any(isinstance(m, BatchNorm) for m in model.modules())

    assert has_bn(create_model("mlp-bn", hidden_sizes=(8,)))
    assert not has_bn(create_model("mlp", hidden_sizes=(8,)))
    assert has_bn(create_model("mlp", hidden_sizes=(8,), norm="batchnorm"))  # a default, overridden
    assert model_entry("resnet-small").test_kwargs is not model_entry("resnet-basic").test_kwargs
    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_presets(MLP, {"mlp": ("again", {})}, example_input_shape=(1, 784))
