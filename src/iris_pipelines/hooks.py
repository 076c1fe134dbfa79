"""Provenance for every run: git commit, dirty flag, lock file, Kedro env and the versions of the inputs.

A node sees loaded data, never the dataset or its version, but a reproducibility review needs the exact
``episode_index`` / ``preprocessed_manifest`` versions behind a registered model. Kedro hands
``before_node_run`` the catalog, so ``InputVersionHooks`` tags the run kedro-mlflow opened with
``input_version.<dataset>`` for every versioned input; ``register_model`` copies these onto the model version.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)

LOCK_FILE = "requirements.lock"


def git_state(project_path: Path) -> dict[str, str]:
    """The commit and whether the work tree differs from it; 'unknown' outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=project_path, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    # Untracked files count: a new source file never committed changes what runs. Data, the venv and the
    # MLflow store are git-ignored. A status that fails or times out (a slow NFS) is not "clean".
    changes = git("status", "--porcelain")
    return {"git_commit": commit, "git_dirty": "unknown" if changes is None else str(bool(changes)).lower()}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance_tags(project_path: Path, env: str | None) -> dict[str, str]:
    tags = git_state(project_path)
    tags["kedro_env"] = env or "local"
    lock = project_path / LOCK_FILE
    tags["lockfile_sha256"] = file_sha256(lock) if lock.exists() else "missing"
    return tags


class ProvenanceHooks:
    """Tags the MLflow run that kedro-mlflow opened and logs the lock file next to it.

    Pluggy calls plugin hooks (registered after the project's) first, so kedro-mlflow's run is active here.
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        if mlflow.active_run() is None:
            return
        # Kedro puts the project path and the env (None for the default) in every run's params.
        project_path = Path(run_params["project_path"])
        tags = provenance_tags(project_path, run_params.get("env"))
        mlflow.set_tags(tags)
        lock = project_path / LOCK_FILE
        if lock.exists():
            mlflow.log_artifact(str(lock), artifact_path="environment")
        logger.info(
            "MLflow run %s: commit %s (dirty=%s)",
            mlflow.active_run().info.run_id,
            tags["git_commit"][:12],
            tags["git_dirty"],
        )


class ProjectRootHooks:
    """Runs the project from its root, wherever ``kedro run`` was started.

    Kedro finds the project from a subfolder and anchors the catalog's paths at its root, but relative
    paths in parameters (``preprocess.output_dir``, ``train.checkpoint_root``, ``phantoms.root``) and
    mlflow.yml's ``sqlite:///mlflow.db`` follow the current folder: a run from ``notebooks/`` wrote its
    volumes, checkpoints and a second MLflow store there, and missed the caches and checkpoints.
    ``tryfirst``: before kedro-mlflow's own ``after_context_created`` opens the tracking store.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        root = Path(context.project_path).resolve()
        if Path.cwd().resolve() != root:
            logger.warning("Running from the project root %s (started in %s)", root, Path.cwd())
            os.chdir(root)


INPUT_VERSION_TAG_PREFIX = "input_version."


def resolved_load_version(catalog: Any, dataset_name: str) -> str | None:
    """The concrete version Kedro loads for ``dataset_name`` (latest resolved), or None if unversioned."""
    if dataset_name.startswith("params:") or dataset_name == "parameters":
        return None
    try:
        dataset = catalog.get(dataset_name)
    except Exception:  # a catalog that cannot build the entry has nothing to tell us  # noqa: BLE001
        return None
    resolve = getattr(dataset, "resolve_load_version", None)
    if resolve is None:
        return None
    try:
        return resolve()
    except Exception:  # noqa: BLE001 - e.g. no version exists yet; the load itself will report it
        return None


class InputVersionHooks:
    """Tags the active MLflow run with the load version of every versioned node input.

    ``versions`` holds what the current pipeline run already tagged, so each input is tagged once per run.
    """

    def __init__(self) -> None:
        self.versions: dict[str, str] = {}

    @hook_impl
    def before_pipeline_run(self) -> None:
        # settings.py builds one instance per process: a second run in it (a notebook's %reload_kedro, a
        # script looping over sessions) opens a new MLflow run that must get every tag again.
        self.versions = {}

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any) -> None:
        new = {}
        for name in node.inputs:
            version = resolved_load_version(catalog, name)
            if version is not None and self.versions.get(name) != version:
                new[name] = version
        if not new:
            return
        self.versions.update(new)
        if mlflow.active_run() is not None:
            mlflow.set_tags({f"{INPUT_VERSION_TAG_PREFIX}{name}": version for name, version in new.items()})
        logger.info("Input dataset versions: %s", new)
