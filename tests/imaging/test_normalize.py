from __future__ import annotations

import numpy as np
import pytest

from iris_pipelines.imaging.normalize import normalize_in_place, normalize_intensity


def test_ct_clips_to_window_then_z_scores() -> None:
    # Clipped to (-100, 100): four voxels at -100, four at 100 -> mean 0, population std 100.
    array = np.array([-3000, -100, -200, -100, 100, 250, 100, 3000], dtype=np.int16).reshape(2, 2, 2)
    result = normalize_intensity(array, "CT", ct_window=(-100.0, 100.0))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result.ravel(), [-1, -1, -1, -1, 1, 1, 1, 1], atol=1e-6)


def test_ct_default_window_keeps_values_inside() -> None:
    # Inside (-990, 500) nothing is clipped: values 0, 0, 0, 0, 0, 0, 0, 400 -> mean 50,
    # variance (7 * 50**2 + 350**2) / 8 = 17500, std = sqrt(17500).
    array = np.zeros((2, 2, 2))
    array[1, 1, 1] = 400.0
    result = normalize_intensity(array, "ct")
    std = 17500.0**0.5
    assert result[0, 0, 0] == pytest.approx(-50.0 / std, abs=1e-6)
    assert result[1, 1, 1] == pytest.approx(350.0 / std, abs=1e-6)


@pytest.mark.parametrize("modality", ["MR", "PET"])
def test_mr_pet_clip_to_percentiles(modality: str) -> None:
    # Values 0..8 (9 voxels); the 25th/75th percentiles (linear interpolation) are exactly 2 and 6.
    # Clipped: 2, 2, 2, 3, 4, 5, 6, 6, 6 -> mean 4, variance (3*4 + 1 + 0 + 1 + 3*4) / 9 = 26/9.
    array = np.arange(9, dtype=np.float64).reshape(1, 3, 3)
    result = normalize_intensity(array, modality, percentiles=(25.0, 75.0))
    std = (26.0 / 9.0) ** 0.5
    expected = np.array([-2, -2, -2, -1, 0, 1, 2, 2, 2]) / std
    np.testing.assert_allclose(result.ravel(), expected, atol=1e-6)


def test_constant_volume_gives_zeros() -> None:
    result = normalize_intensity(np.full((2, 2, 2), 7.0), "MR")
    assert result.dtype == np.float32
    assert not result.any()


def test_unknown_modality_and_non_finite_are_rejected() -> None:
    with pytest.raises(ValueError, match="'US'"):
        normalize_intensity(np.zeros((2, 2, 2)), "US")
    bad = np.zeros((2, 2, 2))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        normalize_intensity(bad, "CT")


@pytest.mark.parametrize("modality", ["CT", "MR", "PET"])
def test_in_place_over_several_blocks_matches_a_float64_reference(modality):
    """Volumes larger than one statistics block (2**20 voxels) give the textbook z-score."""
    rng = np.random.default_rng(7)
    volume = rng.normal(100, 700, (9, 300, 500)).astype(np.float32)
    reference = volume.astype(np.float64)
    low, high = (-500.0, 800.0) if modality == "CT" else np.percentile(volume, (5.0, 95.0))
    reference = np.clip(reference, low, high)
    reference = (reference - reference.mean()) / reference.std()
    normalize_in_place(volume, modality, ct_window=(-500.0, 800.0), percentiles=(5.0, 95.0))
    np.testing.assert_allclose(volume, reference, rtol=0, atol=1e-5)


def test_normalize_intensity_leaves_its_input_alone():
    array = np.array([[[-2000.0, 0.0], [100.0, 600.0]]], dtype=np.float32)
    before = array.copy()
    normalize_intensity(array, "CT")
    np.testing.assert_array_equal(array, before)


def test_in_place_needs_float32():
    with pytest.raises(TypeError, match="float32"):
        normalize_in_place(np.zeros((2, 2, 2), dtype=np.int16), "CT")


@pytest.mark.parametrize("modality", ["CT", "MR", "PET"])
def test_padding_outside_the_scan_does_not_shift_the_intensities(modality):
    """A scan padded with its minimum (what resampling an oblique scan adds) keeps its normalised values
    when ``inside`` names the scanned voxels; without it the padding pulls the mean and the spread."""
    rng = np.random.default_rng(3)
    scan = rng.normal(40, 300, (6, 7, 8)).astype(np.float32)
    padded = np.full((6, 7, 20), scan.min(), dtype=np.float32)
    padded[:, :, :8] = scan
    inside = np.zeros(padded.shape, dtype=bool)
    inside[:, :, :8] = True
    expected = normalize_intensity(scan, modality, ct_window=(-500.0, 800.0), percentiles=(5.0, 95.0))
    masked = normalize_intensity(
        padded, modality, ct_window=(-500.0, 800.0), percentiles=(5.0, 95.0), inside=inside
    )
    np.testing.assert_allclose(masked[:, :, :8], expected, atol=1e-5)
    assert np.all(masked[:, :, 8:] <= expected.min() + 1e-5)  # padding stays at the low end
    unmasked = normalize_intensity(padded, modality, ct_window=(-500.0, 800.0), percentiles=(5.0, 95.0))
    assert np.abs(unmasked[:, :, :8] - expected).max() > 0.1


def test_inside_must_fit_the_volume():
    volume = np.zeros((2, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="boolean array of the volume's shape"):
        normalize_in_place(volume, "CT", inside=np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="selects no voxel"):
        normalize_in_place(volume, "CT", inside=np.zeros((2, 2, 2), dtype=bool))


def test_a_nearly_empty_pet_keeps_its_lesion() -> None:
    """Over 96 % of the voxels at one value put both percentiles there; clipping to them erased the
    lesion and left a blank image beside its label."""
    volume = np.zeros((20, 20, 20), dtype=np.float32)
    volume[9:11, 9:11, 9:11] = 5000.0  # 8 hot voxels in an empty field of view
    out = normalize_intensity(volume, "PET")
    assert out[10, 10, 10] > 10 and np.ptp(out) > 0
    assert np.allclose(out[0, 0, 0], out[19, 19, 19])  # the background stays one value
