"""The generated collection: dataset mix, on-disk layouts, labels, geometry, determinism, idempotence."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from iris_pipelines.imaging.io import read_image
from iris_pipelines.phantoms import DatasetSpec, default_specs, generate_collection, render_case
from iris_pipelines.phantoms.anatomy import PATHOLOGY, build_subject
from iris_pipelines.phantoms.collection import (
    _STREAM_ANATOMY,
    STAMP_NAME,
    case_rng,
    label_values,
    scan_geometry,
)
from iris_pipelines.phantoms.raster import paint

Collection = tuple[Path, list[dict[str, Any]]]
SPECS = {spec.name: spec for spec in default_specs()}


@dataclass(frozen=True)
class Case:
    case_id: str
    subject_id: str
    image: Path
    label: Path


def _cases(source: dict[str, Any]) -> tuple[list[Case], dict[int, str]]:
    """Read a source's index the way its layout's documentation says, independently of the writer."""
    root = Path(source["path"])
    if source["layout"] == "msd":
        meta = json.loads((root / "dataset.json").read_text())
        assert meta["numTraining"] == len(meta["training"])
        assert meta["modality"] == {"0": source["modality"]}
        assert meta["labels"]["0"] == "background"
        labels = {int(k): v for k, v in meta["labels"].items() if k != "0"}
        cases = []
        for entry in meta["training"]:
            assert entry["image"].startswith("./imagesTr/") and entry["label"].startswith("./labelsTr/")
            image = root / entry["image"]
            case_id = image.name.removesuffix(".nii.gz")
            cases.append(Case(case_id, case_id, image, root / entry["label"]))
        return cases, labels
    if source["layout"] == "nnunet":
        meta = json.loads((root / "dataset.json").read_text())
        ending = meta["file_ending"]
        assert meta["channel_names"] == {"0": source["modality"]}
        assert meta["labels"]["background"] == 0
        images = sorted(p for p in (root / "imagesTr").iterdir() if not p.name.startswith("."))
        assert images and all(p.name.endswith(f"_0000{ending}") for p in images)
        assert meta["numTraining"] == len(images)
        ids = [p.name.removesuffix(f"_0000{ending}") for p in images]
        cases = [Case(i, i, p, root / "labelsTr" / f"{i}{ending}") for i, p in zip(ids, images, strict=True)]
        return cases, {v: k for k, v in meta["labels"].items() if v != 0}
    with (root / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == ["case_id", "subject_id", "image", "label"]
    labels = {int(k): v for k, v in json.loads((root / "labels.json").read_text()).items()}
    return [Case(r["case_id"], r["subject_id"], root / r["image"], root / r["label"]) for r in rows], labels


def _spec(source: dict[str, Any]) -> DatasetSpec:
    return SPECS[source["name"]]


def _label_array(case: Case) -> np.ndarray:
    return sitk.GetArrayFromImage(read_image(case.label))


def _world_centroid(label: sitk.Image, value: int) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayViewFromImage(label) == value)[:, ::-1].astype(float)
    matrix = np.asarray(label.GetDirection()).reshape(3, 3) * np.asarray(label.GetSpacing())
    return (index @ matrix.T + np.asarray(label.GetOrigin())).mean(axis=0)


def test_dataset_mix_imitates_the_paper() -> None:
    specs = default_specs()
    training = [s for s in specs if not s.heldout]
    heldout = [s for s in specs if s.heldout]
    assert len(training) >= 6 and len(heldout) >= 2
    seen = {c for s in training for c in s.classes}
    for spec in heldout:
        assert set(spec.classes) - seen, f"{spec.name} has no novel class"
    assert any(c in seen for s in heldout for c in s.classes), "no seen concept in a held-out dataset"
    shared = Counter(c for s in training for c in s.classes)
    assert max(shared.values()) >= 2
    assert {s.modality for s in specs} == {"CT", "MR", "PET"}
    assert {s.layout for s in specs} == {"msd", "nnunet", "csv"}
    assert {s.file_ending for s in specs if s.layout == "nnunet"} == {".nii.gz", ".mha", ".nrrd"}
    assert {s.direction for s in specs} >= {"identity", "flipped", "oblique"}
    assert any(s.sequences_per_subject > 1 for s in specs)
    assert any(s.dicom_cases for s in specs if s.layout == "csv")
    assert all(2 <= len(s.classes) <= 8 for s in specs)
    assert len({s.noise for s in specs if s.modality == "CT"}) >= 3


def test_spec_validation_names_the_problem() -> None:
    spec = SPECS["AbdomenCT"]
    with pytest.raises(ValueError, match="unknown class concepts"):
        dataclasses.replace(spec, classes=("liver", "brain"))
    with pytest.raises(ValueError, match="does not suit layout"):
        dataclasses.replace(spec, file_ending=".mha")
    with pytest.raises(ValueError, match="DICOM"):
        dataclasses.replace(spec, dicom_cases=1)
    with pytest.raises(ValueError, match="no acquisition"):
        dataclasses.replace(spec, acquisitions=("T2",))


def test_spec_validation_refuses_what_generation_cannot_honour() -> None:
    """These specs were accepted and then failed deep in generation, or wrote something else than asked:
    a PET series rounded to int16 and tagged CT, a division by zero for no acquisitions, files outside the
    dataset's folder."""
    trunk, pet = SPECS["TrunkCT"], SPECS["LesionPET"]
    with pytest.raises(
        ValueError, match="'LesionCSV'.*written as CT, so a PET dataset cannot have dicom_cases"
    ):
        dataclasses.replace(pet, name="LesionCSV", layout="csv", dicom_cases=1)
    with pytest.raises(ValueError, match="'float32' storage cannot have dicom_cases"):
        dataclasses.replace(trunk, storage="float32")
    with pytest.raises(ValueError, match="acquisitions must name at least one"):
        dataclasses.replace(trunk, acquisitions=())
    with pytest.raises(ValueError, match="case_prefix '../escape' must be a plain name"):
        dataclasses.replace(trunk, case_prefix="../escape")
    with pytest.raises(ValueError, match=r"in_plane_mm \(-1.0, -2.0\) must be a range of positive"):
        dataclasses.replace(trunk, in_plane_mm=(-1.0, -2.0))
    assert dataclasses.replace(trunk, storage="uint16").dicom_cases == 2


