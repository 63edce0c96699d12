"""``medseg quantize CKPT -d DATASET``: call :func:`medseg.inference.quantize.quantize_checkpoint` on the
dataset's training cases, print the agreement check.

The dataset's labelled cases are shuffled with ``--seed``; the first ``--calibration`` calibrate and the next
``--check`` (disjoint from them) are segmented by exact fp32 and by the int8 graph for the agreement check.
Exit 0 when the check held (``--precision auto`` will then use int8), 1 when it did not (the graph is stored
but only ``--precision int8`` uses it), 2 on unusable input (one ``error:`` line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def quantize_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint (best.pt) or a training run folder.")],
    dataset: Annotated[
        Path,
        typer.Option("--dataset", "-d", help="An MSD or nnU-Net dataset folder with the training cases."),
    ],
    calibration: Annotated[int, typer.Option(help="Cases whose windows calibrate the int8 ranges.")] = 4,
    check: Annotated[int, typer.Option(help="Other cases segmented by fp32 and int8 for the check.")] = 2,
    windows: Annotated[int, typer.Option(help="Calibration items (each one window batch).")] = 32,
    seed: Annotated[int, typer.Option(help="Shuffles the cases and places the windows.")] = 0,
) -> None:
    """Quantize a checkpoint's network to int8 for OpenVINO (NNCF post-training quantization), check it
    against exact fp32 on held-out cases (Dice ≥ 0.99 per label), store it beside the checkpoint."""
    import random

    from medseg.batch.inputs import resolve_checkpoints
    from medseg.data.datasets import training_cases
    from medseg.inference.quantize import AGREEMENT, quantize_checkpoint
    from medseg.io import InputError

    try:
        if calibration < 1 or check < 1 or windows < 1:
            raise InputError("--calibration, --check and --windows must be at least 1")
        paths = resolve_checkpoints(checkpoint)
        if len(paths) != 1:
            raise InputError(f"{checkpoint}: {len(paths)} checkpoints found; quantize one file at a time")
        cases = [c["image"] for c in training_cases(dataset)]
        if len(cases) < calibration + check:
            raise InputError(
                f"{dataset}: {len(cases)} labelled case(s); --calibration {calibration} and --check {check} "
                "need that many distinct cases"
            )
        random.Random(seed).shuffle(cases)
        record = quantize_checkpoint(
            paths[0],
            cases[:calibration],
            cases[calibration : calibration + check],
            windows=windows,
            seed=seed,
            log=typer.echo,
        )
    except InputError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    agreement = record["agreement"]
    lowest = agreement["min_dice"]
    verdict = "holds" if agreement["holds"] else "does NOT hold"
    typer.echo(
        f"int8 graph stored for {paths[0]}; lowest Dice against fp32 "
        f"{'n/a' if lowest is None else f'{lowest:.4f}'}: the bound {AGREEMENT} {verdict}"
        + ("; --precision auto uses it" if agreement["holds"] else "; only --precision int8 uses it")
    )
    if not agreement["holds"]:
        raise typer.Exit(1)
