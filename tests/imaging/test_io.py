from __future__ import annotations

import gzip
import hashlib
import locale
import logging
import pickle
import struct
from pathlib import Path

import nibabel
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
    write_text_atomic,
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


@pytest.mark.parametrize(
    ("values", "pixel_type", "problem"),
    [
        ([0.0, 1.0, 300.0], sitk.sitkUInt8, r"values 0\.\.300 do not fit 8-bit unsigned"),
        ([-1.0, 1.0, 2.0], sitk.sitkUInt8, r"values -1\.\.2 do not fit"),
        ([0.0, 1.5, 2.0], sitk.sitkInt16, r"1 voxel\(s\) are not whole numbers \(e\.g\. 1\.5\) and would be"),
        # :g printed 1.0000001 as "1", hiding why it is not whole.
        ([0.0, 1.0000001, 2.0], sitk.sitkInt16, r"whole numbers \(e\.g\. 1\.0000001192092896\)"),
        ([0.0, np.nan, 2.0], sitk.sitkInt16, r"non-finite voxels \(1 NaN"),
        ([0.0, np.inf, 2.0], sitk.sitkUInt8, r"non-finite voxels \(0 NaN, 1 infinite"),
    ],
)
@pytest.mark.parametrize("name", ["a.mha", "a.nrrd"])
def test_a_cast_on_read_that_would_change_values_is_refused(
    tmp_path: Path, make_image, name: str, values: list, pixel_type: int, problem: str
) -> None:
    """ITK's cast wraps 300 to 44 in uint8, truncates 1.5 and turns NaN into 0: the file is named instead."""
    array = np.zeros((2, 2, 3), np.float32)
    array[0, 0, :] = values
    write_image(make_image(array), tmp_path / name)
    with pytest.raises(InvalidInputError, match=problem) as caught:
        read_image(tmp_path / name, pixel_type=pixel_type)
    assert caught.value.path == str(tmp_path / name)
    whole = np.nan_to_num(np.rint(np.clip(array, 0, 255)), posinf=255)
    write_image(make_image(whole), tmp_path / name)
    cast = read_image(tmp_path / name, pixel_type=pixel_type)  # values that fit are cast exactly
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(cast), whole)


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


def _uids(series: Path) -> list[tuple[str, str, str]]:
    """(study, series, instance) UID of each slice file, in file order."""
    reader = sitk.ImageFileReader()
    uids = []
    for path in sorted(series.iterdir()):
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        uids.append(tuple(reader.GetMetaData(tag).strip() for tag in ("0020|000d", "0020|000e", "0008|0018")))
    return uids


def test_dicom_series_with_a_uid_seed_is_byte_identical(tmp_path: Path, make_image) -> None:
    """Phantom series got random UIDs and the time of writing, so the same seed gave other checksums."""
    image = make_image(size=(6, 5, 3))
    for name in ("first", "again"):
        write_dicom_series(image, tmp_path / name, uid_seed="seed 7/TrunkCT/trunk_000")
    write_dicom_series(image, tmp_path / "other", uid_seed="seed 8/TrunkCT/trunk_000")
    assert file_sha256(tmp_path / "first") == file_sha256(tmp_path / "again")
    first, other = _uids(tmp_path / "first"), _uids(tmp_path / "other")
    assert {study for study, _, _ in first} != {study for study, _, _ in other}
    assert len({instance for _, _, instance in first}) == 3, "every slice needs its own instance UID"
    assert all(len(uid) <= 64 and uid.replace(".", "").isdigit() for row in first + other for uid in row)


def test_dicom_series_without_a_uid_seed_gets_unique_uids(tmp_path: Path, make_image) -> None:
    image = make_image(size=(6, 5, 3))
    write_dicom_series(image, tmp_path / "first")
    write_dicom_series(image, tmp_path / "second")
    first, second = _uids(tmp_path / "first"), _uids(tmp_path / "second")
    assert len({(study, series) for study, series, _ in first}) == 1, "one study and series per call"
    assert not {uid for row in first for uid in row} & {uid for row in second for uid in row}


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


