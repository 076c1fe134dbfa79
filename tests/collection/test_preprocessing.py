"""preprocess_cases: caching, atomic writes, rejects, stored arrays and geometry, dask vs in-process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from kedro.config import OmegaConfigLoader
from processes import interruptible_children
from scipy.spatial.transform import Rotation

from iris_pipelines.collection import preprocessing
from iris_pipelines.collection.preprocessing import (
    ADDED_COLUMNS,
    REPORT_COLUMNS,
    PreprocessParams,
    SchedulerParams,
    build_cluster,
    cache_key,
    canonical_image_array,
    preprocess_case,
    preprocess_cases,
)
from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import file_sha256, write_dicom_series

REPO = Path(__file__).resolve().parents[2]
SIZE = (24, 20, 12)  # x, y, z
LIVER = (slice(2, 6), slice(3, 9), slice(4, 12))  # z, y, x
TUMOUR = (slice(7, 9), slice(10, 13), slice(14, 18))
LABELS = {"1": "liver", "2": "tumour"}
OBLIQUE = (0.8660254, -0.5, 0.0, 0.5, 0.8660254, 0.0, 0.0, 0.0, 1.0)
LPS_FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# case id -> (spacing, direction, modality)
CASES = {
    "exact": ((2.0, 2.0, 2.0), IDENTITY, "CT"),
    "lps": ((2.0, 2.0, 2.0), LPS_FLIP, "CT"),
    "aniso": ((0.8, 1.2, 3.5), IDENTITY, "CT"),
    "oblique": ((1.0, 1.5, 2.5), OBLIQUE, "MR"),
}


def _write_volume(array: np.ndarray, spacing, direction, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin((-12.0, 7.5, 30.0))
    sitk.WriteImage(image, str(path))


def _label_volume() -> np.ndarray:
    label = np.zeros(SIZE[::-1], dtype=np.uint8)
    label[LIVER] = 1
    label[TUMOUR] = 2
    return label


def make_case(root: Path, case_id: str, spacing, direction, modality: str) -> dict:
    rng = np.random.default_rng(len(case_id))
    image = rng.normal(40, 300, SIZE[::-1]).astype(np.int16)
    image_path, label_path = root / f"{case_id}_img.nii.gz", root / f"{case_id}_seg.nii.gz"
    _write_volume(image, spacing, direction, image_path)
    _write_volume(_label_volume(), spacing, direction, label_path)
    geometry = Geometry.from_image(sitk.ReadImage(str(image_path)))
    return {
        "dataset": "toy",
        "case_id": case_id,
        "subject_id": f"s-{case_id}",
        "modality": modality,
        "heldout": False,
        "layout": "csv",
        "image_path": str(image_path),
        "label_path": str(label_path),
        "image_format": "nifti",
        **geometry.to_dict(),
        "labels": json.dumps(LABELS),
        "image_sha256": file_sha256(image_path),
        "label_sha256": file_sha256(label_path),
    }


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("raw")
    return pd.DataFrame([make_case(root, name, *spec) for name, spec in CASES.items()])


def _params(output_dir: Path, kind: str = "synchronous", **overrides) -> PreprocessParams:
    values = {
        "target_spacing": (2.0, 2.0, 2.0),
        "output_dir": str(output_dir),
        "scheduler": SchedulerParams(kind=kind, n_workers=2, memory_limit="1GiB"),
        **overrides,
    }
    return PreprocessParams(**values)


@pytest.fixture(scope="module")
def processed(manifest: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory):
    output_dir = tmp_path_factory.mktemp("volumes")
    result, report = preprocess_cases(manifest, _params(output_dir))
    return output_dir, result.set_index("case_id", drop=False), report


def test_every_case_gets_the_contract_columns(manifest, processed):
    _, result, report = processed
    assert report.empty and list(report.columns) == REPORT_COLUMNS
    assert list(result.columns) == list(manifest.columns) + ADDED_COLUMNS
    assert list(result["case_id"]) == list(manifest["case_id"])


def test_arrays_memory_map_on_the_canonical_grid(processed):
    _, result, _ = processed
    for row in result.itertuples():
        grid = Geometry.from_json(row.preprocessed_geometry)
        assert grid.is_identity_direction and grid.spacing == (2.0, 2.0, 2.0)
        image = np.load(row.image_array, mmap_mode="r")
        label = np.load(row.label_array, mmap_mode="r")
        assert isinstance(image, np.memmap) and isinstance(label, np.memmap)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == label.shape == grid.size[::-1]
        assert Path(row.image_array).parent.name == row.cache_key
        assert Path(row.image_array).parent.parent.name == row.cache_key[:2]


def test_original_geometry_is_the_inputs(processed):
    _, result, _ = processed
    for row in result.itertuples():
        stored = Geometry.from_json(row.original_geometry)
        assert stored == Geometry.from_image(sitk.ReadImage(row.image_path))
        assert stored == Geometry(row.size, row.spacing, row.origin, row.direction)


def _mirror_xy(box: list[int]) -> list[int]:
    z0, y0, x0, z1, y1, x1 = box
    return [z0, SIZE[1] - y1, SIZE[0] - x1, z1, SIZE[1] - y0, SIZE[0] - x0]


def test_class_statistics_of_a_constructed_label(processed):
    _, result, _ = processed
    liver_box = [2, 3, 4, 6, 9, 12]
    tumour_box = [7, 10, 14, 9, 13, 18]
    exact = result.loc["exact"]
    assert json.loads(exact.class_voxels) == {"1": 4 * 6 * 8, "2": 2 * 3 * 4}
    assert json.loads(exact.class_bboxes) == {"1": liver_box, "2": tumour_box}
    # LPS-flipped x and y: the canonical (identity) grid mirrors the boxes along those axes.
    flipped = json.loads(result.loc["lps"].class_bboxes)
    assert flipped == {"1": _mirror_xy(liver_box), "2": _mirror_xy(tumour_box)}
    assert json.loads(result.loc["lps"].class_voxels) == json.loads(exact.class_voxels)


def test_class_statistics_match_the_stored_labels(processed):
    _, result, _ = processed
    for row in result.itertuples():
        label = np.load(row.label_array, mmap_mode="r")
        voxels, boxes = json.loads(row.class_voxels), json.loads(row.class_bboxes)
        for value in (1, 2):
            where = np.argwhere(label == value)
            assert voxels[str(value)] == len(where) > 0
            assert boxes[str(value)] == [*where.min(axis=0).tolist(), *(where.max(axis=0) + 1).tolist()]


def test_rerun_skips_cached_cases(manifest, processed, monkeypatch):
    output_dir, first, _ = processed
    files = sorted(p for p in output_dir.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    hashed = []
    monkeypatch.setattr(preprocessing, "file_sha256", hashed.append)
    again, _ = preprocess_cases(manifest, _params(output_dir))
    assert hashed == []  # a cache hit reads no input file, not even to checksum it
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert sorted(p for p in output_dir.rglob("*") if p.is_file()) == files
    pd.testing.assert_frame_equal(again.set_index("case_id", drop=False), first)


def test_cache_key_follows_the_parameters_that_matter(manifest, tmp_path):
    ct, mr = manifest.iloc[0].to_dict(), manifest.iloc[3].to_dict()
    base = _params(tmp_path)
    assert cache_key(ct, base) != cache_key(ct, _params(tmp_path, target_spacing=(1.5, 1.5, 1.5)))
    wider = _params(tmp_path, ct_window=(-1000.0, 1000.0))
    assert cache_key(ct, base) != cache_key(ct, wider)
    assert cache_key(mr, base) == cache_key(mr, wider)  # the CT window does not touch MR output
    assert cache_key(ct, base) == cache_key(ct, _params(tmp_path / "elsewhere", strict=True))
    assert cache_key(ct, base) != cache_key({**ct, "image_sha256": "0" * 64}, base)


def test_writes_are_atomic(manifest, tmp_path, monkeypatch):
    row = manifest.iloc[0].to_dict()
    real_save = np.save

    def fail_on_label(path, array):
        if Path(path).name == "label.npy":
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(np, "save", fail_on_label)
    result, report = preprocess_cases(manifest.iloc[:1], _params(tmp_path))
    assert result.empty and report.loc[0, "check"] == "preprocess_failed"
    assert "disk full" in report.loc[0, "reason"]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no half case, no scratch left
    monkeypatch.undo()
    preprocess_case(row, _params(tmp_path))
    entries = [p.name for p in tmp_path.rglob("*")]
    assert not [name for name in entries if name.startswith(".")]
    assert sorted(p.name for p in tmp_path.rglob("*.*")) == ["image.npy", "label.npy", "meta.json"]


def test_a_bad_case_is_reported_and_the_rest_go_on(manifest, tmp_path):
    broken = tmp_path / "broken.nii"
    broken.write_bytes(b"not a nifti file at all" * 20)
    bad_rows = [
        {
            **manifest.iloc[0].to_dict(),
            "case_id": "missing",
            "image_path": str(tmp_path / "gone.nii.gz"),
            "image_sha256": "1" * 64,
        },
        {
            **manifest.iloc[1].to_dict(),
            "case_id": "garbage",
            "image_path": str(broken),
            "image_sha256": file_sha256(broken),
        },
    ]
    mixed = pd.concat([pd.DataFrame(bad_rows[:1]), manifest, pd.DataFrame(bad_rows[1:])], ignore_index=True)
    result, report = preprocess_cases(mixed, _params(tmp_path / "out"))
    assert list(result["case_id"]) == list(manifest["case_id"])
    assert list(report["case_id"]) == ["missing", "garbage"]
    assert list(report["check"]) == ["missing_file", "unreadable"]
    assert list(report["path"]) == [str(tmp_path / "gone.nii.gz"), str(broken)]
    with pytest.raises(InvalidInputError, match="gone.nii.gz"):
        preprocess_cases(mixed, _params(tmp_path / "strict", strict=True))


@pytest.mark.parametrize("kind", ["image", "label"])
def test_an_input_edited_after_ingest_is_rejected_not_cached(manifest, processed, tmp_path, kind):
    """Re-running preprocess alone after editing a file must not cache the edit under the ingested
    file's key, where a later run would serve it for the original file as well."""
    _, reference, _ = processed
    row = manifest.iloc[0].to_dict()
    original = tmp_path / "original.nii.gz"
    shutil.copy(row[f"{kind}_path"], original)
    edited = tmp_path / f"{kind}.nii.gz"
    shutil.copy(original, edited)
    row[f"{kind}_path"] = str(edited)  # same bytes, so the manifest's checksum still holds
    volume = sitk.ReadImage(str(original))
    sitk.WriteImage(sitk.Cast(volume, sitk.sitkUInt8) * 0 + 1, str(edited))  # a different file
    output_dir = tmp_path / "volumes"
    result, report = preprocess_cases(pd.DataFrame([row]), _params(output_dir))
    assert result.empty and list(report["check"]) == ["stale_manifest"]
    assert report.loc[0, "path"] == str(edited)
    reason = report.loc[0, "reason"]
    assert reason.startswith(f"{edited} changed after ingest") and "re-run the ingest pipeline" in reason
    assert row[f"{kind}_sha256"] in reason and file_sha256(edited) in reason
    assert not [p for p in output_dir.rglob("*") if p.is_file()]
    with pytest.raises(InvalidInputError, match="changed after ingest"):
        preprocess_case(row, _params(output_dir, strict=True))
    shutil.copy(original, edited)  # undone: the case matches its manifest row again
    result, report = preprocess_cases(pd.DataFrame([row]), _params(output_dir))
    assert report.empty
    expected = reference.loc[row["case_id"]]
    for column in ("image_array", "label_array"):
        np.testing.assert_array_equal(np.load(result.loc[0, column]), np.load(expected[column]))


