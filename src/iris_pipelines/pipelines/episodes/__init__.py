"""Episodes pipeline: preprocessed_manifest -> subject-level splits, class tables, evaluation episodes."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
