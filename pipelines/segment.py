"""``medseg segment``: parse the options, call :func:`medseg.inference.batch.segment_inputs`, print.

Progress lines go to stdout; problems to stderr, one line each: ``warning: <file>: <text>`` and, for every
case that failed, ``error: <file>: <cause>``. Exit 0 all done, 1 some cases failed (the others written),
2 the run could not start (missing input, unusable checkpoint, bad output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Redo cases whose mask and sidecar are complete from an earlier run."
        ),
    ] = False,
) -> None:
    """Segment CT scans; each mask has its scan's exact shape and affine, with a label-name JSON sidecar.

    Re-running into the same output folder skips the cases already done with the same input and
    checkpoint (so a killed batch continues); --overwrite redoes them.
    """
    from medseg.config import ConfigError
    from medseg.inference.batch import segment_inputs
    from medseg.io import InputError

    try:
        report = segment_inputs(
            input, output, model, device, overlap, sw_batch_size, log=typer.echo, overwrite=overwrite
        )
    except (InputError, ConfigError, RuntimeError, ValueError) as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(2) from None
    for src, texts in report.warnings.items():
        for text in texts:
            text = _one_line(text)
            typer.echo(f"warning: {text if text.startswith(f'{src}:') else f'{src}: {text}'}", err=True)
    for reason in report.failed.values():
        typer.echo(f"error: {_one_line(reason)}", err=True)
    typer.echo(f"{len(report.written)} written, {len(report.failed)} failed, {len(report.skipped)} skipped")
    if report.failed:
        raise typer.Exit(1)
