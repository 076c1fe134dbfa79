"""Per-case checks (one test per kind of bad input) and the manifest / report tables."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from builders import (
    ORIGIN,
    SIZE,
    SPACING,
    image_volume,
    label_volume,
    multi_modal_volume,
    write,
    write_csv,
    write_dicom_case,
    write_msd,
    write_nnunet,
)

from iris_pipelines.collection import ingest
from iris_pipelines.collection.ingest import (
    MANIFEST_COLUMNS,
    REPORT_COLUMNS,
    ingest_sources,
    label_values,
    validate_case,
)
from iris_pipelines.collection.layouts import CaseRef
from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.io import file_sha256

LABELS = {1: "liver", 2: "tumour"}


def _case(
    tmp_path: Path,
    image: sitk.Image | None = None,
    label: sitk.Image | None = None,
    *,
    suffix: str = ".nii.gz",
) -> CaseRef:
    image_path = write(image if image is not None else image_volume(), tmp_path / f"img{suffix}")
    label_path = write(label if label is not None else label_volume(), tmp_path / "seg.nii.gz")
    return CaseRef("ds", "c0", "s0", "CT", False, "msd", image_path, label_path, dict(LABELS))


def _rejection(ref: CaseRef) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        validate_case(ref, tolerance_mm=1e-3)
    return caught.value


def test_valid_case_gives_a_manifest_row(tmp_path: Path) -> None:
    ref = _case(tmp_path)
    row = validate_case(ref, tolerance_mm=1e-3)
    assert tuple(row) == MANIFEST_COLUMNS
    assert row["size"] == list(SIZE)
    np.testing.assert_allclose(row["spacing"], SPACING, atol=1e-6)
    np.testing.assert_allclose(row["origin"], ORIGIN, atol=1e-6)
    assert row["direction"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert json.loads(row["labels"]) == {"1": "liver", "2": "tumour"}
    assert row["image_format"] == "nifti"
    assert row["image_sha256"] == file_sha256(ref.image_path)
    assert row["label_sha256"] == file_sha256(ref.label_path)
    assert row["image_path"] == str(ref.image_path)


def test_a_ct_without_air_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stored values exported without the rescale intercept (HU + 1024) would pass every check and then be
    clipped by the CT window into a nearly binary image."""
    raw = sitk.GetArrayFromImage(image_volume()) + 1024.0
    stored = sitk.GetImageFromArray(raw.astype(np.float32))
    stored.CopyInformation(image_volume())
    ref = _case(tmp_path, stored)
    validate_case(ref, tolerance_mm=1e-3)
    assert f"{ref.image_path}: a CT with no voxel below -200 HU" in caplog.text
    caplog.clear()
    with_air = sitk.GetArrayFromImage(image_volume())
    with_air[0] = -1000.0
    in_hu = sitk.GetImageFromArray(with_air)
    in_hu.CopyInformation(image_volume())
    validate_case(_case(tmp_path / "hu", in_hu), tolerance_mm=1e-3)
    assert "no voxel below" not in caplog.text


