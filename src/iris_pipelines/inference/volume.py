"""Raw scans in, label images out: the full-volume inference path on the scan's own geometry.

A raw SimpleITK image (any orientation, spacing, direction) is brought to the canonical preprocessed grid
by the *same* function the preprocess stage uses (:func:`~iris_pipelines.collection.preprocessing.
canonical_image_array`), so inference sees exactly the grid and intensities training saw. Predictions
are made there and their logits interpolated back onto the scan's grid, where the label map is decided, so it
has the input's size, spacing, origin and direction and overlays it in world coordinates (DESIGN.md,
"Geometry").

The model is reached only through a ``predict`` callable (canonical volume tensor → logits), so any
strategy and any tiling plugs in (:func:`~iris_pipelines.inference.sliding_window.volume_predictor`),
and the geometry path can be tested with a known predictor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from torch import Tensor

from iris_pipelines.collection.preprocessing import (
    PreprocessParams,
    canonical_image_array,
    canonical_label_array,
)
from iris_pipelines.imaging.geometry import Geometry
from iris_pipelines.imaging.resample import LABEL_MAX, resample_to_geometry
from iris_pipelines.inference.strategies import (
    crop_reference,
    encode_class_windows,
    encode_reference,
    logit_cut,
    logits_to_labels,
)
from iris_pipelines.model import Iris

VolumePredictor = Callable[[Tensor], Tensor]
"""Canonical volume (1, 1, D, H, W) → logits (1, K, D, H, W)."""

_CERTAIN_LOGIT = 1e4  # a label map's certainty: its boundary moves < 0.001 voxel for any threshold


@dataclass(frozen=True)
class CanonicalVolume:
    """A scan on the canonical grid: normalised float32 array [z, y, x] plus both geometries.

    ``original`` is kept so predictions can be returned onto the scan's grid; ``grid`` is the canonical
    identity-direction grid at the target spacing that the array lies on.
    """

    array: np.ndarray
    original: Geometry
    grid: Geometry

    def tensor(self, device: torch.device | str | None = None) -> Tensor:
        """The array as a (1, 1, D, H, W) float32 tensor (shares memory on CPU)."""
        return torch.from_numpy(self.array)[None, None].to(device or "cpu")


def _params(params: PreprocessParams | Mapping[str, Any]) -> PreprocessParams:
    return PreprocessParams.coerce(params)


def prepare_image(
    image: sitk.Image,
    modality: str,
    params: PreprocessParams | Mapping[str, Any],
    *,
    source: str = "<in-memory image>",
) -> CanonicalVolume:
    """Resample + normalise a raw scan exactly as the preprocess stage does (``params:preprocess``).

    Only ``target_spacing``, ``ct_window`` and ``percentiles`` matter here. ``source`` names the scan in
    errors (:class:`~iris_pipelines.imaging.InvalidInputError` for an unknown modality, NaN voxels or a
    canonical grid too large to allocate).
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{source}: expected a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    array, original, grid = canonical_image_array(image, modality, _params(params), source=source)
    return CanonicalVolume(array, original, grid)


def prepare_label(
    label: sitk.Image, volume: CanonicalVolume, *, source: str = "<in-memory label>"
) -> np.ndarray:
    """A label image on ``volume``'s canonical grid (uint8 [z, y, x]), resampled in world space.

    World-space nearest neighbour, as preprocessing does, so a label stored on its own (matching) grid
    lands voxel-exact on the image's canonical array.
    """
    return canonical_label_array(label, volume.grid, source=source)


def class_masks(label_array: np.ndarray, labels: Sequence[int], *, source: str = "reference") -> np.ndarray:
    """(K, D, H, W) bool masks, one per requested label value, in order; refuses background and empty ones.

    An empty mask means the reference cannot show the class (absent, or lost by resampling a structure
    thinner than the target spacing), which would make a meaningless embedding, so it is an error.
    """
    wanted = [int(v) for v in labels]
    if not wanted:
        raise ValueError(f"{source}: no label values requested")
    bad = [v for v in wanted if not 1 <= v <= LABEL_MAX]
    if bad:
        raise ValueError(f"{source}: label values {bad} are not foreground values in 1..{LABEL_MAX}")
    masks = np.stack([label_array == v for v in wanted])
    empty = [v for v, m in zip(wanted, masks, strict=True) if not m.any()]
    if empty:
        present = sorted(int(v) for v in np.unique(label_array) if v != 0)
        raise ValueError(
            f"{source}: label value(s) {empty} have no voxel on the canonical grid (present: {present}); "
            "the class is absent from this reference or thinner than the target spacing"
        )
    return masks


