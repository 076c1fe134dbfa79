"""Unit tests of the train nodes' small helpers and the input-version hook."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import yaml
from kedro.framework.hooks.manager import _create_hook_manager
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline, node
from kedro.runner import SequentialRunner
from mlflow_support import temporary_mlflow_store
from project_copy import PROJECT_ROOT

from iris_pipelines.hooks import InputVersionHooks, resolved_load_version
from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.model import IrisConfig
from iris_pipelines.pipelines.train.nodes import (
    MlflowMetricStream,
    build_model_config,
    checkpoint_dir,
    final_validation,
    history_frame,
    input_checksums,
    metric_record,
    mlflow_name,
    parameter_layout,
    recorded_preprocessing,
    registry_tags,
    split_train_params,
    train_iris,
)
from iris_pipelines.training import TrainConfig


def test_model_config_from_size_and_overrides() -> None:
    assert build_model_config({"size": "tiny"}) == IrisConfig.tiny().to_dict()
    assert build_model_config({"size": "cpu"}) == IrisConfig.cpu().to_dict()
    assert build_model_config({"size": "paper", "num_query_tokens": 4})["num_query_tokens"] == 4
    with pytest.raises(ValueError, match="size must be one of"):
        build_model_config({"size": "huge"})
    with pytest.raises(ValueError, match="unknown IrisConfig fields"):
        build_model_config({"size": "tiny", "widths": 3})


def test_node_keys_stay_out_of_the_train_config() -> None:
    node, train = split_train_params(
        {
            "launcher": "local_ddp",
            "launcher_options": {"nprocs": 2},
            "checkpoint_root": "c",
            "registry_name": "iris",
            "steps": 3,
        }
    )
    assert train == {"steps": 3} and node["launcher_options"] == {"nprocs": 2}


def test_checkpoint_dir_is_keyed_by_the_recipe(tmp_path: Path) -> None:
    a = checkpoint_dir(tmp_path, {"m": 1}, {"steps": 3}, "abc")
    assert a == checkpoint_dir(tmp_path, {"m": 1}, {"steps": 3}, "abc") and a.parent == tmp_path
    assert a != checkpoint_dir(tmp_path, {"m": 1}, {"steps": 4}, "abc")
    assert a != checkpoint_dir(tmp_path, {"m": 1}, {"steps": 3}, "abd")
    assert a != checkpoint_dir(tmp_path, {"m": 1}, {"steps": 3}, "abc", layout="other network")
    # Same cases, other intensities (a new normalisation or spacing): never resume the old network.
    assert a != checkpoint_dir(tmp_path, {"m": 1}, {"steps": 3}, "abc", volumes="renormalised")
    # How many loader workers, and how often to log, validate and save, change no weight: a requeued job
    # given fewer workers after running out of memory must resume, not start again from step 0.
    rescheduled = {"steps": 3, "num_workers": 2, "log_every": 5, "val_every": 7, "checkpoint_every": 9}
    assert a == checkpoint_dir(tmp_path, {"m": 1}, rescheduled, "abc")


def test_one_recipe_written_another_way_resumes_in_the_same_checkpoint_folder(tmp_path: Path) -> None:
    """Before, the folder hashed params:train as written: spelling out a default (seed: 0), a cube as one
    number or steps as 300.0 gave a new folder, and a rerun of the same recipe trained from step 0."""
    base = {"steps": 300, "crop_size": [32, 32, 32]}
    a = checkpoint_dir(tmp_path, {"m": 1}, base, "abc")
    for same in ({**base, "seed": 0}, {**base, "crop_size": 32}, {**base, "steps": 300.0}):
        assert checkpoint_dir(tmp_path, {"m": 1}, same, "abc") == a, same
    assert checkpoint_dir(tmp_path, {"m": 1}, {**base, "seed": 1}, "abc") != a
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        checkpoint_dir(tmp_path, {"m": 1}, {**base, "stepz": 3}, "abc")


def test_a_folder_keyed_by_the_params_as_written_is_still_resumed(tmp_path: Path, caplog) -> None:
    """Checkpoints written before the key was normalised must not be orphaned by the new key."""
    import hashlib
    import json

    written = {"steps": 300, "seed": 0, "num_workers": 2}
    # The old key: the params as written, less the scheduling keys.
    raw = {"model": {"m": 1}, "train": {"steps": 300, "seed": 0}, "episodes": "abc"}
    raw.update(layout="", volumes="")
    legacy = tmp_path / hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    fresh = checkpoint_dir(tmp_path, {"m": 1}, written, "abc")
    assert fresh != legacy
    legacy.mkdir()
    with caplog.at_level("INFO"):
        assert checkpoint_dir(tmp_path, {"m": 1}, written, "abc") == legacy
    assert f"Resuming checkpoints in {legacy}" in caplog.text
    fresh.mkdir()  # once the new folder exists it is the one resumed
    assert checkpoint_dir(tmp_path, {"m": 1}, written, "abc") == fresh


def test_train_node_keys_checkpoints_by_the_preprocessed_volumes(tmp_path: Path, monkeypatch) -> None:
    from iris_pipelines import launch

    used = []

    def record(launcher, *, checkpoint_dir, **kwargs):
        used.append(checkpoint_dir)
        raise RuntimeError("stop after the checkpoint folder is chosen")

    monkeypatch.setattr(launch, "launch_training", record)
    index = {"checksum": "same episodes"}
    params = {"checkpoint_root": str(tmp_path), "steps": 3}
    for key in ("preprocess v1", "preprocess v2"):
        manifest = pd.DataFrame({"case_id": ["a"], "cache_key": [key]})
        with pytest.raises(RuntimeError, match="stop after"):
            train_iris(index, manifest, {"size": "tiny"}, params)
    assert len(used) == 2 and used[0] != used[1] and used[0].parent == tmp_path


def test_the_recorded_preprocessing_must_be_what_made_the_volumes() -> None:
    from iris_pipelines.imaging.geometry import IDENTITY_DIRECTION, Geometry

    grid = Geometry((4, 4, 4), (6.0, 6.0, 6.0), (0.0, 0.0, 0.0), IDENTITY_DIRECTION).to_json()
    manifest = pd.DataFrame({"case_id": ["a"], "preprocessed_geometry": [grid]})
    params = {"target_spacing": 6.0, "ct_window": [-990, 500], "percentiles": [2, 98], "workers": 2}
    assert recorded_preprocessing(params, manifest) == {
        "target_spacing": [6.0, 6.0, 6.0],
        "ct_window": [-990, 500],
        "percentiles": [2, 98],
    }
    with pytest.raises(
        ValueError, match=r"target_spacing is \[3.0, 3.0, 3.0\] mm but .* at \[\[6.0, 6.0, 6.0\]\]"
    ):
        recorded_preprocessing({**params, "target_spacing": [3, 3, 3]}, manifest)


def test_parameter_layout_follows_the_network_not_the_values() -> None:
    tiny = IrisConfig.tiny().to_dict()
    assert parameter_layout(tiny) == parameter_layout(dict(tiny))
    assert parameter_layout(tiny) != parameter_layout({**tiny, "num_query_tokens": 4})
    assert parameter_layout(tiny) != parameter_layout(IrisConfig.paper().to_dict())


def test_metric_names() -> None:
    train = {"step": 5, "loss": 0.5, "dice_loss": 0.3, "ce_loss": 0.2, "lr": 1e-3, "samples_per_s": 2.0}
    values, step = metric_record(train)
    assert step == 5 and values["train/loss"] == 0.5 and values["train/samples_per_s"] == 2.0
    assert metric_record({"step": 10, "dataset": "alpha", "dice": 0.7}) == ({"val/dice/alpha": 0.7}, 10)
    assert metric_record({"step": 1, "loss": float("nan"), "note": "x"}) == ({}, 1)


def test_dataset_names_mlflow_would_refuse_are_logged_under_safe_keys(tmp_path: Path) -> None:
    """Ingest accepts any dataset name; MLflow refuses "(", "+", ":" … and would stop training at its
    first validation."""
    assert mlflow_name("liver (CT)+kidney") == "liver _CT__kidney" and mlflow_name("AbdomenCT") == "AbdomenCT"
    assert mlflow_name("..") == "_.." and mlflow_name("a/b:c") == "a_b_c"
    with temporary_mlflow_store(tmp_path), mlflow.start_run() as run:
        MlflowMetricStream()({"step": 3, "dataset": "liver (CT)+kidney", "dice": 0.5})
        mlflow.set_tag(f"val_dice.{mlflow_name('amos:btcv/..')}", "0.5")
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/dice/liver _CT__kidney")
        assert [(m.step, m.value) for m in history] == [(3, 0.5)]


def test_an_mlflow_outage_does_not_stop_training_and_replay_fills_the_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_log_metrics, real_set_tags = mlflow.log_metrics, mlflow.set_tags
    down = True

    def flaky(real):
        def call(*args, **kwargs):
            if down:
                raise ConnectionError("tracking server: max retries exceeded")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(mlflow, "log_metrics", flaky(real_log_metrics))
    monkeypatch.setattr(mlflow, "set_tags", flaky(real_set_tags))
    records = [{"step": step, "loss": 1.0 / step} for step in (1, 2, 3)]
    with temporary_mlflow_store(tmp_path), mlflow.start_run() as run:
        stream = MlflowMetricStream()
        stream({"tags": {"slurm_job_id": "4711"}})
        stream(records[0])  # the outage: warned about, training goes on
        down = False
        stream(records[1])
        stream.replay(records)  # training ended: what MLflow missed is sent again, nothing twice
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert tags["slurm_job_id"] == "4711"
    assert "MLflow did not take the training metrics (1 failure(s) so far)" in caplog.text


def test_history_table_and_final_validation() -> None:
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2)]
    validation = [{"step": 1, "dataset": "a", "dice": 0.1}, {"step": 2, "dataset": "a", "dice": 0.4}]
    table = history_frame(history, validation)
    assert list(table.columns[:2]) == ["step", "phase"] and len(table) == 4
    assert table["phase"].tolist() == ["train", "val", "train", "val"]
    assert final_validation(validation) == {"a": 0.4}
    assert history_frame([], []).empty


def test_hook_resolves_the_loaded_versions(tmp_path: Path) -> None:
    config = {
        "episode_index": {
            "type": "json.JSONDataset",
            "filepath": str(tmp_path / "e.json"),
            "versioned": True,
        },
        "plain": {"type": "pandas.CSVDataset", "filepath": str(tmp_path / "p.csv")},
    }
    DataCatalog.from_config(config, save_version="2026-01-01T00.00.00.000Z").save("episode_index", {"a": 1})
    DataCatalog.from_config(config, save_version="2026-01-02T00.00.00.000Z").save("episode_index", {"a": 2})
    catalog = DataCatalog.from_config(config)
    catalog.save("plain", pd.DataFrame({"x": [1]}))
    assert resolved_load_version(catalog, "episode_index") == "2026-01-02T00.00.00.000Z"
    assert resolved_load_version(catalog, "plain") is None
    assert resolved_load_version(catalog, "params:train") is None

    class FakeNode:
        inputs = ["episode_index", "plain", "params:train"]

    hooks = InputVersionHooks()
    hooks.before_node_run(node=FakeNode(), catalog=catalog)  # no MLflow run active: only remembered
    assert hooks.versions == {"episode_index": "2026-01-02T00.00.00.000Z"}


def test_hook_tags_every_run_of_one_process(tmp_path: Path, mlflow_store: Path) -> None:
    """settings.py builds the hooks once per process; a second session in it (a notebook's
    %reload_kedro, a sweep script) must tag its own MLflow run too, even with the same input version."""
    config = {
        "episode_index": {"type": "json.JSONDataset", "filepath": str(tmp_path / "e.json"), "versioned": True}
    }
    DataCatalog.from_config(config, save_version="2026-01-01T00.00.00.000Z").save("episode_index", {"a": 1})
    pipeline = Pipeline([node(lambda index: index, "episode_index", "copied")])
    hook_manager = _create_hook_manager()
    hook_manager.register(InputVersionHooks())  # registering checks the hook names and arguments
    run_ids = []
    for _ in range(2):
        catalog = DataCatalog.from_config(config)
        with mlflow.start_run() as run:  # kedro-mlflow opens one run per session
            hook_manager.hook.before_pipeline_run(run_params={}, pipeline=pipeline, catalog=catalog)
            SequentialRunner().run(pipeline, catalog, hook_manager=hook_manager)
        run_ids.append(run.info.run_id)
    client = mlflow.MlflowClient()
    for run_id in run_ids:
        tags = client.get_run(run_id).data.tags
        assert tags.get("input_version.episode_index") == "2026-01-01T00.00.00.000Z", run_id


def _train_params(env: str) -> dict:
    """conf/base/parameters_train.yml with conf/<env>'s soft-merged over it (as Kedro's loader does)."""
    merged: dict = {}
    for folder in ("base", env):
        params = yaml.safe_load((PROJECT_ROOT / "conf" / folder / "parameters_train.yml").read_text())
        for section, values in params.items():
            merged.setdefault(section, {}).update(values)
    return merged


@pytest.mark.parametrize("env", ["base", "hpcc"])
def test_shipped_parameters_build_valid_configs(env: str) -> None:
    params = _train_params(env)
    model = IrisConfig.from_dict(build_model_config(params["model"]))
    train = TrainConfig.from_dict(split_train_params(params["train"])[1])
    if env == "hpcc":  # the paper's recipe, none of the phantom recipe's additions
        assert model == IrisConfig.paper() and train.optimizer == "lamb" and train.auto_mask_prob == 0
        assert train.crop_size == (128, 128, 128) and train.steps == 80_000 and train.batch_size == 32
    else:
        assert train.optimizer == "adamw" and train.crop_size == (32, 32, 32)


def test_the_registry_entry_carries_the_weights_checksum() -> None:
    """embed_tasks compares it with iris_model's to notice a bundle whose registration failed."""
    bundle = ModelBundle(
        model_config=IrisConfig.tiny().to_dict(), state_dict={}, metadata={"weights_checksum": ["abc123"]}
    )
    provenance = {"git_commit": "0" * 40, "git_dirty": "false", "lockfile_sha256": "f", "kedro_env": "test"}
    run = SimpleNamespace(data=SimpleNamespace(tags=provenance), info=SimpleNamespace(run_id="r1"))
    tags = registry_tags(run, bundle, {"checksum": "e"}, pd.DataFrame({"cache_key": ["k"]}))
    assert tags["weights_sha256"] == "abc123"


