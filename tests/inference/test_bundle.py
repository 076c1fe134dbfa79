"""A model bundle round-trips through safetensors + JSON, with no pickle anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iris_pipelines.inference.bundle import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BundleError,
    ModelBundle,
    bundle_directory,
)
from iris_pipelines.model import Iris, IrisConfig


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny(memory_bank_size=3))
    return ModelBundle.from_model(model, class_ids={"liver/1": 0, "kidney/2": 1}, metadata={"final_step": 7})


def test_round_trip_without_pickle(bundle: ModelBundle, tmp_path: Path) -> None:
    target = bundle.save(tmp_path / "bundle")
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    for path in target.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
    raw = load_file(str(target / WEIGHTS_FILE))  # plain safetensors, readable without this project
    assert raw.keys() == bundle.state_dict.keys()
    document = json.loads((target / CONFIG_FILE).read_text())
    assert document["format_version"] == 1 and document["class_ids"] == {"liver/1": 0, "kidney/2": 1}

    loaded = ModelBundle.load(target)
    assert loaded.model_config == bundle.model_config and loaded.metadata == {"final_step": 7}
    model = loaded.build_model()
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, bundle.state_dict[name]), name
    assert not list(tmp_path.glob(".bundle.*")), "temporary directories must not be left behind"


def test_a_saved_bundle_is_readable_by_the_group(bundle: ModelBundle, tmp_path: Path, group_umask) -> None:
    group_umask(bundle.save(tmp_path / "bundle"))


def test_save_replaces_an_older_bundle(bundle: ModelBundle, tmp_path: Path) -> None:
    bundle.save(tmp_path / "b")
    newer = ModelBundle(bundle.model_config, bundle.state_dict, metadata={"final_step": 8})
    newer.save(tmp_path / "b")
    assert ModelBundle.load(tmp_path / "b").metadata == {"final_step": 8}
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_errors_name_the_file(bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        ModelBundle.load(tmp_path / "nowhere")
    target = bundle.save(tmp_path / "bundle")
    weights = target / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(BundleError, match=f"{WEIGHTS_FILE}.*corrupt"):
        ModelBundle.load(target)
    weights.unlink()
    with pytest.raises(BundleError, match=f"{WEIGHTS_FILE} is missing"):
        ModelBundle.load(target)
    (target / CONFIG_FILE).write_text("{not json")
    with pytest.raises(BundleError, match=f"{CONFIG_FILE}: not valid JSON"):
        ModelBundle.load(target)


def test_weights_that_do_not_fit_the_config_are_an_error(bundle: ModelBundle) -> None:
    wrong = ModelBundle(IrisConfig.tiny(channels=(8, 16, 32, 64, 128)).to_dict(), bundle.state_dict)
    with pytest.raises(BundleError, match="do not fit its config"):
        wrong.build_model()


def test_a_versioned_catalog_folder_resolves_to_its_newest_complete_bundle(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    """``data/06_models/iris_model`` holds ``<version>/iris_model``: a load without a version takes the
    newest one that has its config, as the catalog does."""
    folder = tmp_path / "iris_model"
    older = bundle.save(folder / "2026-01-01T00.00.00.000Z" / "iris_model")
    (folder / "2026-02-01T00.00.00.000Z" / "iris_model").mkdir(parents=True)  # a failed save
    assert bundle_directory(folder) == older
    assert bundle_directory(older) == older
    (older / CONFIG_FILE).unlink()
    with pytest.raises(BundleError, match=f"versioned catalog folder {folder}/<version>/iris_model/config"):
        bundle_directory(folder)
