"""Preprocess pipeline: case_manifest -> canonical, normalised, memory-mappable volumes."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
