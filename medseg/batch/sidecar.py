"""A sidecar read back as data: its JSON checked against the schema before ``medseg export`` trusts it.

``medseg segment`` writes ``<case>.json`` beside ``<case>.nii.gz`` (:mod:`medseg.batch.cases`). A
later :func:`medseg.batch.reexport.export_outputs` reads it again; by then it may have been truncated,
hand-edited or written by something else. :func:`load_sidecar` reads one and checks the keys an export uses,
and :func:`sidecar_problems` lists every mismatch as ``key: expected …, found …``:

* ``case`` — a string equal to the mask's name (``<case>.nii.gz``);
* ``labels`` — an object ``{name: value}``, names strings, values integers 0…255 (0, background, allowed);
* ``kind`` — ``"nifti"`` or ``"dicom"``; a ``"dicom"`` case needs the ``dicom`` block:
  ``series_uid`` (non-empty string), ``files`` (a non-empty list of strings, at most
  :data:`MAX_SERIES_FILES`), ``archive`` (string or null), and, when present, the identifiers
  (``study_uid``, ``frame_of_reference_uid``, ``patient_id``, ``study_date``, ``series_description``,
  ``modality``: strings; ``series_number``: integer or null; ``sop_instance_uids``, ``notes``: lists of
  strings, the former as long as ``files``);
* when present: ``source`` (string), ``checkpoints`` and ``checkpoint_sha256`` (lists of strings),
  ``exports`` (object), ``warnings`` (list of strings). ``exports`` holds what earlier exports wrote
  (``dicom_seg``, ``dicom_rtstruct``, ``slicer``, ``split``); an export replaces its own entry and reads
  none, so only the shape of the DICOM entries is checked: each an object, ``dicom_rtstruct`` with
  ``path`` (string or null), ``rois`` (object name → ROI number), ``omitted`` (list of strings), the two
  UIDs (strings) and ``round_trip`` (object ROI name → ``{dice, hd95_voxels}``).

Other keys (the identity, ``inference``, ``image_info``, …) are not used by an export and not checked. A
sidecar larger than :data:`MAX_SIDECAR_BYTES` is refused unread.
"""

from __future__ import annotations

import json
from pathlib import Path

from medseg.io import InputError, case_name

#: Most files one recorded DICOM series may list (a CT series of 0.5 mm slices over 2 m has 4 000).
MAX_SERIES_FILES = 10_000
#: Largest sidecar read: 10 000 file paths of 4 KiB each fit; anything bigger was not written by medseg.
MAX_SIDECAR_BYTES = 64 * 2**20
KINDS = ("nifti", "dicom")

_DICOM_STRINGS = (
    "study_uid",
    "frame_of_reference_uid",
    "patient_id",
    "study_date",
    "series_description",
    "modality",
)


def _found(value: object) -> str:
    """What a value is, for a message: its JSON type, and the value itself when it is short."""
    kind = {
        type(None): "null",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "list",
        dict: "object",
    }.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)):
        return f"{kind} of {len(value)}"
    if value is None:
        return kind
    text = json.dumps(value)
    return f"{kind} {text}" if len(text) <= 40 else kind


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_list(value: object) -> int | None:
    """Index of the first non-string item of a list (or -1 for a list of strings); None: not a list."""
    if not isinstance(value, list):
        return None
    return next((i for i, v in enumerate(value) if not isinstance(v, str)), -1)


def _check_string_list(problems: list[str], key: str, value: object) -> None:
    first = _string_list(value)
    if first is None:
        problems.append(f"{key}: expected a list of strings, found {_found(value)}")
    elif first >= 0:
        problems.append(f"{key}[{first}]: expected a string, found {_found(value[first])}")


def _check_labels(problems: list[str], labels: object) -> None:
    if not isinstance(labels, dict):
        problems.append(f"labels: expected an object {{name: 0..255}}, found {_found(labels)}")
        return
    if not labels:
        problems.append("labels: expected at least one label name, found an empty object")
    for name, value in labels.items():
        if not name.strip():
            problems.append(f"labels: expected non-empty label names, found {json.dumps(name)}")
        if not _is_int(value) or not 0 <= value <= 255:
            problems.append(f"labels[{json.dumps(name)}]: expected an integer 0..255, found {_found(value)}")


