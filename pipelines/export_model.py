"""``medseg export-model CKPT -o model.onnx``: call :func:`medseg.inference.onnx_export.export_model`, print what
was written.

Exit 0 on success, 2 when the checkpoint is unusable or the ONNX exporter is missing (one ``error:`` line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_model_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint (best.pt) or a training run folder (its best.pt).")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The ONNX file to write (model.json is written beside it).")
    ] = Path("model.onnx"),
    window: Annotated[
        str | None,
        typer.Option(
            help="Window as X,Y,Z voxels (default: the checkpoint's, what `medseg segment` slides)."
        ),
    ] = None,
) -> None:
    """Export a trained network as ONNX for ONNX Runtime, OpenVINO Model Server, Triton or TensorRT.

    Writes OUTPUT (input `image`: batch × channels × window, float32; output `logits`: batch × classes ×
    window) and OUTPUT with .json: the plan (orientation, spacing, intensity window, body crop) that
    preprocesses a scan before the network, the label table and the sliding-window settings.
    """
    from medseg.batch.inputs import resolve_checkpoints
    from medseg.inference.onnx_export import export_model
    from medseg.io import InputError

    try:
        roi = None
        if window is not None:
            try:
                roi = [int(n) for n in window.split(",")]
            except ValueError:
                roi = []
            if len(roi) != 3 or min(roi) < 1:
                raise InputError(
                    f"--window {window!r} is not valid; expected three whole numbers, e.g. 96,96,64"
                )
        paths = resolve_checkpoints(checkpoint)
        if len(paths) != 1:
            raise InputError(f"{checkpoint}: {len(paths)} checkpoints found; export one file at a time")
        done = export_model(paths[0], output, roi)
    except InputError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    window_text = "×".join(map(str, done["window"]))
    typer.echo(
        f"written: {done['onnx']} (window {window_text}, {len(done['labels'])} classes), {done['json']}"
    )
