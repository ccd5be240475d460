"""One variant of a run, trained in a worker process of its own (``jobs`` > 1).

``python -m classicnets.experiments.worker RUN_DIR VARIANT DEVICE new|resume RESULT_JSON`` is
what ``Job.train_variants`` starts once per variant (through ``train.jobs.run_workers``). The
worker reads the run's config from ``RUN_DIR/config.json``, runs the experiment's ``run`` as
far as the training of ``VARIANT`` (``VariantTrained``), logs and checkpoints into the run
folder like the parent would, and writes how it ended to ``RESULT_JSON``: ``{"result": ...}``,
``{"stopped": {signal, step, checkpoint}}`` or ``{"diverged": {message, step}}``. It takes no
lock: the parent holds the run folder's for it.
"""

from __future__ import annotations

import os
import sys

from classicnets.experiments.common import (
    Job,
    VariantTrained,
    attach_tensorboard,
    get_experiment,
    run_config,
)
from classicnets.train.run import RunDir

__all__ = ["main"]

USAGE = "usage: python -m classicnets.experiments.worker RUN_DIR VARIANT DEVICE new|resume OUT"


def main(argv: list[str]) -> int:
    """Train one variant as the parent asked; return the exit code."""
    if len(argv) != 5 or argv[3] not in ("new", "resume"):
        print(USAGE, file=sys.stderr)
        return 2
    run_path, variant, device, mode, out = argv
    import torch

    from classicnets.train.faults import StopRequested
    from classicnets.train.jobs import THREADS, die_with_parent, write_result
    from classicnets.train.loop import NonFiniteLossError
    from classicnets.train.settings import set_deterministic

    die_with_parent()
    if os.environ.get(THREADS):
        torch.set_num_threads(int(os.environ[THREADS]))
    run = RunDir(run_path)
    experiment = get_experiment(run.read_config()["experiment"])
    config = run_config(run_path)
    if variant not in config.variants:
        print(f"{run.config_path}: no variant {variant!r} in {config.variants}", file=sys.stderr)
        return 2
    set_deterministic(config.deterministic)
    board = attach_tensorboard(config, run)  # this variant's event files, from this process
    try:
        experiment.run(config, Job(run, device, mode == "resume", 1, variant))
    except VariantTrained as done:
        write_result(out, {"result": done.result})
        return 0
    except StopRequested as exc:
        stopped = {"signal": exc.signal_name, "step": exc.step, "checkpoint": exc.checkpoint}
        write_result(out, {"stopped": stopped})
        return exc.exit_code
    except NonFiniteLossError as exc:
        write_result(out, {"diverged": {"message": str(exc), "step": exc.step}})
        return 1
    finally:
        if board is not None:
            board.close()
    print(f"{experiment.name}: run() ended without training {variant!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Every file is written and closed (atomically); the interpreter's teardown of torch would
    # only add a few tenths of a second to each worker's wall time.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
