"""An evaluation logs the embed_tasks settings that made the task_embeddings it read, not the current ones."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd
from kedro_datasets.pandas import ParquetDataset
from mlflow_support import temporary_mlflow_store

from iris_pipelines.evaluation import ModelInfo, build_task_embeddings, embedding_settings
from iris_pipelines.pipelines.evaluate.nodes import record_evaluation_inputs
from iris_pipelines.registry import EVALUATION_PARAMETERS_ARTIFACT
from iris_pipelines.training.sampler import case_records

MADE_WITH = {"references_per_class": 1, "roi_size": [32, 32, 32], "seed": 4}


def test_an_evaluate_only_run_logs_the_settings_stored_in_task_embeddings(
    untrained_bundle, collection, tmp_path: Path, caplog
) -> None:
    """`kedro run --pipeline=evaluate` logged the current params:embed_tasks, though an earlier embed_tasks
    run with other settings made the table: review --reproduce then re-embedded with the wrong ones."""
    manifest, index = collection
    table = build_task_embeddings(
        untrained_bundle.build_model(), untrained_bundle.class_ids, index, case_records(manifest),
        references_per_class=1, roi_size=(32, 32, 32), seed=4, model_info=ModelInfo(),
    )  # fmt: skip
    saved = ParquetDataset(filepath=str(tmp_path / "task_embeddings.parquet"))  # as the catalog stores it
    saved.save(table)
    stored = saved.load()
    assert embedding_settings(stored) == MADE_WITH

    evaluate = {"strategies": ["retrieval"]}
    with temporary_mlflow_store(tmp_path):
        with mlflow.start_run() as run:
            record_evaluation_inputs(index, manifest, stored, evaluate)
        logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{EVALUATION_PARAMETERS_ARTIFACT}")
        assert logged == {"embed_tasks": MADE_WITH, "evaluate": evaluate}

        with caplog.at_level(logging.WARNING), mlflow.start_run() as older:
            record_evaluation_inputs(index, manifest, stored.drop(columns="embed_settings"), evaluate)
        logged = mlflow.artifacts.load_dict(f"runs:/{older.info.run_id}/{EVALUATION_PARAMETERS_ARTIFACT}")
        assert logged == {"evaluate": evaluate}  # review then says params:embed_tasks was not recorded
        assert "task_embeddings do not record the embed_tasks settings that made them" in caplog.text


def test_a_table_of_several_embedding_runs_has_no_settings() -> None:
    rows = pd.DataFrame({"embed_settings": ['{"seed": 0}', '{"seed": 1}']})
    assert embedding_settings(rows) is None
    assert embedding_settings(rows.iloc[:1]) == {"seed": 0}


def test_a_model_is_not_scored_on_another_episode_index_unless_allowed(caplog) -> None:
    """After new data, re-running episodes can move a training subject into the test split."""
    import pytest
    import torch

    from iris_pipelines.collection.episodes import index_checksum
    from iris_pipelines.inference.bundle import ModelBundle
    from iris_pipelines.model import Iris, IrisConfig
    from iris_pipelines.pipelines.evaluate.nodes import require_the_models_episode_index

    trained_on = {"episodes": [{"query": "a"}], "cases": {"a": "train", "b": "test"}}
    trained_on["checksum"] = index_checksum(trained_on)
    reshuffled = {"episodes": [{"query": "b"}], "cases": {"a": "test", "b": "train"}}
    reshuffled["checksum"] = index_checksum(reshuffled)
    torch.manual_seed(0)
    bundle = ModelBundle.from_model(
        Iris(IrisConfig.tiny()), metadata={"episode_index_checksum": trained_on["checksum"]}
    )

    require_the_models_episode_index(bundle, trained_on)
    with pytest.raises(ValueError, match="test split may hold subjects the model trained on"):
        require_the_models_episode_index(bundle, reshuffled)
    with caplog.at_level(logging.WARNING):
        require_the_models_episode_index(bundle, reshuffled, allow_other=True)
    assert "allowed by evaluate.allow_other_episode_index" in caplog.text
