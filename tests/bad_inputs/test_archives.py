"""Archives as untrusted input: only NIfTI and DICOM members are extracted, within caps, after every member
has been judged; every refusal is one line naming the archive (and the member).

Each archive is built at test time (zipfile, or bytes by hand where zipfile will not write it: a 2 GiB
deflate bomb in well under a second, member names that are not valid UTF-8, lying sizes, overlapping
entries). The rules are tested on :mod:`medseg.io.archive` directly; the bomb, the ratio cap, the non-UTF-8
name and a real DICOM export with junk also go through the real ``medseg segment``.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from medseg.batch.inputs import opened_cases
from medseg.data.phantoms import generate_phantom
from medseg.io import InputError
from medseg.io.archive import ArchiveLimits, Extraction, extract_zip, member_kind
from medseg.testing.dicom_series import write_ct_series
from tests.bad_inputs.cli import assert_no_temp_files, assert_one_error, run_cli

DICM = bytes(128) + b"DICM"


def _segment(archive: Path, out: Path, tiny_run: Path):
    return run_cli("segment", "-i", archive, "-o", out, "-m", tiny_run / "best.pt", "--device", "cpu")


def _series(folder: Path, patient: str = "Z"):
    ph = generate_phantom(5, (32, 32, 12), orientation="LPS")
    return write_ct_series(ph.image, ph.affine, folder, patient_id=patient)


def _ct(tiny_dataset: Path) -> Path:
    return sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]


def _zero_bomb(path: Path, name: str, size: int) -> Path:
    """A zip whose one member ``name`` is ``size`` zero bytes deflated (≈ 1030:1, what zipfile writes at level
    9), built in well under a second: 16 MiB of zeros is compressed once up to a full flush (its blocks refer
    only to themselves) and those blocks are repeated; only the CRC-32 runs over all ``size`` bytes."""
    chunk, zeros = 16 * 2**20, bytes(16 * 2**20)
    assert size % chunk == 0 and size < 2**32 - 1
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush()
    crc = 0
    for _ in range(size // chunk):
        crc = zlib.crc32(zeros, crc)
    raw, packed = name.encode(), len(piece) * (size // chunk) + len(end)
    with open(path, "wb") as fh:
        fh.write(
            struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, packed, size, len(raw), 0) + raw
        )
        for _ in range(size // chunk):
            fh.write(piece)
        fh.write(end)
        at = fh.tell()
        central = struct.pack(
            "<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, packed, size, len(raw), 0, 0, 0, 0,
            0o100644 << 16, 0,
        ) + raw  # fmt: skip
        fh.write(central)
        fh.write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(central), at, 0))
    return path


def _renamed(path: Path, old: str, new: bytes, *, utf8: bool) -> Path:
    """Give member ``old`` the raw name bytes ``new`` (same length) in its local and central headers, with
    the UTF-8 flag (0x800) set or cleared: names zipfile will not write."""
    data, name = bytearray(path.read_bytes()), old.encode()
    assert len(new) == len(name)
    for sig, flags_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        at = data.find(sig)
        while at >= 0:
            if data[at + name_at : at + name_at + len(name)] == name:
                data[at + name_at : at + name_at + len(name)] = new
                (flags,) = struct.unpack_from("<H", data, at + flags_at)
                struct.pack_into("<H", data, at + flags_at, flags | 0x800 if utf8 else flags & ~0x800)
            at = data.find(sig, at + 1)
    path.write_bytes(bytes(data))
    return path


class _Peak:
    """The largest total size of the files under ``folder``, polled every 5 ms in a thread while in use."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            total = 0
            for root, _, files in os.walk(self.folder):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(root, f)).st_size
                    except FileNotFoundError:
                        pass
            self.peak = max(self.peak, total)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------- through the CLI


