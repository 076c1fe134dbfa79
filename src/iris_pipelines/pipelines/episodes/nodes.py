"""Thin node: the catalog hands over the manifest and params, the library does the work."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iris_pipelines.collection import episodes


def build_episode_index(preprocessed_manifest: pd.DataFrame, params: dict[str, Any]) -> dict[str, Any]:
    """The episode_index (JSON): splits, class tables, fixed val/test episodes and their checksum."""
    return episodes.build_episode_index(preprocessed_manifest, params)
