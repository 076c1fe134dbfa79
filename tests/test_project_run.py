"""Real `kedro run` subprocesses on a temporary copy of the project, the way a user runs it.

Each pipeline runs as its own command, reading the previous one's versioned outputs from disk, and each
command is one MLflow run with the flattened parameters and the provenance tags. The data pipelines run
with the base parameters on a small phantom collection; train → embed_tasks → evaluate → tsne then run in
a tiny test env (two training steps), and the quick-start notebook is executed on the finished project.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from processes import interruptible_children
from project_copy import copy_project

from iris_pipelines.hooks import installed_lock_sha256

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KEDRO = str(Path(sys.executable).with_name("kedro"))
# Four cases per dataset: the smallest collection whose train split has two subjects per dataset
# (60/20/20 over 4 subjects gives 2/1/1), which training episodes need (query and reference subjects).
SMALL_PHANTOMS = "phantoms.cases_per_dataset=4,phantoms.size_scale=0.6"
NOTEBOOK = PROJECT_ROOT / "notebooks" / "01_quickstart.ipynb"
DATA_PIPELINES = ("ingest", "preprocess", "episodes")
MODEL_PIPELINES = ("train", "embed_tasks", "evaluate", "tsne")
METHODS = {"one_shot", "ensemble", "memory_bank", "retrieval", "tuning", "checked", "paste", "registration"}
# The model pipelines' overrides, as a Kedro env inside the copy: `--params` splits its value on every
# comma (kedro.framework.cli.utils.split_string), so list values such as crop sizes cannot go there.
TINY_ENV = "test_tiny"
TINY_PARAMS = {
    "train": {
        "steps": 2,  # plumbing, not learning: the training tests cover learning
        "batch_size": 1,
        "crop_size": [32, 32, 32],
        "warmup_steps": 1,
        "val_every": 1000,  # validation still runs once, at the last step
        "checkpoint_every": 1000,
        "log_every": 1,
        "device": "cpu",
        "precision": "fp32",
        "augment": False,
    },
    "embed_tasks": {"references_per_class": 2, "roi_size": [32, 32, 32]},
    "evaluate": {
        "roi_size": [32, 32, 32],
        "tuning_steps": 1,
        "registration": {"deformable": False, "affine_iterations": 20},
    },
    "tsne": {"perplexity": 5},
}


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    """The project's code and configuration in a fresh folder, with no data and no MLflow store."""
    root = tmp_path_factory.mktemp("project")
    copy_project(root)
    for layer in ("01_raw", "02_intermediate", "05_model_input", "08_reporting"):
        (root / "data" / layer).mkdir(parents=True)
    (root / "conf" / TINY_ENV).mkdir()
    (root / "conf" / TINY_ENV / "parameters_tiny.yml").write_text(yaml.safe_dump(TINY_PARAMS))
    # A git checkout, so the provenance tags carry a real commit.
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=root, check=True
    )
    return root


