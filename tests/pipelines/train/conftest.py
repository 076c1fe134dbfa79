"""MLflow store and the synthetic on-disk collection shared by the train pipeline tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

# The training tests' synthetic collection (.npy volumes + manifest + episode index, no ingest).
sys.path.insert(0, str(Path(__file__).parents[2] / "training"))

from training_synthetic import build_collection  # noqa: E402


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory):
    """(preprocessed_manifest, episode_index), read-only."""
    return build_collection(tmp_path_factory.mktemp("train_collection"))


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SQLite store + artifact root under tmp, shared per module (each new store costs ~5 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        experiment = mlflow.create_experiment("test", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment)
        yield root
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
