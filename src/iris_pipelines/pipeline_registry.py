"""Project pipelines: one per folder under ``pipelines/``; ``__default__`` runs them in order."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

PIPELINE_ORDER = ("ingest", "preprocess", "episodes", "train", "embed_tasks", "evaluate", "tsne")


def register_pipelines() -> dict[str, Pipeline]:
    # Registry keys equal folder names: `kedro run --pipeline=X` imports only pipelines/X (Kedro >= 1.5).
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (pipelines[name] for name in PIPELINE_ORDER if name in pipelines), Pipeline([])
    )
    return pipelines
