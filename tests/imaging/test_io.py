from __future__ import annotations

import gzip
import hashlib
import locale
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import (
    detect_format,
    file_sha256,
    read_image,
    write_dicom_series,
    write_image,
)


def _read_error(path: Path) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        read_image(path)
    return caught.value


def test_error_message_names_file_and_reason_and_survives_pickle() -> None:
    err = InvalidInputError("/data/a.nii.gz", "not_3d", "the image is 2-D; provide a 3-D volume")
    assert str(err) == "/data/a.nii.gz: the image is 2-D; provide a 3-D volume"
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.check, copy.reason) == (err.path, err.check, err.reason)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ct.nii.gz", "nifti"),
        ("CT.NII", "nifti"),
        ("a.mha", "mha"),
        ("a.mhd", "mha"),
        ("a.nrrd", "nrrd"),
        ("a.nhdr", "nrrd"),
    ],
)
def test_detect_format_by_suffix(name: str, expected: str) -> None:
    assert detect_format(name) == expected


def test_detect_format_directory_is_dicom_and_unknown_is_rejected(tmp_path: Path) -> None:
    assert detect_format(tmp_path) == "dicom"
    with pytest.raises(InvalidInputError) as caught:
        detect_format(tmp_path / "scan.png")
    assert caught.value.check == "unsupported_format"


def test_missing_file(tmp_path: Path) -> None:
    err = _read_error(tmp_path / "absent.nii.gz")
    assert err.check == "missing_file"
    assert "does not exist" in err.reason
    assert err.path == str(tmp_path / "absent.nii.gz")


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    err = _read_error(path)
    assert err.check == "unreadable"
    assert "empty (0 bytes)" in err.reason