def test_an_input_edited_after_it_was_cached_is_caught_on_the_cache_hit(manifest, tmp_path):
    """Correcting a label file and re-running preprocess alone must not serve the arrays of the old file."""
    row = manifest.iloc[0].to_dict()
    label = tmp_path / "label.nii.gz"
    shutil.copy(row["label_path"], label)
    row["label_path"] = str(label)
    output_dir = tmp_path / "volumes"
    first, _ = preprocess_cases(pd.DataFrame([row]), _params(output_dir))
    assert len(first) == 1
    volume = sitk.ReadImage(str(label))
    sitk.WriteImage(sitk.Cast(volume, sitk.sitkUInt8) * 0, str(label))  # every class erased
    result, report = preprocess_cases(pd.DataFrame([row]), _params(output_dir))
    assert result.empty and list(report["check"]) == ["stale_manifest"]


def test_a_detached_data_file_edited_after_it_was_cached_is_caught_on_the_cache_hit(manifest, tmp_path):
    """An .mhd header names the file its voxels are in: an edit to that file leaves the header as it was."""
    row = manifest.iloc[0].to_dict()
    label = tmp_path / "label.mhd"
    sitk.WriteImage(sitk.ReadImage(row["label_path"]), str(label))  # the voxels go to label.raw
    row = {**row, "label_path": str(label), "label_sha256": file_sha256(label)}
    output_dir = tmp_path / "volumes"
    first, _ = preprocess_cases(pd.DataFrame([row]), _params(output_dir))
    assert len(first) == 1
    data = tmp_path / "label.raw"
    before = data.stat()
    data.write_bytes(bytes(before.st_size))  # every class erased, the size kept
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    result, report = preprocess_cases(pd.DataFrame([row]), _params(output_dir))
    assert result.empty and list(report["check"]) == ["stale_manifest"]


