"""The MLflow pyfunc face of a trained Iris model, logged as *models from code*.

``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"bundle": <bundle dir>})`` stores this
source file instead of a cloudpickle of a model object, and the weights travel as the safetensors bundle,
so loading a registered version executes no pickle (DESIGN.md, "Model artifacts"). Then
``mlflow.pyfunc.load_model("models:/iris/<version>").predict({...})`` segments a query given reference
image/mask pairs: one pair one-shot (:func:`segment_one_shot`), several (lists of arrays) by their per-class
context ensemble (:func:`segment_with_references`), as ``evaluate``'s ``ensemble`` builds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ParamSchema, ParamSpec

from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.inference.device import resolve_device
from iris_pipelines.inference.strategies import (
    context_ensemble,
    encode_class_windows,
    logit_cut,
    logits_to_labels,
)
from iris_pipelines.mlflow_warnings import without_type_hint_warning
from iris_pipelines.model import Iris

_REQUIRED = ("query", "reference_image", "reference_mask")

# Inputs are 3-D arrays of any size, which MLflow's column/tensor schemas cannot state with an optional
# ``classes``; they are checked in ``predict``. The params schema is what lets ``threshold`` through.
SIGNATURE = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("threshold", "double", 0.5)]))
# Logged with the model (its MLmodel file shows it); ``load_model(uri, model_config={"device": "cpu"})``
# overrides it where the model is loaded.
MODEL_CONFIG = {"device": "auto"}


def _as_request(model_input: Any) -> dict[str, Any]:
    """A dict, or the one-row DataFrame MLflow's serving layer builds from it."""
    if isinstance(model_input, dict):
        request = dict(model_input)
    elif hasattr(model_input, "iloc") and hasattr(model_input, "columns"):
        if len(model_input) != 1:
            raise ValueError(
                f"Iris pyfunc segments one query per call; got a DataFrame of {len(model_input)} rows"
            )
        request = {column: model_input[column].iloc[0] for column in model_input.columns}
    else:
        raise TypeError(
            f"model_input must be a dict or a one-row DataFrame, got {type(model_input).__name__}"
        )
    missing = [key for key in _REQUIRED if key not in request]
    if missing:
        raise ValueError(f"model_input lacks {missing}; required: {list(_REQUIRED)}, optional: ['classes']")
    return request


def _volume(name: str, value: Any) -> np.ndarray:
    """A non-empty 3-D array with finite values, contiguous (torch refuses flipped numpy views)."""
    array = np.asarray(value)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty 3-D array [z, y, x], got shape {array.shape}")
    if array.dtype.kind not in "biuf":  # bool, integers, floats
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} has {bad} NaN or infinite voxel(s)")
    return np.ascontiguousarray(array)


def _image(name: str, value: Any) -> np.ndarray:
    return _volume(name, value).astype(np.float32, copy=False)


def _label_map(name: str, value: Any) -> np.ndarray:
    """Whole-number label values: 2.6 or a soft 0.6 is refused, not truncated to another class."""
    array = _volume(name, value)
    fractions = array[array != np.rint(array)] if np.issubdtype(array.dtype, np.floating) else array[:0]
    if fractions.size:
        raise ValueError(
            f"{name} must hold whole-number label values, got {fractions.size} such as {fractions[0]}"
        )
    if array.min() < 0:
        raise ValueError(f"{name} has negative label values (min {array.min()})")
    return array.astype(np.int64, copy=False)


def _requested_classes(value: Any) -> list[Any] | None:
    """The ``classes`` of a request as a list; None (every foreground label) when absent. A DataFrame
    request whose ``classes`` cell is empty holds a scalar NaN (or pd.NA) there, which also means absent."""
    if value is None or (np.ndim(value) == 0 and pd.isna(value)):
        return None
    return list(np.asarray(value).ravel())


