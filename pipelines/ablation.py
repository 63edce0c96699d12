"""``medseg ablate``: parse the options, call :func:`medseg.engine.ablation.run_ablation`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        typer.echo(f"error: {what}: expected comma-separated integers, got {text!r}", err=True)
        raise typer.Exit(2) from None


def ablate_command(
    out: Annotated[Path, typer.Option(help="Folder for data, runs, results and the tables.")] = Path(
        "ablation_out"
    ),
    variants: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated recipes of configs/variants/ (default: all but ag_scale_average)."
        ),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds, e.g. 0,7,11.")] = "0,7,11",
    kind: Annotated[
        str, typer.Option(help="Phantoms: standard, or hard (low-contrast pancreas, low-dose noise).")
    ] = "standard",
    train_cases: Annotated[int, typer.Option(help="Training phantoms.")] = 30,
    test_cases: Annotated[int, typer.Option(help="Held-out phantoms every run is scored on.")] = 4,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra config override for every variant.")
    ] = None,
    costs_only: Annotated[
        bool, typer.Option(help="Only re-measure FLOPs/time/memory of the stored results.")
    ] = False,
) -> None:
    """Train every attention variant with every seed on the same phantoms and budget; write ablation.md and
    CSV tables (mean ± std over seeds, paired bootstrap intervals against the U-Net and the Attention U-Net,
    where the gates look, cost). Resumable; several processes may run on one folder."""
    from medseg.config import ConfigError
    from medseg.engine.ablation import AblationPhantoms, remeasure_costs, run_ablation

    try:
        if costs_only:
            remeasure_costs(out, log=typer.echo)
        else:
            chosen = [v.strip() for v in variants.split(",")] if variants else None
            run_ablation(
                out,
                chosen,
                seeds=_ints(seeds, "--seeds"),
                phantoms=AblationPhantoms(kind, train_cases, test_cases),
                extra_overrides=set_ or [],
                log=typer.echo,
            )
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"tables: {out / 'ablation.md'}")