def test_sources_point_at_valid_layouts(collection: Collection) -> None:
    root, sources = collection
    assert [s["name"] for s in sources] == list(SPECS)
    for source in sources:
        assert set(source) == {"name", "layout", "path", "modality", "heldout"}
        spec = _spec(source)
        assert Path(source["path"]).is_absolute() and Path(source["path"]).parent == root.resolve()
        assert source["layout"] == spec.layout and source["modality"] == spec.modality
        assert source["heldout"] is spec.heldout
        cases, labels = _cases(source)
        assert labels == dict(enumerate(spec.classes, start=1))
        assert len(cases) >= 2 and len({c.case_id for c in cases}) == len(cases)
        for case in cases:
            assert case.image.exists() and case.label.is_file()
            if case.image.is_dir():
                assert source["layout"] == "csv" and len(list(case.image.glob("*.dcm"))) > 10
            else:
                assert case.image.name.endswith(spec.file_ending)
                assert case.label.name.endswith(spec.file_ending)
    dicom = [c for s in sources for c in _cases(s)[0] if c.image.is_dir()]
    assert len(dicom) >= 2


def test_declared_labels_are_the_labels_present(collection: Collection) -> None:
    _, sources = collection
    for source in sources:
        cases, labels = _cases(source)
        present = Counter()
        for case in cases:
            values = set(np.unique(_label_array(case)).tolist())
            assert values <= {0, *labels}, f"{case.label} holds undeclared labels"
            present.update(values - {0})
        for value, name in labels.items():
            assert present[value] >= len(cases) / 2, f"{source['name']}: {name} is missing from most cases"


