"""``ingest``: find the labelled scans of every source, check them, write ``case_manifest``."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
