"""An evaluation logs the embed_tasks settings that made the task_embeddings it read, not the current ones."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pandas as pd
from kedro_datasets.pandas import ParquetDataset
from mlflow_support import temporary_mlflow_store

from iris_pipelines.evaluation import ModelInfo, build_task_embeddings, embedding_settings
from iris_pipelines.evaluation.embeddings import embedded_roi_size
from iris_pipelines.pipelines.evaluate.nodes import record_evaluation_inputs
from iris_pipelines.registry import EVALUATION_PARAMETERS_ARTIFACT
from iris_pipelines.training.sampler import case_records

# device: where the references were encoded (resolved), so review --reproduce re-embeds there or says why not
MADE_WITH = {"references_per_class": 1, "roi_size": [32, 32, 32], "seed": 4, "device": "cpu"}


def test_an_evaluate_only_run_logs_the_settings_stored_in_task_embeddings(
    untrained_bundle, collection, tmp_path: Path, caplog
) -> None:
    """`kedro run --pipelines=evaluate` logged the current params:embed_tasks, though an earlier embed_tasks
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


def test_a_table_written_before_the_device_was_stored_still_gives_its_window() -> None:
    older = pd.DataFrame(
        {"embed_settings": ['{"references_per_class": 3, "roi_size": [32, 32, 32], "seed": 0}']}
    )
    assert embedded_roi_size(older) == (32, 32, 32) and "device" not in embedding_settings(older)


def test_a_model_is_not_scored_on_queries_of_its_training_subjects() -> None:
    """After new data, re-running episodes can move a training subject into the test split."""
    import pytest
    import torch

    from iris_pipelines.inference.bundle import ModelBundle
    from iris_pipelines.model import Iris, IrisConfig
    from iris_pipelines.pipelines.evaluate.nodes import require_unseen_queries
    from iris_pipelines.pipelines.train.nodes import train_subjects

    def index(splits: dict[str, str]) -> dict:
        cases = [
            {"dataset": "d", "case_id": f"{subject}_t1", "subject_id": subject, "split": split}
            for subject, split in splits.items()
        ]
        episodes = [{"dataset": "d", "query": c["case_id"], "split": c["split"]} for c in cases]
        return {"cases": cases, "episodes": episodes}

    trained_on = index({"p1": "train", "p2": "train", "p3": "test"})
    torch.manual_seed(0)
    bundle = ModelBundle.from_model(
        Iris(IrisConfig.tiny()), metadata={"train_subjects": train_subjects(trained_on)}
    )
    assert bundle.metadata["train_subjects"] == ["d/p1", "d/p2"]

    require_unseen_queries(bundle, trained_on, ["test"])
    require_unseen_queries(bundle, trained_on, ["train", "test"])  # the train split, asked for on purpose
    # A new index after a subject was added: p2 moved to test, a new subject p4 joined.
    resplit = index({"p1": "train", "p2": "test", "p3": "test", "p4": "train"})
    with pytest.raises(
        ValueError, match=r"1 query subject\(s\) .* were training subjects of this model \(d/p2\)"
    ):
        require_unseen_queries(bundle, resplit, ["test"])
    # An index that only adds a held-out dataset, or drops episodes, is fine.
    require_unseen_queries(bundle, {**trained_on, "episodes": trained_on["episodes"][2:]}, ["test"])
    require_unseen_queries(ModelBundle.from_model(Iris(IrisConfig.tiny())), resplit, ["test"])  # no record
