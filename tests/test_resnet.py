"""ResNet (He et al. 2016): shapes through the stages, shortcuts, bottleneck expansion, injected
norms, parameter count by formula, zero-init residual blocks, and BN folding of the whole net.

The registry contract (shape, finiteness, gradients, determinism, state_dict) is in test_models.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from classicnets.models import BasicBlock, Bottleneck, ResNet, create_model
from classicnets.nn import BatchNorm, fold_bn, is_batchnorm
from tolerances import network

VARIANTS = ["resnet-small", "resnet-medium", "resnet-bottleneck", "resnet-basic"]
TINY = {"widths": (4, 8, 8)}


def _images(n=2, seed=0, dtype=torch.float32):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _blocks(model: ResNet) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]


def _record_shapes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict:
    """Run ``model(x)`` and return {name: (input shape, output shape)} of the named submodules."""
    shapes, handles = {}, []
    for name in names:

        def hook(module, args, out, name=name):
            shapes[name] = (tuple(args[0].shape), tuple(out.shape))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize("name", VARIANTS)
def test_full_size_output_shape(name):
    torch.manual_seed(0)
    model = create_model(name)
    out = model(_images(2))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, channels",
    [
        ("resnet-small", (16, 64, 128, 256)),
        ("resnet-medium", (16, 64, 128, 256)),
        ("resnet-basic", (32, 32, 64, 128)),
    ],
)
def test_spatial_sizes_through_the_stages(name, channels):
    model = create_model(name).eval()
    shapes = _record_shapes(model, ["stem", "stages.0", "stages.1", "stages.2"], _images(2))
    sizes = [shapes[n][1] for n in ["stem", "stages.0", "stages.1", "stages.2"]]
    assert sizes == [(2, c, s, s) for c, s in zip(channels, (28, 28, 14, 7))]
    assert model.num_features == channels[-1] and model.head.in_features == channels[-1]


@pytest.mark.parametrize("name", VARIANTS)
def test_projection_shortcut_exactly_where_the_shape_changes(name):
    model = create_model(name).eval()
    blocks = _blocks(model)
    shapes = _record_shapes(model, [n for n, _ in blocks], _images(2))
    projections = []
    for block_name, block in blocks:
        shape_in, shape_out = shapes[block_name]
        if shape_in == shape_out:
            assert isinstance(block.shortcut, nn.Identity), block_name
            continue
        projections.append(block_name)
        conv, norm = block.shortcut.conv, block.shortcut.norm  # option B: 1x1 conv -> norm
        assert conv.kernel_size == (1, 1) and conv.bias is None
        assert conv.stride == (shape_in[2] // shape_out[2],) * 2
        assert (conv.in_channels, conv.out_channels) == (shape_in[1], shape_out[1])
        assert isinstance(norm, BatchNorm) and norm.num_features == shape_out[1]
    # Bottleneck stage 0 widens the stem (16 -> 64), basic stage 0 keeps it (32 -> 32); the
    # first block of every later stage halves the size; every other block keeps the shape.
    first = ["stages.0.0"] if name != "resnet-basic" else []
    assert projections == [*first, "stages.1.0", "stages.2.0"]


def test_bottleneck_expands_by_four_with_stride_on_the_3x3():
    assert Bottleneck.expansion == 4 and BasicBlock.expansion == 1
    block = Bottleneck(in_channels=24, planes=8, stride=2).eval()
    assert block.conv1.kernel_size == (1, 1) and block.conv1.out_channels == 8
    assert block.conv2.kernel_size == (3, 3) and block.conv2.stride == (2, 2)
    assert block.conv1.stride == (1, 1) and block.conv3.stride == (1, 1)  # ResNet v1.5
    assert block.conv3.out_channels == 32
    assert block(torch.rand(2, 24, 9, 9)).shape == (2, 32, 5, 5)
    model = create_model("resnet-bottleneck")
    for _, b in _blocks(model):
        assert b.conv3.out_channels == 4 * b.conv1.out_channels == 4 * b.conv2.out_channels


@pytest.mark.parametrize("norm_layer", [None, "none"])
def test_no_norm_means_no_bn_and_biased_convs(norm_layer):
    torch.manual_seed(0)
    model = create_model("resnet-small", norm_layer=norm_layer, **TINY)
    assert not any(is_batchnorm(m) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is not None for c in convs)
    assert isinstance(model.stages[0][0].norm3, nn.Identity)  # names stay, norms are identities
    assert model(_images(2)).shape == (2, 10)


def test_injected_norm_layer():
    model = create_model("resnet-bottleneck", **TINY)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if is_batchnorm(m)]
    assert all(type(m) is BatchNorm for m in norms)  # classicnets BN by default
    assert len(norms) == len(convs) and all(c.bias is None for c in convs)  # one norm per conv
    assert isinstance(create_model("resnet-basic", norm_layer="batchnorm").stem.norm, BatchNorm)
    torch_bn = create_model("resnet-basic", norm_layer=nn.BatchNorm2d, **TINY)
    assert isinstance(torch_bn.stages[1][0].shortcut.norm, nn.BatchNorm2d)
    assert not any(isinstance(m, BatchNorm) for m in torch_bn.modules())


def test_errors():
    with pytest.raises(ValueError, match="unknown norm_layer 'layer'"):
        create_model("resnet-small", norm_layer="layer")
    with pytest.raises(ValueError, match="unknown block 'wide'"):
        ResNet("wide", (1,), (4,))
    with pytest.raises(ValueError, match="one entry per stage"):
        ResNet(Bottleneck, (1, 1), (4,))


def _bottleneck_params(c_in: int, planes: int, shortcut: bool) -> int:
    """Conv weights (no bias) plus BN gamma and beta, counted by hand."""
    out = 4 * planes
    n = c_in * planes + 2 * planes  # 1x1 reduce + norm
    n += 9 * planes * planes + 2 * planes  # 3x3 + norm
    n += planes * out + 2 * out  # 1x1 expand + norm
    if shortcut:
        n += c_in * out + 2 * out  # projection 1x1 + norm
    return n


def test_resnet_small_parameter_count_by_formula():
    stem = 1 * 16 * 9 + 2 * 16
    # One block per stage, each with a projection: 16 -> 64, 64 -> 128 (stride 2), 128 -> 256.
    blocks = sum(_bottleneck_params(c, p, True) for c, p in [(16, 16), (64, 32), (128, 64)])
    head = 256 * 10 + 10
    expected = stem + blocks + head
    model = create_model("resnet-small")
    assert sum(p.numel() for p in model.parameters()) == expected == 127_354


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    conv = create_model("resnet-bottleneck").stages[2][0].conv2  # 3x3, 128 -> 128
    fan_out = conv.out_channels * 9
    # 147,456 draws from N(0, 2 / fan_out): the sample std is within 1% of the target
    assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.01


@pytest.mark.parametrize("norm_layer", ["batchnorm", None])
@pytest.mark.parametrize("name", VARIANTS)
def test_zero_init_residual_blocks_start_as_shortcuts(name, norm_layer):
    torch.manual_seed(0)
    model = create_model(name, zero_init_residual=True, norm_layer=norm_layer, **TINY)
    shapes = _record_shapes(model.eval(), [n for n, _ in _blocks(model)], _images(2))
    for mode in (True, False):  # batch and running statistics alike
        model.train(mode)
        for block_name, block in _blocks(model):
            x = torch.randn(shapes[block_name][0])
            with torch.no_grad():
                assert torch.equal(block(x), torch.relu(block.shortcut(x))), block_name
    plain = create_model(name, norm_layer=norm_layer, **TINY).eval()
    block = plain.stages[1][0]
    x = torch.randn(2, block.conv1.in_channels, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(block(x), torch.relu(block.shortcut(x)))


# At most 23 layers of fan-in 8 * 9 (TINY widths 4, 8, 8, 3x3 kernels): tolerances.network.
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, network(23, 72)), (torch.float64, network(23, 72, u=2.0**-53))]
)
@pytest.mark.parametrize("name", VARIANTS)
def test_fold_bn_folds_every_norm_and_keeps_outputs(name, dtype, tol):
    torch.manual_seed(0)
    model = create_model(name, **TINY).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):  # a few steps so gamma, beta and the running statistics move
        x = _images(16, seed=step, dtype=dtype)
        y = torch.arange(16) % 10
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    folded = fold_bn(model)
    assert not any(is_batchnorm(m) for m in folded.modules())  # every BN had its conv
    x = _images(8, seed=99, dtype=dtype)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    # Logits are O(1): the relative bound serves as the absolute one.
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "name", ["resnet-small", "resnet-medium", "resnet-bottleneck", "resnet-basic"]
)
def test_preset_descriptions_state_the_built_network(name):
    from classicnets.models import model_entry

    stages = list(create_model(name).stages)  # each a sequence of blocks
    last = "conv3" if isinstance(stages[0][0], Bottleneck) else "conv2"
    layers = tuple(len(stage) for stage in stages)
    planes = "-".join(str(stage[0].conv1.out_channels) for stage in stages)
    outputs = "-".join(str(getattr(stage[-1], last).out_channels) for stage in stages)
    text = model_entry(name).description
    assert f"stages {layers} of planes {planes}" in text, text
    assert (f"(outputs {outputs})" in text) == (last == "conv3"), text
