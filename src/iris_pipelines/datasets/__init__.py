"""Kedro datasets the project needs that kedro-datasets lacks."""

from iris_pipelines.datasets.medical_image_dataset import MedicalImageDataset

__all__ = ["MedicalImageDataset"]
