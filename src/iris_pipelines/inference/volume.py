"""Raw scans in, label images out: the full-volume inference path on the scan's own geometry.

A raw SimpleITK image (any orientation, spacing, direction) is brought to the canonical preprocessed grid
by the *same* function the preprocess stage uses (:func:`~iris_pipelines.collection.preprocessing.
canonical_image_array`), so inference sees exactly the grid and intensities training saw. Predictions
are made there and sent back with :func:`~iris_pipelines.imaging.restore_geometry`, so the returned mask
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
from iris_pipelines.imaging.resample import restore_geometry
from iris_pipelines.inference.strategies import crop_reference, encode_reference, logits_to_labels
from iris_pipelines.model import Iris

VolumePredictor = Callable[[Tensor], Tensor]
"""Canonical volume (1, 1, D, H, W) → logits (1, K, D, H, W)."""

_MAX_LABEL = 255  # label maps are uint8, as in preprocessing


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
    errors (:class:`~iris_pipelines.imaging.InvalidInputError` for an unknown modality or NaN voxels).
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
    bad = [v for v in wanted if not 1 <= v <= _MAX_LABEL]
    if bad:
        raise ValueError(f"{source}: label values {bad} are not foreground values in 1..{_MAX_LABEL}")
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
    """Raw reference scan + label map → (image (1, 1, d, h, w), masks (1, K, d, h, w)) ready to encode.

    With ``roi_size`` the pair is cut to a window centred on the union bounding box of the requested
    classes (:func:`~iris_pipelines.inference.strategies.crop_reference`), or kept whole when the volume
    fits in it: the task encoder then sees the structures with the amount of context it was trained on.
    ``None`` keeps the whole volume.
    """
    volume = prepare_image(image, modality, params, source=source)
    label_array = prepare_label(label, volume, source=source)
    masks = torch.from_numpy(class_masks(label_array, labels, source=source))[None].float()
    tensor = volume.tensor()
    if roi_size is None:
        return tensor, masks
    return crop_reference(tensor, masks, roi_size)


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
    """T (1, K, m+1, C) of a raw reference (:func:`reference_tensors` then ``encode_reference``)."""
    ref_image, ref_masks = reference_tensors(
        image, label, labels, modality, params, roi_size=roi_size, source=source
    )
    return encode_reference(model, ref_image, ref_masks)


def to_original_grid(label_array: np.ndarray, volume: CanonicalVolume) -> sitk.Image:
    """A canonical-grid label map [z, y, x] → uint8 label image on the scan's original grid and header."""
    if tuple(label_array.shape) != tuple(volume.array.shape):
        raise ValueError(
            f"label map shape {tuple(label_array.shape)} does not match the canonical volume "
            f"{tuple(volume.array.shape)}"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() > _MAX_LABEL):
        raise ValueError(f"label values must lie in 0..{_MAX_LABEL} to be written as a uint8 label map")
    canonical = volume.grid.apply_to(sitk.GetImageFromArray(label_array.astype(np.uint8)))
    return restore_geometry(canonical, volume.original, is_label=True)


@torch.no_grad()
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
    logits = predict(volume.tensor(device))
    expected = (1, len(labels), *volume.array.shape)
    if tuple(logits.shape) != expected:
        raise ValueError(f"predict returned logits of shape {tuple(logits.shape)}, expected {expected}")
    return logits_to_labels(logits, labels, threshold).cpu().numpy()


def segment_volume(
    image: sitk.Image,
    predict: VolumePredictor,
    labels: Sequence[int],
    *,
    modality: str,
    params: PreprocessParams | Mapping[str, Any],
    threshold: float = 0.5,
    device: torch.device | str | None = None,
    source: str = "<in-memory image>",
) -> sitk.Image:
    """Segment a raw scan: canonical preprocessing → ``predict`` → label map → the scan's own grid.

    Args:
        image: the raw scan, any orientation, spacing and direction.
        predict: canonical volume (1, 1, D, H, W) → logits (1, K, D, H, W), typically
            ``volume_predictor(model, task, roi_size=128)``.
        labels: the label value written for each of the K class slots.
        modality: ``CT``, ``MR`` or ``PET`` (selects the intensity normalisation).
        params: ``params:preprocess`` (or :class:`PreprocessParams`) the model was trained with.
        threshold: foreground probability cut (sigmoid > threshold, then argmax over classes).
        device: where the canonical volume is placed before ``predict``.

    Returns:
        A uint8 label image with ``image``'s size, spacing, origin and direction.
    """
    volume = prepare_image(image, modality, params, source=source)
    label_array = predict_label_array(volume, predict, labels, threshold=threshold, device=device)
    return to_original_grid(label_array, volume)
