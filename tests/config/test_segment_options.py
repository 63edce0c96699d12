"""The options of ``medseg segment`` / ``medseg export`` as frozen objects (:mod:`medseg.config.segment`):
each default written once (the commands take theirs from the dataclasses), each value checked once when the
object is made (one line naming the flag), and :func:`segment_inputs` driven by them on the tiny phantoms."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medseg.batch.cases import BatchRun, SegmentReport
from medseg.batch.reexport import ExportReport
from medseg.batch.run import read_sidecar, segment_inputs
from medseg.config import ConfigError
from medseg.config.segment import ExportOptions, OutputSpec, SegmentOptions
from medseg.io.archive import ArchiveLimits
from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


# ---------------------------------------------------------------- one default, one place


def _captured(monkeypatch, module: str, name: str, report: object) -> list:
    """Replace ``module.name`` (imported by the command at call time) by a recorder returning ``report``."""
    import importlib

    calls: list = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return report

    monkeypatch.setattr(importlib.import_module(module), name, record)
    return calls


def test_segment_command_without_flags_passes_the_dataclass_defaults(monkeypatch, tmp_path):
    calls = _captured(monkeypatch, "medseg.batch.run", "segment_inputs", SegmentReport())
    result = runner.invoke(app, ["segment", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", "m.pt"])
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = calls
    assert args[3:] == (SegmentOptions(), OutputSpec())
    assert kwargs["part"].count == 1


def test_export_command_without_flags_passes_the_dataclass_defaults(monkeypatch, tmp_path):
    calls = _captured(monkeypatch, "medseg.batch.reexport", "export_outputs", ExportReport())
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 0, result.output
    ((args, _),) = calls
    assert args[1:] == (ExportOptions(),)


def test_every_flag_reaches_its_field(monkeypatch, tmp_path):
    """A non-default value for every option lands in the field of the same meaning."""
    calls = _captured(monkeypatch, "medseg.batch.run", "segment_inputs", SegmentReport())
    flags = ["--device", "cpu", "--overlap", "0.75", "--sw-batch-size", "3", "--tta", "--precision", "fp32",
             "--postprocess", "none", "--prefetch", "0", "--profile", "--output-type", "slicer,nifti",
             "--split", "--statistics", "--preview", "--attention", "--uncertainty", "--overwrite",
             "--archive-limits", "members=5"]  # fmt: skip
    result = runner.invoke(app, ["segment", "-i", str(tmp_path), "-o", str(tmp_path), "-m", "m.pt", *flags])
    assert result.exit_code == 0, result.output
    ((args, _),) = calls
    assert args[3] == SegmentOptions(
        device="cpu", overlap=0.75, sw_batch_size=3, tta=True, precision="fp32", postprocess="none",
        prefetch=0, profile=True, archive_limits=ArchiveLimits(max_members=5),
    )  # fmt: skip
    assert args[4] == OutputSpec(
        types=("slicer", "nifti"), split=True, statistics=True, preview=True, attention=True,
        uncertainty=True, overwrite=True,
    )  # fmt: skip


def test_no_option_default_is_written_in_the_commands():
    """The commands' option defaults are attribute reads of the dataclasses (``= _HOW.precision``), never
    literals — except ``None`` for the flags that are not options of the job (parts, archive caps)."""
    literal = []
    for path in (ROOT / "pipelines" / "segment.py", ROOT / "pipelines" / "export.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_command"):
                for arg, default in zip(node.args.args[::-1], node.args.defaults[::-1], strict=False):
                    if isinstance(default, ast.Constant) and default.value is not None:
                        literal.append(f"{path.name}: {arg.arg} = {default.value!r}")
    assert not literal


def test_segment_inputs_defaults_are_the_dataclasses():
    params = inspect.signature(segment_inputs).parameters
    assert params["options"].default == SegmentOptions() and params["outputs"].default == OutputSpec()
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("part", "log", "progress"))


def test_batch_run_takes_the_option_objects_and_named_arguments_only():
    params = list(inspect.signature(BatchRun).parameters.values())
    assert [p.name for p in params[:3]] == ["predictor", "options", "outputs"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])


def test_the_segment_job_has_no_function_over_eight_parameters():
    files = ["medseg/config/segment.py", "medseg/batch/run.py", "medseg/batch/cases.py",
             "medseg/batch/exports.py", "medseg/batch/outputs.py", "medseg/batch/reexport.py",
             "pipelines/export.py"]  # fmt: skip
    long = []
    for name in files:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, ast.FunctionDef):
                a = node.args
                count = len(
                    [x for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
                )
                if count > 8:
                    long.append(f"{name}:{node.lineno} {node.name} ({count})")
    assert not long


# ---------------------------------------------------------------- checked once, in one line


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SegmentOptions(precision="fp8"), "--precision 'fp8' is not valid; valid values: auto, fp32, bf16, fp16"),
        (lambda: SegmentOptions(postprocess="largest"), "--postprocess 'largest' is not valid; valid values: auto, none"),
        (lambda: SegmentOptions(postprocess=3), "--postprocess 3 is not valid; valid values: auto, none"),
        (lambda: SegmentOptions(overlap=1.0), "--overlap 1.0 is not valid; valid values: 0 <= overlap < 1"),
        (lambda: SegmentOptions(overlap=-0.1), "--overlap -0.1 is not valid; valid values: 0 <= overlap < 1"),
        (lambda: SegmentOptions(overlap=float("nan")), "--overlap nan is not valid"),
        (lambda: SegmentOptions(sw_batch_size=0), "--sw-batch-size 0 is not valid; valid values: a whole number >= 1"),
        (lambda: SegmentOptions(prefetch=2), "--prefetch 2 is not valid; valid values: 0, 1"),
        (lambda: SegmentOptions(prefetch=True), "--prefetch True is not valid; valid values: 0, 1"),
        (lambda: SegmentOptions(device="gpu"), "unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N"),
        (lambda: OutputSpec(types="nifti,stl"), "valid values (comma-separated): nifti, dicom-seg, dicom-seg-labelmap, slicer"),
        (lambda: OutputSpec(types=","), "--output-type ',' is not valid"),
        (lambda: ExportOptions(types="png"), "--output-type 'png' is not valid"),
    ],
)  # fmt: skip
def test_invalid_values_fail_when_made_in_one_line(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "fp8"], "--precision 'fp8' is not valid; valid values: auto, fp32, bf16, fp16"),
        (["--postprocess", "largest"], "--postprocess 'largest' is not valid; valid values: auto, none"),
        (["--output-type", "nifti,stl"], "--output-type 'nifti,stl' is not valid"),
        (["--overlap", "1.5"], "--overlap 1.5 is not valid; valid values: 0 <= overlap < 1"),
        (["--sw-batch-size", "-1"], "--sw-batch-size -1 is not valid"),
        (["--prefetch", "2"], "--prefetch 2 is not valid; valid values: 0, 1"),
    ],
)
def test_the_cli_prints_the_same_line_before_reading_anything(tmp_path, flags, message):
    """Exit 2, one ``error:`` line, nothing written — the checkpoint does not even exist."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", "-i", str(tmp_path), "-o", str(out), "-m", "missing.pt", *flags])
    assert result.exit_code == 2 and result.stdout == "", result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and message in line and not out.exists()


