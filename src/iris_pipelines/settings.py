"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

from iris_pipelines.hooks import InputVersionHooks, ProvenanceHooks

HOOKS = (ProvenanceHooks(), InputVersionHooks())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # hpcc and test envs only override what differs from base: merge key by key, not file by file.
    "merge_strategy": {"parameters": "soft", "globals": "soft", "mlflow": "soft"},
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
    },
}
