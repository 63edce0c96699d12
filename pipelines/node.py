"""``medseg node serve | status | retry``: the DICOM node (:mod:`medseg.node`).

``serve`` receives CT series by C-STORE, segments each stable series with the batch core and sends the DICOM
outputs on; ``status`` reads the job store (also while the node runs); ``retry`` re-queues failed jobs and
resends send-failed ones. Exit codes of ``serve``: 0 (``--once`` finished), 2 it could not start (bad
option, model, port or work folder), 130 / 143 stopped by SIGINT / SIGTERM after the work in hand.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated

import typer

from medseg.config.segment import SegmentOptions

node_app = typer.Typer(
    name="node",
    help="A DICOM node: receive CT by C-STORE, segment stable series, send DICOM SEG/RTSTRUCT to a PACS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

WORKDIR = Annotated[
    Path, typer.Option("--workdir", help="Work folder: spool, job database, outputs/, logs/node.jsonl.")
]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


@node_app.command("serve")
def serve_command(
    model: Annotated[
        list[Path],
        typer.Option(
            "-m",
            "--model",
            help="Checkpoint, folder of folds or nnU-Net v2 model folder, as for medseg segment.",
        ),
    ],
    workdir: WORKDIR,
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
    ae_title: Annotated[str, typer.Option(help="Our AE title (called AE of the PACS's C-STORE).")] = "MEDSEG",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: all interfaces).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="DICOM port (0: any free port, logged).")] = 11112,
    allow_ae: Annotated[
        list[str] | None, typer.Option("--allow-ae", help="Calling AE title allowed (repeat); default any.")
    ] = None,
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="Peer IP address allowed (repeat); default any.")
    ] = None,
    send: Annotated[
        list[str] | None,
        typer.Option(
            "--send", help="Destination (repeat): dimse://AE@HOST:PORT or http(s)://HOST/dicom-web."
        ),
    ] = None,
    output_type: Annotated[
        str,
        typer.Option(
            "--output-type", help="Comma-separated: dicom-seg, dicom-seg-labelmap, dicom-rtstruct, slicer."
        ),
    ] = "dicom-seg",
    stable_seconds: Annotated[
        float, typer.Option(help="A series is complete after this long without a new instance.")
    ] = 10.0,
    workers: Annotated[int, typer.Option(help="Worker threads (segmenting and sending).")] = 1,
    max_associations: Annotated[int, typer.Option(help="Concurrent associations.")] = 10,
    quota_gb: Annotated[
        float | None, typer.Option(help="Refuse instances (A700) once the spool holds this much.")
    ] = None,
    max_series_instances: Annotated[
        int | None, typer.Option(help="Refuse a series (A700) beyond this many instances.")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Receive until idle, process, send, exit.")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM) for the DICOM port.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="CA (PEM) that peers' certificates must chain to.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = SegmentOptions.device,
    credentials: Annotated[
        Path | None, typer.Option(help="Credentials file for DICOMweb destinations (else the environment).")
    ] = None,
    send_attempts: Annotated[int, typer.Option(help="Attempts per destination before send-failed.")] = 6,
    send_backoff: Annotated[
        float, typer.Option(help="Seconds before the first retry; doubled after each failed attempt.")
    ] = 30.0,
) -> None:
    """Receive CT series (Storage SCP), segment each stable series, send the DICOM outputs on."""
    from medseg.batch.inputs import resolve_checkpoints
    from medseg.config import ConfigError
    from medseg.config.segment import OutputSpec
    from medseg.io import InputError
    from medseg.network.credentials import load_credentials
    from medseg.network.destinations import check_ae_title, parse_destination
    from medseg.nnunet.folder import is_model_folder, read_model_folder
    from medseg.node.scp import ScpConfig, tls_context
    from medseg.node.service import NodeConfig, serve
    from medseg.node.worker import WorkerConfig

    try:
        if workers < 1 or max_associations < 1 or stable_seconds < 0 or send_attempts < 1 or send_backoff < 0:
            raise InputError(
                "--workers, --max-associations and --send-attempts must be >= 1, "
                "--stable-seconds and --send-backoff >= 0"
            )
        if (tls_cert is None) != (tls_key is None) or (tls_ca is not None and tls_cert is None):
            raise InputError("--tls-cert and --tls-key go together (and --tls-ca needs them)")
        for address in allow_host or []:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise InputError(
                    f"--allow-host {address!r} is not an IP address (peers are matched by address)"
                ) from None
        ssl_context = None if tls_cert is None else tls_context(tls_cert, tls_key, tls_ca)
        scp = ScpConfig(
            ae_title=check_ae_title(ae_title, "--ae-title"),
            host=host,
            port=port,
            allow_ae=tuple(check_ae_title(a, "--allow-ae") for a in allow_ae or []),
            allow_host=tuple(allow_host or []),
            max_associations=max_associations,
            quota_bytes=None if quota_gb is None else int(quota_gb * 1e9),
            max_series_instances=max_series_instances,
            ssl_context=ssl_context,
        )
        fold_list = tuple(f for item in folds or () for f in item.replace(",", " ").split()) or None
        if is_model_folder(model[0]):  # nnU-Net v2: checked now, then run by the batch core as it is
            read_model_folder(model[0], fold_list, checkpoint)
            checkpoints = tuple(model)
        elif fold_list or checkpoint:
            raise InputError(
                f"--folds and --checkpoint are for an nnU-Net v2 model folder; {model[0]} is not one"
            )
        else:
            checkpoints = tuple(resolve_checkpoints(model))
        worker = WorkerConfig(
            checkpoints=checkpoints,
            options=SegmentOptions(device=device, prefetch=0, folds=fold_list, checkpoint_name=checkpoint),
            outputs=OutputSpec(types=f"nifti,{output_type}"),
            destinations=tuple(str(parse_destination(d)) for d in send or []),
            send_attempts=send_attempts,
            send_backoff_s=send_backoff,
            credentials=load_credentials(credentials),
            calling_ae=scp.ae_title,
        )
        config = NodeConfig(workdir, scp, worker, stable_seconds=stable_seconds, workers=workers, once=once)
        signum = serve(config)
    except (InputError, ConfigError, OSError) as exc:
        _fail(str(exc))
    if signum:
        raise typer.Exit(128 + signum)


@node_app.command("status")
def status_command(
    workdir: WORKDIR,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of text.")] = False,
) -> None:
    """Jobs by state, queue depth, spool use, per-destination deliveries, the latest problems."""
    from medseg.io import InputError
    from medseg.node.store import Store
    from medseg.node.workdir import WorkDir

    try:
        with Store(WorkDir(workdir).existing().db) as store:
            status = store.status()
    except InputError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    jobs = status["jobs"]
    typer.echo(f"work folder: {workdir}")
    typer.echo("jobs: " + ", ".join(f"{state} {n}" for state, n in jobs.items()))
    typer.echo(f"queue depth: {status['queue_depth']} (receiving + queued)")
    typer.echo(f"spool: {status['instances']} instances, {status['spool_bytes'] / 1e6:.1f} MB")
    for dest, entry in status["destinations"].items():
        line = f"  {dest}: {entry['done']} done, {entry['pending'] + entry['sending']} pending, {entry['failed']} failed"
        typer.echo(line + (f"; last error: {entry['last_error']}" if "last_error" in entry else ""))
    for problem in status["problems"]:
        where = f"job {problem['job']} (series {problem['series']} v{problem['version']})"
        typer.echo(f"  {where} {problem['state']}: {problem['message']}")


@node_app.command("retry")
def retry_command(
    workdir: WORKDIR,
    jobs: Annotated[
        list[int] | None, typer.Argument(help="Job ids (default: every failed and send-failed job).")
    ] = None,
) -> None:
    """Queue failed jobs again and resend send-failed ones (their attempts start over)."""
    from medseg.io import InputError
    from medseg.node.store import Store
    from medseg.node.workdir import WorkDir

    try:
        with Store(WorkDir(workdir).existing().db) as store:
            changed = store.retry(jobs or None)
    except InputError as exc:
        _fail(str(exc))
    missing = sorted(set(jobs or []) - set(changed))
    typer.echo(f"{len(changed)} job(s) queued again: {', '.join(map(str, changed)) or 'none'}")
    if missing:
        _fail(
            f"job(s) {', '.join(map(str, missing))}: not failed or send-failed (see medseg node status)",
            code=1,
        )
