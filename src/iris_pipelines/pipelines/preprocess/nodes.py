"""Thin node: the catalog hands over the manifest and params, the library does the work."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iris_pipelines.collection.preprocessing import preprocess_cases


def preprocess_volumes(
    case_manifest: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Resample, normalise and cache every case; returns (preprocessed_manifest, preprocess_report)."""
    return preprocess_cases(case_manifest, params)
