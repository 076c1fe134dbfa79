"""Per-class voxel counts and bounding boxes, kept in the manifest so training can sample foreground."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage


def class_statistics(
    label_array: np.ndarray, labels: Iterable[int]
) -> tuple[dict[int, int], dict[int, list[int] | None]]:
    """Voxel count and half-open ``[z0, y0, x0, z1, y1, x1]`` box of each foreground label.

    A label that is absent gets count 0 and box ``None``. ``find_objects`` finds every box in one C pass;
    counting inside each box then touches only that box (0.13 s on 512×512×200, where ``np.bincount``
    needs 1.3 s because it first copies the volume to int64).
    """
    wanted = sorted({int(label) for label in labels})
    if not np.issubdtype(label_array.dtype, np.integer):
        raise ValueError(f"label array must hold integers, got {label_array.dtype}")
    if wanted and wanted[0] < 1:
        raise ValueError(f"labels must be foreground values >= 1, got {wanted[0]}")
    if label_array.ndim != 3:
        raise ValueError(f"label array must be 3-D [z, y, x], got shape {label_array.shape}")
    boxes = ndimage.find_objects(label_array, max_label=wanted[-1]) if wanted else []
    counts: dict[int, int] = {}
    bboxes: dict[int, list[int] | None] = {}
    for label in wanted:
        box = boxes[label - 1]
        if box is None:
            counts[label], bboxes[label] = 0, None
            continue
        counts[label] = int(np.count_nonzero(label_array[box] == label))
        bboxes[label] = [s.start for s in box] + [s.stop for s in box]
    return counts, bboxes


def non_whole_values(values: np.ndarray, examples: int = 5) -> tuple[int, np.ndarray]:
    """How many of ``values`` are not whole numbers (NaN counts, NaN != NaN), and the smallest distinct
    ones (at most ``examples``), for a label map that must hold class numbers.

    Slab by slab along the first axis, so no volume-sized mask is allocated.
    """
    count, found = 0, np.empty(0, dtype=values.dtype)
    for slab in np.atleast_2d(values):
        fractional = slab[slab != np.rint(slab)]
        if fractional.size:
            count += fractional.size
            found = np.unique(np.concatenate([found, np.unique(fractional)]))[:examples]
    return count, found