def _check_dicom(problems: list[str], block: object) -> None:
    if not isinstance(block, dict):
        problems.append(f"dicom: expected an object (kind is dicom), found {_found(block)}")
        return
    uid = block.get("series_uid")
    if not isinstance(uid, str) or not uid.strip():
        problems.append(f"dicom.series_uid: expected a non-empty string, found {_found(uid)}")
    files = block.get("files")
    if isinstance(files, list) and len(files) > MAX_SERIES_FILES:  # refused before any item is looked at
        problems.append(f"dicom.files: expected at most {MAX_SERIES_FILES} files, found list of {len(files)}")
    elif isinstance(files, list) and not files:
        problems.append("dicom.files: expected a non-empty list of strings, found list of 0")
    else:
        _check_string_list(problems, "dicom.files", files)
    archive = block.get("archive")
    if archive is not None and not (isinstance(archive, str) and archive.strip()):
        problems.append(f"dicom.archive: expected a path string or null, found {_found(archive)}")
    for key in _DICOM_STRINGS:
        if key in block and not isinstance(block[key], str):
            problems.append(f"dicom.{key}: expected a string, found {_found(block[key])}")
    if "series_number" in block and not (block["series_number"] is None or _is_int(block["series_number"])):
        problems.append(
            f"dicom.series_number: expected an integer or null, found {_found(block['series_number'])}"
        )
    for key in ("sop_instance_uids", "notes"):
        if key in block:
            _check_string_list(problems, f"dicom.{key}", block[key])
    sops = block.get("sop_instance_uids")
    if isinstance(sops, list) and isinstance(files, list) and len(sops) != len(files):
        problems.append(
            f"dicom.sop_instance_uids: expected one per file ({len(files)}), found list of {len(sops)}"
        )


def _check_exports(problems: list[str], exports: dict) -> None:
    for key in ("dicom_seg", "dicom_rtstruct"):
        if key in exports and not isinstance(exports[key], dict):
            problems.append(f"exports.{key}: expected an object, found {_found(exports[key])}")
    rt = exports.get("dicom_rtstruct")
    if not isinstance(rt, dict):
        return
    if "path" in rt and not (rt["path"] is None or isinstance(rt["path"], str)):
        problems.append(f"exports.dicom_rtstruct.path: expected a string or null, found {_found(rt['path'])}")
    for key in ("rois", "round_trip"):
        if key in rt and not isinstance(rt[key], dict):
            problems.append(f"exports.dicom_rtstruct.{key}: expected an object, found {_found(rt[key])}")
    if "omitted" in rt:
        _check_string_list(problems, "exports.dicom_rtstruct.omitted", rt["omitted"])
    for key in ("sop_instance_uid", "series_instance_uid"):
        if key in rt and not isinstance(rt[key], str):
            problems.append(f"exports.dicom_rtstruct.{key}: expected a string, found {_found(rt[key])}")


def sidecar_problems(side: object, case: str) -> list[str]:
    """Every way ``side`` (a parsed sidecar of the mask of case ``case``) differs from the schema, as
    ``key: expected …, found …`` (the module docstring); empty when it matches."""
    if not isinstance(side, dict):
        return [f"(top level): expected an object, found {_found(side)}"]
    problems: list[str] = []
    if side.get("case") != case:
        problems.append(
            f"case: expected the mask's name {json.dumps(case)}, found {_found(side.get('case'))}"
        )
    _check_labels(problems, side.get("labels"))
    kind = side.get("kind")
    if kind not in KINDS:
        problems.append(f"kind: expected one of {', '.join(KINDS)}, found {_found(kind)}")
    elif kind == "dicom":
        _check_dicom(problems, side.get("dicom"))
    if "source" in side and not isinstance(side["source"], str):
        problems.append(f"source: expected a string, found {_found(side['source'])}")
    for key in ("checkpoints", "checkpoint_sha256", "warnings"):
        if key in side:
            _check_string_list(problems, key, side[key])
    if "exports" in side and not isinstance(side["exports"], dict):
        problems.append(f"exports: expected an object, found {_found(side['exports'])}")
    elif "exports" in side:
        _check_exports(problems, side["exports"])
    return problems


def load_sidecar(sidecar: Path) -> dict:
    """The sidecar ``<case>.json`` as a dict that matches the schema (module docstring).

    Raises:
        InputError: one line naming ``sidecar`` and the cause: unreadable, too large, not JSON, or each
            key that differs from the schema (expected vs found).
    """
    sidecar = Path(sidecar)
    try:
        size = sidecar.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise InputError(
                f"{sidecar}: sidecar of {size / 2**20:.0f} MiB, larger than {MAX_SIDECAR_BYTES // 2**20} MiB; "
                "not read"
            )
        text = sidecar.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{sidecar}: sidecar cannot be read ({' '.join(str(exc).split())})") from None
    try:
        side = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{sidecar}: sidecar is not valid JSON ({exc}; truncated?)") from None
    except RecursionError:  # ``[[[[…`` nested deeper than the parser's stack
        raise InputError(f"{sidecar}: sidecar is not valid JSON (nested too deeply)") from None
    problems = sidecar_problems(side, case_name(sidecar))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"{sidecar}: sidecar does not match the schema: {'; '.join(problems[:3])}{more}")
    return side
