"""``classicnets predict BUNDLE INPUT``: run a NumPy bundle on an image or on text. NumPy only.

What INPUT is and what comes out depends on the bundle's ``kind``:

- ``classifier``: a PNG (read as 8-bit grayscale) or ``.npy`` image (uint8, or floats already in
  [0, 1]); prints the most probable class and the top K probabilities for each image.
- ``autoencoder``: the same images; writes the reconstruction as a PNG and says where.
- ``generator``: a ``.npy`` of latent vectors ``[N, latent]``, or an integer seed for N(0, I)
  draws; writes the generated images as one PNG grid and says where.
- ``language_model``: a text (the argument itself, or a ``.txt`` file); prints the K most probable
  next words after it.

Nothing here imports torch (``tests/test_export.py`` checks this in a process where importing
torch fails), so a bundle runs on any machine with NumPy and Pillow (or matplotlib) for PNGs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classicnets.export.numpy_bundle import Bundle, ExportError, load_bundle
from classicnets.export.numpy_runtime import run_bundle, sigmoid, softmax

# The most images one call draws or writes into one grid (10,000 28x28 images: a 2,800-pixel
# square PNG); more is a mistyped --n, not a request.
MAX_IMAGES = 10_000

__all__ = ["MAX_IMAGES", "PredictRequest", "predict", "read_image", "save_image_grid", "tokenize"]


@dataclass
class PredictRequest:
    """What ``classicnets predict`` asks for.

    Attributes:
        input: path of a PNG/``.npy``/``.txt`` file, a text, or an integer seed (generators).
        top: how many classes or next words to list.
        out: where to write an output image (default: beside the input, or the current folder).
        label: the class for conditional models (CVAE, CGAN).
        n: how many images a generator draws from a seed.
    """

    input: str
    top: int = 5
    out: str | None = None
    label: int | None = None
    n: int | None = None


# --------------------------------------------------------------------------- images


def read_image(path: str | os.PathLike, unit_range: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1]: a PNG (converted to 8-bit grayscale) or a ``.npy``
    array (uint8 is divided by 255; floats must already be in [0, 1]). Shapes are kept, so a
    ``.npy`` may hold a batch."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ExportError(f"{path}: not a numeric .npy array ({_npy_fault(exc)})") from None
        if not isinstance(array, np.ndarray):
            raise ExportError(f"{path}: not a .npy array")
        if array.size == 0:
            raise ExportError(f"{path}: the array is empty (shape {list(array.shape)})")
        if array.dtype == np.uint8:
            return array.astype(np.float32) / np.float32(255)
        if array.dtype.kind != "f":
            raise ExportError(f"{path}: expected uint8 or float pixels, got {array.dtype}")
        if not np.isfinite(array).all():
            raise ExportError(f"{path}: the pixels hold NaN or infinite values")
        if unit_range and (array.min() < 0 or array.max() > 1):
            raise ExportError(
                f"{path}: float pixels must be in [0, 1] (uint8 images are divided by 255), "
                f"got [{array.min():.3g}, {array.max():.3g}]"
            )
        return array.astype(np.float32)
    try:
        from PIL import Image
    except ImportError:  # matplotlib reads PNGs as floats in [0, 1]
        import matplotlib.image as mpimg

        array = np.asarray(mpimg.imread(path), dtype=np.float32)
        return array[..., :3].mean(axis=-1) if array.ndim == 3 else array
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.uint8)  # (H, W)
    except OSError as exc:
        raise ExportError(f"{path}: not a readable image ({exc})") from None
    return gray.astype(np.float32) / np.float32(255)


def _npy_fault(exc: Exception) -> str:
    """What ``np.load`` found wrong, without its advice to load pickles unsafely."""
    if "pickle" in str(exc).lower():
        return "pickled or not a .npy file; refused, inputs are read with allow_pickle=False"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _image_batch(images: np.ndarray, example_shape: list[int], where: str) -> np.ndarray:
    """``images`` as a batch ``[N, *example_shape]``: one example of exactly the model's input
    shape (for a one-channel model also ``[H, W]``), or a batch with a leading axis. Nothing
    else is reshaped: a 56x56 image is not four 28x28 ones."""
    if images.size == 0:
        raise ExportError(f"{where}: the input is empty (shape {list(images.shape)})")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise ExportError(f"{where}: the input holds NaN or infinite values")
    shape, example = list(images.shape), list(example_shape)
    one_channel = example[1:] if len(example) == 3 and example[0] == 1 else None
    channel_axis = 1
    if one_channel is None and len(example) == 3 and example[2] == 1:  # channels last (Keras)
        one_channel, channel_axis = example[:2], -1
    if shape == example:
        return images[None]
    if one_channel is not None and shape == one_channel:
        return np.expand_dims(images[None], channel_axis)  # (1, 1, H, W) or (1, H, W, 1)
    if len(shape) == len(example) + 1 and shape[1:] == example:
        return images
    if one_channel is not None and len(shape) == 3 and shape[1:] == one_channel:
        return np.expand_dims(images, channel_axis)  # (N, 1, H, W) or (N, H, W, 1)
    accepted = [example, [None, *example]]
    if one_channel is not None:
        accepted[1:1] = [one_channel]
    shown = " or ".join(str(a).replace("None", "N") for a in accepted)
    raise ExportError(f"{where}: input of shape {shape} does not fit the model: expected {shown}")


def save_image_grid(path: str | os.PathLike, images: np.ndarray, columns: int = 10) -> Path:
    """Write images ``[N, H, W]`` (or ``[N, 1, H, W]``) in [0, 1] as one 8-bit PNG grid."""
    images = np.asarray(images, dtype=np.float32)
    images = images.reshape(images.shape[0], *images.shape[-2:])  # (N, H, W)
    n, h, w = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    pad = 2 if n > 1 else 0
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = image
    pixels = np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image

        Image.fromarray(pixels, mode="L").save(path)
    except ImportError:
        import matplotlib.image as mpimg

        mpimg.imsave(path, pixels, cmap="gray", vmin=0, vmax=255)
    return path


# --------------------------------------------------------------------------- text


def tokenize(text: str, vocabulary: list[str]) -> list[int]:
    """Word ids of ``text``: lower-cased, split on whitespace, ``<eos>`` between lines when the
    vocabulary has it (Penn Treebank), unknown words as ``<unk>``."""
    index = {word: i for i, word in enumerate(vocabulary)}
    lines = text.lower().splitlines()
    words = []
    for i, line in enumerate(lines):
        words += line.split()
        if "<eos>" in index and i < len(lines) - 1:  # between lines; the text goes on after it
            words.append("<eos>")
    unknown = [w for w in words if w not in index]
    if unknown and "<unk>" not in index:
        raise ExportError(f"words not in the vocabulary: {', '.join(unknown[:5])}")
    return [index.get(w, index.get("<unk>", 0)) for w in words]


# --------------------------------------------------------------------------- predict


def _example_shape(bundle: Bundle) -> list[int]:
    shape = bundle.inputs[0]["shape"]
    if not shape or shape[0] is not None or any(s is None for s in shape[1:]):
        raise ExportError(
            f"{bundle.path}: manifest.json inputs[0].shape must be a batch axis (null) and fixed "
            f"sizes, got {shape}"
        )
    return list(shape[1:])


def _labels(bundle: Bundle, request: PredictRequest, count: int) -> np.ndarray | None:
    """Class labels for a conditional model: ``--label`` for all, else 0, 1, 2, ... in turn."""
    if len(bundle.inputs) < 2 or bundle.inputs[1]["name"] != "labels":
        if request.label is not None:
            raise ExportError("--label: this model is not conditional")
        return None
    classes = len(bundle.manifest.get("class_names") or []) or 10
    if request.label is not None and not 0 <= request.label < classes:
        raise ExportError(f"--label must be in [0, {classes}), got {request.label}")
    if request.label is not None:
        return np.full(count, request.label, dtype=np.int64)
    return np.arange(count, dtype=np.int64) % classes


def _run(bundle: Bundle, x: np.ndarray, labels: np.ndarray | None):
    return run_bundle(bundle, x if labels is None else (x, labels))


def _first_output(outputs) -> np.ndarray:
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _default_out(request: PredictRequest, suffix: str) -> Path:
    source = Path(request.input)
    if source.is_file():
        return source.with_name(f"{source.stem}.{suffix}.png")
    return Path(f"{suffix}.png")


def predict(bundle_path: str | os.PathLike, request: PredictRequest) -> str:
    """Run the bundle on ``request.input``; return the lines to print."""
    if request.top < 1:
        raise ExportError(f"--top must be >= 1, got {request.top}")
    bundle = load_bundle(bundle_path)
    kind = bundle.kind
    run = (
        {
            "classifier": _classify,
            "autoencoder": _reconstruct,
            "generator": _generate,
            "language_model": _next_words,
        }.get(kind)
        if isinstance(kind, str)
        else None
    )
    if run is None:
        raise ExportError(f"{bundle.path}: predict does not know models of kind {kind!r}")
    try:
        return run(bundle, request)
    except ExportError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        # The layers ran (their faults are named by run_bundle): what is left is the manifest's
        # description of inputs and outputs (class_names, vocabulary, info) not fitting them.
        raise ExportError(
            f"{bundle.path}: manifest.json does not describe this model's inputs and outputs "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _classify(bundle: Bundle, request: PredictRequest) -> str:
    info = bundle.manifest.get("info") if isinstance(bundle.manifest.get("info"), dict) else {}
    # Our classifiers take pixels in [0, 1]; an imported model takes what it was trained on.
    unit_range = info.get("source") != "keras"
    x = _image_batch(read_image(request.input, unit_range), _example_shape(bundle), request.input)
    logits = _first_output(_run(bundle, x, _labels(bundle, request, len(x))))
    if info.get("outputs") == "probabilities":  # the model ends in a softmax (Keras models)
        probabilities = logits.astype(np.float64)
    else:
        probabilities = softmax(logits.astype(np.float64), axis=-1)  # (N, classes)
    names = bundle.manifest.get("class_names") or [str(i) for i in range(logits.shape[-1])]
    if not isinstance(names, list) or len(names) != logits.shape[-1]:
        raise ExportError(
            f"{bundle.path}: manifest.json class_names must list the model's "
            f"{logits.shape[-1]} classes, got {str(names)[:60]}"
        )
    lines = []
    for i, p in enumerate(probabilities):
        order = np.argsort(-p)[: request.top]
        prefix = f"image {i}: " if len(probabilities) > 1 else ""
        lines.append(f"{prefix}class {names[order[0]]} (probability {p[order[0]]:.4f})")
        lines += [f"  {names[k]:<12} {p[k]:.4f}" for k in order]
    return "\n".join(lines)


def _as_images(bundle: Bundle, y: np.ndarray) -> np.ndarray:
    """Model outputs as images in [0, 1]: a VAE's first output is pixel logits."""
    outputs = (bundle.manifest.get("info") or {}).get("outputs")
    if isinstance(outputs, dict) and next(iter(outputs), None) == "logits":
        y = sigmoid(y)
    shape = (bundle.manifest.get("info") or {}).get("output_shape") or [28, 28]
    return y.reshape(y.shape[0], *shape[-2:]) if y.size % math.prod(shape[-2:]) == 0 else y


