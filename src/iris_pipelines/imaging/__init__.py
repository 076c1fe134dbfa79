"""Scan geometry, I/O, resampling and intensity handling; no Kedro, so any layer can use it."""

from iris_pipelines.imaging.errors import InvalidInputError
from iris_pipelines.imaging.geometry import IDENTITY_DIRECTION, Geometry
from iris_pipelines.imaging.io import detect_format, file_sha256, read_image, write_dicom_series, write_image
from iris_pipelines.imaging.metrics import (
    MaskMetrics,
    label_map_metrics,
    mask_metrics,
    spacing_from_image,
    summarize_metrics,
)
from iris_pipelines.imaging.normalize import normalize_in_place, normalize_intensity
from iris_pipelines.imaging.registration import (
    RegistrationConfig,
    RegistrationError,
    RegistrationResult,
    array_to_image,
    paste_label,
    propagate_label,
    register_images,
    registration_baseline,
)
from iris_pipelines.imaging.resample import (
    canonical_geometry,
    resample_to_geometry,
    restore_geometry,
    to_canonical,
)
from iris_pipelines.imaging.stats import class_statistics

__all__ = [
    "IDENTITY_DIRECTION",
    "Geometry",
    "InvalidInputError",
    "canonical_geometry",
    "class_statistics",
    "detect_format",
    "file_sha256",
    "normalize_in_place",
    "normalize_intensity",
    "read_image",
    "resample_to_geometry",
    "restore_geometry",
    "to_canonical",
    "write_dicom_series",
    "write_image",
    "MaskMetrics",
    "label_map_metrics",
    "mask_metrics",
    "spacing_from_image",
    "summarize_metrics",
    "RegistrationConfig",
    "RegistrationError",
    "RegistrationResult",
    "array_to_image",
    "paste_label",
    "propagate_label",
    "register_images",
    "registration_baseline",
]
