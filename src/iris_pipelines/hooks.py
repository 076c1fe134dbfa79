"""Provenance for every run: git commit, dirty flag, lock file and Kedro env go to the MLflow run."""

from __future__ import annotations

import hashlib
import logging
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
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


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
    def after_context_created(self, context: Any) -> None:
        self._project_path = Path(context.project_path)
        self._env = context.env

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        if mlflow.active_run() is None:
            return
        project_path = Path(run_params.get("project_path") or getattr(self, "_project_path", Path.cwd()))
        tags = provenance_tags(project_path, run_params.get("env") or getattr(self, "_env", None))
        mlflow.set_tags(tags)
        lock = project_path / LOCK_FILE
        if lock.exists():
            mlflow.log_artifact(str(lock), artifact_path="environment")
        logger.info("MLflow run %s: commit %s (dirty=%s)", mlflow.active_run().info.run_id,
                    tags["git_commit"][:12], tags["git_dirty"])
