"""Real `kedro run` subprocesses on a temporary copy of the project, the way a user runs it.

Each pipeline runs as its own command, reading the previous one's versioned outputs from disk, and each
command is one MLflow run with the flattened parameters and the provenance tags.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEDRO = str(Path(sys.executable).with_name("kedro"))
SMALL_PHANTOMS = "phantoms.cases_per_dataset=3,phantoms.size_scale=0.6"


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The project's code and configuration in a fresh folder, with no data and no MLflow store."""
    root = tmp_path_factory.mktemp("project")
    for name in ("conf", "src", "pyproject.toml", "requirements.lock", ".telemetry"):
        source = PROJECT_ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("credentials*", "__pycache__", "*.egg-info")
            shutil.copytree(source, root / name, ignore=ignore)
        else:
            shutil.copy2(source, root / name)
    for layer in ("01_raw", "02_intermediate", "05_model_input", "08_reporting"):
        (root / "data" / layer).mkdir(parents=True)
    # A git checkout, so the provenance tags carry a real commit.
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=root, check=True
    )
    return root


def kedro_run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [KEDRO, "run", *args], cwd=root, env=env, capture_output=True, encoding="utf-8", errors="replace",
        timeout=900, check=False,
    )
    assert result.returncode == 0, (
        f"kedro run {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def latest_version(path: Path) -> Path:
    """The newest file of a versioned dataset (`<path>/<version>/<name>`)."""
    versions = sorted(p for p in path.iterdir() if p.is_dir())
    assert versions, f"no versions under {path}"
    return versions[-1] / path.name


def mlflow_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("iris_pipelines")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_data_pipelines_run_one_after_another(project_copy: Path):
    kedro_run(project_copy, "--pipeline=ingest", f"--params={SMALL_PHANTOMS}")
    manifest = pd.read_parquet(latest_version(project_copy / "data/02_intermediate/case_manifest.parquet"))
    assert manifest["dataset"].nunique() >= 8
    assert manifest["heldout"].sum() > 0

    kedro_run(project_copy, "--pipeline=preprocess")
    preprocessed = pd.read_parquet(
        latest_version(project_copy / "data/05_model_input/preprocessed_manifest.parquet")
    )
    assert len(preprocessed) == len(manifest)
    assert all(Path(p).exists() for p in preprocessed["image_array"])

    kedro_run(project_copy, "--pipeline=episodes")
    index = json.loads(latest_version(project_copy / "data/05_model_input/episode_index.json").read_text())
    assert {case["split"] for case in index["cases"]} >= {"train", "val", "test"}
    assert index["episodes"]

    runs = mlflow_runs(project_copy)
    assert [run.info.run_name for run in runs] == ["ingest", "preprocess", "episodes"]
    assert all(run.info.status == "FINISHED" for run in runs)
    ingest_run = runs[0]
    assert ingest_run.data.params["phantoms.cases_per_dataset"] == "3"
    assert len(ingest_run.data.tags["git_commit"]) == 40
    assert ingest_run.data.tags["git_dirty"] == "false"
    assert ingest_run.data.tags["kedro_env"] == "local"
    assert len(ingest_run.data.tags["lockfile_sha256"]) == 64
    assert runs[1].data.params["preprocess.target_spacing"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    artifacts = [a.path for a in client.list_artifacts(ingest_run.info.run_id, "environment")]
    assert artifacts == ["environment/requirements.lock"]