def test_a_2_gib_zero_bomb_beside_a_real_case_is_never_extracted(tiny_dataset, tiny_run, tmp_path):
    """The bomb is not NIfTI or DICOM, so not a byte of it is written: the real case beside it is segmented,
    and the output folder (which holds the extraction folder) never grows past a few MB."""
    archive = _zero_bomb(tmp_path / "study.zip", "export/zeros.bin", 2 * 2**30)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.write(_ct(tiny_dataset), "export/ct.nii.gz")
    assert archive.stat().st_size < 3 * 2**20
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("export/zeros.bin").file_size == 2 * 2**30
        assert zf.open("export/zeros.bin").read(2**20) == bytes(2**20)  # a real deflate stream of zeros
    out = tmp_path / "out"
    out.mkdir()
    with _Peak(out) as disk:
        result = _segment(archive, out, tiny_run)
    assert result.code == 0, result.output
    assert "1 written, 0 failed" in result.stdout, result.output
    assert (out / "ct.nii.gz").is_file() and not list(out.rglob("zeros.bin"))
    assert disk.peak < 4 * 2**20, f"the output folder reached {disk.peak} bytes"
    assert_no_temp_files(out)


def test_a_bomb_named_as_a_dicom_input_is_refused_by_the_ratio_cap(tiny_dataset, tiny_run, tmp_path):
    """A DICOM-looking member (``DICM`` at 128) of 32 MiB of zeros expands ≈ 1000× (cap 200× above 16 MiB):
    the archive is refused in one line naming archive, member and numbers, before anything is written."""
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(_ct(tiny_dataset), "ct.nii.gz")
        with zf.open("series/IM0001.dcm", "w") as fh:
            fh.write(DICM)
            for _ in range(32):
                fh.write(bytes(2**20))
    out = tmp_path / "out"
    result = _segment(archive, out, tiny_run)
    line = assert_one_error(result, archive, "'series/IM0001.dcm'", cause="more than the 200× allowed")
    assert result.code == 2 and "32.0 MiB from" in line and "zip bomb" in line, line
    assert list(out.iterdir()) == [], "nothing extracted or written"


def test_a_member_name_that_is_not_utf8_is_one_line_naming_it(tiny_dataset, tiny_run, tmp_path):
    """UTF-8 flag set, name bytes not UTF-8: zipfile raises UnicodeDecodeError; medseg refuses the archive
    in one line naming it and the name's bytes."""
    archive = tmp_path / "bad name.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(_ct(tiny_dataset), "scanXY.nii.gz")
    _renamed(archive, "scanXY.nii.gz", b"scan\xff\xfe.nii.gz", utf8=True)
    out = tmp_path / "out"
    result = _segment(archive, out, tiny_run)
    line = assert_one_error(
        result, archive, cause="is not valid UTF-8 (the archive says it is); archive refused"
    )
    assert "member name b'scan\\xff\\xfe.nii.gz'" in line and result.code == 2, line
    assert list(out.iterdir()) == []


def test_a_dicom_export_with_junk_and_a_nested_zip_segments_its_series(tiny_dataset, tiny_run, tmp_path):
    """Positive control: a real-looking export (a series with shuffled names, README, .DS_Store, a viewer
    bundle, a nested zip, __MACOSX) segments its series; only the series is extracted."""
    written = _series(tmp_path / "series")
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as zf:
        zf.write(_ct(tiny_dataset), "ct.nii.gz")
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, path in enumerate(written.files):
            zf.write(path, f"PACS/DICOM/S1/IM{i:04d}")
        zf.writestr("PACS/README.TXT", "Exported by a PACS")
        zf.writestr("PACS/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(200))
        zf.writestr("PACS/VIEWER/viewer.exe", b"MZ" + bytes(300))
        zf.write(inner, "PACS/more.zip")
        zf.writestr("__MACOSX/PACS/._README.TXT", b"\x00\x05\x16\x07" + bytes(200))
    out = tmp_path / "out"
    result = _segment(archive, out, tiny_run)
    assert result.code == 0, result.output
    assert "1 written, 0 failed" in result.stdout and "error" not in result.output, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith(f"warning: {archive}")]
    assert len(notes) == 1 and "not read" in notes[0] and "README.TXT" in notes[0], result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "Z_20240101_1.json",
        "Z_20240101_1.nii.gz",
        "manifest.jsonl",
    ]
    assert_no_temp_files(out)


