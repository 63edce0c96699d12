"""``medseg models FOLDER``: list what an nnU-Net v2 model folder holds and check it before a batch starts.

Prints one ``key: value`` line each (task, trainer, plans, configuration, channels, labels, folds,
checkpoints, spacing, patch, network, normalisation, reader), then loads every requested fold's checkpoint
safely and builds the network from the plans with its weights (:mod:`medseg.nnunet`), and ends with ``ok``.
Exit 0 when the folder can be run; 2 with one ``error: <file>: <cause>`` line on stderr when it cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def models_command(
    folder: Annotated[
        Path,
        typer.Argument(metavar="FOLDER", help="nnU-Net v2 model folder (plans.json, dataset.json, fold_*/)."),
    ],
    folds: Annotated[
        list[str] | None, typer.Option(help="The folds to check (0 1 … or all; default: every fold present).")
    ] = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="The file in each fold_*/ (default checkpoint_final.pth).")
    ] = None,
) -> None:
    """List an nnU-Net v2 model folder (task, labels, folds, configuration, spacing, patch, trainer) and check
    that each fold's checkpoint loads safely into the network its plans describe."""
    from medseg.io import InputError
    from medseg.nnunet.folder import read_model_folder
    from medseg.nnunet.network import build_network, load_weights
    from medseg.nnunet.weights import load_fold

    try:
        model = read_model_folder(
            folder, [f for item in folds or () for f in item.replace(",", " ").split()], checkpoint
        )
        for line in model.describe():
            typer.echo(line)
        where = str(model.path / "plans.json")
        for path in model.checkpoints:
            fold = load_fold(path)
            if fold["configuration"] not in (None, model.configuration_name):
                raise InputError(
                    f"{path}: trained for configuration {fold['configuration']!r}, not {model.configuration_name!r}"
                )
            net = build_network(model.configuration["architecture"], model.in_channels, model.outputs, where)
            load_weights(net, fold["weights"], str(path))
            axes = fold["mirror_axes"]
            typer.echo(
                f"{path.relative_to(model.path)}: ok ({fold['trainer'] or model.trainer}, mirror axes {list(axes) if axes else 'none'})"
            )
    except InputError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(2) from None
    typer.echo("ok")
