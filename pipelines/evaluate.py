"""``medseg evaluate``: parse the options, call :func:`medseg.evaluation.evaluate_folder`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    try:
        labels = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 1,2,5, got {text!r}") from None
    if any(lab <= 0 for lab in labels):
        raise typer.BadParameter(f"labels must be positive integers, got {text!r}")
    return labels


def evaluate_command(
    pred: Annotated[Path, typer.Option("--pred", help="Predicted label map (NIfTI) or folder of them.")],
    ref: Annotated[
        Path, typer.Option("--ref", help="Reference label map (NIfTI) or folder; cases matched by name.")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Per-case CSV; summary JSON and PNGs next to it.")
    ],
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Comma-separated labels, e.g. 1,2,5 (default: all present)."),
    ] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="NSD tolerance in mm.")] = 2.0,
    percentile: Annotated[
        float, typer.Option("--percentile", help="Hausdorff percentile (HD95 = 95).")
    ] = 95.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Cases evaluated in parallel.")] = 1,
    resample_pred: Annotated[
        bool,
        typer.Option("--resample-pred", help="Resample predictions on another grid (nearest neighbour)."),
    ] = False,
    label_names: Annotated[
        Path | None,
        typer.Option("--label-names", help="Sidecar JSON {'labels': {name: index}} or MSD dataset.json."),
    ] = None,
) -> None:
    """Score predicted segmentations against references: Dice, IoU, HD95, ASSD, NSD, volumes."""
    from medseg.evaluation import EvaluationError, EvaluationSettings, evaluate_folder

    settings = EvaluationSettings(
        labels=_parse_labels(labels), tolerance=tolerance, percentile=percentile, resample_pred=resample_pred
    )
    try:
        summary = evaluate_folder(
            pred, ref, output, settings, label_names=label_names, workers=workers, progress=True
        )
    except (EvaluationError, OSError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(code=2) from None
    for warning in summary["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    for failure in summary["failed"]:
        typer.echo(f"error: {failure['error']}", err=True)  # the message starts with the file
    n_bad = len(summary["failed"]) + len(summary["missing_predictions"])
    typer.echo(
        f"evaluated {summary['n_evaluated']}/{summary['n_cases']} cases -> {output} "
        f"(+ {Path(output).with_suffix('').name}_summary.json)"
    )
    if n_bad:
        typer.echo(
            f"{len(summary['failed'])} case(s) failed, {len(summary['missing_predictions'])} reference(s) "
            "without prediction (see the summary JSON)",
            err=True,
        )
        raise typer.Exit(code=1)
