"""The ``classicnets`` command line: parses, calls library functions, prints where results went.

    classicnets list
    classicnets run EXPERIMENT [--set key=value ...] [--quick] [--device auto|cpu|cuda] [--out DIR]
    classicnets sweep EXPERIMENT --grid key=v1,v2 [--grid ...] [--set ...] [--quick] [--jobs N]
    classicnets resume RUN_DIR|SWEEP_DIR [--device ...]
    classicnets eval RUN_DIR [--device ...]
    classicnets sample RUN_DIR [--n N] [--label K] [--temperature T] [--prompt WORDS]
    classicnets report RUN_DIR [RUN_DIR ...] [-o FILE] [--compare]
    classicnets runs [DIR] [--json]                                              (no torch)
    classicnets export RUN_DIR --format onnx|numpy [--fold-bn] [--variant V] [--out DIR]
    classicnets predict BUNDLE INPUT [--top K] [--out PNG] [--label K] [--n N]   (no torch)
    classicnets import-keras FILE --out DIR [--channels-first]
    classicnets bn-check PATH [--inputs X.npy] [--json]
    classicnets recalibrate PATH [--inputs X.npy]

Bad input (an unknown experiment, an unknown or ill-typed ``--set`` key, an unreadable path or
data file) gives a one-line message on stderr and exit code 2, never a traceback. Torch is
imported only by the commands that need it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILED = 1
MAX_SAMPLES = 10_000  # sample --n: more is a mistyped number, not a request


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints usage too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    from classicnets import __version__

    parser = _Parser(
        prog="classicnets",
        description=_ABOUT,
        epilog=_START,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"classicnets {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")  # fmt: skip

    def command(name: str, help: str):  # every subcommand: a line, a description, an example
        what, example = _COMMANDS[name]
        return sub.add_parser(name, help=help, description=f"{what}\n\nexample:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip

    command("list", help="experiments and models, one line each")

    p = command("run", help="run an experiment into a new run folder")
    p.add_argument("experiment", help="experiment name (see 'classicnets list')")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable), e.g. --set steps=1000",
    )
    p.add_argument("--quick", action="store_true", help="a few hundred steps (tests, demos)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--out", default=None, help="run folder (default runs/<experiment>-<time>)")

    p = command("sweep", help="an experiment at every point of a grid, compared in one report")
    p.add_argument("experiment", help="experiment name (see 'classicnets list')")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a config field and its values (repeatable: the points are every combination)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field at every point (repeatable)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="quick runs at every point")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweep-<name>-<time>)")
    p.add_argument("--jobs", type=int, default=0, help="workers side by side (0: automatic)")

    p = command("resume", help="continue a stopped run or sweep from its last checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--device", default=None, help="default: the device the run was started on")

    p = command("eval", help="metrics of a run's trained models on the test split")
    p.add_argument("run_dir")
    p.add_argument("--device", default="auto")

    p = command("sample", help="generative models: an image grid; language models: text")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--label", type=int, default=None, help="class to generate (conditional)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument("--prompt", default=None, help="language models: words to continue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=None, help="which model of the run (default: all)")
    p.add_argument("--out", default=None, help="where to write an image grid")
    p.add_argument("--device", default="auto")

    p = command("report", help="(re)write the HTML report of one or several runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default=None, help="write a combined report to this file")
    p.add_argument("--compare", action="store_true",
                   help="runs of one experiment side by side: table, overlaid curves")  # fmt: skip

    p = command("runs", help="the runs in a folder, one line each: status, main metrics, wall time")
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the table as a JSON list")

    p = command("export", help="export a run's models: NumPy bundle or ONNX, checked")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=("numpy", "onnx"))
    p.add_argument("--fold-bn", action="store_true", help="fold BN into the preceding layer")
    p.add_argument("--variant", default=None, help="which model of the run (default: all)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/export)")

    p = command("predict", help="run an exported NumPy bundle (imports no torch)")
    p.add_argument("bundle", help="bundle folder (or its manifest.json)")
    p.add_argument("input", help="PNG/.npy image, text or .txt file, or a generator's seed")
    p.add_argument("--top", type=int, default=5, help="classes or next words to list")
    p.add_argument("--out", default=None, help="where to write an output image (PNG)")
    p.add_argument("--label", type=int, default=None, help="class for conditional models")
    p.add_argument("--n", type=int, default=None, help="generators: images to draw")

    p = command("import-keras", help="a Keras .keras/.h5 model as a classicnets model folder")
    p.add_argument("file", help="the Keras model file (.keras archive or legacy .h5)")
    p.add_argument("--out", required=True, help="the model folder to write (new or empty)")
    p.add_argument("--channels-first", action="store_true", help="take NCHW images, not NHWC")

    p = command("bn-check", help="the BN doctor: running statistics against the data")
    p.add_argument("path", help="a run folder or a model folder")
    p.add_argument(
        "--inputs", default=None, help=".npy of inputs (default: the run's training data)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("recalibrate", help="precise BN statistics as a new checkpoint")
    p.add_argument("path", help="a run folder or a model folder")
    p.add_argument(
        "--inputs", default=None, help=".npy of inputs (default: the run's training data)"
    )
    return parser


_ABOUT = """\
Train, study and ship the classic deep-learning models: MLPs with and without batch
normalization, ResNets, convolutional autoencoders, VAEs, GANs and RNN language models, each
experiment a recipe with documented defaults, a run folder with its metrics, checkpoints, plots
and an HTML report, resumable after any stop, exportable to ONNX and NumPy."""

_START = """\
start here:
  classicnets list                                  the experiments and models
  classicnets run bn-mlp --quick                    a run of seconds; then open its report.html
  classicnets run bn-mlp                            the full run (about a minute on 2 cores)
  classicnets sweep bn-mlp --grid lr_bn=0.1,0.5     one run per value, compared in one report
  classicnets runs                                  what is in runs/
  classicnets COMMAND --help                        what a command does, with an example"""

# command -> (what it does for its user, an example)
_COMMANDS = {
    "list": ("Print the experiments (classicnets run NAME) and the registered models.",
             "classicnets list"),
    "run": ("Run an experiment into a new run folder: train every variant, then write the "
            "summary, the plots\nand report.html. --set changes a config field (checked: a "
            "misspelled key or a value out of range\nis an error naming it); --quick is the "
            "few-hundred-step version used by tests and demos.",
            "classicnets run vae --set epochs=5 --set binarize=true --out runs/vae5"),
    "sweep": ("Run an experiment at every point of a grid into one sweep folder: a run folder "
              "per point, every\nvariant of every point a worker of its own (as many side by "
              "side as the machine allows),\nthen report.html: a table of the points (the "
              "differing values, final metrics, wall time, the\nbest marked) and the curves "
              "overlaid, a line per point. Values of a list-valued key are JSON\nlists: "
              "--grid widths=[64,64],[128,128]. Resume a stopped sweep with classicnets resume.",
              "classicnets sweep bn-mlp --grid lr_bn=0.1,0.5,1 --grid seed=0,1 --quick"),
    "resume": ("Continue a run stopped by Ctrl-C, SIGTERM, SIGKILL, stop_after or a crash, "
               "from its last checkpoint,\nto the same result as an uninterrupted run; for a "
               "sweep folder, every point not yet finished.", "classicnets resume runs/vae5"),
    "eval": ("Evaluate the trained models of a run on the test split (newest checkpoint of "
             "each variant).", "classicnets eval runs/vae5"),
    "sample": ("Draw from a run's generative models (an image grid, PNG) or language models "
               "(text).", "classicnets sample runs/gan --label 3 --n 16 --out threes.png"),
    "report": ("Write a run's (or a sweep's) report.html again, or one combined report of "
               "several runs (-o); "
               "with --compare,\nruns of one experiment side by side: a table of the config "
               "values that differ and the final\nmetrics (the best marked), and their curves "
               "overlaid, a line per run.",
               "classicnets report runs/a runs/b --compare -o ab.html"),
    "runs": ("List the run folders in DIR (default runs/), oldest first: experiment, created, "
             "status (running,\ncomplete, stopped, diverged, failed, damaged), wall time, each "
             "variant's main metric, folder.", "classicnets runs runs/ --json"),
    "export": ("Export a run's trained models as a NumPy bundle (runs without torch) or ONNX, "
               "each checked\nagainst the torch model on the same inputs.",
               "classicnets export runs/bn-mlp --format numpy --fold-bn"),
    "predict": ("Run an exported NumPy bundle on an image, a text or a seed; needs NumPy only, "
                "not torch.", "classicnets predict runs/bn-mlp/export/bn digit.png --top 3"),
    "import-keras": ("Bring a Keras model (.keras or .h5) over as a classicnets model folder, "
                     "BN conventions mapped,\nits outputs checked against the file's.",
                     "classicnets import-keras model.keras --out models/mine"),
    "bn-check": ("The BN doctor: every BN layer's running statistics against the data it "
                 "will see; flags layers\nnever updated, stale or dominated by eps.",
                 "classicnets bn-check runs/bn-mlp --inputs images.npy"),
    "recalibrate": ("Recompute BN running statistics exactly on data (precise BN) and save "
                    "them as a new checkpoint,\nthe old one kept.",
                    "classicnets recalibrate runs/bn-mlp --inputs images.npy"),
}  # fmt: skip


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: reported in one line with exit code 2."""
    from classicnets.data.sources import DataError
    from classicnets.experiments.common import ExperimentError
    from classicnets.experiments.config import ConfigError
    from classicnets.export import ExportError
    from classicnets.files import FolderLockedError
    from classicnets.interop.keras import KerasImportError
    from classicnets.report.html import ReportError
    from classicnets.train.checkpoint import CheckpointError
    from classicnets.train.run import RunError

    return (
        DataError,
        ConfigError,
        ExperimentError,
        RunError,
        ReportError,
        CheckpointError,
        ExportError,
        FolderLockedError,
        KerasImportError,
    )


