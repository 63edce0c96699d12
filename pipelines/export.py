"""``medseg export OUTDIR``: DICOM SEG / Slicer / per-organ files for cases ``medseg segment`` already wrote.

Parses the options into :class:`~medseg.config.segment.ExportOptions` and calls
:func:`medseg.batch.reexport.export_outputs`. Exit 0 all exported, 1 some cases failed (the others
written; a broken sidecar or a refused source series fails its case), 2 nothing could start (no such folder,
no segmented case, unknown output type, a ``--source-root`` that is not a folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medseg.config.segment import ExportOptions


def export_command(
    outdir: Annotated[Path, typer.Argument(help="Output folder of medseg segment (masks + sidecars).")],
    output_type: Annotated[
        str,
        typer.Option(
            "--output-type",
            help="Comma-separated: dicom-seg | dicom-seg-labelmap, dicom-rtstruct (DICOM cases), slicer (.seg.nrrd).",
        ),
    ] = ",".join(ExportOptions.types),
    split: Annotated[
        bool, typer.Option("--split", help="One 0/1 mask per organ in <case>_organs/.")
    ] = ExportOptions.split,
    source_root: Annotated[
        Path | None,
        typer.Option(
            "--source-root",
            help="Refuse recorded source series (folders, .zip files) outside this folder.",
        ),
    ] = ExportOptions.source_root,
) -> None:
    """Write viewer files from existing masks and sidecars, without running the network again. A DICOM SEG
    references the case's source series (only the files the sidecar recorded, never a system folder, and
    with --source-root only inside it) and is read back and compared with the mask voxel for voxel."""
    from medseg.batch.reexport import export_outputs
    from medseg.config import ConfigError
    from medseg.io import InputError

    try:
        options = ExportOptions(types=output_type, split=split, source_root=source_root)
        report = export_outputs(outdir, options, log=typer.echo)
    except (InputError, ConfigError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    for case, notes in report.warnings.items():
        for note in notes:
            typer.echo(f"warning: {case}: {' '.join(str(note).split())}", err=True)
    for reason in report.failed.values():
        typer.echo(f"error: {' '.join(reason.split())}", err=True)
    typer.echo(f"{len(report.exported)} exported, {len(report.failed)} failed")
    if report.failed:
        raise typer.Exit(1)
