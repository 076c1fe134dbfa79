"""Thin nodes: parameters in, library call, catalog data out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from iris_pipelines.collection import ingest_sources
from iris_pipelines.collection.ingest import source_list
from iris_pipelines.phantoms import generate_collection


def generate_phantom_collection(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Write the built-in phantom datasets (idempotent) so the project runs with no data of its own."""
    if not params.get("enabled", False):
        return []
    sources = generate_collection(
        Path(params["root"]),
        seed=params["seed"],
        cases_per_dataset=params["cases_per_dataset"],
        size_scale=params["size_scale"],
    )
    # The catalog stores these as JSON, which has no Path type.
    return [{**source, "path": str(source["path"])} for source in sources]


def ingest_cases(
    phantom_sources: list[dict[str, Any]], params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ingest the user's sources followed by the phantom ones: ``(case_manifest, ingest_report)``."""
    # `sources:` written as one mapping (no `-`) must be refused whole, not iterated key by key.
    sources = [*source_list(params.get("sources") or []), *phantom_sources]
    return ingest_sources(sources, strict=params["strict"], tolerance_mm=params["tolerance_mm"])
