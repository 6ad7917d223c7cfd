"""Unpacking an uploaded study: zip-slip, zip bombs and malformed archives are refused and leave nothing behind.

These call :mod:`rsna_cspine.report.uploads` directly; tests/test_web.py sends the same attacks over HTTP.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import pytest

from rsna_cspine.report.uploads import UploadLimits, UploadRejected, extract_study_zip, list_studies, unpack_upload
from tests.web_e2e.viewer import make_zip, renamed_member_zip, repeated_member_zip

SMALL = UploadLimits(max_unpacked_bytes=100_000, max_files=3)


def test_extract_finds_the_series_folder_and_drops_packaging_debris(tmp_path: Path) -> None:
    archive = tmp_path / "study.zip"
    archive.write_bytes(make_zip({"uid/1.dcm": b"a", "uid/2.dcm": b"b", "__MACOSX/uid/._1.dcm": b"x", "uid/.DS_Store": b"x"}))
    folder = extract_study_zip(archive, tmp_path / "out", SMALL)
    assert folder == tmp_path / "out" / "uid"
    assert sorted(p.name for p in folder.iterdir()) == ["1.dcm", "2.dcm"]
    flat = tmp_path / "flat.zip"
    flat.write_bytes(make_zip({"1.dcm": b"a"}))
    assert unpack_upload(flat, tmp_path / "flat", SMALL) == tmp_path / "flat"


@pytest.mark.parametrize(
    "members, reason, status",
    [
        ({"../evil.dcm": b"x"}, "unsafe path", 400),
        ({"uid/../../evil.dcm": b"x"}, "unsafe path", 400),
        ({"/tmp/evil.dcm": b"x"}, "unsafe path", 400),
        ({"a/1.dcm": b"x", "b/1.dcm": b"x"}, "2 folders", 400),
        ({"uid/": b""}, "no files", 400),
        ({f"uid/{k}.dcm": b"x" for k in range(4)}, "4 files; at most 3", 413),
        ({"uid/1.dcm": bytes(60_000), "uid/2.dcm": bytes(60_000)}, r"unpacks to 0.11 MB; at most 0.095 MB", 413),
    ],
)
def test_unsafe_or_ambiguous_zips_are_refused_before_anything_is_written(
    tmp_path: Path, members: dict[str, bytes], reason: str, status: int
) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(make_zip(members))
    with pytest.raises(UploadRejected, match=reason) as refused:
        extract_study_zip(archive, tmp_path / "out" / "inner", SMALL)
    assert refused.value.status == status
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.dcm").exists()


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "empty name"),  # ZipInfo.is_dir raised IndexError on it
        ("uid/" + "a" * 300 + ".dcm", "name too long"),  # the file system raised ENAMETOOLONG
        ("uid/" + "é" * 200 + ".dcm", "name too long"),  # 200 characters but 400 bytes
        ("a/" * 600 + "1.dcm", "name too long"),  # every part short, the path 1,200 bytes
    ],
)
def test_bad_member_names_are_refused_with_a_400_naming_the_problem(tmp_path: Path, name: str, reason: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(renamed_member_zip(name))
    assert zipfile.ZipFile(archive).namelist() == [name]  # the archive really holds that name
    with pytest.raises(UploadRejected, match=reason) as refused:
        unpack_upload(archive, tmp_path / "out", SMALL)
    assert refused.value.status == 400 and len(str(refused.value)) < 300
    assert not (tmp_path / "out").exists()


def test_zip_bombs_are_refused_from_the_central_directory(tmp_path: Path) -> None:
    limits = UploadLimits(max_unpacked_bytes=48 * 2**20)
    # One member of 64 MiB of zeros: ~64 kB on the wire, a ratio near 1000.
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(repeated_member_zip({"uid/1.dcm": (bytes(2**20), 64)}, level=9))
    with pytest.raises(UploadRejected, match=r"expands more than 100 times") as refused:
        unpack_upload(bomb, tmp_path / "out", UploadLimits())
    assert refused.value.status == 413 and not (tmp_path / "out").exists()
    # Many members small enough to be exempt from the ratio, together over the total bound.
    many = tmp_path / "many.zip"
    many.write_bytes(repeated_member_zip({f"uid/{k}.dcm": (bytes(2**20), 3) for k in range(20)}))
    with pytest.raises(UploadRejected, match=r"unpacks to 60 MB; at most 48 MB") as refused:
        unpack_upload(many, tmp_path / "out", limits)
    assert refused.value.status == 413 and not (tmp_path / "out").exists()
    # Just under both bounds: unpacked, every byte.
    fine = tmp_path / "fine.zip"
    fine.write_bytes(repeated_member_zip({f"uid/{k}.dcm": (bytes(2**20), 3) for k in range(15)}))
    folder = unpack_upload(fine, tmp_path / "out", limits)
    assert sum(p.stat().st_size for p in folder.iterdir()) == 45 * 2**20


def test_a_member_whose_declared_size_lies_is_stopped_at_that_size(tmp_path: Path) -> None:
    """The checks trust the central directory's sizes; a member holding more than it declares is refused."""
    data = bytearray(repeated_member_zip({"uid/1.dcm": (bytes(2**20), 32)}, level=9))
    central = data.index(b"PK\x01\x02")
    data[central + 24:central + 28] = (1000).to_bytes(4, "little")  # declared unpacked size: 1000 bytes
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    with pytest.raises(UploadRejected, match="unreadable zip") as refused:
        unpack_upload(tmp_path / "liar.zip", tmp_path / "out", UploadLimits())
    assert refused.value.status == 400 and not (tmp_path / "out").exists()