def test_images_match_their_labels_and_modality(collection: Collection) -> None:
    _, sources = collection
    for source in sources:
        spec = _spec(source)
        for case in _cases(source)[0]:
            image, label = read_image(case.image), read_image(case.label)
            assert image.GetSize() == label.GetSize()
            np.testing.assert_allclose(image.GetOrigin(), label.GetOrigin(), atol=1e-3)
            np.testing.assert_allclose(image.GetSpacing(), label.GetSpacing(), atol=1e-4)
            np.testing.assert_allclose(image.GetDirection(), label.GetDirection(), atol=1e-5)
            pixels = sitk.GetArrayFromImage(image).astype(np.float64)
            labels = sitk.GetArrayFromImage(label)
            assert np.isfinite(pixels).all()
            if spec.modality == "CT":
                assert np.percentile(pixels, 2) < -900, "no air around the body"
                assert pixels.max() > 400, "no bone"
                for value, name in enumerate(spec.classes, start=1):
                    median = np.median(pixels[labels == value])
                    bony = name in {"spine", "sacrum", "hip_left", "hip_right"}
                    assert median > 150 if bony else -50 < median < 250, (case.image, name, median)
            elif spec.modality == "MR":
                assert pixels.min() >= 0 and np.percentile(pixels, 99) > 200
            else:
                bladder = spec.classes.index("bladder") + 1
                assert np.median(pixels[labels == bladder]) > 3 * np.median(pixels[pixels > 0.1])


def test_geometry_varies_like_real_collections(collection: Collection) -> None:
    _, sources = collection
    spacings, directions = [], []
    for source in sources:
        for case in _cases(source)[0]:
            label = read_image(case.label)
            spacings.append(label.GetSpacing())
            directions.append(np.asarray(label.GetDirection()).reshape(3, 3))
            assert np.prod(label.GetSize()) <= 1_300_000, f"{case.label}: too many voxels for CPU training"
            extent = np.asarray(label.GetSize()) * np.asarray(label.GetSpacing())
            assert np.all((extent > 90) & (extent < 320)), f"{case.label}: field of view {extent} mm"
    spacings = np.asarray(spacings)
    assert 0.7 <= spacings.min() < 1.0 and 4.0 < spacings.max() <= 5.0
    assert (spacings.max(axis=1) / spacings.min(axis=1)).max() > 3, "no strongly anisotropic scan"
    assert any(np.allclose(d, np.eye(3), atol=1e-6) for d in directions)
    assert any(np.allclose(d, np.diag([-1.0, -1.0, 1.0]), atol=1e-6) for d in directions)
    oblique = [d for d in directions if not np.allclose(np.abs(d), np.round(np.abs(d)), atol=1e-3)]
    assert oblique
    for d in oblique:
        tilt = np.degrees(np.arccos(np.clip(np.abs(np.diag(d)), 0, 1)))
        assert tilt.max() >= 10 and tilt.max() <= 40


def test_same_concept_lands_in_the_same_body_region(collection: Collection) -> None:
    """A concept's world centroid agrees across datasets whose grids differ in direction and spacing."""
    _, sources = collection
    by_name = {s["name"]: s for s in sources}
    checks = {
        "liver": (["TrunkCT", "AbdomenCT", "LiverTumourCT", "AbdomenMR"], np.array([-42.0, 2.0, 62.0])),
        "bladder": (["PelvisMR", "PelvisCT", "LesionPET"], np.array([0.0, -32.0, -100.0])),
        "kidney_left": (["KidneyTumourCT", "AbdomenCT", "LesionPET"], np.array([47.0, 40.0, 16.0])),
    }
    for concept, (datasets, nominal) in checks.items():
        centroids = []
        for dataset in datasets:
            value = SPECS[dataset].classes.index(concept) + 1
            for case in _cases(by_name[dataset])[0]:
                centroids.append(_world_centroid(read_image(case.label), value))
        centroids = np.asarray(centroids)
        # Subjects differ (pose ±6 mm, organ ±5 mm, size), and a FOV may clip an organ, but never by 30 mm.
        assert np.all(np.linalg.norm(centroids - nominal, axis=1) < 30), (concept, centroids)
        assert np.ptp(centroids[:, 0]) < 40 and np.ptp(centroids[:, 2]) < 40


