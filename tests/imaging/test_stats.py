from __future__ import annotations

import numpy as np
import pytest

from iris_pipelines.imaging.stats import class_statistics


def test_counts_and_half_open_boxes() -> None:
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[1:3, 2:4, 0:5] = 1  # 2 * 2 * 5 = 20 voxels
    labels[3, 4, 5] = 2
    labels[1, 2, 0] = 3  # carves one voxel out of label 1's box
    counts, boxes = class_statistics(labels, [1, 2, 3, 4])
    assert counts == {1: 19, 2: 1, 3: 1, 4: 0}
    assert boxes == {1: [1, 2, 0, 3, 4, 5], 2: [3, 4, 5, 4, 5, 6], 3: [1, 2, 0, 2, 3, 1], 4: None}


def test_no_labels_requested() -> None:
    assert class_statistics(np.ones((2, 2, 2), dtype=np.uint8), []) == ({}, {})


def test_rejects_background_float_and_2d() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        class_statistics(np.zeros((2, 2, 2), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match="integers"):
        class_statistics(np.zeros((2, 2, 2), dtype=np.float32), [1])
    with pytest.raises(ValueError, match="3-D"):
        class_statistics(np.zeros((2, 2), dtype=np.uint8), [1])
