"""A scripted HTTP server on a thread (127.0.0.1, free port) for DICOMweb peers that misbehave on purpose."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: ``respond(method, path, headers, body) -> (status, headers, body bytes or an iterable of chunks)``.
Responder = Callable[[str, str, dict, bytes], tuple[int, dict, object]]


class FakeServer:
    """``with FakeServer(respond) as server: server.url``; every request is kept in ``requests``."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[tuple[str, str, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Transfer-Encoding") == "chunked":
                    body = self._read_chunked()
                owner.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, payload = owner.respond(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if isinstance(payload, bytes):
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self.send_header("Connection", "close")  # streamed: the end of the body is the close
                self.end_headers()
                try:
                    for chunk in payload:
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (a cap was reached): expected
                self.close_connection = True

            def _read_chunked(self) -> bytes:
                data = b""
                while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data

            do_GET = do_POST = _serve

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def multipart(
    parts: list[bytes], boundary: str = "b0undary", content_type: str = "application/dicom"
) -> bytes:
    """A multipart/related body (RFC 2046 5.1) with one ``content_type`` part per item."""
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()
