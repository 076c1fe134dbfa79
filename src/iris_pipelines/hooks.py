"""Provenance for every run: git commit, dirty flag, lock file, Kedro env and the versions of the inputs.

A node sees loaded data, never the dataset or its version, but a reproducibility review needs the exact
``episode_index`` / ``preprocessed_manifest`` versions behind a registered model. Kedro hands
``before_node_run`` the catalog, so ``InputVersionHooks`` tags the run kedro-mlflow opened with
``input_version.<dataset>`` for every versioned input; ``register_model`` copies these onto the model version.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.client
import logging
import math
import os
import re
import signal
import ssl
import subprocess
import sys
import types
import urllib.error
import urllib.request
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
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
    """An interrupted `kedro run` leaves its MLflow run KILLED, not FINISHED and not RUNNING for ever;
    one whose end fails leaves it FAILED.

    Kedro reports a failing node through ``on_pipeline_error`` (kedro-mlflow then ends the run FAILED),
    but Ctrl-C (KeyboardInterrupt) and SIGTERM (``scancel``, a SLURM time limit, ``kill``) are not
    exceptions Kedro catches: MLflow's exit handler closed a Ctrl-C'd run as FINISHED, and SIGTERM killed
    the process with its run still RUNNING. While a pipeline runs, SIGTERM and SIGHUP exit through Python
    (status 128 + signal; not a signal the user ignores, as `nohup` does SIGHUP) and an exit handler ends
    the open run as KILLED. A run left open by an interrupted
    pipeline in a process that goes on (a notebook) is ended KILLED when the next session starts, rather
    than kedro-mlflow taking the next pipeline's records into it.

    ``after_pipeline_run`` and ``on_pipeline_error`` are wrappers: pluggy calls kedro-mlflow's hooks first,
    and when one of them raised (its ``end_run`` failing to reach the store: a tracking server restarting,
    a locked SQLite file) a plain hook here never ran, so the run stayed RUNNING in the store and the
    signal handlers stayed in the process. Kedro calls ``after_pipeline_run`` outside the ``try`` that
    reports errors through ``on_pipeline_error``, so nothing else ends the run.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.open_run_id: str | None = None
        self.callers_run_id: str | None = None  # opened before the session: kedro-mlflow logs into it
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
        active = mlflow.active_run()  # before kedro-mlflow's hook, which may open one
        self.callers_run_id = None if active is None else active.info.run_id

    @hook_impl(trylast=True)  # after kedro-mlflow's, which opens the run
    def before_pipeline_run(self) -> None:
        active = mlflow.active_run()
        if active is None:
            return
        self.open_run_id = active.info.run_id
        self.previous = install_handlers(self.SIGNALS, _exit_on_signal)

    @hook_impl(wrapper=True)
    def after_pipeline_run(self) -> Generator[None, Any, Any]:
        return (yield from self._pipeline_ends())

    @hook_impl(wrapper=True)
    def on_pipeline_error(self) -> Generator[None, Any, Any]:
        return (yield from self._pipeline_ends())

    def _pipeline_ends(self) -> Generator[None, Any, Any]:
        """Around the other hooks: when one raises, the run ends here; the handlers go back either way."""
        run_id = self.open_run_id
        try:
            return (yield)
        except BaseException as error:
            if run_id is not None and run_id != self.callers_run_id:  # the caller ends their own run
                _end_unended_run(run_id, "FAILED" if isinstance(error, Exception) else "KILLED")
            raise
        finally:
            self.open_run_id = None
            restore_handlers(self.previous)
            self.previous = {}


