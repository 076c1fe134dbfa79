"""Resampling onto the canonical training grid and back onto a scan's own grid.

The canonical grid has the identity direction (SimpleITK's LPS axes) and the target spacing, and covers the
whole world box of the input, so oblique scans lose no tissue and predictions can return exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import IDENTITY_DIRECTION, Geometry
from iris_pipelines.imaging.stats import non_whole_values

LABEL_MAX = 255  # label maps are stored as uint8
_SIZE_EPS = 1e-6  # keeps float noise in a box that is exactly n voxels wide from adding a voxel
# The canonical volume is one buffer in SimpleITK, numpy and torch (4 bytes a voxel each, its logits K× that),
# and torch indexes some kernels with int32: 2**31 voxels is 8 GiB a float32 copy, and still ~4× a whole-body
# CT (500 × 500 × 2000 mm) at 1 mm, so only a wrong target spacing or a header in the wrong units (a NIfTI in
# metres is 1000× too large on every axis) goes past it. Past it ITK fails to allocate, with a traceback.
MAX_GRID_VOXELS = 2**31


def _as_spacing(spacing: float | Sequence[float]) -> np.ndarray:
    values = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if np.any(values <= 0):
        raise ValueError(f"target spacing must be positive, got {tuple(values)}")
    return values


def _voxel_box(image_geometry: Geometry, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The world box of the input's voxels (its low and high corners) and the voxels per axis at ``target``
    that cover it, as floats: an absurd spacing must not overflow an integer before it can be refused."""
    corners = image_geometry.world_corners()
    low, high = corners.min(axis=0), corners.max(axis=0)
    return low, high, np.maximum(np.ceil((high - low) / target - _SIZE_EPS), 1.0)


def canonical_geometry(image_geometry: Geometry, spacing: float | Sequence[float]) -> Geometry:
    """Identity-direction grid at ``spacing`` covering the input's voxel box, centred on it."""
    target = _as_spacing(spacing)
    low, high, size = _voxel_box(image_geometry, target)
    size = size.astype(int)
    centre = (low + high) / 2.0
    origin = centre - (size - 1) / 2.0 * target
    return Geometry(tuple(size), tuple(target), tuple(origin), IDENTITY_DIRECTION)


def require_grid_fits(image_geometry: Geometry, spacing: float | Sequence[float], source: str) -> None:
    """Refuse an image whose canonical grid at ``spacing`` would hold more than :data:`MAX_GRID_VOXELS`
    voxels, naming ``source``, its extent and the spacing, before anything is allocated for it."""
    target = _as_spacing(spacing)
    low, high, size = _voxel_box(image_geometry, target)
    extent = high - low
    voxels = float(np.prod(size))
    if voxels > MAX_GRID_VOXELS:
        raise InvalidInputError(
            source,
            "grid_too_large",
            f"it spans {' × '.join(f'{v:.6g}' for v in extent)} mm, so its grid at the target spacing "
            f"{' × '.join(f'{v:g}' for v in target)} mm would hold {voxels:.3g} voxels, more than the "
            f"{MAX_GRID_VOXELS:.3g} that can be resampled; check the target spacing (--spacing) and the "
            "scan's units (a header in metres makes it 1000× too large)",
        )


