"""Keras import: parity with Keras's own outputs, recorded in fixtures (no TensorFlow in CI).

``tests/keras_fixtures/make_fixtures.py`` built each model with Keras 3, trained it a few steps so
its moving statistics moved, and saved it as ``.keras`` and ``.h5`` with inputs, Keras's
inference outputs and the moving statistics after one more training-mode call. Every supported
layer appears in at least one fixture (checked below).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from classicnets.interop import KerasImportError, load_keras, read_keras
from classicnets.interop.keras import SUPPORTED_LAYERS
from classicnets.nn import BatchNorm
from tolerances import two_orders

h5py = pytest.importorskip("h5py")

FIXTURES = Path(__file__).resolve().parent / "keras_fixtures"

# Float32 error of the imported network against Keras's: each layer is a sum of at most fan_in
# products (two orders: Keras's kernels and ours may block them differently), the error of one
# layer passes through the next ones at most unamplified for these small weights (|w| < 1), and
# the errors of the layers add up: depth * two_orders(fan_in, scale), scale = max |output|
# (the recurrent layers count once per time step).
MODELS = {  # name: (depth, largest fan-in)
    "dense": (13, 8),
    "conv": (12, 12 * 9),
    "recurrent": (3 * 7, 8 + 6 + 1),
    "bn_axis": (3, 24),
}


def _fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz", allow_pickle=False) as data:
        return dict(data)


def _tolerance(name: str, reference: np.ndarray) -> float:
    depth, fan_in = MODELS[name]
    return depth * two_orders(fan_in, float(np.abs(reference).max()))


@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_equal_keras_in_inference(name, fmt):
    data = _fixture(name)
    model = load_keras(FIXTURES / f"{name}.{fmt}")
    assert not model.training
    with torch.no_grad():
        got = model(torch.from_numpy(data["x"])).numpy()
    np.testing.assert_allclose(got, data["y"], rtol=0, atol=_tolerance(name, data["y"]))


def test_channels_first_takes_and_returns_nchw():
    data = _fixture("conv")
    model = load_keras(FIXTURES / "conv.keras", channels_first=True)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2)  # (N, 3, 9, 9)
    with torch.no_grad():
        got = model(x).numpy()
    np.testing.assert_allclose(got, data["y"], rtol=0, atol=_tolerance("conv", data["y"]))


@pytest.mark.parametrize("name", ["dense", "conv", "bn_axis"])
def test_bn_layers_keep_keras_conventions_and_update_like_keras(name):
    data = _fixture(name)
    model = load_keras(FIXTURES / f"{name}.keras")
    bns = {n: m.bn for n, m in model.layers.items() if hasattr(m, "bn")}
    assert bns and all(isinstance(bn, BatchNorm) for bn in bns.values())
    config = json.loads(zipfile.ZipFile(FIXTURES / f"{name}.keras").read("config.json"))
    by_name = {layer["config"]["name"]: layer["config"] for layer in config["config"]["layers"]}
    for layer_name, bn in bns.items():
        keras_config = by_name[layer_name]
        assert bn.eps == pytest.approx(keras_config["epsilon"])
        assert bn.decay == pytest.approx(keras_config["momentum"])  # Keras's momentum is decay
        assert bn.unbiased_running_var is False  # Keras 3's moving-variance rule
        assert bn.weight.requires_grad == keras_config["scale"]
        assert bn.bias.requires_grad == keras_config["center"]
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(data["xb"]))  # one training-mode call, as the fixture made
    for layer_name, bn in bns.items():
        for ours, theirs in ((bn.running_mean, "moving_mean"), (bn.running_var, "moving_variance")):
            want = data[f"bn.{layer_name}.{theirs}"]
            # An average over the batch (at most 12 * 5 * 5 values) blended with the old value.
            tol = two_orders(12 * 25, float(np.abs(want).max()) * 4)
            np.testing.assert_allclose(ours.numpy(), want, rtol=0, atol=tol, err_msg=layer_name)


def test_every_supported_layer_is_covered_by_a_fixture():
    seen = set()
    for name in MODELS:
        config = read_keras(FIXTURES / f"{name}.keras").config
        seen |= {layer["class_name"] for layer in config["config"]["layers"]}
    assert set(SUPPORTED_LAYERS) <= seen, set(SUPPORTED_LAYERS) - seen


# --------------------------------------------------------------------------- Keras 2 files


def _keras2_copy(source: Path, target: Path) -> None:
    """A legacy .h5 written the way Keras 2 / tf.keras writes it: list-style inbound nodes,
    ``batch_input_shape``, ``alpha`` for LeakyReLU and weight names ending in ``:0``."""
    shutil.copy(source, target)
    with h5py.File(target, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for layer in config["config"]["layers"]:
            c = layer["config"]
            if layer["class_name"] == "InputLayer":
                c["batch_input_shape"] = c.pop("batch_shape")
            if layer["class_name"] == "LeakyReLU":
                c["alpha"] = c.pop("negative_slope")
            nodes = []
            for node in layer.get("inbound_nodes", []):
                args = node["args"][0]
                tensors = args if isinstance(args, list) else [args]
                nodes.append([[t["config"]["keras_history"][0], 0, 0, {}] for t in tensors])
            if "inbound_nodes" in layer:
                layer["inbound_nodes"] = nodes
        for key in ("input_layers", "output_layers"):  # Keras 2: always a list of [name, 0, 0]
            spec = config["config"].get(key)
            if spec and isinstance(spec[0], str):
                config["config"][key] = [spec]
        f.attrs["model_config"] = json.dumps(config)
        root = f["model_weights"]
        for layer in root.attrs["layer_names"]:
            group = root[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            renamed = []
            for n in names:
                group.move(n, n + ":0")
                renamed.append(n + ":0")
            group.attrs["weight_names"] = [n.encode() for n in renamed]


@pytest.mark.parametrize("name", list(MODELS))
def test_keras2_style_legacy_files(name, tmp_path):
    data = _fixture(name)
    path = tmp_path / f"{name}.h5"
    _keras2_copy(FIXTURES / f"{name}.h5", path)
    with torch.no_grad():
        got = load_keras(path)(torch.from_numpy(data["x"])).numpy()
    np.testing.assert_allclose(got, data["y"], rtol=0, atol=_tolerance(name, data["y"]))


# --------------------------------------------------------------------------- refusals


def _edit_archive(source: Path, target: Path, change) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                config = json.loads(data)
                change(config)
                data = json.dumps(config).encode()
            dst.writestr(item, data)


def _layer_named(config: dict, class_name: str) -> dict:
    return next(l for l in config["config"]["layers"] if l["class_name"] == class_name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: _layer_named(c, "Conv2DTranspose").update(class_name="Conv3DTranspose"),
         "(Conv3DTranspose) is not supported; supported layers: InputLayer, Dense"),
        (lambda c: _layer_named(c, "Conv2D")["config"].update(activation="swish"),
         "activation 'swish' is not supported"),
        (lambda c: _layer_named(c, "Conv2D")["config"].update(data_format="channels_first"),
         "data_format 'channels_first' (channels_last only)"),
        (lambda c: _layer_named(c, "UpSampling2D")["config"].update(interpolation="bilinear"),
         "interpolation 'bilinear' (nearest only)"),
        (lambda c: _layer_named(c, "ReLU")["config"].update(max_value=6.0),
         "ReLU with max_value or threshold is not supported"),
    ],
)  # fmt: skip
def test_unsupported_layers_and_options_are_refused_by_name(change, message, tmp_path):
    path = tmp_path / "edited.keras"
    _edit_archive(FIXTURES / "conv.keras", path, change)
    with pytest.raises(KerasImportError) as info:
        load_keras(path)
    assert message in str(info.value) and "layer '" in str(info.value)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(KerasImportError, match="no such file"):
        load_keras(tmp_path / "missing.keras")
    junk = tmp_path / "junk.keras"
    junk.write_text("not a model")
    with pytest.raises(KerasImportError, match="neither a .keras archive nor an HDF5"):
        load_keras(junk)
    empty = tmp_path / "empty.keras"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(KerasImportError, match="holds config.json and model.weights.h5"):
        load_keras(empty)
    weights_only = tmp_path / "w.h5"
    with h5py.File(weights_only, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(KerasImportError, match="without 'model_config'"):
        load_keras(weights_only)


# --------------------------------------------------------------------------- model folders


def test_import_keras_folder_exports_predicts_and_is_checked(tmp_path, capsys):
    from classicnets.cli import main

    pytest.importorskip("onnxruntime")
    data = _fixture("dense")
    folder = tmp_path / "imported"
    assert main(["import-keras", str(FIXTURES / "dense.keras"), "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.json",
        "model.safetensors",
        "run.lock",
    ]
    manifest = json.loads((folder / "model.json").read_text())
    assert (
        manifest["info"]["kind"] == "classifier" and manifest["info"]["outputs"] == "probabilities"
    )

    # export as a NumPy bundle and as ONNX (each checked against torch by the exporter)
    assert (
        main(["export", str(folder), "--format", "numpy", "--out", str(tmp_path / "export")]) == 0
    )
    assert main(["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "export")]) == 0
    np.save(tmp_path / "x.npy", data["x"][:1])
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "export" / "model"), str(tmp_path / "x.npy")]) == 0
    printed = capsys.readouterr().out
    best = int(np.argmax(data["y"][0]))
    assert printed.startswith(f"class {best} (probability {data['y'][0, best]:.4f})"), printed

    # the doctor needs data for a model folder; recalibration keeps the old weights
    assert main(["bn-check", str(folder)]) == 2
    assert "give the data with --inputs" in capsys.readouterr().err
    np.save(tmp_path / "xb.npy", data["xb"])
    assert main(["bn-check", str(folder), "--inputs", str(tmp_path / "xb.npy")]) == 0
    old = (folder / "model.safetensors").read_bytes()
    assert main(["recalibrate", str(folder), "--inputs", str(tmp_path / "xb.npy")]) == 0
    assert (folder / "model.before-recalibration.safetensors").read_bytes() == old
    capsys.readouterr()
    assert main(["bn-check", str(folder), "--inputs", str(tmp_path / "xb.npy"), "--json"]) == 0
    (layer,) = json.loads(capsys.readouterr().out)["layers"]
    assert layer["mean_rel_error"] < 1e-3 and layer["var_rel_error"] < 1e-3


def test_model_folder_rebuilds_the_imported_model(tmp_path):
    from classicnets.interop.folder import import_keras, load_model_folder

    data = _fixture("conv")
    import_keras(FIXTURES / "conv.h5", tmp_path / "m", channels_first=True)
    model, manifest = load_model_folder(tmp_path / "m")
    assert manifest["info"]["input_shape"] == [3, 9, 9]
    with torch.no_grad():
        got = model(torch.from_numpy(data["x"]).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(got, data["y"], rtol=0, atol=_tolerance("conv", data["y"]))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(KerasImportError, match="sha256 does not match"):
        load_model_folder(tmp_path / "m")
