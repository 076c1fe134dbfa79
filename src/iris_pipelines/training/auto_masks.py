"""Auto-masks: label-free segmentation tasks cut from a single scan (self-supervised episodes).

A network trained only on a few labelled concepts learns those concepts and treats everything else as
background, so a novel class shown by a reference (a bone, a gland it was never taught) comes out empty.
Auto-mask episodes break that habit: their targets are regions of homogeneous intensity (connected
components of the smoothed scan cut into intensity bands), which cover every tissue of the scan,
labelled or not. The reference and the query are two differently cropped and augmented views of the
same scan, so the target is known exactly and only the reference can say which region is meant. This is
the recipe of SSL-ALPNet's supervoxel episodes (Ouyang et al., ECCV 2020) and of the Iris authors' MASS,
which trains the Iris architecture on automatic masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def intensity_regions(
    image: np.ndarray,
    bins: int,
    *,
    smoothing: float = 1.0,
    min_voxels: int = 27,
    max_fraction: float = 0.1,
) -> np.ndarray:
    """Label map of homogeneous regions: connected components of ``image`` cut into ``bins`` bands.

    The band edges are quantiles of the distinct intensity levels of the smoothed image (rounded to
    0.01), so the bands follow the scan's own range whatever the modality's scale, and a large uniform
    area (the air around the body) counts as one level instead of swallowing most bands. Components
    smaller than ``min_voxels`` (noise) or larger than ``max_fraction`` of the image (background, fat,
    the body wall) are dropped, and so are shells one voxel thick. Labels are 1…N, 0 is "no region".
    """
    if image.ndim != 3:
        raise ValueError(f"intensity_regions needs a 3-D image, got shape {image.shape}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    smooth = ndimage.gaussian_filter(image.astype(np.float32), smoothing) if smoothing > 0 else image
    levels = np.unique(np.round(smooth, 2))
    edges = np.unique(np.quantile(levels, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    bands = np.digitize(smooth, edges)
    regions = np.zeros(image.shape, dtype=np.int32)
    largest = max_fraction * image.size
    count = 0
    for band in range(bins):
        # Opening first: the partial-volume rim between two tissues falls into the bands in between
        # as a one-voxel shell, which is an edge, not a region.
        components, n = ndimage.label(ndimage.binary_opening(bands == band))
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        keep = np.flatnonzero((sizes >= min_voxels) & (sizes <= largest))
        keep = keep[keep > 0]
        if keep.size == 0:
            continue
        relabel = np.zeros(n + 1, dtype=np.int32)
        relabel[keep] = np.arange(count + 1, count + 1 + keep.size, dtype=np.int32)
        regions = np.where(components > 0, np.maximum(regions, relabel[components]), regions)
        count += keep.size
    return regions


def shared_regions(
    regions: np.ndarray, windows: Sequence[tuple[Sequence[int], Sequence[int]]], min_voxels: int
) -> list[int]:
    """Region labels with at least ``min_voxels`` voxels inside every (start, size) window."""
    counts = []
    for start, size in windows:
        crop = regions[tuple(slice(s, s + c) for s, c in zip(start, size, strict=True))]
        counts.append(np.bincount(crop.ravel(), minlength=int(regions.max()) + 1))
    common = np.minimum.reduce(counts)
    return [int(label) for label in np.flatnonzero(common >= min_voxels) if label > 0]


__all__ = ["intensity_regions", "shared_regions"]
