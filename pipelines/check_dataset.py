"""``medseg check-dataset``: parse the options, call :func:`medseg.data.check.inspect_dataset`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def check_dataset_command(
    root: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="Dataset folder with dataset.json (MSD or nnU-Net v2 layout)."),
    ],
    workers: Annotated[int, typer.Option("--workers", help="Processes reading voxel data in parallel.")] = 1,
    quick: Annotated[
        bool, typer.Option("--quick", help="Headers and dataset.json only; read no voxel data.")
    ] = False,
) -> None:
    """Check a training dataset and list every problem, one line each (exit 0 clean, 1 problems, 2 unusable).

    Headers first (dataset.json, paths inside the folder, 3D, shape, affine, spacing, duplicates; for an
    nnU-Net dataset also channel files, file_ending and numTraining), then voxels.
    """
    from medseg.data.check import inspect_dataset
    from medseg.io import InputError

    if workers < 1:
        typer.echo(f"error: --workers must be at least 1, got {workers}", err=True)
        raise typer.Exit(code=2)
    try:
        report = inspect_dataset(root, workers=workers, full=not quick)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for problem in report.problems:
        typer.echo(f"error: {problem.line()}", err=True)
    part = "headers only: --quick reads no voxel data" if quick else "headers and voxel data checked"
    if report.problems:
        typer.echo(f"{len(report.problems)} problem(s) in a dataset of {report.num_cases} case(s) ({part})")
        raise typer.Exit(code=1)
    cases, labels = report.num_cases, len(report.labels)
    if report.layout == "nnunet":
        k = len(report.channels)
        part = f"nnU-Net v2 layout, {k} channel{'s' * (k != 1)}; {part}"
    typer.echo(f"dataset OK: {cases} case{'s' * (cases != 1)}, {labels} label{'s' * (labels != 1)} ({part})")
