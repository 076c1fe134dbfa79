"""Shared fixtures for the model tests: the tiny network and a synthetic two-class episode."""

from __future__ import annotations

import pytest
import torch
from blobs import blob_volume

from iris_pipelines.model import Iris, IrisConfig


@pytest.fixture(scope="module")
def tiny_model() -> Iris:
    torch.manual_seed(0)
    return Iris(IrisConfig.tiny()).eval()


@pytest.fixture(scope="session")
def episode() -> dict[str, torch.Tensor]:
    """Two 32³ scans with the same two classes (bright and dark sphere) at different places.

    Batch element 0 segments scan B with scan A as reference, element 1 the other way round, so a
    query never equals its reference.
    """
    a, a_masks = blob_volume([((10, 10, 12), 5, 1.0), ((22, 20, 20), 6, -1.0)], size=(32, 32, 32), seed=1)
    b, b_masks = blob_volume([((20, 12, 9), 5, 1.0), ((11, 22, 21), 6, -1.0)], size=(32, 32, 32), seed=2)
    return {
        "query": torch.cat([b, a]),
        "query_masks": torch.cat([b_masks, a_masks]),
        "ref": torch.cat([a, b]),
        "ref_masks": torch.cat([a_masks, b_masks]),
    }