def reference_tensors(
    image: sitk.Image,
    label: sitk.Image,
    labels: Sequence[int],
    modality: str,
    params: PreprocessParams | Mapping[str, Any],
    *,
    roi_size: int | Sequence[int] | None = 128,
    source: str = "reference",
) -> tuple[Tensor, Tensor]:
    """Raw reference scan + label map → (image (1, 1, d, h, w), masks (1, K, d, h, w)) ready to encode
    (or to tune on).

    With ``roi_size`` the pair is cut to one window centred on the union bounding box of the requested
    classes (:func:`~iris_pipelines.inference.strategies.crop_reference`), or kept whole when the volume
    fits in it: the task encoder then sees the structures with the amount of context it was trained on.
    Classes too far apart for one window are refused with their names; :func:`reference_task` encodes
    each class in its own window instead. ``None`` keeps the whole volume.
    """
    volume = prepare_image(image, modality, params, source=source)
    label_array = prepare_label(label, volume, source=source)
    masks = torch.from_numpy(class_masks(label_array, labels, source=source))[None].float()
    tensor = volume.tensor()
    if roi_size is None:
        return tensor, masks
    cropped_image, cropped_masks = crop_reference(tensor, masks, roi_size)
    cut = [int(v) for v, m in zip(labels, cropped_masks[0], strict=True) if not bool(m.any())]
    if cut:
        raise ValueError(
            f"{source}: label value(s) {cut} lie outside the {roi_size}-voxel window around the other "
            "classes; encode each class in its own window (reference_task) or pass roi_size=None"
        )
    return cropped_image, cropped_masks


def reference_task(
    model: Iris,
    image: sitk.Image,
    label: sitk.Image,
    labels: Sequence[int],
    modality: str,
    params: PreprocessParams | Mapping[str, Any],
    *,
    roi_size: int | Sequence[int] | None = 128,
    source: str = "reference",
) -> Tensor:
    """T (1, K, m+1, C) of a raw reference, each class encoded from a window centred on it (as
    ``embed_tasks``, ``evaluate`` and ``iris segment`` do); ``roi_size=None`` encodes the whole volume."""
    ref_image, ref_masks = reference_tensors(
        image, label, labels, modality, params, roi_size=None, source=source
    )
    if roi_size is None:
        return encode_reference(model, ref_image, ref_masks)
    one_per_class = (ref_masks[:, k : k + 1] for k in range(ref_masks.shape[1]))
    return encode_class_windows(model, ref_image, one_per_class, roi_size)


@dataclass(frozen=True)
class ScanSegmentation:
    """A prediction on the scan's own grid (size, spacing, origin, direction).

    ``labels`` is the uint8 label map. ``probabilities``, when asked for, is a float32 4-D image (x, y, z,
    K) on the same grid: along its fourth axis, class k's foreground probability (an independent sigmoid,
    so classes may overlap), in the order of the label values.
    """

    labels: sitk.Image
    probabilities: sitk.Image | None = None