def test_subjects_with_two_sequences_share_anatomy(collection: Collection) -> None:
    _, sources = collection
    source = next(s for s in sources if _spec(s).sequences_per_subject > 1)
    cases = _cases(source)[0]
    subjects = Counter(c.subject_id for c in cases)
    assert all(count == _spec(source).sequences_per_subject for count in subjects.values())
    first, second = (c for c in cases if c.subject_id == cases[0].subject_id)
    liver = _spec(source).classes.index("liver") + 1
    spleen = _spec(source).classes.index("spleen") + 1
    ratios = []
    reference = _world_centroid(read_image(first.label), liver)
    for case in (first, second):
        label, image = read_image(case.label), sitk.GetArrayFromImage(read_image(case.image)).astype(float)
        assert np.linalg.norm(_world_centroid(label, liver) - reference) < 3
        labels = sitk.GetArrayFromImage(label)
        ratios.append(np.median(image[labels == liver]) / np.median(image[labels == spleen]))
    assert ratios[0] > 1 > ratios[1], "T1 and T2 should invert the liver/spleen contrast"


def test_any_case_renders_alone(collection: Collection) -> None:
    _, sources = collection
    source = next(s for s in sources if s["name"] == "LiverTumourCT")
    case = _cases(source)[0][1]
    image, label = render_case(SPECS["LiverTumourCT"], seed=0, subject=1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), _label_array(case))
    stored = sitk.GetArrayFromImage(read_image(case.image))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), stored)


@pytest.mark.parametrize("subject", [6, 7])
def test_tumours_relabel_only_their_own_organ(subject: int) -> None:
    """AbdomenCT labels organs but not tumours, so its incidental tumours must leave the label map as it is.

    Kidney tumours lay up to 77% outside the kidney and a liver tumour covered the IVC drawn through the
    liver, so spleen, IVC and spine voxels became kidney_left or liver (subjects 6 and 7 at seed 0).
    """
    spec = SPECS["AbdomenCT"]
    frame, structures = build_subject(case_rng(0, spec, subject, _STREAM_ANATOMY), spec.classes)
    assert any(structure.name in PATHOLOGY for structure in structures)
    geometry = scan_geometry(spec, frame, case_rng(0, spec, subject, 1), size_scale=0.5)
    healthy = [structure for structure in structures if structure.name not in PATHOLOGY]
    labels = label_values(structures, spec.classes)[paint(structures, geometry, frame)[0]]
    healthy_labels = label_values(healthy, spec.classes)[paint(healthy, geometry, frame)[0]]
    changed = labels != healthy_labels
    relabelled = Counter(
        (spec.classes[before - 1] if before else "unlabelled", spec.classes[after - 1])
        for before, after in zip(healthy_labels[changed], labels[changed], strict=True)
    )
    assert not relabelled, f"tumours relabelled (before, after): voxels {dict(relabelled)}"


def _fingerprints(root: Path) -> dict[str, str]:
    """sha256 per file, DICOM slices and the stamp (which records every checksum) included."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_generation_is_deterministic(tmp_path: Path) -> None:
    """Byte for byte, DICOM series too: their UIDs were random, so each run had other checksums."""
    small = {"cases_per_dataset": 1, "size_scale": 0.4}
    generate_collection(tmp_path / "a", seed=7, **small)
    generate_collection(tmp_path / "b", seed=7, **small)
    generate_collection(tmp_path / "c", seed=8, **small)
    first, second, other = (_fingerprints(tmp_path / n) for n in "abc")
    assert first == second
    assert any(k.startswith("TrunkCT/images/") and k.endswith(".dcm") for k in first)
    labels = [k for k in first if "labels" in k and not k.endswith(".json")]
    assert labels and all(first[k] != other.get(k) for k in labels)


# Digests of an MR case (bias field) and a CT case (labels: shapes, rasterisation), printed by a subprocess.
_RENDER_DIGESTS = """
import hashlib, sys
import SimpleITK as sitk
from iris_pipelines.phantoms import default_specs, render_case
for spec in default_specs():
    if spec.name in sys.argv[1:]:
        for volume in render_case(spec, seed=0, subject=0, size_scale=0.5):
            print(spec.name, hashlib.sha256(sitk.GetArrayViewFromImage(volume).tobytes()).hexdigest())