def test_an_index_edited_after_it_was_written_is_tagged_by_its_content(caplog) -> None:
    """Moving a test subject into train by hand leaves the old ``checksum`` field: the run must not be
    tagged (nor resume checkpoints) as the index it was before."""
    from iris_pipelines.collection.episodes import index_checksum

    index = {"cases": [{"case_id": "a", "split": "test"}], "episodes": []}
    index["checksum"] = index_checksum(index)
    manifest = pd.DataFrame({"cache_key": ["k"]})
    written = input_checksums(index, manifest)["episode_index_checksum"]
    assert written == index["checksum"] and not caplog.text
    index["cases"][0]["split"] = "train"
    edited = input_checksums(index, manifest)["episode_index_checksum"]
    assert edited == index_checksum(index) != written
    assert "it was edited after the episodes pipeline wrote it" in caplog.text


def test_the_train_node_refuses_a_run_whose_ranks_ended_with_different_weights(
    tmp_path: Path, monkeypatch
) -> None:
    """Before, every rank's checksum was gathered and recorded but never compared: a run whose ranks fell
    out of step was bundled and registered with rank 0's weights as if it were fine."""
    from iris_pipelines import launch
    from iris_pipelines.model import Iris
    from iris_pipelines.training import TrainResult, weights_checksum

    model_config = build_model_config({"size": "tiny"})
    weights = Iris(IrisConfig.from_dict(model_config)).state_dict()

    def ranks_out_of_step(launcher, **kwargs):
        return TrainResult(
            state_dict=weights,
            model_config=model_config,
            history=[],
            validation=[],
            class_ids={"alpha/1": 0, "alpha/2": 1, "beta/1": 2},
            world_size=2,
            final_step=4,
            weights_checksum=[weights_checksum(weights), "0" * 64],
        )

    monkeypatch.setattr(launch, "launch_training", ranks_out_of_step)
    manifest = pd.DataFrame({"case_id": ["a"], "cache_key": ["k"]})
    params = {"launcher": "local_ddp", "checkpoint_root": str(tmp_path), "steps": 4}
    refused = r"the 2 ranks ended training with different weights \(rank 0: \w{12}…; rank 1: 000000000000…\)"
    with pytest.raises(RuntimeError, match=refused):
        train_iris({"checksum": "e"}, manifest, {"size": "tiny"}, params)