@torch.no_grad()
def predict_logits(
    volume: CanonicalVolume,
    predict: VolumePredictor,
    labels: Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Canonical-grid logits (1, K, D, H, W) where ``predict`` left them, their shape checked."""
    logits = predict(volume.tensor(device))
    expected = (1, len(labels), *volume.array.shape)
    if tuple(logits.shape) != expected:
        raise ValueError(f"predict returned logits of shape {tuple(logits.shape)}, expected {expected}")
    return logits


def predict_label_array(
    volume: CanonicalVolume,
    predict: VolumePredictor,
    labels: Sequence[int],
    *,
    threshold: float = 0.5,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Canonical-grid int32 label map [z, y, x]: ``predict`` then ``logits_to_labels``.

    For metrics on the preprocessed grid, where the evaluation episodes' ground truth lives.
    """
    logits = predict_logits(volume, predict, labels, device=device)
    return logits_to_labels(logits, labels, threshold).cpu().numpy()


def label_map_logits(label_map: np.ndarray, labels: Sequence[int]) -> Tensor:
    """Certain logits (1, K, D, H, W) of a canonical label map [z, y, x]: +big inside class k, -big outside.

    So a label map (a baseline's, say) is exported by :func:`to_original_grid` exactly as a prediction is:
    its boundaries interpolated onto the scan's grid rather than copied in blocks of the canonical spacing.
    """
    values = torch.as_tensor([int(v) for v in labels]).view(-1, 1, 1, 1)
    inside = torch.from_numpy(np.asarray(label_map).astype(np.int64))[None] == values
    return torch.where(inside, _CERTAIN_LOGIT, -_CERTAIN_LOGIT).to(torch.float32)[None]


def to_original_grid(
    logits: Tensor,
    volume: CanonicalVolume,
    labels: Sequence[int],
    *,
    threshold: float = 0.5,
    probabilities: bool = False,
) -> ScanSegmentation:
    """Canonical logits (1, K, D, H, W) → label map (and probabilities) on the scan's original grid.

    Each class's logits are linearly interpolated onto the scan's grid and the label map is decided there
    (as :func:`~iris_pipelines.inference.strategies.logits_to_labels` decides it), as nnU-Net exports its
    soft predictions before the argmax: a scan finer than the model's grid gets boundaries at its own
    resolution instead of nearest-neighbour blocks of the canonical spacing. Class by class with a running
    maximum, so three scan-sized arrays are held (plus the K probability volumes when asked for).
    """
    if logits.dim() != 5 or tuple(logits.shape[1:]) != (len(labels), *volume.array.shape):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match {len(labels)} label values on the canonical "
            f"volume {tuple(volume.array.shape)}"
        )
    values = np.asarray([int(v) for v in labels])
    if values.size and (values.min() < 1 or values.max() > LABEL_MAX):
        raise ValueError(f"label values must lie in 1..{LABEL_MAX} to be written as a uint8 label map")
    cut = logit_cut(threshold)
    size_x, size_y, size_z = volume.original.size
    best = np.full((size_z, size_y, size_x), -_CERTAIN_LOGIT, dtype=np.float32)
    winner = np.zeros(best.shape, dtype=np.uint8)
    soft = np.empty((len(values), *best.shape), dtype=np.float32) if probabilities else None
    whole = (slice(0, size_z), slice(0, size_y), slice(0, size_x))
    for index in range(len(values)):
        class_logits = logits[0, index].detach().to("cpu", torch.float32).numpy()
        # Without probabilities only the scan voxels where this class can pass the cut matter: a class is
        # resampled over its own box, not the whole scan (docs/benchmarks.md: 15 organs of a CT in 2.0 s,
        # one class over the whole scan in 3.7 s).
        region = whole if soft is not None else _region_above(class_logits > cut, volume)
        if region is None:
            continue  # nowhere above the cut: it cannot win a voxel
        on_region = _resample_region(class_logits, volume, region)
        ahead = on_region > best[region]  # strict: on a tie the earlier class wins, as torch's max does
        winner[region][ahead] = index
        np.maximum(best[region], on_region, out=best[region])
        if soft is not None:
            torch.sigmoid(torch.from_numpy(on_region), out=torch.from_numpy(soft[index]))
    label_array = np.where(best > cut, values.astype(np.uint8)[winner], np.uint8(0))
    label_image = volume.original.apply_to(sitk.GetImageFromArray(label_array))
    return ScanSegmentation(label_image, None if soft is None else _class_stack(soft, volume.original))


Box = tuple[slice, slice, slice]
"""A box of a [z, y, x] array."""