def _is_whole_number(value: Any) -> bool:
    """1, 1.0, np.int64(1): yes; 1.5, NaN, inf, None, "a": no (each would otherwise fail inside int())."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number == int(number)


def _classes(reference_mask: np.ndarray, classes: Sequence[int] | None) -> list[int]:
    """The label values to segment: those asked for, else every foreground label of the reference."""
    if classes is None or len(classes) == 0:
        found = [int(v) for v in np.unique(reference_mask) if v != 0]
        if not found:
            raise ValueError("reference_mask has no foreground label; nothing to segment")
        return found
    if not all(_is_whole_number(c) for c in classes):
        raise ValueError(f"classes {list(classes)} must be whole label values")
    # Each label once: a repeated one would be encoded and decoded again for the same label map.
    wanted = list(dict.fromkeys(int(c) for c in classes))
    absent = sorted(set(wanted) - {int(v) for v in np.unique(reference_mask)})
    if 0 in wanted or absent:
        raise ValueError(
            f"classes {wanted}: label(s) {sorted(set(absent) | ({0} & set(wanted)))} are "
            "background or absent from reference_mask"
        )
    return wanted


@torch.no_grad()
def segment_one_shot(
    model: Iris,
    query: np.ndarray,
    reference_image: np.ndarray,
    reference_mask: np.ndarray,
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
    window: Sequence[int] | None = None,
) -> np.ndarray:
    """Label map on the query's grid: the argmax class where its sigmoid > threshold, else 0, decided as
    ``evaluate`` and ``iris segment`` decide it (``logits_to_labels``: a threshold outside (0, 1) is refused).

    With ``window`` (the bundle's training crop) this is the protocol ``evaluate`` scores and ``iris
    segment`` runs: each class encoded from a window centred on it, the query segmented in overlapping
    windows. Without it, both whole volumes go through the network at once.
    """
    logit_cut(threshold)  # a threshold outside (0, 1) is refused before the network runs, not after
    query = _image("query", query)
    reference_image = _image("reference_image", reference_image)
    reference_mask = _label_map("reference_mask", reference_mask)
    if reference_mask.shape != reference_image.shape:
        raise ValueError(
            f"reference_mask {reference_mask.shape} must match reference_image {reference_image.shape}"
        )
    labels = _classes(reference_mask, classes)
    device = next(model.parameters()).device
    ref = torch.from_numpy(reference_image)[None, None].to(device)
    one_per_class = (torch.from_numpy(reference_mask == c)[None, None].float().to(device) for c in labels)
    volume = torch.from_numpy(query)[None, None].to(device)
    task = _encode(model, ref, one_per_class, window)
    return _labels(model, volume, task, labels, threshold, window)


def _encode(
    model: Iris, ref: torch.Tensor, one_per_class: Iterable[torch.Tensor], window: Sequence[int] | None
) -> torch.Tensor:
    """T (1, K, m+1, C) of one reference: per class window, or the whole volume when ``window`` is None."""
    if window is None:
        return model.encode_task(ref, torch.cat(list(one_per_class), dim=1))
    return encode_class_windows(model, ref, one_per_class, window)


def _labels(
    model: Iris,
    volume: torch.Tensor,
    task: torch.Tensor,
    labels: Sequence[int],
    threshold: float,
    window: Sequence[int] | None,
) -> np.ndarray:
    """The query's label map under ``task``: in overlapping windows, or whole when ``window`` is None."""
    if window is None:
        logits = model.segment(volume, task)
    else:
        from iris_pipelines.inference.sliding_window import sliding_window_segment  # MONAI, not at import

        logits = sliding_window_segment(model, volume, task, roi_size=window)
    return logits_to_labels(logits.float(), labels, threshold).cpu().numpy()


def _is_several(value: Any) -> bool:
    """A list (tuple, or 1-D object array, as a DataFrame cell may hold) of reference arrays, rather than one
    3-D array, which may itself arrive as nested lists (JSON): an empty list, or one holding a 3-D item."""
    if isinstance(value, np.ndarray):
        if value.dtype != object or value.ndim != 1:
            return False
    elif not isinstance(value, (list, tuple)):
        return False
    return len(value) == 0 or any(_ndim(item) == 3 for item in value)


def _ndim(value: Any) -> int:
    try:
        return int(np.ndim(value))
    except ValueError:  # ragged nested lists
        return -1


def _reference_lists(reference_image: Any, reference_mask: Any) -> tuple[list[Any], list[Any]] | None:
    """The reference pairs as two equal-length lists, or None for one pair given as two arrays."""
    several = (_is_several(reference_image), _is_several(reference_mask))
    if several == (False, False):
        return None
    if several != (True, True):
        raise ValueError(
            "reference_image and reference_mask must both be single 3-D arrays (one pair) or both lists "
            f"of 3-D arrays (one per pair); got reference_image as {'a list' if several[0] else 'an array'} "
            f"and reference_mask as {'a list' if several[1] else 'an array'}"
        )
    images, masks = list(reference_image), list(reference_mask)
    if len(images) != len(masks):
        raise ValueError(
            f"reference_image holds {len(images)} image(s) but reference_mask {len(masks)} mask(s); "
            "give one mask per reference image"
        )
    if not images:
        raise ValueError(
            "reference_image and reference_mask are empty lists; give at least one reference pair"
        )
    return images, masks


def _ensemble_classes(masks: Sequence[np.ndarray], classes: Sequence[int] | None) -> list[int]:
    """The label values to segment: those asked for (each held by some reference), else every foreground
    label of any reference, in ascending order."""
    held = [{int(v) for v in np.unique(mask)} - {0} for mask in masks]
    if classes is None or len(classes) == 0:
        found = sorted(set().union(*held))
        if not found:
            raise ValueError(
                f"none of the {len(masks)} reference masks has a foreground label; nothing to segment"
            )
        return found
    if not all(_is_whole_number(c) for c in classes):
        raise ValueError(f"classes {list(classes)} must be whole label values")
    wanted = list(dict.fromkeys(int(c) for c in classes))
    if 0 in wanted:
        raise ValueError(f"classes {wanted}: label 0 is background")
    for label in wanted:
        if not any(label in labels for labels in held):
            raise ValueError(f"class {label}: none of the {len(masks)} references holds it")
    return wanted


@torch.no_grad()
def segment_with_references(
    model: Iris,
    query: np.ndarray,
    reference_images: Sequence[np.ndarray],
    reference_masks: Sequence[np.ndarray],
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
    window: Sequence[int] | None = None,
) -> np.ndarray:
    """:func:`segment_one_shot` with several reference pairs, each on its own grid: the task embedding is
    the per-class context ensemble (``context_ensemble`` with its ``valid`` table) over the references that
    hold the class, as ``evaluate``'s ``ensemble`` and ``iris segment --strategy ensemble`` build it.

    Each reference's classes are encoded as one reference's are (per class window, or whole with ``window``
    None). ``classes`` defaults to the union of the references' foreground labels; a class asked for must
    be in at least one reference.
    """
    logit_cut(threshold)
    if len(reference_images) != len(reference_masks) or not reference_images:
        raise ValueError(
            f"segment_with_references needs as many reference masks as images, at least one; got "
            f"{len(reference_images)} image(s) and {len(reference_masks)} mask(s)"
        )
    query = _image("query", query)
    images, masks = [], []
    for index, (image, mask) in enumerate(zip(reference_images, reference_masks, strict=True)):
        images.append(_image(f"reference_image[{index}]", image))
        masks.append(_label_map(f"reference_mask[{index}]", mask))
        if masks[-1].shape != images[-1].shape:
            raise ValueError(
                f"reference pair {index}: reference_mask[{index}] {masks[-1].shape} must match "
                f"reference_image[{index}] {images[-1].shape}"
            )
    labels = _ensemble_classes(masks, classes)
    device = next(model.parameters()).device
    encoded, holds = [], []
    for image, mask in zip(images, masks, strict=True):
        present = [c for c in labels if bool((mask == c).any())]
        if not present:  # a reference holding none of the classes adds nothing to any mean (evaluate: usable)
            continue
        ref = torch.from_numpy(image)[None, None].to(device)
        one_per_class = (torch.from_numpy(mask == c)[None, None].float().to(device) for c in present)
        encoded.append(_encode(model, ref, one_per_class, window))
        holds.append([labels.index(c) for c in present])
    pool = torch.zeros(
        (len(encoded), len(labels), *encoded[0].shape[2:]), dtype=encoded[0].dtype, device=device
    )
    valid = torch.zeros((len(encoded), len(labels)), dtype=torch.bool, device=device)
    for row, (embedding, slots) in enumerate(zip(encoded, holds, strict=True)):
        pool[row, slots] = embedding[0]
        valid[row, slots] = True
    task = context_ensemble(pool, valid)
    volume = torch.from_numpy(query)[None, None].to(device)
    return _labels(model, volume, task, labels, threshold, window)


# model_input has no type hint on purpose (see predict): MLflow would warn about it in every `kedro run`.
with without_type_hint_warning():

    class IrisPyfuncModel(PythonModel):
        """In-context Iris segmentation:
        ``predict({"query", "reference_image", "reference_mask"[, "classes"]})``.

        One reference pair (two 3-D arrays) segments one-shot. Several pairs (``reference_image`` and
        ``reference_mask`` each a list of 3-D arrays, of equal length; each pair on its own grid) segment
        with their per-class context ensemble: a class's embedding is the mean over the references that
        hold it, as ``evaluate``'s ``ensemble`` builds it. ``classes`` defaults to every foreground
        label of the reference(s); each class asked for must be in at least one reference.

        Arrays are on the preprocessed grid (as the ``preprocessed_manifest`` arrays), of any size: each
        class is encoded from a window of the training crop's size centred on it, and the query is
        segmented in overlapping windows of that size, as ``evaluate`` and ``iris segment`` do. A one-row
        DataFrame request works too (a cell may hold a list of arrays); one query per call.
        ``params={"threshold": 0.5}`` sets the foreground probability cut. The network runs on
        ``model_config["device"]``: ``auto`` (the first GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        """

        def load_context(self, context: PythonModelContext) -> None:
            device = resolve_device(str({**MODEL_CONFIG, **(context.model_config or {})}["device"]))
            self.bundle = ModelBundle.load(context.artifacts["bundle"])
            self.model = self.bundle.build_model().to(device)

        # No annotation on model_input: MLflow would try to derive an input schema from it.
        def predict(self, context: PythonModelContext, model_input, params: dict[str, Any] | None = None):
            request = _as_request(model_input)
            several = _reference_lists(request["reference_image"], request["reference_mask"])
            segment = segment_one_shot if several is None else segment_with_references
            images, masks = several or (request["reference_image"], request["reference_mask"])
            return segment(
                self.model,
                request["query"],
                images,
                masks,
                classes=_requested_classes(request.get("classes")),
                threshold=float((params or {}).get("threshold", 0.5)),
                window=self.bundle.inference_window(),
            )


mlflow.models.set_model(IrisPyfuncModel())
