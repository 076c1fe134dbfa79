"""Iris in-context 3-D medical image segmentation as a Kedro project."""

import warnings

__version__ = "0.1.0"

# OmegaConf deprecated register_new_resolver, which Kedro and kedro-mlflow (pinned in requirements.lock)
# still call on every config load: three warnings per `kedro run` or `iris review` that no user can act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)
