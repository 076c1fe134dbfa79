"""Shape fields and rasterisation: signs, distances and world-space placement."""

from __future__ import annotations

import numpy as np
import pytest

from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.phantoms.raster import Structure, SubjectFrame, paint
from iris_pipelines.phantoms.shapes import (
    Blob,
    EllipticCylinder,
    HalfSpace,
    Intersect,
    Offset,
    RadialWaves,
    Shell,
    Subtract,
    Tube,
    rotation,
)


def _points(*rows: tuple[float, float, float]) -> np.ndarray:
    return np.array(rows, dtype=np.float32).T


def test_sphere_field_is_signed_distance() -> None:
    sphere = Blob(np.array([10.0, 0.0, 0.0]), np.full(3, 20.0))
    values = sphere.field(_points((10, 0, 0), (25, 0, 0), (40, 0, 0), (10, -30, 0)))
    np.testing.assert_allclose(values, [-20.0, -5.0, 10.0, 10.0], atol=1e-4)
    lo, hi = sphere.bounds()
    np.testing.assert_allclose(lo, [-10, -20, -20])
    np.testing.assert_allclose(hi, [30, 20, 20])


def test_deformed_blob_stays_inside_its_bounds() -> None:
    rng = np.random.default_rng(3)
    blob = Blob(
        np.array([5.0, -3.0, 2.0]),
        np.array([30.0, 12.0, 20.0]),
        rotation(20, -10, 35),
        RadialWaves.random(rng, 0.08),
        taper=-0.4,
    )
    lo, hi = blob.bounds()
    samples = rng.uniform(lo - 20, hi + 20, size=(20000, 3))
    inside = blob.field(samples.T.astype(np.float32)) < 0
    assert inside.any()
    assert np.all((samples[inside] >= lo) & (samples[inside] <= hi))


def test_tube_radius_and_caps() -> None:
    axis = np.array([[0, 0, -50], [0, 0, 0], [0, 0, 50]], dtype=float)
    tube = Tube.through(axis, np.array([5.0, 5.0, 3.0]))
    values = tube.field(_points((0, 0, -25), (4, 0, -25), (6, 0, -25), (0, 2, 50), (0, 0, 80)))
    np.testing.assert_allclose(values[:3], [-5.0, -1.0, 1.0], atol=0.1)
    assert values[3] < 0 < values[4]


def test_shell_offset_intersect_subtract() -> None:
    sphere = Blob(np.zeros(3), np.full(3, 30.0))
    wall = Shell(sphere, 3.0)
    inside = wall.field(_points((0, 0, 29), (0, 0, 31), (0, 0, 33), (0, 0, 20))) < 0
    assert list(inside) == [True, True, False, False]
    assert Offset(sphere, 5.0).field(_points((0, 0, 34)))[0] < 0
    upper = Intersect((HalfSpace(np.zeros(3), np.array([0.0, 0.0, -1.0])), sphere))
    assert list(upper.field(_points((0, 0, 10), (0, 0, -10), (0, 0, 40))) < 0) == [True, False, False]
    hollow = Subtract(sphere, Blob(np.zeros(3), np.full(3, 10.0)))
    assert list(hollow.field(_points((0, 0, 5), (0, 0, 20))) < 0) == [False, True]


def test_axis_aligned_half_space_bounds_one_axis() -> None:
    lo, hi = HalfSpace(np.array([0.0, 0.0, 60.0]), np.array([0.0, 0.0, -1.0])).bounds()
    assert lo[2] == 60.0 and hi[2] > 1000 and lo[0] < -1000


def test_cylinder_outline_matches_its_formula() -> None:
    orders, amplitudes = np.array([2, 3, 4]), np.array([0.02, -0.015, 0.01])
    phases = np.array([0.3, 1.2, 2.0])
    cylinder = EllipticCylinder(np.zeros(2), np.array([100.0, 80.0]), orders, amplitudes, phases)
    points = np.random.default_rng(0).uniform(-150, 150, (3, 5000)).astype(np.float32)
    ux, uy = points[0] / 100.0, points[1] / 80.0
    radius, angle = np.hypot(ux, uy), np.arctan2(uy, ux)
    outline = 1 + sum(a * np.cos(n * angle + p) for n, a, p in zip(orders, amplitudes, phases, strict=True))
    expected = (radius - outline) * np.hypot(points[0], points[1]) / radius
    values = cylinder.field(points)
    near = np.abs(radius - 1) < np.abs(amplitudes).sum()
    assert near.sum() > 100
    np.testing.assert_allclose(values[near], expected[near], atol=1e-3)
    np.testing.assert_array_equal(values < 0, expected < 0)


