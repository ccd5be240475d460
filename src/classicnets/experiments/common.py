"""What every experiment shares: the registry, the run lifecycle, device and data helpers.

An experiment (``Experiment``) is a config dataclass (documented defaults; ``quick()`` gives
the variant tests use), ``run(config, job) -> summary`` (trains each variant and draws the
figures of its own), a plot spec (``plots``: the curves drawn from its records), and for its
trained models ``evaluate``, ``load_models`` and, for generative and language models,
``sample``. ``run_lifecycle`` does the rest once for all: the wall time across resumes,
deterministic kernels, the plot spec, ``summary.json`` and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classicnets.data.tensors import ClassificationData, load_image_data
from classicnets.experiments.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from classicnets.files import LOCK_NAME
from classicnets.train.run import RunDir, RunError, hold_run, hold_run_writing, new_run_dir

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "ExperimentError",
    "Job",
    "RunOptions",
    "SampleRequest",
    "TrainedModel",
    "load_checkpointed",
    "TrainingOptions",
    "evaluate_classifiers",
    "load_classifiers",
    "load_trained_models",
    "mnist_input",
    "sample_run",
    "sampled_models",
    "evaluate_run",
    "get_experiment",
    "list_experiments",
    "image_data_of",
    "resolve_device",
    "resume_experiment",
    "run_config",
    "run_experiment",
    "run_lifecycle",
    "settings_for",
    "summarize",
    "train_settings",
    "VariantOutcomes",
    "VariantTrained",
    "VariantsPrepared",
    "variant_worker",
    "attach_tensorboard",
    "record_divergence",
    "remove_if_empty",
    "tensorboard_of",
    "resolve_jobs",
]


class ExperimentError(ValueError):
    """An unknown experiment or device, or a run that cannot be resumed."""


@dataclass
class RunOptions:
    """What every experiment's config has; its own fields follow these."""

    data_dir: str | None = None  # data root; default $CLASSICNETS_DATA or ~/.cache/classicnets
    download: bool = True  # download missing data files (sha256-verified) into the data root
    seed: int = 0  # initialization (every variant starts from it) and training's random draws
    train_limit: int | None = None  # train on the first N examples only (quick runs)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    deterministic: bool = True  # deterministic kernels: bit-identical reruns and resumes on CPU
    keep_checkpoints: int = 2  # checkpoints kept per model
    progress: bool = True  # a progress bar per variant
    stop_after: int | None = None  # stop each variant after this many steps (resume demos)
    jobs: int = 0  # variants trained side by side; 0: as many as the cores or GPUs allow
    tensorboard: bool | None = None  # event files in RUN/tensorboard; None: if it is installed


@dataclass
class TrainingOptions(RunOptions):
    """Training switches the classifier, autoencoder, VAE and GAN configs inherit
    (``train.settings.TrainSettings`` documents each). All are off by default; on CPU, bf16 and
    fp16 run but are slower."""

    weight_decay: float = 0.0  # never applied to BN parameters and biases
    schedule: str = "constant"  # constant | step | cosine | exp-after-epoch | plateau
    lr_step_every: int = 10_000  # step: multiply by lr_gamma every this many steps
    lr_gamma: float = 0.1  # step and plateau factor
    warmup_steps: int = 0  # cosine: linear warm-up steps
    lr_decay: float = 0.5  # exp-after-epoch: factor per epoch
    epochs_at_full_lr: int = 4  # exp-after-epoch: epochs before decaying
    plateau_patience: int = 5  # plateau: evaluations without improvement before decaying
    clip_grad_norm: float | None = None  # clip to this global norm (the norm is logged)
    compile: bool = False  # torch.compile the training model
    channels_last: bool = False  # NHWC memory format (convolutional models)
    sync_bn: bool = False  # synchronized BN across torchrun processes
    mlp_step: bool = True  # MLP classifiers: the written-out step (train.mlp_step), same numbers