def test_a_class_lost_in_resampling_is_reported_on_every_run(tmp_path, caplog, monkeypatch):
    """A structure finer than the target spacing can vanish under nearest neighbour: the case is kept, and
    the loss is logged and reported, by a cached run too."""
    label = _label_volume()
    label[TUMOUR] = 0
    label[8, 11, 16] = 2  # one 2 mm voxel, between the 6 mm grid's samples
    image = np.random.default_rng(0).normal(40, 300, SIZE[::-1]).astype(np.int16)
    image_path, label_path = tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz"
    _write_volume(image, (2.0, 2.0, 2.0), IDENTITY, image_path)
    _write_volume(label, (2.0, 2.0, 2.0), IDENTITY, label_path)
    row = {
        **make_case(tmp_path, "template", (2.0, 2.0, 2.0), IDENTITY, "CT"),
        "case_id": "speck",
        "image_path": str(image_path),
        "label_path": str(label_path),
        "image_sha256": file_sha256(image_path),
        "label_sha256": file_sha256(label_path),
    }
    params = _params(tmp_path / "volumes", target_spacing=(6.0, 6.0, 6.0))
    with caplog.at_level(logging.WARNING, logger=preprocessing.__name__):
        result, report = preprocess_cases(pd.DataFrame([row]), params)
    assert list(result["case_id"]) == ["speck"]
    assert json.loads(result.loc[0, "class_voxels"])["2"] == 0
    assert list(report.columns) == REPORT_COLUMNS
    assert list(report[["case_id", "check", "path"]].itertuples(index=False, name=None)) == [
        ("speck", "class_lost_in_resampling", str(label_path))
    ]
    assert "class 2 (tumour) has 1 voxel(s)" in report.loc[0, "reason"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "speck" in warning and "class 2 (tumour)" in warning and "6 × 6 × 6 mm" in warning
    monkeypatch.setattr(preprocessing, "read_image", None)  # a cache hit reads no volume
    again, cached_report = preprocess_cases(pd.DataFrame([row]), params)
    pd.testing.assert_frame_equal(again, result)
    pd.testing.assert_frame_equal(cached_report, report)


def test_a_multi_modal_image_is_preprocessed_from_its_first_volume(manifest, tmp_path):
    """Ingest accepts a 4-D multi-modal MSD image for its first volume, on the 3-D part of its grid."""
    row = manifest.set_index("case_id", drop=False).loc["oblique"].to_dict()
    scan = sitk.ReadImage(row["image_path"])
    path = tmp_path / "t2_adc.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([scan, scan * 0 + 7]), str(path))
    multi = preprocess_case(
        {**row, "image_path": str(path), "image_sha256": file_sha256(path)}, _params(tmp_path)
    )
    single = preprocess_case(row, _params(tmp_path))
    np.testing.assert_array_equal(np.load(multi["image_array"]), np.load(single["image_array"]))
    for column in ("original_geometry", "preprocessed_geometry", "class_voxels"):
        assert multi[column] == single[column]


def test_a_cached_case_missing_a_file_is_rebuilt(manifest, tmp_path):
    """An interrupted copy of the cache (or a file deleted by hand) repairs itself on the next run."""
    rows = manifest.iloc[:1]
    output_dir = tmp_path / "volumes"
    first, _ = preprocess_cases(rows, _params(output_dir))
    image = Path(first.loc[0, "image_array"])
    expected = np.load(image)
    image.unlink()
    again, report = preprocess_cases(rows, _params(output_dir))
    assert report.empty
    np.testing.assert_array_equal(np.load(again.loc[0, "image_array"]), expected)
    (image.parent / "meta.json").unlink()
    third, report = preprocess_cases(rows, _params(output_dir))
    assert report.empty and (image.parent / "meta.json").is_file()
    assert not [p for p in output_dir.rglob(".*")]  # nothing broken left beside it


@pytest.mark.parametrize("image_name", ["img.mha", "img.nrrd", "dicom_series"])
def test_an_input_deleted_after_it_was_cached_is_a_missing_file_like_an_uncached_one(
    manifest, tmp_path, image_name
):
    """A cached case whose image was deleted failed as preprocess_failed with a raw FileNotFoundError (a
    DICOM folder as unsupported_format), while the same case uncached was reported as missing_file."""
    row = manifest.iloc[0].to_dict()  # an int16 scan, axis-aligned: DICOM can store it
    image = tmp_path / image_name
    if image_name == "dicom_series":
        write_dicom_series(sitk.ReadImage(row["image_path"]), image)
    else:
        sitk.WriteImage(sitk.ReadImage(row["image_path"]), str(image))
    row = {**row, "image_path": str(image), "image_sha256": file_sha256(image)}
    output_dir = tmp_path / "volumes"
    first, report = preprocess_cases(pd.DataFrame([row]), _params(output_dir))
    assert len(first) == 1 and report.empty
    if image.is_dir():
        shutil.rmtree(image)
    else:
        image.unlink()
    for spacing in ((2.0, 2.0, 2.0), (3.0, 3.0, 3.0)):  # cached, then a spacing never computed
        result, report = preprocess_cases(pd.DataFrame([row]), _params(output_dir, target_spacing=spacing))
        assert result.empty
        assert report[["path", "check", "reason"]].to_dict("records") == [
            {"path": str(image), "check": "missing_file", "reason": "the file does not exist; check the path"}
        ]


def test_a_header_in_metres_is_refused_as_grid_too_large_and_the_rest_go_on(manifest, tmp_path):
    """Preprocessing resampled without the grid guard inference uses, so a NIfTI whose header says metres
    (every length 1000× too large) failed as preprocess_failed with SimpleITK's "Failed to allocate
    memory" traceback text."""
    row = manifest.iloc[0].to_dict()
    in_metres = {}
    for kind in ("image", "label"):
        source = nibabel.load(row[f"{kind}_path"])
        header = source.header.copy()
        header.set_xyzt_units(xyz="meter")
        in_metres[kind] = tmp_path / f"{kind}_in_metres.nii.gz"
        nibabel.save(nibabel.Nifti1Image(np.asarray(source.dataobj), source.affine, header), in_metres[kind])
    metres = {
        **row,
        "case_id": "metres",
        **{f"{kind}_path": str(path) for kind, path in in_metres.items()},
        **{f"{kind}_sha256": file_sha256(path) for kind, path in in_metres.items()},
    }
    mixed = pd.concat([pd.DataFrame([metres]), manifest.iloc[1:2]], ignore_index=True)
    result, report = preprocess_cases(mixed, _params(tmp_path / "volumes"))
    assert list(result["case_id"]) == [manifest.iloc[1]["case_id"]]
    assert report[["case_id", "path", "check"]].to_dict("records") == [
        {"case_id": "metres", "path": str(in_metres["image"]), "check": "grid_too_large"}
    ]
    assert "it spans 48000 × 40000 × 24000 mm" in report.loc[0, "reason"]
    assert "a header in metres makes it 1000× too large" in report.loc[0, "reason"]


def test_renaming_a_class_reuses_the_cached_arrays(manifest, tmp_path):
    row = manifest.iloc[0].to_dict()
    renamed = {
        **row,
        "labels": json.dumps({k: f"{v} (fixed typo)" for k, v in json.loads(row["labels"]).items()}),
    }
    assert cache_key(row, _params(tmp_path)) == cache_key(renamed, _params(tmp_path))


def test_one_number_is_an_isotropic_spacing():
    """`--params="preprocess.target_spacing=3"`: Kedro's --params cannot pass a list."""
    assert PreprocessParams(target_spacing=3).target_spacing == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="preprocess.percentiles needs a list of numbers"):
        PreprocessParams(percentiles=5)


