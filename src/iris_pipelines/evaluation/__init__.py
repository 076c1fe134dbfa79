"""Task embeddings, the evaluation of every strategy against the baselines, reports and the t-SNE map.

Library code under the ``embed_tasks``, ``evaluate`` and ``tsne`` pipelines: no Kedro imports.
"""

from .embeddings import ModelInfo, build_task_embeddings, embedding_settings, embedding_summary
from .evaluate import (
    BASELINES,
    GROUPS,
    EvaluateParams,
    EvaluationError,
    ReferenceLeakError,
    check_references,
    evaluate_episodes,
)

__all__ = [
    "BASELINES",
    "GROUPS",
    "EvaluateParams",
    "EvaluationError",
    "ModelInfo",
    "ReferenceLeakError",
    "build_task_embeddings",
    "check_references",
    "embedding_settings",
    "embedding_summary",
    "evaluate_episodes",
]