def test_archive_limits_are_an_option(tiny_dataset, tiny_run, tmp_path):
    """``--archive-limits`` overrides the defaults (here: a total far below the member's size); an unknown
    key or a bad value is one line, exit 2."""
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(_ct(tiny_dataset), "ct.nii.gz")
    base = ["segment", "-i", archive, "-o", tmp_path / "out", "-m", tiny_run / "best.pt", "--device", "cpu"]
    small = run_cli(*base, "--archive-limits", "total-gb=0.00001")
    assert small.code == 2
    assert_one_error(small, archive, "ct.nii.gz")
    for bad, cause in (("size=3", "unknown key 'size'"), ("ratio=-1", "ratio='-1' is not a positive number")):
        result = run_cli(*base, "--archive-limits", bad)
        assert result.code == 2
        assert_one_error(result, cause=cause)


# --------------------------------------------------------------------------------------- the rules


def test_members_are_classified_from_their_names_and_first_132_bytes(tmp_path):
    files = _series(tmp_path / "s").files
    archive = tmp_path / "kinds.zip"
    members = {
        "a/": "folder",
        "ct.nii.gz": "nifti",
        "ct.nii": "nifti",
        "IM0001": "dicom",  # no suffix: the magic decides
        "slice.dcm": "dicom",
        "DICOMDIR": "dicom",
        "fake.dcm": "other",  # named DICOM, no magic
        "tiny.dcm": "other",  # shorter than the magic's offset
        "README.txt": "other",
        ".DS_Store": "other",
        "__MACOSX/._ct.nii.gz": "other",  # a macOS resource fork, named like NIfTI: never read
        "inner.zip": "archive",
        "slices.tar": "archive",
        "IM0002.dcm.gz": "archive",  # gzip that is not .nii.gz
        "noname": "archive",  # a zip by its magic
        "x.7z": "archive",
    }
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in members:
            if name.endswith("/"):
                zf.writestr(name, "")
            elif name in ("IM0001", "slice.dcm"):
                zf.write(files[0], name)
            elif name == "DICOMDIR":
                zf.writestr(name, DICM + b"\x02\x00\x00\x00UL")
            elif name == "noname":
                zf.writestr(name, b"PK\x03\x04" + bytes(100))
            else:
                zf.writestr(
                    name, bytes(200) if name == "fake.dcm" else b"DICM" if name == "tiny.dcm" else b"x"
                )
    with zipfile.ZipFile(archive) as zf:
        assert {i.filename: member_kind(zf, i) for i in zf.infolist()} == members


def test_only_cases_are_extracted_and_the_rest_named_in_one_note(tiny_dataset, tmp_path):
    written = _series(tmp_path / "s")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in written.files:
            zf.write(path, f"export/dicom/{path.name}")
        zf.write(_ct(tiny_dataset), "export/ct.nii.gz")
        zf.writestr("export/deeper/old.nii.gz", "a NIfTI below the top folder is not a case")
        zf.writestr("export/._ct.nii.gz", "hidden")
        for i in range(7):
            zf.writestr(f"export/notes/{i}.txt", "junk")
        zf.writestr("export/inner.zip", b"PK\x03\x04")
    dest = tmp_path / "dest"
    dest.mkdir()
    found = extract_zip(archive, dest)
    assert isinstance(found, Extraction) and found.folder == dest / "export"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(
        found.extracted
    ) == sorted([f"export/dicom/{p.name}" for p in written.files] + ["export/ct.nii.gz"])  # fmt: skip
    assert found.note() == (
        f"{archive}: 10 member(s) not read: 7 not NIfTI or DICOM (export/notes/0.txt, export/notes/1.txt, "
        "export/notes/2.txt, export/notes/3.txt, export/notes/4.txt, … (+2 more)); 1 nested archive(s), not "
        "opened (export/inner.zip); 2 NIfTI not in the top folder, or hidden (export/._ct.nii.gz, "
        "export/deeper/old.nii.gz)"
    )
    work = tmp_path / "work"
    work.mkdir()
    with opened_cases(archive, work) as cases:
        assert sorted(c.kind for c in cases) == ["dicom", "nifti"] and cases.notes == (found.note(),)
    assert list(work.iterdir()) == []
    with opened_cases(_ct(tiny_dataset), work) as cases:
        assert cases.notes == () and len(cases) == 1


