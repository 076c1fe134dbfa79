"""``kedro run --pipeline=embed_tasks``."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
