"""The nnU-Net v2 raw dataset layout: cases found in ``labelsTr``, input channels from ``_0000`` suffixes.

nnU-Net v2 (Isensee et al., Nat. Methods 2021; ``documentation/dataset_format.md`` of nnU-Net v2)::

    Dataset001_Liver/
      dataset.json     {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                        "numTraining": 3, "file_ending": ".nii.gz"}
      imagesTr/liver_001_0000.nii.gz   channel 0 of case liver_001 (liver_001_0001… for more channels)
      labelsTr/liver_001.nii.gz
      imagesTs/                        optional

There is no ``training`` list: every ``labelsTr/<case><file_ending>`` is a training case, and its channel
``k`` is ``imagesTr/<case>_<kkkk><file_ending>`` for each ``k`` of ``channel_names``. The MSD layout (a
``training`` list) is :mod:`medseg.data.datasets`; :func:`detect_layout` tells them apart by that list.

:func:`discover_cases` returns every problem at once (for :mod:`medseg.data.check`): a missing channel file,
a channel not declared in ``channel_names``, a file whose ending is not ``file_ending``, ``numTraining`` not
matching ``labelsTr``, a file that is a symlink leading out of the dataset folder. Files that belong to no
case (an image without a label) are warnings, as nnU-Net ignores them. Not supported by medseg: region labels
(a label name → a list of values, nnU-Net's region-based training) and file endings other than NIfTI.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medseg.io import InputError, UnsafePathError, is_nifti, resolve_inside
from medseg.io.atomic import TEMP_PREFIX

#: ``file_ending`` values medseg reads (NIfTI); nnU-Net also knows .nrrd, .mha, .png, .tif …
SUPPORTED_ENDINGS = (".nii.gz", ".nii")


def detect_layout(meta: dict) -> str | None:
    """``"msd"`` (a ``training`` list), ``"nnunet"`` (``channel_names`` / ``file_ending``, no list) or None."""
    if "training" in meta:
        return "msd"
    if "channel_names" in meta or "file_ending" in meta:
        return "nnunet"
    return None


def channel_names(meta: dict, source: str | os.PathLike = "dataset.json") -> list[str]:
    """The input channels in order, from ``channel_names`` (nnU-Net v2) or ``modality`` (v1 / MSD).

    Raises:
        InputError: missing, not a mapping, or keys that are not ``"0"``, ``"1"``, … ``"k-1"``.
    """
    names = meta.get("channel_names", meta.get("modality"))
    if names is None:
        raise InputError(f'{source}: needs \'channel_names\', e.g. {{"0": "CT"}} (nnU-Net v2 layout)')
    if not isinstance(names, dict) or not names:
        raise InputError(f"{source}: 'channel_names' must map '0', '1', … to names, found {names!r}")
    keys = sorted(names, key=lambda k: int(k) if str(k).isdigit() else -1)
    if [str(k) for k in keys] != [str(i) for i in range(len(names))]:
        raise InputError(
            f"{source}: 'channel_names' keys must be '0', '1', … '{len(names) - 1}', found {', '.join(map(str, names))}"
        )
    return [str(names[k]) for k in keys]


def file_ending(meta: dict, source: str | os.PathLike = "dataset.json") -> str:
    """``file_ending`` of an nnU-Net dataset.json (one of :data:`SUPPORTED_ENDINGS`).

    Raises:
        InputError: missing, or not a NIfTI ending.
    """
    ending = meta.get("file_ending")
    if ending is None:
        raise InputError(f"{source}: needs 'file_ending' (\".nii.gz\") in the nnU-Net v2 layout")
    if ending not in SUPPORTED_ENDINGS:
        raise InputError(
            f"{source}: file_ending {ending!r} is not supported; medseg reads NIfTI "
            f"({', '.join(SUPPORTED_ENDINGS)})"
        )
    return ending


@dataclass
class Discovery:
    """What :func:`discover_cases` found: cases, problems (``(files, cause)``), warnings, channel names.

    ``cases`` maps a case name to its channel files (in channel order) and label file; only cases whose
    files all exist are listed. ``usable`` is False when nothing could be looked for (no ``labelsTr``,
    unusable ``channel_names`` or ``file_ending``).
    """

    cases: dict[str, dict] = field(default_factory=dict)
    problems: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    usable: bool = True
    num_labels: int = 0

    def add(self, files: str | os.PathLike | tuple, cause: str) -> None:
        names = tuple(map(str, files)) if isinstance(files, tuple) else (str(files),)
        self.problems.append((names, cause))


def _entries(folder: Path) -> list[Path]:
    """NIfTI-like entries of a folder (hidden and temporary files left out), sorted."""
    return [
        p
        for p in sorted(folder.iterdir())
        if not p.name.startswith((".", TEMP_PREFIX)) and (is_nifti(p) or p.suffix in (".gz", ".nii"))
    ]


def _inside(root: Path, folder: str, path: Path, found: Discovery) -> bool:
    """The file stays inside the dataset folder (no symlink leading out); else a problem."""
    try:
        resolve_inside(root, f"{folder}/{path.name}", "dataset")
    except UnsafePathError as exc:
        found.add(path, exc.cause)
        return False
    return True


def discover_cases(root: str | os.PathLike, meta: dict) -> Discovery:
    """Cases of an nnU-Net v2 dataset folder, with every problem found on the way (module docstring)."""
    root = Path(root)
    source = root / "dataset.json"
    found = Discovery()
    try:
        found.channels = channel_names(meta, source)
    except InputError as exc:
        found.add(source, str(exc).removeprefix(f"{source}: "))
        found.usable = False
    try:
        ending = file_ending(meta, source)
    except InputError as exc:
        found.add(source, str(exc).removeprefix(f"{source}: "))
        found.usable = False
    labels_dir, images_dir = root / "labelsTr", root / "imagesTr"
    for folder in (labels_dir, images_dir):
        if not folder.is_dir():
            found.add(folder, "folder not found (the nnU-Net v2 layout needs imagesTr/ and labelsTr/)")
            found.usable = False
    if not found.usable:
        return found

    k = len(found.channels)
    labels: dict[str, Path] = {}
    for path in _entries(labels_dir):
        if not path.name.endswith(ending):
            found.add(path, f"file ending does not match dataset.json file_ending {ending!r}")
        elif _inside(root, "labelsTr", path, found):
            labels[path.name[: -len(ending)]] = path
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    images: dict[str, dict[int, Path]] = {}
    unused: list[str] = []
    for path in _entries(images_dir):
        match = pattern.match(path.name)
        if not path.name.endswith(ending):
            found.add(path, f"file ending does not match dataset.json file_ending {ending!r}")
        elif match is None:
            unused.append(path.name)
        elif match["case"] not in labels:
            unused.append(path.name)
        elif int(match["channel"]) >= k:
            declared = ", ".join(f"{i:04d}" for i in range(k))
            found.add(
                path,
                f"channel {match['channel']} is not declared in dataset.json channel_names "
                f"({k} channel{'s' * (k != 1)}: {declared})",
            )
        elif _inside(root, "imagesTr", path, found):
            images.setdefault(match["case"], {})[int(match["channel"])] = path
    if unused:
        shown = ", ".join(unused[:5]) + (f", … ({len(unused) - 5} more)" if len(unused) > 5 else "")
        found.warnings.append(
            f"{images_dir}: {len(unused)} file(s) belong to no case of labelsTr (not used): {shown}"
        )
    found.num_labels = len(labels)
    for name, label in labels.items():
        channels = images.get(name, {})
        missing = [c for c in range(k) if c not in channels]
        for c in missing:
            expected = images_dir / f"{name}_{c:04d}{ending}"
            what = "dangling symlink" if expected.is_symlink() else "file not found"
            found.add(
                expected,
                f"{what}: channel {c:04d} ({found.channels[c]}) of case {name!r} (labelsTr/{label.name})",
            )
        if not missing:
            found.cases[name] = {"images": [channels[c] for c in range(k)], "label": label}

    declared = meta.get("numTraining")
    if not isinstance(declared, int) or isinstance(declared, bool):
        found.add(
            source, f"numTraining must be the number of training cases (an integer), found {declared!r}"
        )
    elif declared != len(labels):
        found.add(source, f"numTraining is {declared} but labelsTr holds {len(labels)} case(s)")
    if not labels:
        found.add(labels_dir, f"no training case: no file ending in {ending!r}")
    return found


def nnunet_training_cases(root: str | os.PathLike, meta: dict) -> list[dict]:
    """``[{"image": path or [channel paths], "label": path, "case": name}, ...]`` of an nnU-Net dataset.

    One channel gives ``"image"`` as a single path (as in the MSD layout), several a list in channel order
    (loaded as the channels of one image).

    Raises:
        InputError: naming the first problem :func:`discover_cases` found (``medseg check-dataset`` lists all).
    """
    found = discover_cases(root, meta)
    if found.problems:
        files, cause = found.problems[0]
        more = f" (and {len(found.problems) - 1} more problem(s): medseg check-dataset {root})"
        raise InputError(f"{', '.join(files)}: {cause}{more if len(found.problems) > 1 else ''}")
    cases = []
    for name, case in found.cases.items():
        images = [str(p) for p in case["images"]]
        cases.append(
            {"image": images[0] if len(images) == 1 else images, "label": str(case["label"]), "case": name}
        )
    return cases