def test_out_of_range_labels_are_rejected(manifest, tmp_path):
    row = manifest.iloc[0].to_dict()
    label = sitk.ReadImage(row["label_path"], sitk.sitkInt16) * 200  # 400 does not fit uint8
    path = tmp_path / "wide_seg.nii.gz"
    sitk.WriteImage(label, str(path))
    with pytest.raises(InvalidInputError) as error:
        preprocess_case(
            {**row, "label_path": str(path), "label_sha256": file_sha256(path)}, _params(tmp_path)
        )
    assert error.value.check == "label_range" and error.value.path == str(path)


def test_dask_local_cluster_matches_in_process(manifest, processed, tmp_path):
    output_dir, in_process, _ = processed
    on_dask, report = preprocess_cases(manifest, _params(tmp_path, kind="local"))
    on_dask = on_dask.set_index("case_id", drop=False)
    assert report.empty
    for column in ("image_array", "label_array"):
        for ours, theirs in zip(on_dask[column], in_process[column], strict=True):
            np.testing.assert_array_equal(np.load(ours), np.load(theirs))
            assert Path(ours).relative_to(tmp_path) == Path(theirs).relative_to(output_dir)
    same = on_dask.columns.difference(["image_array", "label_array"])
    pd.testing.assert_frame_equal(on_dask[same], in_process[same])


