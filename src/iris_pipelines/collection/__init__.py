"""Finding and checking the labelled scans of a collection (the ``ingest`` stage's library, no Kedro)."""

from iris_pipelines.collection.ingest import (
    MANIFEST_COLUMNS,
    REPORT_COLUMNS,
    discover_sources,
    ingest_sources,
    validate_case,
)
from iris_pipelines.collection.layouts import CaseRef, Problem, discover_cases

__all__ = [
    "MANIFEST_COLUMNS",
    "REPORT_COLUMNS",
    "CaseRef",
    "Problem",
    "discover_cases",
    "discover_sources",
    "ingest_sources",
    "validate_case",
]
