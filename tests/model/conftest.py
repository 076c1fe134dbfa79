"""Shared fixtures for the model tests: the tiny network and a synthetic two-class episode."""

from __future__ import annotations

import pytest
import torch

from iris_pipelines.model import Iris, IrisConfig

Blob = tuple[tuple[int, int, int], float, float]


def _blob_volume(blobs: list[Blob], size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy (1, 1, S, S, S) image with spherical blobs (centre, radius, intensity) and their masks."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij"))
    image = 0.1 * torch.randn(1, 1, size, size, size, generator=generator)
    masks = []
    for centre, radius, intensity in blobs:
        mask = ((grid - torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2
        image[0, 0] += intensity * mask
        masks.append(mask.float())
    return image, torch.stack(masks).unsqueeze(0)


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
    a, a_masks = _blob_volume([((10, 10, 12), 5, 1.0), ((22, 20, 20), 6, -1.0)], size=32, seed=1)
    b, b_masks = _blob_volume([((20, 12, 9), 5, 1.0), ((11, 22, 21), 6, -1.0)], size=32, seed=2)
    return {
        "query": torch.cat([b, a]),
        "query_masks": torch.cat([b_masks, a_masks]),
        "ref": torch.cat([a, b]),
        "ref_masks": torch.cat([a_masks, b_masks]),
    }
