"""Metrics against hand-computed boxes on anisotropic grids, and the documented empty-mask conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from iris_pipelines.imaging.metrics import (
    MaskMetrics,
    label_map_metrics,
    mask_metrics,
    spacing_from_image,
    summarize_metrics,
)

# (z, y, x) spacing in array order: thick slices, fine in-plane, as in a typical CT.
ANISO = (3.0, 0.7, 0.5)


def _box(shape: tuple[int, ...], *slices: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[slices] = True
    return mask


@pytest.fixture
def slab() -> np.ndarray:
    """4 slices × 16 × 16 voxels, away from the border: 256-voxel faces, 60-voxel rings."""
    return _box((12, 24, 24), slice(2, 6), slice(4, 20), slice(4, 20))


def test_spacing_from_image_is_in_array_axis_order() -> None:
    image = sitk.Image(8, 6, 4, sitk.sitkUInt8)  # x, y, z sizes
    image.SetSpacing((0.5, 0.7, 3.0))
    assert spacing_from_image(image) == (3.0, 0.7, 0.5)
    assert sitk.GetArrayFromImage(image).shape == (4, 6, 8)  # the order the spacing now follows


def test_identical_masks_are_perfect(slab: np.ndarray) -> None:
    m = mask_metrics(slab, slab.astype(np.uint8), ANISO, tolerance_mm=0.0)
    assert (m.dice, m.iou, m.nsd, m.hd95_mm) == (1.0, 1.0, 1.0, 0.0)
    assert m.prediction_voxels == m.truth_voxels == 1024
    assert m.truth_volume_ml == pytest.approx(1024 * 3.0 * 0.7 * 0.5 / 1000)
    assert not m.empty_prediction and not m.empty_truth


def test_dice_and_iou_on_known_overlap() -> None:
    truth = _box((10, 10, 10), slice(2, 6), slice(2, 6), slice(2, 6))  # 64 voxels
    pred = _box((10, 10, 10), slice(2, 6), slice(2, 6), slice(4, 8))  # 64 voxels, 32 shared
    m = mask_metrics(pred, truth, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert m.dice == pytest.approx(2 * 32 / 128)
    assert m.iou == pytest.approx(32 / 96)
    inside = _box((10, 10, 10), slice(3, 5), slice(3, 5), slice(3, 5))  # 8 voxels inside truth
    m = mask_metrics(inside, truth, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert m.dice == pytest.approx(2 * 8 / 72)
    assert m.iou == pytest.approx(8 / 64)


def test_hd95_of_a_shift_along_the_thick_axis_is_in_mm(slab: np.ndarray) -> None:
    # Shifting 2 slices at 3 mm: the whole leading face (256 of 632 boundary voxels per side, far above
    # 5 %) lies exactly 6 mm from the other surface, and no boundary voxel lies farther.
    shifted = np.roll(slab, 2, axis=0)
    m = mask_metrics(shifted, slab, ANISO, tolerance_mm=6.0)
    assert m.hd95_mm == pytest.approx(6.0)
    assert m.dice == pytest.approx(0.5)
    assert m.iou == pytest.approx(1 / 3)
    assert m.nsd == pytest.approx(1.0)  # every boundary voxel is within 6 mm
    # Just under the tolerance, the two leading faces (2 × 256 of 2 × 632 boundary voxels) fail.
    just_under = mask_metrics(shifted, slab, ANISO, tolerance_mm=5.9)
    assert just_under.nsd == pytest.approx(1 - 512 / 1264, abs=1e-6)
    # Isotropic 1 mm spacing would give 2 mm: the spacing must reach the right axis.
    assert mask_metrics(shifted, slab, (1.0, 1.0, 1.0), 2.0).hd95_mm == pytest.approx(2.0)


def test_hd95_of_a_shift_along_the_fine_axis_is_in_mm() -> None:
    truth = _box((12, 16, 12), slice(3, 9), slice(3, 13), slice(3, 7))
    shifted = np.roll(truth, 2, axis=2)  # 2 voxels along x at 0.5 mm
    m = mask_metrics(shifted, truth, ANISO, tolerance_mm=1.0)
    assert m.hd95_mm == pytest.approx(1.0)
    assert m.nsd == pytest.approx(1.0)
    assert mask_metrics(shifted, truth, ANISO, tolerance_mm=0.9).nsd < 1.0
    # Reversing the spacing (the classic x,y,z vs z,y,x mistake) would report 6 mm.
    assert mask_metrics(shifted, truth, ANISO[::-1], tolerance_mm=1.0).hd95_mm == pytest.approx(6.0)


def test_metrics_are_symmetric(slab: np.ndarray) -> None:
    shifted = np.roll(slab, 1, axis=1)
    a = mask_metrics(shifted, slab, ANISO, 1.0)
    b = mask_metrics(slab, shifted, ANISO, 1.0)
    assert (a.dice, a.iou, a.nsd, a.hd95_mm) == pytest.approx((b.dice, b.iou, b.nsd, b.hd95_mm))


def test_both_empty_is_perfect_agreement() -> None:
    empty = np.zeros((6, 7, 8), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MONAI empty-mask warnings either
        m = mask_metrics(empty, empty, ANISO, 2.0)
    assert (m.dice, m.iou, m.nsd, m.hd95_mm) == (1.0, 1.0, 1.0, 0.0)
    assert m.empty_prediction and m.empty_truth


@pytest.mark.parametrize("empty_side", ["prediction", "truth"])
def test_one_side_empty_scores_zero_and_hd95_nan(slab: np.ndarray, empty_side: str) -> None:
    empty = np.zeros_like(slab)
    pred, truth = (empty, slab) if empty_side == "prediction" else (slab, empty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = mask_metrics(pred, truth, ANISO, 2.0)
    assert (m.dice, m.iou, m.nsd) == (0.0, 0.0, 0.0)
    assert math.isnan(m.hd95_mm)
    assert m.empty_prediction == (empty_side == "prediction")
    assert m.empty_truth == (empty_side == "truth")


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"prediction shape \(4, 5, 6\).*truth shape \(4, 5, 7\)"):
        mask_metrics(np.zeros((4, 5, 6)), np.zeros((4, 5, 7)), (1, 1, 1), 1.0)


def test_non_binary_input_is_refused() -> None:
    truth = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = truth.astype(np.float32)
    pred[0, 0, 0] = 0.7
    pred[1, 1, 1] = 2.0
    with pytest.raises(ValueError, match=r"prediction must be a binary mask.*: 0\.7, 2;"):
        mask_metrics(pred, truth, (1, 1, 1), 1.0)


@pytest.mark.parametrize(
    ("spacing", "message"),
    [
        ((1.0, float("nan"), 1.0), "finite and positive"),
        ((1.0, 0.0, 1.0), "finite and positive"),
        ((1.0, 1.0), "has 2 values but the masks have 3 axes"),
    ],
)
def test_bad_spacing_is_refused(spacing: tuple[float, ...], message: str) -> None:
    mask = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match=message):
        mask_metrics(mask, mask, spacing, 1.0)


def test_bad_tolerance_is_refused() -> None:
    mask = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="tolerance"):
        mask_metrics(mask, mask, (1, 1, 1), float("nan"))


def test_label_map_metrics_rows_per_class_with_own_tolerance() -> None:
    truth = np.zeros((12, 24, 24), dtype=np.uint8)
    truth[2:6, 4:20, 4:12] = 1
    truth[2:6, 4:20, 14:20] = 2
    pred = np.zeros_like(truth)
    pred[4:8, 4:20, 4:12] = 1  # class 1 shifted 2 slices (6 mm)
    pred[2:6, 4:20, 14:20] = 2  # class 2 exact
    # class 3 in neither map; class 4 only predicted
    pred[9:11, 1:3, 1:3] = 4
    rows = label_map_metrics(pred, truth, ANISO, [1, 2, 3, 4], {1: 5.0, 2: 1.0, 3: 1.0, 4: 1.0})
    assert [r["label"] for r in rows] == [1, 2, 3, 4]
    by_label = {r["label"]: r for r in rows}
    assert by_label[1]["hd95_mm"] == pytest.approx(6.0)
    assert by_label[1]["tolerance_mm"] == 5.0
    assert by_label[1]["dice"] == pytest.approx(0.5)
    assert by_label[1]["nsd"] < 1.0
    assert by_label[2]["dice"] == 1.0 and by_label[2]["hd95_mm"] == 0.0
    assert by_label[3]["empty_truth"] and by_label[3]["empty_prediction"] and by_label[3]["dice"] == 1.0
    assert by_label[4]["empty_truth"] and not by_label[4]["empty_prediction"]
    assert by_label[4]["dice"] == 0.0 and math.isnan(by_label[4]["hd95_mm"])
    assert set(rows[0]) == {"label", *MaskMetrics.__dataclass_fields__}
    # One tolerance for all classes works too; a mapping with a hole is an error, not a default.
    assert label_map_metrics(pred, truth, ANISO, [2], 1.0)[0]["nsd"] == 1.0
    with pytest.raises(ValueError, match="no NSD tolerance given for class 2"):
        label_map_metrics(pred, truth, ANISO, [1, 2], {1: 5.0})
    with pytest.raises(ValueError, match="must hold integers"):
        label_map_metrics(pred.astype(np.float32), truth, ANISO, [1], 1.0)


def test_summary_skips_nan_and_counts_empty_cases() -> None:
    rows = [
        {"label": 1, "dice": 0.8, "iou": 0.6, "nsd": 0.9, "hd95_mm": 4.0, "empty_prediction": False,
         "empty_truth": False},
        {"label": 1, "dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95_mm": math.nan, "empty_prediction": True,
         "empty_truth": False},
        {"label": 1, "dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95_mm": 0.0, "empty_prediction": True,
         "empty_truth": True},
        {"label": 2, "dice": 0.5, "iou": 1 / 3, "nsd": 0.7, "hd95_mm": 6.0, "empty_prediction": False,
         "empty_truth": False},
    ]  # fmt: skip
    summary = summarize_metrics(rows)
    assert [s["label"] for s in summary] == [1, 2]
    one = summary[0]
    assert (one["n"], one["n_empty_prediction"], one["n_empty_truth"]) == (3, 2, 1)
    assert one["dice_mean"] == pytest.approx(0.6)
    assert one["hd95_mm_n"] == 2 and one["hd95_mm_mean"] == pytest.approx(2.0)
    assert summary[1]["n"] == 1 and math.isnan(summary[1]["dice_std"])
    dropped = summarize_metrics(rows, exclude_empty_truth=True)[0]
    assert dropped["n"] == 2 and dropped["dice_mean"] == pytest.approx(0.4)
    assert dropped["hd95_mm_mean"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="lacks"):
        summarize_metrics([{"label": 1, "dice": 1.0}])
