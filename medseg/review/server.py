"""``medseg review OUTDIR --serve``: a small local web application over one output folder.

Standard library only (:class:`http.server.ThreadingHTTPServer`, one thread per request, HTTP/1.1 with
``Content-Length`` on every answer). It binds ``127.0.0.1`` unless told otherwise.

==========================================  ===================================================================
``GET /``                                   the case list: flags, verdicts, a filter by verdict
``GET /case/<case>``                        the viewer (NiiVue) and the verdict / correction forms
``GET /api/case/<case>``                    the viewer's data (JSON): labels and colours, overlays, flags
                                            with locations, the current verdict and its version, the history
``GET /display/<case>/<copy>.nii``          a display copy (:mod:`medseg.review.display`), made on first use
``GET /files/<name>``                       a file directly inside OUTDIR (masks, maps, review.csv, …)
``GET /static/<name>``                      the viewer's script and style and the vendored NiiVue bundle
``POST /api/case/<case>/verdict``           JSON ``{verdict, comment, reviewer, version}``
``POST /api/case/<case>/correction``        the drawing as NIfTI-1 bytes; ``?version=&reviewer=&comment=``
==========================================  ===================================================================

**Safety.** A case is named, never located: ``<case>`` must be one of the folder's cases. ``/files/`` serves
only regular files directly inside OUTDIR whose real path (symbolic links resolved) is inside OUTDIR, never
a hidden file or the database, and lists no folder. Every answer carries ``X-Content-Type-Options: nosniff``
and a Content-Security-Policy that allows only this server's own scripts (no inline script), so text from a
case (names from DICOM tags, comments) can never run; the pages also HTML-escape everything they render. A
``Host`` header other than the address served is refused (DNS rebinding). Every POST must carry the
per-session token (``X-Review-Token``, a random value made at start and written into the pages only — a page
of another origin cannot read it) and, when the browser sends them, an ``Origin`` equal to this server's and
a ``Sec-Fetch-Site`` of ``same-origin``: cross-origin writes are refused. ``--read-only`` refuses every
POST. Inputs (scans, masks, sidecars) are only read; the server writes the database, its exports, the
display cache and ``<case>_corrected.nii.gz``.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import nibabel as nib

from medseg.io import InputError
from medseg.review.catalog import Catalog, corrected_name
from medseg.review.corrections import max_correction_bytes, save_correction
from medseg.review.display import KINDS, DisplayCache
from medseg.review.page import case_html, index_html
from medseg.review.store import DB_NAME, ReviewStore, StaleVersion, check_entry, export_review

STATIC = Path(__file__).resolve().parent / "static"
#: The files under ``/static/`` (nothing else in the package folder is served).
STATIC_FILES = {
    "viewer.js": "text/javascript",
    "viewer.css": "text/css",
    "niivue.umd.js": "text/javascript",
    "NIIVUE_LICENSE.txt": "text/plain",
}
MAX_JSON_BYTES = 64 * 1024
CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self' data: blob:; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


class ReviewApp:
    """What the request handlers share: the folder, its cases, the verdict store, the display cache."""

    def __init__(self, outdir: str | os.PathLike, read_only: bool = False) -> None:
        self.outdir = Path(outdir)
        if not self.outdir.is_dir():
            raise InputError(f"{outdir}: output folder not found")
        self.real = self.outdir.resolve()
        self.read_only = read_only
        self.token = secrets.token_urlsafe(32)
        self.catalog = Catalog(self.outdir)
        if not self.catalog.names:
            raise InputError(f"{outdir}: no segmented case found (no <case>.json sidecar)")
        self.store = ReviewStore(self.outdir) if not read_only or (self.outdir / DB_NAME).exists() else None
        self.cache = DisplayCache(self.outdir)
        self.hosts: set[str] = set()
        self.origin = ""
        self._correction_lock = threading.Lock()

    def bind(self, host: str, port: int) -> None:
        """Record the address served: the Host headers accepted and the Origin of its pages."""
        names = (
            {host, "localhost", "127.0.0.1", "[::1]"} if host in ("127.0.0.1", "localhost", "::1") else {host}
        )
        self.hosts = {f"{name}:{port}" for name in names}
        self.origin = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def states(self) -> dict:
        return self.store.states() if self.store else {}

    def case_data(self, name: str) -> dict:
        side = self.catalog.sidecar(name)
        state = self.store.state(name) if self.store else None
        info = side.get("image_info") if isinstance(side.get("image_info"), dict) else {}
        return {
            "case": name,
            "labels": self.catalog.label_table(name),
            "overlays": self.catalog.overlays(name),
            "flags": self.catalog.flags(name),
            "scan_available": self.cache.scan_available(name, side),
            "source": side.get("source"),
            "axcodes": info.get("axcodes"),
            "mask": f"{name}.nii.gz",
            "corrected": corrected_name(name) if (self.outdir / corrected_name(name)).is_file() else None,
            "state": state.to_dict() if state else {"case": name, "version": 0},
            "history": self.store.history(name) if self.store else [],
            "read_only": self.read_only,
        }

    def served_file(self, name: str) -> Path | None:
        """``OUTDIR/name`` when it may be served (module docstring), else None."""
        if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
            return None
        if name.startswith(DB_NAME):
            return None
        path = self.outdir / name
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if real.parent != self.real or not real.is_file():
            return None
        return path


class Handler(BaseHTTPRequestHandler):
    """Routes of the module docstring. ``self.server.app`` is the :class:`ReviewApp`."""

    protocol_version = "HTTP/1.1"
    server_version = "medseg-review"
    sys_version = ""

    @property
    def app(self) -> ReviewApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:
        if os.environ.get("MEDSEG_REVIEW_LOG"):
            super().log_message(format, *args)

    # ------------------------------------------------------------------ answers

    def _headers(self, status: int, ctype: str, length: int, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, body: bytes | str, ctype: str) -> None:
        data = body.encode() if isinstance(body, str) else body
        self._headers(status, ctype, len(data))
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, status: int, payload: object) -> None:
        self._send(status, json.dumps(payload, ensure_ascii=False), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _file(self, path: Path, ctype: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._headers(HTTPStatus.OK, ctype, size)
            if self.command != "HEAD":
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    # ------------------------------------------------------------------ checks

    def _host_ok(self) -> bool:
        return self.headers.get("Host", "") in self.app.hosts

    def _write_refusal(self) -> str | None:
        """Why this POST may not write (None: it may)."""
        app = self.app
        if app.read_only or app.store is None:
            return "this server is read-only (--read-only)"
        token = self.headers.get("X-Review-Token", "")
        if not hmac.compare_digest(token.encode(), app.token.encode()):
            return "missing or wrong session token: reload the page"
        origin = self.headers.get("Origin")
        if origin is not None and origin != app.origin:
            return f"cross-origin request from {origin} refused"
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request ({site}) refused"
        return None

    def _route(self) -> tuple[list[str], dict]:
        parts = urlsplit(self.path)
        return [unquote(p) for p in parts.path.split("/")[1:]], parse_qs(parts.query)

    # ------------------------------------------------------------------ GET

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        try:
            self._get()
        except InputError as exc:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _get(self) -> None:
        app = self.app
        parts, query = self._route()
        if parts in ([""], []):
            app.catalog.refresh()
            verdict = (query.get("verdict") or [""])[0]
            page = index_html(app.outdir, app.catalog.cases(), app.states(), verdict, app.read_only)
            return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
        if len(parts) == 2 and parts[0] == "case" and app.catalog.get(parts[1]):
            page = case_html(parts[1], app.token, app.read_only)
            return self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
        if len(parts) == 3 and parts[:2] == ["api", "case"] and app.catalog.get(parts[2]):
            return self._json(HTTPStatus.OK, app.case_data(parts[2]))
        if len(parts) == 3 and parts[0] == "display" and app.catalog.get(parts[1]):
            kind = parts[2].removesuffix(".nii")
            if kind in KINDS and parts[2].endswith(".nii"):
                path = app.cache.path(parts[1], app.catalog.sidecar(parts[1]), kind)
                return self._file(path, "application/octet-stream")
        if len(parts) == 2 and parts[0] == "files":
            path = app.served_file(parts[1])
            if path is not None:
                ctype = {".png": "image/png", ".csv": "text/csv; charset=utf-8",
                         ".json": "application/json", ".html": "text/html; charset=utf-8"}.get(
                    path.suffix, "application/octet-stream")  # fmt: skip
                return self._file(path, ctype)
        if len(parts) == 2 and parts[0] == "static" and parts[1] in STATIC_FILES:
            return self._file(STATIC / parts[1], STATIC_FILES[parts[1]])
        self._error(HTTPStatus.NOT_FOUND, "not found")

    # ------------------------------------------------------------------ POST

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        refusal = self._write_refusal()
        if refusal:
            self.close_connection = True
            return self._error(HTTPStatus.FORBIDDEN, refusal)
        parts, query = self._route()
        if len(parts) != 4 or parts[:2] != ["api", "case"] or not self.app.catalog.get(parts[2]):
            self.close_connection = True
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        try:
            if parts[3] == "verdict":
                return self._verdict(parts[2], length)
            if parts[3] == "correction":
                return self._correction(parts[2], length, query)
            self.close_connection = True
            self._error(HTTPStatus.NOT_FOUND, "not found")
        except StaleVersion as exc:
            self._json(HTTPStatus.CONFLICT, {"error": str(exc), "state": exc.current.to_dict()})
        except InputError as exc:
            self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))

    def _body(self, length: int, limit: int) -> bytes | None:
        if length < 0 or length > limit:
            self.close_connection = True
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes refused (limit {limit})"
            )
            return None
        return self.rfile.read(length)

    def _verdict(self, case: str, length: int) -> None:
        body = self._body(length, MAX_JSON_BYTES)
        if body is None:
            return
        try:
            entry = json.loads(body)
            version = int(entry["version"])
        except (ValueError, KeyError, TypeError):
            raise InputError("expected JSON {verdict, comment, reviewer, version}") from None
        state = self.app.store.save(
            case, version, entry.get("verdict"), entry.get("comment", ""), entry.get("reviewer")
        )
        self._json(HTTPStatus.OK, {"state": state.to_dict(), "history": self.app.store.history(case)})

    def _correction(self, case: str, length: int, query: dict) -> None:
        app = self.app
        grid = nib.load(str(app.cache.path(case, app.catalog.sidecar(case), "labels_scan_grid")))
        body = self._body(length, max_correction_bytes(grid.shape[:3]))
        if body is None:
            return
        try:
            version = int((query.get("version") or ["x"])[0])
        except ValueError:
            raise InputError("correction: expected ?version=<the version you opened>") from None
        reviewer = (query.get("reviewer") or [""])[0]
        comment = (query.get("comment") or [""])[0]
        with app._correction_lock:  # one correction file write at a time; the store checks the version
            current = app.store.state(case)
            if current.version != version:
                raise StaleVersion(current, version)
            check_entry(None, comment, reviewer)
            path = save_correction(app.outdir, case, body, grid, app.catalog.labels(case))
            state = app.store.save(case, version, None, comment, reviewer, correction=path.name)
        self._json(
            HTTPStatus.OK, {"state": state.to_dict(), "history": app.store.history(case), "file": path.name}
        )


class ReviewServer(ThreadingHTTPServer):
    """The HTTP server with its :class:`ReviewApp` (``server.app``)."""

    daemon_threads = True

    def __init__(self, app: ReviewApp, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), Handler)
        self.app = app
        app.bind(host, self.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.app.origin}/"


def make_server(
    outdir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, read_only: bool = False
) -> ReviewServer:
    """A review server for ``outdir`` bound to ``host:port`` (0: a free port), not yet serving.

    Writes the exports once (``review.csv`` … from the database) unless read-only.

    Raises:
        InputError: no such folder, or no case in it.
        OSError: the address cannot be bound.
    """
    app = ReviewApp(outdir, read_only)
    if app.store is not None and not read_only:
        export_review(app.store)
    return ReviewServer(app, host, port)
