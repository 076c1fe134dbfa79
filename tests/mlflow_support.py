"""A throw-away MLflow tracking + registry store (SQLite) and artifact root, for tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest


@contextmanager
def temporary_mlflow_store(root: Path) -> Iterator[str]:
    """Points MLflow at ``root`` so tests never touch the project's mlflow.db or ./mlruns.

    Each new SQLite store costs ~5 s of schema set-up in MLflow, so tests share one where they can.
    """
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        # mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI for subprocesses and never unsets it; owning
        # the variable here makes the context restore it, so later `kedro run`s use their own registry.
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        experiment = mlflow.create_experiment("test", artifact_location=(root / "artifacts").as_uri())
        # set_experiment exports MLFLOW_EXPERIMENT_ID, an experiment of this store only: owned here too.
        patch.setitem(os.environ, "MLFLOW_EXPERIMENT_ID", experiment)
        mlflow.set_experiment(experiment_id=experiment)
        try:
            yield uri
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
