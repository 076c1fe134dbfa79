"""Paste and registration baselines on synthetic scans whose true alignment is known analytically."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from iris_pipelines.imaging import InvalidInputError
from iris_pipelines.imaging import registration as registration_module
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.metrics import label_map_metrics, spacing_from_image
from iris_pipelines.imaging.registration import (
    RegistrationConfig,
    RegistrationError,
    RegistrationResult,
    array_to_image,
    paste_label,
    propagate_label,
    register_images,
    registration_baseline,
)

Warp = Callable[[np.ndarray], np.ndarray]


class AffineCase(NamedTuple):
    reference: sitk.Image
    reference_label: sitk.Image
    propagated: sitk.Image
    result: RegistrationResult


SIZE = (40, 40, 40)  # x, y, z voxels
SPACING = 2.0  # mm
# (centre mm, semi-axes mm, intensity, label): a body with two labelled organs and one unlabelled feature.
BLOBS = [
    ((0.0, 0.0, 0.0), (34.0, 29.0, 27.0), 1.0, 0),
    ((-10.0, 5.0, 4.0), (13.0, 10.0, 11.0), 1.2, 1),
    ((13.0, -7.0, -5.0), (9.0, 11.0, 9.0), -0.6, 2),
    ((4.0, 14.0, -12.0), (6.0, 6.0, 7.0), 0.8, 0),
]
ROTATION = Rotation.from_euler("zyx", [8.0, -5.0, 6.0], degrees=True).as_matrix()
AFFINE = ROTATION * np.array([1.08, 0.95, 1.0])
SHIFT = np.array([6.3, -4.1, 3.2])


def _affine(points: np.ndarray) -> np.ndarray:
    return points @ AFFINE.T + SHIFT


def _deformed(points: np.ndarray) -> np.ndarray:
    p = _affine(points)
    wave = np.stack([5 * np.sin(p[:, 1] / 10), 4 * np.cos(p[:, 2] / 9), 4 * np.sin(p[:, 0] / 10)], axis=-1)
    return p + wave


def _scan(warp: Warp | None = None, *, inverted: bool = False) -> tuple[sitk.Image, sitk.Image]:
    """Image and label whose voxel at world point y shows the anatomy at ``warp(y)``.

    A scan made with ``warp`` W is the reference; the transform from the unwarped query to it is W⁻¹, so
    the reference label carried back through a perfect registration equals the query's own label.
    ``inverted`` flips the contrast (3 - 2·I): mutual information must not care, mean squares would.
    """
    size = np.asarray(SIZE)
    origin = -(size - 1) / 2.0 * SPACING
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    points = index * SPACING + origin
    if warp is not None:
        points = warp(points)
    image = np.zeros(len(points))
    label = np.zeros(len(points), dtype=np.uint8)
    for centre, axes, value, label_value in BLOBS:
        radius = np.sqrt((((points - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(axis=-1))
        image += value / (1.0 + np.exp((radius - 1.0) * 12.0))  # soft edges, like partial volume
        if label_value:
            label[radius < 1.0] = label_value
    if inverted:
        image = 3.0 - 2.0 * image
    geometry = Geometry(SIZE, (SPACING,) * 3, tuple(origin), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    as_zyx = (SIZE[2], SIZE[1], SIZE[0])
    image_zyx = image.reshape(SIZE).transpose(2, 1, 0).astype(np.float32)
    label_zyx = label.reshape(SIZE).transpose(2, 1, 0)
    assert image_zyx.shape == as_zyx
    return array_to_image(image_zyx, geometry), array_to_image(label_zyx, geometry)


def _dice(label: sitk.Image, truth: sitk.Image) -> list[float]:
    rows = label_map_metrics(
        sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(truth), spacing_from_image(truth), [1, 2], 2.0
    )
    return [row["dice"] for row in rows]


def _paste(reference_label: sitk.Image, query: sitk.Image) -> sitk.Image:
    pasted = paste_label(sitk.GetArrayFromImage(reference_label), sitk.GetArrayFromImage(query).shape)
    return array_to_image(pasted, Geometry.from_image(query))


@pytest.fixture(scope="module")
def query() -> tuple[sitk.Image, sitk.Image]:
    return _scan()


@pytest.fixture(scope="module")
def affine_case(query: tuple[sitk.Image, sitk.Image]) -> AffineCase:
    """Reference = query anatomy under a known rotation, anisotropic scaling and shift, contrast inverted;
    plus the label the default baseline propagates (computed once, reused by several tests)."""
    reference, reference_label = _scan(_affine, inverted=True)
    result = register_images(query[0], reference, case="affine-phantom")
    propagated = propagate_label(reference_label, query[0], result.transform)
    return AffineCase(reference, reference_label, propagated, result)


# --- paste -------------------------------------------------------------------------------------------


def test_paste_label_stretches_fov_onto_fov() -> None:
    reference = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    pasted = paste_label(reference, (4, 2, 6))
    assert pasted.shape == (4, 2, 6) and pasted.dtype == np.uint8
    # each reference voxel covers 2 × 1 × 2 query voxels
    np.testing.assert_array_equal(pasted, reference.repeat(2, axis=0).repeat(2, axis=2))
    # shrinking picks the input voxel holding each output centre: 4 -> 2 takes voxels 1 and 3
    column = np.array([10, 11, 12, 13], dtype=np.uint8).reshape(4, 1, 1)
    np.testing.assert_array_equal(paste_label(column, (2, 1, 1)).ravel(), [11, 13])
    # 3 -> 5: centres at 0.3, 0.9, 1.5, 2.1, 2.7 input voxels
    np.testing.assert_array_equal(paste_label(column[:3], (5, 1, 1)).ravel(), [10, 10, 11, 12, 12])


def test_paste_label_same_shape_is_an_exact_copy() -> None:
    reference = np.random.default_rng(0).integers(0, 4, size=(5, 6, 7), dtype=np.uint8)
    pasted = paste_label(reference, reference.shape)
    np.testing.assert_array_equal(pasted, reference)
    assert pasted is not reference and not np.shares_memory(pasted, reference)


def test_paste_label_refuses_wrong_dimensions() -> None:
    with pytest.raises(ValueError, match=r"query shape \(4, 4\) has 2 axes but the reference label has 3"):
        paste_label(np.zeros((2, 2, 2), dtype=np.uint8), (4, 4))
    with pytest.raises(ValueError, match="non-empty"):
        paste_label(np.zeros((2, 2, 2), dtype=np.uint8), (4, 0, 4))


def test_array_to_image_keeps_array_order_and_geometry() -> None:
    geometry = Geometry((8, 6, 4), (0.5, 0.7, 3.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = array_to_image(np.zeros((4, 6, 8), dtype=np.float32), geometry)
    assert Geometry.from_image(image) == geometry
    assert spacing_from_image(image) == (3.0, 0.7, 0.5)
    with pytest.raises(ValueError, match=r"array shape \(8, 6, 4\) does not match geometry size \(8, 6, 4\)"):
        array_to_image(np.zeros((8, 6, 4)), geometry)


# --- registration ------------------------------------------------------------------------------------


def test_registration_recovers_a_known_affine_across_contrast(query, affine_case) -> None:
    _, reference_label, propagated, result = affine_case
    query_image, query_label = query
    assert Geometry.from_image(propagated).same_grid(Geometry.from_image(query_image))
    assert result.transform.GetNumberOfTransforms() == (2 if result.deformable_kept else 1)
    assert propagated.GetPixelID() == sitk.sitkUInt8
    registered = _dice(propagated, query_label)
    pasted = _dice(_paste(reference_label, query_image), query_label)
    assert min(registered) > 0.9, registered
    assert min(np.subtract(registered, pasted)) > 0.3, (registered, pasted)


def test_registration_is_deterministic(query, affine_case) -> None:
    # also: the baseline is register_images then propagate_label, nothing more
    reference, reference_label, propagated, _ = affine_case
    again = registration_baseline(query[0], reference, reference_label, case="affine-phantom")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(propagated))


def test_deformable_stage_improves_on_affine(query) -> None:
    query_image, query_label = query
    reference, reference_label = _scan(_deformed)
    affine_only = registration_baseline(
        query_image, reference, reference_label, RegistrationConfig(deformable=False), case="warped"
    )
    result = register_images(query_image, reference, case="warped")
    deformable = propagate_label(reference_label, query_image, result.transform)
    affine_dice, deformable_dice = _dice(affine_only, query_label), _dice(deformable, query_label)
    assert min(np.subtract(deformable_dice, affine_dice)) > 0.04, (affine_dice, deformable_dice)
    assert min(deformable_dice) > 0.85, deformable_dice
    assert result.deformable_kept and result.transform.GetNumberOfTransforms() == 2
    assert result.deformable_metric is not None and result.deformable_metric < result.affine_metric
    assert result.seconds > 0


def test_linear_label_interpolation_matches_nearest_and_is_exact_under_identity(query, affine_case) -> None:
    query_image, query_label = query
    identity = sitk.Transform(3, sitk.sitkIdentity)
    same = propagate_label(query_label, query_image, identity, "linear")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), sitk.GetArrayFromImage(query_label))
    _, reference_label, propagated, result = affine_case
    linear = propagate_label(reference_label, query_image, result.transform, "linear")
    assert set(np.unique(sitk.GetArrayFromImage(linear))) == {0, 1, 2}
    agree = np.mean(sitk.GetArrayFromImage(linear) == sitk.GetArrayFromImage(propagated))
    assert agree > 0.98


def test_linear_label_interpolation_votes_with_background_winning_ties() -> None:
    row = np.array([0, 0, 1, 1, 2, 2, 0, 0], dtype=np.uint8)
    label = sitk.GetImageFromArray(np.broadcast_to(row, (3, 3, 8)).copy())  # x is the last array axis
    half_voxel = sitk.TranslationTransform(3, (0.5, 0.0, 0.0))  # query x samples reference x + 0.5
    linear = sitk.GetArrayFromImage(propagate_label(label, label, half_voxel, "linear"))[1, 1]
    # midway 0|1 and 2|0: a 50/50 vote goes to background; 1|2 (no background share): the first label
    np.testing.assert_array_equal(linear[:7], [0, 0, 1, 1, 2, 0, 0])
    nearest = sitk.GetArrayFromImage(propagate_label(label, label, half_voxel))[1, 1]
    np.testing.assert_array_equal(nearest[:7], [0, 1, 1, 2, 2, 0, 0])  # ITK rounds half up
    with pytest.raises(ValueError, match="interpolation must be"):
        propagate_label(label, label, half_voxel, "cubic")  # type: ignore[arg-type]


def test_registration_failure_names_the_case(query, monkeypatch) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("sitk::ERROR: All samples map outside moving image buffer")

    monkeypatch.setattr(registration_module, "_affine_stage", fail)
    with pytest.raises(
        RegistrationError, match=r"^case-017: affine registration failed: All samples map outside"
    ) as caught:
        register_images(query[0], query[0], case="case-017")
    assert caught.value.check == "registration_failed"
    assert isinstance(caught.value, InvalidInputError)  # batch stages record it as a reject


@pytest.mark.parametrize("role", ["query", "reference"])
def test_a_constant_image_is_refused_before_registering(query, role: str) -> None:
    """ITK failed on a flat image with its histogram's "Zero-valued spacing is not supported"."""
    flat = sitk.Image(SIZE, sitk.sitkFloat32) + 3.5
    flat.CopyInformation(query[0])
    fixed, moving = (flat, query[0]) if role == "query" else (query[0], flat)
    with pytest.raises(RegistrationError) as caught:
        register_images(fixed, moving, case="case-017")
    assert caught.value.check == "registration_failed" and caught.value.path == "case-017"
    assert caught.value.reason.startswith(f"the {role} image is constant (value 3.5): nothing to align")