def test_dicom_directory_with_two_series_of_the_most_slices_is_refused(tmp_path: Path, make_image) -> None:
    """Two series of one slice count: which one was read depended on GDCM's order, without a word."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    uids = []
    for series in ("first", "second", "small"):
        write_dicom_series(make_image(size=(6, 5, 3 if series == "small" else 4)), tmp_path / series)
        uids.append(_uids(tmp_path / series)[0][1])
        for item in (tmp_path / series).iterdir():
            (mixed / f"{series}_{item.name}").write_bytes(item.read_bytes())
    error = _read_error(mixed)
    assert (error.check, error.path) == ("several_series", str(mixed))
    assert "holds 3 DICOM series, 2 of them with the most slices (4)" in error.reason
    assert uids[0] in error.reason and uids[1] in error.reason and uids[2] not in error.reason
    assert "move each series into its own folder" in error.reason


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


def test_outputs_are_readable_by_the_group_like_any_file_the_user_writes(
    tmp_path: Path, make_image, group_umask
) -> None:
    """On a shared project the team reads each other's outputs: the atomic writers' scratch files must not
    leave their private modes behind."""
    write_text_atomic(tmp_path / "report.md", "# report\n")
    write_image(make_image(), tmp_path / "scan.mhd")  # header and data file
    write_dicom_series(make_image(), tmp_path / "series")
    group_umask(tmp_path / "report.md", tmp_path / "scan.mhd", tmp_path / "scan.zraw", tmp_path / "series")


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


@pytest.mark.parametrize(("oblique", "slices", "lost"), [(False, 8, 3), (True, 8, 3), (False, 4, 2)])
def test_dicom_series_with_a_missing_slice_is_refused(
    tmp_path: Path, make_image, oblique_direction, oblique: bool, slices: int, lost: int
) -> None:
    """ITK would stack the remaining slices on one averaged step, shifting everything after the gap. The
    message names the gap, also when only two steps are left to compare (4 slices, one lost)."""
    direction = oblique_direction if oblique else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    image = make_image(
        size=(9, 7, slices), spacing=(0.7, 0.8, 2.5), origin=(-12.3, 45.6, -7.8), direction=direction
    )
    series = tmp_path / "series"
    write_dicom_series(image, series)
    (series / f"slice_{lost:04d}.dcm").unlink()  # lost in transfer
    err = _read_error(series)
    assert (err.check, err.path) == ("non_uniform_slices", str(series))
    before, after = f"slice_{lost - 1:04d}.dcm", f"slice_{lost + 1:04d}.dcm"
    assert f"slice gap of 5 mm between slices {lost} and {lost + 1} ({before}, {after})" in err.reason
    assert "where the others are 2.5 mm" in err.reason and "a slice is missing" in err.reason


def test_dicom_series_missing_its_last_slice_still_reads(tmp_path: Path, make_image) -> None:
    """A series cut short at an end is still evenly spaced: a valid (shorter) scan, not a gap."""
    image = make_image(size=(9, 7, 6), spacing=(0.7, 0.8, 2.5))
    write_dicom_series(image, tmp_path / "series")
    (tmp_path / "series" / "slice_0005.dcm").unlink()
    back = read_image(tmp_path / "series")
    assert back.GetSize() == (9, 7, 5) and back.GetSpacing()[2] == pytest.approx(2.5)


@pytest.mark.parametrize(("name", "data"), [("a.mhd", "a.raw"), ("a.nhdr", "a.raw"), ("c.mhd", "c.zraw")])
def test_checksum_of_a_detached_header_covers_its_voxels(tmp_path: Path, make_image, name, data) -> None:
    """A re-export with new voxels and the same header must change the checksum, or the preprocessing
    cache (keyed by it) serves the old voxels."""
    compress = data.endswith("zraw")
    write_image(make_image(), tmp_path / name, compress=compress)
    header, before = (tmp_path / name).read_bytes(), file_sha256(tmp_path / name)
    rng = np.random.default_rng(1)
    changed = make_image(rng.integers(-1000, 1500, size=(8, 10, 12), dtype=np.int16))
    write_image(changed, tmp_path / name, compress=compress)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, data})
    if not compress:
        assert (tmp_path / name).read_bytes() == header  # only the data file differs
    assert file_sha256(tmp_path / name) != before
    assert file_sha256(tmp_path / name) == file_sha256(tmp_path / name)


def test_checksum_of_a_file_with_embedded_voxels_is_the_file_hash(tmp_path: Path, make_image) -> None:
    for name in ("a.mha", "a.nrrd", "a.nii.gz"):
        write_image(make_image(), tmp_path / name)
        assert file_sha256(tmp_path / name) == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def _slice_files(tmp_path: Path, names: list[str]) -> np.ndarray:
    """Two 3×4 int16 slices, one raw file each."""
    volume = np.arange(24, dtype="<i2").reshape(2, 3, 4)
    for name, plane in zip(names, volume, strict=True):
        (tmp_path / name).write_bytes(plane.tobytes())
    return volume


_MHD_LIST = """ObjectType = Image
NDims = 3
BinaryData = True
BinaryDataByteOrderMSB = False
CompressedData = False
ElementSpacing = 1 1 2
DimSize = 4 3 2
ElementType = MET_SHORT
ElementDataFile = {files}
"""
_NHDR_LIST = """NRRD0004
type: short
dimension: 3
sizes: 4 3 2
endian: little
encoding: raw
data file: {files}
"""


@pytest.mark.parametrize(
    ("name", "template", "files"),
    [
        ("list.mhd", _MHD_LIST, "LIST\ns_01.raw\ns_02.raw"),
        ("pattern.mhd", _MHD_LIST, "s_%02d.raw 1 2 1"),
        ("list.nhdr", _NHDR_LIST, "LIST\ns_01.raw\ns_02.raw"),
        ("pattern.nhdr", _NHDR_LIST, "s_%02d.raw 1 2 1"),
    ],
)
def test_checksum_and_reading_of_one_data_file_per_slice(tmp_path: Path, name, template, files) -> None:
    volume = _slice_files(tmp_path, ["s_01.raw", "s_02.raw"])
    header = tmp_path / name
    header.write_text(template.format(files=files))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(header)), volume)
    before = file_sha256(header)
    (tmp_path / "s_02.raw").write_bytes(volume[0].tobytes())  # the second slice re-exported
    assert file_sha256(header) != before
    (tmp_path / "s_02.raw").unlink()
    for err in (_read_error(header), pytest.raises(InvalidInputError, file_sha256, header).value):
        assert (err.check, err.path) == ("missing_file", str(header))
        assert "the data file s_02.raw" in err.reason and str(tmp_path / "s_02.raw") in err.reason


@pytest.mark.parametrize(("name", "data"), [("a.mhd", "a.zraw"), ("a.nhdr", "a.raw.gz"), ("b.mhd", "b.raw")])
def test_missing_data_file_of_a_detached_header_is_named(tmp_path: Path, make_image, name, data) -> None:
    """ITK reported "No such file or directory" for the header, which exists, and never named the data."""
    write_image(make_image(), tmp_path / name, compress=not data.endswith(".raw"))
    (tmp_path / data).unlink()
    err = _read_error(tmp_path / name)
    assert (err.check, err.path) == ("missing_file", str(tmp_path / name))
    assert f"the data file {data} that the header's" in err.reason and str(tmp_path / data) in err.reason
    assert "No such file" not in err.reason


@pytest.mark.parametrize(
    ("name", "compress", "where", "kind"),
    [
        ("a.mha", False, "the file", "voxel bytes"),
        ("a.mhd", False, "the data file a.raw", "voxel bytes"),
        ("a.mha", True, "the file", "compressed voxel bytes"),
    ],
)
def test_truncated_metaimage_reports_the_byte_count(
    tmp_path: Path, make_image, name, compress, where, kind
) -> None:
    """ITK reported a stale "No such file or directory" for a file that exists."""
    write_image(make_image(size=(20, 20, 20)), tmp_path / name, compress=compress)
    data = tmp_path / ("a.raw" if name == "a.mhd" else name)
    data.write_bytes(data.read_bytes()[:-100])
    err = _read_error(tmp_path / name)
    assert (err.check, err.path) == ("unreadable", str(tmp_path / name))
    assert f"{where} is truncated: it holds" in err.reason and f"{kind} its header declares" in err.reason
    if not compress:  # 20³ int16 voxels
        assert "holds 15900 of the 16000 voxel bytes" in err.reason
    assert "No such file" not in err.reason


def _sheared_direction() -> tuple[float, ...]:
    """A gantry-tilted CT: the slice axis leans 20° towards y, so the axes are not perpendicular."""
    direction = np.eye(3)
    direction[:, 2] = [0.0, np.sin(np.deg2rad(20.0)), np.cos(np.deg2rad(20.0))]
    return tuple(direction.ravel())


def test_nifti_refuses_a_sheared_direction_that_mha_and_nrrd_keep(tmp_path: Path, make_image) -> None:
    """ITK's NIfTI writer straightens a sheared direction without error, moving the voxels (8 mm for a
    mask in the audit); MetaImage and NRRD store the direction as it is."""
    image = make_image(spacing=(1.0, 1.0, 3.0), direction=_sheared_direction())
    with pytest.raises(InvalidInputError) as caught:
        write_image(image, tmp_path / "mask.nii.gz")
    assert (caught.value.check, caught.value.path) == (
        "non_orthogonal_direction",
        str(tmp_path / "mask.nii.gz"),
    )
    assert "sheared" in caught.value.reason and ".mha or .nrrd" in caught.value.reason
    assert list(tmp_path.iterdir()) == []
    for name in ("mask.mha", "mask.nrrd"):
        write_image(image, tmp_path / name)
        assert Geometry.from_image(read_image(tmp_path / name)).same_grid(Geometry.from_image(image))


def test_dicom_refuses_a_sheared_direction(tmp_path: Path, make_image) -> None:
    with pytest.raises(ValueError, match="sheared.*write .mha or .nrrd"):
        write_dicom_series(make_image(direction=_sheared_direction()), tmp_path / "series")
    assert not (tmp_path / "series").exists()


def test_dicom_refuses_a_single_slice(tmp_path: Path, make_image) -> None:
    """One slice cannot record its slice spacing: it read back as 1 mm instead of 4 mm."""
    with pytest.raises(ValueError, match="at least 2 slices"):
        write_dicom_series(make_image(size=(6, 5, 1), spacing=(0.7, 1.3, 4.0)), tmp_path / "series")
    assert not (tmp_path / "series").exists()
    write_dicom_series(make_image(size=(6, 5, 2), spacing=(0.7, 1.3, 4.0)), tmp_path / "two")
    assert read_image(tmp_path / "two").GetSpacing()[2] == pytest.approx(4.0)


@pytest.mark.parametrize("name", ["scan.mha", "scan.nrrd", "scan.mhd"])
def test_non_finite_voxels_are_refused_whatever_the_format(tmp_path: Path, name: str) -> None:
    """Checking only resampled voxels accepted or refused the same scan depending on the target spacing."""
    values = np.full((12, 12, 12), 40.0, dtype=np.float32)
    values[4:6, 4:6, 4:6] = np.nan
    values[0, 0, 0] = np.inf
    write_image(sitk.GetImageFromArray(values), tmp_path / name)
    err = _read_error(tmp_path / name)
    assert (err.check, err.path) == ("non_finite", str(tmp_path / name))
    assert "9 non-finite voxels (8 NaN, 1 infinite) out of 1728" in err.reason
    assert np.isnan(sitk.GetArrayViewFromImage(read_image(tmp_path / name, verify=False))).sum() == 8


def _place_slices(series: Path, heights: list[float]) -> None:
    """Move slice k of ``series`` to height ``heights[k]`` mm (Image Position (Patient)), other tags kept."""
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches the process to the "C" locale
    try:
        reader, writer = sitk.ImageFileReader(), sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for path, height in zip(sorted(series.iterdir()), heights, strict=True):
            reader.SetFileName(str(path))
            image = reader.Execute()
            for key in reader.GetMetaDataKeys():
                image.SetMetaData(key, reader.GetMetaData(key))
            image.SetMetaData("0020|0032", f"0\\0\\{height}")
            image.SetMetaData("0020|1041", str(height))
            writer.SetFileName(str(path))
            writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@pytest.mark.parametrize(
    ("heights", "sharing", "positions"),
    [
        ([0.0] * 6, 6, 1),
        ([0.0, 0.0], 2, 1),
        ([0.0, 2.5, 2.5, 5.0, 7.5, 10.0], 2, 1),
        ([0.0, 0.0, 2.5, 5.0, 5.0, 7.5], 4, 2),
    ],
)
def test_dicom_series_with_slices_at_one_position_is_refused(
    tmp_path: Path, make_image, heights: list[float], sharing: int, positions: int
) -> None:
    """Slices sharing one position (cine phases, repeats) were stacked on an invented 1 mm step when all
    did, on a wrong averaged step when some did, and a 2-slice series was not checked at all."""
    series = tmp_path / "series"
    write_dicom_series(make_image(size=(9, 7, len(heights)), spacing=(0.7, 0.8, 2.5)), series)
    _place_slices(series, heights)
    err = _read_error(series)
    assert (err.check, err.path) == ("coincident_slices", str(series))
    assert f"{sharing} of the series' {len(heights)} slices share a position with another" in err.reason
    assert f"({positions} position(s) hold several slices" in err.reason
    assert "export each on its own" in err.reason


@pytest.mark.parametrize("name", ["seg.mha", "seg.nii.gz"])
def test_non_finite_voxels_of_a_label_are_named_a_label_problem(tmp_path: Path, name: str) -> None:
    """A NaN in a label map was reported as the image check (non_finite, "the image has 1 non-finite
    voxels"), so the documented non_finite_label check never fired."""
    values = np.zeros((6, 6, 6), dtype=np.float32)
    values[2:4, 2:4, 2:4] = 1.0
    values[0, 0, :2] = [np.nan, np.inf]
    write_image(sitk.GetImageFromArray(values), tmp_path / name)
    with pytest.raises(InvalidInputError) as caught:
        read_image(tmp_path / name, is_label=True)
    assert (caught.value.check, caught.value.path) == ("non_finite_label", str(tmp_path / name))
    assert "the label holds 2 NaN/infinite values (1 NaN, 1 infinite) out of 216" in caught.value.reason
    assert _read_error(tmp_path / name).check == "non_finite"  # the same file read as an image


def _write_slices(
    series: Path,
    positions: np.ndarray,
    direction: np.ndarray,
    *,
    numbers: list[int] | None = None,
    pixel: tuple[float, float] = (0.8, 0.8),
) -> None:
    """Write one CT slice file per Image Position in ``positions`` (slice k as ``s{k:03d}.dcm``, instance
    number ``numbers[k]``), all with the row and column cosines of ``direction``'s first two columns."""
    series.mkdir()
    numbers = numbers or list(range(1, len(positions) + 1))
    orientation = "\\".join(f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1]))
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches the process to the "C" locale
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k, (position, number) in enumerate(zip(positions, numbers, strict=True)):
            image = sitk.GetImageFromArray(np.full((12, 14), 10 * k, np.int16))
            image.SetSpacing(pixel)
            tags = {
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0060": "CT",
                "0020|000d": "1.2.3.4",
                "0020|000e": "1.2.3.4.5",
                "0020|0037": orientation,
                "0028|0030": f"{pixel[1]}\\{pixel[0]}",
                "0018|0050": "2.5",
                "0020|0032": "\\".join(f"{v:.4f}" for v in position),  # 4 decimals, as scanners round
                "0020|0013": str(number),
                "0008|0018": f"1.2.3.4.5.{k}",
            }
            for tag, value in tags.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(series / f"s{k:03d}.dcm"))
            writer.Execute(image)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _tilted_positions(direction: np.ndarray, slices: int, step: float, tilt_degrees: float) -> np.ndarray:
    """Image Positions of a CT acquired with its gantry tilted by ``tilt_degrees``: each slice sits ``step``
    further along the normal and ``step * tan(tilt)`` further along the column direction."""
    start = np.array([-50.0, -40.0, 10.0])
    sideways = step * np.tan(np.deg2rad(tilt_degrees))
    return np.array(
        [start + k * (step * direction[:, 2] + sideways * direction[:, 1]) for k in range(slices)]
    )


