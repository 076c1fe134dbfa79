"""Makes a Python process look like the lent GPU machine's image: these packages are absent there.

Put this folder on PYTHONPATH and Python imports it at start-up (``site`` runs ``sitecustomize``), in
every subprocess too. The list is what the project installs and the GPU image lacks (torch, numpy,
pandas, timm, safetensors, tqdm, rich and psutil are there), as the device tool's package list read on
2026-11-17.
"""

import importlib.util
import sys

BLOCKED = {
    "kedro", "kedro_datasets", "kedro_viz", "kedro_mlflow", "mlflow", "monai", "SimpleITK", "nibabel",
    "pytorch_optimizer", "dask", "distributed", "submitit", "plotly", "openTSNE",
}  # fmt: skip


class _Block:
    """First on the meta path: an import of a blocked package fails as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        # Anything else falls through (None) to the real finders.
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)


sys.meta_path.insert(0, _Block())
# Libraries probe for optional packages with find_spec: absent means None there, not an error.
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in BLOCKED else _find_spec(name, package)
)