def _region_above(above: np.ndarray, volume: CanonicalVolume) -> Box | None:
    """The box of the scan's grid where logits interpolated from canonical voxels ``above`` the cut can
    pass it: the canonical box of those voxels, grown by one voxel (the interpolation's reach) and half a
    voxel (to its outer faces), mapped through world space onto the scan's index grid. None when no voxel
    is above."""
    if not above.any():
        return None
    ranges = []
    for axis in (2, 1, 0):  # x, y, z of the [z, y, x] array
        present = np.flatnonzero(above.any(axis=tuple(a for a in range(3) if a != axis)))
        ranges.append((present[0] - 1.5, present[-1] + 1.5))
    corners = np.array(np.meshgrid(*ranges, indexing="ij")).reshape(3, -1).T
    on_scan = volume.original.world_to_index(volume.grid.index_to_world(corners))
    last = np.asarray(volume.original.size) - 1
    start = np.clip(np.floor(on_scan.min(axis=0)).astype(int), 0, last)
    stop = np.clip(np.ceil(on_scan.max(axis=0)).astype(int), 0, last) + 1
    z, y, x = (slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1], strict=True))
    return z, y, x


def _resample_region(class_logits: np.ndarray, volume: CanonicalVolume, box: Box) -> np.ndarray:
    """One class's canonical logits linearly interpolated onto ``box`` of the scan's grid."""
    original = volume.original
    start = original.index_to_world(np.array([[box[2].start, box[1].start, box[0].start]], dtype=float))[0]
    size = (box[2].stop - box[2].start, box[1].stop - box[1].start, box[0].stop - box[0].start)
    target = Geometry(size, original.spacing, tuple(start), original.direction)
    canonical = volume.grid.apply_to(sitk.GetImageFromArray(class_logits))
    # The canonical grid covers the scan's voxel box, so the fill value is never used.
    resampled = resample_to_geometry(canonical, target, is_label=False, default_value=-_CERTAIN_LOGIT)
    return sitk.GetArrayFromImage(resampled)


def _class_stack(stack: np.ndarray, geometry: Geometry) -> sitk.Image:
    """(K, z, y, x) arrays → a 4-D image (x, y, z, K) whose first three axes are ``geometry``'s grid."""
    image = sitk.GetImageFromArray(stack, isVector=False)
    direction = np.eye(4)
    direction[:3, :3] = np.asarray(geometry.direction).reshape(3, 3)
    image.SetSpacing((*geometry.spacing, 1.0))
    image.SetOrigin((*geometry.origin, 0.0))
    image.SetDirection(tuple(direction.ravel()))
    return image


def segment_volume(
    image: sitk.Image,
    predict: VolumePredictor,
    labels: Sequence[int],
    *,
    modality: str,
    params: PreprocessParams | Mapping[str, Any],
    threshold: float = 0.5,
    probabilities: bool = False,
    device: torch.device | str | None = None,
    source: str = "<in-memory image>",
    adjust_logits: Callable[[CanonicalVolume, Tensor], Tensor] | None = None,
) -> ScanSegmentation:
    """Segment a raw scan: canonical preprocessing → ``predict`` → label map on the scan's own grid.

    Args:
        image: the raw scan, any orientation, spacing and direction.
        predict: canonical volume (1, 1, D, H, W) → logits (1, K, D, H, W), typically
            ``volume_predictor(model, task, roi_size=128)``.
        labels: the label value written for each of the K class slots.
        modality: ``CT``, ``MR`` or ``PET`` (selects the intensity normalisation).
        params: ``params:preprocess`` (or :class:`PreprocessParams`) the model was trained with.
        threshold: foreground probability cut (sigmoid > threshold, then argmax over classes).
        probabilities: also return each class's probability on the scan's grid.
        device: where the canonical volume is placed before ``predict``.
        adjust_logits: applied to the canonical volume and ``predict``'s logits before they go back onto
            the scan's grid (``iris segment --strategy checked`` puts registered classes there).

    Returns:
        The uint8 label map with ``image``'s size, spacing, origin and direction (and the probabilities).
    """
    volume = prepare_image(image, modality, params, source=source)
    logits = predict_logits(volume, predict, labels, device=device)
    if adjust_logits is not None:
        logits = adjust_logits(volume, logits)
    return to_original_grid(logits, volume, labels, threshold=threshold, probabilities=probabilities)
