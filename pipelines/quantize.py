"""``medseg quantize CKPT -d DATASET``: call :func:`medseg.inference.quantize.quantize_dataset`, print the
agreement check.

The cases (:func:`medseg.inference.quantize.quantize_dataset`): the check on held-out cases — the run's
validation cases and the dataset's test images, up to ``--check`` (training cases only when there are none, said
in the output: an optimistic check); calibration on ``--calibration`` of the other training cases (shuffled with
``--seed``), accuracy control on the next ``--control``. Exit 0 when the check held (``--precision auto`` will
then use int8), 1 when it did not (the graph is stored but only ``--precision int8`` uses it), 2 on unusable
input (one ``error:`` line). ``medseg train`` runs the same step at its end (``train.quantize``).
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
    check: Annotated[
        int,
        typer.Option(help="Held-out cases (validation, then test) segmented by fp32 and int8 for the check."),
    ] = 4,
    control: Annotated[
        int,
        typer.Option(
            help="Other training cases for NNCF's accuracy control (layers that cost agreement go back to "
            "float); 0: plain quantization."
        ),
    ] = 6,
    max_drop: Annotated[
        float, typer.Option(help="Accuracy control: allowed fall of the lowest per-label Dice vs fp32.")
    ] = 0.004,
    windows: Annotated[int, typer.Option(help="Calibration items (each one window batch).")] = 32,
    seed: Annotated[int, typer.Option(help="Shuffles the cases and places the windows.")] = 0,
) -> None:
    """Quantize a checkpoint's network to int8 for OpenVINO (NNCF post-training quantization), check it
    against exact fp32 on held-out cases (Dice ≥ 0.99 per label), store it beside the checkpoint."""
    from medseg.batch.inputs import resolve_checkpoints
    from medseg.inference.quantize import AGREEMENT, CaseCounts, quantize_dataset
    from medseg.io import InputError

    try:
        paths = resolve_checkpoints(checkpoint)
        if len(paths) != 1:
            raise InputError(f"{checkpoint}: {len(paths)} checkpoints found; quantize one file at a time")
        record = quantize_dataset(
            paths[0],
            dataset,
            CaseCounts(calibration=calibration, check=check, control=control),
            windows=windows,
            seed=seed,
            max_drop=max_drop,
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
