"""``medseg quantize CKPT -d DATASET``: call :func:`medseg.inference.quantize.quantize_checkpoint`, print the
agreement check.

**Check cases are held out from training**: the run's validation cases (``validation.json`` beside the
checkpoint) and the dataset's test images (``imagesTs/``), up to ``--check``; only when there are none does the
check fall back to training cases (said in the output: a model agrees with itself best on what it was trained on,
so that check is optimistic). **Calibration** takes ``--calibration`` of the remaining training cases (shuffled
with ``--seed``), **accuracy control** the next ``--control`` of them (none are check cases). Exit 0 when the check held (``--precision auto`` will then use int8), 1 when it did not (the
graph is stored but only ``--precision int8`` uses it), 2 on unusable input (one ``error:`` line).
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
    import random

    from medseg.batch.inputs import resolve_checkpoints
    from medseg.data.datasets import training_cases
    from medseg.inference.quantize import AGREEMENT, quantize_checkpoint
    from medseg.io import InputError

    try:
        if calibration < 1 or check < 1 or windows < 1 or control < 0:
            raise InputError("--calibration, --check and --windows must be at least 1, --control at least 0")
        if not 0.0 < max_drop < 1.0:
            raise InputError(f"--max-drop must lie between 0 and 1 (got {max_drop})")
        paths = resolve_checkpoints(checkpoint)
        if len(paths) != 1:
            raise InputError(f"{checkpoint}: {len(paths)} checkpoints found; quantize one file at a time")
        cases = {c["case"]: c["image"] for c in training_cases(dataset)}
        held_out = _held_out(paths[0], dataset, cases)
        names = sorted(set(cases) - set(held_out))
        random.Random(seed).shuffle(names)
        if not held_out:
            typer.echo("no validation or test cases found: checking on training cases (optimistic)")
            held_out = {n: cases[n] for n in names[calibration:]}
        if len(names) < calibration or not held_out:
            raise InputError(
                f"{dataset}: {len(cases)} labelled case(s); --calibration {calibration} and a check need more"
            )
        check_cases = [held_out[n] for n in sorted(held_out)][:check]
        calibration_cases = [cases[n] for n in names[:calibration]]
        control_cases = [cases[n] for n in names[calibration : calibration + control] if n not in held_out]
        record = quantize_checkpoint(
            paths[0],
            calibration_cases,
            check_cases,
            windows=windows,
            seed=seed,
            log=typer.echo,
            control=control_cases,
            max_drop=max_drop,
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


def _held_out(checkpoint: Path, dataset: Path, cases: dict[str, str]) -> dict[str, str]:
    """Case name → image of the run's validation cases and the dataset's test images (never trained on)."""
    import json

    from medseg.io import case_name

    found: dict[str, str] = {}
    record = checkpoint.parent / "validation.json"
    if record.is_file():
        try:
            names = json.loads(record.read_text()).get("cases") or []
        except (OSError, ValueError, AttributeError):
            names = []
        found.update({n: cases[n] for n in names if isinstance(n, str) and n in cases})
    for image in sorted((dataset / "imagesTs").glob("*.nii.gz")):
        found.setdefault(case_name(image), str(image))
    return found
