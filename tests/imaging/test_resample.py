"""A mask sent to the canonical grid and back must overlay its scan in world coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.resample import (
    canonical_geometry,
    field_of_view_mask,
    resample_to_geometry,
    restore_geometry,
    to_canonical,
)

_PERMUTED = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # index x -> world y, y -> z, z -> x
_FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _sphere(geometry: Geometry, centre: np.ndarray, radius: float) -> sitk.Image:
    """Label 1 wherever the voxel centre lies within ``radius`` mm of the world point ``centre``."""
    z, y, x = np.indices(tuple(reversed(geometry.size)))
    ijk = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    inside = np.linalg.norm(geometry.index_to_world(ijk) - centre, axis=1) < radius
    image = sitk.GetImageFromArray(inside.reshape(z.shape).astype(np.uint8))
    return geometry.apply_to(image)


def _world_centroid(label: sitk.Image) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayViewFromImage(label) == 1).mean(axis=0)
    return np.array(label.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))


def _dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a) == 1, sitk.GetArrayViewFromImage(b) == 1
    return 2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum())


def _geometry_centre(geometry: Geometry) -> np.ndarray:
    return geometry.index_to_world((np.asarray(geometry.size) - 1) / 2.0)[0]


# case: (size, spacing, direction, canonical spacing, sphere radius in mm)
_ROUND_TRIPS = {
    "oblique": ((36, 36, 36), (1.0, 1.0, 1.0), "oblique", 1.0, 9.0),
    "flipped_lps": ((30, 28, 24), (1.0, 1.2, 1.5), _FLIPPED, 1.0, 9.0),
    "permuted": ((30, 28, 24), (1.0, 1.2, 1.5), _PERMUTED, 1.0, 9.0),
    "anisotropic": ((64, 64, 10), (0.7, 0.7, 5.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 1.5, 14.0),
}


@pytest.mark.parametrize("case", list(_ROUND_TRIPS))
def test_label_round_trip_stays_in_place(case: str, oblique_direction) -> None:
    size, spacing, direction, target, radius = _ROUND_TRIPS[case]
    direction = oblique_direction if direction == "oblique" else direction
    original = Geometry(size, spacing, (-31.4, 12.7, 100.2), direction)
    # Off-centre, so a flip or permutation that went wrong would move the centroid.
    centre = _geometry_centre(original) + np.array([3.0, -2.0, 1.5])
    label = _sphere(original, centre, radius)

    canonical = to_canonical(label, target, is_label=True)
    restored = restore_geometry(canonical, original, is_label=True)

    tolerance = max(*spacing, target) / 2.0
    assert Geometry.from_image(canonical).is_identity_direction
    assert np.linalg.norm(_world_centroid(canonical) - centre) < tolerance
    assert np.linalg.norm(_world_centroid(restored) - _world_centroid(label)) < tolerance
    assert np.linalg.norm(_world_centroid(restored) - centre) < tolerance
    assert Geometry.from_image(restored) == original
    assert restored.GetPixelID() == sitk.sitkUInt8
    assert _dice(restored, label) > 0.9


def test_canonical_grid_covers_oblique_box(oblique_direction) -> None:
    original = Geometry((20, 30, 10), (1.0, 1.0, 4.0), (5.0, -5.0, 0.0), oblique_direction)
    canonical = canonical_geometry(original, (2.0, 2.0, 2.0))
    assert canonical.is_identity_direction
    assert canonical.spacing == (2.0, 2.0, 2.0)
    inner = original.world_corners()
    outer = canonical.world_corners()
    assert np.all(inner.min(axis=0) >= outer.min(axis=0) - 1e-9)
    assert np.all(inner.max(axis=0) <= outer.max(axis=0) + 1e-9)
    # Not more than one extra voxel per axis beyond what the box needs.
    extent = inner.max(axis=0) - inner.min(axis=0)
    assert np.all(np.asarray(canonical.size) <= np.ceil(extent / 2.0) + 1)


def test_canonical_of_an_axis_aligned_grid_at_its_own_spacing_is_itself() -> None:
    original = Geometry((7, 6, 5), (1.5, 1.5, 1.5), (-3.0, 4.0, 10.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert canonical_geometry(original, 1.5).same_grid(original, atol_mm=1e-9)


def test_image_resampling_is_linear_float_and_pads_with_minimum(make_image) -> None:
    ramp = np.broadcast_to(np.arange(4, dtype=np.int16) * 10 - 100, (4, 4, 4)).copy()  # -100..-70 along x
    image = make_image(ramp)
    half_shift = Geometry((4, 4, 4), (1, 1, 1), (0.5, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    result = resample_to_geometry(image, half_shift, is_label=False)
    assert result.GetPixelID() == sitk.sitkFloat32
    row = sitk.GetArrayViewFromImage(result)[0, 0]
    # Midway between voxels: -95, -85, -75; the last centre (x = 3.5) lies outside and gets the minimum.
    np.testing.assert_allclose(row, [-95.0, -85.0, -75.0, -100.0])


def test_restore_image_gets_the_exact_header(make_image, oblique_direction) -> None:
    image = make_image(spacing=(0.8, 0.8, 3.0), origin=(1.0, 2.0, 3.0), direction=oblique_direction)
    original = Geometry.from_image(image)
    restored = restore_geometry(to_canonical(image, 1.0, is_label=False), original, is_label=False)
    assert Geometry.from_image(restored) == original


def test_labels_outside_uint8_are_refused(make_image) -> None:
    label = make_image(np.full((2, 2, 2), 300, dtype=np.int16))
    with pytest.raises(ValueError, match="0..255"):
        to_canonical(label, 1.0, is_label=True)


@pytest.mark.parametrize("case", list(_ROUND_TRIPS))
def test_field_of_view_mask_is_what_the_resampler_covers(case: str, oblique_direction) -> None:
    """The padding of a canonical grid is exactly where resampling a scan of ones gives 0."""
    size, spacing, direction, target, _ = _ROUND_TRIPS[case]
    direction = oblique_direction if direction == "oblique" else direction
    original = Geometry(size, spacing, (-31.4, 12.7, 100.2), direction)
    grid = canonical_geometry(original, target)
    ones = original.apply_to(sitk.GetImageFromArray(np.ones(tuple(reversed(size)), dtype=np.uint8)))
    covered = sitk.GetArrayFromImage(resample_to_geometry(ones, grid, is_label=True)) == 1
    mask = field_of_view_mask(original, grid)
    if covered.all():
        assert mask is None
    else:
        assert mask is not None and mask.shape == covered.shape
        np.testing.assert_array_equal(mask, covered)
    if case == "oblique":
        assert 0.3 < covered.mean() < 0.9  # the bounding box of a rotated cube is mostly padding


@pytest.mark.parametrize("value", [1.5, 0.6, np.nan])
def test_float_labels_that_are_not_whole_numbers_are_refused(make_image, value: float) -> None:
    """The uint8 cast truncated 1.5 to class 1 and 0.6 to background, and accepted NaN."""
    values = np.zeros((6, 6, 6), dtype=np.float32)
    values[2:4, 2:4, 2:4] = value
    with pytest.raises(ValueError, match=r"whole numbers; 8 voxel\(s\) are not"):
        to_canonical(make_image(values), 1.0, is_label=True)


def test_a_label_value_just_off_a_whole_number_is_printed_in_full(make_image) -> None:
    """The example value was printed with :g, so a label refused for 1.0000001 said "(e.g. 1)"."""
    values = np.zeros((6, 6, 6), dtype=np.float64)
    values[2:4, 2:4, 2:4] = 1.0000001
    with pytest.raises(ValueError, match=r"\(e\.g\. 1\.0000001\)"):
        to_canonical(make_image(values), 1.0, is_label=True)


def test_float_labels_holding_whole_numbers_keep_their_classes(make_image) -> None:
    values = np.zeros((6, 6, 6), dtype=np.float64)
    values[2:4, 2:4, 2:4] = 2.0
    values[0, 0, 0] = 255.0
    canonical = to_canonical(make_image(values), 1.0, is_label=True)
    assert canonical.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(canonical), values.astype(np.uint8))
