"""Iris in-context 3-D medical image segmentation as a Kedro project."""

__version__ = "0.1.0"
