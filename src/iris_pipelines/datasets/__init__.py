"""Kedro datasets the project needs that kedro-datasets lacks."""

from iris_pipelines.datasets.medical_image_dataset import MedicalImageDataset
from iris_pipelines.datasets.model_bundle_dataset import IrisModelBundleDataset

__all__ = ["IrisModelBundleDataset", "MedicalImageDataset"]
