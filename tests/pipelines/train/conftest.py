"""The MLflow store shared by the train pipeline tests (the synthetic collection is in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_support import temporary_mlflow_store


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Shared per module: each new store costs ~5 s."""
    root = tmp_path_factory.mktemp("mlflow")
    with temporary_mlflow_store(root):
        yield root