def test_an_archive_of_nested_archives_only_is_refused_naming_them(tmp_path):
    archive = tmp_path / "outer.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("series.zip", b"PK\x03\x04 inner")
        zf.writestr("README", "see series.zip")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputError) as excinfo, opened_cases(archive, work):
        pass
    assert str(excinfo.value) == (
        f"{archive}: no NIfTI (.nii, .nii.gz) or DICOM member to read; 2 member(s) not read: 1 not NIfTI or "
        "DICOM (README); 1 nested archive(s), not opened (series.zip); unpack the nested archive and pass the folder"
    )
    assert list(work.iterdir()) == []


def test_the_total_size_cap_names_archive_member_and_numbers(tmp_path):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("a.nii", "b.nii", "c.nii"):
            zf.writestr(name, os.urandom(300_000))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InputError) as excinfo:
        extract_zip(archive, dest, limits=ArchiveLimits(max_total_bytes=500_000))
    assert str(excinfo.value) == (
        f"{archive}: the NIfTI and DICOM members hold more than the 488.3 KiB allowed "
        "(ArchiveLimits.max_total_bytes): 585.9 KiB at member 'b.nii' (2 of 3); unpack it elsewhere and pass "
        "the folder"
    )
    assert list(dest.iterdir()) == []
    assert len(extract_zip(archive, dest, limits=ArchiveLimits(max_total_bytes=900_000)).extracted) == 3


def test_free_disk_is_checked_on_the_candidates_only(tmp_path, monkeypatch):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ct.nii", os.urandom(4096))
        zf.writestr("junk.bin", bytes(10**6))  # 1 MB, not extracted: does not count
    dest = tmp_path / "dest"
    dest.mkdir()
    usage = shutil.disk_usage(dest)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10_000))
    assert extract_zip(archive, dest).extracted == ("ct.nii",)
    shutil.rmtree(dest)
    dest.mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=4000))
    with pytest.raises(InputError, match=r"needs 4\.0 KiB but .*dest has 3\.9 KiB free; unpack it elsewhere"):
        extract_zip(archive, dest)
    assert list(dest.iterdir()) == []


def test_member_count_is_capped_before_and_after_the_directory_is_read(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(5):
            zf.writestr(f"{i}.nii", b"x")
    limits = ArchiveLimits(max_members=3)
    with pytest.raises(InputError, match=r"declares 5 members, more than the 3 allowed .*archive refused"):
        extract_zip(archive, tmp_path, limits=limits)
    # the end record lies (says 1): zipfile reads the whole directory anyway, and the count is checked again
    data = bytearray(archive.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, 1, 1)
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"holds 5 members, more than the 3 allowed"):
        extract_zip(archive, tmp_path, limits=limits)
    tight = ArchiveLimits(max_members=5, directory_bytes_per_member=10)
    with pytest.raises(
        InputError, match=r"central directory of 255 B, more than the 50 B allowed for 5 members"
    ):
        extract_zip(archive, tmp_path, limits=tight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.zip"]


def test_small_zero_members_pass_and_many_together_hit_the_ratio_cap(tmp_path):
    """The ratio is judged per member only above ``ratio_from_bytes`` (a 2 KB file of zeros is harmless, a
    slice of air expands 416×), and on all candidates together (thousands of small bombs)."""
    archive = tmp_path / "small.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.nii", bytes(2048))
        zf.writestr("air/IM1", DICM + bytes(512 * 1024))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert sorted(extract_zip(archive, dest).extracted) == ["air/IM1", "zeros.nii"]
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(40):
            zf.writestr(f"s/IM{i}", DICM + bytes(512 * 1024))
    shutil.rmtree(dest)
    dest.mkdir()
    with pytest.raises(InputError) as excinfo:
        extract_zip(many, dest)
    assert str(excinfo.value).startswith(f"{many}: its 40 NIfTI and DICOM members expand ")
    assert "more than the 200× allowed (a zip bomb?); archive refused" in str(excinfo.value)
    assert list(dest.iterdir()) == []


