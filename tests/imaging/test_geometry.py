from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from iris_pipelines.imaging.geometry import Geometry


@pytest.fixture
def oblique(make_image, oblique_direction) -> sitk.Image:
    return make_image(
        size=(6, 5, 4), spacing=(0.7, 0.9, 3.0), origin=(10.0, -20.0, 5.5), direction=oblique_direction
    )


def test_from_image_and_apply_to(oblique: sitk.Image, make_image) -> None:
    geometry = Geometry.from_image(oblique)
    assert geometry.size == (6, 5, 4)
    assert geometry.spacing == (0.7, 0.9, 3.0)
    blank = make_image(size=(6, 5, 4))
    assert geometry.apply_to(blank) is blank
    assert Geometry.from_image(blank) == geometry
    with pytest.raises(ValueError, match="does not match"):
        geometry.apply_to(make_image(size=(2, 2, 2)))


def test_rejects_non_3d_and_bad_values() -> None:
    with pytest.raises(ValueError, match="3-D"):
        Geometry.from_image(sitk.Image(4, 4, sitk.sitkUInt8))
    with pytest.raises(ValueError, match="positive"):
        Geometry((4, 4, 0), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_dict_and_json_round_trip(oblique: sitk.Image) -> None:
    geometry = Geometry.from_image(oblique)
    assert Geometry.from_dict(geometry.to_dict()) == geometry
    assert Geometry.from_json(geometry.to_json()) == geometry
    assert geometry.to_dict()["size"] == [6, 5, 4]


def test_index_world_mapping_matches_simpleitk(oblique: sitk.Image) -> None:
    geometry = Geometry.from_image(oblique)
    ijk = np.array([[0.0, 0.0, 0.0], [1.5, 2.0, 3.25], [5.0, 4.0, 3.0]])
    expected = np.array([oblique.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in ijk])
    world = geometry.index_to_world(ijk)
    np.testing.assert_allclose(world, expected, atol=1e-9)
    np.testing.assert_allclose(geometry.world_to_index(world), ijk, atol=1e-9)


def test_world_corners_enclose_voxel_edges() -> None:
    flipped = Geometry((4, 2, 3), (2.0, 1.0, 5.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    corners = flipped.world_corners()
    assert corners.shape == (8, 3)
    # x runs from +1 (half a 2 mm voxel before index 0) down to -7; y from +0.5 to -1.5; z from -2.5 to 12.5.
    np.testing.assert_allclose(corners.min(axis=0), [-7.0, -1.5, -2.5])
    np.testing.assert_allclose(corners.max(axis=0), [1.0, 0.5, 12.5])


def test_same_grid_tolerances_and_identity(oblique: sitk.Image) -> None:
    geometry = Geometry.from_image(oblique)
    nudged = Geometry(geometry.size, geometry.spacing, np.add(geometry.origin, 5e-4), geometry.direction)
    moved = Geometry(geometry.size, geometry.spacing, np.add(geometry.origin, 5e-3), geometry.direction)
    resized = Geometry((6, 5, 5), geometry.spacing, geometry.origin, geometry.direction)
    assert geometry.same_grid(nudged)
    assert not geometry.same_grid(moved)
    assert geometry.same_grid(moved, atol_mm=1e-2)
    assert not geometry.same_grid(resized)
    assert not geometry.is_identity_direction
    assert Geometry((1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1)).is_identity_direction
