"""``medseg review OUTDIR``: (re)write the batch review page of a ``medseg segment`` output folder; with
``--serve``, also serve the review application (viewer, verdicts, corrections); with ``--export-corrections
DIR``, write the corrected cases as a training dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def review_command(
    outdir: Annotated[
        Path, typer.Argument(help="Output folder of medseg segment (masks, sidecars, previews).")
    ],
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve the review application (NiiVue viewer, verdicts).")
    ] = False,
    host: Annotated[str, typer.Option(help="Address to bind with --serve (default: this machine only).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port with --serve (0: a free one).")] = 8765,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="With --serve: view only; every write is refused.")
    ] = False,
    export_corrections: Annotated[
        Path | None,
        typer.Option(
            "--export-corrections",
            metavar="DIR",
            help="Write the corrected cases with their scans as an MSD dataset in DIR (new or empty).",
        ),
    ] = None,
) -> None:
    """Write OUTDIR/index.html: one row per case with thumbnail, organ volumes and HU, QA flags (flagged
    cases first), links to the files. Static and self-contained: open it from a file share.

    --serve: a local web application over the folder: a viewer per case (CT under the label map, window
    presets, attention and uncertainty overlays, QA flag locations), verdicts stored in OUTDIR/review.sqlite
    (exported as review.csv/.json/.jsonl) and label corrections saved as <case>_corrected.nii.gz.
    """
    from medseg.batch.review import collect_cases, write_review_page
    from medseg.io import InputError

    if not outdir.is_dir():
        typer.echo(f"error: {outdir}: output folder not found", err=True)
        raise typer.Exit(2)
    if export_corrections is not None:
        from medseg.review import export_corrections as export

        try:
            meta = export(outdir, export_corrections, log=typer.echo)
        except InputError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"dataset: {meta} (check: medseg check-dataset {export_corrections}; fine-tune: medseg train "
                   f"CONFIG --set data.root={export_corrections} --set train.init_from=RUN/best.pt)")  # fmt: skip
        return
    cases = collect_cases(outdir)
    if not cases:
        typer.echo(f"error: {outdir}: no segmented case found (no <case>.json sidecar)", err=True)
        raise typer.Exit(2)
    if not read_only:
        try:
            page = write_review_page(outdir, cases)
        except OSError as exc:
            typer.echo(f"error: {outdir}: cannot write index.html ({exc.strerror or exc})", err=True)
            raise typer.Exit(2) from None
        flagged = sum(1 for case in cases if case.flags)
        typer.echo(f"review page: {page} ({len(cases)} cases, {flagged} flagged)")
    if serve:
        _serve(outdir, host, port, read_only)


def _serve(outdir: Path, host: str, port: int, read_only: bool) -> None:
    from medseg.io import InputError
    from medseg.review import make_server

    try:
        server = make_server(outdir, host, port, read_only=read_only)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(
            f"error: {host}:{port}: cannot serve there ({exc.strerror or exc}); try --port 0", err=True
        )
        raise typer.Exit(2) from None
    mode = " (read-only)" if read_only else ""
    typer.echo(f"review server{mode}: {server.url}  (Ctrl-C stops it)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