@pytest.mark.parametrize(
    ("oblique", "slices", "tilt", "shown"),
    [(False, 10, 20.0, "20°"), (True, 10, 20.0, "20°"), (False, 40, 0.12, "0.12°")],
    ids=["axis-aligned", "oblique", "creeping"],
)
def test_dicom_series_with_a_gantry_tilt_is_refused(
    tmp_path: Path, oblique_direction, oblique: bool, slices: int, tilt: float, shown: str
) -> None:
    """ITK stacked a tilted series straight along the slice normal, dropping the sideways shift of each
    slice: 8 mm off after ten 2.5 mm slices at 20°. A creeping tilt (0.005 mm per slice) is caught by the
    offset it accumulates."""
    direction = np.reshape(oblique_direction, (3, 3)) if oblique else np.eye(3)
    series = tmp_path / "tilted"
    _write_slices(series, _tilted_positions(direction, slices, 2.5, tilt), direction)
    err = _read_error(series)
    assert (err.check, err.path) == ("gantry_tilt", str(series))
    assert str(err).startswith(f"{series}: ")
    assert f"a gantry tilt of {shown}" in err.reason
    assert "convert the series with dcm2niix, which corrects gantry tilt" in err.reason


@pytest.mark.parametrize("oblique", [False, True])
@pytest.mark.parametrize(
    "numbers",
    [None, [8, 7, 6, 5, 4, 3, 2, 1], [3, 4, 9, 10, 11, 30, 31, 40]],
    ids=["in order", "numbered in reverse", "uneven numbers"],
)
def test_untilted_dicom_series_read_where_dicom_places_them(
    tmp_path: Path, oblique_direction, oblique: bool, numbers: list[int] | None
) -> None:
    """The tilt check leaves ordinary series alone: axis-aligned or oblique, whatever their numbering,
    with positions rounded to 4 decimals; each voxel lands where its slice's Image Position puts it."""
    direction = np.reshape(oblique_direction, (3, 3)) if oblique else np.eye(3)
    positions = _tilted_positions(direction, 8, 2.5, 0.0)
    series = tmp_path / "series"
    _write_slices(series, positions, direction, numbers=numbers)
    image = read_image(series)
    assert image.GetSize() == (14, 12, 8) and image.GetSpacing()[2] == pytest.approx(2.5, abs=1e-3)
    values = sitk.GetArrayViewFromImage(image)
    for k in range(8):
        written = int(values[k, 0, 0]) // 10  # slice k of the file list holds 10 * k
        expected = positions[written] + 5 * 0.8 * direction[:, 0] + 7 * 0.8 * direction[:, 1]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((5, 7, k)), expected, atol=1e-3)


