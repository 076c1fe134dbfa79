"""A throw-away MLflow tracking + registry store (SQLite) and artifact root, for tests; in-process Kedro
sessions on a project copy, for what whole runs leave in MLflow."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
            _end_runs_and_forget_the_store()


def _end_runs_and_forget_the_store() -> None:
    """What a test's MLflow set-up leaves: open runs ended, the process's tracking and registry URIs unset."""
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


EPISODES_VERSION = "2026-01-01T00.00.00.000Z"


def episodes_project(root: Path, preprocessed_manifest) -> Path:
    """A copy of the project's code and conf (no MLflow store) whose data holds one version of
    ``preprocessed_manifest``: `kedro run --pipelines=episodes` (one node, well under a second) runs on it,
    for tests of what whole Kedro runs leave in MLflow."""
    from kedro.io import DataCatalog
    from project_copy import copy_project

    copy_project(root)
    entry = {
        "type": "iris_pipelines.datasets.AtomicParquetDataset",
        "filepath": str(root / "data" / "05_model_input" / "preprocessed_manifest.parquet"),
        "versioned": True,
    }
    catalog = DataCatalog.from_config({"preprocessed_manifest": entry}, save_version=EPISODES_VERSION)
    catalog.save("preprocessed_manifest", preprocessed_manifest)
    return root


def project_runs(root: Path) -> list:
    """The MLflow runs of the project's own store (``root/mlflow.db``), oldest first."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["attributes.start_time ASC"])


@contextmanager
def in_process_sessions(root: Path) -> Iterator[Callable[..., Any]]:
    """``session(**kwargs)`` creates a KedroSession of the project at ``root`` in this process, as a notebook
    or a script looping over sessions does (kedro-mlflow's hook and the project's hooks are process-wide
    objects); ``session(project=other, **kwargs)`` one of another project, as a notebook comparing two does
    (the working directory stays where the last session left it). No MLFLOW_* variable of the caller's
    shell reaches them; MLflow's process-wide settings, the variables and the working directory are
    restored on leaving."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    def session(project: Path = root, **kwargs: Any) -> KedroSession:
        bootstrap_project(project)
        return KedroSession.create(project_path=project, **kwargs)

    saved = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}
    for key in saved:
        del os.environ[key]
    cwd, python_path, search_path = Path.cwd(), os.environ.get("PYTHONPATH"), list(sys.path)
    os.chdir(root)
    try:
        yield session
    finally:
        _end_runs_and_forget_the_store()
        mlflow.tracking.fluent._active_experiment_id = None
        for key in [key for key in os.environ if key.startswith("MLFLOW_")]:
            del os.environ[key]
        os.environ.update(saved)
        os.chdir(cwd)
        # bootstrap_project puts the copy's src first on sys.path and PYTHONPATH (later `kedro` children)
        sys.path[:] = search_path
        if python_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = python_path