def _reconstruct(bundle: Bundle, request: PredictRequest) -> str:
    x = _image_batch(read_image(request.input), _example_shape(bundle), request.input)
    y = _first_output(_run(bundle, x, _labels(bundle, request, len(x))))
    images = _as_images(bundle, y)  # (N, H, W)
    path = save_image_grid(request.out or _default_out(request, "reconstruction"), images)
    error = float(np.mean((images.reshape(len(x), -1) - x.reshape(len(x), -1)) ** 2))
    return f"reconstruction of {len(x)} image(s), mean squared error {error:.5f}: {path}"


def _generate(bundle: Bundle, request: PredictRequest) -> str:
    latent = _example_shape(bundle)
    source = Path(request.input)
    z_from_file = source.suffix.lower() == ".npy"
    if z_from_file:
        if not source.is_file():
            raise ExportError(f"{source}: no such file")
        try:
            z = np.load(source, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ExportError(f"{source}: not a numeric .npy array ({_npy_fault(exc)})") from None
        if not isinstance(z, np.ndarray) or z.dtype.kind not in "fiu":
            raise ExportError(f"{source}: expected a numeric array of latent vectors")
        z = _image_batch(z.astype(np.float32), latent, request.input)
        what = f"latent vectors from {source}"
    else:
        try:
            seed = int(request.input)
        except ValueError:
            raise ExportError(
                f"a generator takes a .npy of latent vectors or an integer seed, got "
                f"{request.input!r}"
            ) from None
        count = request.n or (10 if len(bundle.inputs) > 1 else 16)
        if not 1 <= count <= MAX_IMAGES:
            raise ExportError(f"--n must be in [1, {MAX_IMAGES}], got {count}")
        z = np.random.default_rng(seed).standard_normal((count, *latent)).astype(np.float32)
        what = f"z ~ N(0, I), numpy seed {seed}"
    labels = _labels(bundle, request, len(z))
    images = _as_images(bundle, _first_output(_run(bundle, z, labels)))
    default = _default_out(request, "generated") if z_from_file else Path(f"generated-{seed}.png")
    path = save_image_grid(request.out or default, images)
    suffix = "" if labels is None else f", labels {' '.join(map(str, labels[:10]))}"
    return f"{len(z)} generated image(s) ({what}{suffix}): {path}"


def _next_words(bundle: Bundle, request: PredictRequest) -> str:
    vocabulary = bundle.manifest.get("vocabulary")
    if not vocabulary:
        raise ExportError(f"{bundle.path}: the bundle has no vocabulary")
    if not isinstance(vocabulary, list) or not all(isinstance(w, str) for w in vocabulary):
        raise ExportError(f"{bundle.path}: manifest.json vocabulary must be a list of words")
    text = request.input
    if text.endswith(".txt") and Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8")
    tokens = tokenize(text, vocabulary)
    if not tokens:
        raise ExportError("predict needs at least one word of text")
    logits, _hidden = run_bundle(bundle, np.asarray([tokens], dtype=np.int64))  # (1, T, V)
    p = softmax(logits[0, -1].astype(np.float64))
    order = np.argsort(-p)[: request.top]
    shown = " ".join(vocabulary[t] for t in tokens[-12:])
    lines = [f"next word after '{'... ' if len(tokens) > 12 else ''}{shown}':"]
    lines += [f"  {vocabulary[k]:<16} {p[k]:.4f}" for k in order]
    return "\n".join(lines)
