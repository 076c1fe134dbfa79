"""The episodes pipeline runs in memory and writes a JSON-serialisable index."""

from __future__ import annotations

import json

import pandas as pd
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from iris_pipelines.collection.episodes import index_checksum
from iris_pipelines.pipelines.episodes import create_pipeline


def _manifest() -> pd.DataFrame:
    rows = [
        {
            "dataset": dataset,
            "case_id": f"{dataset}{i}",
            "subject_id": f"s{i}",
            "heldout": dataset == "new",
            "labels": json.dumps({"1": "kidney"}),
            "class_voxels": json.dumps({"1": 10 + i}),
        }
        for dataset in ("old", "new")
        for i in range(6)
    ]
    return pd.DataFrame(rows)


def test_episodes_pipeline_runs_in_memory():
    params = {"seed": 3, "ratios": {"train": 0.5, "val": 0.25, "test": 0.25}, "n_references": 2}
    catalog = DataCatalog(
        {"preprocessed_manifest": MemoryDataset(_manifest()), "params:episodes": MemoryDataset(params)}
    )
    SequentialRunner().run(create_pipeline(), catalog)
    index = json.loads(json.dumps(catalog.load("episode_index")))
    assert index["seed"] == 3 and index["checksum"] == index_checksum(index)
    assert {c["split"] for c in index["cases"] if c["dataset"] == "new"} == {"context", "test"}
    assert all(len(e["references"]) == 2 for e in index["episodes"])
