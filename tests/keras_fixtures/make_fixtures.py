"""Build the Keras parity fixtures of tests/test_keras.py. Run by hand, never in CI:

    pip install keras h5py            # Keras 3; any backend (torch is already installed here)
    KERAS_BACKEND=torch python tests/keras_fixtures/make_fixtures.py

For each model below it writes ``NAME.keras`` (Keras 3 archive) and ``NAME.h5`` (legacy HDF5),
after training a few steps on random data so that the BN moving statistics are far from their
initial values, and ``NAME.npz`` with:

    x            inputs (float32 images or vectors, int32 tokens)
    y            Keras's outputs on x in inference mode (training=False)
    xb           one batch for a continued-training step
    bn.<layer>.moving_mean / .moving_variance   the moving statistics after one training-mode
                 call on xb (Keras updates them in the call itself)

The models together hold every layer classicnets.interop.load_keras supports.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
from keras import layers

HERE = Path(__file__).resolve().parent
RNG = np.random.default_rng(0)


def dense_model() -> keras.Model:
    """Dense layers with every named activation, BN without bias before it, Dropout, ReLU."""
    return keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(8, use_bias=False, name="dense_in"),
            layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name="bn"),
            layers.Activation("relu"),
            layers.Dropout(0.3),
            layers.Dense(8, activation="tanh"),
            layers.Dense(8, activation="sigmoid"),
            layers.Dense(8, activation="elu"),
            layers.Dense(8, activation="gelu"),
            layers.LeakyReLU(negative_slope=0.1),
            layers.Dense(8, activation="leaky_relu"),
            layers.ReLU(),
            layers.Dense(4, activation="linear"),
            layers.Activation("softmax"),
        ],
        name="dense_model",
    )


def conv_model() -> keras.Model:
    """Channels-last convolutions, both BN variants without a parameter, pooling, resampling,
    padding, a residual Add and a Concatenate, Flatten and Reshape."""
    inp = keras.Input((9, 9, 3))
    x = layers.ZeroPadding2D(((1, 0), (0, 1)))(inp)  # (10, 10, 3)
    x = layers.Conv2D(4, 3, strides=2, padding="same")(x)  # (5, 5, 4)
    x = layers.BatchNormalization(center=False, momentum=0.8, name="bn_a")(x)
    x = layers.ReLU()(x)
    a = layers.Conv2D(6, 3, padding="same", use_bias=False)(x)
    a = layers.BatchNormalization(scale=False, momentum=0.8, name="bn_b")(a)
    b = layers.Conv2D(6, 1, activation="relu")(x)
    x = layers.Add()([a, b])
    x = layers.Concatenate()([x, b])  # (5, 5, 12)
    x = layers.MaxPooling2D(2, strides=1)(x)  # (4, 4, 12)
    x = layers.AveragePooling2D(2)(x)  # (2, 2, 12)
    x = layers.Conv2DTranspose(5, 3, strides=2, padding="same")(x)  # (4, 4, 5)
    x = layers.Conv2DTranspose(3, 2, strides=2, padding="valid", activation="tanh")(x)  # (8, 8, 3)
    x = layers.UpSampling2D(2)(x)  # (16, 16, 3)
    x = layers.Conv2D(2, 3, strides=2, padding="valid")(x)  # (7, 7, 2)
    f = layers.Flatten()(x)  # (98,)
    r = layers.Reshape((7, 14))(f)
    r = layers.Flatten()(r)
    g = layers.GlobalAveragePooling2D()(x)
    out = layers.Concatenate()([layers.Dense(3)(r), layers.Dense(3)(g)])
    return keras.Model(inp, out, name="conv_model")


def recurrent_model() -> keras.Model:
    """Tokens through an Embedding, a ReLU SimpleRNN returning sequences, then an LSTM."""
    inp = keras.Input((7,), dtype="int32")
    x = layers.Embedding(30, 8)(inp)
    x = layers.SimpleRNN(6, activation="relu", return_sequences=True)(x)
    x = layers.SimpleRNN(6, return_sequences=True)(x)
    x = layers.LSTM(5)(x)
    return keras.Model(inp, layers.Dense(3)(x), name="recurrent_model")


def bn_axis_model() -> keras.Model:
    """BN on axis 1 of [N, 4, 6] (not the last axis), with Keras's default momentum and eps."""
    inp = keras.Input((4, 6))
    x = layers.BatchNormalization(axis=1, name="bn_axis1")(inp)
    x = layers.Flatten()(x)
    return keras.Model(inp, layers.Dense(2)(x), name="bn_axis_model")


MODELS = {
    "dense": (dense_model, lambda n: RNG.standard_normal((n, 6)).astype("float32") * 2 + 1),
    "conv": (conv_model, lambda n: RNG.random((n, 9, 9, 3)).astype("float32")),
    "recurrent": (recurrent_model, lambda n: RNG.integers(0, 30, (n, 7)).astype("int32")),
    "bn_axis": (bn_axis_model, lambda n: RNG.standard_normal((n, 4, 6)).astype("float32") * 3),
}


def build(name: str) -> None:
    make, inputs = MODELS[name]
    keras.utils.set_random_seed(0)
    model = make()
    out_dim = model.output_shape[-1]
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    train_x = inputs(64)
    model.fit(train_x, RNG.standard_normal((64, out_dim)).astype("float32"), batch_size=16,
              epochs=3, verbose=0)  # fmt: skip
    x, xb = inputs(10), inputs(12)
    y = keras.ops.convert_to_numpy(model(x, training=False))
    arrays = {"x": x, "y": y, "xb": xb}
    model.save(HERE / f"{name}.keras")
    model.save(HERE / f"{name}.h5")
    model(xb, training=True)  # one training-mode call: Keras updates the moving statistics
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            for stat in ("moving_mean", "moving_variance"):
                value = keras.ops.convert_to_numpy(getattr(layer, stat))
                arrays[f"bn.{layer.name}.{stat}"] = value
    np.savez(HERE / f"{name}.npz", **arrays)
    print(f"{name}: {model.count_params()} parameters, output {y.shape}")


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "torch")
    for name in MODELS:
        build(name)
