"""The ingest pipeline: node behaviour and an in-memory run over a small phantom collection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.phantoms import default_specs
from iris_pipelines.pipelines.ingest import create_pipeline
from iris_pipelines.pipelines.ingest.nodes import generate_phantom_collection, ingest_cases

INGEST_PARAMS = {"strict": False, "tolerance_mm": 1e-3, "sources": []}


def _phantom_params(root: Path, *, enabled: bool = True) -> dict[str, object]:
    return {"enabled": enabled, "root": str(root), "seed": 7, "cases_per_dataset": 2, "size_scale": 0.25}


def test_disabled_phantoms_write_nothing(tmp_path: Path) -> None:
    assert generate_phantom_collection(_phantom_params(tmp_path / "p", enabled=False)) == []
    assert not (tmp_path / "p").exists()


def test_phantom_sources_are_json_ready(tmp_path: Path) -> None:
    sources = generate_phantom_collection(_phantom_params(tmp_path / "phantoms"))
    assert json.loads(json.dumps(sources)) == sources
    assert {source["layout"] for source in sources} == {"msd", "nnunet", "csv"}


def test_user_sources_come_before_phantom_sources(tmp_path: Path) -> None:
    """A user source is ingested alongside the phantoms; a name clash rejects the later (phantom) one."""
    task = tmp_path / "Task09_Spleen"
    for folder in ("imagesTr", "labelsTr"):
        (task / folder).mkdir(parents=True)
    image = sitk.Image([6, 7, 8], sitk.sitkInt16)
    label = sitk.Image([6, 7, 8], sitk.sitkUInt8)
    label[2, 3, 4] = 1
    sitk.WriteImage(image, str(task / "imagesTr" / "s1.nii.gz"))
    sitk.WriteImage(label, str(task / "labelsTr" / "s1.nii.gz"))
    (task / "dataset.json").write_text(
        '{"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},'
        ' "training": [{"image": "./imagesTr/s1.nii.gz", "label": "./labelsTr/s1.nii.gz"}]}'
    )
    user = {"name": "spleen", "layout": "msd", "path": str(task)}
    manifest, report = ingest_cases([dict(user)], {**INGEST_PARAMS, "sources": [user]})
    assert list(manifest["dataset"]) == ["spleen"]
    assert list(report["check"]) == ["duplicate_dataset"]


def test_sources_written_as_one_mapping_are_refused_whole() -> None:
    """`sources:` without the `-` is one source's keys: refused naming `sources`, not read key by key."""
    user = {"name": "spleen", "layout": "msd", "path": "/data/Task09_Spleen"}
    with pytest.raises(InvalidInputError, match="not a list") as refused:
        ingest_cases([], {**INGEST_PARAMS, "sources": user})
    assert refused.value.check == "bad_source"


def test_ingest_pipeline_runs_in_memory(tmp_path: Path) -> None:
    catalog = DataCatalog(
        {
            "params:phantoms": MemoryDataset(_phantom_params(tmp_path / "phantoms")),
            "params:ingest": MemoryDataset(INGEST_PARAMS),
        }
    )
    SequentialRunner().run(create_pipeline(), catalog)
    manifest = catalog.load("case_manifest")
    report = catalog.load("ingest_report")
    assert report.empty, report.to_dict("records")
    # Datasets with several scans per subject get whole subjects, so possibly one case more than asked.
    per_dataset = manifest.groupby("dataset").size()
    assert set(per_dataset.index) == {spec.name for spec in default_specs()}
    assert per_dataset.between(2, 3).all()
    assert set(manifest["layout"]) == {"msd", "nnunet", "csv"}
