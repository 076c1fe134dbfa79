"""`iris segment` as a user calls it: raw scans in any geometry and format in, a label map that overlays
the scan in world coordinates out, with a JSON sidecar; clear one-line errors for inputs that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

import iris_pipelines
import iris_pipelines.segment as segment_module
from iris_pipelines.cli import main
from iris_pipelines.evaluation import ModelInfo, build_task_embeddings
from iris_pipelines.evaluation.embeddings import embedding_tensor
from iris_pipelines.imaging import Geometry, InvalidInputError, read_image, write_dicom_series, write_image
from iris_pipelines.imaging.io import file_sha256
from iris_pipelines.inference import prepare_image, prepare_label
from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.segment import (
    ReferenceSpec,
    SegmentError,
    SegmentResult,
    class_names,
    read_class_names,
    read_embeddings,
    read_reference,
    require_embeddings_fit,
    scans_in,
    sidecar_path,
    stored_task,
)
from iris_pipelines.training.sampler import case_records

OBLIQUE = Rotation.from_euler("xy", [20.0, 20.0], degrees=True).as_matrix()
CENTRE = np.array([2.0, 4.0, 9.0])  # the blob's world centre (mm), shared by every scan
SPACING = ["--spacing", "1.0", "--roi", "32"]  # small volumes: a 1 mm grid keeps the window > 16 voxels
PARAMS = {"target_spacing": [1.0, 1.0, 1.0]}  # what --spacing 1.0 resolves to (CT window: the default)


def make_scan(spacing, origin, direction, size=(28, 24, 14), value=5) -> tuple[sitk.Image, sitk.Image]:
    """A CT-like scan with an ellipsoid at :data:`CENTRE` (world), and its label map (``value``)."""
    geometry = Geometry(size, spacing, origin, tuple(np.asarray(direction).ravel()))
    ijk = np.stack(np.meshgrid(*(np.arange(s) for s in size), indexing="ij"), -1).reshape(-1, 3)
    world = geometry.index_to_world(ijk)
    inside = (((world - CENTRE) / np.array([6.0, 7.0, 8.0])) ** 2).sum(axis=1) <= 1.0
    inside = inside.reshape(size).transpose(2, 1, 0)  # (x, y, z) → [z, y, x]
    image = sitk.GetImageFromArray(np.where(inside, 300.0, -800.0).astype(np.float32))
    label = sitk.GetImageFromArray((inside * value).astype(np.uint8))
    return geometry.apply_to(image), geometry.apply_to(label)


def _centred_origin(spacing, direction, size) -> tuple[float, ...]:
    """Origin that puts the grid's centre at CENTRE, so the blob lies well inside."""
    half = (np.asarray(size) - 1) / 2 * np.asarray(spacing)
    return tuple(CENTRE - np.asarray(direction) @ half)


@pytest.fixture(scope="module")
def files(tmp_path_factory, untrained_bundle) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segment")
    paths: dict[str, Path] = {}
    # The query: oblique (no axis parallel to a world axis) and anisotropic, as NIfTI and as DICOM.
    q_spacing, q_size = (0.8, 1.1, 2.5), (28, 24, 14)
    query, truth = make_scan(q_spacing, _centred_origin(q_spacing, OBLIQUE, q_size), OBLIQUE, q_size)
    paths["query"], paths["truth"] = root / "scan.nii.gz", root / "scan_labels.nii.gz"
    write_image(query, paths["query"])
    write_image(truth, paths["truth"])
    paths["dicom"] = root / "scan_dicom"
    write_dicom_series(query, paths["dicom"])
    # References on other grids: LPS-flipped axes (MHA) and identity at 1.2 mm (NRRD).
    flip = np.diag([-1.0, -1.0, 1.0])
    for name, spacing, direction, suffix in (
        ("ref_a", (1.0, 1.2, 2.0), flip, ".mha"),
        ("ref_b", (1.2, 1.2, 1.2), np.eye(3), ".nrrd"),
    ):
        image, label = make_scan(
            spacing, _centred_origin(spacing, direction, (24, 22, 16)), direction, (24, 22, 16)
        )
        paths[name], paths[f"{name}_label"] = root / f"{name}{suffix}", root / f"{name}_labels{suffix}"
        write_image(image, paths[name])
        write_image(label, paths[f"{name}_label"])
    (root / "ref_a_labels.json").write_text(json.dumps({"5": "liver"}))
    paths["bundle"] = untrained_bundle.save(root / "bundle")
    return paths


def invoke(*args: str):
    return CliRunner().invoke(main, ["segment", *map(str, args)])


def _reference(files, name="ref_a") -> list[str]:
    return ["--reference", f"{files[name]}:{files[name + '_label']}"]


def _world_centroid(label: sitk.Image, value: int) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayViewFromImage(label) == value)
    return Geometry.from_image(label).index_to_world(zyx[:, ::-1].astype(float)).mean(axis=0)


def _check_sidecar(out: Path, written: sitk.Image) -> dict:
    sidecar = json.loads(sidecar_path(out).read_text())
    voxel_ml = float(np.prod(written.GetSpacing())) / 1000.0
    array = sitk.GetArrayViewFromImage(written)
    for row in sidecar["classes"]:
        assert row["voxels"] == int((array == row["label"]).sum())
        assert row["volume_ml"] == pytest.approx(row["voxels"] * voxel_ml)
    return sidecar


@pytest.mark.parametrize("query", ["query", "dicom"])
def test_label_map_has_the_query_geometry_and_a_sidecar(files, tmp_path, query, one_torch_thread) -> None:
    out = tmp_path / "labels.nii.gz"
    result = invoke(
        "--image", files[query], *_reference(files), *_reference(files, "ref_b"),
        "--model", files["bundle"], "--strategy", "ensemble", "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written, scan = read_image(out), read_image(files[query])
    assert Geometry.from_image(written).same_grid(
        Geometry.from_image(scan), atol_mm=1e-4, atol_direction=1e-6
    )
    assert written.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(written))) <= {0, 5}
    sidecar = _check_sidecar(out, written)
    assert sidecar_path(out) == tmp_path / "labels.json"
    assert [(c["label"], c["name"]) for c in sidecar["classes"]] == [(5, "liver")]  # ref_a_labels.json
    assert sidecar["model"] == str(files["bundle"]) and sidecar["strategy"] == "ensemble"
    assert sidecar["preprocess"]["target_spacing"] == [1.0, 1.0, 1.0]
    assert len(sidecar["references"]) == 2 and "liver" in result.output