def test_tube_pieces_make_the_same_tube() -> None:
    controls = np.array([[0, 0, 0], [30, 20, 10], [60, 0, 40], [90, -10, 40]], dtype=float)
    tube = Tube.through(controls, np.array([8.0, 6.0, 5.0, 4.0]))
    pieces = tube.pieces(length_mm=20.0)
    assert len(pieces) > 3
    lo, hi = tube.bounds()
    points = np.random.default_rng(1).uniform(lo, hi, (20000, 3)).T.astype(np.float32)
    whole = tube.field(points) < 0
    union = np.any([piece.field(points) < 0 for piece in pieces], axis=0)
    np.testing.assert_array_equal(whole, union)
    assert sum(np.prod(p.bounds()[1] - p.bounds()[0]) for p in pieces) < 0.5 * np.prod(hi - lo)


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([-1.0, -1, 1]), rotation(18, 0, -22), np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])],
    ids=["identity", "flipped", "oblique", "coronal"],
)
def test_rasterised_anatomy_sits_at_the_same_world_place(direction: np.ndarray) -> None:
    """Whatever the grid's direction and spacing, a structure's world centroid is where the frame puts it."""
    frame = SubjectFrame(1.05, rotation(0, 0, 10), np.array([3.0, -4.0, 5.0]))
    structures = [
        Structure("organ", "liver", (Blob(np.array([-40.0, 0.0, 30.0]), np.array([25.0, 20.0, 15.0])),)),
        Structure("lesion", "liver_tumour", (Blob(np.array([-40.0, 0.0, 30.0]), np.full(3, 6.0)),), "organ"),
    ]
    spacing = np.array([1.2, 1.2, 2.5])
    size = np.array([110, 110, 60])
    origin = np.array([-30.0, 0.0, 30.0]) - direction @ (spacing * (size - 1) / 2)
    geometry = Geometry(tuple(size), tuple(spacing), tuple(origin), tuple(direction.ravel()))
    region, _ = paint(structures, geometry, frame)
    organ = np.argwhere(region >= 1)[:, ::-1]  # (x, y, z) indices, lesion included
    centroid = geometry.index_to_world(organ).mean(axis=0)
    expected = frame.to_world(np.array([[-40.0, 0.0, 30.0]]))[0]
    np.testing.assert_allclose(centroid, expected, atol=1.0)
    volume = organ.shape[0] * np.prod(spacing)
    assert volume == pytest.approx(4 / 3 * np.pi * 25 * 20 * 15 * 1.05**3, rel=0.03)
    assert (region == 2).sum() * np.prod(spacing) == pytest.approx(4 / 3 * np.pi * (6 * 1.05) ** 3, rel=0.15)


def test_nested_structure_paints_only_over_its_parent() -> None:
    """A lesion reaching past its organ, or into a structure drawn over the organ, stays inside the organ:
    its parent's label would otherwise land on the neighbour in datasets that label only the organ."""
    organ = Blob(np.zeros(3), np.full(3, 20.0))
    neighbour = Blob(np.array([18.0, 0.0, 0.0]), np.full(3, 8.0))
    lesion = Blob(np.array([14.0, 0.0, 0.0]), np.full(3, 12.0))
    structures = [
        Structure("organ", "liver", (organ,)),
        Structure("neighbour", "gallbladder", (neighbour,)),
        Structure("lesion", "liver_tumour", (lesion,), parent="organ"),
    ]
    geometry = Geometry((60, 40, 40), (1.0, 1.0, 1.0), (-20.0, -20.0, -20.0), tuple(np.eye(3).ravel()))
    frame = SubjectFrame(1.0, np.eye(3), np.zeros(3))
    region, _ = paint(structures, geometry, frame)
    without_lesion, _ = paint(structures[:2], geometry, frame)
    changed = region != without_lesion
    assert changed.sum() > 1000
    assert np.all(without_lesion[changed] == 1), "the lesion painted over something other than its organ"
    assert np.all(region[changed] == 3)
    with pytest.raises(ValueError, match="nests in 'organ'"):
        paint(structures[1:], geometry, frame)
