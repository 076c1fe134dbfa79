"""Using a trained Iris: inference strategies, sliding windows, raw-scan segmentation, model bundles.

Modules, lightest first:

* :mod:`.strategies` (torch only): task embeddings by ``one_shot``, ``ensemble``, ``memory_bank``,
  ``retrieval`` and ``tuning``; reference windows; logits → label maps.
* :mod:`.sliding_window` (+ MONAI): Gaussian-blended 128³ windows at 50 % overlap over whole volumes.
* :mod:`.volume` (+ SimpleITK): raw scan → canonical grid → prediction → label image on the scan's grid.
* :mod:`.bundle`: model bundles on disk (safetensors, no pickle).

The MONAI and SimpleITK modules are loaded lazily (PEP 562 ``__getattr__``) so that importing this package
or :mod:`.strategies` needs torch alone, e.g. in GPU benchmarks.

``pyfunc_model`` is not imported here on purpose: it registers itself with ``mlflow.models.set_model``
when imported, which only MLflow's models-from-code loader should trigger.
"""

from __future__ import annotations

import importlib
from typing import Any

from .bundle import BundleError, ModelBundle
from .strategies import (
    SELF_CHECK_DICE,
    STRATEGIES,
    RetrievalResult,
    SegmentFn,
    Strategy,
    TuningResult,
    check_strategy,
    clamp_roi,
    context_ensemble,
    crop_reference,
    encode_class_windows,
    encode_reference,
    encode_references,
    frozen,
    logits_to_labels,
    mask_window,
    memory_bank_gaps,
    memory_bank_task,
    reference_self_dice,
    retrieval_task,
    retrieve_references,
    tune_task_embedding,
)

_LAZY = {
    "sliding_window_logits": "sliding_window",
    "sliding_window_segment": "sliding_window",
    "volume_predictor": "sliding_window",
    "window_predictor": "sliding_window",
    "CanonicalVolume": "volume",
    "class_masks": "volume",
    "label_map_logits": "volume",
    "predict_label_array": "volume",
    "prepare_image": "volume",
    "prepare_label": "volume",
    "reference_task": "volume",
    "reference_tensors": "volume",
    "ScanSegmentation": "volume",
    "predict_logits": "volume",
    "segment_volume": "volume",
    "to_original_grid": "volume",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "SELF_CHECK_DICE",
    "STRATEGIES",
    "BundleError",
    "ModelBundle",
    "RetrievalResult",
    "SegmentFn",
    "Strategy",
    "TuningResult",
    "check_strategy",
    "clamp_roi",
    "context_ensemble",
    "crop_reference",
    "encode_class_windows",
    "encode_reference",
    "encode_references",
    "frozen",
    "logits_to_labels",
    "mask_window",
    "memory_bank_gaps",
    "memory_bank_task",
    "reference_self_dice",
    "retrieval_task",
    "retrieve_references",
    "tune_task_embedding",
    "sliding_window_logits",
    "sliding_window_segment",
    "volume_predictor",
    "window_predictor",
    "CanonicalVolume",
    "ScanSegmentation",
    "class_masks",
    "label_map_logits",
    "predict_label_array",
    "predict_logits",
    "prepare_image",
    "prepare_label",
    "reference_task",
    "reference_tensors",
    "segment_volume",
    "to_original_grid",
]
