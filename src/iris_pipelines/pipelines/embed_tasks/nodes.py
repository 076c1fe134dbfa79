"""Embed every dataset × class from reference cases with the trained model, and snapshot its memory bank."""

from __future__ import annotations

import logging
from collections.abc import Sequence
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


def roi_size_or_training_crop(
    iris_model: ModelBundle, roi_size: Sequence[int] | None, section: str
) -> tuple[int, ...]:
    """The window (voxels) ``params:<section>`` asks for, else the model's inference window (its training
    crop), which ``iris segment`` and the pyfunc encode references and segment queries in.

    The network learned from crops of that size, with reference and query windows equal; another
    ``roi_size`` gives numbers those do not reproduce, so it is said (not refused: another window can be a
    deliberate experiment). A bundle that records no training crop gives nothing to compare against.
    """
    if roi_size is None:
        return iris_model.inference_window()
    window = tuple(int(v) for v in roi_size)
    crop = iris_model.training_crop()
    if crop is not None and window != crop:
        logger.warning(
            "params:%s.roi_size is %s voxels, but the model was trained on %s-voxel crops, the window iris "
            "segment and the pyfunc use: %s's numbers will not be theirs; set %s.roi_size to the crop, or "
            "leave it out to use it",
            section, list(window), list(crop), section, section,
        )  # fmt: skip
    return window


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
        roi_size=roi_size_or_training_crop(iris_model, params.get("roi_size"), "embed_tasks"),
        seed=int(params.get("seed", 0)),
        model_info=model_info(iris_model, registered_model),
    )
    summary = embedding_summary(table)
    logger.info("Task embeddings: %s", summary)
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"embed_tasks/rows/{k}": v for k, v in summary["by_source"].items()})
    return table
