"""The embedded default data: a deterministic collection of labelled 3-D phantom scans (no Kedro).

``generate_collection(root)`` writes CT, MR and PET datasets in MSD, nnU-Net v2 and CSV-manifest layouts
and returns the ingest sources that point at them, so a fresh checkout trains and evaluates end to end
without downloading anything.
"""

from iris_pipelines.phantoms.collection import DatasetSpec, default_specs, generate_collection, render_case

__all__ = ["DatasetSpec", "default_specs", "generate_collection", "render_case"]
