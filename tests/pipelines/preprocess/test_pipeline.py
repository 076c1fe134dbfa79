"""The preprocess pipeline runs in memory and its outputs survive the catalog's parquet and CSV formats."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import SimpleITK as sitk
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.io import file_sha256
from iris_pipelines.pipelines.preprocess import create_pipeline


def _case(root, case_id: str) -> dict:
    label = np.zeros((6, 8, 10), dtype=np.uint8)
    label[1:4, 2:5, 3:7] = 1
    paths = {}
    for kind, array in (
        ("image", np.full(label.shape, ord(case_id), np.int16) + label * 100),
        ("label", label),
    ):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.5, 3.0))
        paths[kind] = root / f"{case_id}_{kind}.nii.gz"
        sitk.WriteImage(image, str(paths[kind]))
    geometry = Geometry.from_image(sitk.ReadImage(str(paths["image"])))
    return {
        "dataset": "toy",
        "case_id": case_id,
        "subject_id": case_id,
        "modality": "CT",
        "heldout": False,
        "layout": "csv",
        "image_path": str(paths["image"]),
        "label_path": str(paths["label"]),
        "image_format": "nifti",
        **geometry.to_dict(),
        "labels": json.dumps({"1": "organ"}),
        "image_sha256": file_sha256(paths["image"]),
        "label_sha256": file_sha256(paths["label"]),
    }


def test_preprocess_pipeline_runs_in_memory(tmp_path):
    manifest = pd.DataFrame([_case(tmp_path, "a"), _case(tmp_path, "b")])
    missing = {
        **manifest.iloc[0].to_dict(),
        "case_id": "c",
        "image_path": str(tmp_path / "nope.nii.gz"),
        "image_sha256": "0" * 64,
    }
    params = {
        "target_spacing": [2.0, 2.0, 2.0],
        "output_dir": str(tmp_path / "volumes"),
        "scheduler": {"kind": "synchronous"},
    }
    catalog = DataCatalog(
        {
            "case_manifest": MemoryDataset(pd.concat([manifest, pd.DataFrame([missing])], ignore_index=True)),
            "params:preprocess": MemoryDataset(params),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    result, report = catalog.load("preprocessed_manifest"), catalog.load("preprocess_report")
    assert list(result["case_id"]) == ["a", "b"] and list(report["case_id"]) == ["c"]
    assert np.load(result.loc[0, "image_array"], mmap_mode="r").dtype == np.float32

    result.to_parquet(tmp_path / "manifest.parquet")
    back = pd.read_parquet(tmp_path / "manifest.parquet")
    assert json.loads(back.loc[0, "class_voxels"]) == {"1": json.loads(result.loc[0, "class_voxels"])["1"]}
    assert Geometry.from_json(back.loc[1, "original_geometry"]) == Geometry.from_json(
        result.loc[1, "original_geometry"]
    )
    report.to_csv(tmp_path / "report.csv", index=False)
    assert pd.read_csv(tmp_path / "report.csv").loc[0, "check"] == "missing_file"
