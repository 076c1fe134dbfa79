"""The train pipeline in memory: node plumbing with a fake launcher, then one real tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from safetensors.torch import load_file

import iris_pipelines.launch
from iris_pipelines.hooks import InputVersionHooks, ProvenanceHooks
from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.model import Iris, IrisConfig
from iris_pipelines.pipelines.train import create_pipeline
from iris_pipelines.pipelines.train.nodes import train_iris
from iris_pipelines.training import TrainResult

PROJECT = Path(__file__).parents[3]
EPISODES_VERSION = "2026-01-01T00.00.00.000Z"
MANIFEST_VERSION = "2026-01-01T00.00.01.000Z"


def _train_params(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    params = {
        "launcher": "in_process",
        "launcher_options": {},
        "checkpoint_root": str(tmp_path / "checkpoints"),
        "registry_name": "iris",
        "steps": 2,  # the training tests cover learning; this run checks the plumbing end to end
        "batch_size": 1,
        "crop_size": [32, 32, 32],
        "warmup_steps": 1,
        "val_every": 1000,  # validation still runs once, at the last step
        "checkpoint_every": 1000,
        "log_every": 1,
        "num_workers": 0,
        "device": "cpu",
        "precision": "fp32",
        "augment": False,
    }
    params.update(overrides)
    return params


def test_train_node_plumbing(mlflow_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake launcher: the node's arguments, metric streaming and the bundle it builds."""
    calls: dict[str, Any] = {}
    model = Iris(IrisConfig.tiny(memory_bank_size=2))

    def fake_launch(launcher: str, **kwargs: Any) -> TrainResult:
        calls.update(kwargs, launcher=launcher)
        on_metrics = kwargs["on_metrics"]
        for step in (1, 2):
            on_metrics(
                {
                    "step": step,
                    "loss": 1.0 / step,
                    "dice_loss": 0.5,
                    "ce_loss": 0.1,
                    "lr": 1e-3,
                    "samples_per_s": 4.0,
                }
            )
        on_metrics({"step": 2, "dataset": "alpha", "dice": 0.25})
        return TrainResult(
            state_dict=model.state_dict(),
            model_config=model.config.to_dict(),
            # step 0 as if restored from a checkpoint: streamed by nobody, replayed by the node
            history=[{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}],
            validation=[{"step": 2, "dataset": "alpha", "dice": 0.25}],
            class_ids={"alpha/1": 0, "alpha/2": 1},
            world_size=2,
            final_step=2,
            weights_checksum=["abc"],
        )

    monkeypatch.setattr(iris_pipelines.launch, "launch_training", fake_launch)
    params = _train_params(tmp_path, launcher="local_ddp", launcher_options={"nprocs": 2})
    with mlflow.start_run() as run:
        index = {
            "checksum": "c0ffee",
            "classes": {"alpha": {"1": {"name": "liver"}, "2": {"name": "spleen"}}},
        }
        bundle, history = train_iris(index, pd.DataFrame(), {"size": "tiny"}, params)

    assert calls["launcher"] == "local_ddp" and calls["nprocs"] == 2
    assert "launcher" not in calls["train_config"] and calls["train_config"]["steps"] == 2
    assert Path(calls["checkpoint_dir"]).parent == tmp_path / "checkpoints"
    assert calls["model_config"] == IrisConfig.tiny().to_dict()
    client = mlflow.MlflowClient()
    losses = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in losses] == [(0, 2.0), (1, 1.0), (2, 0.5)]  # nothing logged twice
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/dice/alpha")] == [2]
    assert bundle.metadata["world_size"] == 2 and bundle.metadata["final_validation"] == {"alpha": 0.25}
    assert bundle.class_ids == {"alpha/1": 0, "alpha/2": 1}
    assert bundle.class_names == {"alpha/1": "liver", "alpha/2": "spleen"}  # iris segment's memory bank
    assert bundle.build_model().config.memory_bank_size == 2
    assert history["phase"].tolist() == ["train", "train", "train", "val"]


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """What kedro-mlflow logs with ``dict_params: {flatten: true, sep: "."}``."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _catalog(tmp_path: Path, manifest: pd.DataFrame, index: dict, parameters: dict) -> DataCatalog:
    """Versioned, persisted inputs as in conf/base, so the run loads real dataset versions."""
    config = {
        "episode_index": {
            "type": "json.JSONDataset",
            "filepath": str(tmp_path / "episode_index.json"),
            "versioned": True,
        },
        "preprocessed_manifest": {
            "type": "pandas.ParquetDataset",
            "filepath": str(tmp_path / "preprocessed_manifest.parquet"),
            "versioned": True,
        },
        "iris_model": {
            "type": "iris_pipelines.datasets.IrisModelBundleDataset",
            "filepath": str(tmp_path / "iris_model"),
            "versioned": True,
        },
    }
    DataCatalog.from_config(config, save_version=EPISODES_VERSION).save("episode_index", index)
    DataCatalog.from_config(config, save_version=MANIFEST_VERSION).save("preprocessed_manifest", manifest)
    catalog = DataCatalog.from_config(config)
    catalog["parameters"] = MemoryDataset(parameters)
    for key, value in parameters.items():
        catalog[f"params:{key}"] = MemoryDataset(value)
    return catalog


def test_real_tiny_run_registers_a_reproducible_model(mlflow_store: Path, tmp_path: Path, collection) -> None:
    manifest, index = collection
    preprocess = {"target_spacing": 3.0, "ct_window": [-990, 500], "percentiles": [2, 98], "workers": 1}
    parameters = {"model": {"size": "tiny"}, "train": _train_params(tmp_path), "preprocess": preprocess}
    catalog = _catalog(tmp_path, manifest, index, parameters)
    hook_manager = _create_hook_manager()
    hook_manager.register(InputVersionHooks())

    with mlflow.start_run() as run:
        mlflow.log_params(_flatten(parameters))  # kedro-mlflow's job in a real `kedro run`
        ProvenanceHooks().before_pipeline_run(run_params={"project_path": str(PROJECT), "env": "test"})
        SequentialRunner().run(create_pipeline(), catalog, hook_manager=hook_manager)
        registered = catalog.load("registered_model")

    client = mlflow.MlflowClient()
    logged = client.get_run(run.info.run_id).data
    assert logged.params["train.steps"] == "2" and logged.params["model.size"] == "tiny"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model_bundle")} == {
        "model_bundle/config.json",
        "model_bundle/weights.safetensors",
    }
    assert json.loads(json.dumps(registered)) == registered and registered["run_id"] == run.info.run_id
    trained = {f"{c['dataset']}/{c['subject_id']}" for c in index["cases"] if c["split"] == "train"}
    assert catalog.load("iris_model").metadata["train_subjects"] == sorted(trained)
    # iris segment prepares a scan from the bundle alone as the training volumes were prepared.
    assert catalog.load("iris_model").metadata["preprocess"] == {
        "target_spacing": [3.0, 3.0, 3.0],
        "ct_window": [-990, 500],
        "percentiles": [2, 98],
    }

    version = client.get_model_version("iris", registered["version"])
    tags = version.tags
    assert tags["kedro_env"] == "test" and tags["mlflow_run_id"] == run.info.run_id
    assert len(tags["git_commit"]) in (7, 40) or tags["git_commit"] == "unknown"
    assert tags["lockfile_sha256"] and tags["episode_index_checksum"] == index["checksum"]
    assert tags["input_version.episode_index"] == EPISODES_VERSION
    assert tags["input_version.preprocessed_manifest"] == MANIFEST_VERSION
    assert tags["final_step"] == "2"

    bundle_dir = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model_bundle")
    )
    assert sorted(p.suffix for p in bundle_dir.iterdir()) == [".json", ".safetensors"]
    saved = catalog.load("iris_model")
    assert saved.metadata["final_step"] == 2
    assert registered["weights_sha256"] == tags["weights_sha256"] == saved.metadata["weights_checksum"][0]
    raw = load_file(str(bundle_dir / "weights.safetensors"))
    assert all(torch.equal(raw[k], v) for k, v in saved.state_dict.items())
    assert ModelBundle.load(bundle_dir).class_ids == saved.class_ids

    model_dir = Path(mlflow.artifacts.download_artifacts(registered["model_uri"]))
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt")]
    pyfunc = mlflow.pyfunc.load_model(registered["model_uri"])
    case = manifest.iloc[0]
    image, label = np.load(case["image_array"]), np.load(case["label_array"])
    prediction = pyfunc.predict({"query": image, "reference_image": image, "reference_mask": label})
    assert prediction.shape == image.shape
    assert set(np.unique(prediction)) <= set(np.unique(label).tolist())
    # the registered version passes predict's params on: at the lowest threshold no voxel stays background
    everything = pyfunc.predict(
        {"query": image, "reference_image": image, "reference_mask": label}, params={"threshold": 1e-12}
    )
    assert everything.min() > 0
    _loads_without_the_project(registered["model_uri"], mlflow.get_tracking_uri(), tmp_path)

    history = catalog.load("training_history")
    assert set(history["phase"]) == {"train", "val"} and history["step"].max() == 2


_OUTSIDE_THE_PROJECT = """
import sys
# As in `mlflow models serve` or a colleague's environment: iris_pipelines is not installed.
sys.path = [p for p in sys.path if not (p.endswith("/src") or "__editable__" in p)]
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[1])
import iris_pipelines
assert "/code/iris_pipelines/" in iris_pipelines.__file__, iris_pipelines.__file__
mask = np.zeros((20, 20, 20), np.uint8)
mask[3:8, 3:8, 3:8] = 2
print(model.predict({"query": np.ones((20, 20, 20), np.float32), "reference_image": np.ones((20, 20, 20),
      np.float32), "reference_mask": mask}).shape)
"""


def _loads_without_the_project(model_uri: str, tracking_uri: str, tmp_path: Path) -> None:
    """The registered version carries its own code: it loads and predicts where iris_pipelines is absent."""
    import subprocess
    import sys

    script = tmp_path / "outside.py"
    script.write_text(_OUTSIDE_THE_PROJECT)
    done = subprocess.run(
        [sys.executable, str(script), model_uri, tracking_uri], check=False, capture_output=True, text=True,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(20, 20, 20)")
