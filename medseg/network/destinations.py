"""Where outputs go: a DICOM peer reached by DIMSE C-STORE, or a DICOMweb server reached by STOW-RS.

Two spellings are accepted (:func:`parse_destination`):

* ``dimse://AE@HOST:PORT`` — a Storage SCP (DICOM PS3.4 Annex B, PS3.7 9.1.1). ``AE`` is the *called* AE
  title, checked against the AE value representation of PS3.5 Table 6.2-1: at most 16 characters of the
  default repertoire, no backslash, no control characters, not only spaces (leading and trailing spaces
  are not significant and are dropped). ``HOST`` is a host name, an IPv4 address or ``[IPv6]``.
* ``http://host[:port]/path`` or ``https://…`` — the root of a DICOMweb service (PS3.18 10.5, STOW-RS
  posts to ``<root>/studies``), e.g. ``https://pacs.example.org/dicom-web``. ``dicomweb+https://…`` is the
  same. A URL carrying ``user:password@`` is refused: credentials never travel on the command line, where
  ``ps`` and shell histories show them (see :mod:`medseg.network.credentials`). A query string or fragment
  is refused too: a DICOMweb root has neither.

``str(destination)`` is the canonical spelling, safe to print and log (it never holds credentials).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from medseg.io import InputError

#: PS3.5 Table 6.2-1: AE is at most 16 characters.
AE_TITLE_MAX = 16
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_DICOMWEB_SCHEMES = {"http": "http", "https": "https", "dicomweb+http": "http", "dicomweb+https": "https"}


def check_ae_title(title: str, where: str = "AE title") -> str:
    """``title`` without leading/trailing spaces if it is a valid AE (PS3.5 Table 6.2-1), else
    :class:`~medseg.io.InputError` naming ``where``."""
    stripped = title.strip(" ")
    if not stripped:
        raise InputError(f"{where}: the AE title is empty")
    if len(stripped) > AE_TITLE_MAX:
        raise InputError(f"{where}: AE title {stripped!r} has {len(stripped)} characters, at most 16 allowed")
    if "\\" in stripped:
        raise InputError(f"{where}: AE title {stripped!r} contains a backslash")
    if any(not (0x20 <= ord(ch) < 0x7F) for ch in stripped):
        raise InputError(
            f"{where}: AE title {stripped!r} holds a control or non-ASCII character (PS3.5 default repertoire)"
        )
    return stripped


def check_host(host: str, where: str) -> str:
    """A host name (RFC 1123 labels), IPv4 or IPv6 address; ``[…]`` around IPv6 is removed."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if bare != host or not _HOSTNAME.fullmatch(bare) or len(bare) > 253:
        raise InputError(f"{where}: {host!r} is not a host name or IP address")
    return bare


def check_port(text: str, where: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InputError(f"{where}: port {text!r} is not a number from 1 to 65535")
    return int(text)


@dataclass(frozen=True)
class Destination:
    """A parsed destination (:func:`parse_destination`).

    Attributes:
        kind: ``"dimse"`` (C-STORE) or ``"dicomweb"`` (STOW-RS).
        ae_title, host, port: the called AE title and the peer's address (``dimse``; for ``dicomweb``
            host and port of the URL).
        url: the DICOMweb root without a trailing slash (``dicomweb``; empty for ``dimse``).
    """

    kind: Literal["dimse", "dicomweb"]
    host: str
    port: int
    ae_title: str = ""
    url: str = ""

    def __str__(self) -> str:
        if self.kind == "dimse":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"dimse://{self.ae_title}@{host}:{self.port}"
        return self.url


def _redacted(text: str) -> str:
    """``text`` with any ``user:password@`` of a URL replaced by ``***@`` (for error messages)."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", text)


def _parse_dimse(text: str, rest: str) -> Destination:
    ae, at, address = rest.rpartition("@")
    if not at:
        raise InputError(f"{text}: expected dimse://AE@HOST:PORT (the called AE title is missing)")
    ae = check_ae_title(ae, text)
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise InputError(f"{text}: expected dimse://AE@HOST:PORT (the port is missing)")
    return Destination("dimse", check_host(host, text), check_port(port, text), ae_title=ae)


def parse_dicomweb_url(text: str, where: str | None = None) -> tuple[str, str, int]:
    """Check a DICOMweb root ``http(s)://host[:port]/path`` (or ``dicomweb+http(s)://…``) and return
    ``(url, host, port)`` with the scheme made plain ``http``/``https`` and no trailing slash.

    Raises:
        InputError: not http(s), credentials in the URL, no host, a bad port, a query or fragment.
    """
    where = where or _redacted(text)
    parts = urlsplit(text)
    scheme = _DICOMWEB_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise InputError(f"{where}: expected http(s)://host[:port]/path or dimse://AE@HOST:PORT")
    if "@" in parts.netloc:
        raise InputError(
            f"{where}: credentials in a URL are refused (they would show in process lists and shell history);"
            " use MEDSEG_DICOMWEB_TOKEN, MEDSEG_DICOMWEB_USER/MEDSEG_DICOMWEB_PASSWORD or --credentials FILE"
        )
    if parts.query or parts.fragment:
        raise InputError(f"{where}: a DICOMweb root has no query string or fragment")
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"{where}: the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise InputError(f"{where}: the host is missing")
    host = check_host(parts.hostname, where)
    port = port or (443 if scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise InputError(f"{where}: the port is not a number from 1 to 65535")
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in parts.path):
        raise InputError(f"{where}: the path holds spaces or control characters")
    netloc = parts.netloc.lower() if parts.port is None else parts.netloc
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}", host, port


def parse_destination(text: str) -> Destination:
    """Parse ``dimse://AE@HOST:PORT`` or ``http(s)://host[:port]/path`` (a DICOMweb root).

    >>> str(parse_destination("dimse://PACS@10.0.0.5:104"))
    'dimse://PACS@10.0.0.5:104'
    >>> parse_destination("https://pacs.example.org/dicom-web/").url
    'https://pacs.example.org/dicom-web'

    Raises:
        InputError: one line naming the text (credentials redacted) and what is wrong.
    """
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() == "dimse":
        return _parse_dimse(text, rest)
    url, host, port = parse_dicomweb_url(text)
    return Destination("dicomweb", host, port, url=url)
