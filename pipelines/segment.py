"""``medseg segment``: parse the options, call :func:`medseg.inference.batch.segment_inputs`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def segment_command(
    input: Annotated[Path, typer.Option("-i", "--input", help="NIfTI file or folder of NIfTI files.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output file (.nii.gz) for one input, or folder.")
    ],
    model: Annotated[Path, typer.Option("-m", "--model", help="Checkpoint (best.pt) from medseg train.")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    overlap: Annotated[
        float | None, typer.Option(help="Sliding-window overlap (default: from checkpoint).")
    ] = None,
    sw_batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass.")] = None,
) -> None:
    """Segment CT scans; each mask has its scan's exact shape and affine, with a label-name JSON sidecar."""
    from medseg.config import ConfigError
    from medseg.inference.batch import segment_inputs
    from medseg.io import InputError

    try:
        report = segment_inputs(input, output, model, device, overlap, sw_batch_size, log=typer.echo)
    except (InputError, ConfigError, RuntimeError, ValueError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{len(report.written)} written, {len(report.failed)} failed")
    if report.failed:
        for reason in report.failed.values():
            typer.echo(f"  failed: {reason}", err=True)
        raise typer.Exit(1)