def test_options_are_frozen_and_normalised():
    how = SegmentOptions(overlap=0, postprocess={"liver": {"largest_only": True, "min_ml": 0.0}})
    assert how.overlap == 0.0 and isinstance(how.overlap, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        how.tta = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        how.postprocess["liver"] = {}  # read-only view of a copy
    assert OutputSpec(types=["slicer", "nifti", "slicer"]).types == ("slicer", "nifti")
    assert OutputSpec(types="nifti").viewer_files is False and OutputSpec(split=True).viewer_files is True
    assert ExportOptions(source_root="x").source_root == Path("x")


# ---------------------------------------------------------------- segment_inputs driven by the objects


def test_segment_inputs_with_option_objects(tiny_dataset, tiny_run, tmp_path):
    """Written with the asked outputs; the same objects again skip the complete cases; other options (TTA)
    redo them; ``overwrite`` redoes them too."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for src in sorted((tiny_dataset / "imagesTs").glob("*.nii.gz")):
        shutil.copyfile(src, inp / src.name)
    how = SegmentOptions(device="cpu", prefetch=0)
    what = OutputSpec(types="nifti,slicer", split=True, statistics=True)
    lines: list[str] = []
    first = segment_inputs(inp, out, tiny_run / "best.pt", how, what, log=lines.append)
    assert len(first.written) == 2 and not first.failed, first.failed
    assert first.statistics_csv == out / "statistics.csv" and (out / "itksnap_labels.txt").is_file()
    for mask in first.written:
        side = read_sidecar(mask)
        assert side["output_types"] == ["nifti", "slicer"] and side["split"] is True
        assert side["tta"] is False and side["precision"] in ("fp32", "bf16") and side["overlap"] == 0.25
        assert Path(side["exports"]["slicer"]).is_file() and side["exports"]["split"]
    again = segment_inputs(inp, out, tiny_run / "best.pt", how, what, log=lines.append)
    assert len(again.skipped) == 2 and not again.written
    tta = segment_inputs(inp, out, tiny_run / "best.pt", dataclasses.replace(how, tta=True), what, log=print)
    assert len(tta.written) == 2 and all(read_sidecar(m)["tta"] is True for m in tta.written)
    redo = dataclasses.replace(what, overwrite=True)
    assert len(segment_inputs(inp, out, tiny_run / "best.pt", how, redo, log=print).written) == 2