@pytest.mark.parametrize(
    ("role", "size", "message"),
    [
        ("query", (3, 3, 3), "3 voxel(s) along axis x"),
        ("reference", (22, 24, 1), "1 voxel(s) along axis z"),
    ],
)
def test_a_volume_too_small_to_register_is_refused(query, role: str, size: tuple, message: str) -> None:
    """ITK's pyramid smoothing failed on it with "requires a minimum of four pixels along the dimension"."""
    values = np.random.default_rng(0).normal(size=size[::-1]).astype(np.float32)
    small = sitk.GetImageFromArray(values)
    fixed, moving = (small, query[0]) if role == "query" else (query[0], small)
    with pytest.raises(RegistrationError) as caught:
        register_images(fixed, moving, case="c")
    assert caught.value.reason.startswith(f"the {role} image is too small to register: {message}")
    assert "at least 4 along every axis" in caught.value.reason


def test_label_on_another_grid_is_refused(query) -> None:
    image, label = query
    shifted = sitk.Image(label)
    shifted.SetOrigin(tuple(v + 5.0 for v in label.GetOrigin()))
    with pytest.raises(RegistrationError, match=r"^case-3: the reference label grid .* differs"):
        registration_baseline(image, image, shifted, case="case-3")


def test_bad_label_and_dimension_are_refused(query) -> None:
    image, label = query
    float_label = sitk.Cast(label, sitk.sitkFloat32)
    with pytest.raises(RegistrationError, match="must hold integers in 0..255, got 32-bit float"):
        propagate_label(float_label, image, sitk.Transform(3, sitk.sitkIdentity), case="c")
    flat2d = sitk.Image(8, 8, sitk.sitkFloat32)
    with pytest.raises(RegistrationError, match="the query image is 2-D"):
        register_images(flat2d, image, case="c")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": 0}, "seed must be >= 1"),
        ({"affine_shrink_factors": (4, 2)}, "need one entry per level"),
        ({"bspline_max_displacement": 0.6}, r"\(0, 0.4\]"),
        ({"label_interpolation": "cubic"}, "label_interpolation"),
        ({"bspline_samples": 10}, "below 100"),
    ],
)
def test_config_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RegistrationConfig(**kwargs)


def test_config_accepts_lists_from_yaml() -> None:
    config = RegistrationConfig(affine_shrink_factors=[2, 1], affine_smoothing_sigmas=[1, 0])
    assert config.affine_shrink_factors == (2, 1)
    assert hash(config) == hash(
        RegistrationConfig(affine_shrink_factors=(2, 1), affine_smoothing_sigmas=(1, 0))
    )