def test_truncated_gzip_is_unreadable(tmp_path: Path) -> None:
    ref = _case(tmp_path)
    data = ref.image_path.read_bytes()
    ref.image_path.write_bytes(data[: len(data) // 2])
    error = _rejection(ref)
    assert (error.check, error.path) == ("unreadable", str(ref.image_path))
    assert "truncated" in error.reason


def test_zero_byte_file_is_unreadable(tmp_path: Path) -> None:
    ref = _case(tmp_path)
    ref.label_path.write_bytes(b"")
    error = _rejection(ref)
    assert (error.check, error.path) == ("unreadable", str(ref.label_path))
    assert "empty" in error.reason and "0 bytes" in error.reason


def test_shape_mismatch_names_both_sizes(tmp_path: Path) -> None:
    ref = _case(tmp_path, label=label_volume((8, 9, 11)))
    error = _rejection(ref)
    assert (error.check, error.path) == ("grid_mismatch", str(ref.label_path))
    assert "size (8, 9, 10) in the image vs (8, 9, 11) in the label" in error.reason


def test_origin_within_tolerance_is_accepted_beyond_it_rejected(tmp_path: Path) -> None:
    label = label_volume()
    label.SetOrigin((ORIGIN[0] + 5e-4, *ORIGIN[1:]))
    assert validate_case(_case(tmp_path, label=label), tolerance_mm=1e-3)["case_id"] == "c0"
    label.SetOrigin((ORIGIN[0] + 0.5, *ORIGIN[1:]))
    error = _rejection(_case(tmp_path, label=label))
    assert error.check == "grid_mismatch"
    assert "origin (-10.0, 20.0, 5.0) in the image vs (-9.5, 20.0, 5.0) in the label" in error.reason


def test_undeclared_label_value(tmp_path: Path) -> None:
    ref = _case(tmp_path, label=label_volume(values=(1, 3)))
    error = _rejection(ref)
    assert (error.check, error.path) == ("undeclared_label", str(ref.label_path))
    assert "value(s) 3 not declared" in error.reason


def test_a_label_value_a_uint8_label_map_cannot_hold_is_refused_at_ingest(tmp_path: Path) -> None:
    """Declared or not, 300 would only fail in preprocessing, long after `iris validate` passed it."""
    label = sitk.Cast(label_volume(), sitk.sitkUInt16)
    label[3, 3, 1] = 300
    ref = _case(tmp_path, label=label)
    ref.labels[300] = "extra"
    error = _rejection(ref)
    assert (error.check, error.path) == ("label_range", str(ref.label_path))
    assert "value(s) [300] outside 0..255" in error.reason


def test_nan_intensities(tmp_path: Path) -> None:
    values = sitk.GetArrayFromImage(image_volume())
    values[0, 0, :3] = np.nan
    values[1, 1, 1] = np.inf
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(image_volume())
    # MetaImage keeps NaN/Inf; ITK's NIfTI reader (niftilib) silently turns them into 0 when reading.
    ref = _case(tmp_path, image=image, suffix=".mha")
    error = _rejection(ref)
    assert (error.check, error.path) == ("non_finite", str(ref.image_path))
    assert "4 non-finite voxels (3 NaN, 1 infinite)" in error.reason


def test_nan_intensities_in_nifti(tmp_path: Path) -> None:
    """NIfTI is the common case and the hard one: ITK's reader would hand back 0 where the file has NaN."""
    values = sitk.GetArrayFromImage(image_volume())
    values[2, 2, :2] = np.nan
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(image_volume())
    ref = _case(tmp_path, image=image, suffix=".nii.gz")
    error = _rejection(ref)
    assert (error.check, error.path) == ("non_finite", str(ref.image_path))
    assert "2 of" in error.reason and "NaN or infinite" in error.reason


def test_4d_image_is_not_3d(tmp_path: Path) -> None:
    ref = _case(tmp_path, image=sitk.Image([8, 9, 10, 2], sitk.sitkFloat32))
    error = _rejection(ref)
    assert (error.check, error.path) == ("not_3d", str(ref.image_path))
    assert "4-D" in error.reason and "(8, 9, 10, 2)" in error.reason


def test_a_multi_modal_msd_case_is_ingested_from_its_first_volume(tmp_path: Path) -> None:
    """Task01 BrainTumour / Task05 Prostate store every modality of a case in one 4-D image."""
    root = write_msd(tmp_path / "Task05_Prostate", ["p0", "p1"], modalities=("T2", "ADC"))
    write(multi_modal_volume(3, seed=1), root / "imagesTr" / "p1.nii.gz")
    manifest, report = ingest_sources([{"name": "prostate", "layout": "msd", "path": str(root)}])
    row = manifest.set_index("case_id").loc["p0"]
    assert row["modality"] == "MR" and list(row["size"]) == list(SIZE)  # the 3-D part of the 4-D grid
    np.testing.assert_allclose(row["spacing"], SPACING, atol=1e-6)
    np.testing.assert_allclose(row["origin"], ORIGIN, atol=1e-6)
    assert list(row["direction"]) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert list(report[["case_id", "check"]].itertuples(index=False, name=None)) == [("p1", "channel_count")]
    assert "3 volumes" in report.loc[0, "reason"] and "2 modalities" in report.loc[0, "reason"]


def test_empty_label(tmp_path: Path) -> None:
    ref = _case(tmp_path, label=label_volume(values=()))
    error = _rejection(ref)
    assert (error.check, error.path) == ("empty_label", str(ref.label_path))
    assert "no foreground" in error.reason


def test_non_integer_label_values(tmp_path: Path) -> None:
    label = sitk.Cast(label_volume(), sitk.sitkFloat32) * 0.5
    ref = _case(tmp_path, label=label)
    error = _rejection(ref)
    assert (error.check, error.path) == ("non_integer_label", str(ref.label_path))
    assert "not whole numbers" in error.reason and "0.5" in error.reason


def test_infinite_label_values_are_named_as_such(tmp_path: Path) -> None:
    """An infinity is "whole" to rounding; it must not surface as a bogus undeclared int64 class."""
    values = sitk.GetArrayFromImage(sitk.Cast(label_volume(), sitk.sitkFloat32))
    values[0, 0, :3] = [np.inf, -np.inf, np.nan]
    with pytest.raises(InvalidInputError) as raised:
        label_values(values, tmp_path / "seg.nii.gz")
    assert (raised.value.check, raised.value.path) == ("non_finite_label", str(tmp_path / "seg.nii.gz"))
    assert "3 NaN/infinite values (1 NaN, 2 infinite)" in raised.value.reason
    assert "whole class numbers" in raised.value.reason and "9223372036854775808" not in raised.value.reason


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz"])
def test_a_label_file_with_nan_voxels_is_a_non_finite_label(tmp_path: Path, suffix: str) -> None:
    """The reader refused the file first with the image's wording (non_finite, "the image has 1 non-finite
    voxels"), so the documented non_finite_label check never fired for a label file."""
    values = sitk.GetArrayFromImage(sitk.Cast(label_volume(), sitk.sitkFloat32))
    values[0, 0, :3] = [np.inf, -np.inf, np.nan]
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(label_volume())
    ref = replace(_case(tmp_path), label_path=write(label, tmp_path / f"seg_nan{suffix}"))
    error = _rejection(ref)
    assert (error.check, error.path) == ("non_finite_label", str(ref.label_path))
    assert error.reason.startswith("the label holds 3 NaN/infinite values (1 NaN, 2 infinite) out of 720")


def test_a_label_value_just_off_a_whole_number_is_printed_in_full() -> None:
    """The example was printed with :g, so a label refused for 1.0000001 said "(e.g. 1)"."""
    values = sitk.GetArrayFromImage(sitk.Cast(label_volume(), sitk.sitkFloat64))
    values[values == 1] = 1.0000001
    with pytest.raises(InvalidInputError) as raised:
        label_values(values, Path("seg.nii.gz"))
    assert raised.value.check == "non_integer_label"
    assert "not whole numbers (e.g. 1.0000001)" in raised.value.reason


def _nifti_with_non_finite_origin(image: sitk.Image, path: Path) -> Path:
    """``image`` as a NIfTI whose sform (the only placement set) has a NaN x offset, as a corrupt header."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]]  # LPS -> RAS
    affine[0, 3] = np.nan
    volume = nibabel.Nifti1Image(np.transpose(sitk.GetArrayFromImage(image)), np.diag([*SPACING, 1.0]))
    volume.set_sform(affine, code=1)
    volume.set_qform(None, code=0)
    nibabel.save(volume, path)
    return path


@pytest.mark.parametrize("broken", ["image", "label"])
def test_a_non_finite_origin_is_bad_geometry_not_a_grid_mismatch(tmp_path: Path, broken: str) -> None:
    """A NaN origin was reported as grid_mismatch, "origin (nan, …) in the image vs (nan, …) in the label;
    resample the label onto the image grid": advice no resampling can follow."""
    ref = _case(tmp_path)
    path = tmp_path / f"{broken}_nan_origin.nii.gz"
    volume = image_volume() if broken == "image" else label_volume()
    ref = replace(ref, **{f"{broken}_path": _nifti_with_non_finite_origin(volume, path)})
    error = _rejection(ref)
    assert (error.check, error.path) == ("bad_geometry", str(path))
    assert f"the {broken}'s header gives a non-finite origin (nan, " in error.reason
    assert "resample" not in error.reason


@pytest.fixture
def collection(tmp_path: Path) -> list[dict[str, object]]:
    """MSD (one case broken), nnU-Net (.mha), CSV with a DICOM series, and a source that cannot be read."""
    msd = write_msd(tmp_path / "Task01", ["liver_0", "liver_1", "liver_2"])
    write(label_volume(values=(1, 7)), msd / "labelsTr" / "liver_1.nii.gz")
    nnunet = write_nnunet(tmp_path / "Dataset002_Prostate", ["pro_00", "pro_01"])
    csv_root = tmp_path / "site"
    write_dicom_case(csv_root, "scan_a")
    csv_path = write_csv(
        csv_root,
        [
            {
                "case_id": "scan_a",
                "subject_id": "P7",
                "image": "images/scan_a",
                "label": "labels/scan_a.nii.gz",
            }
        ],
        labels={"1": "kidney", "2": "cyst"},
    )
    (tmp_path / "nothing").mkdir()
    return [
        {"name": "liver", "layout": "msd", "path": str(msd)},
        {"name": "prostate", "layout": "nnunet", "path": str(nnunet), "subject_pattern": r"^(\w+)_\d+$"},
        {"name": "site", "layout": "csv", "path": str(csv_path), "modality": "CT", "heldout": True},
        {"name": "broken", "layout": "msd", "path": str(tmp_path / "nothing")},
        {"name": "liver", "layout": "msd", "path": str(msd)},
    ]


def test_ingest_continues_past_bad_inputs(
    collection: list[dict[str, object]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="iris_pipelines.collection.ingest"):
        manifest, report = ingest_sources(collection)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert list(report.columns) == list(REPORT_COLUMNS)
    columns = ["dataset", "case_id", "subject_id", "modality", "heldout", "image_format"]
    assert list(manifest[columns].itertuples(index=False, name=None)) == [
        ("liver", "liver_0", "liver_0", "CT", False, "nifti"),
        ("liver", "liver_2", "liver_2", "CT", False, "nifti"),
        ("prostate", "pro_00", "pro", "MR", False, "mha"),
        ("prostate", "pro_01", "pro", "MR", False, "mha"),
        ("site", "scan_a", "P7", "CT", True, "dicom"),
    ]
    assert sorted(report["check"]) == ["duplicate_dataset", "missing_file", "undeclared_label"]
    undeclared = report.set_index("check").loc["undeclared_label"]
    assert (undeclared["dataset"], undeclared["case_id"]) == ("liver", "liver_1")
    assert undeclared["path"].endswith("labelsTr/liver_1.nii.gz") and "7" in undeclared["reason"]
    # One warning per rejected case (the synthetic CTs, which hold no air, add their own).
    warnings = [record for record in caplog.records if record.getMessage().startswith("Rejected")]
    assert len(warnings) == 3 and any("liver_1.nii.gz" in record.getMessage() for record in warnings)
    # The catalog stores both tables; they must survive parquet and CSV unchanged.
    manifest.to_parquet(tmp_path / "m.parquet")
    back = pd.read_parquet(tmp_path / "m.parquet")
    assert list(back.loc[4, "size"]) == list(SIZE) and back["heldout"].dtype == bool
    report.to_csv(tmp_path / "r.csv", index=False)


def test_an_unreadable_file_rejects_its_case_and_the_rest_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A label the user may not read (a group-only file on a shared file system) is one reject, not a
    PermissionError that stops the whole collection."""
    root = write_msd(tmp_path / "Task", ["a", "b", "c"])
    refused = root / "labelsTr" / "b.nii.gz"
    read_image = ingest.read_image

    def read_unless_refused(path: Path, **kwargs: object) -> sitk.Image:
        if Path(path) == refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_image(path, **kwargs)

    monkeypatch.setattr(ingest, "read_image", read_unless_refused)
    source = {"name": "t", "layout": "msd", "path": str(root)}
    manifest, report = ingest_sources([source])
    assert list(manifest["case_id"]) == ["a", "c"]
    assert list(report[["case_id", "check", "path"]].itertuples(index=False, name=None)) == [
        ("b", "unreadable", str(refused))
    ]
    assert "Permission denied" in report.loc[0, "reason"]
    with pytest.raises(InvalidInputError, match=r"labelsTr/b\.nii\.gz: the file cannot be read"):
        ingest_sources([source], strict=True)


def test_strict_mode_raises_the_first_problem(collection: list[dict[str, object]]) -> None:
    with pytest.raises(InvalidInputError) as caught:
        ingest_sources(collection, strict=True)
    assert caught.value.check == "missing_file"
    assert "dataset.json" in str(caught.value)


def test_strict_mode_raises_on_a_bad_case(tmp_path: Path) -> None:
    msd = write_msd(tmp_path / "Task01", ["a", "b"])
    write(label_volume(values=()), msd / "labelsTr" / "b.nii.gz")
    with pytest.raises(InvalidInputError, match=r"labelsTr/b\.nii\.gz: the label has no foreground"):
        ingest_sources([{"name": "t", "layout": "msd", "path": str(msd)}], strict=True)


def test_duplicate_case_ids_in_a_dataset(tmp_path: Path) -> None:
    root = write_msd(tmp_path / "Task", ["a"])
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] *= 2
    (root / "dataset.json").write_text(json.dumps(meta))
    manifest, report = ingest_sources([{"name": "t", "layout": "msd", "path": str(root)}])
    assert list(manifest["case_id"]) == ["a"]
    assert report.to_dict("records")[0] | {"reason": ""} == {
        "dataset": "t",
        "case_id": "a",
        "path": str(root / "imagesTr" / "a.nii.gz"),
        "reason": "",
        "check": "duplicate_case",
    }


def test_one_scan_listed_twice_is_kept_once(tmp_path: Path) -> None:
    """Under two case ids, or in a held-out copy of a training dataset, one scan could be its own
    reference or a test scan the training saw."""
    root = write_msd(tmp_path / "Task", ["a", "b"])
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest, report = ingest_sources(
        [{"name": "t", "layout": "msd", "path": str(root)}, {"name": "u", "layout": "msd", "path": str(copy)}]
    )
    assert list(zip(manifest["dataset"], manifest["case_id"], strict=True)) == [("t", "a"), ("t", "b")]
    assert list(report["check"]) == ["duplicate_image", "duplicate_image"]
    assert report["reason"][0].startswith(
        f"the same scan (its voxel values) as case t/a ({root / 'imagesTr' / 'a.nii.gz'})"
    )


def test_a_converted_copy_of_a_training_scan_in_a_held_out_dataset_is_refused(tmp_path: Path) -> None:
    """Public sets circulate as MSD and nnU-Net conversions: other file bytes, the same voxels. A held-out
    test scan that training saw would inflate every held-out figure."""
    root = write_msd(tmp_path / "Task", ["a", "b"])
    hospital = tmp_path / "hospital"
    rows = []
    for case in ("a", "b"):
        scan = sitk.ReadImage(str(root / "imagesTr" / f"{case}.nii.gz"))
        write(sitk.Cast(scan, sitk.sitkFloat64), hospital / f"{case}.nii")  # uncompressed, another type
        write(sitk.ReadImage(str(root / "labelsTr" / f"{case}.nii.gz")), hospital / f"{case}_seg.nii")
        rows.append({"case_id": case, "image": f"{case}.nii", "label": f"{case}_seg.nii"})
    csv_path = write_csv(hospital, rows, labels={"1": "liver", "2": "tumour"})
    manifest, report = ingest_sources(
        [
            {"name": "t", "layout": "msd", "path": str(root)},
            {"name": "u", "layout": "csv", "path": str(csv_path), "modality": "CT", "heldout": True},
        ]
    )
    assert list(manifest["dataset"]) == ["t", "t"]
    assert list(report["check"]) == ["duplicate_image", "duplicate_image"]
    assert manifest["voxel_sha256"].nunique() == 2


def test_csv_cases_that_name_a_label_differently_are_rejected(tmp_path: Path) -> None:
    """A `labels` column names the labels per case; label 1 = liver in one case and spleen in another was
    accepted, and the episode index merged the two into one class. The first declaration stands."""
    root = tmp_path / "hospital"
    declared = {"a": {"1": "liver", "2": "tumour"}, "b": {"1": "spleen"}, "c": {"1": "liver"}}
    rows = []
    for index, (case_id, labels) in enumerate(declared.items()):
        write(image_volume(seed=index), root / f"{case_id}.nii.gz")
        write(label_volume(values=tuple(map(int, labels))), root / f"{case_id}_seg.nii.gz")
        rows.append(
            {
                "case_id": case_id,
                "image": f"{case_id}.nii.gz",
                "label": f"{case_id}_seg.nii.gz",
                "labels": json.dumps(labels),
            }
        )
    csv_path = write_csv(root, rows, labels=None)
    source = {"name": "hospital", "layout": "csv", "path": str(csv_path), "modality": "CT"}
    manifest, report = ingest_sources([source])
    assert list(manifest["case_id"]) == ["a", "c"]
    assert report.to_dict("records") == [
        {
            "dataset": "hospital",
            "case_id": "b",
            "path": f"{csv_path}:3",
            "reason": "label 1 is 'spleen' here but 'liver' in case 'a' of dataset 'hospital'; a label value "
            "must name the same class in every case of a dataset: fix the `labels` cell, or make a "
            "separate dataset of the cases that number their classes differently",
            "check": "inconsistent_labels",
        }
    ]
    with pytest.raises(InvalidInputError, match=r"manifest\.csv:3: label 1 is 'spleen' here but 'liver'"):
        ingest_sources([source], strict=True)


def test_no_sources_give_empty_tables() -> None:
    manifest, report = ingest_sources([])
    assert manifest.empty and report.empty
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)


def test_an_msd_file_linked_into_a_symlink_cache_is_read_through_its_listed_name(tmp_path: Path) -> None:
    """DVC's symlink cache names its objects by checksum, without a suffix: the resolved path gave the
    case id ``3f…`` and no image format, so every case was rejected as ``unsupported_format``."""
    cache = tmp_path / ".dvc" / "cache"
    root = tmp_path / "Task03_Liver"
    training = []
    for index, case_id in enumerate(["liver_0", "liver_1"]):
        for folder, volume in (("imagesTr", image_volume(seed=index)), ("labelsTr", label_volume())):
            listed = write(volume, root / folder / f"{case_id}.nii.gz")
            stored = cache / f"{index}{folder[0]}" / f"{index:030x}"
            stored.parent.mkdir(parents=True)
            shutil.move(listed, stored)
            listed.symlink_to(stored)
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {"modality": {"0": "CT"}, "labels": {"1": "liver", "2": "tumour"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    manifest, report = ingest_sources([{"name": "liver", "layout": "msd", "path": str(root)}])
    assert report.empty, report.to_dict("records")
    assert list(manifest["case_id"]) == ["liver_0", "liver_1"]
    assert list(manifest["image_format"]) == ["nifti", "nifti"]
    assert manifest["image_path"].iloc[0] == str(root / "imagesTr" / "liver_0.nii.gz")


def test_a_csv_file_linked_into_a_symlink_cache_is_read_through_its_listed_name(tmp_path: Path) -> None:
    """As for MSD: the CSV layout resolved its files too, so a link into DVC's suffix-less cache was
    rejected as ``unsupported_format``."""
    cache = tmp_path / ".dvc" / "cache"
    hospital = tmp_path / "hospital"
    rows = []
    for index, case_id in enumerate(["a", "b"]):
        for name, volume in (
            (f"{case_id}.nii.gz", image_volume(seed=index)),
            (f"{case_id}_seg.nii.gz", label_volume()),
        ):
            listed = write(volume, hospital / name)
            stored = cache / name.split(".")[0] / f"{index:030x}"
            stored.parent.mkdir(parents=True)
            shutil.move(listed, stored)
            listed.symlink_to(stored)
        rows.append({"case_id": case_id, "image": f"{case_id}.nii.gz", "label": f"{case_id}_seg.nii.gz"})
    csv_path = write_csv(hospital, rows, labels={"1": "liver", "2": "tumour"})
    manifest, report = ingest_sources(
        [{"name": "h", "layout": "csv", "path": str(csv_path), "modality": "CT"}]
    )
    assert report.empty, report.to_dict("records")
    assert list(manifest["image_format"]) == ["nifti", "nifti"]
    assert manifest["label_path"].iloc[0] == str(hospital / "a_seg.nii.gz")


@pytest.mark.parametrize(
    "sources",
    [{"name": "liver", "layout": "msd", "path": "/data/Task03_Liver"}, "/data/Task03_Liver", 3],
    ids=["mapping", "str", "int"],
)
def test_sources_that_are_not_a_list_are_refused_by_name(sources: object) -> None:
    """A YAML mapping written without '-' was iterated key by key: AttributeError, no word of the config."""
    with pytest.raises(InvalidInputError) as raised:
        ingest_sources(sources)  # type: ignore[arg-type]
    error = raised.value
    assert error.check == "bad_source" and error.path == "sources"
    assert type(sources).__name__ in error.reason and "{name, layout, path}" in error.reason


def test_a_source_that_is_not_a_mapping_is_reported_with_its_index(tmp_path: Path) -> None:
    """A source written as a bare path aborted the whole ingest with AttributeError."""
    good = write_msd(tmp_path / "Task03_Liver", ["liver_0"])
    sources = [{"name": "liver", "layout": "msd", "path": str(good)}, "/data/Task07_Pancreas"]
    manifest, report = ingest_sources(sources)
    assert list(manifest["case_id"]) == ["liver_0"]
    (row,) = report.to_dict("records")
    assert (row["check"], row["path"]) == ("bad_source", "sources[1]")
    assert "str" in row["reason"] and "'/data/Task07_Pancreas'" in row["reason"]
    assert "{name, layout, path}" in row["reason"]
    with pytest.raises(InvalidInputError, match=r"sources\[1\] is a str"):
        ingest_sources(sources, strict=True)


def test_dataset_names_differing_only_by_surrounding_spaces_are_one_name(tmp_path: Path) -> None:
    """'Liver' and 'Liver ' passed the duplicate check, then both became dataset 'Liver'."""
    first = write_msd(tmp_path / "TaskA", ["a_000"])
    second = write_msd(tmp_path / "TaskB", ["b_000"])
    write(image_volume(seed=7), second / "imagesTr" / "b_000.nii.gz")  # another scan: not a duplicate_image
    manifest, report = ingest_sources(
        [
            {"name": "Liver", "layout": "msd", "path": str(first)},
            {"name": " Liver ", "layout": "msd", "path": str(second)},
        ]
    )
    assert list(manifest[["dataset", "case_id"]].itertuples(index=False, name=None)) == [("Liver", "a_000")]
    (row,) = report.to_dict("records")
    assert (row["check"], row["path"]) == ("duplicate_dataset", str(second))
