"""``kedro run --pipelines=embed_tasks``."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