def field_of_view_mask(source: Geometry, grid: Geometry) -> np.ndarray | None:
    """Which voxels of ``grid`` (array order z, y, x) lie inside ``source``'s scanned volume; None if all.

    Inside means what the resampler decides: the voxel centre's continuous index in ``source`` lies within
    half a voxel of its outer voxel centres. The rest of a canonical grid is padding (an oblique scan's
    bounding box holds 60-70 % of it), which must not count as tissue in any intensity statistic.
    Computed slice by slice from the two geometries alone, so no input-sized array is allocated.
    """

    def to_source_index(ijk: np.ndarray) -> np.ndarray:
        return source.world_to_index(grid.index_to_world(ijk))

    low = np.full(3, -0.5)
    high = np.asarray(source.size, dtype=np.float64) - 0.5
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid.size], indexing="ij")).reshape(3, -1).T
    corner_index = to_source_index(corners)
    if np.all((corner_index >= low) & (corner_index < high)):
        return None  # both grids are boxes: all corners inside means every voxel is
    size_x, size_y, size_z = grid.size
    columns, rows = np.meshgrid(np.arange(size_x), np.arange(size_y), indexing="xy")
    plane = np.stack([columns.ravel(), rows.ravel(), np.zeros(columns.size)], axis=1)
    origin = to_source_index(np.zeros((1, 3)))[0]
    in_plane = to_source_index(plane) - origin  # source-index offset of every (x, y) of a slice
    step = to_source_index(np.array([[0.0, 0.0, 1.0]]))[0] - origin  # offset of one slice along z
    mask = np.empty((size_z, size_y, size_x), dtype=bool)
    for z in range(size_z):
        index = in_plane + (origin + z * step)
        mask[z] = np.all((index >= low) & (index < high), axis=1).reshape(size_y, size_x)
    return mask


def _minimum(image: sitk.Image) -> float:
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    return stats.GetMinimum()


def _require_whole_numbers(image: sitk.Image) -> None:
    """Refuse fractional or NaN values in a float label map: the uint8 cast would truncate 1.5 to 1 and 0.6
    to 0 (a class silently lost) and NaN to an arbitrary class."""
    count, examples = non_whole_values(sitk.GetArrayViewFromImage(image))
    if count:
        listed = ", ".join(repr(float(v)) for v in examples)  # :g would print 1.0000001 as "1"
        raise ValueError(
            f"label values must be whole numbers; {count} voxel(s) are not "
            f"(e.g. {listed}): re-export the label map without interpolation"
        )


def as_label(image: sitk.Image) -> sitk.Image:
    """A label map as uint8, refusing values that do not survive the cast (fractional, NaN, out of range)."""
    if image.GetPixelID() == sitk.sitkUInt8:
        return image
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        _require_whole_numbers(image)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if stats.GetMinimum() < 0 or stats.GetMaximum() > LABEL_MAX:
        raise ValueError(
            f"label values must lie in 0..{LABEL_MAX}, got {stats.GetMinimum()}..{stats.GetMaximum()}"
        )
    return sitk.Cast(image, sitk.sitkUInt8)


def resample_to_geometry(
    image: sitk.Image, geometry: Geometry, *, is_label: bool, default_value: float | None = None
) -> sitk.Image:
    """Resample onto ``geometry`` in world space.

    Labels use nearest neighbour (no invented classes) and come back as uint8 with background 0 outside
    the input. Images use linear interpolation into float32 (integer output would round away the
    interpolation) and are padded with their minimum, i.e. air for CT rather than a fake 0 HU.
    """
    if is_label:
        source = as_label(image)
        interpolator, pixel_type = sitk.sitkNearestNeighbor, sitk.sitkUInt8
        fill = 0.0 if default_value is None else default_value
    else:
        source = image
        interpolator, pixel_type = sitk.sitkLinear, sitk.sitkFloat32
        fill = _minimum(image) if default_value is None else default_value
    return sitk.Resample(
        source,
        geometry.size,
        sitk.Transform(3, sitk.sitkIdentity),
        interpolator,
        geometry.origin,
        geometry.spacing,
        geometry.direction,
        float(fill),
        pixel_type,
    )


def to_canonical(image: sitk.Image, spacing: float | Sequence[float], *, is_label: bool) -> sitk.Image:
    """Resample onto the canonical grid derived from the image's own geometry.

    An image and its label must share one canonical grid: compute it once with :func:`canonical_geometry`
    and use :func:`resample_to_geometry` for both when their headers may differ by float noise.
    """
    target = canonical_geometry(Geometry.from_image(image), spacing)
    return resample_to_geometry(image, target, is_label=is_label)


def restore_geometry(image: sitk.Image, original: Geometry, *, is_label: bool) -> sitk.Image:
    """Send a canonical-grid result back onto the scan's grid with its exact header."""
    return resample_to_geometry(image, original, is_label=is_label)