def settings_for(settings_cls: type, config, **given):
    """``settings_cls`` (a loop's settings dataclass) for one model of an experiment: each field
    from ``given`` if there, else from the config field of the same name.

    Explicit, never silent: a settings field that neither supplies (a config field misspelled or
    missing) and a name in ``given`` that is no settings field are errors naming it, so that no
    setting quietly falls back to a default.
    """
    what = settings_cls.__name__
    names = [f.name for f in dataclasses.fields(settings_cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"{what}: {', '.join(unknown)} are not {what} fields")
    missing = [n for n in names if n not in given and not hasattr(config, n)]
    if missing:
        raise TypeError(
            f"{what}: {type(config).__name__} has no field {', '.join(missing)} and none was "
            f"given; add it to the config or pass it explicitly"
        )
    return settings_cls(**{n: given[n] if n in given else getattr(config, n) for n in names})


def train_settings(config, **given):
    """``TrainSettings`` for one model of an experiment (``settings_for``)."""
    from classicnets.train.settings import TrainSettings

    return settings_for(TrainSettings, config, **given)


@dataclass(frozen=True)
class Experiment:
    """A named recipe.

    Attributes:
        name, description: for ``classicnets list``.
        config_cls: the config dataclass (``quick()`` gives the quick variant).
        run: ``run(config, job: Job) -> summary``: trains and plots; ``run_lifecycle`` times,
            seeds, writes the summary (with the wall time) and the report around it.
        evaluate: ``evaluate(config, run_dir, device) -> {variant: metrics}``.
        load_models: ``load_models(config, run_dir, device) -> {variant: TrainedModel}``, the
            trained models in eval mode with what an exporter needs to know about them.
        sample: ``sample(config, run_dir, device, request: SampleRequest) -> str`` for
            generative and language models (a message or the generated text), else None.
        plots: the ``report.curves.Curve``s that ``run_lifecycle`` draws from the run's
            records after ``run``; ``legend`` maps variant names to the legends' names.
    """

    name: str
    description: str
    config_cls: type
    run: Callable[..., dict[str, Any]]
    evaluate: Callable[..., dict[str, Any]]
    load_models: Callable[..., dict[str, TrainedModel]] | None = None
    sample: Callable[..., str] | None = None
    plots: tuple = ()
    legend: dict[str, str] | None = None

    @classmethod
    def of_classifiers(
        cls,
        name: str,
        description: str,
        config_cls: type,
        run: Callable,
        build_model: Callable,
        plots: tuple = (),
        legend: dict[str, str] | None = None,
    ) -> Experiment:
        """An experiment that trains MNIST classifiers (``build_model(config, variant)``): its
        ``evaluate`` gives each variant's test metrics and confusion matrix, ``load_models``
        its newest checkpoint for export."""

        def evaluate(config, run_dir: RunDir, device: str = "cpu") -> dict:
            return evaluate_classifiers(build_model, config, run_dir, config.variants, device)

        def load_models(config, run_dir: RunDir, device: str = "cpu") -> dict:
            return load_classifiers(build_model, config, run_dir, config.variants, device)

        return cls(name, description, config_cls, run, evaluate, load_models, None, plots, legend)


@dataclass(frozen=True)
class Job:
    """What ``run_lifecycle`` hands an experiment's ``run``: the run folder, the device,
    whether the run resumes from its checkpoints, and how its variants are trained
    (``train_variants``): ``jobs`` worker processes side by side, or, inside one of those
    workers, only ``variant``. A sweep (``experiments.sweep``) trains the variants of all its
    points in one pool of workers: it first runs ``run`` with ``prepare_only`` (up to the
    training), then again with the workers' results as ``trained``."""

    run_dir: RunDir
    device: str
    resume: bool
    jobs: int = 1
    variant: str | None = None
    trained: dict[str, dict] | None = None
    prepare_only: bool = False

    def train_variants(
        self, variants, seed: int, train_one: Callable[[str], dict], prepare=None
    ) -> dict[str, dict]:
        """``{variant: train_one(variant)}``, each variant started from
        ``torch.manual_seed(seed)`` (the same initialization stream for every variant).

        With ``jobs`` 1 they train in order, and training stops after a variant stopped on
        request (``stop_after``, a signal: ``complete`` false or ``status`` "stopped"), so that
        the next ones start when the run is resumed. With more, each variant trains in a worker
        process of its own (``train.jobs``), at most ``jobs`` at a time, on its share of the
        threads: the same records as ``jobs`` 1 with those threads. ``prepare()``, if given,
        runs first in this process, for what the workers would otherwise each make (the GAN's
        scoring classifier). A variant that fails or diverges leaves the others training; then
        the first stop (``StopRequested``), divergence (``NonFiniteLossError``) or failure
        (``WorkerFailed``) is raised, in that order.

        With ``prepare_only``, ``prepare()`` runs and ``VariantsPrepared`` is raised; with
        ``trained``, ``prepare()`` runs (what the rest of ``run`` scores with) and the results
        are returned: nothing trains.
        """
        import torch

        if self.variant is not None:  # inside a worker: this variant only, and no more of run
            torch.manual_seed(seed)
            raise VariantTrained(train_one(self.variant))
        if prepare is not None and (self.prepare_only or self.trained_elsewhere(variants)):
            prepare()
        if self.prepare_only:
            raise VariantsPrepared()
        if self.trained is not None:
            return {v: self.trained[v] for v in variants if v in self.trained}
        if self.trained_elsewhere(variants):
            return _train_in_workers(self, list(variants))
        results: dict[str, dict] = {}
        for variant in variants:
            torch.manual_seed(seed)
            results[variant] = result = train_one(variant)
            status = result.get("status", "complete" if result.get("complete") else "stopped")
            if status == "stopped":
                break
        return results

    def trained_elsewhere(self, variants) -> bool:
        """Whether ``train_variants`` has ``variants`` trained in other processes (its workers,
        or a sweep's): then ``train_one`` never runs here, and the trained models are in their
        final checkpoints."""
        return self.trained is not None or (self.jobs > 1 and len(variants) > 1)


class VariantsPrepared(Exception):  # not an error: how a sweep's first pass leaves ``run``
    """Raised by ``Job.train_variants`` under ``prepare_only``, once ``prepare`` has run."""


class VariantTrained(Exception):  # not an error: how a worker leaves ``run`` early
    """Raised by ``Job.train_variants`` inside a worker with the variant's result: the rest of
    the experiment's ``run`` (summary, figures of every variant) is the parent's."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__("variant trained")
        self.result = result


def resolve_jobs(jobs: int, variants: int, device: str) -> int:
    """How many variants train side by side: ``jobs`` when set (at most one per variant), else
    automatic: ``$CLASSICNETS_JOBS`` when set, else as many as the variants and the CPU
    threads (``torch.get_num_threads``) allow, on CUDA the GPUs; always 1 under torchrun,
    whose processes train one variant after the other together, and where processes have no
    POSIX process groups to stop together (Windows)."""
    import os

    import torch

    from classicnets.train.distributed import get_context

    if get_context().enabled or variants < 2 or os.name != "posix":  # workers need process groups
        return 1
    if jobs == 0:
        chosen = os.environ.get("CLASSICNETS_JOBS", "")
        if chosen:
            try:
                jobs = int(chosen)
            except ValueError:
                raise ExperimentError(
                    f"CLASSICNETS_JOBS={chosen!r}: expected a whole number of jobs"
                ) from None
            if jobs < 0:
                raise ExperimentError(f"CLASSICNETS_JOBS={chosen!r}: expected 0 or more")
    if jobs == 0:
        if device.startswith("cuda"):
            jobs = torch.cuda.device_count() if device == "cuda" else 1
        else:
            jobs = torch.get_num_threads()
    return max(1, min(jobs, variants))


def tensorboard_of(config) -> bool:
    """Whether a run writes TensorBoard event files: ``config.tensorboard``, or when it is None
    whether the ``tensorboard`` package is installed. True without the package is an error."""
    from classicnets.report.tensorboard import available

    if config.tensorboard is None:
        return available()
    if config.tensorboard and not available():
        raise ExperimentError(
            "tensorboard=true: the tensorboard package is not installed; pip install "
            "'classicnets[tensorboard]' or set tensorboard=false"
        )
    return bool(config.tensorboard)


def attach_tensorboard(config, run: RunDir):
    """A ``report.tensorboard.TensorBoardLog`` observing ``run`` when the run writes event
    files and this process writes the folder; else None."""
    if not run.writer or not tensorboard_of(config):
        return None
    from classicnets.report.tensorboard import TensorBoardLog

    board = TensorBoardLog(run.path, config_to_dict(config))
    run.observers.append(board)
    return board


def variant_worker(
    run_dir: RunDir, variant: str, device: str, resume: bool, result_path: Path, threads: int,
    gpu: int | None = None, name: str | None = None,
) -> Any:  # fmt: skip
    """The ``train.jobs.WorkerSpec`` that trains ``variant`` of the run in ``run_dir`` in a
    process of its own (``experiments.worker``), on ``threads`` threads (and GPU ``gpu``),
    shown as ``name`` (default: the variant)."""
    import sys

    from classicnets.train.jobs import WorkerSpec

    argv = [sys.executable, "-m", "classicnets.experiments.worker", str(run_dir.path), variant,
            device, "resume" if resume else "new", str(result_path)]  # fmt: skip
    env = {"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}
    return WorkerSpec(name or variant, argv, result_path, threads, env)


@dataclass
class VariantOutcomes:
    """What the workers of one run's variants came to: each finished variant's result, and the
    stops (``{signal, step, checkpoint}``), divergences (``{message, step}``) and failures (a
    line each) of the others, and the variants whose worker never started (the run was stopped
    first)."""

    results: dict[str, dict] = dataclasses.field(default_factory=dict)
    stopped: list[dict] = dataclasses.field(default_factory=list)
    diverged: list[dict] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    not_started: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, outcomes) -> VariantOutcomes:
        """Sort ``train.jobs.WorkerOutcome``s by what each worker wrote."""
        sorted_ = cls()
        for outcome in outcomes:
            found = outcome.result or {}
            if "result" in found:
                sorted_.results[outcome.name] = found["result"]
            elif "stopped" in found:
                sorted_.stopped.append(found["stopped"])
            elif "diverged" in found:
                sorted_.diverged.append(found["diverged"])
            elif outcome.returncode is None:
                sorted_.not_started.append(outcome.name)
            else:
                sorted_.failed.append(f"variant {outcome.name!r}: its worker {outcome.describe()}")
        return sorted_

    @property
    def unfinished(self) -> list[str]:
        """A line for each variant that failed or was not started."""
        started = [f"variant {n!r}: its worker was not started (the run was stopped first)"
                   for n in self.not_started]  # fmt: skip
        return self.failed + started

    def raise_first(self, resume_path: Path) -> None:
        """Raise the first stop (``StopRequested``), divergence (``NonFiniteLossError``) or
        failure (``WorkerFailed``, naming ``classicnets resume resume_path``; a variant never
        started counts as one), in that order."""
        from classicnets.train.faults import StopRequested
        from classicnets.train.jobs import WorkerFailed
        from classicnets.train.loop import NonFiniteLossError

        if self.stopped:
            first = self.stopped[0]
            raise StopRequested(first["signal"], first["step"], first["checkpoint"])
        if self.diverged:
            raise NonFiniteLossError(self.diverged[0]["message"], self.diverged[0]["step"])
        if self.unfinished:
            raise WorkerFailed(f"{'; '.join(self.unfinished)} (resume with: classicnets "
                               f"resume {resume_path})")  # fmt: skip


def _train_in_workers(job: Job, variants: list[str]) -> dict[str, dict]:
    import tempfile

    import torch

    from classicnets.train.jobs import run_workers

    workers = min(job.jobs, len(variants))
    threads = max(1, torch.get_num_threads() // workers)
    gpus = torch.cuda.device_count() if job.device == "cuda" else 0
    with tempfile.TemporaryDirectory(prefix="classicnets-jobs-") as scratch:
        specs = [
            variant_worker(
                job.run_dir,
                variant,
                job.device,
                job.resume,
                Path(scratch) / f"{index}.json",
                threads,
                index % gpus if gpus > 1 else None,
            )  # fmt: skip
            for index, variant in enumerate(variants)
        ]
        found = VariantOutcomes.of(run_workers(specs, workers))
    found.raise_first(job.run_dir.path)
    return {v: found.results[v] for v in variants if v in found.results}


def summarize(title: str, variants, results: dict, fields, notes: list[str]) -> dict[str, Any]:
    """A run's summary: ``title``, ``status`` ("complete" when every one of ``variants`` is,
    else "stopped"), per variant the ``fields`` of its result (``{name: result key}``, or names
    that are both), and ``notes``."""
    fields = fields if isinstance(fields, dict) else {name: name for name in fields}
    complete = all(results.get(v, {}).get("complete") for v in variants)
    return {
        "title": title,
        "status": "complete" if complete else "stopped",
        "variants": {v: {k: r.get(key) for k, key in fields.items()} for v, r in results.items()},
        "notes": notes,
    }


def mnist_input() -> dict[str, Any]:
    """What a model of MNIST images takes, for a ``TrainedModel``'s info (exporters,
    ``predict``); a new dict each time, so that no caller's edit reaches another's."""
    return {
        "input_shape": [1, 28, 28],
        "input_dtype": "float32",
        "preprocessing": "uint8 image [28, 28] / 255, shape [N, 1, 28, 28]",
    }


@dataclass
class TrainedModel:
    """A trained model from a run folder, in eval mode, and how to feed it.

    Attributes:
        model: the ``nn.Module`` (eval mode, on the requested device).
        step: the training step of its checkpoint.
        checkpoint: the checkpoint's path.
        info: JSON-ready description for exporters: ``kind`` ("classifier", "autoencoder",
            "generator", "language_model"), ``input_shape`` (one example, no batch axis),
            ``input_dtype``, ``preprocessing`` (e.g. "uint8 image / 255"), ``class_names`` or
            ``vocabulary`` where they apply.
    """

    model: Any
    step: int
    checkpoint: str
    info: dict[str, Any]


@dataclass
class SampleRequest:
    """What ``classicnets sample`` asks for."""

    n: int = 16
    label: int | None = None
    temperature: float = 1.0
    prompt: str | None = None
    seed: int = 0
    variant: str | None = None
    out: str | None = None


# name -> module; modules are imported on first use so `classicnets list` stays fast.
_MODULES = {
    "bn-mlp": "classicnets.experiments.bn_mlp",
    "conv-ae": "classicnets.experiments.conv_ae",
    "resnet-vs-mlp": "classicnets.experiments.resnet_vs_mlp",
    "rnn-vs-lstm": "classicnets.experiments.rnn_vs_lstm",
    "vae": "classicnets.experiments.vae",
    "gan": "classicnets.experiments.gan",
}
EXPERIMENTS: dict[str, Experiment] = {}


def get_experiment(name: str) -> Experiment:
    """The experiment ``name``; unknown names raise ``ExperimentError`` listing the known ones."""
    if name not in _MODULES:
        raise ExperimentError(
            f"unknown experiment {name!r}; known experiments: {', '.join(sorted(_MODULES))}"
        )
    if name not in EXPERIMENTS:
        module = importlib.import_module(_MODULES[name])
        EXPERIMENTS[name] = module.EXPERIMENT
    return EXPERIMENTS[name]


def list_experiments() -> list[Experiment]:
    return [get_experiment(n) for n in sorted(_MODULES)]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if not isinstance(device, str):
        raise ExperimentError(f"device {device!r}: expected auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExperimentError(f"--device {device}: no CUDA device is available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise ExperimentError(f"--device {device!r}: expected auto, cpu or cuda")
    return device


def run_experiment(
    name: str,
    overrides: list[str] | None = None,
    quick: bool = False,
    device: str = "auto",
    out: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run experiment ``name`` in a new run folder; return ``(run_dir, summary)``.

    Args:
        name: registered experiment name.
        overrides: ``key=value`` strings applied to the (quick) default config.
        quick: start from ``config_cls.quick()``: a few hundred steps, for tests and demos.
        device: ``auto``, ``cpu`` or ``cuda``.
        out: run folder (default ``runs/<name>-<timestamp>``).
    """
    from classicnets.train.distributed import broadcast_object, init_from_env, shutdown

    experiment = get_experiment(name)
    config = experiment.config_cls.quick() if quick else experiment.config_cls()
    config = apply_overrides(config, list(overrides or []))
    device = resolve_device(device)
    ctx = init_from_env(device)  # torchrun: one process per device; else a no-op
    jobs = resolve_jobs(config.jobs, len(config.variants), ctx.device)  # before any file
    tensorboard_of(config)
    finished = False
    try:
        with contextlib.ExitStack() as stack:
            # Rank 0 makes the folder, holds its lock and writes it; the others learn its name
            # and write nothing.
            claimed = stack.enter_context(new_run_dir(out, name)) if ctx.is_main else None
            path = broadcast_object(str(claimed) if ctx.is_main else None)
            run = RunDir(path, writer=ctx.is_main)
            record = config_to_dict(config)
            run.write_config(name, {**record, "_quick": quick, "_device": device})
            try:
                summary = run_lifecycle(experiment, config, run, ctx.device, False, jobs)
            except Exception as exc:
                if ctx.is_main:
                    record_divergence(run, exc)
                    remove_if_empty(run)
                raise
            finished = True
    finally:
        shutdown(finished)
    return run.path, summary