def _nifti_nibabel_refuses(path: Path, problem: str) -> None:
    """A float32 NIfTI with NaN voxels whose header nibabel refuses but ITK reads."""
    values = np.ones((6, 7, 8), np.float32)
    values[2:4, 2:4, 2:4] = np.nan
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image = nibabel.Nifti1Image(values, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1 if problem == "nan intercept" else 0)
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    nibabel.save(image, path)
    header = bytearray(gzip.decompress(path.read_bytes()))
    if problem == "nan intercept":
        header[116:120] = struct.pack("<f", np.nan)  # scl_inter
    else:
        header[256:268] = struct.pack("<3f", 0.8, 0.8, 0.0)  # quatern_b, c, d: longer than a unit quaternion
    path.write_bytes(gzip.compress(bytes(header)))


@pytest.mark.parametrize(
    ("problem", "reason"),
    [("nan intercept", "Valid slope but invalid intercept nan"), ("quaternion", "w2 should be positive")],
    ids=["nan-intercept", "bad-quaternion"],
)
@pytest.mark.parametrize(("verify", "is_label"), [(True, False), (True, True), (False, False)])
def test_nifti_header_that_nibabel_refuses_is_refused(
    tmp_path: Path, problem: str, reason: str, verify: bool, is_label: bool
) -> None:
    """With a NaN scl_inter nibabel refused the header, so the NIfTI checks returned quietly and ITK read
    the NaN voxels as 0 with no error; a qform nibabel cannot compute was read as ITK renormalised it."""
    path = tmp_path / "scan.nii.gz"
    _nifti_nibabel_refuses(path, problem)
    with pytest.raises(InvalidInputError) as caught:
        read_image(path, verify=verify, is_label=is_label)
    assert (caught.value.check, caught.value.path) == ("unreadable", str(path))
    assert caught.value.reason.startswith("the NIfTI header is invalid: nibabel refuses it (")
    assert reason in caught.value.reason


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _oblique_sform(sizes: tuple[float, float, float] = (0.9, 0.9, 2.0), shear: bool = False) -> np.ndarray:
    """A RAS affine turned 15° about z (or, with ``shear``, with its slice axis leaning 15° towards y)."""
    turn = np.deg2rad(15.0)
    if shear:
        axes = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, np.sin(turn)], [0.0, 0.0, np.cos(turn)]])
    else:
        axes = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = axes @ np.diag(sizes)
    affine[:3, 3] = [-10.0, -18.0, -2.0]
    return affine