"""


def _has_avx512() -> bool:
    found = np.show_config(mode="dicts").get("SIMD Extensions", {}).get("found", [])
    return bool({"X86_V4", "AVX512_SKX"} & set(found))


@pytest.mark.skipif(not _has_avx512(), reason="comparing OpenBLAS's SkylakeX kernels needs an AVX-512 CPU")
def test_phantoms_do_not_depend_on_the_blas_kernel() -> None:
    """OpenBLAS picks its kernels by CPU (SkylakeX here, Haswell on an AVX2 node), and a float32 matrix
    product in the MR bias field rounded differently with each: the same seed gave other MR images."""
    outputs = []
    for core in ("SkylakeX", "Haswell"):
        env = {**os.environ, "OPENBLAS_CORETYPE": core, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(
            [sys.executable, "-c", _RENDER_DIGESTS, "PelvisMR", "KidneyTumourCT"],
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert len(outputs[0].splitlines()) == 4
    assert outputs[0] == outputs[1]


def test_second_call_reuses_and_changed_parameters_regenerate(collection: Collection, tmp_path: Path) -> None:
    root, sources = collection
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert generate_collection(root, seed=0, cases_per_dataset=2) == sources
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before

    specs = [SPECS["PelvisMR"], SPECS["TrunkCT"]]
    small = tmp_path / "small"
    generate_collection(small, cases_per_dataset=3, size_scale=0.3, specs=specs)
    stamp = json.loads((small / STAMP_NAME).read_text())
    assert stamp["params"]["cases_per_dataset"] == 3
    assert all((small / f["path"]).is_file() for f in stamp["files"])
    generate_collection(small, cases_per_dataset=2, size_scale=0.3, specs=specs)
    assert len(list((small / "Dataset005_PelvisMR" / "imagesTr").glob("*.nrrd"))) == 2, "stale cases linger"
    missing = small / "Dataset005_PelvisMR" / "labelsTr" / "pelvis_001.nrrd"
    missing.unlink()
    generate_collection(small, cases_per_dataset=2, size_scale=0.3, specs=specs)
    assert missing.is_file()


def test_a_file_changed_in_place_regenerates(tmp_path: Path) -> None:
    """The stamp compared sizes only, so a corrupted file of the same size was trusted forever."""
    specs = [SPECS["PelvisMR"]]
    generate_collection(tmp_path, cases_per_dataset=1, size_scale=0.3, specs=specs)
    label = tmp_path / "Dataset005_PelvisMR" / "labelsTr" / "pelvis_000.nrrd"
    written = label.read_bytes()
    corrupted = bytearray(written)
    corrupted[-40] ^= 0xFF
    label.write_bytes(bytes(corrupted))
    generate_collection(tmp_path, cases_per_dataset=1, size_scale=0.3, specs=specs)
    assert label.read_bytes() == written


def _user_download(root: Path) -> Path:
    """A user's real MSD pancreas task, in the folder name the PancreasCT phantoms use."""
    scan = root / "Task07_Pancreas" / "imagesTr" / "pancreas_001.nii.gz"
    scan.parent.mkdir(parents=True)
    scan.write_bytes(b"my real scan, hours to download")
    (root / "Task07_Pancreas" / "dataset.json").write_text("{}")
    return scan


@pytest.mark.parametrize("stamp", ["none", "unreadable", "lists other folders"])
def test_a_dataset_folder_no_stamp_claims_is_refused_and_kept(tmp_path: Path, stamp: str) -> None:
    """Every spec folder was deleted whenever the stamp was missing or stale, a real download included."""
    if stamp == "unreadable":
        (tmp_path / STAMP_NAME).write_text('{"generator": "iris_pipelines.phantoms", "folders": ["Task07_')
    elif stamp == "lists other folders":
        generate_collection(tmp_path, cases_per_dataset=1, size_scale=0.3, specs=[SPECS["PelvisMR"]])
    before = _fingerprints(tmp_path)
    scan = _user_download(tmp_path)
    specs = [SPECS["PelvisMR"], SPECS["PancreasCT"]]
    with pytest.raises(FileExistsError, match="Task07_Pancreas") as raised:
        generate_collection(tmp_path, cases_per_dataset=1, size_scale=0.3, specs=specs)
    assert "another root" in str(raised.value) and "move the folder" in str(raised.value)
    assert scan.read_bytes() == b"my real scan, hours to download"
    # Refused before anything was touched: an earlier collection and its stamp are as they were.
    assert {k: v for k, v in _fingerprints(tmp_path).items() if not k.startswith("Task07")} == before