def test_slurm_cluster_job_script_carries_the_directives():
    scheduler = SchedulerParams(
        kind="slurm",
        queue="cpu",
        account="imaging",
        cores=4,
        memory="16GiB",
        walltime="01:30:00",
        job_extra_directives=("--qos=normal",),
        jobs=2,
    )
    with build_cluster(scheduler) as cluster:
        script = cluster.job_script()
    for directive in (
        "#SBATCH -p cpu",
        "#SBATCH -A imaging",
        "#SBATCH -n 1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16G",
        "#SBATCH -t 01:30:00",
        "#SBATCH --qos=normal",
        "--nworkers 4",
        "--nthreads 1",
    ):
        assert directive in script


def _load_params(conf: Path, env: str) -> PreprocessParams:
    loader = OmegaConfigLoader(
        str(conf),
        base_env="base",
        default_run_env=env,
        merge_strategy={"parameters": "soft", "globals": "soft"},
    )
    return PreprocessParams.from_dict(loader["parameters"]["preprocess"])


def test_params_from_the_conf_files(tmp_path):
    for env in ("base", "hpcc"):
        (tmp_path / env).mkdir()
        for name in ("globals.yml", "parameters_preprocess.yml"):
            shutil.copy(REPO / "conf" / env / name, tmp_path / env / name)
    (tmp_path / "local").mkdir()
    assert _load_params(tmp_path, "local") == PreprocessParams()
    hpcc = _load_params(tmp_path, "hpcc")
    data_root = yaml.safe_load((tmp_path / "hpcc" / "globals.yml").read_text())["data_root"]
    assert hpcc.output_dir == f"{data_root}/05_model_input/volumes"
    assert hpcc.target_spacing == (1.5, 1.5, 1.5) and hpcc.scheduler.kind == "slurm"
    assert hpcc.ct_window == PreprocessParams().ct_window and hpcc.scheduler.cores == 8
    # dask-jobqueue's default would write each worker's slurm-<id>.out into the project folder
    assert hpcc.scheduler.log_directory == f"{data_root}/logs/dask"
    with pytest.raises(ValueError, match="target_spacng"):
        PreprocessParams.from_dict({"target_spacng": [1, 1, 1]})
    with pytest.raises(ValueError, match="kind"):
        PreprocessParams.from_dict({"scheduler": {"kind": "kubernetes"}})