def test_truncated_gzip_is_caught_although_itk_would_zero_fill(tmp_path: Path, make_image) -> None:
    path = tmp_path / "ct.nii.gz"
    write_image(make_image(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _read_error(path)
    assert err.check == "unreadable"
    assert "truncated or corrupt" in err.reason


@pytest.mark.parametrize("name", ["ct.nii", "ct.mha", "ct.nrrd"])
def test_truncated_uncompressed_or_internally_compressed_file(tmp_path: Path, make_image, name: str) -> None:
    path = tmp_path / name
    write_image(make_image(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    err = _read_error(path)
    assert err.check == "unreadable"
    assert "truncated" in err.reason


def test_nifti_whose_valid_gzip_holds_too_few_voxels(tmp_path: Path, make_image) -> None:
    write_image(make_image(), tmp_path / "full.nii")
    data = (tmp_path / "full.nii").read_bytes()
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    err = _read_error(path)
    assert err.check == "unreadable"
    assert f"holds {len(data) // 2} of the {len(data)} bytes" in err.reason


def test_garbage_file_reports_reader_message_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "noise.nii"
    path.write_bytes(b"not an image at all" * 10)
    err = _read_error(path)
    assert err.check == "unreadable"
    assert "\n" not in err.reason
    assert "NIfTI reader failed" in err.reason


def test_directory_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    err = _read_error(tmp_path)
    assert err.check == "unreadable"
    assert "no DICOM series" in err.reason


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "a.mha", "a.mhd", "a.nrrd", "a.nhdr"])
def test_file_round_trip_keeps_geometry_and_values(
    tmp_path: Path, make_image, oblique_direction, name
) -> None:
    image = make_image(spacing=(0.7, 0.8, 2.5), origin=(-10.5, 20.25, 3.0), direction=oblique_direction)
    write_image(image, tmp_path / name)
    back = read_image(tmp_path / name)
    # NIfTI stores the header in float32, hence the tolerance.
    assert Geometry.from_image(back).same_grid(Geometry.from_image(image), atol_mm=1e-4, atol_direction=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_pixel_type_is_cast_on_read(tmp_path: Path, make_image) -> None:
    write_image(make_image(), tmp_path / "a.mha")
    assert read_image(tmp_path / "a.mha", pixel_type=sitk.sitkFloat32).GetPixelID() == sitk.sitkFloat32


@pytest.mark.parametrize("oblique", [False, True])
def test_dicom_series_round_trip(tmp_path: Path, make_image, oblique_direction, oblique: bool) -> None:
    direction = oblique_direction if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    image = make_image(
        size=(9, 7, 5), spacing=(0.7, 0.8, 2.5), origin=(-12.3, 45.6, -7.8), direction=direction
    )
    write_dicom_series(image, tmp_path / "series")
    assert len(list((tmp_path / "series").iterdir())) == 5
    back = read_image(tmp_path / "series")
    assert back.GetPixelID() == sitk.sitkInt16
    assert Geometry.from_image(back).same_grid(Geometry.from_image(image), atol_mm=1e-4, atol_direction=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert detect_format(tmp_path / "series") == "dicom"


def test_dicom_writer_leaves_the_process_locale_alone(tmp_path: Path, make_image) -> None:
    """GDCM's writer switched the whole process to the "C" locale, so every text file opened later
    without an explicit encoding was ASCII-only and `kedro run` failed when it saved its report."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")  # what Python picks at start-up on a bare machine
        before = locale.setlocale(locale.LC_ALL)
        write_dicom_series(make_image(size=(6, 5, 3)), tmp_path / "series")
        assert locale.setlocale(locale.LC_ALL) == before
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_dicom_directory_with_two_series_reads_the_largest(tmp_path: Path, make_image, caplog) -> None:
    write_dicom_series(make_image(size=(6, 5, 3)), tmp_path / "small")
    write_dicom_series(make_image(size=(6, 5, 4)), tmp_path / "large")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for series in ("small", "large"):
        for item in (tmp_path / series).iterdir():
            (mixed / f"{series}_{item.name}").write_bytes(item.read_bytes())
    with caplog.at_level(logging.WARNING, logger="iris_pipelines.imaging.io"):
        image = read_image(mixed)
    assert image.GetSize() == (6, 5, 4)
    assert "2 DICOM series" in caplog.text


def test_dicom_refuses_left_handed_direction(tmp_path: Path, make_image) -> None:
    with pytest.raises(ValueError, match="right-handed"):
        write_dicom_series(make_image(direction=(1, 0, 0, 0, 1, 0, 0, 0, -1)), tmp_path / "series")
    assert not (tmp_path / "series").exists()


@pytest.mark.parametrize("name", ["a.nii.gz", "sub/dir/a.mhd"])
def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path: Path, make_image, name: str) -> None:
    write_image(make_image(), tmp_path / name)
    target = tmp_path / name
    assert target.is_file()
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


def test_failed_write_keeps_the_old_file(tmp_path: Path, make_image, monkeypatch) -> None:
    target = tmp_path / "a.nii.gz"
    write_image(make_image(), target)
    before = target.read_bytes()

    def half_write(image: sitk.Image, path: str, useCompression: bool) -> None:
        Path(path).write_bytes(b"partial")
        raise RuntimeError("sitk::ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_image(make_image(size=(3, 3, 3)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]


def test_file_sha256_of_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"second")
    (tmp_path / "d" / "a").write_bytes(b"first")
    assert file_sha256(tmp_path / "d" / "a") == hashlib.sha256(b"first").hexdigest()
    digest = file_sha256(tmp_path / "d")
    assert digest == file_sha256(tmp_path / "d")
    (tmp_path / "d" / "b").rename(tmp_path / "d" / "c")
    assert file_sha256(tmp_path / "d") != digest


def test_unverified_read_gives_the_same_image(tmp_path):
    """Preprocessing reads already-verified files without the integrity pass; the pixels must not differ."""
    image = sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    image.SetSpacing((0.7, 0.8, 2.5))
    path = tmp_path / "scan.nii.gz"
    write_image(image, path)
    verified, unverified = read_image(path), read_image(path, verify=False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(verified), sitk.GetArrayFromImage(unverified))
    assert verified.GetSpacing() == unverified.GetSpacing()
