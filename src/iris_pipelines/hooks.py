"""Provenance for every run: git commit, dirty flag, lock file, Kedro env and the versions of the inputs.

A node sees loaded data, never the dataset or its version, but a reproducibility review needs the exact
``episode_index`` / ``preprocessed_manifest`` versions behind a registered model. Kedro hands
``before_node_run`` the catalog, so ``InputVersionHooks`` tags the run kedro-mlflow opened with
``input_version.<dataset>`` for every versioned input; ``register_model`` copies these onto the model version.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl

from iris_pipelines.signals import install_handlers, restore_handlers

logger = logging.getLogger(__name__)

LOCK_FILE = "requirements.lock"
# `make install` writes the sha256 of the lock file it installed into the environment's folder: the lock on
# disk says what a checkout asks for, this says what the running packages came from (a `git pull` that
# changes the lock does not reinstall anything by itself).
INSTALLED_MARKER = ".installed"


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
    # MLflow store are git-ignored. `--untracked-files=normal` overrides a user's or checkout's
    # `status.showUntrackedFiles=no`, under which git lists no untracked file at all. A status that fails
    # or times out (a slow NFS) is not "clean".
    changes = git("status", "--porcelain", "--untracked-files=normal")
    return {"git_commit": commit, "git_dirty": "unknown" if changes is None else str(bool(changes)).lower()}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def installed_lock_sha256(prefix: Path | None = None) -> str:
    """The sha256 of the lock file this Python environment was installed from; ``unknown`` for one that
    `make install` did not make (or made before it recorded the hash)."""
    marker = Path(sys.prefix if prefix is None else prefix) / INSTALLED_MARKER
    try:
        recorded = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"
    return recorded if re.fullmatch(r"[0-9a-f]{64}", recorded) else "unknown"


def provenance_tags(project_path: Path, env: str | None) -> dict[str, str]:
    tags = git_state(project_path)
    tags["kedro_env"] = env or "local"
    lock = project_path / LOCK_FILE
    tags["lockfile_sha256"] = file_sha256(lock) if lock.exists() else "missing"
    tags["installed_lock_sha256"] = installed_lock_sha256()
    if tags["installed_lock_sha256"] not in ("unknown", tags["lockfile_sha256"]):
        logger.warning(
            "This environment (%s) was installed from another %s than the checkout's: the run records "
            "both hashes; run `make install` to install what the checkout pins",
            sys.prefix,
            LOCK_FILE,
        )
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


class FailedStartHooks:
    """A run whose start fails ends FAILED, not FINISHED.

    Kedro calls ``before_pipeline_run`` outside the ``try`` that reports a failing pipeline through
    ``on_pipeline_error``: when a hook raises after kedro-mlflow opened the run (``ProvenanceHooks``
    logging the lock file to an artifact store that is full, unreachable or read-only), nothing ended the
    run, and MLflow's exit handler closed it as FINISHED (in a notebook, it stayed open and took the next
    session's records). This wrapper sees every ``before_pipeline_run`` hook's outcome and ends the runs
    opened during the call, leaving a run the caller had opened before it alone.
    """

    @hook_impl(wrapper=True)
    def before_pipeline_run(self) -> Any:
        before = mlflow.active_run()
        caller_run_id = None if before is None else before.info.run_id
        try:
            return (yield)
        except BaseException as error:
            status = "FAILED" if isinstance(error, Exception) else "KILLED"  # Ctrl-C, SystemExit
            while (active := mlflow.active_run()) is not None and active.info.run_id != caller_run_id:
                logger.error(
                    "kedro run failed before its pipeline started: MLflow run %s ends %s",
                    active.info.run_id,
                    status,
                )
                mlflow.end_run(status)
            raise


class InterruptedRunHooks:
    """An interrupted `kedro run` leaves its MLflow run KILLED, not FINISHED and not RUNNING for ever.

    Kedro reports a failing node through ``on_pipeline_error`` (kedro-mlflow then ends the run FAILED),
    but Ctrl-C (KeyboardInterrupt) and SIGTERM (``scancel``, a SLURM time limit, ``kill``) are not
    exceptions Kedro catches: MLflow's exit handler closed a Ctrl-C'd run as FINISHED, and SIGTERM killed
    the process with its run still RUNNING. While a pipeline runs, SIGTERM and SIGHUP exit through Python
    (status 128 + signal; not a signal the user ignores, as `nohup` does SIGHUP) and an exit handler ends
    the open run as KILLED. A run left open by an interrupted
    pipeline in a process that goes on (a notebook) is ended KILLED when the next session starts, rather
    than kedro-mlflow taking the next pipeline's records into it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.open_run_id: str | None = None
        self.previous: dict[int, Any] = {}
        atexit.register(self.end_interrupted_run)  # after MLflow's own: atexit runs it before MLflow's

    def end_interrupted_run(self) -> None:
        # kedro-mlflow pushes the run once more for each running node (its before_node_run): pop every
        # copy, or MLflow's own exit handler finds one left and ends the run FINISHED after all.
        announced = False
        while self.open_run_id is not None and (active := mlflow.active_run()) is not None:
            if active.info.run_id != self.open_run_id:
                break  # a caller's own run below ours stays theirs
            if not announced:
                logger.warning("kedro run was interrupted: MLflow run %s ends KILLED", self.open_run_id)
                announced = True
            mlflow.end_run("KILLED")
        self.open_run_id = None

    @hook_impl(tryfirst=True)
    def after_context_created(self) -> None:
        self.end_interrupted_run()

    @hook_impl(trylast=True)  # after kedro-mlflow's, which opens the run
    def before_pipeline_run(self) -> None:
        active = mlflow.active_run()
        if active is None:
            return
        self.open_run_id = active.info.run_id
        self.previous = install_handlers(self.SIGNALS, _exit_on_signal)

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._pipeline_ended()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._pipeline_ended()

    def _pipeline_ended(self) -> None:
        self.open_run_id = None
        restore_handlers(self.previous)
        self.previous = {}


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


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
