"""The ``medseg`` command line (Typer). Heavy imports happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from pipelines.evaluate import evaluate_command

app = typer.Typer(
    name="medseg",
    help="3D attention segmentation for CT: generate phantoms, train, segment, evaluate, demo.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("evaluate", help="Score predicted label maps against references (Dice, IoU, HD95, ASSD, NSD).")(
    evaluate_command
)


def _quiet() -> None:
    """Silence third-party import chatter (MONAI's optional codecs) so output stays readable."""
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import logging

    logging.getLogger("monai").setLevel(logging.ERROR)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def phantoms(
    out: Annotated[Path, typer.Argument(help="Dataset folder to create (MSD layout).")],
    cases: Annotated[int, typer.Option(help="Training cases (imagesTr/labelsTr).")] = 10,
    test: Annotated[int, typer.Option(help="Held-out cases (imagesTs/labelsTs).")] = 2,
    shape: Annotated[
        tuple[int, int, int], typer.Option(help="Voxel grid; spacing = field of view / shape.")
    ] = (128, 128, 48),
    seed: Annotated[int, typer.Option(help="Dataset seed (cases are deterministic per seed).")] = 0,
) -> None:
    """Generate synthetic abdominal CT phantoms with labels in the Medical Segmentation Decathlon layout."""
    from medseg.data.phantoms import write_msd_dataset

    path = write_msd_dataset(out, cases, test, shape=shape, seed=seed)
    typer.echo(f"wrote {cases} training + {test} test phantoms: {path}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override, e.g. --set train.epochs=5 (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <train.output>/last.pt.")] = False,
) -> None:
    """Train a network from a YAML config; writes checkpoints, metrics.csv and curves.png to train.output."""
    _quiet()
    from medseg.config import ConfigError, load_config
    from medseg.engine import train as run_train
    from medseg.io import InputError
    from medseg.nets.registry import RegistryError

    try:
        cfg = load_config(config, set_ or [])
        out = run_train(cfg, resume=resume, log=typer.echo)
    except (ConfigError, InputError, RegistryError) as exc:
        _fail(str(exc))
    typer.echo(f"run folder: {out}  (best.pt, last.pt, metrics.csv, curves.png, config.yaml)")


@app.command()
def segment(
    input: Annotated[Path, typer.Option("-i", "--input", help="NIfTI file or folder of NIfTI files.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output file (.nii.gz) for one input, or folder.")
    ],
    model: Annotated[Path, typer.Option("-m", "--model", help="Checkpoint (best.pt) from medseg train.")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    overlap: Annotated[
        float | None, typer.Option(help="Sliding-window overlap (default: from checkpoint).")
    ] = None,
    sw_batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass.")] = None,
) -> None:
    """Segment CT scans; each mask has its scan's exact shape and affine, with a label-name JSON sidecar."""
    _quiet()
    from medseg.io import InputError
    from pipelines.segment import run_segment

    try:
        report = run_segment(input, output, model, device, overlap, sw_batch_size, log=typer.echo)
    except (InputError, RuntimeError) as exc:
        _fail(str(exc))
    typer.echo(f"{len(report.written)} written, {len(report.failed)} failed")
    if report.failed:
        for reason in report.failed.values():
            typer.echo(f"  failed: {reason}", err=True)
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for data, run, predictions and metrics.")] = Path(
        "demo_out"
    ),
    cases: Annotated[int, typer.Option(help="Training phantoms.")] = 0,
    epochs: Annotated[int, typer.Option(help="Training epochs (0 = the demo's default).")] = 0,
) -> None:
    """Phantoms → train the Attention U-Net → segment held-out phantoms → evaluate → Dice table."""
    _quiet()
    from pipelines.demo import run_demo

    result = run_demo(out, cases=cases or None, epochs=epochs or None, log=typer.echo)
    if result["failed"]:
        raise typer.Exit(1)


@app.command()
def ablate(
    out: Annotated[Path, typer.Option(help="Folder for data, runs and the ablation table.")] = Path(
        "ablation_out"
    ),
    variants: Annotated[
        str | None, typer.Option(help="Comma-separated subset of variants (default: all).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra config override for every variant.")
    ] = None,
    costs_only: Annotated[
        bool, typer.Option(help="Only re-measure FLOPs/time/memory of an existing table.")
    ] = False,
) -> None:
    """Train every attention variant on the same phantoms with the same budget; write ablation.md/.csv."""
    _quiet()
    from pipelines.ablation import remeasure_costs, run_ablation

    if costs_only:
        remeasure_costs(out, log=typer.echo)
        typer.echo(f"table: {out / 'ablation.md'}")
        return
    chosen = [v.strip() for v in variants.split(",")] if variants else None
    try:
        run_ablation(out, chosen, extra_overrides=set_ or [], log=typer.echo)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"table: {out / 'ablation.md'}")


def main() -> None:  # pragma: no cover - console entry point alias
    app(sys.argv[1:])