def test_an_interrupted_generation_is_taken_up_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders half written when a run was stopped belong to the generator: the next run regenerates them
    rather than refusing them as someone else's, the first time and on a regeneration alike."""
    from iris_pipelines.phantoms import collection as module

    specs = [SPECS["PelvisMR"]]
    generate_collection(tmp_path / "clean", cases_per_dataset=2, size_scale=0.3, specs=specs)
    write_image = module.write_image

    def stop_at_the_third_file(*args: Any, **kwargs: Any) -> Any:
        written.append(args[1])
        if len(written) == 3:
            raise KeyboardInterrupt
        return write_image(*args, **kwargs)

    root = tmp_path / "stopped"
    for params in ({"cases_per_dataset": 2}, {"cases_per_dataset": 3}):  # first run, then a regeneration
        written: list[Path] = []
        monkeypatch.setattr(module, "write_image", stop_at_the_third_file)
        with pytest.raises(KeyboardInterrupt):
            generate_collection(root, size_scale=0.3, specs=specs, **params)
        monkeypatch.undo()
        assert (root / "Dataset005_PelvisMR" / "imagesTr").is_dir(), "interrupted mid-dataset"
        generate_collection(root, size_scale=0.3, specs=specs, cases_per_dataset=2)
        assert _fingerprints(root) == _fingerprints(tmp_path / "clean")


def test_a_dataset_dropped_from_the_specs_is_removed(tmp_path: Path) -> None:
    """Folders the stamp lists are the generator's, so a dataset no longer asked for does not linger."""
    generate_collection(tmp_path, cases_per_dataset=1, size_scale=0.3, specs=[SPECS["PelvisMR"]])
    generate_collection(tmp_path, cases_per_dataset=1, size_scale=0.3, specs=[SPECS["LesionPET"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task11_LesionPET", STAMP_NAME]


@pytest.mark.parametrize("size_scale", [float("nan"), float("inf"), 0.0, -1, "1.0", True])
def test_size_scale_must_be_a_finite_number_above_0(tmp_path: Path, size_scale: object) -> None:
    """NaN passed `size_scale <= 0` and wrote 8³ volumes with NaN origins; inf died in Geometry."""
    with pytest.raises(ValueError, match="size_scale"):
        generate_collection(
            tmp_path / "p", cases_per_dataset=1, size_scale=size_scale, specs=[SPECS["PelvisMR"]]
        )  # type: ignore[arg-type]
    assert not (tmp_path / "p").exists()


def test_size_scale_1_and_1_0_write_the_same_bytes(tmp_path: Path) -> None:
    """`kedro run --params phantoms.size_scale=1` (an int) and `iris phantoms --size-scale 1` (a float)
    make one collection, yet the DICOM UIDs were seeded from "1" and "1.0": other bytes, same stamp."""
    small_trunk = dataclasses.replace(SPECS["TrunkCT"], fov_mm=(40, 36, 30), dicom_cases=1)
    for name, size_scale in (("int", 1), ("float", 1.0)):
        generate_collection(tmp_path / name, cases_per_dataset=1, size_scale=size_scale, specs=[small_trunk])
    as_int, as_float = _fingerprints(tmp_path / "int"), _fingerprints(tmp_path / "float")
    assert any(k.endswith(".dcm") for k in as_int)
    assert as_int == as_float
    assert json.loads((tmp_path / "int" / STAMP_NAME).read_text())["params"]["size_scale"] == 1.0