def _nifti_with_forms(
    path: Path,
    *,
    sform: np.ndarray | None,
    qform: np.ndarray | None = None,
    zooms: tuple[float, float, float] | None = None,
    patch: dict[int, float] | None = None,
) -> Path:
    """A NIfTI placed by ``sform`` and/or ``qform`` (code 0 where None), with pixdim set to ``zooms`` (by
    default the placement's voxel sizes), then each pixdim[index] of the stored header overwritten as
    ``patch`` says (nibabel refuses to write a negative voxel size itself)."""
    image = nibabel.Nifti1Image(np.zeros((26, 26, 12), np.float32), None)
    image.set_qform(qform, code=0 if qform is None else 1)
    image.set_sform(sform, code=0 if sform is None else 1)
    placed = sform if sform is not None else qform
    image.header.set_zooms(zooms or tuple(np.linalg.norm(placed[:3, :3], axis=0)))
    nibabel.save(image, path)
    if patch:
        header = bytearray(gzip.decompress(path.read_bytes()))
        for index, value in patch.items():
            header[76 + 4 * index : 80 + 4 * index] = struct.pack("<f", value)  # pixdim[index]
        path.write_bytes(gzip.compress(bytes(header)))
    return path


@pytest.mark.parametrize("verify", [True, False])
def test_sform_only_nifti_whose_pixdim_disagree_is_refused(tmp_path: Path, verify: bool) -> None:
    """With no qform, ITK took the spacing from pixdim (1 mm) and only the direction from the sform
    (0.9 x 0.9 x 2 mm), so a mask written from it lay up to 11 mm off its scan in nibabel, FSL and viewers."""
    path = _nifti_with_forms(tmp_path / "scan.nii.gz", sform=_oblique_sform(), zooms=(1.0, 1.0, 1.0))
    with pytest.raises(InvalidInputError) as caught:
        read_image(path, verify=verify)
    error = caught.value
    assert (error.check, error.path) == ("pixdim_mismatch", str(path))
    assert str(error).startswith(f"{path}: the sform (code 1), which alone places the voxels (qform code 0)")
    assert "has voxel sizes (0.9, 0.9, 2) but the header's pixdim says (1, 1, 1)" in error.reason
    assert "place the voxels up to 11.5" in error.reason
    assert "img.header.set_zooms((0.9, 0.9, 2))" in error.reason
    assert "img.set_qform(img.get_sform(), code=1)" in error.reason