def kedro_run(root: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # The project's own conf/base/mlflow.yml decides where runs and models go, not a caller's MLFLOW_*.
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env["KEDRO_DISABLE_TELEMETRY"] = "1"
    result = subprocess.run(
        [KEDRO, "run", *args],
        cwd=cwd or root,
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, (
        f"kedro run {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    # A warning about a plugin's class that nobody running the project can act on: noise in every run.
    assert "Add type hints" not in result.stdout + result.stderr
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


@pytest.fixture(scope="module")
def data_project(project_copy: Path) -> Path:
    """The copy after `kedro run --pipelines=ingest|preprocess|episodes`, one command each."""
    kedro_run(project_copy, "--pipelines=ingest", f"--params={SMALL_PHANTOMS}")
    # From a subfolder, as from a notebook's: it must still read and write the project's data and store.
    kedro_run(project_copy, "--pipelines=preprocess", cwd=project_copy / "data")
    kedro_run(project_copy, "--pipelines=episodes")
    return project_copy


@pytest.fixture(scope="module")
def trained_project(data_project: Path) -> Path:
    """The copy after the model pipelines too (tiny env): a registered model, embeddings, evaluation, t-SNE.

    Shared by the tests that need a finished project, such as the quick-start notebook's.
    """
    for pipeline in MODEL_PIPELINES:
        kedro_run(data_project, f"--pipelines={pipeline}", f"--env={TINY_ENV}")
    return data_project


@pytest.mark.slow
def test_data_pipelines_run_one_after_another(data_project: Path):
    project_copy = data_project
    manifest = pd.read_parquet(latest_version(project_copy / "data/02_intermediate/case_manifest.parquet"))
    assert manifest["dataset"].nunique() >= 8
    assert manifest["heldout"].sum() > 0

    preprocessed = pd.read_parquet(
        latest_version(project_copy / "data/05_model_input/preprocessed_manifest.parquet")
    )
    assert len(preprocessed) == len(manifest)
    assert all(Path(p).exists() for p in preprocessed["image_array"])
    volumes = project_copy / "data/05_model_input/volumes"
    assert all(Path(p).is_relative_to(volumes) for p in preprocessed["image_array"])
    assert not (project_copy / "data/mlflow.db").exists() and not (project_copy / "data/data").exists()

    index = json.loads(latest_version(project_copy / "data/05_model_input/episode_index.json").read_text())
    assert {case["split"] for case in index["cases"]} >= {"train", "val", "test"}
    assert index["episodes"]

    runs = mlflow_runs(project_copy)[: len(DATA_PIPELINES)]
    assert [run.info.run_name for run in runs] == list(DATA_PIPELINES)
    assert all(run.info.status == "FINISHED" for run in runs)
    ingest_run = runs[0]
    assert ingest_run.data.params["phantoms.cases_per_dataset"] == "4"
    assert len(ingest_run.data.tags["git_commit"]) == 40
    assert ingest_run.data.tags["git_dirty"] == "false"
    assert ingest_run.data.tags["kedro_env"] == "local"
    assert len(ingest_run.data.tags["lockfile_sha256"]) == 64
    # the lock this environment was installed from (make install records it; "unknown" otherwise)
    assert ingest_run.data.tags["installed_lock_sha256"] == installed_lock_sha256()
    assert runs[1].data.params["preprocess.target_spacing"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    artifacts = [a.path for a in client.list_artifacts(ingest_run.info.run_id, "environment")]
    assert artifacts == ["environment/requirements.lock"]


@pytest.mark.slow
def test_model_pipelines_run_one_after_another(trained_project: Path):
    root = trained_project
    runs = mlflow_runs(root)
    assert [run.info.run_name for run in runs] == [*DATA_PIPELINES, *MODEL_PIPELINES]
    assert all(run.info.status == "FINISHED" for run in runs)
    train_run = runs[len(DATA_PIPELINES)]
    assert train_run.data.tags["kedro_env"] == TINY_ENV
    assert train_run.data.params["train.steps"] == "2"

    bundle = latest_version(root / "data/06_models/iris_model")
    assert (bundle / "weights.safetensors").is_file() and (bundle / "config.json").is_file()
    registered = json.loads(latest_version(root / "data/06_models/registered_model.json").read_text())
    assert registered["name"] == "iris" and registered["version"] == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version("iris", "1")
    assert version.status == "READY" and version.run_id == train_run.info.run_id
    assert len(version.tags["git_commit"]) == 40
    assert "eval.seen.one_shot.dice" in version.tags  # evaluate tagged the version it scored

    embeddings = pd.read_parquet(latest_version(root / "data/07_model_output/task_embeddings.parquet"))
    assert embeddings["heldout"].any() and (embeddings["source"] == "memory_bank").any()
    assert set(embeddings["model_version"]) == {"1"}

    summary = pd.read_csv(latest_version(root / "data/08_reporting/evaluation_summary.csv"))
    assert set(summary["method"]) == METHODS
    assert {"seen", "heldout"} <= set(summary["group"])
    assert summary["dice"].between(0, 1).all()
    metrics = pd.read_parquet(latest_version(root / "data/08_reporting/evaluation_metrics.parquet"))
    assert set(metrics["model_version"]) == {"1"}

    page = latest_version(root / "data/08_reporting/tsne.html").read_text()
    assert "plotly" in page.lower()
    coordinates = pd.read_csv(latest_version(root / "data/08_reporting/tsne_coordinates.csv"))
    assert len(coordinates) == len(embeddings)


def _text(cell) -> str:
    """Everything a code cell printed or displayed as plain text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def _tagged(nb, tag: str) -> list:
    cells = [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]
    assert cells, f"no cell tagged {tag!r} in {NOTEBOOK.name}"
    return cells


@pytest.mark.slow
def test_quickstart_notebook_executes(trained_project: Path, monkeypatch: pytest.MonkeyPatch):
    committed = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "clear the outputs"

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))  # which Python ran it
    workdir = trained_project / "notebooks"  # run where a user would; the notebook walks up to the root
    workdir.mkdir(exist_ok=True)
    monkeypatch.delenv("IRIS_PROJECT", raising=False)
    # The params evaluate ran with, but evaluate.roi_size left out, which the README allows (the model's
    # training crop, the 32³ evaluate used): the notebook did tuple(None).
    notebook_env = f"{TINY_ENV}_no_roi_size"
    (trained_project / "conf" / notebook_env).mkdir(exist_ok=True)
    no_roi_size = {**TINY_PARAMS, "evaluate": {**TINY_PARAMS["evaluate"], "roi_size": None}}
    (trained_project / "conf" / notebook_env / "parameters_tiny.yml").write_text(yaml.safe_dump(no_roi_size))
    monkeypatch.setenv("IRIS_ENV", notebook_env)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    assert "window: 32x32x32 voxels" in "".join(_text(cell) for cell in nb.cells)

    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert _text(nb.cells[-1]).strip() == sys.prefix, "the kernel is not the project's environment"
    assert str(trained_project) in _text(_tagged(nb, "setup")[0])
    assert not (workdir / "mlflow.db").exists(), "the notebook made a second MLflow store in notebooks/"

    dice_text = "".join(_text(cell) for cell in _tagged(nb, "dice"))
    means = re.findall(r"mean Dice +(one_shot|ensemble) +(\d\.\d+)", dice_text)
    assert {name for name, _ in means} == {"one_shot", "ensemble"}, dice_text
    assert all(0.0 <= float(value) <= 1.0 for _, value in means)
    per_class = re.findall(r"^\s*\S+\s+(\d\.\d+)\s+(\d\.\d+)\s*$", dice_text, flags=re.MULTILINE)
    assert per_class, f"no per-class Dice rows in:\n{dice_text}"

    for cell in _tagged(nb, "figure"):
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), "a figure cell showed no image"
    tsne = _tagged(nb, "tsne")[0]
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in tsne.outputs)
    page = latest_version(trained_project.resolve() / "data/08_reporting/tsne.html")
    assert f"interactive page: {page}" in _text(tsne)  # the catalog's path (data_root), the newest version
    summary = _tagged(nb, "summary")[0]
    assert any("text/html" in o.get("data", {}) for o in summary.outputs)
    assert all(method in _text(summary) for method in METHODS)


LONG_TRAINING = "train.steps=100000,train.seed=7"  # far longer than the test waits


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 1)])
def test_an_interrupted_run_exits_nonzero_and_leaves_its_mlflow_run_killed(
    trained_project: Path, signum: int, status: int
):
    """SIGTERM is what scancel and a SLURM time limit send, SIGINT is Ctrl-C: neither may leave the run
    RUNNING for ever or FINISHED, nor exit 0 (dask-jobqueue's import once turned Ctrl-C into exit 0)."""
    before = {run.info.run_id for run in mlflow_runs(trained_project)}
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    with interruptible_children():
        process = subprocess.Popen(
            [KEDRO, "run", "--pipelines=train", f"--env={TINY_ENV}", f"--params={LONG_TRAINING}"],
            cwd=trained_project,
            env={**env, "KEDRO_DISABLE_TELEMETRY": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            encoding="utf-8",
            errors="replace",
        )
    client = MlflowClient(tracking_uri=f"sqlite:///{trained_project / 'mlflow.db'}")
    deadline = time.monotonic() + 300
    run = None
    while run is None or "train/loss" not in client.get_run(run.info.run_id).data.metrics:  # inside the node
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.5)
        run = next((r for r in mlflow_runs(trained_project) if r.info.run_id not in before), None)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == status, output[-3000:]
    assert client.get_run(run.info.run_id).info.status == "KILLED", output[-3000:]
