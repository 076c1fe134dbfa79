"""Synthetic blob volumes shared by the model and inference tests."""

from __future__ import annotations

import torch

Blob = tuple[tuple[int, int, int], float, float]


def blob_volume(
    blobs: list[Blob], size: tuple[int, int, int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy (1, 1, D, H, W) image with spherical blobs (centre, radius, intensity) and their masks."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in size), indexing="ij"))
    image = 0.1 * torch.randn(1, 1, *size, generator=generator)
    masks = []
    for centre, radius, intensity in blobs:
        mask = ((grid - torch.tensor(centre, dtype=torch.float32).view(3, 1, 1, 1)) ** 2).sum(0) <= radius**2
        image[0, 0] += intensity * mask
        masks.append(mask.float())
    return image, torch.stack(masks).unsqueeze(0)
