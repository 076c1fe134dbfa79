"""Kedro project settings."""

import os
from pathlib import Path

from kedro.config import OmegaConfigLoader

from iris_pipelines.hooks import (
    FailedStartHooks,
    InputVersionHooks,
    InterruptedRunHooks,
    MissingEnvironmentVariable,
    ProjectRootHooks,
    ProvenanceHooks,
    TrackingServerHooks,
)
from iris_pipelines.mlflow_warnings import without_type_hint_warning
from iris_pipelines.sqlite_store import absolute_sqlite_uri

# kedro-mlflow's `kedro mlflow` commands import its KedroPipelineModel, whose missing type hints MLflow warned
# about in every kedro command; Kedro imports these settings first, so the class is created quietly here.
with without_type_hint_warning():
    import kedro_mlflow.mlflow  # noqa: F401

HOOKS = (
    ProjectRootHooks(),  # its after_context_created wraps the others: first, wherever it stands
    TrackingServerHooks(),
    ProvenanceHooks(),
    InputVersionHooks(),
    InterruptedRunHooks(),
    FailedStartHooks(),  # a hook wrapper: its place in the tuple does not matter
)


def required_env(name: str) -> str:
    """``${required_env:NAME}``: the variable's value, or a message that says what to export. Without it,
    kedro-mlflow would fall back to ./mlruns, which MLflow refuses with an unrelated "maintenance mode"
    error (Kedro allows ``oc.env`` in credentials only)."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise MissingEnvironmentVariable(
            f"the environment variable {name} is not set, and this Kedro env needs it "
            f"(e.g. export {name}=http://mlflow.example.org:5000; see slurm/README.md)"
        )
    return value


def env_or(name: str, default: str) -> str:
    """``${env_or:NAME,'default'}``: the variable's value when it is set (not blank), else ``default``.
    conf/base/mlflow.yml takes ``MLFLOW_TRACKING_URI`` this way, as ``iris review``/``iris segment`` do
    (``registry.tracking_uri``), so that `kedro run` and the iris commands use the same MLflow store.

    A relative SQLite file (``sqlite:///mlflow.db``) comes back absolute, from the current directory:
    ProjectRootHooks has made that the project root before any hook reads mlflow.yml. MLflow caches a
    store per URI string, so the relative URI stayed bound to the first project's file for the rest of the
    process, and a second project's session (a notebook comparing two) wrote its runs there."""
    return absolute_sqlite_uri(os.environ.get(name, "").strip() or default, Path.cwd())


CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # hpcc and test envs only override what differs from base: merge key by key, not file by file.
    "merge_strategy": {"parameters": "soft", "globals": "soft", "mlflow": "soft"},
    "config_patterns": {
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
    },
    "custom_resolvers": {"required_env": required_env, "env_or": env_or},
}