def test_declared_sizes_bound_what_zipfile_yields_and_a_lie_leaves_nothing(tmp_path):
    """zipfile's reader stops at the declared ``file_size`` (CRC patched to match: exactly that many bytes) and
    checks the CRC-32 (unpatched: BadZipFile), so declared sizes are a real bound; a refused extraction
    removes what it had already written."""
    good = _series(tmp_path / "s").files[0]
    archive = tmp_path / "lies.zip"
    body = os.urandom(2**20)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(good, "s/IM0001")
        zf.writestr("s/z.nii", body)  # NIfTI by name: not read before extraction
    data = bytearray(archive.read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # the last member's central header
    struct.pack_into("<I", data, cd + 24, 1000)  # declared uncompressed size: 1000 bytes
    archive.write_bytes(bytes(data))
    with (
        zipfile.ZipFile(archive) as zf,
        zf.open("s/z.nii") as fh,
        pytest.raises(zipfile.BadZipFile, match="CRC"),
    ):
        fh.read()
    struct.pack_into("<I", data, cd + 16, zlib.crc32(body[:1000]))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        assert len(zf.read("s/z.nii")) == 1000 and zf.open("s/z.nii").read(5000) == body[:1000]
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InputError) as excinfo:
        extract_zip(archive, dest)
    assert str(excinfo.value).startswith(f"{archive}: member 's/z.nii' cannot be extracted (Bad CRC-32")
    with zipfile.ZipFile(archive) as zf:  # a DICOM member is refused the same way, when its magic is read
        assert member_kind(zf, zf.getinfo("s/IM0001")) == "dicom"
    assert list(dest.iterdir()) == [], "the member extracted before the failure was removed again"


def test_overlapping_entries_and_unreadable_methods_are_refused(tmp_path):
    archive = tmp_path / "overlap.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.nii", bytes(2**20))
    data = archive.read_bytes()
    cd, end = data.rfind(b"PK\x01\x02"), data.rfind(b"PK\x05\x06")
    twin = data[cd:end].replace(b"a.nii", b"b.nii")  # a second entry for the same local header and data
    directory = data[cd:end] + twin
    eocd = bytearray(data[end:])
    struct.pack_into("<HHI", eocd, 8, 2, 2, len(directory))
    archive.write_bytes(data[:cd] + directory + bytes(eocd))
    with pytest.raises(
        InputError, match=r"member 'a.nii' declares \d+ compressed bytes but only 0 lie before"
    ):
        extract_zip(archive, tmp_path)
    method = tmp_path / "deflate64.zip"
    with zipfile.ZipFile(method, "w") as zf:
        zf.writestr("ct.nii", b"x" * 100)
    data = bytearray(method.read_bytes())
    for at, offset in ((data.find(b"PK\x03\x04"), 8), (data.rfind(b"PK\x01\x02"), 10)):
        struct.pack_into("<H", data, at + offset, 9)  # Deflate64, which zipfile cannot read
    method.write_bytes(bytes(data))
    with pytest.raises(
        InputError, match=r"member 'ct.nii' uses compression method 9, which medseg cannot read"
    ):
        extract_zip(method, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deflate64.zip", "overlap.zip"]


def test_cp437_names_with_odd_characters_extract_inside_the_folder(tmp_path):
    """Without the UTF-8 flag names are cp437: bytes ≥ 0x80 and control characters decode to odd characters
    and the member still lands inside the folder under its decoded name."""
    dicom = _series(tmp_path / "s").files[0]
    archive = tmp_path / "cp437.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(dicom, "SerieX/IMXXX")
    _renamed(archive, "SerieX/IMXXX", b"S\x82rie\x81/IM\x07\xe9\xff", utf8=False)
    dest = tmp_path / "dest"
    dest.mkdir()
    found = extract_zip(archive, dest)
    name = b"S\x82rie\x81/IM\x07\xe9\xff".decode("cp437")
    assert found.extracted == (name,) and name == "Série\u00fc/IM\x07Θ\u00a0"
    (path,) = [p for p in dest.rglob("*") if p.is_file()]
    assert path == dest / name and path.resolve().is_relative_to(dest.resolve())
    assert path.read_bytes() == dicom.read_bytes()
