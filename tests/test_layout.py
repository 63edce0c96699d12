"""Project layout rules: one-way imports between the library's rooms, small modules, thin ``__init__`` files,
the library never imports pipelines, the CLI imports torch lazily."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The rooms of ``medseg`` in the order data flows. A room may import its own modules and any room of an
#: earlier rank, never a later one and never another room of the same rank (losses and metrics are
#: independent). ``pipelines`` sits above all of them.
LAYERS: list[tuple[str, ...]] = [
    ("device", "io"),  # files: NIfTI, DICOM series, archives, checkpoints, atomic writes
    ("data",),  # datasets, case lists, splits, dataset checks, phantoms
    ("transforms",),  # MONAI presets, the one resampler
    ("nets",),  # networks and attention blocks, the registry
    ("config",),  # typed frozen config and option objects
    ("planning",),  # nnU-Net-style planner, fingerprint, plan files, the run's plan
    ("losses", "metrics"),
    ("export",),  # file formats: DICOM SEG, RTSTRUCT, Slicer/ITK-SNAP, organ names and codes
    ("network",),  # DICOM networking: destinations, C-STORE/STOW-RS sending, the DICOMweb pull client
    ("report",),  # what people read: previews, QA, statistics, tables, plots
    ("evaluation",),  # a folder of predictions against a folder of references
    ("inference",),  # one volume: predictor, preprocess, sliding window, TTA, restore, postprocess
    ("nnunet",),  # nnU-Net v2 model folders: plans, safe fold checkpoints, its network, its inference recipe
    ("batch",),  # the batch application: inputs, cases, outputs, manifest, sharding, re-export, review page
    ("review",),  # the review server: NiiVue viewer, verdicts in SQLite, corrections → training data
    ("node",),  # the DICOM node: Storage SCP, SQLite job store, workers that run the batch core and send
    ("engine",),  # training: loop, folds, DDP, caching, validation, ablation
    ("api",),  # the public Python API (medseg.segment, ...)
    ("testing",),  # generators for tests and demos (nothing in medseg imports them)
]
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def _room(module: str) -> str | None:
    """``medseg.nets.blocks.pan`` → ``nets``; ``pipelines.cli`` → ``pipelines``; third-party → None."""
    parts = module.split(".")
    if parts[0] == "pipelines":
        return "pipelines"
    if parts[0] != "medseg":
        return None
    return parts[1] if len(parts) > 1 else "medseg"


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_room_has_a_rank():
    rooms = {p.stem if p.is_file() else p.name for p in (ROOT / "medseg").iterdir()}
    rooms -= {"__init__", "__pycache__", "configs"}
    assert rooms == set(RANK), f"add new rooms to LAYERS: {sorted(rooms ^ set(RANK))}"


def test_imports_run_one_way():
    """No arrow runs back up the table (function-level imports count too)."""
    backwards = []
    for path in sorted((ROOT / "medseg").rglob("*.py")):
        here = _room(_module_name(path))
        if here == "medseg":  # medseg/__init__.py
            continue
        for target in _imports(path):
            there = _room(target)
            if there is None or there == here:
                continue
            if there == "medseg" and target == "medseg":  # the package itself: __version__ only
                continue
            if there == "pipelines" or there == "medseg" or RANK[there] >= RANK[here]:
                backwards.append(f"{path.relative_to(ROOT)}: {here} → {there} ({target})")
    assert not backwards, "imports that run against the layer table:\n" + "\n".join(backwards)


def test_pipelines_do_not_import_each_other_as_a_library():
    """Only the CLI module gathers the commands; a command module imports medseg, not another command."""
    offenders = []
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        if path.name in ("cli.py", "__init__.py"):
            continue
        offenders += [f"{path.name}: {t}" for t in _imports(path) if _room(t) == "pipelines"]
    assert not offenders


def test_init_files_only_hand_on_names():
    """``__init__.py``: a docstring, imports, ``__all__`` (and ``__version__``) — no functions or classes."""
    offenders = []
    for path in [*(ROOT / "medseg").rglob("__init__.py"), ROOT / "pipelines" / "__init__.py"]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue
            if isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id in ("__all__", "__version__") for t in node.targets
            ):
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {type(node).__name__}")
    assert not offenders


def test_modules_stay_small():
    big = {
        str(p.relative_to(ROOT)): n
        for p in [*ROOT.glob("medseg/**/*.py"), *ROOT.glob("pipelines/*.py")]
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not big


def _printed(code: str) -> list[str]:
    """What ``python -c code`` prints in a fresh interpreter (so ``sys.modules`` starts empty), split."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.split()


def test_cli_help_does_not_import_torch():
    assert _printed("import sys, pipelines.cli; print('torch' in sys.modules, 'monai' in sys.modules)") == [
        "False",
        "False",
    ]


def test_config_and_registry_load_without_torch():
    """Config checking (names from the registry) needs no torch: a wrong value fails instantly."""
    code = (
        "import sys; from medseg.config import load_config; load_config(None, ['model.bottleneck=pam']); "
        "import medseg.nets.registry; print('torch' in sys.modules)"
    )
    assert _printed(code) == ["False"]


@pytest.mark.parametrize(
    ("override", "valid"),
    [
        ("model.name=atention_unet", "attention_unet, unet"),
        ("model.bottleneck=pamm", "cam, dual, ema, encoding, fpa, none, pam, psa"),
        ("model.decoder_fusion=sum", "concat, gau"),
        ("model.head=reverse", "plain, reverse_attention"),
        ("optim.name=adam", "adamw, sgd"),
        ("preprocess.intensity.mode=zcore", "window, zscore"),
        ("train.device=gpu", "auto, cpu, cuda, cuda:N"),
    ],
)
def test_wrong_enumerated_value_fails_at_load_time_through_the_cli(tmp_path, override, valid):
    """`medseg train` with a bad value: exit 2, one error line with the valid names, before any data is read
    (data.root points at a folder that does not exist). Time is not asserted here (no timed tests): the
    whole command takes about 0.2 s on the 2-core machine, see the README."""
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "train", str(ROOT / "configs" / "phantoms.yaml"), "--set", override,
         "--set", f"data.root={tmp_path / 'missing'}", "--set", f"train.output={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and valid in lines[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


def test_nifti_segmentation_path_does_not_load_the_dicom_seg_stack():
    """highdicom and pydicom's SNOMED CT dictionary (~0.25 s) are imported only when a DICOM SEG is written."""
    code = (
        "import sys, medseg.batch.run, medseg.report.qa; "
        "print(any(m == 'highdicom' or m.startswith('pydicom.sr') for m in sys.modules))"
    )
    assert _printed(code) == ["False"]
