"""Intensity normalisation by modality, as in the Iris recipe (CT window, MR/PET percentiles, z-score)."""

from __future__ import annotations

import numpy as np

_PERCENTILE_MODALITIES = frozenset({"MR", "PET"})


def normalize_intensity(
    array: np.ndarray,
    modality: str,
    *,
    ct_window: tuple[float, float] = (-990.0, 500.0),
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> np.ndarray:
    """Clip then z-score a volume, returning float32.

    CT is clipped to a fixed Hounsfield window because its units are absolute; MR and PET have arbitrary
    scales, so they are clipped to the volume's own percentiles. A constant volume maps to zeros.
    """
    kind = modality.upper()
    if kind != "CT" and kind not in _PERCENTILE_MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected CT, MR or PET")
    source = np.asarray(array)
    if np.issubdtype(source.dtype, np.inexact) and not np.all(np.isfinite(source)):
        raise ValueError("the volume holds NaN or infinite values")
    values = source.astype(np.float32, copy=False)
    if kind == "CT":
        low, high = ct_window
    else:
        low, high = np.percentile(values, percentiles)
    clipped = np.clip(values, np.float32(low), np.float32(high))
    if clipped.size == 0 or clipped.min() == clipped.max():
        return np.zeros_like(clipped)
    mean = clipped.mean(dtype=np.float64)
    std = clipped.std(dtype=np.float64)
    return ((clipped - mean) / std).astype(np.float32)
