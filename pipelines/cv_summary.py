"""``medseg cv-summary RUN``: call :func:`medseg.engine.crossval.cv_summary`, print the table.

Exit 0 when every fold has validation scores, 1 when some are missing (the summary of the others is still
written and printed, the missing folds named), 2 when nothing can be summarised.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer


def _number(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(result: dict) -> list[str]:
    """Rows per label: each fold, then the pooled line."""
    header = f"{'label':<16} {'fold':>6} {'cases':>5} {'Dice':>7} {'NSD':>7} {'HD95 mm':>9} {'missed':>6}"
    lines = [header, "-" * len(header)]
    for name in result["pooled"]:
        parts = [(str(k), t[name]) for k, t in sorted(result["folds"].items())]
        for fold, row in [*parts, ("pooled", result["pooled"][name])]:
            lines.append(
                f"{name:<16} {fold:>6} {row['cases']:>5} {_number(row['dice'], 4):>7} {_number(row['nsd'], 4):>7} "
                f"{_number(row['hd95'], 2):>9} {row['missed']:>6}"
            )
    return lines


def cv_summary_command(
    run: Annotated[Path, typer.Argument(help="Cross-validation run folder (splits.json, fold_K/).")],
) -> None:
    """Per-fold and pooled validation Dice / NSD / HD95 of a cross-validation run; pooled postprocessing.

    Writes RUN/cv_summary.json and RUN/cv_summary.csv. When every fold is done, decides the per-label
    postprocessing on all folds' validation cases pooled (nnU-Net) and records it in every fold_K/best.pt,
    which `medseg segment -m RUN` then applies to the fold ensemble.
    """
    from medseg.engine.crossval import SUMMARY_CSV, SUMMARY_JSON, cv_summary
    from medseg.io import InputError

    try:
        result = cv_summary(run, log=typer.echo)
    except InputError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    for line in format_table(result):
        typer.echo(line)
    typer.echo(
        f"{len(result['folds'])} of {result['n_folds']} folds, {result['pooled_cases']} validation cases pooled "
        "(HD95: worst-case mean, a missed organ counts as the image diagonal)"
    )
    typer.echo(f"written: {run / SUMMARY_JSON}, {run / SUMMARY_CSV}")
    if result["missing"]:
        for k, why in sorted(result["missing"].items()):
            typer.echo(f"error: fold {k} missing: {why} ({run / f'fold_{k}'})", err=True)
        typer.echo("postprocessing not decided: it needs every fold's validation predictions", err=True)
        raise typer.Exit(1)
