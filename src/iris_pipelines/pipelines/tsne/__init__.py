"""``kedro run --pipelines=tsne``."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
