"""Using a trained Iris: model bundles on disk and the MLflow pyfunc wrapper.

``pyfunc_model`` is not imported here on purpose: it registers itself with ``mlflow.models.set_model``
when imported, which only MLflow's models-from-code loader should trigger.
"""

from .bundle import BundleError, ModelBundle

__all__ = ["BundleError", "ModelBundle"]