def _end_unended_run(run_id: str, status: str) -> None:
    """End ``run_id`` with ``status`` after a hook failed while the pipeline ended: off this process's run
    stack (or the next session would log into it) and, where it is still RUNNING, in the store."""
    ended = False  # here; kedro-mlflow may have ended it before another hook failed
    try:
        # The store likely failed just now (a server restarting): MLflow's retries would hold the process
        # for minutes per request, on SLURM in the allocation's time; one short try each, then the log.
        with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
            while (active := mlflow.active_run()) is not None and active.info.run_id == run_id:
                ended = True
                with contextlib.suppress(Exception):  # it pops the run before it writes to the store
                    mlflow.end_run(status)
            client = mlflow.MlflowClient()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
                ended = True
    except Exception as error:  # noqa: BLE001 - the hook's own error follows; this one is logged
        logger.error(
            "MLflow run %s could not be ended (%s): it stays RUNNING in the store; end it with "
            "MlflowClient().set_terminated(%r, %r)",
            run_id,
            " ".join(str(error).split())[:300],
            run_id,
            status,
        )
        return
    if ended:
        logger.error("A hook failed as the pipeline ended: MLflow run %s ends %s", run_id, status)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


class ProjectRootHooks:
    """Runs the project from its root, wherever ``kedro run`` was started.

    Kedro finds the project from a subfolder and anchors the catalog's paths at its root, but relative
    paths in parameters (``preprocess.output_dir``, ``train.checkpoint_root``, ``phantoms.root``) and
    mlflow.yml's ``sqlite:///mlflow.db`` follow the current folder: a run from ``notebooks/`` wrote its
    volumes, checkpoints and a second MLflow store there, and missed the caches and checkpoints.
    A wrapper, so it runs before every plain ``after_context_created`` hook, kedro-mlflow's (which reads
    mlflow.yml and opens the tracking store) among them.

    It also hands the next session of the process (a notebook comparing two projects) the MLflow
    variables as they were before this one: kedro-mlflow's ``mlflow.set_tracking_uri`` and
    ``set_registry_uri`` export ``MLFLOW_TRACKING_URI`` and ``MLFLOW_REGISTRY_URI`` and never unset them,
    and the next project's ``${env_or:MLFLOW_TRACKING_URI,…}`` took the previous project's store for the
    user's. A value changed since (the user's own export) is left alone. What was exported is kept for the
    process (:func:`_process_state`), not on this object: ``%reload_kedro`` re-imports the package, and so
    makes new hooks, while the exported variables stay.
    """

    EXPORTED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")

    @hook_impl(wrapper=True)
    def after_context_created(self, context: Any) -> Generator[None, Any, Any]:
        state = _process_state()
        for key, (before, left) in state.exported.items():
            if os.environ.get(key) == left:
                _set_or_unset(key, before)
        before = {key: os.environ.get(key) for key in self.EXPORTED}
        root = Path(context.project_path).resolve()
        if Path.cwd().resolve() != root:
            logger.warning("Running from the project root %s (started in %s)", root, Path.cwd())
            os.chdir(root)
        try:
            return (yield)
        finally:
            # variable -> (its value before this session's hooks, the value they left), where they differ
            state.exported = {
                key: (value, os.environ.get(key))
                for key, value in before.items()
                if os.environ.get(key) != value
            }


_STATE_MODULE = "_iris_pipelines_process_state"


def _process_state() -> types.ModuleType:
    """State of this Python process that must outlive the package's modules: Kedro's ``%reload_kedro``
    removes every module whose name starts with the package's (so this one's name does not) and imports
    them afresh, while the process environment and MLflow carry on."""
    state = sys.modules.get(_STATE_MODULE)
    if state is None:
        state = types.ModuleType(_STATE_MODULE, "iris_pipelines hooks: state kept across %reload_kedro")
        state.exported = {}
        sys.modules[_STATE_MODULE] = state
    return state


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """The process environment with ``values`` set, as it was afterwards."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            _set_or_unset(key, value)


def _set_or_unset(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


class MissingEnvironmentVariable(ValueError):
    """A variable a Kedro env's configuration needs (``${required_env:NAME}`` in settings.py) is not set."""


class TrackingServerUnreachable(click.ClickException):
    """The MLflow tracking server of the run's Kedro env did not answer its health check. A click error:
    `kedro run` prints its one line (``Error: …``, exit status 1), not a traceback through the hooks."""


