"""IrisModelBundleDataset: versioned bundle directories, as any kedro-datasets file dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kedro.io import DataCatalog
from kedro.io.core import DatasetError, Version

from iris_pipelines.datasets import IrisModelBundleDataset
from iris_pipelines.inference.bundle import CONFIG_FILE, WEIGHTS_FILE, ModelBundle
from iris_pipelines.model import Iris, IrisConfig


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    torch.manual_seed(0)
    return ModelBundle.from_model(Iris(IrisConfig.tiny()), metadata={"final_step": 1})


def test_round_trip(bundle: ModelBundle, tmp_path: Path) -> None:
    dataset = IrisModelBundleDataset(filepath=str(tmp_path / "iris_model"))
    assert not dataset.exists()
    dataset.save(bundle)
    assert dataset.exists()
    assert {p.name for p in (tmp_path / "iris_model").iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    loaded = dataset.load()
    assert loaded.metadata == {"final_step": 1}
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in bundle.state_dict.items())
    assert "iris_model" in str(dataset)


def test_two_versions_from_the_catalog(bundle: ModelBundle, tmp_path: Path) -> None:
    config = {
        "iris_model": {
            "type": "iris_pipelines.datasets.IrisModelBundleDataset",
            "filepath": str(tmp_path / "iris_model"),
            "versioned": True,
        }
    }
    first = ModelBundle(bundle.model_config, bundle.state_dict, metadata={"final_step": 1})
    second = ModelBundle(bundle.model_config, bundle.state_dict, metadata={"final_step": 2})
    DataCatalog.from_config(config, save_version="2026-01-01T00.00.00.000Z").save("iris_model", first)
    DataCatalog.from_config(config, save_version="2026-01-02T00.00.00.000Z").save("iris_model", second)
    bundle_dirs = sorted((tmp_path / "iris_model").glob("*/iris_model"))
    assert [p.parent.name for p in bundle_dirs] == ["2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z"]
    assert DataCatalog.from_config(config).load("iris_model").metadata == {"final_step": 2}
    pinned = DataCatalog.from_config(config, load_versions={"iris_model": "2026-01-01T00.00.00.000Z"})
    assert pinned.load("iris_model").metadata == {"final_step": 1}


def test_missing_bundle_is_a_dataset_error(tmp_path: Path) -> None:
    versioned = IrisModelBundleDataset(filepath=str(tmp_path / "m"), version=Version(None, None))
    with pytest.raises(DatasetError, match="Did not find any versions"):
        versioned.load()
    plain = IrisModelBundleDataset(filepath=str(tmp_path / "m"))
    with pytest.raises(DatasetError, match="does not exist"):
        plain.load()


def test_saving_something_else_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="saves ModelBundle"):
        IrisModelBundleDataset(filepath=str(tmp_path / "m")).save({"weights": 1})
