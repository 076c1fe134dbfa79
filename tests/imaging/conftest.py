"""Small synthetic volumes with chosen geometry, shared by the imaging tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

ImageFactory = Callable[..., sitk.Image]


def _oblique_direction() -> tuple[float, ...]:
    """20° about x then 20° about y: no index axis is parallel to a world axis."""
    return tuple(Rotation.from_euler("xy", [20.0, 20.0], degrees=True).as_matrix().ravel())


@pytest.fixture
def oblique_direction() -> tuple[float, ...]:
    return _oblique_direction()


@pytest.fixture
def make_image() -> ImageFactory:
    """Build a 3-D image from an [z, y, x] array (random int16 by default) and a geometry."""

    def build(
        array: np.ndarray | None = None,
        *,
        size: Sequence[int] = (12, 10, 8),
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    ) -> sitk.Image:
        if array is None:
            rng = np.random.default_rng(0)
            array = rng.integers(-1000, 1500, size=tuple(reversed(size)), dtype=np.int16)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(v) for v in spacing))
        image.SetOrigin(tuple(float(v) for v in origin))
        image.SetDirection(tuple(float(v) for v in direction))
        return image

    return build
