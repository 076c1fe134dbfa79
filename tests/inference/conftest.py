"""Fixtures of the inference tests: a throw-away MLflow store, a tiny Iris and small blob scans."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from blobs import blob_volume
from mlflow_support import temporary_mlflow_store

from iris_pipelines.model import Iris, IrisConfig


@pytest.fixture
def mlflow_store(tmp_path: Path) -> Iterator[str]:
    with temporary_mlflow_store(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="module")
def tiny_model(one_torch_thread: None) -> Iris:
    """A randomly initialised tiny Iris in eval mode; tests that change it build their own."""
    torch.manual_seed(0)
    return Iris(IrisConfig.tiny()).eval()


@pytest.fixture(scope="module")
def scans() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Three 24³ scans with a bright and a dark sphere at different places (two classes each)."""
    size = (24, 24, 24)
    return {
        "a": blob_volume([((8, 8, 9), 4, 1.0), ((16, 15, 15), 5, -1.0)], size, seed=1),
        "b": blob_volume([((15, 9, 7), 4, 1.0), ((8, 16, 16), 5, -1.0)], size, seed=2),
        "c": blob_volume([((12, 12, 12), 3, 1.0), ((6, 17, 8), 4, -1.0)], size, seed=3),
    }
