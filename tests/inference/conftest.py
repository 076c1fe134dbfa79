"""A throw-away MLflow tracking + registry store (SQLite) and artifact root under tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_support import temporary_mlflow_store


@pytest.fixture
def mlflow_store(tmp_path: Path) -> Iterator[str]:
    with temporary_mlflow_store(tmp_path) as uri:
        yield uri