def test_sform_only_nifti_whose_pixdim_agree_reads_where_nibabel_places_it(tmp_path: Path) -> None:
    """The check leaves a consistent sform-only file alone: ITK's spacing and every voxel's world position
    are nibabel's (RAS turned into ITK's LPS)."""
    affine = _oblique_sform()
    path = _nifti_with_forms(tmp_path / "scan.nii.gz", sform=affine, zooms=(0.9, 0.9, 2.0))
    image = read_image(path)
    assert image.GetSpacing() == pytest.approx((0.9, 0.9, 2.0), abs=1e-6)
    nib_affine = nibabel.load(path).affine
    for index in [(0, 0, 0), (25, 0, 0), (0, 25, 11), (25, 25, 11), (7, 19, 5)]:
        expected = _RAS_TO_LPS @ (nib_affine @ [*index, 1.0])[:3]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), expected, atol=1e-4)


def test_sform_only_nifti_with_a_sheared_sform_is_refused_as_sheared(tmp_path: Path) -> None:
    """ITK cannot read a sheared sform with no qform beside it: it failed with "No orthonormal definition
    found", reported as a file that "may be truncated, corrupt or not a valid NIfTI file"."""
    sform = _oblique_sform(shear=True)
    path = _nifti_with_forms(tmp_path / "scan.nii.gz", sform=sform, zooms=(0.9, 0.9, 2.0))
    error = _read_error(path)
    assert (error.check, error.path) == ("non_orthogonal_direction", str(path))
    assert "the sform (code 1), which alone places the voxels (qform code 0), is sheared" in error.reason
    assert ".nrrd or .mha" in error.reason and "corrupt" not in error.reason


