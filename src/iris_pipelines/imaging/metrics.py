"""Segmentation metrics in millimetres: Dice, IoU, normalised surface Dice (NSD) and HD95.

Surface metrics come from MONAI (``compute_surface_dice``, ``compute_hausdorff_distance``) so numbers match
what the community reports; this module adds what MONAI leaves open and a review needs pinned down:
input checks, spacing in the array's own axis order, and one fixed convention for empty masks.

Empty masks (``P`` = prediction, ``T`` = truth; every row also carries ``empty_prediction`` and
``empty_truth`` so summaries can count or drop these cases instead of guessing):

============================  =====  =====  =====  ==========
case                          Dice   IoU    NSD    HD95 (mm)
============================  =====  =====  =====  ==========
both empty                    1.0    1.0    1.0    0.0
``P`` empty, ``T`` not        0.0    0.0    0.0    NaN
``T`` empty, ``P`` not        0.0    0.0    0.0    NaN
============================  =====  =====  =====  ==========

Both empty is perfect agreement (nothing to find, nothing found), as in MONAI's ``DiceMetric`` with
``ignore_empty=False``. With one side empty there is no surface to measure a distance to, so HD95 is NaN,
as MONAI 1.6's ``compute_hausdorff_distance`` returns it (with a warning; it gives NaN for both empty too,
where this table has 0.0). These cases are decided here before MONAI is called, so the convention does not
move with MONAI's. NaN plus the flag keeps the row, is skipped by NaN-aware means and is counted separately
by :func:`summarize_metrics`.

HD95 follows MONAI (and DeepMind's surface-distance): the larger of the two directed 95th percentiles of
distances between boundary voxel centres. NSD counts boundary voxels (``use_subvoxels=False``) within the
tolerance, in both directions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

METRIC_NAMES = ("dice", "iou", "nsd", "hd95_mm")


@dataclass(frozen=True)
class MaskMetrics:
    """Metrics of one binary prediction against its truth; see the module docstring for empty cases."""

    dice: float
    iou: float
    nsd: float
    hd95_mm: float
    tolerance_mm: float
    prediction_voxels: int
    truth_voxels: int
    prediction_volume_ml: float
    truth_volume_ml: float
    empty_prediction: bool
    empty_truth: bool

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def spacing_from_image(image: sitk.Image) -> tuple[float, ...]:
    """Voxel spacing in numpy axis order of ``sitk.GetArrayFromImage(image)``.

    SimpleITK reports spacing as (x, y, z) but its arrays are indexed [z, y, x]; passing ``GetSpacing()``
    straight to an array metric would scale the wrong axes on anisotropic scans.
    """
    return tuple(float(v) for v in reversed(image.GetSpacing()))


def _check_spacing(spacing: Sequence[float] | np.ndarray, ndim: int) -> tuple[float, ...]:
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.size != ndim:
        raise ValueError(
            f"spacing {tuple(values.tolist())} has {values.size} values but the masks have {ndim} axes; "
            "give one spacing per array axis, in array order (see spacing_from_image)"
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be finite and positive, got {tuple(values.tolist())}")
    return tuple(float(v) for v in values)


def _as_binary(array: np.ndarray, name: str) -> np.ndarray:
    """Boolean view of a 0/1 mask; anything else is refused (a probability map or label map is a bug here)."""
    values = np.asarray(array)
    if values.dtype == np.bool_:
        return values
    ok = (values == 0) | (values == 1)
    if not ok.all():
        bad = np.unique(values[~ok])
        shown = ", ".join(f"{v:g}" for v in bad[:5].tolist()) + (", …" if bad.size > 5 else "")
        raise ValueError(
            f"{name} must be a binary mask with values 0/1, found {bad.size} other value(s): {shown}; "
            "threshold probabilities or select one label first"
        )
    return values.astype(bool)


def _check_pair(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} does not match truth shape {truth.shape}; "
            "both must lie on the same grid"
        )
    if prediction.ndim not in (2, 3):
        raise ValueError(f"masks must be 2-D or 3-D arrays, got shape {prediction.shape}")
    return prediction, truth


def _surface_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float
) -> tuple[float, float]:
    """NSD and HD95 from MONAI for two non-empty masks (MONAI wants one-hot (B, C, *spatial) tensors)."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    y_pred = torch.from_numpy(np.ascontiguousarray(prediction))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(truth))[None, None]
    with warnings.catch_warnings():
        # MONAI 1.6 warns about its own internal use of a deprecated argument on every call.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = compute_surface_dice(
            y_pred, y, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing
        )
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    return float(nsd[0, 0]), float(hd95[0, 0])