def test_randomly_damaged_zips_unpack_or_are_refused_and_never_crash(tmp_path: Path) -> None:
    """Byte flips, overwrites and truncations of a real study zip (derandomized): unpacked or a 400, nothing left."""
    good = make_zip({f"uid/{k}.dcm": bytes(range(256)) * 40 + bytes(k) for k in range(4)})
    reasons: set[str] = set()
    for seed in range(150):
        rng = random.Random(seed)
        data = bytearray(good)
        if seed % 5 == 0:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        upload = tmp_path / f"{seed}.zip"
        upload.write_bytes(bytes(data))
        out = tmp_path / f"out{seed}"
        try:
            unpack_upload(upload, out, UploadLimits())
        except UploadRejected as exc:
            assert exc.status in (400, 413) and len(str(exc)) < 400, (seed, exc)
            assert not out.exists(), seed
            reasons.add(exc.reason.split("(")[0] if exc.reason.startswith("unreadable") else exc.reason[:20])
    # The damage reached the checks of the central directory, the names, the sizes and the data.
    assert len(reasons) >= 5, reasons


def test_links_and_files_of_no_known_kind_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("uid/1.dcm")
        link.external_attr = (0o120777 << 16)  # a symbolic link member
        archive.writestr(link, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(buffer.getvalue())
    with pytest.raises(UploadRejected, match="symbolic link"):
        unpack_upload(tmp_path / "link.zip", tmp_path / "out", SMALL)
    (tmp_path / "fake.zip").write_bytes(b"DICM" * 100)
    with pytest.raises(UploadRejected, match="not a file the viewer reads: upload a .zip of one study's DICOM files"):
        unpack_upload(tmp_path / "fake.zip", tmp_path / "out", SMALL)
    assert not (tmp_path / "out").exists()


def test_study_folders_are_listed_one_or_two_levels_down(tmp_path: Path) -> None:
    for name in ("flat/1.2.3", "kaggle/test_images/1.2.4", "kaggle/test_images/1.2.5"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "1.dcm").write_bytes(b"x")
    (tmp_path / "kaggle" / "test_images" / ".hidden").mkdir()
    assert list(list_studies(tmp_path / "kaggle")) == ["test_images/1.2.4", "test_images/1.2.5"]
    assert list(list_studies(tmp_path / "flat")) == ["1.2.3"]
    assert list_studies(None) == {} and list_studies(tmp_path / "absent") == {}