def test_tuning_refines_the_ensemble_on_the_references(files, tmp_path, one_torch_thread) -> None:
    out = tmp_path / "tuned.nii.gz"
    result = invoke(
        "--image", files["query"], *_reference(files), *_reference(files, "ref_b"),
        "--model", files["bundle"], "--strategy", "tuning", "--tuning-steps", "2",
        "--labels", files["ref_a"].parent / "ref_a_labels.json", "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Geometry.from_image(read_image(out)).same_grid(Geometry.from_image(read_image(files["query"])))
    sidecar = _check_sidecar(out, read_image(out))
    assert sidecar["strategy"] == "tuning"
    assert sidecar["tuning"] == {"steps": 2, "lr": segment_module.SegmentRequest.tuning_lr}


def _known_prediction(files, monkeypatch, query: Path) -> None:
    """Replace the network by a perfect model: the reference mask resampled (in world space) onto the
    query's canonical grid, as logits. What remains is the CLI path from canonical grid to the file.
    Another volume (a reference, segmented by the reference check) gets its bright blob."""

    def fake_make_predictor(model, task, **kwargs):
        def predict(volume: torch.Tensor) -> torch.Tensor:
            canonical = prepare_image(read_image(query), "CT", PARAMS)
            if tuple(volume.shape[2:]) != canonical.array.shape:  # not the query: a reference
                return torch.where(volume > 0, 10.0, -10.0)
            mask = prepare_label(read_image(files["ref_a_label"]), canonical) == 5
            return torch.from_numpy(np.where(mask, 10.0, -10.0).astype(np.float32))[None, None]

        return predict

    monkeypatch.setattr(segment_module, "make_predictor", fake_make_predictor)


@pytest.mark.parametrize("query", ["query", "dicom"])
def test_a_known_prediction_lands_on_the_blob_in_world_coordinates(
    files, tmp_path, query, monkeypatch
) -> None:
    _known_prediction(files, monkeypatch, files[query])
    out = tmp_path / "labels.mha"
    result = invoke(
        "--image", files[query], *_reference(files), "--model", files["bundle"], "--strategy", "one_shot",
        "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written, truth = read_image(out), read_image(files["truth"])
    assert Geometry.from_image(written).same_grid(
        Geometry.from_image(truth), atol_mm=1e-4, atol_direction=1e-6
    )
    predicted, expected = sitk.GetArrayViewFromImage(written) == 5, sitk.GetArrayViewFromImage(truth) == 5
    dice = 2 * (predicted & expected).sum() / (predicted.sum() + expected.sum())
    assert dice > 0.85, dice
    # Centroids compared in the query's own voxel units: within half a voxel on every axis.
    geometry = Geometry.from_image(truth)
    offset = geometry.world_to_index(_world_centroid(written, 5)) - geometry.world_to_index(
        _world_centroid(truth, 5)
    )
    assert np.all(np.abs(offset) <= 0.5), offset
    assert np.linalg.norm(_world_centroid(written, 5) - CENTRE) < 1.0
    _check_sidecar(out, written)
    assert (tmp_path / "labels.json").is_file()


def test_probabilities_are_saved_beside_the_label_map_on_the_scan_grid(files, tmp_path, monkeypatch) -> None:
    """--save-probabilities (nnU-Net's --save_probabilities): a 4-D float image whose 3-D affine is the label
    map's, so any viewer or nibabel overlays it; thresholding it gives the label map."""
    _known_prediction(files, monkeypatch, files["query"])
    out = tmp_path / "labels.nii.gz"
    result = invoke(
        "--image", files["query"], *_reference(files), "--model", files["bundle"], "--strategy", "one_shot",
        "--out", out, "--save-probabilities", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    path = tmp_path / "labels_probabilities.nii.gz"
    assert f"probabilities:{path}" in "".join(result.output.split())  # rich wraps long paths
    sidecar = _check_sidecar(out, read_image(out))
    assert sidecar["probabilities"]["path"] == str(path) and sidecar["probabilities"]["order"] == [5]
    soft, labels = nibabel.load(path), nibabel.load(out)
    assert soft.shape == (*labels.shape, 1) and soft.get_data_dtype() == np.float32
    np.testing.assert_allclose(soft.affine, labels.affine, atol=1e-4)
    probability = np.asarray(soft.dataobj)[..., 0]
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    assert np.mean((probability > 0.5) == (np.asarray(labels.dataobj) == 5)) > 0.999


def test_a_corrected_output_serves_as_the_next_reference(files, tmp_path, monkeypatch) -> None:
    """Segment, fix the mask, reuse it: the output's own sidecar names the classes, and odd file names
    (brackets, an upper-case suffix) are written and printed as given."""
    _known_prediction(files, monkeypatch, files["query"])
    first = tmp_path / "first [v1].MHA"
    result = invoke(
        "--image", files["query"], *_reference(files), "--model", files["bundle"], "--strategy", "one_shot",
        "--out", first, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert first.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "first [v1].MHA",
        "first [v1].json",
    ]
    assert "".join(str(first).split()) in "".join(result.output.split())  # not read as markup
    second = tmp_path / "second.nii.gz"
    result = invoke(
        "--image", files["query"], "--reference", f"{files['query']}:{first}", "--model", files["bundle"],
        "--strategy", "one_shot", "--out", second, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [(c["label"], c["name"]) for c in _check_sidecar(second, read_image(second))["classes"]] == [
        (5, "liver")
    ]


@pytest.mark.parametrize("clash", ["the scan", "the reference label", "the class names"])
def test_an_output_that_would_replace_an_input_is_refused(files, tmp_path, monkeypatch, clash) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("started although an output would replace an input")

    monkeypatch.setattr(segment_module, "prepare_task", no_work)
    scan, label = tmp_path / "scan.nii.gz", tmp_path / "ref_labels.mha"
    shutil.copy(files["query"], scan)
    shutil.copy(files["ref_a_label"], label)
    names = tmp_path / "organs.json"
    names.write_text(json.dumps({"5": "liver"}))
    out, expected = {
        "the scan": (scan, f"{scan} would overwrite the scan {scan}"),
        "the reference label": (label, f"{label} would overwrite the input {label}"),
        "the class names": (tmp_path / "organs.nii.gz", f"{names} would overwrite the input {names}"),
    }[clash]
    result = invoke(
        "--image", scan, "--reference", f"{files['ref_a']}:{label}", "--labels", names,
        "--model", files["bundle"], "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert names.read_text() == json.dumps({"5": "liver"})


def test_a_reference_label_whose_name_holds_a_colon(files, tmp_path, one_torch_thread) -> None:
    label = tmp_path / "labels:v2.mha"
    shutil.copy(files["ref_a_label"], label)
    out = tmp_path / "o.nii.gz"
    result = invoke(
        "--image", files["query"], "--reference", f"{files['ref_a']}:{label}", "--model", files["bundle"],
        "--strategy", "one_shot", "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_class_names_from_a_dataset_json_with_a_bom_and_an_ignore_label(tmp_path) -> None:
    """nnU-Net's dataset.json as ingest reads it: a byte-order mark, and "ignore", which names no class."""
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 5, "ignore": 9}}), encoding="utf-8-sig")
    assert read_class_names(path) == {5: "liver"}


def test_the_batch_table_keeps_two_classes_of_one_name() -> None:
    result = SegmentResult(Path("o.nii.gz"), Path("o.json"), {"classes": [
        {"label": 1, "name": "kidney", "volume_ml": 1.0}, {"label": 2, "name": "kidney", "volume_ml": 2.0},
        {"label": 3, "name": "liver", "volume_ml": 3.0},
    ]})  # fmt: skip
    row = segment_module._summary_row(Path("scan.nii.gz"), Path("o.nii.gz"), result)
    assert (row["kidney [1] (ml)"], row["kidney [2] (ml)"], row["liver (ml)"]) == (1.0, 2.0, 3.0)


def test_unreadable_scan_is_named_in_one_line(files, tmp_path) -> None:
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    result = invoke(
        "--image", empty, *_reference(files), "--model", files["bundle"], "--out", tmp_path / "o.nii.gz"
    )
    assert result.exit_code == 2
    assert f"{empty}: the file is empty (0 bytes)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.nii.gz").exists()


def test_reference_label_on_another_grid_is_refused(files, tmp_path) -> None:
    label = read_image(files["ref_a_label"])
    label.SetOrigin(tuple(np.asarray(label.GetOrigin()) + 5.0))
    moved = tmp_path / "moved_labels.mha"
    write_image(label, moved)
    result = invoke(
        "--image", files["query"], "--reference", f"{files['ref_a']}:{moved}", "--model", files["bundle"],
        "--out", tmp_path / "o.nii.gz", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 2
    assert str(moved) in result.output and "different grids: origin" in result.output


def test_a_class_missing_from_a_reference_is_refused(files, tmp_path) -> None:
    result = invoke(
        "--image", files["query"], *_reference(files), "--classes", "5,7", "--model", files["bundle"],
        "--out", tmp_path / "o.nii.gz", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "no voxel of class(es) [7] (it holds [5])" in result.output
    assert str(files["ref_a_label"]) in result.output


@pytest.fixture(scope="module")
def other_labels(files) -> dict[str, Path]:
    """A reference from another label set: the blob labelled 3, not 5 (as two datasets name one organ)."""
    spacing, size = (1.1, 1.1, 1.5), (24, 22, 16)
    image, label = make_scan(spacing, _centred_origin(spacing, np.eye(3), size), np.eye(3), size, value=3)
    paths = {
        "image": files["ref_a"].parent / "ref_c.nii.gz",
        "label": files["ref_a"].parent / "ref_c_labels.nii.gz",
    }
    write_image(image, paths["image"])
    write_image(label, paths["label"])
    return paths


def _other(other_labels) -> list[str]:
    return ["--reference", f"{other_labels['image']}:{other_labels['label']}"]


def _prepared(files, specs, strategy="ensemble", **options) -> segment_module.PreparedTask:
    request = segment_module.SegmentRequest(
        references=[segment_module.ReferenceSpec(*spec) for spec in specs], strategy=strategy,
        roi_size=(32, 32, 32), reference_check=False, **options,
    )  # fmt: skip
    return segment_module.prepare_task(request, ModelBundle.load(files["bundle"]), (PARAMS, "test"))


def test_an_ensemble_takes_each_class_from_the_references_that_show_it(files, other_labels) -> None:
    """As evaluate's ensemble and the pyfunc: class 5 is the mean over the two references that label it,
    class 3 comes from the one that does; none of them needs every class."""
    a, b = (files["ref_a"], files["ref_a_label"]), (files["ref_b"], files["ref_b_label"])
    c = (other_labels["image"], other_labels["label"])
    prepared = _prepared(files, [a, b, c])
    assert prepared.labels == [3, 5]
    assert [ref["classes"] for ref in prepared.references] == [[5], [5], [3]]
    alone = {name: _prepared(files, [spec], "one_shot").task for name, spec in (("a", a), ("b", b), ("c", c))}
    torch.testing.assert_close(prepared.task[:, 0], alone["c"][:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        prepared.task[:, 1], (alone["a"][:, 0] + alone["b"][:, 0]) / 2, rtol=0, atol=1e-6
    )
    # Two references that both show every class: the plain mean of the two.
    both = _prepared(files, [a, b])
    torch.testing.assert_close(both.task, (alone["a"] + alone["b"]) / 2, rtol=0, atol=1e-6)


def test_an_ensemble_of_references_with_different_classes_segments_them_all(
    files, other_labels, tmp_path, one_torch_thread
) -> None:
    out = tmp_path / "o.nii.gz"
    result = invoke(
        "--image", files["query"], *_reference(files), *_other(other_labels),
        "--model", files["bundle"], "--strategy", "tuning", "--tuning-steps", "1", "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = _check_sidecar(out, read_image(out))
    assert [c["label"] for c in sidecar["classes"]] == [3, 5]
    assert [(r["label"], r["classes"]) for r in sidecar["references"]] == [
        (str(files["ref_a_label"]), [5]),
        (str(other_labels["label"]), [3]),
    ]
    checked = sidecar["reference_check"]["references"]
    assert checked[0]["dice"]["3"] is None and checked[1]["dice"]["5"] is None  # not shown: not scored


def test_an_ensemble_class_no_reference_shows_is_refused(files, other_labels, tmp_path) -> None:
    common = (
        "--image", files["query"], *_reference(files), *_reference(files, "ref_b"),
        "--model", files["bundle"],
    )  # fmt: skip
    result = invoke(*common, "--classes", "5,7", "--out", tmp_path / "o.nii.gz", *SPACING)
    assert result.exit_code == 2
    assert "class(es) [7]: no reference shows them" in result.output
    assert f"{files['ref_b_label']}: [5]" in result.output and "Traceback" not in result.output
    # A reference that shows none of the classes asked for adds nothing: named, not silently dropped.
    result = invoke(
        *common, *_other(other_labels), "--classes", "5",
        "--out", tmp_path / "o.nii.gz", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 2
    assert (
        f"{other_labels['label']}" in result.output
        and "no voxel of class(es) [5] (it holds [3])" in result.output
    )
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_class_asked_for_twice_is_segmented_once(files, tmp_path) -> None:
    out = tmp_path / "o.nii.gz"
    result = invoke(
        "--image", files["query"], *_reference(files), "--classes", "5,5", "--model", files["bundle"],
        "--out", out, "--save-probabilities", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(sidecar_path(out).read_text())
    assert [c["label"] for c in sidecar["classes"]] == [5]
    assert sidecar["probabilities"]["order"] == [5]


def test_a_reference_class_of_a_few_voxels_is_warned_about(tmp_path, caplog) -> None:
    """A structure that covers 2 voxels of the model's grid gives an embedding of a speck: say so."""
    image, label = make_scan((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), size=(20, 20, 20))
    array = sitk.GetArrayFromImage(label)
    array[2, 2, 2:4] = 6  # two voxels, far from the blob of class 5
    speck = sitk.GetImageFromArray(array)
    speck.CopyInformation(label)
    write_image(image, tmp_path / "ref.nii.gz")
    write_image(speck, tmp_path / "ref_labels.nii.gz")
    spec = segment_module.ReferenceSpec(tmp_path / "ref.nii.gz", tmp_path / "ref_labels.nii.gz")
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        segment_module.read_reference(spec, None, "CT", {"target_spacing": [2.0, 2.0, 2.0]})
    assert f"{spec.label}: class 6 covers only 2 voxel(s) of the model's 2×2×2 mm grid" in caplog.text
    assert "class 5" not in caplog.text


def test_bundle_without_weights_and_unreachable_registry(files, tmp_path) -> None:
    broken = tmp_path / "broken_bundle"
    broken.mkdir()
    (broken / "config.json").write_text((files["bundle"] / "config.json").read_text())
    common = ["--image", files["query"], *_reference(files), "--out", tmp_path / "o.nii.gz"]
    result = invoke(*common, "--model", broken)
    assert result.exit_code == 2 and "weights.safetensors is missing" in result.output
    missing_db = tmp_path / "nowhere" / "mlflow.db"
    result = invoke(*common, "--model", "models:/iris/3", "--tracking-uri", f"sqlite:///{missing_db}")
    assert result.exit_code == 2 and f"no MLflow database at {missing_db}" in result.output
    assert not missing_db.exists()  # nothing created where the user pointed by mistake


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory, untrained_bundle, collection) -> Path:
    manifest, index = collection
    table = build_task_embeddings(
        untrained_bundle.build_model(), untrained_bundle.class_ids, index, case_records(manifest),
        references_per_class=2, roi_size=(32, 32, 32), seed=0,
        model_info=ModelInfo("models:/iris/1", "1", "f00d"),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("embeddings") / "task_embeddings.parquet"
    table.to_parquet(path)
    return path


def test_stored_ensemble_is_the_mean_of_the_reference_rows(embeddings, untrained_bundle) -> None:
    import pandas as pd

    table = pd.read_parquet(embeddings)
    model = untrained_bundle.build_model()
    task, labels, names, dataset = stored_task(model, table, "alpha", "ensemble", None)
    assert labels == [1, 2] and names == {1: "liver", 2: "spleen"} and dataset == "alpha"
    rows = table[(table.dataset == "alpha") & (table.label == 2) & (table.source == "reference")]
    mean = np.stack(rows.embedding).mean(axis=0).reshape(model.config.num_tokens, model.config.embed_dim)
    assert torch.allclose(task[0, 1], torch.from_numpy(mean), atol=1e-6)
    bank, *_ = stored_task(model, table, "alpha", "memory_bank", [2])
    assert torch.allclose(bank[0, 0], model.memory_bank[untrained_bundle.class_ids["alpha/2"]], atol=1e-6)


def test_stored_one_shot_takes_every_class_from_one_reference(embeddings, untrained_bundle, caplog) -> None:
    """embed_tasks draws each class's references on its own: the first row of each class may come from
    another scan, and one-shot means one reference scan."""
    table = pd.read_parquet(embeddings)
    model = untrained_bundle.build_model()
    references = table[(table.dataset == "alpha") & (table.source == "reference")]
    showing_both = sorted(c for c, rows in references.groupby("case_id") if set(rows.label) >= {1, 2})
    task, labels, *_ = stored_task(model, table, "alpha", "one_shot", None)
    one_case = references[references.case_id == showing_both[0]]
    for slot, label in enumerate(labels):
        row = one_case[one_case.label == label].iloc[0]
        assert torch.equal(task[0, slot], embedding_tensor(row.to_dict()))
    assert not caplog.records
    # Each class shown by a different case only (many classes drawn independently): each class's first
    # case serves, and the warning says the task does not come from one scan.
    first_rows = references.sort_values("case_id").groupby("label").head(1)
    split = pd.concat(
        [table[table.source != "reference"], first_rows.assign(case_id=first_rows.label.map(str))]
    )
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        task, labels, *_ = stored_task(model, split, "alpha", "one_shot", None)
    assert "no single reference case of dataset 'alpha' in the embeddings shows all of class(es) [1, 2]" in (
        caplog.text
    )
    assert "(1: 1, 2: 2), so not from one scan" in caplog.text
    for slot, label in enumerate(labels):
        row = first_rows[first_rows.label == label].iloc[0]
        assert torch.equal(task[0, slot], embedding_tensor(row.to_dict()))


def test_embeddings_of_another_model_are_refused(files, embeddings, tmp_path, untrained_bundle) -> None:
    """After a retrain with the same configuration the old table has the right shapes and the wrong
    meaning; evaluate refuses it, and so does iris segment."""
    retrained = ModelBundle(
        untrained_bundle.model_config, untrained_bundle.state_dict, untrained_bundle.class_ids,
        {**untrained_bundle.metadata, "weights_checksum": ["beef"]},
    ).save(tmp_path / "retrained")  # fmt: skip
    result = invoke(
        "--image", files["query"], "--embeddings", embeddings, "--dataset", "alpha", "--model", retrained,
        "--out", tmp_path / "o.nii.gz", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 2
    assert "embeddings of the model(s) with weights ['f00d'], but this model's weights are beef" in (
        " ".join(result.output.split())
    )
    assert not (tmp_path / "o.nii.gz").exists()


def test_embeddings_of_other_reference_windows_are_warned_about(embeddings, caplog) -> None:
    table = pd.read_parquet(embeddings)
    require_embeddings_fit(table, embeddings, "f00d", (32, 32, 32))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        require_embeddings_fit(table, embeddings, "f00d", (24, 24, 24))
    assert "encoded from [32, 32, 32]-voxel reference windows" in caplog.text


@pytest.mark.parametrize("strategy", ["ensemble", "memory_bank"])
def test_segment_from_stored_embeddings(files, embeddings, tmp_path, strategy, one_torch_thread) -> None:
    out = tmp_path / "seg.nrrd"
    result = invoke(
        "--image", files["query"], "--embeddings", embeddings, "--dataset", "alpha", "--classes", "2",
        "--strategy", strategy, "--model", files["bundle"], "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = read_image(out)
    assert Geometry.from_image(written).same_grid(Geometry.from_image(read_image(files["query"])))
    sidecar = _check_sidecar(out, written)
    assert [(c["label"], c["name"]) for c in sidecar["classes"]] == [(2, "spleen")]
    assert sidecar["dataset"] == "alpha" and sidecar["embeddings"] == str(embeddings)


def test_stored_embeddings_errors(files, embeddings, tmp_path) -> None:
    # --spacing: at the project's 6 mm the scan is too small for the network, which is refused first
    common = ["--image", files["query"], "--embeddings", embeddings, "--model", files["bundle"], *SPACING]
    result = invoke(*common, "--dataset", "omega", "--out", tmp_path / "o.nii.gz")
    assert result.exit_code == 2
    assert (
        "dataset 'omega' is not in the embeddings; known datasets: ['alpha', 'beta', 'gamma']"
        in result.output
    )
    result = invoke(*common, "--out", tmp_path / "o.nii.gz")
    assert result.exit_code == 2 and "choose one with --dataset" in result.output
    result = invoke(
        *common, "--dataset", "gamma", "--strategy", "memory_bank", "--out", tmp_path / "o.nii.gz"
    )
    assert result.exit_code == 2 and "no memory_bank row of dataset 'gamma'" in result.output  # held out
    result = invoke(*common, *_reference(files), "--out", tmp_path / "o.nii.gz")
    assert result.exit_code == 2 and "either --reference or --embeddings" in result.output


@pytest.mark.parametrize(
    "document",
    [{"1": "liver", "3": "kidney"}, {"labels": {"0": "background", "1": "liver", "3": "kidney"}},
     {"name": "x", "labels": {"background": 0, "liver": 1, "kidney": 3}}],
)  # fmt: skip
def test_class_names_from_a_sidecar_or_dataset_json(tmp_path, document) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(document))
    assert read_class_names(path) == {1: "liver", 3: "kidney"}
    assert sidecar_path(tmp_path / "a.b" / "labels.nii.gz") == tmp_path / "a.b" / "labels.json"
    assert sidecar_path(tmp_path / "labels.nrrd") == tmp_path / "labels.json"


def _versions(folder: Path, source: Path, versions: list[str]) -> list[Path]:
    """``folder`` as a versioned catalog entry holding ``source`` under each of ``versions``."""
    copies = []
    for version in versions:
        target = folder / version / folder.name
        target.parent.mkdir(parents=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
        copies.append(target)
    return copies


def test_a_versioned_model_folder_uses_its_newest_complete_version(files, tmp_path, monkeypatch) -> None:
    """``--model data/06_models/iris_model``: the catalog's folder of versions, as --embeddings takes its."""
    _known_prediction(files, monkeypatch, files["query"])
    folder = tmp_path / "06_models" / "iris_model"
    older, newer = _versions(
        folder, files["bundle"], ["2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"]
    )
    (newer / "config.json").unlink()  # a save that failed midway is never the newest
    out = tmp_path / "labels.nii.gz"
    common = ["--image", files["query"], *_reference(files), "--strategy", "one_shot", *SPACING]
    result = invoke(*common, "--model", folder, "--out", out)
    assert result.exit_code == 0, result.output
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["model"] == str(folder) and sidecar["model_path"] == str(older)
    assert sidecar["weights_sha256"] == "f00d" and sidecar["model_registry"] is None
    assert "2026-01-01T00.00.00.000Z" in "".join(result.output.split())  # rich wraps the title
    shutil.rmtree(older)
    result = invoke(*common, "--model", folder, "--out", out)
    assert result.exit_code == 2
    assert f"{folder}/<version>/iris_model/config.json" in "".join(result.output.split())


def test_the_sidecar_traces_an_alias_to_its_registry_version(
    files, embeddings, tmp_path, monkeypatch, untrained_bundle
) -> None:
    """``models:/iris@champion`` moves; the sidecar records the version it meant, the weights and the
    embeddings file of a versioned --embeddings folder."""
    from types import SimpleNamespace

    from iris_pipelines import registry

    class Registry:
        def get_model_version_by_alias(self, name: str, alias: str) -> SimpleNamespace:
            assert (name, alias) == ("iris", "champion")
            return SimpleNamespace(
                version="4", tags={}, run_id=None, model_id=None, source="", status="READY"
            )

    monkeypatch.setattr(registry, "_client", lambda uri: Registry())
    monkeypatch.setattr(registry.RegisteredModel, "load_bundle", lambda self: untrained_bundle)
    _known_prediction(files, monkeypatch, files["query"])
    folder = tmp_path / "task_embeddings.parquet"
    _, newest = _versions(folder, embeddings, ["2026-01-01T00.00.00.000Z", "2026-02-01T00.00.00.000Z"])
    out = tmp_path / "labels.nii.gz"
    result = invoke(
        "--image", files["query"], "--embeddings", folder, "--dataset", "alpha", "--classes", "2",
        "--model", "models:/iris@champion", "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["model"] == "models:/iris@champion" and sidecar["model_path"] is None
    assert sidecar["model_registry"] == {"name": "iris", "version": "4", "run_id": None}
    assert sidecar["weights_sha256"] == untrained_bundle.weights_checksum == "f00d"
    assert sidecar["embeddings"] == str(folder) and sidecar["embeddings_file"] == str(newest)
    assert sidecar["tuning"] is None
    assert "version 4 of iris" in " ".join(result.output.split())


def test_the_memory_bank_names_its_classes_as_training_did(files, tmp_path, monkeypatch, untrained_bundle):
    _known_prediction(files, monkeypatch, files["query"])

    metadata = {**untrained_bundle.metadata, "class_names": {"beta/1": "kidney"}}
    named = ModelBundle(
        untrained_bundle.model_config, untrained_bundle.state_dict, untrained_bundle.class_ids, metadata
    ).save(tmp_path / "named")
    out = tmp_path / "bank.nii.gz"
    result = invoke(
        "--image", files["query"], "--model", named, "--strategy", "memory_bank", "--dataset", "beta",
        "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [(c["label"], c["name"]) for c in json.loads(sidecar_path(out).read_text())["classes"]] == [
        (1, "kidney")
    ]


def test_memory_bank_of_the_model_itself(files, tmp_path, one_torch_thread) -> None:
    """No references and no table: the bundle's own memory bank, for a training dataset's classes."""
    common = ["--image", files["query"], "--model", files["bundle"], "--strategy", "memory_bank", *SPACING]
    result = invoke(*common, "--dataset", "beta", "--out", tmp_path / "bank.nii.gz")
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "bank.json").read_text())
    assert [c["label"] for c in sidecar["classes"]] == [1] and sidecar["dataset"] == "beta"
    result = invoke(*common, "--dataset", "gamma", "--out", tmp_path / "o.nii.gz")
    assert result.exit_code == 2 and "'gamma' is not a training dataset of this model" in result.output


def test_preprocessing_defaults_follow_the_model_then_the_project(tmp_path) -> None:
    from iris_pipelines.segment import preprocess_params

    bare, project = ModelBundle({}, {}), Path(__file__).parents[1]
    assert preprocess_params(None, bare, None, tmp_path) == (
        {"target_spacing": [3.0, 3.0, 3.0]},
        "default 3 mm",
    )
    params, source = preprocess_params(None, bare, None, project)
    assert source.endswith("conf/base/parameters_preprocess.yml") and "ct_window" in params
    recorded = {"preprocess": {"target_spacing": [1.5, 1.5, 2.0], "ct_window": [-100, 200]}}
    assert preprocess_params(None, bare, recorded, project)[0]["target_spacing"] == [1.5, 1.5, 2.0]
    tagged = ModelBundle({}, {}, metadata={"target_spacing": 2.0})
    assert preprocess_params(None, tagged, recorded, project) == (
        {"target_spacing": [2.0, 2.0, 2.0]},
        "model bundle metadata",
    )
    params, source = preprocess_params([1.0], tagged, recorded, project)
    assert params["target_spacing"] == [1.0, 1.0, 1.0] and source.startswith("--spacing")
    for bad in ([float("nan")], [1.0, float("inf"), 1.0], [0.0]):
        with pytest.raises(SegmentError, match="expected one or three positive numbers"):
            preprocess_params(bad, tagged, recorded, project)


@pytest.mark.parametrize(
    ("role", "shape", "expected"),
    [
        ("image", "4-D", "the reference image holds 2 volumes along its 4th axis (channels or time points)"),
        ("label", "4-D", "the reference label is 4-D (size (24, 22, 16, 2))"),
        ("image", "2-D", "the reference image is 2-D (size (24, 22))"),
        ("label", "vector", "the reference label has 3 values per voxel"),
    ],
)
def test_a_reference_that_is_not_one_scalar_3d_volume_is_named(
    files, tmp_path, role, shape, expected
) -> None:
    """Got "Geometry is for 3-D images, got a 4-D one" without a file name, or an ITK traceback (exit 1)
    for an RGB-exported label."""
    original = read_image(files[f"ref_a{'_label' if role == 'label' else ''}"])
    bad = {
        "4-D": lambda: sitk.JoinSeries([original, original]),
        "2-D": lambda: original[:, :, 0],
        "vector": lambda: sitk.Compose([original] * 3),
    }[shape]()
    path = tmp_path / f"bad_{role}.mha"
    write_image(bad, path)
    image, label = (path, files["ref_a_label"]) if role == "image" else (files["ref_a"], path)
    result = invoke(
        "--image", files["query"], "--reference", f"{image}:{label}", "--model", files["bundle"],
        "--out", tmp_path / "o.nii.gz", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{path}: {expected}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_sheared_scan_is_refused_for_nifti_output_before_segmenting(files, tmp_path, monkeypatch) -> None:
    """A gantry-tilted scan (sheared direction, kept by MHA) written as NIfTI came back ~8 mm off, silently;
    the refusal comes before any inference, which would be wasted."""
    scan = read_image(files["query"])
    direction = np.asarray(scan.GetDirection()).reshape(3, 3)
    direction[:, 2] = direction[:, 2] + np.tan(np.deg2rad(20.0)) * direction[:, 1]
    scan.SetDirection(tuple((direction / np.linalg.norm(direction, axis=0)).ravel()))
    sheared = tmp_path / "tilted.mha"
    write_image(scan, sheared)

    def no_inference(*args, **kwargs):
        raise AssertionError("segmented although the output cannot be written")

    monkeypatch.setattr(segment_module, "make_predictor", no_inference)
    out = tmp_path / "labels.nii.gz"
    result = invoke(
        "--image", sheared, *_reference(files), "--model", files["bundle"], "--out", out, *SPACING
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{out}: the image's direction is sheared" in result.output
    assert "write .mha or .nrrd instead" in result.output and not out.exists()


def test_nan_voxels_in_the_scan_are_counted_whatever_the_spacing(files, tmp_path) -> None:
    """The NaN check saw only resampled voxels: a 3 mm grid could step over a NaN and accept the scan."""
    scan = read_image(files["ref_b"])
    values = sitk.GetArrayFromImage(scan)
    values[5, 6, 7] = np.nan
    broken = sitk.GetImageFromArray(values)
    broken.CopyInformation(scan)
    path = tmp_path / "nan_scan.nrrd"
    write_image(broken, path)
    for spacing in ("1.0", "3.0"):
        result = invoke(
            "--image", path, *_reference(files), "--model", files["bundle"], "--out", tmp_path / "o.nii.gz",
            "--spacing", spacing, "--roi", "32",
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert f"{path}: the image has 1 non-finite voxels (1 NaN, 0 infinite)" in result.output


def test_several_scans_share_one_task_and_a_bad_scan_is_skipped(
    files, tmp_path, monkeypatch, one_torch_thread
) -> None:
    """Encode once, segment many (oblique NIfTI, DICOM series); a broken scan is reported, the rest go on."""
    encoded = []
    real_reference_task = segment_module.reference_task

    def counting_reference_task(*args, **kwargs):
        encoded.append(1)
        return real_reference_task(*args, **kwargs)

    monkeypatch.setattr(segment_module, "reference_task", counting_reference_task)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"")
    out = tmp_path / "labels"
    result = invoke(
        "--image", files["query"], "--image", broken, "--image", files["dicom"], *_reference(files),
        "--model", files["bundle"], "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert len(encoded) == 1
    assert "1 of 3 scan(s) failed" in result.output and "Traceback" not in result.output
    for scan, written in ((files["query"], out / "scan.nii.gz"), (files["dicom"], out / "scan_dicom.nii.gz")):
        label = read_image(written)
        assert Geometry.from_image(label).same_grid(
            Geometry.from_image(read_image(scan)), atol_mm=1e-4, atol_direction=1e-6
        )
        assert _check_sidecar(written, label)["image"] == str(scan)
    assert not (out / "broken.nii.gz").exists()
    summary = pd.read_csv(out / "segmentations.csv", keep_default_na=False)
    assert summary["image"].tolist() == [str(files["query"]), str(broken), str(files["dicom"])]
    assert summary["status"].tolist() == ["ok", "failed", "ok"]
    assert summary["reason"][1].startswith(f"{broken}: the file is empty (0 bytes)")
    sidecar = json.loads((out / "scan.json").read_text())
    assert float(summary["liver (ml)"][0]) == pytest.approx(sidecar["classes"][0]["volume_ml"], abs=1e-3)


def test_a_scan_too_small_for_the_network_is_skipped_and_the_batch_goes_on(
    files, tmp_path, one_torch_thread
) -> None:
    tiny = tmp_path / "tiny.nii.gz"
    # At the blob's edge, so that it holds air as any CT does.
    image, _ = make_scan((1.0, 1.0, 1.0), tuple(CENTRE + [2.0, 2.0, 3.0]), np.eye(3), (6, 5, 4))
    assert sitk.GetArrayViewFromImage(image).min() < -200
    write_image(image, tiny)
    out = tmp_path / "labels"
    result = invoke(
        "--image", tiny, "--image", files["query"], *_reference(files), "--model", files["bundle"],
        "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    summary = pd.read_csv(out / "segmentations.csv", keep_default_na=False)
    assert summary["status"].tolist() == ["failed", "ok"]
    assert summary["reason"][0].startswith(f"{tiny}: the scan is 6×5×4 voxels on the model's 1×1×1 mm grid")
    assert (out / "scan.nii.gz").is_file()


@pytest.mark.parametrize("what", ["reference", "scan"])
def test_an_input_too_small_for_the_network_is_named_with_what_to_do(
    files, tmp_path, monkeypatch, what
) -> None:
    """A tightly cropped reference, or a tiny scan, failed with the network's ValueError naming no file."""
    if (
        what == "reference"
    ):  # ref_b cropped to its corner: some of the blob and some air, 12×12×10 voxels of 1.2 mm
        tiny = tmp_path / "tight_ref.nrrd"
        for source, target in (
            (files["ref_b"], tiny),
            (files["ref_b_label"], tmp_path / "tight_labels.nrrd"),
        ):
            write_image(sitk.RegionOfInterest(read_image(source), (12, 12, 10), (0, 0, 0)), target)
        assert 5 in sitk.GetArrayViewFromImage(read_image(tmp_path / "tight_labels.nrrd"))
        args = ["--image", files["query"], "--reference", f"{tiny}:{tmp_path / 'tight_labels.nrrd'}"]
        expected = f"{tiny}: the reference image is 15×15×12 voxels on the model's 1×1×1 mm grid, too small"
        remedy = "use a reference with more context around the class"
    else:
        tiny = tmp_path / "tiny.nii.gz"
        image, _ = make_scan((1.0, 1.0, 1.0), tuple(CENTRE + [2.0, 2.0, 3.0]), np.eye(3), (6, 5, 4))
        write_image(image, tiny)
        args, remedy = ["--image", tiny, *_reference(files)], "segment a larger scan"
        expected = (
            f"{tiny}: the scan is 6×5×4 voxels on the model's 1×1×1 mm grid, too small for this network"
        )

        def no_encoding(*args, **kwargs):
            raise AssertionError("encoded the references for a scan too small to segment")

        monkeypatch.setattr(segment_module, "prepare_task", no_encoding)
    result = invoke(*args, "--model", files["bundle"], "--out", tmp_path / "o.nii.gz", *SPACING)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert expected in message and "must exceed 16 voxels" in message, message
    assert remedy in message and "a finer --spacing" in message and "Traceback" not in message


def test_a_directory_of_scans_and_dicom_series_in_another_format(files, tmp_path, one_torch_thread) -> None:
    """--images takes files and DICOM series folders; the output folder inside it is not read as a scan."""
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        write_image(read_image(files["query"]), scans / name)
    shutil.copytree(files["dicom"], scans / "c_series")
    out = scans / "labels"
    out.mkdir()  # as on a re-run
    result = invoke(
        "--images", scans, *_reference(files), "--model", files["bundle"], "--out", out,
        "--out-suffix", ".mha", "--save-probabilities", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "a.json", "a.mha", "a_probabilities.mha", "b.json", "b.mha", "b_probabilities.mha",
        "c_series.json", "c_series.mha", "c_series_probabilities.mha", "segmentations.csv",
    ]  # fmt: skip
    soft = read_image(out / "c_series_probabilities.mha")
    assert soft.GetSize() == (*read_image(out / "c_series.mha").GetSize(), 1)
    assert pd.read_csv(out / "segmentations.csv")["status"].tolist() == ["ok", "ok", "ok"]
    assert Geometry.from_image(read_image(out / "c_series.mha")).same_grid(
        Geometry.from_image(read_image(files["dicom"])), atol_mm=1e-4, atol_direction=1e-6
    )


def test_an_earlier_runs_output_and_an_empty_folder_in_images_are_not_scans(
    files, tmp_path, monkeypatch, caplog
) -> None:
    """A second run into another --out inside --images read the first run's output folder as a DICOM
    series, reported it as a failed scan and exited 1."""
    _known_prediction(files, monkeypatch, files["query"])
    scans = tmp_path / "scans"
    scans.mkdir()
    write_image(read_image(files["query"]), scans / "a.nii.gz")
    common = ["--images", scans, *_reference(files), "--model", files["bundle"], *SPACING]
    assert invoke(*common, "--out", scans / "labels_v1").exit_code == 0
    (scans / "empty").mkdir()
    with caplog.at_level("INFO", logger="iris_pipelines.segment"):
        result = invoke(*common, "--out", scans / "labels_v2")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(scans / "labels_v2" / "segmentations.csv", keep_default_na=False)
    assert summary["image"].tolist() == [str(scans / "a.nii.gz")] and summary["status"].tolist() == ["ok"]
    logged = {(r.levelname, r.getMessage()) for r in caplog.records}
    assert (
        "INFO",
        f"--images: skipped the folder {scans / 'labels_v1'}: it holds segmentations.csv, so it is the "
        "output of an earlier iris segment run, not a DICOM series",
    ) in logged
    assert (
        "WARNING",
        f"--images: skipped the folder {scans / 'empty'}: it is empty, not a DICOM series",
    ) in logged


@pytest.mark.parametrize(
    "clash",
    ["overwrite a scan", "one output for two scans", "one sidecar for two scans", "one name in two folders"],
)
def test_output_names_that_clash_are_refused_before_any_work(files, tmp_path, monkeypatch, clash) -> None:
    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although the outputs clash")

    monkeypatch.setattr(segment_module, "prepare_task", no_encoding)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_image(read_image(files["query"]), scans / "a.nii.gz")
    if clash == "overwrite a scan":
        args, expected = ["--images", scans, "--out", scans], f"{scans / 'a.nii.gz'} would overwrite the scan"
    elif clash == "one output for two scans":
        write_image(read_image(files["query"]), scans / "a.mha")
        args = ["--images", scans, "--out", tmp_path / "out", "--out-suffix", ".nrrd"]
        expected = (
            f"{scans / 'a.mha'} and {scans / 'a.nii.gz'} would both write {tmp_path / 'out' / 'a.nrrd'}"
        )
    elif clash == "one sidecar for two scans":  # a.mha and a.nii.gz keep their formats, not their a.json
        write_image(read_image(files["query"]), scans / "a.mha")
        args = ["--images", scans, "--out", tmp_path / "out"]
        expected = (
            f"{scans / 'a.mha'} and {scans / 'a.nii.gz'} would both write {tmp_path / 'out' / 'a.json'}"
        )
    else:
        (tmp_path / "other").mkdir()
        write_image(read_image(files["query"]), tmp_path / "other" / "a.nii.gz")
        args = ["--image", scans / "a.nii.gz", "--image", tmp_path / "other" / "a.nii.gz"]
        args += ["--out", tmp_path / "out"]
        expected = (
            f"{scans / 'a.nii.gz'} and {tmp_path / 'other' / 'a.nii.gz'} would both write "
            f"{tmp_path / 'out' / 'a.nii.gz'}"
        )
    result = invoke(*args, *_reference(files), "--model", files["bundle"], *SPACING)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert expected in message and "Traceback" not in result.output
    if clash != "overwrite a scan":  # --out-suffix cannot help: the sidecar <stem>.json ignores it
        assert "--out-suffix" not in message
        assert "rename one of them, or segment them in separate runs with different --out folders" in message
    assert not (tmp_path / "out").exists()


def _stored_values(path: Path, tmp_path: Path, name: str) -> Path:
    """The CT at ``path`` as exported without the DICOM rescale: stored value = HU + 1024, so no air."""
    image = read_image(path)
    raw = sitk.Cast(image, sitk.sitkFloat32) + 1024.0
    raw.CopyInformation(image)
    write_image(raw, tmp_path / name)
    return tmp_path / name


def test_a_ct_scan_or_reference_without_air_is_refused(files, tmp_path, monkeypatch) -> None:
    """An MR scan, or a CT in stored values, was clipped to the CT window and segmented badly in silence."""

    def no_inference(*args, **kwargs):
        raise AssertionError("segmented a scan that is not in Hounsfield units")

    monkeypatch.setattr(segment_module, "make_predictor", no_inference)
    raw = _stored_values(files["query"], tmp_path, "raw.nii.gz")
    raw_reference = _stored_values(files["ref_a"], tmp_path, "raw_ref.mha")
    for image, reference in ((raw, files["ref_a"]), (files["query"], raw_reference)):
        result = invoke(
            "--image", image, "--reference", f"{reference}:{files['ref_a_label']}",
            "--model", files["bundle"], "--out", tmp_path / "o.nii.gz", *SPACING,
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        refused = raw if image == raw else raw_reference
        assert f"{refused}: no voxel lies below -200 HU (values 224..1324;" in message
        assert "does not look like a CT in Hounsfield units" in message
        assert "pass --modality MR or --modality PET" in message and "Traceback" not in message
        assert not (tmp_path / "o.nii.gz").exists()


def test_a_reference_with_label_values_above_255_serves_for_the_classes_asked_for(
    files, tmp_path, monkeypatch
) -> None:
    """A FreeSurfer aparc+aseg map holds cortical parcels from 1000 up; its other classes were refused."""
    _known_prediction(files, monkeypatch, files["query"])
    label = read_image(files["ref_a_label"])
    values = sitk.GetArrayFromImage(label).astype(np.uint16)
    values[0, 0, :3] = 1003  # a parcel far from the class asked for
    wide = sitk.GetImageFromArray(values)
    wide.CopyInformation(label)
    write_image(wide, tmp_path / "aparc_aseg.mha")
    reference = ["--reference", f"{files['ref_a']}:{tmp_path / 'aparc_aseg.mha'}"]
    common = ["--image", files["query"], *reference, "--model", files["bundle"], *SPACING]
    result = invoke(*common, "--classes", "5", "--out", tmp_path / "o.nii.gz")
    assert result.exit_code == 0, result.output
    assert set(np.unique(sitk.GetArrayViewFromImage(read_image(tmp_path / "o.nii.gz")))) == {0, 5}
    refused = invoke(*common, "--out", tmp_path / "all.nii.gz")  # every class, 1003 included
    message = " ".join(refused.output.split())
    assert refused.exit_code == 2, refused.output
    assert f"{tmp_path / 'aparc_aseg.mha'}: label values must lie in 0..255, got 0..1003" in message
    # what README promises: with --classes such a reference serves (the message said only "relabel")
    assert (
        "relabel the classes as 1..255, or pass --classes with the values to segment (each in 1..255"
        in message
    )
    refused = invoke(*common, "--classes", "5,1003", "--out", tmp_path / "all.nii.gz")
    message = " ".join(refused.output.split())
    assert (
        refused.exit_code == 2
        and "--classes must list foreground label values in 1..255, got [5, 1003]" in message
    )


def _model_finds_nothing(monkeypatch) -> None:
    """Replace the network by one that labels no voxel of any class, in any volume."""

    def finds_nothing(model, task, **kwargs):
        return lambda volume: torch.full((1, task.shape[1], *volume.shape[2:]), -10.0)

    monkeypatch.setattr(segment_module, "make_predictor", finds_nothing)


def test_a_class_that_comes_out_empty_is_warned_about(files, tmp_path, monkeypatch, caplog) -> None:
    """0 ml in the sidecar reads like "absent"; the log says it may be a miss the user should look at."""
    _model_finds_nothing(monkeypatch)
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        result = invoke(
            "--image", files["query"], *_reference(files), "--model", files["bundle"],
            "--out", tmp_path / "o.nii.gz", *SPACING,
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{files['query']}: class(es) 5 (liver) came out empty" in caplog.text


@pytest.mark.parametrize("strategy", ["one_shot", "tuning"])
def test_a_class_the_model_does_not_find_in_its_own_reference_is_warned_about(
    files, tmp_path, monkeypatch, caplog, strategy
) -> None:
    """A novel class the model does not recognise came out plausible-looking but wrong, silently: the
    model cannot find it even in the reference its embedding came from, which one pass shows."""
    _model_finds_nothing(monkeypatch)
    out = tmp_path / "o.nii.gz"
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        result = invoke(
            "--image", files["query"], *_reference(files), "--model", files["bundle"], "--strategy", strategy,
            "--tuning-steps", "1", "--out", out, *SPACING,
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    warned = " ".join(caplog.text.split())
    assert (
        "class(es) 5 (liver, Dice 0.00): segmenting the reference with this task finds them with Dice "
        in warned
    )
    assert ("even after tuning" if strategy == "tuning" else "--strategy tuning fits the task") in warned
    check = _check_sidecar(out, read_image(out))["reference_check"]
    assert check == {
        "threshold": 0.5,
        "references": [
            {"image": str(files["ref_a"]), "label": str(files["ref_a_label"]), "dice": {"5": 0.0}}
        ],
        "unreliable": [5],
    }


def test_a_reference_the_model_segments_passes_the_check_and_the_check_can_be_skipped(
    files, tmp_path, monkeypatch, caplog
) -> None:
    _known_prediction(files, monkeypatch, files["query"])  # finds the reference's blob too
    out = tmp_path / "o.nii.gz"
    common = ["--image", files["query"], *_reference(files), "--model", files["bundle"], *SPACING]
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        assert invoke(*common, "--out", out).exit_code == 0
    check = _check_sidecar(out, read_image(out))["reference_check"]
    assert check["unreliable"] == [] and check["references"][0]["dice"]["5"] > 0.8
    assert "segmenting the reference" not in caplog.text
    segmented = []
    real_make_predictor = segment_module.make_predictor

    def counting(model, task, **kwargs):
        predict = real_make_predictor(model, task, **kwargs)
        return lambda volume: segmented.append(volume.shape) or predict(volume)

    monkeypatch.setattr(segment_module, "make_predictor", counting)
    assert invoke(*common, "--out", out, "--no-reference-check").exit_code == 0
    assert len(segmented) == 1  # the scan only
    assert _check_sidecar(out, read_image(out))["reference_check"] is None


def test_checked_takes_a_flagged_class_from_the_reference_registered_to_the_scan(
    files, tmp_path, monkeypatch, caplog
) -> None:
    """--strategy checked: where the model does not find a class again in its own reference, the scan gets
    the reference's mask registered onto it, which lands on the blob in world coordinates."""
    _model_finds_nothing(monkeypatch)
    out = tmp_path / "o.nii.gz"
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        result = invoke(
            "--image", files["query"], *_reference(files), *_reference(files, "ref_b"), "--model",
            files["bundle"], "--strategy", "checked", "--out", out, *SPACING,
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--strategy checked takes them from the reference registered to each scan" in caplog.text
    written = read_image(out)
    sidecar = _check_sidecar(out, written)
    assert sidecar["registered_classes"] == [5] and len(sidecar["reference_check"]["references"]) == 1
    found = sitk.GetArrayFromImage(written) == 5
    truth = sitk.GetArrayFromImage(read_image(files["truth"])) == 5
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.7  # the network found nothing


def test_checked_keeps_what_the_model_finds_in_its_reference(files, tmp_path, monkeypatch) -> None:
    _known_prediction(files, monkeypatch, files["query"])
    common = ["--image", files["query"], *_reference(files), "--model", files["bundle"], *SPACING]
    checked, one_shot = tmp_path / "checked.nii.gz", tmp_path / "one_shot.nii.gz"
    assert invoke(*common, "--strategy", "checked", "--out", checked).exit_code == 0
    assert invoke(*common, "--strategy", "one_shot", "--out", one_shot).exit_code == 0
    assert _check_sidecar(checked, read_image(checked))["registered_classes"] == []
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_image(checked)), sitk.GetArrayFromImage(read_image(one_shot))
    )
    refused = invoke(*common, "--strategy", "checked", "--no-reference-check", "--out", checked)
    assert refused.exit_code == 2 and "drop --no-reference-check" in " ".join(refused.output.split())


@pytest.mark.parametrize("strategy", ["one_shot", "checked"])
def test_one_reference_strategies_record_and_warn_about_the_references_they_ignore(
    files, tmp_path, monkeypatch, caplog, strategy
) -> None:
    """one_shot and checked use the first reference only; the others were accepted in silence and the
    sidecar listed them all as if the task came from them."""
    _known_prediction(files, monkeypatch, files["query"])
    out = tmp_path / "o.nii.gz"
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        result = invoke(
            "--image", files["query"], *_reference(files), *_reference(files, "ref_b"), "--model",
            files["bundle"], "--strategy", strategy, "--out", out, *SPACING,
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = _check_sidecar(out, read_image(out))
    assert sidecar["references"] == [
        {
            "image": str(files["ref_a"]), "label": str(files["ref_a_label"]), "classes": [5],
            "image_sha256": file_sha256(files["ref_a"]), "label_sha256": file_sha256(files["ref_a_label"]),
        }
    ]  # fmt: skip
    warned = " ".join(caplog.text.split())
    assert f"--strategy {strategy} uses only the first reference ({files['ref_a']}); ignored: " in warned
    assert f"{files['ref_b']}:{files['ref_b_label']}" in warned and "--strategy ensemble" in warned


def test_a_ct_without_air_is_segmented_when_the_user_names_ct(files, tmp_path, monkeypatch, caplog) -> None:
    """A CT cropped inside the body has no air either: an explicit --modality CT is trusted, with a
    warning."""
    _known_prediction(files, monkeypatch, files["query"])
    raw = _stored_values(files["query"], tmp_path, "raw.nii.gz")
    with caplog.at_level("WARNING"):
        result = invoke(
            "--image", raw, *_reference(files), "--model", files["bundle"], "--modality", "CT",
            "--out", tmp_path / "o.nii.gz", *SPACING,
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.nii.gz").exists()
    assert f"{raw}: no voxel lies below -200 HU" in caplog.text and "as --modality CT says" in caplog.text


def test_a_scan_without_air_is_skipped_in_a_batch_and_fine_as_mr(files, tmp_path, monkeypatch) -> None:
    _known_prediction(files, monkeypatch, files["query"])
    raw = _stored_values(files["query"], tmp_path, "raw.nii.gz")
    out = tmp_path / "labels"
    common = ["--image", files["query"], "--image", raw, *_reference(files), "--model", files["bundle"]]
    result = invoke(*common, "--out", out, *SPACING)
    assert result.exit_code == 1, result.output
    summary = pd.read_csv(out / "segmentations.csv", keep_default_na=False)
    assert summary["status"].tolist() == ["ok", "failed"]
    assert summary["reason"][1].startswith(f"{raw}: no voxel lies below -200 HU")
    result = invoke(*common, "--modality", "MR", "--out", tmp_path / "mr", *SPACING)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "mr" / "raw.json").read_text())["modality"] == "MR"


def test_the_nnunet_ignore_label_is_never_a_class(files, tmp_path, monkeypatch, caplog) -> None:
    """A reference whose unannotated voxels carry dataset.json's "ignore" value (9): it was segmented as a
    class named class_9."""
    _known_prediction(files, monkeypatch, files["query"])
    label = read_image(files["ref_a_label"])
    values = sitk.GetArrayFromImage(label)
    values[:, :, :3] = 9  # a strip nobody annotated, away from the blob
    partial = sitk.GetImageFromArray(values)
    partial.CopyInformation(label)
    write_image(partial, tmp_path / "partial_labels.mha")
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "liver": 5, "ignore": 9}}))
    common = [
        "--image", files["query"], "--reference", f"{files['ref_a']}:{tmp_path / 'partial_labels.mha'}",
        "--labels", dataset, "--model", files["bundle"], "--strategy", "one_shot", *SPACING,
    ]  # fmt: skip
    with caplog.at_level("INFO", logger="iris_pipelines.segment"):
        result = invoke(*common, "--out", tmp_path / "o.nii.gz")
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert [(c["label"], c["name"]) for c in sidecar["classes"]] == [(5, "liver")]
    assert f"{dataset}: value 9 is nnU-Net's 'ignore' label for unannotated voxels" in caplog.text
    result = invoke(*common, "--classes", "5,9", "--out", tmp_path / "p.nii.gz")
    assert result.exit_code == 2, result.output
    assert f"--classes lists 9, which {dataset} names 'ignore'" in " ".join(result.output.split())
    assert not (tmp_path / "p.nii.gz").exists()


def test_a_rerun_replaces_the_outputs_and_leaves_no_stale_probabilities(
    files, tmp_path, monkeypatch, caplog
) -> None:
    """A second run without --save-probabilities left the first run's probabilities beside a label map whose
    sidecar says there are none."""
    _known_prediction(files, monkeypatch, files["query"])
    out = tmp_path / "labels.nii.gz"
    common = ["--image", files["query"], *_reference(files), "--model", files["bundle"], "--out", out]
    assert invoke(*common, "--strategy", "one_shot", "--save-probabilities", *SPACING).exit_code == 0
    assert (tmp_path / "labels_probabilities.nii.gz").is_file()
    with caplog.at_level("INFO", logger="iris_pipelines.segment"):
        result = invoke(*common, "--strategy", "one_shot", *SPACING)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json", "labels.nii.gz"]
    assert json.loads((tmp_path / "labels.json").read_text())["probabilities"] is None
    replaced = [
        r.getMessage() for r in caplog.records if "replacing what an earlier run wrote" in r.getMessage()
    ]
    assert replaced == [
        f"replacing what an earlier run wrote: {out}, {tmp_path / 'labels.json'}, "
        f"{tmp_path / 'labels_probabilities.nii.gz'} (removed: no probabilities now)"
    ]


def test_a_scan_that_fails_on_a_rerun_keeps_no_earlier_label_map(files, tmp_path, monkeypatch) -> None:
    """Re-running a batch after a scan broke left its earlier label map and sidecar beside a "failed" row."""
    _known_prediction(files, monkeypatch, files["query"])
    scans = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    for scan in scans:
        shutil.copy(files["query"], scan)
    out = tmp_path / "labels"
    common = ["--image", scans[0], "--image", scans[1], *_reference(files), "--model", files["bundle"]]
    assert invoke(*common, "--out", out, "--strategy", "one_shot", *SPACING).exit_code == 0
    scans[1].write_bytes(scans[1].read_bytes()[:300])  # an interrupted re-export
    result = invoke(*common, "--out", out, "--strategy", "one_shot", *SPACING)
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz", "segmentations.csv"]
    summary = pd.read_csv(out / "segmentations.csv", keep_default_na=False)
    assert summary["status"].tolist() == ["ok", "failed"]
    assert summary["reason"][1].endswith("; removed b.nii.gz, b.json left by an earlier run")


def test_a_spacing_the_model_does_not_record_is_warned_about(tmp_path, caplog) -> None:
    """A bundle that records no preprocessing was resampled at the guessed 3 mm without a word."""
    from iris_pipelines.segment import preprocess_params

    bare, project = ModelBundle({}, {}), Path(__file__).parents[1]
    tagged = ModelBundle({}, {}, metadata={"preprocess": {"target_spacing": [6.0, 6.0, 6.0]}})
    recorded = {"preprocess": {"target_spacing": [1.5, 1.5, 2.0]}}
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        preprocess_params(None, bare, None, tmp_path)
        preprocess_params(None, bare, None, project)
        preprocess_params(None, tagged, None, tmp_path)
        preprocess_params(None, bare, recorded, tmp_path)
        preprocess_params([2.0], bare, None, tmp_path)
    spacing = yaml.safe_load((project / "conf/base/parameters_preprocess.yml").read_text())["preprocess"]
    grid = "×".join(f"{float(v):g}" for v in spacing["target_spacing"])
    assert [r.getMessage() for r in caplog.records] == [
        "preprocessing from default 3 mm (the model records none): resampling to 3×3×3 mm; if the model was "
        "trained at another spacing, pass that with --spacing",
        f"preprocessing from {project / 'conf/base/parameters_preprocess.yml'} (the model records none): "
        f"resampling to {grid} mm; if the model was trained at another spacing, pass that with --spacing",
    ]


def test_help_shows_the_defaults_and_what_each_option_does() -> None:
    from iris_pipelines.segment import SegmentRequest

    result = invoke("--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"Adam steps of --strategy tuning. [default: {SegmentRequest.tuning_steps}]" in text
    assert f"Learning rate of --strategy tuning. [default: {SegmentRequest.tuning_lr}]" in text
    assert "sliding windows overlap" in text and "that a voxel's most likely class must pass" in text
    assert "else 3 mm" in text and "Outputs of an earlier run there are replaced" in text
    assert "--modality [CT|MR|PET]" in text  # as the README and the sidecar spell them


def _in_metres(source: Path, path: Path) -> Path:
    """``source`` as a NIfTI whose header says metres: ITK reads every length 1000× too large."""
    image = nibabel.load(source)
    header = image.header.copy()
    header.set_xyzt_units(xyz="meter")
    nibabel.save(nibabel.Nifti1Image(np.asarray(image.dataobj), image.affine, header), path)
    return path


@pytest.mark.parametrize("cause", ["a scan in metres", "a reference in metres", "a typo in --spacing"])
def test_a_grid_too_large_to_allocate_is_named_in_one_line(files, tmp_path, monkeypatch, cause) -> None:
    """ITK failed to allocate the canonical grid: a traceback (exit 1) instead of the file and the reason.
    A scan too large is refused before the references are read and encoded, which is most of the work."""
    scan, (reference, label), spacing = files["query"], (files["ref_a"], files["ref_a_label"]), SPACING
    if cause == "a scan in metres":
        scan = refused = _in_metres(files["query"], tmp_path / "metres.nii.gz")
    elif cause == "a reference in metres":  # the query's own image and labels, both in metres
        reference = refused = _in_metres(files["query"], tmp_path / "ref_metres.nii.gz")
        label = _in_metres(files["truth"], tmp_path / "ref_metres_labels.nii.gz")
    else:
        refused, spacing = scan, ["--spacing", "0.01", "--roi", "32"]
    if refused == scan:

        def no_encoding(*args, **kwargs):
            raise AssertionError("the references were encoded for a scan that cannot be segmented")

        monkeypatch.setattr(segment_module, "prepare_task", no_encoding)
    out = tmp_path / "o.nii.gz"
    result = invoke(
        "--image", scan, "--reference", f"{reference}:{label}", "--model", files["bundle"],
        "--out", out, *spacing,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"{refused}: it spans " in message and "voxels, more than the 2.15e+09" in message
    assert "check the target spacing (--spacing) and the scan's units" in message
    assert "Traceback" not in message and not out.exists()


def test_one_scan_out_of_memory_is_one_line_with_what_to_try(files, tmp_path, monkeypatch) -> None:
    """A single scan that ran out of memory below the grid limit ended in a traceback."""

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(segment_module, "segment_volume", out_of_memory)
    out = tmp_path / "o.nii.gz"
    result = invoke(
        "--image", files["query"], *_reference(files), "--model", files["bundle"], "--out", out, *SPACING
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert (
        f"{files['query']}: out of memory while segmenting it (CUDA out of memory. Tried to allocate"
        in message
    )
    assert "--device cpu" in message and "Traceback" not in message and not out.exists()


def test_a_label_map_never_sits_beside_an_earlier_runs_sidecar(files, tmp_path, monkeypatch) -> None:
    """A run stopped between writing the label map and its sidecar left the earlier run's sidecar, whose
    class volumes, model and settings then described the new label map."""
    out = tmp_path / "o.nii.gz"
    args = ["--image", files["query"], *_reference(files), "--model", files["bundle"], "--out", out, *SPACING]
    assert invoke(*args).exit_code == 0
    earlier = read_image(out)

    def disk_full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(segment_module, "write_text_atomic", disk_full)
    result = invoke(*args, "--threshold", "0.9")
    assert result.exit_code == 2 and "No space left on device" in result.output, result.output
    assert read_image(out).GetSize() == earlier.GetSize() and not sidecar_path(out).exists()


def test_a_scan_too_large_for_memory_is_skipped_and_the_batch_goes_on(
    files, tmp_path, monkeypatch, one_torch_thread
) -> None:
    """One scan whose grid could not be allocated (a header in metres) or that ran out of memory (GPU or
    host) ended the whole batch with a traceback, losing the scans after it."""
    metres = _in_metres(files["query"], tmp_path / "a_metres.nii.gz")
    greedy = tmp_path / "b_greedy.nii.gz"
    shutil.copy(files["query"], greedy)
    real_segment_volume = segment_module.segment_volume

    def out_of_memory_for_greedy(image, *args, source, **kwargs):
        if source == str(greedy):
            # what torch's CPU allocator raises: a plain RuntimeError
            raise RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 42949672960 bytes"
            )
        return real_segment_volume(image, *args, source=source, **kwargs)

    monkeypatch.setattr(segment_module, "segment_volume", out_of_memory_for_greedy)
    out = tmp_path / "labels"
    result = invoke(
        "--image", metres, "--image", greedy, "--image", files["query"], *_reference(files),
        "--model", files["bundle"], "--out", out, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "2 of 3 scan(s) failed" in result.output and "Traceback" not in result.output
    summary = pd.read_csv(out / "segmentations.csv", keep_default_na=False)
    assert summary["status"].tolist() == ["failed", "failed", "ok"]
    assert summary["reason"][0].startswith(f"{metres}: it spans ") and "voxels" in summary["reason"][0]
    assert summary["reason"][1] == (
        f"{greedy}: out of memory while segmenting it (DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 42949672960 bytes)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["scan.json", "scan.nii.gz", "segmentations.csv"]


def test_only_failed_allocations_count_as_out_of_memory() -> None:
    """A batch skips a scan that ran out of memory; any other RuntimeError is a bug and must surface."""
    assert segment_module.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert segment_module.is_out_of_memory(MemoryError())  # numpy
    itk = RuntimeError("itkImportImageContainer.hxx:179: Failed to allocate memory for image.")
    assert segment_module.is_out_of_memory(itk)
    assert not segment_module.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.parametrize("clash", ["a BIDS sidecar of a scan", "the reference's class names", "any JSON"])
def test_a_sidecar_never_replaces_a_json_file_it_did_not_write(files, tmp_path, monkeypatch, clash) -> None:
    """The sidecar replaced a dcm2niix/BIDS sidecar beside the scans, and the reference label's class-name
    file that segment itself reads."""

    def no_work(*args, **kwargs):
        raise AssertionError("started although the sidecar would replace another file")

    monkeypatch.setattr(segment_module, "prepare_task", no_work)
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(files["query"], scans / "sub-01_ct.nii.gz")
    label = tmp_path / "ref_labels.nii.gz"
    write_image(read_image(files["ref_a_label"]), label)
    reference = ["--reference", f"{files['ref_a']}:{label}"]
    if clash == "a BIDS sidecar of a scan":
        kept = scans / "sub-01_ct.json"
        args = ["--images", scans, "--out", scans, "--out-suffix", ".mha"]
        expected = f"{kept} would overwrite the JSON file beside the scan {scans / 'sub-01_ct.nii.gz'}"
    elif clash == "the reference's class names":
        kept = tmp_path / "ref_labels.json"
        args = ["--image", scans / "sub-01_ct.nii.gz", "--out", tmp_path / "ref_labels.mha"]
        expected = f"{kept} would overwrite the class names read from it"
    else:
        kept = tmp_path / "notes.json"
        args = ["--image", scans / "sub-01_ct.nii.gz", "--out", tmp_path / "notes.nii.gz"]
        expected = f"{kept} would be replaced by the sidecar of {tmp_path / 'notes.nii.gz'}, but iris segment"
    kept.write_text(json.dumps({"Modality": "CT", "5": "liver"}))
    result = invoke(*args, *reference, "--model", files["bundle"], *SPACING)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert kept.read_text() == json.dumps({"Modality": "CT", "5": "liver"})


def test_a_label_map_beside_its_scan_can_be_rerun(files, tmp_path, monkeypatch) -> None:
    """The JSON beside the scan is protected unless an earlier run of segment wrote it there."""
    _known_prediction(files, monkeypatch, files["query"])
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(files["query"], scan)
    common = ["--image", scan, *_reference(files), "--model", files["bundle"], "--strategy", "one_shot"]
    for _ in range(2):
        result = invoke(*common, "--out", tmp_path / "scan.mha", *SPACING)
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "scan.json").read_text())["output"] == str(tmp_path / "scan.mha")


@pytest.mark.parametrize("where", ["under a file", "a read-only file system"])
def test_an_output_that_cannot_be_written_is_refused_before_any_reading(
    files, tmp_path, monkeypatch, where
) -> None:
    """Found after all the work, in an error naming a scratch file, or the probabilities not asked for."""
    from iris_pipelines import registry

    def no_reading(*args, **kwargs):
        raise AssertionError("read the model although the output cannot be written")

    monkeypatch.setattr(registry, "load_model_bundle", no_reading)
    if where == "under a file":
        (tmp_path / "afile").write_text("")
        out, expected = (
            tmp_path / "afile" / "labels.nii.gz",
            f"{tmp_path / 'afile'} is a file, not a directory",
        )
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("needs Linux's /proc, where not even root can create a file")
        out, expected = Path("/proc/labels.nii.gz"), "cannot "  # write in /proc, or create /proc/labels
    for form in (["--image", files["query"]], ["--image", files["query"], "--image", files["dicom"]]):
        target = out if len(form) == 2 else out.parent / "labels"
        result = invoke(*form, *_reference(files), "--model", files["bundle"], "--out", target, *SPACING)
        assert result.exit_code == 2, result.output
        assert f"--out {target}: {expected}" in " ".join(result.output.split())
        assert ".tmp" not in result.output and "Traceback" not in result.output


def test_an_output_folder_made_for_a_refused_run_is_removed(files, tmp_path) -> None:
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    result = invoke(
        "--image", empty, *_reference(files), "--model", files["bundle"],
        "--out", tmp_path / "new" / "deeper" / "o.nii.gz",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "the file is empty" in result.output and not (tmp_path / "new").exists()


def test_the_writable_check_removes_exactly_the_folders_it_made(tmp_path, monkeypatch) -> None:
    """A folder it could not make (a name too long) stopped the clean-up, leaving the ones it had made."""
    too_long = tmp_path / "new" / ("x" * 300)
    with pytest.raises(SegmentError, match=r"cannot create .*\(File name too long\)"):
        segment_module.require_writable_directory(too_long, too_long / "o.nii.gz")
    assert not (tmp_path / "new").exists()
    # "a/../b" is b, as mkdir(parents=True) makes it: accepted, and a left nowhere.
    monkeypatch.chdir(tmp_path)
    segment_module.require_writable_directory(Path("zz/../yy"), Path("zz/../yy/o.nii.gz"))
    assert not (tmp_path / "zz").exists() and not (tmp_path / "yy").exists()


def test_a_rerun_replaces_its_own_sidecar_beside_a_reference_image(tmp_path) -> None:
    """A reference scan that is also one of the scans gets a sidecar beside it; the same command run again
    must be allowed to replace it, while the class names beside a reference label stay protected."""
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.nii.gz").write_bytes(b"scan")
    reference_label = tmp_path / "a_labels.nii.gz"
    reference_label.write_bytes(b"label")
    earlier = {"strategy": "one_shot", "preprocess": {}, "classes": []}
    (scans / "a.json").write_text(json.dumps(earlier))
    (tmp_path / "a_labels.json").write_text(json.dumps(earlier))  # read for class names: never replaced
    inputs = [scans / "a.nii.gz", reference_label]
    pairs = segment_module.batch_outputs(
        [scans / "a.nii.gz"], scans, ".mha", inputs=inputs, class_name_files=[tmp_path / "a_labels.json"]
    )
    assert pairs == [(scans / "a.nii.gz", scans / "a.mha")]
    with pytest.raises(SegmentError, match=r"a_labels.json would overwrite the class names read from it"):
        segment_module.batch_outputs(
            [tmp_path / "a_labels.nii.gz"], tmp_path, ".mha", inputs=inputs,
            class_name_files=[tmp_path / "a_labels.json"],
        )  # fmt: skip


def test_out_forms_say_what_they_mean(files, tmp_path, monkeypatch) -> None:
    """Two scans and --out labels.nii.gz made a directory of that name; one scan and --out newdir/ (not yet
    there) was read as a label map named newdir."""
    from iris_pipelines import registry

    _known_prediction(files, monkeypatch, files["query"])
    real_load = registry.load_model_bundle
    loaded = []

    def counting_load(*args, **kwargs):
        loaded.append(1)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(registry, "load_model_bundle", counting_load)
    common = [*_reference(files), "--model", files["bundle"], "--strategy", "one_shot", *SPACING]
    labels = tmp_path / "labels.nii.gz"
    result = invoke("--image", files["query"], "--image", files["dicom"], "--out", labels, *common)
    assert result.exit_code == 2, result.output
    assert f"--out {labels} names a label map, but several scans" in " ".join(result.output.split())
    assert not labels.exists() and not loaded
    result = invoke("--image", files["query"], "--out", f"{tmp_path / 'newdir'}/", *common)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "newdir").iterdir()) == [
        "scan.json", "scan.nii.gz", "segmentations.csv"
    ]  # fmt: skip


def test_a_rerun_into_a_detached_header_leaves_no_probability_voxels(files, tmp_path, monkeypatch) -> None:
    """Removing the earlier lab_probabilities.mhd left the voxels it named (lab_probabilities.zraw)."""
    _known_prediction(files, monkeypatch, files["query"])
    out = tmp_path / "lab.mhd"
    common = ["--image", files["query"], *_reference(files), "--model", files["bundle"], "--out", out]
    assert invoke(*common, "--strategy", "one_shot", "--save-probabilities", *SPACING).exit_code == 0
    assert (tmp_path / "lab_probabilities.zraw").is_file()
    result = invoke(*common, "--strategy", "one_shot", *SPACING)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.json", "lab.mhd", "lab.zraw"]


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--tuning-steps", "-1", "Invalid value for '--tuning-steps': must be 0 or more, got -1"),
        ("--tuning-lr", "nan", "Invalid value for '--tuning-lr': must be a finite number above 0, got nan"),
        ("--tuning-lr", "0", "Invalid value for '--tuning-lr': must be a finite number above 0, got 0.0"),
    ],
)
def test_tuning_options_are_checked_before_any_reading(files, tmp_path, option, value, expected) -> None:
    result = invoke(
        "--image", tmp_path / "missing.nii.gz", *_reference(files), "--model", tmp_path / "no_model",
        "--strategy", "tuning", option, value, "--out", tmp_path / "o.nii.gz",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_a_4d_scan_is_segmented_from_the_channel_asked_for(files, tmp_path, monkeypatch) -> None:
    """A multi-modal MSD image (x, y, z, channel): ingest trains on channel 0, and the user picks the volume
    to segment; the label map lies on the 3-D part of the scan's grid."""
    query = read_image(files["query"])
    other = sitk.Cast(query, sitk.sitkFloat32) * 0.5
    four_d = sitk.JoinSeries([other, sitk.Cast(query, sitk.sitkFloat32)])  # channel 1 is the query
    four_d_path = tmp_path / "multimodal.nii.gz"
    write_image(four_d, four_d_path)
    real_segment_volume = segment_module.segment_volume
    seen = []

    def recording(image, *args, **kwargs):
        seen.append(sitk.GetArrayFromImage(image))
        return real_segment_volume(image, *args, **kwargs)

    monkeypatch.setattr(segment_module, "segment_volume", recording)
    common = ["--image", four_d_path, *_reference(files), "--model", files["bundle"], *SPACING]
    out = tmp_path / "labels.nii.gz"
    result = invoke(*common, "--channel", "1", "--out", out)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(seen[0], sitk.GetArrayFromImage(query).astype(np.float32), atol=1e-3)
    written = read_image(out)
    assert written.GetDimension() == 3
    assert Geometry.from_image(written).same_grid(Geometry.from_image(query))
    assert json.loads((tmp_path / "labels.json").read_text())["channel"] == 1

    refused = invoke(*common, "--out", tmp_path / "none.nii.gz")
    assert refused.exit_code == 2 and "holds 2 volumes along its 4th axis" in " ".join(refused.output.split())
    assert "--channel N (0 to 1" in " ".join(refused.output.split())
    beyond = invoke(*common, "--channel", "2", "--out", tmp_path / "beyond.nii.gz")
    assert beyond.exit_code == 2 and "--channel 2 is not one of them (0 to 1)" in " ".join(
        beyond.output.split()
    )


@pytest.mark.parametrize("save_probabilities", [True, False])
def test_an_earlier_label_map_beside_the_scans_is_not_read_as_a_scan(
    files, tmp_path, monkeypatch, caplog, save_probabilities
) -> None:
    """`--image scans/a.nii.gz --out scans/a_seg.nii.gz`, then `--images scans`: the label map was read as a
    scan (a CT without air, or with --modality MR segmented as one), and with --save-probabilities the batch
    was refused, as a_seg_probabilities.nii.gz and a_seg.nii.gz "would both write" one file."""
    _known_prediction(files, monkeypatch, files["query"])
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        write_image(read_image(files["query"]), scans / name)
    common = [*_reference(files), "--model", files["bundle"], "--no-reference-check", *SPACING]
    common += ["--save-probabilities"] if save_probabilities else []
    assert invoke("--image", scans / "a.nii.gz", "--out", scans / "a_seg.nii.gz", *common).exit_code == 0
    with caplog.at_level("INFO", logger="iris_pipelines.segment"):
        result = invoke("--images", scans, "--out", tmp_path / "labels", *common)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "labels" / "segmentations.csv", keep_default_na=False)
    assert summary["image"].tolist() == [str(scans / "a.nii.gz"), str(scans / "b.nii.gz")]
    skipped = [scans / "a_seg.nii.gz"] + (
        [scans / "a_seg_probabilities.nii.gz"] if save_probabilities else []
    )
    logged = {r.getMessage() for r in caplog.records if r.levelname == "INFO"}
    sidecar = scans / "a_seg.json"
    for path in skipped:
        assert f"--images: skipped {path}: iris segment wrote it (see {sidecar}), not a scan" in logged


def test_a_scan_beside_a_sidecar_of_another_output_is_still_a_scan(tmp_path) -> None:
    """Only the file a sidecar names as its output (and its probabilities) is skipped: a.nii.gz stays a scan
    when a.json describes the label map a.mha written beside it."""
    (tmp_path / "a.nii.gz").write_bytes(b"scan")
    (tmp_path / "a.mha").write_bytes(b"label map")
    sidecar = {"strategy": "one_shot", "preprocess": {}, "classes": [], "output": "elsewhere/a.mha"}
    (tmp_path / "a.json").write_text(json.dumps(sidecar))
    assert scans_in(tmp_path) == [tmp_path / "a.nii.gz"]


def test_folders_that_hold_this_or_an_earlier_output_folder_are_not_scans(
    files, tmp_path, monkeypatch, caplog
) -> None:
    """--out scans/results/run1, then run2: the second run read scans/results as a DICOM series, reported
    it as a failed scan ("holds no DICOM series") and exited 1."""
    _known_prediction(files, monkeypatch, files["query"])
    scans = tmp_path / "scans"
    scans.mkdir()
    write_image(read_image(files["query"]), scans / "a.nii.gz")
    common = ["--images", scans, *_reference(files), "--model", files["bundle"], "--no-reference-check"]
    assert invoke(*common, "--out", scans / "results" / "run1", *SPACING).exit_code == 0
    with caplog.at_level("INFO", logger="iris_pipelines.segment"):
        result = invoke(*common, "--out", scans / "results" / "run2", *SPACING)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(scans / "results" / "run2" / "segmentations.csv", keep_default_na=False)
    assert summary["image"].tolist() == [str(scans / "a.nii.gz")] and summary["status"].tolist() == ["ok"]
    assert (
        f"--images: skipped the folder {scans / 'results'}: it holds the output directory "
        f"{scans / 'results' / 'run2'}, not a DICOM series"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="iris_pipelines.segment"):  # a third run writes elsewhere
        assert scans_in(scans, exclude=tmp_path / "elsewhere") == [scans / "a.nii.gz"]
    assert (
        f"--images: skipped the folder {scans / 'results'}: it holds only folders, among them "
        f"{scans / 'results' / 'run1'}, an earlier run's output, not a DICOM series"
    ) in caplog.text


def _batch_stopped_at_b(files, tmp_path, monkeypatch, error: BaseException) -> tuple[list[Path], object]:
    """Scans a, b and c segmented in one batch, reading b raising ``error``; the scans and the CLI result."""
    _known_prediction(files, monkeypatch, files["query"])
    scans = [tmp_path / f"{name}.nii.gz" for name in "abc"]
    for scan in scans:
        write_image(read_image(files["query"]), scan)
    real_read_scan = segment_module.read_scan

    def raises_at_b(path, *args, **kwargs):
        if path == scans[1]:
            raise error
        return real_read_scan(path, *args, **kwargs)

    monkeypatch.setattr(segment_module, "read_scan", raises_at_b)
    args = [arg for scan in scans for arg in ("--image", scan)]
    result = invoke(
        *args, *_reference(files), "--model", files["bundle"], "--no-reference-check",
        "--out", tmp_path / "labels", *SPACING,
    )  # fmt: skip
    return scans, result


def test_an_interrupted_batch_lists_the_scans_it_did_not_reach(files, tmp_path, monkeypatch) -> None:
    """Ctrl-C during a batch left segmentations.csv with the scans done only: the others were missing."""
    scans, result = _batch_stopped_at_b(files, tmp_path, monkeypatch, KeyboardInterrupt())
    assert result.exit_code == 1 and "Aborted" in result.output
    summary = pd.read_csv(tmp_path / "labels" / "segmentations.csv", keep_default_na=False)
    assert summary["image"].tolist() == [str(scan) for scan in scans]
    assert summary["status"].tolist() == ["ok", "not run", "not run"]
    assert summary["reason"].tolist() == ["", "interrupted", "interrupted"]
    assert summary["output"].tolist() == [str(tmp_path / "labels" / "a.nii.gz"), "", ""]


def test_a_scan_that_raises_unexpectedly_is_listed_as_failed_not_interrupted(
    files, tmp_path, monkeypatch
) -> None:
    """An error no scan is expected to raise stops the batch; the scan it came from failed (and loses its
    earlier outputs, which would look current), the scans after it were not run."""
    stale = tmp_path / "labels" / "b.nii.gz"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier run's label map")
    _, result = _batch_stopped_at_b(files, tmp_path, monkeypatch, RuntimeError("an unexpected\nfailure"))
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    summary = pd.read_csv(tmp_path / "labels" / "segmentations.csv", keep_default_na=False)
    assert summary["status"].tolist() == ["ok", "failed", "not run"]
    assert summary["reason"][1].startswith("RuntimeError: an unexpected failure")
    assert summary["reason"][2] == "interrupted" and not stale.exists()


@pytest.mark.parametrize("device", ["mps", "xla", "meta", "gpu", "CPU"])
def test_a_device_other_than_cpu_or_cuda_is_one_line_before_any_reading(
    files, tmp_path, monkeypatch, device
) -> None:
    """--device mps gave a traceback (torch parses it and fails moving the model there); --device gpu or CPU
    printed torch's list of 20 device types."""

    def no_reading(*args, **kwargs):
        raise AssertionError("read the scan although the device is wrong")

    monkeypatch.setattr(segment_module, "read_scan", no_reading)
    result = invoke(
        "--image", files["query"], *_reference(files), "--model", files["bundle"], "--device", device,
        "--out", tmp_path / "o.nii.gz", *SPACING,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"--device '{device}': expected auto, cpu, cuda or cuda:N" in result.output
    assert "Traceback" not in result.output and "xpu" not in result.output


def test_the_sidecar_records_what_a_reviewer_needs_to_redo_the_result(
    files, tmp_path, monkeypatch, one_torch_thread
) -> None:
    """The sidecar lacked --overlap, the package version, the --labels file, the normalisation actually used
    (the bundle records only the spacing) and checksums of the scan and the references."""
    _known_prediction(files, monkeypatch, files["dicom"])
    labels = tmp_path / "names.json"
    labels.write_text(json.dumps({"5": "liver"}))
    out = tmp_path / "o.nii.gz"
    result = invoke(
        "--image", files["dicom"], *_reference(files), "--model", files["bundle"], "--strategy", "one_shot",
        "--labels", labels, "--overlap", "0.25", "--no-reference-check", "--out", out, *SPACING,
        "--project", tmp_path,  # no parameters_preprocess.yml: the normalisation is PreprocessParams' default
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["overlap"] == 0.25 and sidecar["labels_file"] == str(labels)
    assert sidecar["iris_pipelines_version"] == iris_pipelines.__version__
    assert sidecar["preprocess"] == PARAMS  # what the sources gave, as before
    assert sidecar["preprocess_resolved"] == {
        "target_spacing": [1.0, 1.0, 1.0], "ct_window": [-990.0, 500.0], "percentiles": [2.0, 98.0]
    }  # fmt: skip
    assert sidecar["image_sha256"] == file_sha256(files["dicom"])  # a series folder: its files
    (reference,) = sidecar["references"]
    assert reference["image_sha256"] == file_sha256(files["ref_a"])
    assert reference["label_sha256"] == file_sha256(files["ref_a_label"])
    without = tmp_path / "without.nii.gz"
    result = invoke(
        "--image", files["query"], *_reference(files), "--model", files["bundle"], "--strategy", "one_shot",
        "--no-reference-check", "--out", without, *SPACING,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(sidecar_path(without).read_text())
    assert sidecar["labels_file"] is None and sidecar["overlap"] == 0.5
    assert sidecar["image_sha256"] == file_sha256(files["query"])


def test_a_missing_embeddings_file_is_named_as_missing(tmp_path) -> None:
    with pytest.raises(InvalidInputError) as caught:
        read_embeddings(tmp_path / "nope.parquet")
    assert str(caught.value) == f"{tmp_path / 'nope.parquet'}: the file does not exist; check the path"


def test_an_empty_reference_label_says_what_to_do(files, tmp_path) -> None:
    empty = tmp_path / "empty_labels.mha"
    write_image(read_image(files["ref_a_label"]) * 0, empty)
    with pytest.raises(InvalidInputError) as caught:
        read_reference(ReferenceSpec(files["ref_a"], empty), None, "CT", PARAMS)
    assert str(caught.value) == (
        f"{empty}: the reference label has no foreground voxel (every voxel is 0): check that it is the "
        f"label map of {files['ref_a']} and that its export kept the classes, or use a reference whose "
        "label shows the classes to segment"
    )


def test_a_labels_file_that_names_no_class_for_a_segmented_one_is_warned_about(tmp_path, caplog) -> None:
    labels = tmp_path / "names.json"
    labels.write_text(json.dumps({"1": "liver"}))
    with caplog.at_level("WARNING", logger="iris_pipelines.segment"):
        names = class_names([1, 3], labels)
    assert names == {1: "liver", 3: "class_3"}
    warned = f"--labels {labels} names no class of label value(s) [3], which are segmented as class_3"
    assert warned in caplog.text