def test_a_version_exists_only_with_all_its_tags(mlflow_store: Path, monkeypatch) -> None:
    """The version was created first and tagged in ~20 further requests: one dropped by the server (a
    timeout, a restart) left it without provenance or weights hash, and `models:/iris/latest` served it.
    Now the version is created with its tags in one request: no tagging request follows to fail."""
    import torch
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    from iris_pipelines import registry
    from iris_pipelines.model import Iris
    from iris_pipelines.pipelines.train.nodes import register_model
    from iris_pipelines.training import weights_checksum

    created: list[dict[str, str]] = []
    create = SqlAlchemyStore.create_model_version

    def recording(self, *args, **kwargs):
        version = create(self, *args, **kwargs)
        created.append(dict(version.tags))  # what a reader sees from the moment the version exists
        return version

    def dropped(*args, **kwargs) -> None:
        raise mlflow.exceptions.MlflowException("API request failed: Read timed out")

    monkeypatch.setattr(SqlAlchemyStore, "create_model_version", recording)
    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", dropped)
    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny())
    checksum = weights_checksum(model.state_dict())
    bundle = ModelBundle.from_model(model, metadata={"weights_checksum": [checksum]})
    parameters = {"train": {"registry_name": "tagged"}}
    with mlflow.start_run():
        entry = register_model(bundle, {"checksum": "e"}, pd.DataFrame({"cache_key": ["k"]}), parameters)
    tags = mlflow.MlflowClient().get_model_version("tagged", entry["version"]).tags
    assert created == [tags]
    assert tags["weights_sha256"] == checksum and {"git_commit", "git_dirty", "kedro_env"} <= set(tags)
    latest = registry.resolve("models:/tagged/latest", mlflow.get_tracking_uri())
    assert latest.version == entry["version"] and latest.problems == []