def test_non_finite_images_are_rejected(manifest, tmp_path):
    row = manifest.iloc[0].to_dict()
    source = sitk.ReadImage(row["image_path"])
    array = sitk.GetArrayFromImage(source).astype(np.float32)
    array[3, 3, 3] = np.nan
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(source)
    path = tmp_path / "nan_img.mha"  # ITK NIfTI I/O turns NaN into 0; MetaImage keeps it
    sitk.WriteImage(image, str(path))
    with pytest.raises(InvalidInputError) as error:
        preprocess_case(
            {**row, "image_path": str(path), "image_sha256": file_sha256(path)}, _params(tmp_path)
        )
    assert error.value.check == "non_finite"


def _scanned_phantom(direction) -> sitk.Image:
    """A CT of one world-space scene (air, a 40 HU body, a 150 HU organ) on a 2 mm grid of 40³ voxels
    centred on the origin, in the given direction: the same anatomy whichever way the scanner was tilted."""
    geometry = Geometry((40, 40, 40), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), direction)
    centre = geometry.index_to_world(np.full((1, 3), 19.5))[0]
    geometry = Geometry(geometry.size, geometry.spacing, tuple(-centre), direction)
    z, y, x = np.indices((40, 40, 40))
    world = geometry.index_to_world(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1))
    hu = np.full(world.shape[0], -1000.0)
    hu[np.linalg.norm(world / [30.0, 24.0, 26.0], axis=1) < 1.0] = 40.0
    hu[np.linalg.norm(world - [6.0, -4.0, 3.0], axis=1) < 9.0] = 150.0
    return geometry.apply_to(sitk.GetImageFromArray(hu.reshape(40, 40, 40).astype(np.float32)))