def run_lifecycle(
    experiment: Experiment, config, run: RunDir, device: str, resume: bool, jobs: int = 1,
    trained: dict[str, dict] | None = None, trained_s: float = 0.0,
) -> dict:  # fmt: skip
    """What every experiment's run does around its own work, once, in order: keep counting the
    wall time of earlier sessions, choose deterministic kernels, let the experiment train
    (``experiment.run``, its variants ``jobs`` at a time: ``resolve_jobs``), then on the writing
    process draw its ``plots``, and write ``summary.json`` and ``report.html``. ``config`` is
    already checked: ``apply_overrides`` and ``config_from_dict`` validate every config they
    make. A sweep passes the results its workers ``trained`` (``Job.trained``), and the
    ``trained_s`` seconds they took, which count in the wall time."""
    from classicnets.train.settings import set_deterministic

    start = time.perf_counter()  # the wall time of earlier sessions is in their summary
    earlier = run.read_summary().get("wall_time_s", 0.0) if resume else 0.0
    set_deterministic(config.deterministic)
    board = attach_tensorboard(config, run)
    try:
        job = Job(run, device, resume, jobs, trained=trained)
        summary = experiment.run(config, job)
        if run.writer and experiment.plots:  # rank 0 of a torchrun job
            from classicnets.report.curves import plot_curves

            plot_curves(run.plots, run.read_metrics(), experiment.plots, experiment.legend)
        if board is not None and run.plots.is_dir():
            board.grids(run.plots)
    finally:
        if board is not None:
            board.close()
    summary["wall_time_s"] = earlier + trained_s + time.perf_counter() - start
    run.write_summary(summary)
    if run.writer:
        from classicnets.report import write_report

        write_report(run.path)
    return summary