HEALTH_TIMEOUT_ENV = "IRIS_MLFLOW_HEALTH_TIMEOUT"  # seconds the tracking server has to answer /health
HEALTH_TIMEOUT_S = 10.0


class TrackingServerHooks:
    """A tracking server that does not answer fails `kedro run` in seconds, before anything runs.

    MLflow's client retries an unreachable server for minutes (7 retries with back-off, 120 s read
    timeouts: about 4 minutes for a refused connection, up to 20 for a server that never answers), which
    on SLURM burns the allocation. One GET of the server's ``/health``, without retries, decides first:
    no connection, no answer within ``$IRIS_MLFLOW_HEALTH_TIMEOUT`` seconds (default 10) or a 5xx (a
    proxy in front of a stopped server) fail the run; any other answer, a TLS error included, lets MLflow
    go on and report what it finds. An env that needs a variable left unset (``${required_env:…}``,
    conf/hpcc's ``MLFLOW_TRACKING_URI``) fails here too, with the variable's one line rather than the
    traceback of the config resolution in kedro-mlflow's hook.
    ``tryfirst``: before kedro-mlflow's ``after_context_created`` contacts the server.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        from kedro.config import MissingConfigException
        from omegaconf.errors import InterpolationResolutionError

        try:  # kedro-mlflow resolves mlflow.yml even when it then logs into a caller's run
            uri = str(context.config_loader["mlflow"].get("server", {}).get("mlflow_tracking_uri") or "")
        except MissingConfigException:
            return
        except InterpolationResolutionError as error:
            # OmegaConf keeps no exception chain, only "<class> raised while resolving interpolation: <msg>"
            marker = f"{MissingEnvironmentVariable.__name__} raised while resolving interpolation: "
            message = str(error).partition(marker)[2].split("\n")[0]
            if not message:
                raise
            raise click.ClickException(f"conf/{context.env or 'local'}/mlflow.yml: {message}") from None
        if mlflow.active_run() is not None:
            return  # kedro-mlflow logs into the caller's run, on the caller's store
        if uri.partition(":")[0].lower() in ("http", "https"):
            check_tracking_server(uri, context.env or "local")


def check_tracking_server(uri: str, env: str) -> None:
    """Raise ``TrackingServerUnreachable`` unless the server at ``uri`` answers its ``/health``."""
    source = f"mlflow_tracking_uri in conf/{env}/mlflow.yml"
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip() == uri:
        source = f"MLFLOW_TRACKING_URI, which conf/{env}/mlflow.yml reads"
    try:
        parts = urlsplit(uri)
    except ValueError as error:  # not shown: the URI may hold a login
        raise TrackingServerUnreachable(
            f"the MLflow tracking URI is malformed ({error}): fix {source}"
        ) from None
    # No login (user:password@) or query (a token) in what is requested or shown; /health needs neither.
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
    raw = os.environ.get(HEALTH_TIMEOUT_ENV, "").strip()
    try:
        timeout = float(raw) if raw else HEALTH_TIMEOUT_S
    except ValueError:
        timeout = math.nan
    if not 0 < timeout < math.inf:
        raise click.ClickException(f"{HEALTH_TIMEOUT_ENV}={raw!r}: expected a number of seconds above 0")
    try:
        with urllib.request.urlopen(f"{shown}/health", timeout=timeout):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:
            return  # it answered (a login or a route it lacks): MLflow's own requests say the rest
        reason = f"HTTP {error.code} {error.reason}"
    except (http.client.HTTPException, ValueError) as error:  # not HTTP there; a malformed host or port
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    except OSError as error:  # URLError (no connection), or a timeout or hang-up while reading
        cause = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(cause, ssl.SSLError):
            return  # something answered; MLflow, with its own certificate settings, says what is wrong
        if isinstance(cause, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        else:
            reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    raise TrackingServerUnreachable(
        f"MLflow tracking server {shown} is unreachable ({reason}): start it or fix {source}"
    )


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
