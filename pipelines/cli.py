"""The ``medseg`` command line (Typer). Heavy imports happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated

import typer

from .ablation import ablate_command
from .check_dataset import check_dataset_command
from .cv_summary import cv_summary_command
from .demo import demo_command
from .evaluate import evaluate_command
from .export import export_command
from .export_model import export_model_command
from .models import models_command
from .node import node_app
from .plan import plan_command
from .quantize import quantize_command
from .review import review_command
from .segment import segment_command

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
app.command("segment")(segment_command)
app.command("demo")(demo_command)
app.command("ablate")(ablate_command)
app.command("check-dataset")(check_dataset_command)
app.command("review")(review_command)
app.command("export")(export_command)
app.command("export-model")(export_model_command)
app.command("quantize")(quantize_command)
app.command("plan")(plan_command)
app.command("cv-summary")(cv_summary_command)
app.command("models")(models_command)
app.add_typer(
    node_app,
    name="node",
    help="A DICOM node: receive CT by C-STORE, segment stable series, send DICOM SEG/RTSTRUCT to a PACS.",
)


def _quiet() -> None:
    """Silence third-party import chatter (MONAI's optional codecs) so output stays readable."""
    warnings.filterwarnings("ignore", category=UserWarning, module="monai")
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import logging

    logging.getLogger("monai").setLevel(logging.ERROR)


@app.callback()
def _before_every_command() -> None:
    """3D attention segmentation for CT: generate phantoms, train, segment, evaluate, demo."""
    _quiet()


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
    layout: Annotated[str, typer.Option(help="msd | nnunet (nnU-Net v2 raw layout).")] = "msd",
    channels: Annotated[int, typer.Option(help="nnunet layout: 1, or 2 (+ a native phase, _0001).")] = 1,
    kind: Annotated[
        str,
        typer.Option(
            help="standard | hard: hard puts a pancreas nearly isodense to duodenum and bowel in stranded fat, "
            "with partial-volume blur and low-dose noise (σ ≈ 30 HU), the regime of Oktay et al. 2018."
        ),
    ] = "standard",
) -> None:
    """Generate synthetic abdominal CT phantoms with labels (Medical Segmentation Decathlon or nnU-Net v2
    layout). Both kinds share the label table and, for one seed, body, organs and affine."""
    from medseg.data.phantoms import check_kind, write_msd_dataset, write_nnunet_dataset

    if layout not in ("msd", "nnunet") or channels not in (1, 2) or (layout == "msd" and channels != 1):
        _fail(f"--layout {layout} --channels {channels}: valid are msd with 1 channel, nnunet with 1 or 2")
    try:
        check_kind(kind)
    except ValueError as exc:
        _fail(f"--kind: {exc}")
    if layout == "nnunet":
        path = write_nnunet_dataset(out, cases, test, shape=shape, seed=seed, channels=channels, kind=kind)
    else:
        path = write_msd_dataset(out, cases, test, shape=shape, seed=seed, kind=kind)
    typer.echo(f"wrote {cases} training + {test} test phantoms ({kind}): {path}")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config (see configs/).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override, e.g. --set train.epochs=5 (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from <train.output>/last.pt.")] = False,
    plan: Annotated[
        Path | None, typer.Option("--plan", help="Use this plan (medseg plan -o plan.json, maybe edited).")
    ] = None,
    fold: Annotated[
        str | None,
        typer.Option(help="Cross-validation fold 0..data.folds-1 (into train.output/fold_K), or all."),
    ] = None,
    nproc: Annotated[
        int | None, typer.Option(help="Data-parallel processes on this machine (one per GPU, or CPU).")
    ] = None,
) -> None:
    """Train a network from a YAML config; writes checkpoints, metrics.csv and curves.png to train.output."""
    from medseg.config import ConfigError, load_config
    from medseg.data.folds import parse_fold

    try:
        cfg = load_config(config, set_ or [])  # checked before torch or any data is loaded
        fold_id = None if fold is None else parse_fold(fold, cfg.data.folds)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    from medseg.data.check import DatasetError
    from medseg.engine import train as run_train
    from medseg.engine.distributed import PeerError
    from medseg.engine.launch import TrainingFailed, train_processes
    from medseg.io import InputError

    try:
        if nproc is None:  # one process, or one of torchrun's
            out = run_train(cfg, resume=resume, log=typer.echo, fold=fold_id, plan_path=plan)
        else:
            out = train_processes(cfg, nproc, resume=resume, log=typer.echo, fold=fold_id, plan_path=plan)
    except PeerError:  # under torchrun: rank 0 reported the error
        raise typer.Exit(2) from None
    except TrainingFailed as exc:
        typer.echo(exc.callstack, err=True)
        _fail(str(exc), code=1)
    except DatasetError as exc:  # every problem of the header check, one line each
        for problem in exc.problems:
            typer.echo(f"error: {problem.line()}", err=True)
        root, count = cfg.data.root, len(exc.problems)
        typer.echo(f"training not started: {count} problem(s) (medseg check-dataset {root})", err=True)
        raise typer.Exit(2) from None
    except (ConfigError, InputError) as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 speaks
        typer.echo(f"run folder: {out}  (best.pt, last.pt, metrics.csv, curves.png, config.yaml)")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A ``BaseException`` (like ``KeyboardInterrupt``, but not caught by Click,
    which would print "Aborted!" and exit 1): every ``finally`` and context manager on the way up runs —
    the batch lanes finish the case being written, atomic writes drop their temporary file, an archive's
    extraction folder is removed — and :func:`main` exits ``128 + signal``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame) -> None:
    """The first SIGINT/SIGTERM raises :class:`Interrupted`; later ones are ignored, so that a second
    Ctrl-C or ``kill`` cannot cut the clean-up short (SIGKILL still can)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def repeat_folds(args: list[str]) -> list[str]:
    """``--folds 0 1 all`` (nnU-Net's spelling) → ``--folds 0 --folds 1 --folds all``: a Typer option takes one
    value per flag."""
    out: list[str] = []
    folding = False
    for arg in args:
        if folding and (arg.isdigit() or arg == "all"):
            out += ["--folds", arg]
            continue
        folding = arg == "--folds"
        if not folding:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    """The ``medseg`` console command: run ``app``, then leave without Python's interpreter teardown.

    Python's teardown of the thousands of modules torch, MONAI and SciPy load is time the user waits after
    the work is done (measured in ``docs/speed.md``, section ``pipelines.cli``). Every file medseg writes is
    closed and renamed into place before a command returns, so once the command has finished, the exit
    handlers have run and the standard streams are flushed, ``os._exit`` ends the process with the command's
    exit code. When a thread other than the main one is still alive (a library's
    worker that shutdown would join), the normal exit runs instead.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
    try:
        app(repeat_folds(sys.argv[1:] if argv is None else argv))
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        print(
            f"interrupted ({name}): stopped after the current write; nothing is half-written and temporary "
            "files are removed. Run the same command again to continue (a batch keeps its finished cases; "
            "train resumes from last.pt with --resume).",
            file=sys.stderr,
        )
        code = 128 + exc.signum
    if threading.active_count() > 1:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