def record_divergence(run: RunDir, exc: Exception) -> None:
    """A run stopped by a NaN, infinite or exploding loss says so in its summary ("diverged",
    with the message), never "complete" from an earlier session."""
    from classicnets.train.loop import NonFiniteLossError

    if not isinstance(exc, NonFiniteLossError) or not run.metrics_path.exists():
        return
    try:
        summary = run.read_summary()
    except RunError:
        summary = {}
    summary.update(status="diverged", error=str(exc))
    run.write_summary(summary)


def remove_if_empty(run: RunDir) -> None:
    """A run that failed before logging anything (bad data path, ...) leaves no folder behind."""
    if run.metrics_path.exists() or run.checkpoints.exists():
        return
    run.config_path.unlink(missing_ok=True)
    (run.path / LOCK_NAME).unlink(missing_ok=True)  # ours: the folder was empty when claimed
    try:
        run.path.rmdir()
    except OSError:
        pass  # not empty: the user's own folder or files we did not write


def _load(run_dir: str | Path) -> tuple[Experiment, Any, RunDir, dict]:
    run = RunDir(run_dir)
    record = run.read_config()
    experiment = get_experiment(record["experiment"])
    values = {k: v for k, v in record["config"].items() if not k.startswith("_")}
    device = record["config"].get("_device", "auto")
    if not isinstance(device, str):
        raise RunError(f"{run.config_path}: _device={device!r}: expected auto, cpu or cuda")
    try:
        config = config_from_dict(experiment.config_cls, values)
    except (ConfigError, TypeError) as exc:
        raise RunError(f"{run.config_path}: {exc}") from None
    return experiment, config, run, record


