"""``medseg review OUTDIR``: (re)write the batch review page of a ``medseg segment`` output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def review_command(
    outdir: Annotated[
        Path, typer.Argument(help="Output folder of medseg segment (masks, sidecars, previews).")
    ],
) -> None:
    """Write OUTDIR/index.html: one row per case with thumbnail, organ volumes and HU, QA flags (flagged
    cases first), links to the files. Static and self-contained: open it from a file share."""
    from medseg.batch.review import collect_cases, write_review_page

    if not outdir.is_dir():
        typer.echo(f"error: {outdir}: output folder not found", err=True)
        raise typer.Exit(2)
    cases = collect_cases(outdir)
    if not cases:
        typer.echo(f"error: {outdir}: no segmented case found (no <case>.json sidecar)", err=True)
        raise typer.Exit(2)
    page = write_review_page(outdir, cases)
    flagged = sum(1 for case in cases if case.flags)
    typer.echo(f"review page: {page} ({len(cases)} cases, {flagged} flagged)")