def _predict_errors() -> tuple[type[BaseException], ...]:
    """``predict`` runs where torch is not installed: the errors of its NumPy-only modules."""
    from classicnets.data.sources import DataError
    from classicnets.export import ExportError

    return (DataError, ExportError)


def _fmt_acc(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def cmd_list(args) -> int:
    from classicnets.experiments import list_experiments
    from classicnets.models import list_models

    print("experiments:")
    for e in list_experiments():
        print(f"  {e.name:<16} {e.description}")
    print("models:")
    for m in list_models():
        print(f"  {m.name:<16} {m.description}")
    return 0


def _headline(values: dict) -> str:
    """The main figure of a variant: accuracy for classifiers, else its first test metric."""
    if values.get("test_accuracy") is not None:
        return f"test accuracy {_fmt_acc(values['test_accuracy'])}"
    for key, value in values.items():
        if key.startswith("test_") and isinstance(value, (int, float)):
            return f"{key.replace('_', ' ')} {value:.4g}"
    return f"status {values.get('status', 'n/a')}"


def _print_summary(run_dir: Path, summary: dict) -> None:
    for variant, values in summary.get("variants", {}).items():
        print(f"  {variant:<10} {_headline(values)} after {values.get('steps')} steps")
    print(f"status: {summary.get('status')}, wall time {summary.get('wall_time_s', 0):.1f} s")
    print(f"run folder: {run_dir}")
    print(f"report: {run_dir / 'report.html'}")


def cmd_run(args) -> int:
    from classicnets.experiments import run_experiment

    run_dir, summary = run_experiment(
        args.experiment, args.overrides, quick=args.quick, device=args.device, out=args.out
    )
    _print_summary(run_dir, summary)
    return 0


def cmd_sweep(args) -> int:
    from classicnets.experiments.sweep import run_sweep

    path, points = run_sweep(args.experiment, args.grid, args.overrides, quick=args.quick,
                             device=args.device, out=args.out, jobs=args.jobs)  # fmt: skip
    _print_points(path, points)
    return 0


def _print_points(path: Path, points: list[dict]) -> None:
    for point in points:
        print(f"{point['name']}: {point['status'] or 'not finished'}")
        for variant, values in point["variants"].items():
            print(f"  {variant:<10} {_headline(values)} after {values.get('steps')} steps")
    print(f"sweep folder: {path}")
    print(f"report: {path / 'report.html'}")


def cmd_resume(args) -> int:
    from classicnets.experiments import resume_experiment
    from classicnets.experiments.sweep import is_sweep, resume_sweep

    if is_sweep(args.run_dir):
        _print_points(Path(args.run_dir), resume_sweep(args.run_dir, device=args.device))
        return 0
    summary = resume_experiment(args.run_dir, device=args.device)
    _print_summary(Path(args.run_dir), summary)
    return 0


def cmd_eval(args) -> int:
    from classicnets.train.run import hold_run

    with hold_run(args.run_dir):  # its confusion-matrix plots go into the run folder
        return _eval(args)


def _eval(args) -> int:
    from classicnets.experiments import evaluate_run
    from classicnets.metrics import format_confusion_matrix, plot_confusion_matrices

    results = evaluate_run(args.run_dir, device=args.device)
    if not results:
        print(f"{args.run_dir}: no checkpoint to evaluate", file=sys.stderr)
        return EXIT_FAILED
    for variant, m in results.items():
        if "confusion_matrix" not in m:  # generative and language models: their own metrics
            figures = ", ".join(
                f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, float) and k != "step"
            )
            print(f"{variant}: step {m.get('step')}, {figures}")
            continue
        print(
            f"{variant}: step {m['step']}, test accuracy {_fmt_acc(m['accuracy'])}, "
            f"test loss {m['loss']:.4f}, macro F1 {m['macro_f1']:.4f}"
        )
        print(format_confusion_matrix(m["confusion_matrix"], m["class_names"]))
        plot = Path(args.run_dir) / "plots" / f"confusion_{variant}.png"
        plot_confusion_matrices(
            plot, m["confusion_matrix"], m["class_names"], title=f"{variant} (step {m['step']})"
        )
        print(f"confusion matrix plot: {plot}\n")
    return 0