def test_sform_only_nifti_with_a_zero_voxel_size_is_named_so_not_sheared(tmp_path: Path) -> None:
    """An sform whose second column is all zeros was reported as "sheared", with advice to resample."""
    sform = _oblique_sform()
    sform[:3, 1] = 0.0
    path = _nifti_with_forms(tmp_path / "scan.nii.gz", sform=sform, zooms=(0.9, 0.9, 2.0))
    error = _read_error(path)
    assert (error.check, error.path) == ("bad_geometry", str(path))
    assert "gives voxel axis j a size of 0 mm" in error.reason and "sheared" not in error.reason
    assert "fix the header's placement" in error.reason


@pytest.mark.parametrize("forms", ["qform", "sform", "both"])
def test_nifti_with_a_negative_voxel_size_is_refused(tmp_path: Path, forms: str) -> None:
    """ITK read an axis with a negative pixdim mirrored whichever form placed the voxels, while nibabel
    took its absolute value: the far corner of this scan lay 45 mm apart in the two."""
    affine = _oblique_sform()
    path = _nifti_with_forms(
        tmp_path / "scan.nii.gz",
        sform=None if forms == "qform" else affine,
        qform=None if forms == "sform" else affine,
        patch={1: -0.9},
    )
    error = _read_error(path)
    assert (error.check, error.path) == ("pixdim_mismatch", str(path))
    assert "the header's voxel sizes (pixdim) (-0.9, 0.9, 2) are negative in pixdim[1]" in error.reason


