"""Credentials for a DICOMweb server: from the environment or a private file, never from the command line.

Sources, in order (:func:`load_credentials`):

1. ``--credentials FILE``: a JSON object, either ``{"token": "…"}`` (HTTP bearer token, RFC 6750) or
   ``{"user": "…", "password": "…"}`` (HTTP basic authentication, RFC 7617). Like ``ssh`` with a private
   key, the file is refused when its permissions give the group or others any access (``chmod 600 FILE``),
   and when it is not a regular file.
2. The environment: ``MEDSEG_DICOMWEB_TOKEN`` (bearer) or ``MEDSEG_DICOMWEB_USER`` with
   ``MEDSEG_DICOMWEB_PASSWORD`` (basic).
3. Nothing: requests go without authentication.

The result's :meth:`Credentials.auth` is a ``requests`` auth object (``session.auth = creds.auth()``);
``requests`` drops the ``Authorization`` header when a server redirects to another host. The secret never
appears in ``repr``/``str`` or in an error message. Over plain ``http://`` to another machine the secret
crosses the network readable by anyone on the path: use ``https://`` for anything but localhost.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

from medseg.io import InputError

TOKEN_ENV = "MEDSEG_DICOMWEB_TOKEN"
USER_ENV = "MEDSEG_DICOMWEB_USER"
PASSWORD_ENV = "MEDSEG_DICOMWEB_PASSWORD"
#: A credentials file is a few hundred bytes; anything much larger is not one (and is not read).
MAX_FILE_BYTES = 64 * 1024


class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` (RFC 6750 2.1)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


@dataclass(frozen=True)
class Credentials:
    """A bearer token or a user and password, and where they came from (``source``: a file or ``environment``).

    The secret fields are left out of ``repr``.
    """

    source: str
    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if bool(self.token) == bool(self.user):
            raise InputError(
                f"{self.source}: give either a token or a user and password, not both or neither"
            )
        if self.user and not self.password:
            raise InputError(f"{self.source}: user {self.user!r} has no password")
        for name, value in (("token", self.token), ("user", self.user), ("password", self.password)):
            if value is not None and any(ch in value for ch in "\r\n\0"):
                raise InputError(f"{self.source}: the {name} holds a line break or NUL character")
        if self.user and ":" in self.user:
            raise InputError(f"{self.source}: a basic-auth user name cannot contain ':' (RFC 7617)")

    @property
    def scheme(self) -> str:
        return "bearer" if self.token else "basic"

    def auth(self) -> requests.auth.AuthBase:
        """The ``requests`` auth object: :class:`BearerAuth` or ``HTTPBasicAuth``."""
        if self.token:
            return BearerAuth(self.token)
        return requests.auth.HTTPBasicAuth(self.user or "", self.password or "")

    def __str__(self) -> str:
        return f"{self.scheme} credentials from {self.source}"


def _read_file(path: Path) -> Credentials:
    try:
        info = path.stat()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the credentials file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: the credentials file is not a regular file")
    if info.st_mode & 0o077:
        raise InputError(
            f"{path}: permissions {stat.S_IMODE(info.st_mode):04o} are too open for a credentials file "
            f"(group or others have access); run chmod 600 {path}"
        )
    if info.st_size > MAX_FILE_BYTES:
        raise InputError(f"{path}: {info.st_size} bytes is too large for a credentials file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        cause = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise InputError(f"{path}: cannot read the credentials file ({cause})") from None
    allowed = {"token", "user", "password"}
    if not isinstance(data, dict) or not set(data) <= allowed or not data:
        raise InputError(
            f'{path}: expected a JSON object {{"token": ...}} or {{"user": ..., "password": ...}}'
        )
    if not all(isinstance(v, str) for v in data.values()):
        raise InputError(f"{path}: token, user and password must be strings")
    return Credentials(
        str(path), token=data.get("token"), user=data.get("user"), password=data.get("password")
    )


def load_credentials(
    file: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None
) -> Credentials | None:
    """Credentials from ``file`` if given, else from the environment, else None (see the module docstring).

    Raises:
        InputError: one line naming the file (or the variables) and the cause; the secret is never shown.
    """
    if file is not None:
        return _read_file(Path(file))
    env = os.environ if environ is None else environ
    token, user, password = env.get(TOKEN_ENV), env.get(USER_ENV), env.get(PASSWORD_ENV)
    if token and (user or password):
        raise InputError(f"environment: set either {TOKEN_ENV} or {USER_ENV} and {PASSWORD_ENV}, not both")
    if token:
        return Credentials("environment", token=token)
    if user or password:
        if not (user and password):
            raise InputError(f"environment: {USER_ENV} and {PASSWORD_ENV} must be set together")
        return Credentials("environment", user=user, password=password)
    return None


def session_for(credentials: Credentials | None) -> requests.Session:
    """A ``requests.Session`` that authenticates with ``credentials`` (None: anonymous). The environment's
    proxy settings stay in force (``trust_env``), as hospital networks often need them."""
    session = requests.Session()
    if credentials is not None:
        session.auth = credentials.auth()
    return session
