"""Intensity normalisation by modality, as in the Iris recipe (CT window, MR/PET percentiles, z-score)."""

from __future__ import annotations

import numpy as np

_PERCENTILE_MODALITIES = frozenset({"MR", "PET"})
# Statistics run over blocks of this many voxels so no full-size float64 temporary is ever allocated.
_BLOCK = 1 << 20


def _check_modality(modality: str) -> str:
    kind = modality.upper()
    if kind != "CT" and kind not in _PERCENTILE_MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected CT, MR or PET")
    return kind


def _mean_std(flat: np.ndarray, inside: np.ndarray | None = None) -> tuple[float, float]:
    """Two-pass float64 mean and standard deviation of ``flat`` (where ``inside``), block by block
    (``ndarray.std`` would allocate a float64 copy of the whole volume)."""

    def blocks():
        for i in range(0, flat.size, _BLOCK):
            block = flat[i : i + _BLOCK]
            yield block if inside is None else block[inside[i : i + _BLOCK]]

    count = flat.size if inside is None else int(np.count_nonzero(inside))
    mean = sum(float(block.sum(dtype=np.float64)) for block in blocks()) / count
    squares = sum(float(np.square(block - mean, dtype=np.float64).sum()) for block in blocks())
    return mean, (squares / count) ** 0.5


def normalize_in_place(
    array: np.ndarray,
    modality: str,
    *,
    ct_window: tuple[float, float] = (-990.0, 500.0),
    percentiles: tuple[float, float] = (2.0, 98.0),
    inside: np.ndarray | None = None,
) -> None:
    """Clip then z-score a float32 volume in place.

    CT is clipped to a fixed Hounsfield window because its units are absolute; MR and PET have arbitrary
    scales, so they are clipped to the volume's own percentiles. A constant volume maps to zeros.
    ``inside`` (a boolean array of the volume's shape, or None for all of it) names the voxels the scan
    covered: percentiles, mean and standard deviation come from them alone, so the padding a resampled
    oblique scan gains does not shift its intensities (its air-filled corners would otherwise lower the
    mean and shrink the spread: 62 % padding moved a CT bladder from 0.8 to 1.8 units, near bone).
    In place because preprocessing must stay under 3x one volume per worker: the copying version measured
    1.45 s and four volumes of temporaries on a 274x274x334 CT, this one 0.15 s and none.
    """
    kind = _check_modality(modality)
    if array.dtype != np.float32:
        raise TypeError(f"normalize_in_place needs a float32 array, got {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValueError("the volume holds NaN or infinite values")
    if array.size == 0:
        return
    if inside is not None:
        if inside.shape != array.shape or inside.dtype != np.bool_:
            raise ValueError(
                f"inside must be a boolean array of the volume's shape {array.shape}, "
                f"got {inside.dtype} {inside.shape}"
            )
        if not inside.any():
            raise ValueError("inside selects no voxel: the scan covers none of the volume")
    if kind == "CT":
        low, high = ct_window
    else:
        scanned = array if inside is None else array[inside]
        low, high = np.percentile(scanned, percentiles)
        if high <= low:
            # Over 96 % of the voxels share one value (a PET of one small hot lesion in an empty field of
            # view): clipping to the percentiles would flatten the lesion away, so keep the whole range.
            low, high = scanned.min(), scanned.max()
    np.clip(array, np.float32(low), np.float32(high), out=array)
    mean, std = _mean_std(array.reshape(-1), None if inside is None else inside.reshape(-1))
    if std == 0:
        array.fill(0)
        return
    array -= np.float32(mean)
    array /= np.float32(std)


def normalize_intensity(
    array: np.ndarray,
    modality: str,
    *,
    ct_window: tuple[float, float] = (-990.0, 500.0),
    percentiles: tuple[float, float] = (2.0, 98.0),
    inside: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`normalize_in_place` on a float32 copy, leaving the input untouched."""
    _check_modality(modality)
    values = np.array(array, dtype=np.float32, copy=True)
    normalize_in_place(values, modality, ct_window=ct_window, percentiles=percentiles, inside=inside)
    return values
