"""Project pipelines: one per folder under ``pipelines/``; ``__default__`` runs them in order."""

import warnings

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

PIPELINE_ORDER = ("ingest", "preprocess", "episodes", "train", "embed_tasks", "evaluate", "tsne")


def register_pipelines() -> dict[str, Pipeline]:
    # Registry keys equal folder names: `kedro run --pipelines=X` imports only pipelines/X (Kedro >= 1.5).
    try:
        pipelines = find_pipelines(raise_errors=True)
    except ImportError as exc:
        # A pipelines/<name> folder that fails to import chains the real error: show it. Without a cause,
        # a requested name has no folder (a typo): leave it out, so that Kedro answers "Failed to find the
        # pipeline named ... Did you mean" instead of a traceback. Every folder imported above.
        if exc.__cause__ is not None:
            raise
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="An error occurred while importing")
            pipelines = find_pipelines(raise_errors=False)
    pipelines["__default__"] = sum(
        (pipelines[name] for name in PIPELINE_ORDER if name in pipelines), Pipeline([])
    )
    return pipelines
