"""``medseg ablate``: parse the options, call :func:`medseg.engine.ablation.run_ablation`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def ablate_command(
    out: Annotated[Path, typer.Option(help="Folder for data, runs and the ablation table.")] = Path(
        "ablation_out"
    ),
    variants: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated recipes of configs/variants/ (default: all but ag_scale_average)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra config override for every variant.")
    ] = None,
    costs_only: Annotated[
        bool, typer.Option(help="Only re-measure FLOPs/time/memory of an existing table.")
    ] = False,
) -> None:
    """Train every attention variant on the same phantoms with the same budget; write ablation.md/.csv."""
    from medseg.config import ConfigError
    from medseg.engine.ablation import remeasure_costs, run_ablation

    try:
        if costs_only:
            remeasure_costs(out, log=typer.echo)
        else:
            chosen = [v.strip() for v in variants.split(",")] if variants else None
            run_ablation(out, chosen, extra_overrides=set_ or [], log=typer.echo)
    except ConfigError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"table: {out / 'ablation.md'}")
