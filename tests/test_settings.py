"""Project settings: the hpcc env's MLflow server comes from MLFLOW_TRACKING_URI, or a message says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader

from iris_pipelines import settings

CONF = Path(__file__).resolve().parents[1] / "conf"


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
