"""Train pipeline: episodic training through a launcher, then a pickle-free registered model."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