def test_qform_only_nifti_with_a_qfac_neither_1_nor_minus_1_is_refused(tmp_path: Path) -> None:
    """A qfac of -0.5: ITK took its sign and mirrored the slice axis, nibabel read it as 1."""
    path = _nifti_with_forms(tmp_path / "scan.nii.gz", sform=None, qform=_oblique_sform(), patch={0: -0.5})
    error = _read_error(path)
    assert (error.check, error.path) == ("pixdim_mismatch", str(path))
    assert "the qform's handedness (qfac, pixdim[0]) is -0.5 rather than 1 or -1" in error.reason


@pytest.mark.parametrize(
    ("forms", "patch"),
    [("qform", {1: 0.0}), ("qform", {0: 0.0}), ("qform", {0: 0.5}), ("sform", {0: -0.5})],
    ids=["qform-zero-pixdim", "qform-zero-qfac", "qform-qfac-half", "sform-odd-qfac"],
)
def test_pixdim_oddities_itk_and_nibabel_read_alike_are_accepted(
    tmp_path: Path, forms: str, patch: dict[int, float]
) -> None:
    """A zero voxel size or qfac both readers take as 1, and a qfac the sform makes irrelevant, still read,
    where nibabel places the voxels."""
    affine = _oblique_sform()
    path = _nifti_with_forms(
        tmp_path / "scan.nii.gz",
        sform=affine if forms == "sform" else None,
        qform=affine if forms == "qform" else None,
        patch=patch,
    )
    image = read_image(path)
    nib_affine = nibabel.load(path).affine
    for index in [(0, 0, 0), (25, 25, 11)]:
        expected = _RAS_TO_LPS @ (nib_affine @ [*index, 1.0])[:3]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), expected, atol=1e-4)