def run_config(run_dir: str | Path):
    """The resolved config of the run in ``run_dir``, checked as ``resume`` checks it."""
    return _load(run_dir)[1]


def resume_experiment(run_dir: str | Path, device: str | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoints; return its summary."""
    from classicnets.train.distributed import init_from_env, shutdown

    experiment, config, run, record = _load(run_dir)
    device = resolve_device(device or record["config"].get("_device", "auto"))
    ctx = init_from_env(device)
    jobs = resolve_jobs(config.jobs, len(config.variants), ctx.device)
    tensorboard_of(config)
    finished = False
    try:
        with contextlib.ExitStack() as stack:
            if ctx.is_main:  # one writer: a second resume, or a run still going, is refused
                stack.enter_context(hold_run(run.path))
            run.writer = ctx.is_main
            try:
                summary = run_lifecycle(experiment, config, run, ctx.device, True, jobs)
            except Exception as exc:
                record_divergence(run, exc)
                raise
            finished = True
            return summary
    finally:
        shutdown(finished)


def load_trained_models(run_dir: str | Path, device: str = "auto") -> dict[str, TrainedModel]:
    """The trained models of a run (newest checkpoint of each variant), in eval mode; for a
    model folder (``classicnets import-keras``), its one model, named ``model``."""
    from classicnets.interop.folder import is_model_folder, load_model_folder

    if is_model_folder(run_dir):
        model, manifest = load_model_folder(run_dir)
        weights = str(Path(run_dir) / manifest["weights"]["file"])
        return {"model": TrainedModel(model, 0, weights, manifest["info"])}
    experiment, config, run, _ = _load(run_dir)
    if experiment.load_models is None:
        raise ExperimentError(f"experiment {experiment.name!r} has no exportable models")
    models = experiment.load_models(config, run, device=resolve_device(device))
    if not models:
        raise RunError(f"{run.checkpoints}: no checkpoint to load (has the run started?)")
    return models


def sample_run(run_dir: str | Path, request: SampleRequest, device: str = "auto") -> str:
    """Samples from a run's generative or language model; returns what to print."""
    experiment, config, run, _ = _load(run_dir)
    if experiment.sample is None:
        raise ExperimentError(
            f"experiment {experiment.name!r} trains classifiers; 'sample' is for generative "
            f"and language models"
        )
    with hold_run_writing(run.path, request.out):
        return experiment.sample(config, run, device=resolve_device(device), request=request)


def sampled_models(
    models: dict[str, TrainedModel], request: SampleRequest, run_dir: RunDir, classes: int = 10
) -> dict[str, TrainedModel]:
    """What ``classicnets sample`` draws from: the model of ``request.variant``, else every one
    of ``models``. Errors name what the run has: no checkpoint yet, no such variant, or a
    ``request.label`` that is not a class below ``classes``."""
    if not models:
        raise RunError(
            f"{run_dir.checkpoints}: no checkpoint to sample from (has the run started?)"
        )
    if request.label is not None and not 0 <= request.label < classes:
        raise ExperimentError(f"--label must be a class 0-{classes - 1}, got {request.label}")
    if request.variant is None:
        return models
    if request.variant not in models:
        trained = ", ".join(models)
        raise ExperimentError(f"--variant {request.variant!r}: this run has {trained} trained")
    return {request.variant: models[request.variant]}


def load_checkpointed(
    build: Callable[[str], Any],
    run_dir: RunDir,
    variants,
    device: str,
    info: Callable[[str, Any], dict[str, Any]],
    served: Callable[[Any], Any] | None = None,
) -> dict[str, TrainedModel]:
    """Each variant's newest valid checkpoint as a ``TrainedModel``, in eval mode.

    Args:
        build: ``build(variant) -> nn.Module``, the architecture the variant was trained with.
        run_dir: the run folder.
        variants: names to look for; those without a checkpoint are left out.
        device: where to load the models.
        info: ``info(variant, model) -> dict``, what the model takes and returns (stored with
            exports and shown by ``classicnets predict``).
        served: which part of the trained module to hand out (the GAN's generator); None for
            the whole module.
    """
    from classicnets.train.checkpoint import latest_checkpoint
    from classicnets.train.state import load_model_weights

    out = {}
    for variant in variants:
        found = latest_checkpoint(run_dir.checkpoints, variant)
        if found is None:
            continue
        tensors, state, path = found
        model = build(variant).to(device)
        load_model_weights(model, tensors)
        module = model if served is None else served(model)
        out[variant] = TrainedModel(
            module.eval(), int(state["step"]), str(path), info(variant, model)
        )
    return out


def load_classifiers(experiment_build, config, run_dir: RunDir, variants, device: str):
    """``load_models`` for the MNIST classifier experiments: newest checkpoint per variant."""
    from classicnets.data import CLASS_NAMES

    def info(variant: str, model) -> dict[str, Any]:
        return {
            "kind": "classifier",
            **mnist_input(),
            "class_names": list(CLASS_NAMES[config.dataset]),
            "dataset": config.dataset,
        }

    def build(variant: str):
        return experiment_build(config, variant)

    return load_checkpointed(build, run_dir, variants, device, info)


def evaluate_classifiers(experiment_build, config, run_dir: RunDir, variants, device: str):
    """``evaluate`` for the MNIST classifier experiments: test metrics and confusion matrix."""
    from classicnets.data import CLASS_NAMES
    from classicnets.metrics.evaluation import evaluate_classifier

    names = CLASS_NAMES[config.dataset]
    data = load_image_data(config.dataset, config.data_dir, device, download=config.download)
    out = {}
    for variant, trained in load_classifiers(
        experiment_build, config, run_dir, variants, device
    ).items():
        out[variant] = {
            **evaluate_classifier(trained.model, data.test_x, data.test_y, names),
            "step": trained.step,
            "checkpoint": trained.checkpoint,
        }
    return out


def evaluate_run(run_dir: str | Path, device: str = "auto") -> dict[str, Any]:
    """Metrics of the trained models of a run, on the test split."""
    experiment, config, run, _ = _load(run_dir)
    return experiment.evaluate(config, run, device=resolve_device(device))


def image_data_of(config, device: str) -> ClassificationData:
    """``load_image_data`` of an experiment's config: its ``dataset`` (MNIST for a config with
    none), ``data_dir``, ``download``, ``train_limit`` and ``test_limit`` (all of the test split
    for a config with none)."""
    dataset = getattr(config, "dataset", "mnist")
    test_limit = getattr(config, "test_limit", None)
    return load_image_data(dataset, config.data_dir, device, config.train_limit, config.download,
                           test_limit)  # fmt: skip
