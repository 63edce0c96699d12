"""``medseg segment``: parse the options into :class:`~medseg.config.segment.SegmentOptions` (how) and
:class:`~medseg.config.segment.OutputSpec` (what), call :func:`medseg.batch.run.segment_inputs`, print.

Progress lines go to stdout (and a progress bar to stderr when it is a terminal); problems to stderr, one
line each: ``warning: <file>: <text>`` (also for DICOM series skipped as not CT) and, for every case that
failed, ``error: <file>: <cause>``. Exit 0 all done, 1 some cases failed (the others written; a case whose
mask was written but whose DICOM SEG could not be made counts as failed; or a ``--send`` delivery failed:
``error: <case>: send to <dest> failed: <cause>``), 2 the run could not start
(missing input, unusable checkpoint or option, an output folder that cannot be written, unsafe archive, a
DICOMweb server that cannot be used or sent something refused),
130 / 143 stopped by SIGINT / SIGTERM (after the case being written; temporary files removed).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from medseg.config.segment import OutputSpec, SegmentOptions
from medseg.network.options import NetworkOptions


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def segment_command(
    input: Annotated[
        str,
        typer.Option(
            "-i",
            "--input",
            help="NIfTI file, DICOM series folder, folder of NIfTI files and/or DICOM series (any depth), "
            "a .zip of these, or a DICOMweb server dicomweb+http(s)://host/path (with --study or --study-date).",
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output folder (or a .nii.gz for one NIfTI input).")
    ],
    model: Annotated[
        list[Path],
        typer.Option(
            "-m",
            "--model",
            help="Checkpoint (best.pt), or a folder of folds (fold_*/best.pt) or of *.pt; repeat for an "
            "ensemble. Or an nnU-Net v2 model folder (plans.json, dataset.json, fold_*/checkpoint_final.pth).",
        ),
    ],
    folds: Annotated[
        list[str] | None,
        typer.Option(
            help="nnU-Net v2 model folder: the folds to average (0 1 … or all; default: every fold)."
        ),
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            help="nnU-Net v2 model folder: the file in each fold_*/ (default checkpoint_final.pth)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = SegmentOptions.device,
    overlap: Annotated[
        float | None, typer.Option(help="Sliding-window overlap (default: from checkpoint).")
    ] = SegmentOptions.overlap,
    sw_batch_size: Annotated[
        int | None, typer.Option(help="Windows per forward pass.")
    ] = SegmentOptions.sw_batch_size,
    tta: Annotated[
        bool, typer.Option("--tta", help="Mirroring test-time augmentation.")
    ] = SegmentOptions.tta,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (int8 where `medseg quantize` stored a checked int8 graph, else bf16 where the CPU or GPU "
            "computes it natively, else fp32 on CPU / fp16 on GPU) | fp32 (exact) | bf16 | fp16 (CUDA) | int8 "
            "(OpenVINO, after `medseg quantize`).",
        ),
    ] = SegmentOptions.precision,
    backend: Annotated[
        str,
        typer.Option(
            help="Network runtime: auto (OpenVINO on the CPU when installed, except --precision fp32) | torch | "
            "openvino."
        ),
    ] = SegmentOptions.backend,
    postprocess: Annotated[
        str, typer.Option(help="auto (the checkpoint's per-label component rules) | none.")
    ] = SegmentOptions.postprocess,
    statistics: Annotated[
        bool,
        typer.Option("--statistics", help="Organ statistics: <case>_stats.json and statistics.csv."),
    ] = OutputSpec.statistics,
    preview: Annotated[
        bool,
        typer.Option(
            "--preview",
            help="Per case <case>_preview.png (3 planes, radiological) and a thumbnail; the review page index.html.",
        ),
    ] = OutputSpec.preview,
    attention: Annotated[
        bool,
        typer.Option(
            "--attention",
            help="Attention U-Net gate coefficients per level on the scan's grid: <case>_alpha_levelN.nii.gz + .png.",
        ),
    ] = OutputSpec.attention,
    output_type: Annotated[
        str,
        typer.Option(
            "--output-type",
            help="Comma-separated: nifti (always), dicom-seg | dicom-seg-labelmap, dicom-rtstruct (DICOM inputs), slicer (.seg.nrrd).",
        ),
    ] = ",".join(OutputSpec.types),
    split: Annotated[
        bool, typer.Option("--split", help="One 0/1 mask per organ in <case>_organs/.")
    ] = OutputSpec.split,
    uncertainty: Annotated[
        bool,
        typer.Option(
            "--uncertainty",
            help="<case>_entropy.nii.gz: normalised softmax entropy (0 certain .. 1 uniform) on the scan's grid.",
        ),
    ] = OutputSpec.uncertainty,
    num_parts: Annotated[
        int | None, typer.Option(help="Split the cases into N parts (with --part-id).")
    ] = None,
    part_id: Annotated[
        int | None, typer.Option(help="Part to run, 0..N-1 (default: from torchrun or a Slurm array).")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Redo cases whose mask and sidecar are complete from an earlier run."
        ),
    ] = OutputSpec.overwrite,
    prefetch: Annotated[
        int,
        typer.Option(
            help="1: read and preprocess the next case and write the last one while the network runs; "
            "0: one case at a time.",
        ),
    ] = SegmentOptions.prefetch,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="Per case a line of seconds: read, preprocess, network, restore, postprocess, write.",
        ),
    ] = SegmentOptions.profile,
    archive_limits: Annotated[
        str | None,
        typer.Option(
            "--archive-limits",
            help="Caps for a .zip input, e.g. members=200000,total-gb=128,ratio=500 (defaults: 100000 members, "
            "64 GiB of NIfTI/DICOM members, compression ratio 200 for members over 16 MiB).",
        ),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="DICOMweb input: the Study Instance UID whose CT series are segmented.")
    ] = None,
    modality: Annotated[
        str, typer.Option(help="DICOMweb input: the series' modality.")
    ] = NetworkOptions.modality,
    study_date: Annotated[
        str | None,
        typer.Option(
            help="DICOMweb input without --study: every series of the studies of YYYYMMDD[-YYYYMMDD]."
        ),
    ] = None,
    dicomweb_limits: Annotated[
        str | None,
        typer.Option(
            help="Caps on a DICOMweb input, e.g. instances=5000,series-gb=2,instance-gb=1 (these are the defaults)."
        ),
    ] = None,
    send: Annotated[
        list[str] | None,
        typer.Option(
            help="After the batch, send each case's DICOM outputs (_seg.dcm, _rtstruct.dcm) to dimse://AE@HOST:PORT "
            "or a DICOMweb root http(s)://host/path; repeatable. Recorded in deliveries.jsonl.",
        ),
    ] = None,
    credentials: Annotated[
        Path | None,
        typer.Option(
            help='JSON file (chmod 600) with {"token": ...} or {"user": ..., "password": ...} for DICOMweb; '
            "default: MEDSEG_DICOMWEB_TOKEN or MEDSEG_DICOMWEB_USER/MEDSEG_DICOMWEB_PASSWORD.",
        ),
    ] = None,
) -> None:
    """Segment CT scans; each mask has its scan's exact shape and affine, with a label-name JSON sidecar.

    Re-running into the same output folder skips the cases already done with the same input, checkpoints
    and options (so a killed batch continues); --overwrite redoes them. Under torchrun or a Slurm job array
    each process does its share of the cases. A DICOMweb input is fetched into a hidden folder of the
    output folder, removed afterwards; --send delivers the DICOM outputs with retries (docs/network.md).
    """
    from medseg.batch.run import segment_inputs
    from medseg.batch.sharding import resolve_part
    from medseg.config import ConfigError
    from medseg.io import InputError
    from medseg.io.archive import ArchiveLimits
    from medseg.network.plan import NetworkPlan

    try:
        part = resolve_part(num_parts, part_id)
        how = SegmentOptions(
            device=device,
            overlap=overlap,
            sw_batch_size=sw_batch_size,
            tta=tta,
            precision=precision,
            backend=backend,
            postprocess=postprocess,
            prefetch=prefetch,
            profile=profile,
            archive_limits=ArchiveLimits.parse(archive_limits),
            folds=tuple(f for item in folds or () for f in item.replace(",", " ").split()) or None,
            checkpoint_name=checkpoint,
        )
        what = OutputSpec(
            types=output_type,
            split=split,
            statistics=statistics,
            preview=preview,
            attention=attention,
            uncertainty=uncertainty,
            overwrite=overwrite,
        )
        network = NetworkPlan.make(
            NetworkOptions(
                input, study, modality, study_date, dicomweb_limits, tuple(send or ()), credentials
            ),
            what.types,
        )
        with network.input_folder(input, output, log=typer.echo) as source:
            report = segment_inputs(
                source, output, model, how, what, part=part, log=typer.echo, progress=sys.stderr.isatty()
            )
    except (InputError, ConfigError, RuntimeError, ValueError) as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(2) from None
    for src, texts in report.warnings.items():
        for text in texts:
            text = _one_line(text)
            named = text.startswith((f"{src}:", f"{src} (series "))
            typer.echo(f"warning: {text if named else f'{src}: {text}'}", err=True)
    for reason in report.failed.values():
        typer.echo(f"error: {_one_line(reason)}", err=True)
    if report.statistics_csv is not None:
        typer.echo(f"statistics: {report.statistics_csv}")
    if report.review_page is not None:
        typer.echo(f"review page: {report.review_page}")
    for src, holder in report.claimed.items():
        typer.echo(f"warning: {src}: left to {holder}, which claimed it", err=True)
    typer.echo(
        f"{len(report.written)} written, {len(report.failed)} failed, {len(report.skipped)} skipped, "
        f"{len(report.skipped_modality)} skipped-modality"
        + (f", {len(report.claimed)} claimed by another run" if report.claimed else "")
        + (
            f" ({len(report.failed_exports)} of the failed: mask written, export failed)"
            if report.failed_exports
            else ""
        )
    )
    sent = network.deliver([*report.written, *report.skipped], output, log=typer.echo)
    for case in sent.nothing:
        typer.echo(f"warning: {case}: no DICOM output to send", err=True)
    for line in (line for lines in sent.failed.values() for line in lines):
        typer.echo(f"error: {_one_line(line)}", err=True)
    if report.failed or sent.failed:
        raise typer.Exit(1)
