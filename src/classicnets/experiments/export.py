"""``classicnets export``: the trained models of a run folder (or an imported model folder)
through ``classicnets.export``'s exporters, which work on models alone.
"""

from __future__ import annotations

from pathlib import Path

from classicnets.experiments.common import load_trained_models
from classicnets.export.exporter import TOLERANCE, ExportReport, export_numpy
from classicnets.export.numpy_bundle import ExportError
from classicnets.train.run import hold_run_writing

__all__ = ["export_run"]


def export_run(
    run_dir: str | Path,
    format: str,
    fold_bn: bool = False,
    variant: str | None = None,
    out: str | Path | None = None,
    tolerance: float = TOLERANCE,
) -> list[ExportReport]:
    """Export the trained models of a run folder (newest checkpoint of each variant).

    Args:
        run_dir: the run folder.
        format: ``numpy`` (a bundle folder per variant) or ``onnx`` (``<variant>.onnx``).
        fold_bn: fold BN into the preceding layers first.
        variant: export only this variant (default: all).
        out: output folder (default ``RUN_DIR/export``); a variant goes to ``OUT/<variant>``
            (numpy) or ``OUT/<variant>.onnx``, with ``-folded`` appended when BN is folded.
        tolerance: see ``export_numpy``.
    """
    if format not in ("numpy", "onnx"):
        raise ExportError(f"--format must be numpy or onnx, got {format!r}")
    out_dir = Path(out) if out is not None else Path(run_dir) / "export"
    with hold_run_writing(run_dir, out_dir):  # the default folder is inside the run
        models = load_trained_models(run_dir, device="cpu")
        if variant is not None:
            if variant not in models:
                raise ExportError(
                    f"{run_dir}: no trained variant {variant!r}; the run has {', '.join(models)}"
                )
            models = {variant: models[variant]}
        reports = []
        for name, trained in models.items():
            stem = f"{name}-folded" if fold_bn else name
            metadata = {
                "run": str(Path(run_dir).resolve()),
                "variant": name,
                "step": trained.step,
                "checkpoint": trained.checkpoint,
            }
            if format == "numpy":
                report = export_numpy(
                    trained.model,
                    trained.info,
                    out_dir / stem,
                    fold_bn,
                    tolerance,
                    metadata=metadata,
                )
            else:
                from classicnets.export.onnx_export import export_onnx

                report = export_onnx(
                    trained.model,
                    trained.info,
                    out_dir / f"{stem}.onnx",
                    fold_bn=fold_bn,
                    tolerance=tolerance,
                    metadata=metadata,
                )
            report.variant = name
            reports.append(report)
        return reports
