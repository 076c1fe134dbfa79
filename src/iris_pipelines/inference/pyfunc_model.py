"""The MLflow pyfunc face of a trained Iris model, logged as *models from code*.

``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"bundle": <bundle dir>})`` stores this
source file instead of a cloudpickle of a model object, and the weights travel as the safetensors bundle,
so loading a registered version executes no pickle (DESIGN.md, "Model artifacts"). Then
``mlflow.pyfunc.load_model("models:/iris/<version>").predict({...})`` segments a query one-shot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
from iris_pipelines.inference.strategies import encode_class_windows, logit_cut, logits_to_labels
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
    if window is None:
        task = model.encode_task(ref, torch.cat(list(one_per_class), dim=1))
        logits = model.segment(volume, task)
    else:
        from iris_pipelines.inference.sliding_window import sliding_window_segment  # MONAI, not at import

        task = encode_class_windows(model, ref, one_per_class, window)
        logits = sliding_window_segment(model, volume, task, roi_size=window)
    return logits_to_labels(logits.float(), labels, threshold).cpu().numpy()


# model_input has no type hint on purpose (see predict): MLflow would warn about it in every `kedro run`.
with without_type_hint_warning():

    class IrisPyfuncModel(PythonModel):
        """One-shot Iris segmentation:
        ``predict({"query", "reference_image", "reference_mask"[, "classes"]})``.

        Arrays are on the preprocessed grid (as the ``preprocessed_manifest`` arrays), of any size: each
        class is encoded from a window of the training crop's size centred on it, and the query is
        segmented in overlapping windows of that size, as ``evaluate`` and ``iris segment`` do.
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
            return segment_one_shot(
                self.model,
                request["query"],
                request["reference_image"],
                request["reference_mask"],
                classes=_requested_classes(request.get("classes")),
                threshold=float((params or {}).get("threshold", 0.5)),
                window=self.bundle.inference_window(),
            )


mlflow.models.set_model(IrisPyfuncModel())
