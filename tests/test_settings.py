"""Project settings: the hpcc env's MLflow server comes from MLFLOW_TRACKING_URI, or a message says so;
`kedro run` and the iris commands agree on the MLflow store, whose registry is the tracking store; the
package runs as `python -m`; cluster logs stay out of git status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from iris_pipelines import settings

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _mlflow_server(env: str) -> dict:
    return OmegaConfigLoader(str(CONF), env=env, **settings.CONFIG_LOADER_ARGS)["mlflow"]["server"]


def test_hpcc_without_a_tracking_uri_says_what_to_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """kedro-mlflow would fall back to ./mlruns, which MLflow refuses with a "maintenance mode" error."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(Exception, match="MLFLOW_TRACKING_URI is not set, and this Kedro env needs it"):
        _mlflow_server("hpcc")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    assert _mlflow_server("hpcc")["mlflow_tracking_uri"] == "http://mlflow.example.org:5000"


@pytest.mark.parametrize("exported", [None, "http://mlflow.example.org:5000", "sqlite:///runs/team.db"])
def test_kedro_run_and_the_iris_commands_use_the_same_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exported: str | None
) -> None:
    """With MLFLOW_TRACKING_URI exported, a base-env `kedro run` wrote to ./mlflow.db while `iris review`
    and `iris segment` read the variable's store, and found no registered model."""
    from iris_pipelines import registry

    if exported is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", exported)
    monkeypatch.chdir(ROOT)  # where ProjectRootHooks runs `kedro run`, before mlflow.yml is read
    server = _mlflow_server("local")
    monkeypatch.chdir(tmp_path)  # the iris commands take the project from --project
    iris = registry.tracking_uri(None, ROOT)
    assert iris == server["mlflow_tracking_uri"] == server["mlflow_registry_uri"]
    if exported is None or exported.startswith("sqlite:///"):
        assert iris.startswith(f"sqlite:///{ROOT.resolve()}/")


@pytest.mark.parametrize("env", ["local", "hpcc"])
def test_the_registry_is_the_tracking_store_whatever_mlflow_registry_uri_says(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    """A stray MLFLOW_REGISTRY_URI (a shell profile; any mlflow.set_registry_uri in the process exports
    it) sent model versions to another store than their run, where the iris commands never look."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:////elsewhere/registry.db")
    server = _mlflow_server(env)
    assert server["mlflow_registry_uri"] == server["mlflow_tracking_uri"]


def test_a_kedro_session_registers_models_in_its_tracking_store(tmp_path: Path) -> None:
    """What kedro-mlflow sets up in the process, where register_model's MlflowClient and log_model look."""
    import mlflow
    from mlflow_support import in_process_sessions
    from project_copy import copy_project

    project = copy_project(tmp_path / "project")
    with in_process_sessions(project) as session:
        os.environ["MLFLOW_REGISTRY_URI"] = f"sqlite:///{tmp_path / 'other_registry.db'}"
        with session() as kedro_session:
            kedro_session.load_context()
        # the project's, absolute: MLflow keeps a store per URI string for the rest of the process
        assert mlflow.get_tracking_uri() == f"sqlite:///{project.resolve() / 'mlflow.db'}"
        assert mlflow.get_registry_uri() == mlflow.get_tracking_uri()
        assert mlflow.MlflowClient()._registry_uri == mlflow.get_tracking_uri()


def test_python_dash_m_runs_kedros_run_command() -> None:
    """`python -m iris_pipelines` is `kedro run`; it once looked for `run` in the `iris` tool's CLI."""
    done = subprocess.run(
        [sys.executable, "-m", "iris_pipelines", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--pipelines" in done.stdout and "--env" in done.stdout


def test_slurm_job_logs_in_the_project_folder_do_not_make_the_checkout_dirty() -> None:
    for log in ("slurm-kedro-4242.out", "slurm-4243.out"):
        done = subprocess.run(["git", "check-ignore", "-q", log], cwd=ROOT, check=False)
        assert done.returncode == 0, f"{log} is not git-ignored: runs would be tagged git_dirty=true"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
        ("sqlite:///runs/team.db?timeout=20", "sqlite:///{cwd}/runs/team.db?timeout=20"),
        ("sqlite:////shared/mlflow.db", "sqlite:////shared/mlflow.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("http://mlflow.example.org:5000", "http://mlflow.example.org:5000"),
    ],
)
def test_a_relative_sqlite_store_is_made_absolute_from_the_project_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, expected: str
) -> None:
    """MLflow keeps a store per URI string: a relative one stayed the first project's file for the rest of
    the process. ProjectRootHooks has made the project root the current directory when mlflow.yml is read."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    assert settings.env_or("MLFLOW_TRACKING_URI", "unused") == expected.format(cwd=tmp_path.resolve())
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert settings.env_or("MLFLOW_TRACKING_URI", value) == expected.format(cwd=tmp_path.resolve())