def cmd_sample(args) -> int:
    from classicnets.experiments.common import ExperimentError, SampleRequest, sample_run

    if not 1 <= args.n <= MAX_SAMPLES:
        raise ExperimentError(f"--n must be in [1, {MAX_SAMPLES}], got {args.n}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ExperimentError(f"--temperature must be > 0, got {args.temperature}")
    request = SampleRequest(
        n=args.n,
        label=args.label,
        temperature=args.temperature,
        prompt=args.prompt,
        seed=args.seed,
        variant=args.variant,
        out=args.out,
    )
    print(sample_run(args.run_dir, request, device=args.device))
    return 0


def cmd_report(args) -> int:
    from classicnets.report import write_combined_report, write_report
    from classicnets.report.html import ReportError

    if args.compare:
        from classicnets.experiments.sweep import compare_report

        if args.output is None:
            raise ReportError("--compare needs -o FILE, the page to write")
        print(f"report: {compare_report(args.run_dirs, args.output)}")
        return 0
    if args.output is None and len(args.run_dirs) > 1:
        raise ReportError("several run folders need -o FILE for the combined report")
    from classicnets.experiments.sweep import is_sweep, write_sweep_report

    if len(args.run_dirs) == 1 and args.output is None and is_sweep(args.run_dirs[0]):
        print(f"report: {write_sweep_report(args.run_dirs[0], hold=True)}")
        return 0
    if args.output is None:
        path = write_report(args.run_dirs[0])
    elif len(args.run_dirs) == 1:
        path = write_report(args.run_dirs[0], out_path=args.output)
    else:
        path = write_combined_report(args.run_dirs, args.output)
    print(f"report: {path}")
    return 0


def cmd_runs(args) -> int:
    import json

    from classicnets.report.runs import format_runs, list_runs

    entries = list_runs(args.dir)
    if args.json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
    else:
        print(format_runs(entries))
    return 0


def cmd_export(args) -> int:
    from classicnets.experiments.export import export_run

    for report in export_run(args.run_dir, args.format, args.fold_bn, args.variant, args.out):
        print(report.summary())
    return 0


def cmd_predict(args) -> int:
    from classicnets.export.predict import PredictRequest, predict

    request = PredictRequest(args.input, args.top, args.out, args.label, args.n)
    print(predict(args.bundle, request))
    return 0


def cmd_import_keras(args) -> int:
    from classicnets.interop.folder import import_keras

    folder = import_keras(args.file, args.out, channels_first=args.channels_first)
    print(f"model folder: {folder} (export it with: classicnets export {folder} --format numpy)")
    return 0


def cmd_bn_check(args) -> int:
    import json

    from classicnets.experiments.doctor import bn_check, reports_as_json
    from classicnets.nn.doctor import format_report

    reports = bn_check(args.path, args.inputs)
    if args.json:
        print(json.dumps(reports_as_json(reports), indent=1))
    else:
        for name, layers in reports.items():
            print(format_report(layers, title=f"{name}:"))
    return 0


def cmd_recalibrate(args) -> int:
    from classicnets.experiments.doctor import recalibrate

    for line in recalibrate(args.path, args.inputs):
        print(line)
    return 0


COMMANDS = {
    "list": cmd_list,
    "run": cmd_run,
    "sweep": cmd_sweep,
    "resume": cmd_resume,
    "eval": cmd_eval,
    "report": cmd_report,
    "runs": cmd_runs,
    "sample": cmd_sample,
    "export": cmd_export,
    "predict": cmd_predict,
    "import-keras": cmd_import_keras,
    "bn-check": cmd_bn_check,
    "recalibrate": cmd_recalibrate,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``classicnets`` command; returns the exit code."""
    args = _build_parser().parse_args(argv)
    if args.command == "runs":  # reads JSON files only: no torch
        from classicnets.report.html import ReportError

        known: tuple[type[BaseException], ...] = (ReportError,)
    else:
        known = _predict_errors() if args.command == "predict" else _known_errors()
    try:
        return COMMANDS[args.command](args)
    except known as exc:
        print(f"classicnets: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # read-only, disk full, a file where a folder belongs, ...
        print(f"classicnets: error: {_describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("classicnets: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.command == "predict":  # its errors come from NumPy code; torch may be absent
            raise
        from classicnets.train.faults import StopRequested
        from classicnets.train.loop import NonFiniteLossError

        if isinstance(exc, StopRequested):
            resume = f"; continue with: classicnets resume {_run_dir_of(args, exc)}"
            print(f"classicnets: {exc}{resume}", file=sys.stderr)
            return exc.exit_code
        from classicnets.train.jobs import WorkerFailed

        if isinstance(exc, NonFiniteLossError | WorkerFailed):
            print(f"classicnets: run stopped: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


def _one_line(message: str) -> str:
    return " ".join(message.split("\n"))


def _describe_os_error(exc: OSError) -> str:
    """``PATH: what went wrong`` for an error of the file system. Files are written atomically,
    so whatever failed left the previous version in place and the run resumable."""
    path = exc.filename if exc.filename is not None else "a file"
    reason = exc.strerror or type(exc).__name__
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    return f"{path}: {reason} (nothing was overwritten; fix it and run the command again)"


def _run_dir_of(args, exc) -> str:
    if exc.resume_path:  # a sweep: resume all of it, not the one point
        return str(exc.resume_path)
    if exc.checkpoint:  # RUN_DIR/checkpoints/NAME.json
        return str(Path(exc.checkpoint).parent.parent)
    return getattr(args, "run_dir", None) or getattr(args, "out", None) or "RUN_DIR"


def entry() -> None:
    """The ``classicnets`` command and ``python -m classicnets``: ``main``, then exit.

    Under torchrun the process leaves without the interpreter's teardown: its process group is
    already destroyed and every file written (``train.distributed.shutdown``), yet gloo's threads
    could still abort a process there ("terminate called without an active exception", about
    one language-model run in ten here), and torchrun would report the whole job failed.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))
    sys.exit(code)


if __name__ == "__main__":
    entry()
