"""The scoring classifier of the generative experiments: trained here, used by ``metrics``.

``scoring_classifier`` gives the ``ScoringClassifier`` that ``metrics.generative`` measures
with: the ``resnet`` of a ``resnet-vs-mlp`` run when one is named, else a ``SmallCNN`` trained on
the spot with the classifier loop and cached (safetensors + JSON) so that a resumed or
re-evaluated run reuses it. It lives with the experiments because it trains and reads runs; the
metrics stay leaves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from classicnets.metrics.generative import ScoringClassifier, SmallCNN

__all__ = ["scorer_of", "scoring_classifier"]


# Training recipe of the cached scorer. quick: a few hundred steps on a slice (tests, demos).
_RECIPES = {
    False: {"steps": 1400, "batch_size": 128, "lr": 2e-3, "train_limit": None},  # ~3 epochs
    True: {"steps": 200, "batch_size": 64, "lr": 2e-3, "train_limit": 6000, "test_limit": 2000},
}
_CACHE_FORMAT = 1


def scoring_classifier(
    data_dir: str | None,
    device: str,
    classifier_run: str | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    quick: bool = False,
) -> ScoringClassifier:
    """The MNIST classifier that scores a run's samples.

    Args:
        data_dir: MNIST data root (None: ``$CLASSICNETS_DATA`` or the cache).
        device: where the scorer runs.
        classifier_run: a ``resnet-vs-mlp`` run folder: its ``resnet`` (newest checkpoint) is
            the scorer. None: train a ``SmallCNN`` (Adam, ~3 epochs; ``quick``: 200 steps on
            6,000 images, accuracy measured on the first 2,000 test images) or load it from
            ``cache_dir``.
        cache_dir: folder where the trained CNN is cached (``cnn.safetensors`` or
            ``cnn-quick.safetensors`` with a JSON beside it); None: no cache.
        download: download MNIST if missing.
        quick: the quick recipe (tests).
    """
    if classifier_run is not None:
        return _scorer_from_run(classifier_run, device)
    from safetensors.torch import load_file

    from classicnets.train.distributed import get_context

    name = "cnn-quick" if quick else "cnn"
    weights_path = Path(cache_dir) / f"{name}.safetensors" if cache_dir is not None else None
    info_path = weights_path.with_suffix(".json") if weights_path is not None else None
    model = SmallCNN()
    if weights_path is not None and weights_path.exists() and info_path.exists():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("format") == _CACHE_FORMAT:
            model.load_state_dict(load_file(str(weights_path)), strict=True)
            model.to(device).eval()
            return ScoringClassifier(model, device, str(weights_path), info.get("test_accuracy"))
    model, info = _train_scorer(data_dir, device, download, quick)
    source = "trained in memory"
    if weights_path is not None and get_context().is_main:  # one writer under torchrun
        from safetensors.torch import save

        from classicnets.files import atomic_write_bytes, atomic_write_text

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(weights_path, save(state))
        atomic_write_text(info_path, json.dumps(info, indent=2))  # written last: the commit
        source = str(weights_path)
    return ScoringClassifier(model.eval(), device, source, info["test_accuracy"])


def scorer_of(config, run_dir, device: str, cache_name: str) -> ScoringClassifier:
    """``scoring_classifier`` of a generative experiment's config: the ``resnet`` of its
    ``classifier_run``, else a CNN (``quick_scorer``: the quick recipe) cached in
    ``scorer_cache``, by default ``RUN_DIR/cache_name``."""
    return scoring_classifier(
        config.data_dir,
        device,
        classifier_run=config.classifier_run,
        cache_dir=config.scorer_cache or run_dir.path / cache_name,
        download=config.download,
        quick=config.quick_scorer,
    )


def _train_scorer(data_dir, device: str, download: bool, quick: bool) -> tuple[nn.Module, dict]:
    """Train a ``SmallCNN`` with the classifier loop (no files); the caller's RNG is untouched."""
    from classicnets.data.tensors import load_image_data
    from classicnets.train.classifier import train_classifier
    from classicnets.train.settings import TrainSettings

    recipe = _RECIPES[bool(quick)]
    data = load_image_data(
        "mnist", data_dir, device, recipe["train_limit"], download, recipe.get("test_limit")
    )  # quick: the accuracy is measured on the first test images only
    settings = TrainSettings(
        steps=recipe["steps"],
        batch_size=recipe["batch_size"],
        optimizer="adam",
        lr=recipe["lr"],
        eval_every=recipe["steps"],
        log_every=50,
        checkpoint_every=0,
        progress=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmallCNN().to(device)
        result = train_classifier(model, data, settings)
    info: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "model": "SmallCNN",
        "quick": bool(quick),
        "test_accuracy": result["test_accuracy"],
        **recipe,
    }
    return model, info


def _scorer_from_run(classifier_run: str, device: str) -> ScoringClassifier:
    from classicnets.experiments.common import ExperimentError, load_trained_models
    from classicnets.train.run import RunDir

    experiment = RunDir(classifier_run).read_config()["experiment"]
    if experiment != "resnet-vs-mlp":
        raise ExperimentError(
            f"classifier_run {classifier_run} is a {experiment!r} run; a resnet-vs-mlp run "
            f"on MNIST is needed"
        )
    models = load_trained_models(classifier_run, device)
    if "resnet" not in models:
        raise ExperimentError(f"classifier_run {classifier_run} has no trained 'resnet' model")
    trained = models["resnet"]
    if trained.info.get("dataset", "mnist") != "mnist":
        raise ExperimentError(
            f"classifier_run {classifier_run} was trained on {trained.info['dataset']}, not mnist"
        )
    return ScoringClassifier(trained.model.eval(), device, trained.checkpoint)
