"""Embed every dataset × class from reference cases with the trained model, and snapshot its memory bank."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd

from iris_pipelines.evaluation import ModelInfo, build_task_embeddings, embedding_summary
from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.inference.device import resolve_device
from iris_pipelines.training.sampler import case_records

logger = logging.getLogger(__name__)


def model_info(iris_model: ModelBundle, registered_model: dict[str, Any] | None) -> ModelInfo:
    """Registry URI/version and weights checksum that every embedding and metric row carries.

    ``iris_model`` and ``registered_model`` are separate catalog entries, each loaded as its latest version;
    when the train run that saved the bundle failed to register it, they name different models. The
    registered entry's checksum (absent in entries written before it was recorded) catches that before a
    registry version is credited with another model's results.
    """
    weights = iris_model.weights_checksum
    registered = dict(registered_model or {})
    if "weights_sha256" in registered and str(registered["weights_sha256"]) != weights:
        raise ValueError(
            f"registered_model names {registered.get('model_uri', '?')}, whose weights are "
            f"{registered['weights_sha256']}, but iris_model holds {weights}: re-run the train pipeline so "
            "the model is registered, or load matching versions with --load-versions"
        )
    return ModelInfo.from_registration(registered_model, weights)


def embed_tasks(
    iris_model: ModelBundle,
    registered_model: dict[str, Any],
    episode_index: dict[str, Any],
    preprocessed_manifest: pd.DataFrame,
    params: dict[str, Any],
) -> pd.DataFrame:
    """``task_embeddings``: reference embeddings per dataset × class plus the memory-bank rows."""
    # cpu unless set (auto: the GPU when there is one; conf/hpcc does), as evaluate.
    device = resolve_device(str(params.get("device", "cpu")))
    logger.info("Embedding tasks on %s", device)
    model = iris_model.build_model().to(device)
    table = build_task_embeddings(
        model,
        iris_model.class_ids,
        episode_index,
        case_records(preprocessed_manifest),
        references_per_class=int(params.get("references_per_class", 3)),
        roi_size=tuple(params.get("roi_size", (64, 64, 64))),
        seed=int(params.get("seed", 0)),
        model_info=model_info(iris_model, registered_model),
    )
    summary = embedding_summary(table)
    logger.info("Task embeddings: %s", summary)
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"embed_tasks/rows/{k}": v for k, v in summary["by_source"].items()})
    return table