def test_an_oblique_scan_gets_the_intensities_of_an_axis_aligned_one():
    """Resampling a tilted scan onto the canonical grid pads its bounding box (~60 % of it here) with
    air; that padding must not enter the z-score, or a tissue's value depends on the scanner's tilt."""
    params = PreprocessParams(target_spacing=(2.0, 2.0, 2.0))
    tilted = tuple(Rotation.from_euler("xy", [25.0, 20.0], degrees=True).as_matrix().ravel())
    organ = {}
    for name, direction in (("aligned", IDENTITY), ("oblique", tilted)):
        array, _, grid = canonical_image_array(_scanned_phantom(direction), "CT", params, source=name)
        z, y, x = np.indices(array.shape)
        world = grid.index_to_world(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1))
        core = np.linalg.norm(world - [6.0, -4.0, 3.0], axis=1) < 6.0  # away from partial volume
        organ[name] = float(array.reshape(-1)[core].mean())
        if name == "oblique":
            assert array.size > 1.8 * 40**3  # the canonical box really is padded
    # Linear interpolation of the tilted grid leaves ~3 %; counting the padding gave 4.9 against 2.6.
    assert organ["oblique"] == pytest.approx(organ["aligned"], rel=0.05)


def test_the_slurm_scheduler_leaves_ctrl_c_to_python():
    """dask-jobqueue replaces the Ctrl-C handler with sys.exit() on import: an interrupted `kedro run`
    then exited 0 with its MLflow run FINISHED. Neither loading the pipelines nor making a SLURM cluster
    class may change the handler."""
    code = (
        "import signal\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, 'at start'\n"
        "from kedro.framework.project import configure_project\n"
        "configure_project('iris_pipelines')\n"
        "from iris_pipelines.pipeline_registry import register_pipelines\n"
        "register_pipelines()\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, 'pipelines'\n"
        "from iris_pipelines.collection.preprocessing import _slurm_cluster_class\n"
        "assert _slurm_cluster_class().__name__ == 'SLURMCluster'\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, 'cluster class'\n"
    )
    with interruptible_children():  # Python installs its Ctrl-C handler only where SIGINT is not ignored
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stderr[-2000:]
