"""The named experiments (recipes): each a config dataclass and a run function.

``classicnets run NAME`` resolves NAME here. See ``common.Experiment`` for the interface.
"""

from classicnets.experiments.common import (
    EXPERIMENTS,
    Experiment,
    ExperimentError,
    evaluate_run,
    get_experiment,
    list_experiments,
    resume_experiment,
    run_experiment,
)

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "ExperimentError",
    "evaluate_run",
    "get_experiment",
    "list_experiments",
    "resume_experiment",
    "run_experiment",
]