def mask_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
) -> MaskMetrics:
    """Dice, IoU, NSD at ``tolerance_mm`` and HD95 in mm of one binary mask pair on one grid.

    ``spacing`` is in mm per array axis, in the array's axis order (use :func:`spacing_from_image` for
    arrays from SimpleITK).
    """
    prediction, truth = _check_pair(prediction, truth)
    spacing_mm = _check_spacing(spacing, prediction.ndim)
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a finite number of mm >= 0, got {tolerance_mm}")
    pred = _as_binary(prediction, "prediction")
    true = _as_binary(truth, "truth")

    n_pred, n_true = int(pred.sum()), int(true.sum())
    n_both = int(np.logical_and(pred, true).sum())
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    if n_pred == 0 and n_true == 0:
        dice = iou = nsd = 1.0
        hd95 = 0.0
    elif n_pred == 0 or n_true == 0:
        dice = iou = nsd = 0.0
        hd95 = math.nan
    else:
        dice = 2.0 * n_both / (n_pred + n_true)
        iou = n_both / (n_pred + n_true - n_both)
        nsd, hd95 = _surface_metrics(pred, true, spacing_mm, float(tolerance_mm))
    return MaskMetrics(
        dice=dice,
        iou=iou,
        nsd=nsd,
        hd95_mm=hd95,
        tolerance_mm=float(tolerance_mm),
        prediction_voxels=n_pred,
        truth_voxels=n_true,
        prediction_volume_ml=n_pred * voxel_ml,
        truth_volume_ml=n_true * voxel_ml,
        empty_prediction=n_pred == 0,
        empty_truth=n_true == 0,
    )


def label_map_metrics(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    classes: Iterable[int],
    tolerance_mm: float | Mapping[int, float],
) -> list[dict[str, Any]]:
    """One row per class in ``classes`` (``label`` plus :class:`MaskMetrics` fields) for two label maps.

    ``tolerance_mm`` is one NSD tolerance for all classes or a per-class mapping; a class missing from the
    mapping is an error rather than a silent default, since NSD is meaningless without its tolerance.
    Background (0) is allowed only if asked for explicitly.
    """
    prediction, truth = _check_pair(prediction, truth)
    for name, array in (("prediction", prediction), ("truth", truth)):
        if array.dtype.kind not in "biu":
            raise ValueError(f"{name} label map must hold integers, got dtype {array.dtype}")
    rows = []
    for value in classes:
        label = int(value)
        if isinstance(tolerance_mm, Mapping):
            if label not in tolerance_mm:
                raise ValueError(
                    f"no NSD tolerance given for class {label}; tolerances cover {sorted(tolerance_mm)}"
                )
            tolerance = float(tolerance_mm[label])
        else:
            tolerance = float(tolerance_mm)
        metrics = mask_metrics(prediction == label, truth == label, spacing, tolerance)
        rows.append({"label": label, **metrics.to_row()})
    return rows


def summarize_metrics(
    rows: Iterable[Mapping[str, Any]],
    by: Sequence[str] = ("label",),
    *,
    exclude_empty_truth: bool = False,
) -> list[dict[str, Any]]:
    """Mean, median and standard deviation of each metric per group of rows, groups in first-seen order.

    Means skip NaN (HD95 with one side empty); ``<metric>_n`` says how many values each mean used and
    ``n_empty_prediction``/``n_empty_truth`` how many rows hit an empty-mask convention, so a reader can tell
    a good mean from one computed over the few cases where the model predicted anything.
    ``exclude_empty_truth`` drops rows whose truth is empty (structures absent from the scan) first.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        missing = [key for key in (*by, *METRIC_NAMES, "empty_prediction", "empty_truth") if key not in row]
        if missing:
            raise ValueError(f"metric row lacks {missing}: {dict(row)}")
        if exclude_empty_truth and row["empty_truth"]:
            continue
        groups.setdefault(tuple(row[key] for key in by), []).append(row)

    summary = []
    for key, members in groups.items():
        out: dict[str, Any] = dict(zip(by, key, strict=True))
        out["n"] = len(members)
        out["n_empty_prediction"] = sum(bool(r["empty_prediction"]) for r in members)
        out["n_empty_truth"] = sum(bool(r["empty_truth"]) for r in members)
        for name in METRIC_NAMES:
            values = np.asarray([float(r[name]) for r in members], dtype=np.float64)
            finite = values[~np.isnan(values)]
            out[f"{name}_n"] = int(finite.size)
            out[f"{name}_mean"] = float(finite.mean()) if finite.size else math.nan
            out[f"{name}_median"] = float(np.median(finite)) if finite.size else math.nan
            out[f"{name}_std"] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        summary.append(out)
    return summary
