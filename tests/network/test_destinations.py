"""Destination parsing (PS3.5 AE titles, DICOMweb roots, no credentials in URLs) and credential loading
(environment or a private file, never argv)."""

from __future__ import annotations

import json
import os

import pytest
import requests

from medseg.io import InputError
from medseg.network.credentials import BearerAuth, Credentials, load_credentials
from medseg.network.destinations import Destination, parse_destination


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dimse://PACS@10.0.0.5:104", Destination("dimse", "10.0.0.5", 104, ae_title="PACS")),
        ("dimse://  ORTHANC @localhost:4242", Destination("dimse", "localhost", 4242, ae_title="ORTHANC")),
        ("DIMSE://A@B@pacs.example.org:11112", Destination("dimse", "pacs.example.org", 11112, ae_title="A@B")),
        ("dimse://SIXTEEN_CHARS_AE@[::1]:104", Destination("dimse", "::1", 104, ae_title="SIXTEEN_CHARS_AE")),
        ("https://pacs.example.org/dicom-web/", Destination("dicomweb", "pacs.example.org", 443, url="https://pacs.example.org/dicom-web")),
        ("http://127.0.0.1:8042/dicom-web", Destination("dicomweb", "127.0.0.1", 8042, url="http://127.0.0.1:8042/dicom-web")),
        ("dicomweb+http://h:80/x", Destination("dicomweb", "h", 80, url="http://h:80/x")),
    ],
)  # fmt: skip
def test_valid_destinations_parse_and_print_canonically(text, expected):
    dest = parse_destination(text)
    assert dest == expected
    assert parse_destination(str(dest)) == dest


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("dimse://SEVENTEEN_CHARS_AE@h:104", "at most 16"),
        ("dimse://BACK\\SLASH@h:104", "backslash"),
        ("dimse://TAB\tAE@h:104", "control"),
        ("dimse://   @h:104", "empty"),
        ("dimse://h:104", "AE title is missing"),
        ("dimse://AE@h", "port is missing"),
        ("dimse://AE@h:0", "port '0'"),
        ("dimse://AE@h:70000", "65535"),
        ("dimse://AE@bad_host!:104", "not a host name"),
        ("ftp://host/x", "expected http(s)"),
        ("pacs.example.org", "expected http(s)"),
        ("https://host/dicom-web?x=1", "query"),
        ("https:///dicom-web", "host is missing"),
        ("https://host:99999/dicom-web", "port"),
    ],
)
def test_malformed_destinations_are_one_line_input_errors(text, needle):
    with pytest.raises(InputError) as info:
        parse_destination(text)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_credentials_in_a_url_are_refused_and_never_shown():
    with pytest.raises(InputError) as info:
        parse_destination("https://alice:s3cret@pacs.example.org/dicom-web")
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value)
    assert "credentials in a URL are refused" in str(info.value)


def test_environment_credentials(monkeypatch):
    assert load_credentials(environ={}) is None
    token = load_credentials(environ={"MEDSEG_DICOMWEB_TOKEN": "t0k"})
    assert token.scheme == "bearer" and isinstance(token.auth(), BearerAuth)
    request = token.auth()(requests.Request("GET", "http://h/").prepare())
    assert request.headers["Authorization"] == "Bearer t0k"
    basic = load_credentials(environ={"MEDSEG_DICOMWEB_USER": "u", "MEDSEG_DICOMWEB_PASSWORD": "p"})
    request = basic.auth()(requests.Request("GET", "http://h/").prepare())
    assert request.headers["Authorization"] == "Basic dTpw"  # base64("u:p"), RFC 7617
    assert "'p'" not in repr(basic)
    assert "t0k" not in repr(token) and "t0k" not in str(token)
    for env in ({"MEDSEG_DICOMWEB_USER": "u"}, {"MEDSEG_DICOMWEB_TOKEN": "t", "MEDSEG_DICOMWEB_USER": "u"}):
        with pytest.raises(InputError):
            load_credentials(environ=env)
    monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "from-env")
    assert load_credentials().token == "from-env"


def test_credentials_file_must_be_private_json(tmp_path):
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"user": "alice", "password": "s3cret"}))
    os.chmod(path, 0o644)
    with pytest.raises(InputError) as info:
        load_credentials(path)
    assert str(path) in str(info.value) and "0644" in str(info.value) and "chmod 600" in str(info.value)
    os.chmod(path, 0o600)
    creds = load_credentials(path, environ={"MEDSEG_DICOMWEB_TOKEN": "ignored"})
    assert (creds.user, creds.password, creds.source) == ("alice", "s3cret", str(path))
    assert "s3cret" not in repr(creds)
    for bad in ("not json", json.dumps({"token": "t", "user": "u", "password": "p"}), json.dumps({"pw": "x"}),
                json.dumps({"token": 5}), json.dumps({"user": "u"})):  # fmt: skip
        path.write_text(bad)
        with pytest.raises(InputError) as info:
            load_credentials(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="regular file"):
        load_credentials(tmp_path)
    with pytest.raises(InputError, match="cannot read"):
        load_credentials(tmp_path / "missing.json")


def test_credentials_reject_header_injection():
    with pytest.raises(InputError, match="line break"):
        Credentials("x", token="abc\r\nX-Evil: 1")
