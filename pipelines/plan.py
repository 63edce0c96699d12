"""``medseg plan``: parse the options, call :func:`medseg.planning.run_plan.plan_for_dataset`, print, write."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from medseg.io.plan import Plan


def plan_command(
    dataset: Annotated[
        Path,
        typer.Argument(
            metavar="DATASET", help="Dataset folder with dataset.json (MSD or nnU-Net v2 layout)."
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="YAML config; without one, patch size and batch size are planned (auto)."
        ),
    ] = None,
    gpu_memory_gb: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory-gb",
            help="Memory budget in GB (default: the CUDA device's memory, else 8 GB).",
        ),
    ] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the plan (JSON).")] = Path(
        "plan.json"
    ),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override, e.g. --set model.name=unet.")
    ] = None,
) -> None:
    """Plan spacing, intensity, patch size, pooling and batch size from the dataset's fingerprint (nnU-Net
    v2's rules); print the plan and write it for `medseg train CONFIG --plan plan.json`."""
    from medseg.config import ConfigError, load_config
    from medseg.io import InputError

    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        typer.echo(f"error: --gpu-memory-gb must be > 0, got {gpu_memory_gb:g}", err=True)
        raise typer.Exit(2)
    overrides = [*([] if config else ["augment.patch_size=auto", "train.batch_size=auto"]), *(set_ or [])]
    try:
        cfg = load_config(config, [*overrides, f"data.root={dataset}"])
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from medseg.data.check import DatasetError
    from medseg.io import atomic_write_text
    from medseg.planning.plan_file import dump_plan
    from medseg.planning.run_plan import plan_for_dataset

    try:
        plan = plan_for_dataset(cfg, dataset, gpu_memory_gb)
        atomic_write_text(output, dump_plan(plan))
    except DatasetError as exc:
        for problem in exc.problems:
            typer.echo(f"error: {problem.line()}", err=True)
        typer.echo(f"no plan: {len(exc.problems)} problem(s) (medseg check-dataset {dataset})", err=True)
        raise typer.Exit(2) from None
    except (ConfigError, InputError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"plan for {dataset}")
    typer.echo(_indent(plan))
    typer.echo(f"wrote {output} (edit it if you like, then: medseg train CONFIG --plan {output})")


def _indent(plan: Plan) -> str:
    from medseg.planning.plan_file import format_plan

    return "\n".join(f"  {line}" for line in format_plan(plan).splitlines())
