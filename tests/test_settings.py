"""Project settings: the hpcc env's MLflow server comes from MLFLOW_TRACKING_URI, or a message says so;
the package runs as `python -m`; cluster logs stay out of git status."""

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
    assert _mlflow_server("local")["mlflow_tracking_uri"] == "sqlite:///mlflow.db"


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
