"""Kedro datasets the project needs that kedro-datasets lacks, and its file datasets saved atomically."""

from iris_pipelines.datasets.atomic import (
    AtomicCSVDataset,
    AtomicHTMLDataset,
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
    AtomicTextDataset,
)
from iris_pipelines.datasets.medical_image_dataset import MedicalImageDataset
from iris_pipelines.datasets.model_bundle_dataset import IrisModelBundleDataset

__all__ = [
    "AtomicCSVDataset",
    "AtomicHTMLDataset",
    "AtomicJSONDataset",
    "AtomicMatplotlibDataset",
    "AtomicParquetDataset",
    "AtomicTextDataset",
    "IrisModelBundleDataset",
    "MedicalImageDataset",
]
